"""Each method's defining rule against a small independent port of its reference code, on toy layers.

The ports below are written from the reference implementations (cited in each), in numpy, and
share nothing with ``dst``: same inputs, and where there is chance, positions that every
candidate draw must satisfy.
"""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from dst.core.models import MLP
from dst.engine.masked import MaskedNet
from dst.engine.patterns import get_pattern
from dst.engine.prune_regrow import apply_dst_step, update_layer_counts
from dst.engine.schedule import DSTConfig
from dst.engine.update_rule import REGROW, MoveRule, choose_moves, moved_count, sign_split_prune
from dst.methods.catalog import IMPROVEMENTS, METHODS, Target, improved
from dst.methods.gradual_pruning import GradualPruning
from dst.methods.sparse_momentum import SparseMomentumStep, sparse_momentum_step
from dst.methods.sweep import Recipe, train_run


def one_layer_net(shape=(12, 20), density=0.3, seed=0) -> MaskedNet:
    torch.manual_seed(seed)
    return MaskedNet(nn.Sequential(nn.Linear(shape[1], shape[0])), 1 - density, "uniform",
                     generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- RigL (google-research/rigl)

def rigl_update_port(weights, mask, grads, drop_fraction):
    """``SparseRigLOptimizer._get_update_op`` in rigl/sparse_optimizers_base.py, without the 1e-5 drop noise:
    returns (new mask, new weights)."""
    flat_w, flat_m, flat_g = weights.reshape(-1), mask.reshape(-1).astype(np.float64), grads.reshape(-1)
    n_ones = int(flat_m.sum())
    n_prune = int(np.float32(n_ones) * np.float32(drop_fraction))  # math_ops.cast(..., int32) truncates
    n_keep = n_ones - n_prune
    score_drop = np.abs(flat_m * flat_w)
    mask1 = np.zeros_like(flat_m)
    mask1[np.argsort(-score_drop, kind="stable")[:n_keep]] = 1
    score_grow = np.abs(flat_g)
    lifted = np.where(mask1 == 1, score_grow.min() - 1, score_grow)  # the post-drop mask: dropped may regrow
    mask2 = mask1.copy()
    mask2[np.argsort(-lifted, kind="stable")[:n_prune]] = 1
    new_connections = (mask2 == 1) & (flat_m == 0)  # only truly new weights are set (to zero, grow_init='zeros')
    new_weights = np.where(new_connections, 0.0, flat_w) * mask2
    return mask2.reshape(mask.shape).astype(bool), new_weights.reshape(weights.shape)


@pytest.mark.parametrize("seed", range(5))
def test_rigl_drop_and_grow_match_rigls_lifted_update(seed):
    net = one_layer_net(density=0.3, seed=seed)
    layer = net.masked_layers()["0"]
    generator = torch.Generator().manual_seed(100 + seed)
    grads = torch.randn(layer.weight.shape, generator=generator)
    # Make a few of the weights about to be dropped the best places to grow, so the lifted rule matters.
    weights = layer.weight.detach().numpy().copy()
    active = np.flatnonzero(layer.mask.numpy())
    smallest = active[np.argsort(np.abs(weights.reshape(-1)[active]))[:3]]
    grads.view(-1)[torch.from_numpy(smallest)] = 100.0
    expected_mask, expected_weights = rigl_update_port(weights, layer.mask.numpy(), grads.numpy(), 0.3)
    rule = METHODS["rigl"].rule
    report = apply_dst_step(net, 0.3, "gradient", signals={"0": grads}, rule=rule)
    assert np.array_equal(layer.mask.numpy(), expected_mask)
    assert np.allclose(layer.weight.detach().numpy(), expected_weights)
    # The weights dropped and grown back kept their values and are not counted as moved.
    assert expected_mask.reshape(-1)[smallest].all() and (weights.reshape(-1)[smallest] != 0).all()
    assert report["0"].pruned == report["0"].regrown == int((expected_mask & ~(weights != 0)).sum())


def test_rigl_floors_its_drop_count_where_this_project_rounds():
    assert moved_count(25, 100, 0.3, MoveRule(rounding="floor")) == 7  # 7.5: rigl's int cast
    assert moved_count(25, 100, 0.3) == 8
    assert moved_count(25, 100, 0.3, MoveRule(rounding="ceil")) == 8
    assert moved_count(21, 100, 0.3, MoveRule(rounding="ceil")) == 7  # 6.3: sparse_learning's math.ceil
    assert METHODS["rigl"].rule.rounding == "floor" and METHODS["srigl"].rule.rounding == "floor"
    with pytest.raises(ValueError, match="rounding must be one of"):
        MoveRule(rounding="up")


def test_rigl_skips_the_weight_update_on_a_mask_update_step(monkeypatch):
    steps = []
    original = torch.optim.SGD.step

    def counted(self, *args, **kwargs):
        steps.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", counted)
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(128, 1, 28, 28, generator=generator), torch.randint(0, 10, (128,),
                                                                                      generator=generator)
    recipe = Recipe(epochs=1, batch_size=16)  # 8 steps; updates every 2 steps while the cosine is above 0
    data, test = (images, labels), [(images[:32], labels[:32])]
    reference = train_run("lenet300-100", replace(METHODS["rigl"], every=2), Target(0.9), recipe, data, test)
    assert reference["updates"] == 2 and len(steps) == 8 - 2
    steps.clear()
    stepping = train_run("lenet300-100", replace(METHODS["rigl"], every=2, step_on_update=True), Target(0.9), recipe,
                         data, test)
    assert stepping["updates"] == 2 and len(steps) == 8


# ----------------------------------------------------------------------------- SET (Mocanu et al.)

def rewire_mask_port(weights, zeta):
    """``rewireMask`` in dcmocanu/sparse-evolutionary-artificial-neural-networks (set_mlp_keras_cifar10.py):
    the weights it keeps (bool), from the layer's dense matrix with zeros at inactive positions."""
    values = np.sort(weights.ravel())
    first_zero_pos = np.flatnonzero(values == 0).min()
    last_zero_pos = np.flatnonzero(values == 0).max()
    largest_negative = values[int((1 - zeta) * first_zero_pos)]
    smallest_positive = values[int(min(values.shape[0] - 1, last_zero_pos + zeta * (values.shape[0] - last_zero_pos)))]
    rewired = weights.copy()
    rewired[rewired > smallest_positive] = 1
    rewired[rewired < largest_negative] = 1
    rewired[rewired != 1] = 0
    return rewired == 1


@pytest.mark.parametrize("seed, zeta", [(0, 0.3), (1, 0.3), (2, 0.5), (3, 0.1), (4, 0.05)])
def test_set_prunes_positive_and_negative_weights_apart_as_mocanus_rewire_mask(seed, zeta):
    rng = np.random.default_rng(seed)
    mask = rng.random((30, 40)) < 0.2
    weights = np.where(mask, rng.normal(0.1 * (seed - 2), 1.0, mask.shape), 0.0)  # skewed signs
    kept = rewire_mask_port(weights, zeta)
    active = np.flatnonzero(mask)
    pruned = sign_split_prune(weights.ravel()[active], mask.size, zeta)
    ours_kept = np.zeros(mask.size, dtype=bool)
    ours_kept[np.delete(active, pruned)] = True
    assert np.array_equal(ours_kept.reshape(mask.shape), kept & mask)


def test_sets_step_regrows_as_many_at_random_free_places_and_may_take_back_a_pruned_one():
    net = one_layer_net(shape=(6, 8), density=0.5, seed=3)
    layer = net.masked_layers()["0"]
    values = layer.weight.detach().numpy().copy()
    before = layer.mask.numpy().copy()
    kept = rewire_mask_port(values, 0.3) & before
    back = 0
    for seed in range(40):  # the regrowth is random: every draw must keep the port's survivors and the count
        copy = one_layer_net(shape=(6, 8), density=0.5, seed=3)
        apply_dst_step(copy, 0.3, "random", rule=METHODS["set"].rule, generator=torch.Generator().manual_seed(seed))
        after = copy.masked_layers()["0"].mask.numpy()
        assert after.sum() == before.sum() and (after | ~kept).all()
        back += int((after & before & ~kept).sum())
    assert back > 0  # the rewired mask is where SET grows: a weight it just pruned sometimes comes back


def test_set_sign_split_needs_an_unstructured_layer():
    with pytest.raises(ValueError, match="sign_split=False"):
        replace(METHODS["set"], pattern="fan_in")
    net = MaskedNet(nn.Sequential(nn.Linear(16, 8)), 0.5, "uniform", pattern="fan_in")
    with pytest.raises(ValueError, match="sign_split prunes positive and negative weights separately"):
        apply_dst_step(net, 0.3, rule=MoveRule(sign_split=True))


# ----------------------------------------------------------------------------- sparse momentum (sparse_learning)

def cosine_decay_port(prune_rate, t_max, steps, eta_min=0.005):
    """sparse_learning's ``CosineDecay``: torch's CosineAnnealingLR on a dummy optimizer, stepped ``steps`` times."""
    dummy = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=prune_rate)
    stepper = torch.optim.lr_scheduler.CosineAnnealingLR(dummy, t_max, eta_min)
    for _ in range(steps):
        dummy.step()  # nothing to step; torch wants it before the schedule's
        stepper.step()
    return dummy.param_groups[0]["lr"]


def test_sparse_momentums_prune_rate_decays_to_eta_min_as_cosine_decay():
    net = MaskedNet(MLP(12, (10,), 4), 0.8, "uniform", generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    total, per_epoch = 400, 40
    scheduler = METHODS["snfs"].scheduler(net, Target(0.8), optimizer, total, per_epoch)
    try:
        config = scheduler.config
        updates = config.updates_within(total)
        assert updates == list(range(per_epoch, total, per_epoch))  # after every epoch but the last
        for t in updates:
            assert config.prune_ratio_at(t) == pytest.approx(cosine_decay_port(0.5, config.end, t), rel=1e-9)
        assert config.prune_ratio_at(config.end) == pytest.approx(0.005)
    finally:
        scheduler.close()
    for bad in (0.2, -0.1, float("nan"), "0.01"):
        with pytest.raises(ValueError, match="ratio_min is the cosine schedule's floor"):
            DSTConfig(prune_ratio=0.1, ratio_min=bad, schedule="cosine", end=10)
    with pytest.raises(ValueError, match="with schedule='constant'"):
        DSTConfig(prune_ratio=0.1, ratio_min=0.05)


def momentum_growth_port(mask_after_death, momentum, total_regrowth):
    """sparse_learning's ``momentum_growth``: the ``total_regrowth`` largest |momentum| where the mask after death
    is zero (so a weight just pruned may regrow)."""
    grad = np.abs(momentum.ravel()) * (mask_after_death.ravel() == 0)
    new = mask_after_death.ravel().copy()
    new[np.argsort(-grad, kind="stable")[:total_regrowth]] = True
    return new.reshape(mask_after_death.shape)


def test_sparse_momentum_grows_on_the_mask_after_death_and_rounds_its_prune_count_up():
    net = one_layer_net(shape=(10, 12), density=0.25, seed=1)
    layer = net.masked_layers()["0"]
    weights, before = layer.weight.detach().numpy().copy(), layer.mask.numpy().copy()
    active = np.flatnonzero(before)
    prune = math.ceil(0.35 * len(active))  # magnitude_prune's num_remove
    after_death = before.ravel().copy()
    after_death[active[np.argsort(np.abs(weights.ravel()[active]))[:prune]]] = False
    momentum = torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(5))
    momentum.view(-1)[torch.from_numpy(active[np.argsort(np.abs(weights.ravel()[active]))[:2]])] = 50.0
    expected = momentum_growth_port(after_death.reshape(before.shape), momentum.numpy(), prune)
    assert MoveRule(rounding="ceil").count(0.35, len(active)) == prune
    update_layer_counts(layer, prune, prune, "momentum", momentum, regrow_pruned=True)
    assert np.array_equal(layer.mask.numpy(), expected)


def test_sparse_momentum_gives_regrown_weights_their_accumulated_momentum():
    torch.manual_seed(0)
    net = MaskedNet(MLP(12, (10,), 4), 0.7, "uniform", generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    # A reference SGD buffer over every position, as sparse_learning's (gradients unmasked): m = 0.9 m + g.
    reference = {name: torch.zeros_like(layer.weight) for name, layer in net.masked_layers().items()}
    step = SparseMomentumStep(net, 0.9, optimizer, rule=METHODS["snfs"].rule, regrown_momentum=True)
    try:
        generator = torch.Generator().manual_seed(1)
        plain = MLP(12, (10,), 4)  # the same function without masks: its gradients are the dense ones
        for _ in range(5):
            inputs, targets = torch.randn(8, 12, generator=generator), torch.randint(0, 4, (8,), generator=generator)
            plain.load_state_dict({key.removeprefix("net."): value for key, value in net.state_dict().items()
                                   if "mask" not in key})
            plain.zero_grad()
            torch.nn.functional.cross_entropy(plain(inputs), targets).backward()
            linears = [module for module in plain.modules() if isinstance(module, nn.Linear)]
            for name, module in zip(reference, linears, strict=True):
                reference[name].mul_(0.9).add_(module.weight.grad)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(inputs), targets).backward()
            optimizer.step()
        before = {name: layer.mask.clone() for name, layer in net.masked_layers().items()}
        sparse_momentum_step(net, step.tracker, 0.3, optimizer, METHODS["snfs"].rule, regrown_momentum=True)
        grown = 0
        for name, layer in net.masked_layers().items():
            new = layer.mask & ~before[name]
            grown += int(new.sum())
            buffer = optimizer.state[layer.weight]["momentum_buffer"]
            assert torch.allclose(buffer[new], reference[name][new])
            assert (layer.weight.detach()[new] == 0).all()
            assert (buffer[~layer.mask] == 0).all()  # nothing revives a pruned weight
        assert grown > 0
    finally:
        step.close()
    with pytest.raises(ValueError, match="needs torch.optim.SGD with momentum"):
        SparseMomentumStep(net, 0.9, torch.optim.Adam(net.parameters()), regrown_momentum=True)


# ----------------------------------------------------------------------------- GMP (Zhu & Gupta; model_pruning)

def model_pruning_sparsity(step, begin, end, target, initial=0.0, exponent=3):
    """TensorFlow model_pruning's ``_setup_sparsity``: one progress p for every layer."""
    p = min(1.0, max(0.0, (step - begin) / (end - begin)))
    return (initial - target) * (1 - p) ** exponent + target


def test_gmp_under_uniform_prunes_every_layer_to_one_shared_s_t():
    net = MaskedNet(MLP(30, (40, 20), 5), 0.0, "uniform")
    target = Target(0.9, "uniform")
    gmp = GradualPruning(net, target.densities(net), start=10, end=50, every=5)
    for step in range(1, 61):
        event = gmp.after_step()
        if event is None:
            continue
        s_t = model_pruning_sparsity(step, 10, 50, 0.9)
        for layer in net.masked_layers().values():
            # model_pruning keeps round(size * (1 - s_t)) largest weights of every layer
            assert layer.active_count == max(round(layer.mask.numel() * (1 - 0.9)),
                                             round(layer.mask.numel() * (1 - s_t)))


# ----------------------------------------------------------------------------- SRigL (condensed-sparsity)

def const_fan_grow_port(mask_after_drop, scores, lost_per_row):
    """``RigLConstFanScheduler._get_grow_mask``: each neuron lifts its post-drop active entries and takes the top
    ``lost`` of the rest (a dropped weight may come back)."""
    grow = np.zeros_like(mask_after_drop)
    for row in range(mask_after_drop.shape[0]):
        lifted = np.where(mask_after_drop[row], -np.inf, scores[row])
        grow[row, np.argsort(-lifted, kind="stable")[:lost_per_row[row]]] = True
    return mask_after_drop | grow


def test_srigl_grows_each_neuron_back_on_its_post_drop_mask():
    pattern = get_pattern("fan_in")
    rng = np.random.default_rng(0)
    mask = pattern.random_mask((8, 20), 0.4, torch.Generator().manual_seed(0))
    magnitudes = np.where(mask, rng.random(mask.shape), 0.0)
    scores = rng.random(mask.shape)
    pruned, regrown = pattern.moves(mask, magnitudes, scores + 10 * (mask & (magnitudes < 0.3)), 10,
                                    regrow_pruned=True)
    after_drop = mask.copy().reshape(-1)
    after_drop[pruned] = False
    lost = (mask.reshape(mask.shape) & ~after_drop.reshape(mask.shape)).sum(1)
    expected = const_fan_grow_port(after_drop.reshape(mask.shape), scores + 10 * (mask & (magnitudes < 0.3)), lost)
    result = after_drop.copy()
    result[regrown] = True
    assert np.array_equal(result.reshape(mask.shape), expected)
    assert (result.reshape(mask.shape).sum(1) == mask.sum(1)).all()


# ----------------------------------------------------------------------------- init and the improvements

def test_methods_keep_the_dense_init_and_improved_scales_it():
    base = MLP(20, (30,), 5)
    target = Target(0.9, "uniform")
    plain = METHODS["set"].build(base, target, torch.Generator().manual_seed(0))
    scaled = improved("set").build(base, target, torch.Generator().manual_seed(0))
    for (name, layer), weight in zip(plain.masked_layers().items(),
                                      [m.weight for m in base.modules() if isinstance(m, nn.Linear)]):
        density = layer.active_count / layer.mask.numel()
        assert torch.equal(layer.weight.detach(), weight.detach() * layer.mask)
        assert torch.allclose(scaled.masked_layers()[name].weight.detach(),
                              weight.detach() * layer.mask / math.sqrt(density))


def test_improved_sets_each_improvement_a_method_has_and_the_references_differ():
    for method in METHODS.values():
        better = improved(method)
        for option, (value, reason) in IMPROVEMENTS.items():
            assert reason
            if hasattr(method, option):
                assert getattr(better, option) == value
    assert improved("rigl").rule == MoveRule() and improved("set").rule == MoveRule()
    assert METHODS["set"].rule == MoveRule(regrow_pruned=True, sign_split=True)
    assert METHODS["snfs"].rule == MoveRule(rounding="ceil", regrow_pruned=True)


def test_regrowing_just_pruned_weights_is_an_option_of_the_shared_rule():
    active = np.arange(0, 10)
    magnitudes = np.linspace(0.1, 1.0, 10)
    signal = np.zeros(20)
    signal[0] = 5.0  # the smallest active weight is where the gradient is largest
    pruned, regrown = choose_moves(active, magnitudes, 20, 2, REGROW["gradient"], signal, regrow_pruned=True)
    assert 0 in active[pruned] and 0 in regrown
    pruned, regrown = choose_moves(active, magnitudes, 20, 2, REGROW["gradient"], signal)
    assert 0 in active[pruned] and 0 not in regrown
    with pytest.raises(ValueError, match="regrow 3 of the 2 positions"):
        choose_moves(active, magnitudes, 12, 2, REGROW["random"], regrow_count=3)
