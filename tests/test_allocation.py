"""Sparsity allocation: uniform and ERK meet the global target; ERK matches its formula."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dst.allocation import active_count, erk_densities, layer_densities

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
