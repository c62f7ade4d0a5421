"""Sparsity patterns: masks drawn in the pattern, DST and GMP keep it exactly, choices against a brute-force oracle."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dst.core.models import MLP, SimpleNet
from dst.engine.masked import MaskedNet
from dst.engine.optimizer_state import optimizers_of
from dst.engine.patterns import PATTERN_KINDS, get_pattern
from dst.engine.prune_regrow import MaskedDSTStep, apply_dst_step, update_layer_counts
from dst.engine.update_rule import RegrowCriterion
from dst.methods.catalog import METHODS, Target
from dst.methods.gradual_pruning import GradualPruning
from dst.methods.sparse_momentum import SparseMomentumStep
from dst.methods.sweep import Recipe, check_reached_target, train_run

# (pattern, sparsity it can hold on MLP(32, (48, 16), 8)): every layer's inputs divide by 4 and 8.
CASES = [("unstructured", 0.9), ("fan_in", 0.9), ("2:4", 0.5), ("1:4", 0.75), ("block4x4", 0.75),
         ("block1x8", 0.75)]


def per_group_counts(pattern_name: str, mask: np.ndarray) -> np.ndarray:
    """Active units per group, computed from first principles (no pattern code): the oracle."""
    pattern = get_pattern(pattern_name)
    if pattern.kind == "unstructured":
        return np.array([mask.sum()])
    if pattern.kind == "fan_in":
        return mask.sum(axis=1)
    if pattern.kind == "n_m":
        return mask.reshape(mask.shape[0], -1, pattern.m).sum(axis=2).reshape(-1)
    rows, columns = pattern.block_shape
    blocks = mask.reshape(mask.shape[0] // rows, rows, mask.shape[1] // columns, columns).sum(axis=(1, 3))
    assert np.isin(blocks, (0, rows * columns)).all(), "a block is partly active"
    return np.array([(blocks > 0).sum()])


def net_for(pattern: str, sparsity: float, seed: int = 0) -> MaskedNet:
    return MaskedNet(MLP(32, (48, 16), num_classes=8), sparsity, pattern=pattern,
                     generator=torch.Generator().manual_seed(seed))


def test_every_pattern_module_registers_itself_and_names_parse_back():
    assert set(PATTERN_KINDS) == {"unstructured", "fan_in", "n_m", "block"}
    for spelling in ("unstructured", "fan_in", "2:4", "1:8", "block4x4", "block1x8"):
        assert get_pattern(spelling).label == spelling
        assert get_pattern(get_pattern(spelling)) == get_pattern(spelling)
    for impossible in ("4:2", "0:4"):
        with pytest.raises(ValueError, match=f"an N:M pattern needs whole numbers 0 < N <= M, got {impossible}"):
            get_pattern(impossible)
    for bad in ("2:", "block4", "fan-in", 4, None):
        with pytest.raises(ValueError, match="unknown sparsity pattern.*blockRxC.*fan_in.*N:M.*unstructured"):
            get_pattern(bad)


@pytest.mark.parametrize("pattern, sparsity", CASES)
def test_masks_follow_the_pattern_with_exact_counts(pattern, sparsity):
    net = net_for(pattern, sparsity)
    for name, layer in net.masked_layers().items():
        mask = layer.mask_2d()
        counts = per_group_counts(pattern, mask)
        assert (counts == counts[0]).all(), (name, counts)
        assert mask.sum() == layer.pattern.active_count(mask.shape, 1 - sparsity), name
        assert layer.pattern == get_pattern(pattern)
        # the density is rounded to what the pattern holds, never further than one unit per group
        group = mask.size / len(counts)
        unit = math.prod(layer.pattern.unit_shape)
        assert abs(counts[0] * unit / group - (1 - sparsity)) <= unit / group / 2 + 1e-9, name


@settings(max_examples=25, deadline=None)
@given(case=st.sampled_from(CASES), prune_ratio=st.floats(0.0, 1.0), seed=st.integers(0, 10_000),
       regrow=st.sampled_from(["random", "gradient"]))
def test_the_pattern_holds_exactly_after_every_dst_step(case, prune_ratio, seed, regrow):
    pattern, sparsity = case
    net = net_for(pattern, sparsity, seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = torch.randn(16, 32, generator=generator), torch.randint(0, 8, (16,), generator=generator)
    before = {name: per_group_counts(pattern, layer.mask_2d()) for name, layer in net.masked_layers().items()}
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(net(inputs), targets).backward()
        optimizer.step()
        masks = {name: layer.mask.clone() for name, layer in net.masked_layers().items()}
        report = apply_dst_step(net, prune_ratio, regrow, batch=(inputs, targets), optimizer=optimizer,
                                generator=generator)
        for name, layer in net.masked_layers().items():
            assert np.array_equal(per_group_counts(pattern, layer.mask_2d()), before[name]), name
            moved_in = layer.mask & ~masks[name]
            assert report[name].pruned == report[name].regrown == int(moved_in.sum())
            assert torch.all(layer.weight[moved_in] == 0), "regrown weights start at zero"
            assert torch.all(layer.weight[~layer.mask] == 0), "inactive weights are zero"
            state = optimizer.state[layer.weight]["momentum_buffer"]
            assert torch.all(state[~layer.mask | moved_in] == 0), "moved and inactive weights have no momentum"


@pytest.mark.parametrize("pattern, sparsity", [case for case in CASES if case[0] != "unstructured"])
def test_a_step_prunes_the_smallest_layer_wide_and_each_group_regrows_its_losses_by_score(pattern, sparsity):
    net = net_for(pattern, sparsity, seed=3)
    layer = next(iter(net.masked_layers().values()))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * layer.mask)
    criterion = RegrowCriterion("fixed", "fixed scores", needs=None, uses_random=False,
                                score=lambda signal, numel, random: np.random.default_rng(numel).random(numel))
    scores = criterion.score(None, layer.weight.numel(), None)
    mask = layer.mask_2d()
    weights = layer.weight.detach().numpy().copy()
    report = apply_dst_step(net, 0.3, criterion)
    # Oracle, unit by unit: walk the active units by magnitude, take one while its group can still regrow it.
    p = layer.pattern
    units = p.reduce(mask.astype(int)) > 0
    magnitude = p.reduce(np.abs(weights))
    unit_scores = p.reduce(scores.reshape(mask.shape))
    length = p.group_length(units.shape)
    group_of = np.arange(units.size) // length
    per_group = units.reshape(-1, length).sum(axis=1)
    cap = np.minimum(per_group, length - per_group)
    count = report[next(iter(report))].pruned // math.prod(p.unit_shape)
    taken, lost = [], np.zeros(len(per_group), dtype=int)
    for unit in np.argsort(np.where(units.reshape(-1), magnitude.reshape(-1), np.inf), kind="stable"):
        if len(taken) == count:
            break
        if lost[group_of[unit]] < cap[group_of[unit]]:
            taken.append(unit)
            lost[group_of[unit]] += 1
    grown = []
    for group in range(len(per_group)):
        members = np.arange(group * length, (group + 1) * length)
        free = members[~units.reshape(-1)[members]]
        grown += list(free[np.argsort(-unit_scores.reshape(-1)[free], kind="stable")[:lost[group]]])
    after = p.reduce(layer.mask_2d().astype(int)).reshape(-1) > 0
    assert count == round(0.3 * units.sum()) or count == cap.sum()
    assert set(np.flatnonzero(units.reshape(-1) & ~after)) == set(taken)
    assert set(np.flatnonzero(~units.reshape(-1) & after)) == set(grown)


def test_layers_a_pattern_cannot_hold_are_refused_by_name_at_build():
    with pytest.raises(ValueError, match=r"layer 'conv1' \(\(16, 1, 3, 3\)\) cannot follow the pattern.*multiple "
                                         r"of 4x4, got 16x9.*keep_dense"):
        MaskedNet(SimpleNet(), 0.9, pattern="block4x4")
    with pytest.raises(ValueError, match=r"cannot follow the pattern: pattern '2:4'.*9 inputs are not a multiple"):
        MaskedNet(SimpleNet(), 0.5, pattern="2:4")
    with pytest.raises(ValueError, match=r"keeps exactly 2/4 = 0.5.*not 0.1.*allocation='uniform' at sparsity 0.5"):
        MaskedNet(MLP(32, (48,), 8), 0.9, pattern="2:4")
    with pytest.raises(ValueError, match=r"keeps exactly 2/4 = 0.5.*not 0.3"):
        MaskedNet(MLP(32, (48,), 8), 0.7, pattern="2:4")
    # a dense output layer takes a little of a 50 % budget: the others' 49.x % is held as 2:4
    rounded = MaskedNet(MLP(32, (48,), 8), 0.5, pattern="2:4", keep_dense="last").masked_layers()
    assert [layer.active_count / layer.mask.numel() for layer in rounded.values()] == [0.5, 1.0]
    # kept dense, the layer needs no pattern; the others follow it
    net = MaskedNet(SimpleNet(), 0.9, pattern="block4x4", keep_dense=("first", "last"))
    layers = net.masked_layers()
    assert all(layers[name].active_count == layers[name].mask.numel() for name in ("conv1", "fc4"))
    assert {layers[name].pattern.label for name in ("conv2", "fc1", "fc2", "fc3")} == {"block4x4"}


def test_gradual_pruning_keeps_the_pattern_at_every_pruning_and_ends_on_the_target():
    for pattern, sparsity in [("fan_in", 0.9), ("2:4", 0.5), ("block4x4", 0.75)]:
        model = MaskedNet(MLP(32, (48, 16), 8), 0.0)
        target = {name: 1 - sparsity for name in model.masked_layers()}
        pruning = GradualPruning(model, target, start=0, end=40, every=10, pattern=pattern)
        reference = net_for(pattern, sparsity)
        for _ in range(40):
            event = pruning.after_step()
            for name, layer in model.masked_layers().items():
                counts = per_group_counts(pattern, layer.mask_2d())
                assert (counts == counts[0]).all(), (pattern, name, event)
        for name, layer in model.masked_layers().items():
            assert layer.active_count == reference.masked_layers()[name].active_count, (pattern, name)
    dense = MaskedNet(MLP(32, (48,), 8), 0.0)
    with pytest.raises(ValueError, match="cannot be pruned to pattern '2:4'"):
        GradualPruning(dense, dict.fromkeys(dense.masked_layers(), 0.1), start=0, end=10, pattern="2:4")


def test_methods_take_a_pattern_label_it_and_refuse_what_they_cannot_keep():
    assert replace(METHODS["set"], pattern="2:4", sign_split=False).label == "set/2:4"
    with pytest.raises(ValueError, match="set.sign_split .* cannot keep pattern '2:4'.*sign_split=False"):
        replace(METHODS["set"], pattern="2:4")
    assert replace(METHODS["rigl"], pattern="block4x4", regrow="random").label == "rigl+random/block4x4"
    assert METHODS["srigl"].label == "srigl" and METHODS["srigl"].pattern == "fan_in"
    with pytest.raises(ValueError, match="srigl is RigL under constant fan-in"):
        replace(METHODS["srigl"], pattern="2:4")
    with pytest.raises(ValueError, match="snfs moves regrown weights between layers"):
        replace(METHODS["snfs"], pattern="fan_in")
    for name in ("set", "snfs", "gmp", "static"):
        with pytest.raises(ValueError, match=f"{name}.pattern: unknown sparsity pattern 'fanin'"):
            replace(METHODS[name], pattern="fanin")
    with pytest.raises(ValueError, match="sparse momentum moves weights between layers"):
        SparseMomentumStep(net_for("fan_in", 0.9))
    layer = net_for("fan_in", 0.9).masked_layers()
    with pytest.raises(ValueError, match="cannot keep pattern 'fan_in'"):
        update_layer_counts(next(iter(layer.values())), 1, 2)


@pytest.mark.parametrize("method, pattern", [("srigl", "fan_in"), ("set", "2:4"), ("static", "block4x4"),
                                             ("gmp", "fan_in")])
def test_a_structured_run_ends_on_its_label(method, pattern, tmp_path):
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(256, 1, 28, 28, generator=generator), torch.randint(0, 10, (256,),
                                                                                      generator=generator)
    chosen = replace(METHODS[method], pattern=pattern, **({"sign_split": False} if method == "set" else {})) \
        if method != "srigl" else METHODS[method]
    if method in ("srigl", "gmp"):
        chosen = replace(chosen, every=2)
    sparsity = 0.5 if pattern == "2:4" else 0.9
    test = [(images[:64], labels[:64])]
    keep_dense = "last" if pattern.startswith("block") else ()  # a 10 x 100 output layer is no grid of 4x4 blocks
    row = train_run("lenet300-100", chosen, Target(sparsity, "uniform", keep_dense), Recipe(epochs=1, batch_size=32),
                    (images, labels), test, seed=0)
    assert row["pattern"] == pattern and row["method"] == chosen.label
    assert abs(row["final_sparsity"] - sparsity) < 0.01


def test_check_reached_target_refuses_a_net_whose_pattern_broke():
    net = net_for("fan_in", 0.9)
    layer = next(iter(net.masked_layers().values()))
    row = layer.mask[0].nonzero()[0, 0]
    layer.mask[0, row] = False  # one neuron one input short; move it to another neuron
    layer.mask[1, (~layer.mask[1]).nonzero()[0, 0]] = True
    with pytest.raises(RuntimeError, match="no longer follows pattern 'fan_in'"):
        check_reached_target(net, replace(METHODS["set"], pattern="fan_in", sign_split=False), Target(0.9, "uniform"))


def test_a_momentum_criterion_gets_its_momentum_from_the_step_and_gives_it_back():
    net = net_for("unstructured", 0.8)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    step = MaskedDSTStep(net, "momentum", optimizer)
    assert not step.needs_batch and step.tracker is not None
    inputs, targets = torch.randn(8, 32), torch.randint(0, 8, (8,))
    F.cross_entropy(net(inputs), targets).backward()
    optimizer.step()
    before = {name: layer.mask.clone() for name, layer in net.masked_layers().items()}
    step(0.2)
    for name, layer in net.masked_layers().items():
        momentum = step.tracker.momentum[name]
        grown = layer.mask & ~before[name]
        free = ~before[name]
        # the regrown positions are the largest |momentum| among those free before the step
        assert momentum[grown].abs().min() >= momentum[free & ~grown].abs().max(), name
    step.close()
    assert all(layer.apply_mask for layer in net.masked_layers().values())
    assert replace(METHODS["set"], regrow="momentum").label == "set+momentum"
    assert optimizers_of(next(iter(net.masked_layers().values())).weight)


def test_a_conv_layer_keeps_its_fan_in_over_input_channels_and_kernel():
    net = MaskedNet(SimpleNet(), 0.9, pattern="fan_in", keep_dense="first")
    conv = list(net.masked_layers().values())[1]
    assert isinstance(conv, nn.Conv2d)
    counts = conv.mask.reshape(conv.mask.shape[0], -1).sum(dim=1)
    assert (counts == counts[0]).all() and counts[0] == round(0.1 * conv.mask[0].numel())


def test_a_distributed_step_refuses_a_criterion_whose_signal_it_cannot_supply():
    from dst.engine.distributed import DistributedDSTStep

    with pytest.raises(ValueError, match="DistributedDSTStep supplies the dense gradient.*needs the momentum"):
        DistributedDSTStep(net_for("unstructured", 0.8), "momentum")
