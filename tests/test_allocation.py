"""Sparsity allocation: uniform and ERK meet the global target; ERK matches its formula; keep_dense; connectivity."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dst.engine.allocation import DisconnectedWarning, active_count, connectivity, erk_densities, layer_densities

SIMPLENET_SHAPES = {"conv1": (16, 1, 3, 3), "conv2": (32, 16, 3, 3), "fc1": (128, 1568),
                    "fc2": (1000, 128), "fc3": (1000, 1000), "fc4": (10, 1000)}

shapes_strategy = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=3),
    st.one_of(st.tuples(st.integers(1, 300), st.integers(1, 300)),
              st.tuples(st.integers(1, 32), st.integers(1, 32), st.integers(1, 5), st.integers(1, 5))),
    min_size=1, max_size=6)


def global_active(shapes, densities):
    return sum(active_count(math.prod(shape), densities[name]) for name, shape in shapes.items())


@settings(max_examples=200, deadline=None)
@given(shapes=shapes_strategy, sparsity=st.floats(0.0, 0.999), allocation=st.sampled_from(["uniform", "erk"]))
def test_global_target_met_within_rounding(shapes, sparsity, allocation):
    densities = layer_densities(shapes, sparsity, allocation)
    total = sum(math.prod(shape) for shape in shapes.values())
    assert all(0.0 < d <= 1.0 for d in densities.values())
    # Each layer rounds to a whole weight (<= 0.5 off) and keeps at least one.
    assert abs(global_active(shapes, densities) - (1 - sparsity) * total) <= len(shapes)


def test_uniform_gives_every_layer_the_global_sparsity():
    densities = layer_densities(SIMPLENET_SHAPES, 0.95, "uniform")
    assert densities == {name: pytest.approx(0.05) for name in SIMPLENET_SHAPES}


def test_erk_matches_formula_when_nothing_overflows():
    shapes = {"a": (64, 32, 3, 3), "b": (500, 400), "c": (400, 300)}
    densities = erk_densities(shapes, 0.05)
    raw = {name: sum(shape) / math.prod(shape) for name, shape in shapes.items()}
    scale = 0.05 * sum(math.prod(s) for s in shapes.values()) / sum(raw[n] * math.prod(shapes[n]) for n in shapes)
    assert all(scale * raw[name] < 1 for name in shapes)  # the premise of this test
    for name in shapes:
        assert densities[name] == pytest.approx(scale * raw[name])


def test_erk_overflowing_layer_is_dense_and_budget_redistributed():
    densities = layer_densities(SIMPLENET_SHAPES, 0.95, "erk")
    assert densities["conv1"] == 1.0 and densities["fc4"] == 1.0
    sizes = {name: math.prod(shape) for name, shape in SIMPLENET_SHAPES.items()}
    kept = sum(densities[name] * sizes[name] for name in sizes)
    assert kept == pytest.approx(0.05 * sum(sizes.values()))
    # The layers left sparse keep the ERK proportions among themselves.
    sparse = [name for name in sizes if densities[name] < 1.0]
    raw = {name: sum(SIMPLENET_SHAPES[name]) / sizes[name] for name in sparse}
    ratios = {densities[name] / raw[name] for name in sparse}
    assert max(ratios) == pytest.approx(min(ratios))


def test_erk_at_zero_sparsity_is_dense():
    assert set(layer_densities(SIMPLENET_SHAPES, 0.0, "erk").values()) == {1.0}


@pytest.mark.parametrize("sparsity, error", [(-0.1, ValueError), (1.0, ValueError), (1.5, ValueError),
                                             ("0.9", TypeError), (None, TypeError), (True, TypeError)])
def test_bad_sparsity_raises(sparsity, error):
    with pytest.raises(error, match="sparsity"):
        layer_densities(SIMPLENET_SHAPES, sparsity, "uniform")


def test_unknown_allocation_lists_choices():
    with pytest.raises(ValueError, match=r"'random'.*\['erk', 'uniform'\]"):
        layer_densities(SIMPLENET_SHAPES, 0.9, "random")


@pytest.mark.parametrize("allocation", ["uniform", "erk"])
def test_a_layer_without_weights_changes_nothing_and_divides_by_nothing(allocation):
    shapes = {"empty": (0, 5), "fc": (10, 10), "head": (4, 4)}
    densities = layer_densities(shapes, 0.9, allocation)
    without = layer_densities({"fc": (10, 10), "head": (4, 4)}, 0.9, allocation)
    assert densities["fc"] == pytest.approx(without["fc"]) and densities["head"] == pytest.approx(without["head"])
    assert active_count(0, densities["empty"]) == 0
    assert layer_densities({"empty": (3, 0)}, 0.5, allocation) == {"empty": {"uniform": 0.5, "erk": 1.0}[allocation]}


LENET_SHAPES = {"fc1": (300, 784), "fc2": (100, 300), "fc3": (10, 100)}


@settings(max_examples=100, deadline=None)
@given(sparsity=st.floats(0.5, 0.99), allocation=st.sampled_from(["uniform", "erk"]),
       keep=st.sampled_from(["first", "last", ("first", "last"), ("fc2",)]))
def test_keep_dense_layers_are_dense_and_the_global_target_still_met(sparsity, allocation, keep):
    shapes = {"first": (30, 40), "fc2": (200, 300), "fc3": (300, 300), "last": (5, 300)}
    kept_names = {"first": {"first"}, "last": {"last"}, ("first", "last"): {"first", "last"}, ("fc2",): {"fc2"}}
    dense = kept_names[keep]
    total = sum(math.prod(shape) for shape in shapes.values())
    if sum(math.prod(shapes[name]) for name in dense) >= (1 - sparsity) * total:
        with pytest.raises(ValueError, match="already keeps"):
            layer_densities(shapes, sparsity, allocation, keep)
        return
    densities = layer_densities(shapes, sparsity, allocation, keep)
    assert all(densities[name] == 1.0 for name in dense)
    assert abs(global_active(shapes, densities) - (1 - sparsity) * total) <= len(shapes)
    if allocation == "uniform":  # the others share one density
        rest = [densities[name] for name in shapes if name not in dense]
        assert max(rest) == pytest.approx(min(rest))


def test_first_and_last_follow_the_order_of_the_layers():
    densities = layer_densities(SIMPLENET_SHAPES, 0.95, "uniform", ("first", "last"))
    assert densities["conv1"] == 1.0 and densities["fc4"] == 1.0
    assert all(densities[name] < 0.05 for name in ("conv2", "fc1", "fc2", "fc3"))
    densities = layer_densities(LENET_SHAPES, 0.99, "erk", "last")
    assert densities["fc3"] == 1.0 and active_count(1000, densities["fc3"]) == 1000


def test_keep_dense_refuses_an_impossible_budget_and_unknown_names():
    with pytest.raises(ValueError, match=r"keep_dense=\['fc1'\] already keeps 235,200 weights"):
        layer_densities(LENET_SHAPES, 0.99, "erk", "first")
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['fc9'\].*'first', 'last'"):
        layer_densities(LENET_SHAPES, 0.9, "erk", ("fc9",))


def oracle_unconnected(mask: torch.Tensor, groups: int = 1) -> tuple[int, int]:
    """Unconnected (input channels, output rows), by loops over the mask."""
    out_channels, in_per_group = mask.shape[0], mask.shape[1]
    outputs = sum(1 for row in range(out_channels) if not mask[row].any())
    inputs = 0
    for channel in range(in_per_group * groups):
        group, within = divmod(channel, in_per_group)
        rows = range(group * out_channels // groups, (group + 1) * out_channels // groups)
        inputs += not any(mask[row, within].any() for row in rows)
    return inputs, outputs


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_connectivity_counts_match_loops_for_linear_and_grouped_convs(groups):
    generator = torch.Generator().manual_seed(groups)
    conv = torch.nn.Conv2d(8, 12, 3, groups=groups)
    conv.mask = torch.rand(conv.weight.shape, generator=generator) < 0.08
    linear = torch.nn.Linear(20, 9)
    linear.mask = torch.rand(linear.weight.shape, generator=generator) < 0.1
    conv.mask[:, 0] = False  # in-group channel 0 of every group: some inputs surely cut off
    linear.mask[3] = False
    report = connectivity({"conv": conv, "linear": linear})
    assert report["unconnected_inputs"] == oracle_unconnected(conv.mask, groups)[0] > 0
    assert report["unconnected_outputs"] == oracle_unconnected(linear.mask)[1] > 0
    assert (report["inputs"], report["outputs"]) == (8, 9)


def test_lenet_uniform_99_warns_about_classes_cut_off_and_erk_or_a_dense_last_layer_does_not():
    from dst.core.models import lenet_300_100
    from dst.engine.masked import MaskedNet

    with pytest.warns(DisconnectedWarning) as caught:
        net = MaskedNet(lenet_300_100(), 0.99, "uniform", generator=torch.Generator().manual_seed(0))
    layers = net.masked_layers()
    assert layers["fc3"].active_count == 10
    inputs, _ = oracle_unconnected(layers["fc1"].mask)
    _, outputs = oracle_unconnected(layers["fc3"].mask)
    assert outputs > 0  # the premise: with 10 weights for 10 classes, some class gets none
    message = str(caught[0].message)
    assert f"{outputs} of the 10 output units of 'fc3' without any incoming connection" in message
    assert f"{inputs} of the 784 input features of 'fc1'" in message
    for kwargs in ({"allocation": "erk"}, {"allocation": "uniform", "keep_dense": "last"}):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            MaskedNet(lenet_300_100(), 0.99, generator=torch.Generator().manual_seed(0), **kwargs)
        assert not any("output units" in str(w.message) for w in caught), kwargs


def test_no_warning_when_everything_is_connected():
    from dst.core.models import lenet_300_100
    from dst.engine.masked import MaskedNet

    with warnings.catch_warnings():
        warnings.simplefilter("error", DisconnectedWarning)
        MaskedNet(lenet_300_100(), 0.5, "erk", generator=torch.Generator().manual_seed(0))
