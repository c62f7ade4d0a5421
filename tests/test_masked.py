"""MaskedNet: wrapping, per-layer sparsity, init scaling, checkpoints, bad input."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dst.allocation import active_count, layer_densities
from dst.masked import MaskedConv2d, MaskedLinear, MaskedNet
from dst.models import MLP, SimpleNet
from dst.prune_regrow import apply_dst_step


def test_simplenet_has_the_tutorials_parameter_count():
    assert sum(p.numel() for p in SimpleNet(num_classes=10).parameters()) == 1_345_642


def test_every_conv_and_linear_is_wrapped_and_base_is_untouched():
    base = SimpleNet()
    before = copy.deepcopy(base.state_dict())
    masked = MaskedNet(base, sparsity=0.9)
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in base.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    layers = masked.masked_layers()
    assert list(layers) == ["conv1", "conv2", "fc1", "fc2", "fc3", "fc4"]
    assert isinstance(layers["conv1"], MaskedConv2d) and isinstance(layers["fc1"], MaskedLinear)
    for layer in layers.values():
        assert layer.mask.dtype == torch.bool and layer.mask.shape == layer.weight.shape


@settings(max_examples=25, deadline=None)
@given(sparsity=st.floats(0.0, 0.99), allocation=st.sampled_from(["uniform", "erk"]))
def test_each_layer_gets_its_allocated_active_count(sparsity, allocation):
    masked = MaskedNet(MLP(784, (64, 32)), sparsity=sparsity, allocation=allocation)
    layers = masked.masked_layers()
    densities = layer_densities({n: tuple(m.weight.shape) for n, m in layers.items()}, sparsity, allocation)
    stats = masked.get_sparsity_stats()
    for name, layer in layers.items():
        assert layer.active_count == active_count(layer.weight.numel(), densities[name])
        assert stats[name]["zeros"] == layer.weight.numel() - layer.active_count
        assert stats[name]["total"] == layer.weight.numel()
        assert torch.all(layer.weight[~layer.mask] == 0)


def test_active_weights_are_scaled_for_the_sparse_fan_in():
    base = MLP(784, (100,))
    masked = MaskedNet(base, sparsity=0.96, allocation="uniform")
    for name, layer in masked.masked_layers().items():
        original = base.get_submodule(name).weight
        expected = original * layer.mask / math.sqrt(0.04)
        assert torch.allclose(layer.weight, expected)
    unscaled = MaskedNet(base, sparsity=0.96, scale_init=False)
    for name, layer in unscaled.masked_layers().items():
        assert torch.equal(layer.weight, base.get_submodule(name).weight * layer.mask)


def test_forward_equals_dense_forward_of_the_masked_weights():
    masked = MaskedNet(SimpleNet(), sparsity=0.8)
    dense = copy.deepcopy(masked.net)
    x = torch.randn(3, 1, 28, 28)
    for name, layer in masked.masked_layers().items():
        dense_layer = dense.get_submodule(name)
        assert torch.equal(dense_layer.weight, layer.weight)
    assert torch.equal(masked(x), dense(x))  # same weights, same kernels: bitwise equal


def test_masks_as_2d_shapes_cover_whole_conv_kernels():
    masks = MaskedNet(SimpleNet(), sparsity=0.5).get_masks_as_2d()
    assert masks["conv1"].shape == (16, 9) and masks["conv2"].shape == (32, 144)
    assert masks["fc1"].shape == (128, 1568) and masks["fc4"].shape == (10, 1000)


def test_same_generator_seed_gives_same_masks():
    base = SimpleNet()
    first = MaskedNet(base, 0.9, generator=torch.Generator().manual_seed(3)).get_masks_as_2d()
    second = MaskedNet(base, 0.9, generator=torch.Generator().manual_seed(3)).get_masks_as_2d()
    other = MaskedNet(base, 0.9, generator=torch.Generator().manual_seed(4)).get_masks_as_2d()
    assert all((first[n] == second[n]).all() for n in first)
    assert any((first[n] != other[n]).any() for n in first)


def test_checkpoint_round_trip_keeps_masks_with_zero_valued_active_weights():
    torch.manual_seed(0)
    masked = MaskedNet(SimpleNet(), sparsity=0.9)
    apply_dst_step(masked, prune_ratio=0.2)  # regrown weights are active but exactly zero
    fc3 = masked.masked_layers()["fc3"]
    assert int((fc3.mask & (fc3.weight == 0)).sum()) > 0
    restored = MaskedNet(SimpleNet(), sparsity=0.5, allocation="erk")
    restored.load_state_dict(masked.state_dict())
    for name, layer in restored.masked_layers().items():
        original = masked.masked_layers()[name]
        assert torch.equal(layer.mask, original.mask)
        assert torch.equal(layer.weight, original.weight)
    assert restored.get_sparsity_stats() == masked.get_sparsity_stats()


def test_to_device_keeps_masks_on_the_weights_device():
    masked = MaskedNet(MLP(784, (16,)), 0.5).to("cpu")
    assert all(layer.mask.device == layer.weight.device for layer in masked.masked_layers().values())


@pytest.mark.parametrize("sparsity, error", [(1.0, ValueError), (-0.01, ValueError), ("high", TypeError)])
def test_bad_sparsity_is_rejected(sparsity, error):
    with pytest.raises(error, match="sparsity"):
        MaskedNet(SimpleNet(), sparsity=sparsity)


def test_unknown_allocation_is_rejected():
    with pytest.raises(ValueError, match="allocation"):
        MaskedNet(SimpleNet(), sparsity=0.9, allocation="magic")


def test_model_without_layers_to_mask_is_rejected():
    with pytest.raises(ValueError, match="no nn.Conv2d or nn.Linear"):
        MaskedNet(nn.Sequential(nn.ReLU(), nn.Flatten()), sparsity=0.5)


def test_non_module_is_rejected():
    with pytest.raises(TypeError, match="nn.Module"):
        MaskedNet("SimpleNet", sparsity=0.5)
