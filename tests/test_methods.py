"""Each method's defining behaviour, against an oracle, on tiny synthetic data."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dst.core.models import MLP
from dst.engine.allocation import active_count, layer_densities
from dst.engine.masked import MaskedLayer, MaskedNet
from dst.engine.optimizer_state import per_weight_state
from dst.engine.prune_regrow import dense_gradients
from dst.engine.update_rule import LayerUpdate
from dst.methods.catalog import METHODS, Target, get_method
from dst.methods.gradual_pruning import GradualPruning, cubic_density
from dst.methods.sparse_momentum import MomentumTracker, redistribute, sparse_momentum_step

STEPS, STEPS_PER_EPOCH = 40, 8


def batches(steps: int, seed: int = 0, features: int = 24, classes: int = 6):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        inputs = torch.randn(16, features, generator=generator)
        yield inputs, (inputs[:, :classes].argmax(1) + (inputs[:, 0] > 1).long()) % classes


def train(method, target: Target, steps: int = STEPS, on_step=None, seed: int = 0):
    """Build and train ``method`` on a small MLP with SGD (momentum, weight decay); returns (model, scheduler)."""
    torch.manual_seed(seed)
    method = get_method(method)
    model = method.build(MLP(24, (40, 30), 6), target, torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = method.scheduler(model, target, optimizer, steps, STEPS_PER_EPOCH, torch.Generator().manual_seed(1))
    try:
        for step, (inputs, labels) in enumerate(batches(steps, seed), start=1):
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.after_step((inputs, labels))
            if on_step is not None:
                on_step(step, model, optimizer)
    finally:
        if scheduler is not None:
            method.close(scheduler)
    return model, scheduler


def target_counts(target: Target) -> dict[str, int]:
    """Oracle: the active count per layer of the target, from the allocation alone."""
    shapes = {"fc1": (40, 24), "fc2": (30, 40), "fc3": (6, 30)}
    densities = layer_densities(shapes, target.sparsity, target.allocation, target.keep_dense)
    return {name: active_count(math.prod(shape), densities[name]) for name, shape in shapes.items()}


def counts(model: MaskedNet) -> dict[str, int]:
    return {name: layer.active_count for name, layer in model.masked_layers().items()}


def check_inactive_is_zero(model: MaskedNet, optimizer) -> None:
    for layer in model.masked_layers().values():
        assert torch.all(layer.weight[~layer.mask] == 0)
        for state in per_weight_state(optimizer, layer.weight):
            assert torch.all(state[~layer.mask] == 0)


@pytest.mark.parametrize("name", ["static", "set", "rigl", "snfs", "gmp"])
@pytest.mark.parametrize("target", [Target(0.8, "erk"), Target(0.8, "uniform", "last")])
def test_every_sparse_method_ends_with_exactly_the_target_counts(name, target):
    method = METHODS[name]
    if name in ("rigl", "gmp"):
        method = replace(method, every=5)
    expected = target_counts(target)
    seen = []

    def on_step(step, model, optimizer):
        check_inactive_is_zero(model, optimizer)
        seen.append(counts(model))

    model, _ = train(method, target, on_step=on_step)
    if name == "snfs":  # redistribution moves weights between layers; the net's total is exact
        assert all(sum(c.values()) == sum(expected.values()) for c in seen)
        assert sum(counts(model).values()) == sum(expected.values())
    elif name == "gmp":
        assert counts(model) == expected
    else:
        assert all(c == expected for c in seen)
    if target.keep_dense:
        assert model.masked_layers()["fc3"].mask.all()


def test_static_never_changes_the_mask_but_trains_the_weights():
    masks, weights = [], []

    def on_step(step, model, optimizer):
        masks.append([layer.mask.clone() for layer in model.masked_layers().values()])
        weights.append([layer.weight.detach().clone() for layer in model.masked_layers().values()])

    _, scheduler = train("static", Target(0.9), on_step=on_step)
    assert scheduler is None
    assert all(torch.equal(a, b) for step in masks for a, b in zip(masks[0], step))
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], weights[-1]))


def test_set_updates_once_an_epoch_but_not_after_the_last_step():
    _, scheduler = train("set", Target(0.8))
    assert [event.t for event in scheduler.history] == list(range(STEPS_PER_EPOCH, STEPS, STEPS_PER_EPOCH))
    assert all(event.prune_ratio == 0.3 for event in scheduler.history)
    assert all(update.pruned == update.regrown > 0 for event in scheduler.history
               for update in event.layers.values())


def test_set_with_sparse_learnings_schedule_decays_its_fraction_to_the_last_update():
    _, scheduler = train(replace(METHODS["set"], prune_ratio=0.5, schedule="cosine"), Target(0.8))
    end = STEPS - 1
    assert [event.t for event in scheduler.history] == list(range(STEPS_PER_EPOCH, STEPS, STEPS_PER_EPOCH))
    for event in scheduler.history:
        assert event.prune_ratio == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * event.t / end)), rel=1e-12)
    assert scheduler.history[0].prune_ratio > scheduler.history[-1].prune_ratio > 0


def test_rigl_decays_its_update_fraction_and_stops_at_three_quarters_of_training():
    method = replace(METHODS["rigl"], every=4)
    snapshots = {}

    def on_step(step, model, optimizer):
        snapshots[step] = [layer.mask.clone() for layer in model.masked_layers().values()]

    _, scheduler = train(method, Target(0.8), on_step=on_step)
    end = int(0.75 * STEPS)
    assert [event.t for event in scheduler.history] == list(range(4, end, 4))
    for event in scheduler.history:
        assert event.prune_ratio == pytest.approx(0.3 * 0.5 * (1 + math.cos(math.pi * event.t / end)))
    # After the last update the mask never changes again.
    last = scheduler.history[-1].t
    assert all(torch.equal(a, b) for step in range(last, STEPS + 1) for a, b in zip(snapshots[last], snapshots[step]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[last]))


def test_gmp_follows_the_cubic_schedule_and_never_regrows():
    method = replace(METHODS["gmp"], every=3, start_fraction=0.1, end_fraction=0.75)
    target = Target(0.9, "erk")
    expected = target_counts(target)
    history = []

    def on_step(step, model, optimizer):
        history.append((step, {name: layer.mask.clone() for name, layer in model.masked_layers().items()}))

    model, scheduler = train(method, target, on_step=on_step)
    start, end = int(0.1 * STEPS), int(0.75 * STEPS)
    assert [event.t for event in scheduler.history] == [*range(start + 3, end, 3), end]
    sizes = {name: mask.numel() for name, mask in history[0][1].items()}
    densities = layer_densities({"fc1": (40, 24), "fc2": (30, 40), "fc3": (6, 30)}, 0.9, "erk")
    for (step, masks), (_, previous) in zip(history[1:], history):
        assert all(torch.all(masks[name] <= previous[name]) for name in masks)  # pruned weights never return
        last_pruning = max([event.t for event in scheduler.history if event.t <= step], default=0)
        for name, mask in masks.items():
            density = cubic_density(last_pruning, densities[name], start, end) if last_pruning else 1.0
            assert int(mask.sum()) == active_count(sizes[name], density)
    assert {name: int(mask.sum()) for name, mask in history[end - 1][1].items()} == expected
    assert counts(model) == expected


def test_cubic_density_matches_zhu_and_gupta():
    final, start, end = 0.05, 10, 110
    for t in (0, 10, 35, 60, 85, 109, 110, 500):
        sparsity = 0.95 * (1 - (1 - min(max(t - start, 0), end - start) / (end - start)) ** 3)
        assert cubic_density(t, final, start, end) == pytest.approx(1 - sparsity, rel=1e-12)
    assert cubic_density(end, final, start, end) == final  # exact, not within rounding


def test_gradual_pruning_refuses_a_bad_schedule():
    model = MaskedNet(MLP(24, (40,), 6), 0.0)
    with pytest.raises(ValueError, match="start < end"):
        GradualPruning(model, {"fc1": 0.1, "fc2": 0.1}, start=10, end=10)
    with pytest.raises(ValueError, match="every masked layer"):
        GradualPruning(model, {"fc1": 0.1}, start=0, end=10)


@settings(max_examples=200, deadline=None)
@given(capacity=st.lists(st.integers(0, 60), min_size=1, max_size=6),
       shares=st.lists(st.floats(0, 10), min_size=6, max_size=6), fraction=st.floats(0, 1))
def test_redistribute_sums_exactly_respects_capacity_and_follows_shares(capacity, shares, fraction):
    names = [f"l{i}" for i in range(len(capacity))]
    total = round(fraction * sum(capacity))
    share = dict(zip(names, shares))
    result = redistribute(total, share, dict(zip(names, capacity)))
    assert sum(result.values()) == total
    assert all(0 <= result[name] <= cap for name, cap in zip(names, capacity))
    weight = sum(share.values())
    ideal = {name: total * share[name] / weight for name in names} if weight > 0 else None
    if ideal and all(ideal[name] + 1 <= cap for name, cap in zip(names, capacity)):
        assert all(abs(result[name] - ideal[name]) < 1 for name in names)  # nothing capped: proportional


def test_redistribute_refuses_more_than_the_free_positions():
    with pytest.raises(ValueError, match="cannot place 11"):
        redistribute(11, {"a": 1.0, "b": 1.0}, {"a": 5, "b": 5})


def toy_two_layer_net(seed: int = 0) -> MaskedNet:
    torch.manual_seed(seed)
    return MaskedNet(nn.Sequential(nn.Linear(10, 12, bias=False), nn.ReLU(), nn.Linear(12, 8, bias=False)), 0.5,
                     scale_init=False, generator=torch.Generator().manual_seed(seed))


def test_momentum_tracker_averages_dense_gradients_and_masks_what_the_optimizer_sees():
    net = toy_two_layer_net()
    layers = net.masked_layers()
    tracker = MomentumTracker(net, beta=0.9)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    expected = {name: torch.zeros_like(layer.weight) for name, layer in layers.items()}
    generator = torch.Generator().manual_seed(3)
    for _ in range(4):
        inputs, labels = torch.randn(5, 10, generator=generator), torch.randint(0, 8, (5,), generator=generator)
        # Oracle: the dense gradient, from a plain copy of the net with the current (masked) weights.
        dense = nn.Sequential(nn.Linear(10, 12, bias=False), nn.ReLU(), nn.Linear(12, 8, bias=False))
        with torch.no_grad():
            dense[0].weight.copy_(layers["0"].weight)
            dense[2].weight.copy_(layers["2"].weight)
        F.cross_entropy(dense(inputs), labels).backward()
        for name, module in (("0", dense[0]), ("2", dense[2])):
            expected[name] = 0.9 * expected[name] + module.weight.grad
        optimizer.zero_grad()
        F.cross_entropy(net(inputs), labels).backward()
        for name, layer in layers.items():
            torch.testing.assert_close(tracker.momentum[name], expected[name], rtol=1e-5, atol=1e-7)
            assert torch.all(layer.weight.grad[~layer.mask] == 0)
            assert torch.any(expected[name][~layer.mask] != 0)  # the point: momentum where no weight is
        optimizer.step()
        check_inactive_is_zero(net, optimizer)
    tracker.close()
    assert all(layer.apply_mask for layer in layers.values())


def test_sparse_momentum_step_redistributes_by_mean_momentum_and_regrows_top_momentum():
    net = toy_two_layer_net()
    layers = net.masked_layers()
    tracker = MomentumTracker(net)
    generator = torch.Generator().manual_seed(5)
    tracker.momentum["0"] = torch.randn(12, 10, generator=generator) * 10.0  # layer 0's weights move most
    tracker.momentum["2"] = torch.randn(8, 12, generator=generator) * 0.1
    before = {name: (layer.mask.clone(), layer.weight.detach().clone()) for name, layer in layers.items()}
    active = {name: int(mask.sum()) for name, (mask, _) in before.items()}
    prune = {name: round(0.5 * active[name]) for name in layers}
    shares = {name: float(tracker.momentum[name][before[name][0]].abs().mean()) for name in layers}
    regrow = redistribute(sum(prune.values()), shares, {n: layers[n].mask.numel() - active[n] for n in layers})
    assert regrow["0"] > prune["0"] and regrow["2"] < prune["2"]  # the premise: weights move to layer 0

    report = sparse_momentum_step(net, tracker, prune_ratio=0.5)

    assert sum(layer.active_count for layer in layers.values()) == sum(active.values())
    for name, layer in layers.items():
        old_mask, old_weight = before[name]
        pruned, regrown = old_mask & ~layer.mask, ~old_mask & layer.mask
        assert report[name].pruned == int(pruned.sum()) == prune[name]
        assert report[name].regrown == int(regrown.sum()) == regrow[name]
        assert layer.active_count == active[name] - prune[name] + regrow[name]
        # Oracle: pruned = smallest active magnitudes, regrown = largest |momentum| among the inactive.
        assert old_weight[pruned].abs().max() <= old_weight[old_mask & layer.mask].abs().min()
        candidates = tracker.momentum[name].abs()[~old_mask]
        assert torch.equal(tracker.momentum[name].abs()[regrown].sort().values,
                           candidates.topk(regrow[name]).values.sort().values)
        assert torch.all(layer.weight[regrown] == 0)
    tracker.close()


def test_sparse_momentum_shares_regrowth_by_the_mean_momentum_of_the_active_weights_only():
    # Layer "0": small momentum where its weights are (0.1), large where none are (about 10); layer "2": the
    # reverse (1.0, about 0.01). Over the active weights "2" moves ten times more and must get the regrowth;
    # a mean over all positions would rank "0" first by the same factor and hand the regrowth to it instead.
    net = toy_two_layer_net()
    layers = net.masked_layers()
    tracker = MomentumTracker(net)
    signs = torch.Generator().manual_seed(6)
    for name, (active_value, inactive_value) in {"0": (0.1, 10.0), "2": (1.0, 0.01)}.items():
        mask = layers[name].mask
        spread = 1 + torch.arange(mask.numel(), dtype=torch.float32).view_as(mask) / 1000  # no ties to regrow
        magnitude = torch.where(mask, torch.tensor(active_value), inactive_value * spread)
        sign = torch.randint(0, 2, mask.shape, generator=signs) * 2 - 1
        tracker.momentum[name] = magnitude * sign
    before = {name: layer.mask.clone() for name, layer in layers.items()}
    assert {name: int(mask.sum()) for name, mask in before.items()} == {"0": 60, "2": 48}
    # By hand: prune round(0.25 * 60) = 15 and round(0.25 * 48) = 12; the 27 regrown split 0.1 : 1.0, so
    # 27 / 11 = 2.45 to "0" and 24.55 to "2", rounded to 2 and 25 (largest remainder).
    expected_regrown = {"0": 2, "2": 25}
    over_all_positions = {name: float(tracker.momentum[name].abs().mean()) for name in layers}
    assert redistribute(27, over_all_positions, {"0": 60, "2": 48}) == {"0": 25, "2": 2}  # what the wrong mean gives

    report = sparse_momentum_step(net, tracker, prune_ratio=0.25)

    for name, layer in layers.items():
        pruned, regrown = before[name] & ~layer.mask, ~before[name] & layer.mask
        assert report[name] == LayerUpdate(active=layer.active_count, pruned=int(pruned.sum()),
                                           regrown=int(regrown.sum()))
        assert (report[name].pruned, report[name].regrown) == ({"0": 15, "2": 12}[name], expected_regrown[name])
        candidates = tracker.momentum[name].abs().masked_fill(before[name], -1.0).view(-1)
        assert set(regrown.view(-1).nonzero().squeeze(1).tolist()) == set(
            candidates.topk(expected_regrown[name]).indices.tolist())
    tracker.close()


def test_unknown_method_and_bad_keep_dense_are_named():
    with pytest.raises(ValueError, match=r"'sparse'.*\['dense', 'static', 'set', 'rigl', 'srigl', 'snfs', 'gmp'\]"):
        get_method("sparse")
    with pytest.raises(ValueError, match="keep_dense has unknown layer"):
        METHODS["static"].build(MLP(24, (40,), 6), Target(0.5, keep_dense=("middle",)))


def test_dense_is_a_plain_copy():
    base = MLP(24, (40,), 6)
    model = METHODS["dense"].build(base, Target(0.9))
    assert not any(isinstance(module, MaskedLayer) for module in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters()))
    assert model.fc1.weight is not base.fc1.weight


@pytest.mark.parametrize("masking", ["gradient", "forward"])
def test_momentum_keeps_tracking_inactive_positions_after_a_dense_gradient_pass(masking):
    torch.manual_seed(0)
    net = MaskedNet(nn.Sequential(nn.Linear(10, 12, bias=False), nn.ReLU(), nn.Linear(12, 8, bias=False)), 0.5,
                    scale_init=False, generator=torch.Generator().manual_seed(0), masking=masking)
    tracker = MomentumTracker(net, beta=0.9)
    generator = torch.Generator().manual_seed(3)
    batch = torch.randn(5, 10, generator=generator), torch.randint(0, 8, (5,), generator=generator)
    dense_gradients(net, batch)  # RigL's pass, or a user's probe, while the tracker is open
    with net.masks_bypassed():
        pass
    assert not any(layer.apply_mask for layer in net.masked_layers().values())
    before = {name: momentum.clone() for name, momentum in tracker.momentum.items()}
    F.cross_entropy(net(batch[0]), batch[1]).backward()
    for name, layer in net.masked_layers().items():
        grown = (tracker.momentum[name] - 0.9 * before[name])[~layer.mask]
        assert torch.count_nonzero(grown) > 0, name  # the dense gradient still reaches the momentum
        assert torch.all(layer.weight.grad[~layer.mask] == 0)
    tracker.close()
    assert all(layer.apply_mask for layer in net.masked_layers().values())


@pytest.mark.parametrize("density", [float("nan"), 1.5, -1.0, 0.0, "0.1"])
def test_gradual_pruning_refuses_final_densities_that_are_not_fractions_kept(density):
    model = MaskedNet(MLP(24, (40, 30), 6), 0.0)
    densities = {name: 0.1 for name in model.masked_layers()}
    with pytest.raises(ValueError, match=r"final_densities must be fractions of weights kept, in \(0, 1\]"):
        GradualPruning(model, {**densities, "fc1": density}, start=0, end=10)


def test_a_target_checks_its_allocation_when_built():
    with pytest.raises(ValueError, match=r"unknown allocation \['erk'\]; choose one of \['erk', 'uniform'\]"):
        Target(0.9, allocation=["erk"])


def test_a_dense_gradient_pass_inside_an_open_tracker_is_dense_and_not_recorded():
    net = toy_two_layer_net()
    tracker = MomentumTracker(net, beta=0.9)
    generator = torch.Generator().manual_seed(4)
    batch = torch.randn(5, 10, generator=generator), torch.randint(0, 8, (5,), generator=generator)
    F.cross_entropy(net(batch[0]), batch[1]).backward()  # one training pass: momentum is the gradient
    recorded = {name: momentum.clone() for name, momentum in tracker.momentum.items()}
    gradients = dense_gradients(net, batch)
    for name, layer in net.masked_layers().items():
        assert torch.count_nonzero(gradients[name][~layer.mask]) > 0, name  # RigL needs them
        assert torch.equal(tracker.momentum[name], recorded[name]), name
    tracker.close()
