"""MaskedNet: wrapping, per-layer sparsity, init scaling, checkpoints, bad input."""

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dst.core.models import MLP, SimpleNet
from dst.engine.allocation import active_count, layer_densities
from dst.engine.masked import MaskedNet
from dst.engine.masked_layers import MaskedConv1d, MaskedConv2d, MaskedConv3d, MaskedLinear
from dst.engine.prune_regrow import apply_dst_step


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


@pytest.mark.parametrize("device", [
    "meta",  # a second device on every machine: it holds no values, but tensors left behind would show
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")),
])
def test_to_device_takes_the_masks_to_the_weights_device(device):
    masked = MaskedNet(MLP(784, (16,)), 0.5)
    before = {name: layer.mask.clone() for name, layer in masked.masked_layers().items()}
    masked.to(device)
    for name, layer in masked.masked_layers().items():
        assert layer.weight.device.type == layer.mask.device.type == device, name
        assert layer.mask.dtype == torch.bool, name
        if device != "meta":
            assert torch.equal(layer.mask.cpu(), before[name]), name


def test_a_dtype_change_keeps_the_masks_boolean_and_inactive_weights_zero_through_training():
    torch.manual_seed(0)
    masked = MaskedNet(MLP(20, (16,), num_classes=4), 0.5)
    before = {name: (layer.mask.clone(), layer.weight.detach().clone())
              for name, layer in masked.masked_layers().items()}
    masked.to(torch.float64)
    for name, layer in masked.masked_layers().items():
        mask, weight = before[name]
        assert layer.weight.dtype == torch.float64 and layer.mask.dtype == torch.bool, name
        assert torch.equal(layer.mask, mask) and torch.equal(layer.weight, weight.double()), name
    optimizer = torch.optim.Adam(masked.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        inputs = torch.randn(8, 20, generator=generator, dtype=torch.float64)
        optimizer.zero_grad()
        F.cross_entropy(masked(inputs), torch.randint(0, 4, (8,), generator=generator)).backward()
        optimizer.step()
        if step == 1:
            apply_dst_step(masked, prune_ratio=0.3, generator=generator)
        assert_inactive_exactly_zero(masked, optimizer)
    assert all(layer.weight.dtype == torch.float64 for layer in masked.masked_layers().values())


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


# ----------------------------------------------------------------------------- what gets masked

def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches, loss_of, steps: int = 3):
    for _ in range(steps):
        for batch in batches:
            optimizer.zero_grad()
            loss_of(model, batch).backward()
            optimizer.step()


def assert_inactive_exactly_zero(model: MaskedNet, optimizer: torch.optim.Optimizer):
    for name, layer in model.masked_layers().items():
        assert torch.all(layer.weight[~layer.mask] == 0), name
        for value in optimizer.state[layer.weight].values():
            if torch.is_tensor(value) and value.shape == layer.weight.shape:
                assert torch.all(value[~layer.mask] == 0), name


def test_a_module_used_twice_is_wrapped_once_and_stays_shared():
    layer = nn.Linear(6, 6)
    masked = MaskedNet(nn.Sequential(layer, nn.ReLU(), layer), sparsity=0.5)
    first, last = masked.net[0], masked.net[2]
    assert isinstance(first, MaskedLinear) and last is first
    assert list(masked.masked_layers()) == ["0"]
    x = torch.randn(4, 6)
    weight = first.weight * first.mask  # oracle: the same masked weight at both places
    expected = F.linear(torch.relu(F.linear(x, weight, first.bias)), weight, first.bias)
    torch.testing.assert_close(masked(x), expected)


class TiedLanguageModel(nn.Module):
    """An embedding and an output layer sharing one (vocab, dim) weight, as in GPT-2 and nanoGPT."""

    def __init__(self, vocab: int = 30, dim: int = 12):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)).mean(1))


def test_tied_embedding_and_output_keep_one_weight_and_one_mask_through_training():
    torch.manual_seed(0)
    masked = MaskedNet(TiedLanguageModel(), sparsity=0.8)
    assert masked.net.head.weight is masked.net.embed.weight
    assert list(masked.masked_layers()) == ["head"] and masked.skipped_weights() == {}
    optimizer = torch.optim.Adam(masked.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 30, (8, 5), generator=generator), torch.randint(0, 30, (8,), generator=generator))]

    def loss_of(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    train_steps(masked, optimizer, batches, loss_of)
    apply_dst_step(masked, prune_ratio=0.3)
    train_steps(masked, optimizer, batches, loss_of)
    assert_inactive_exactly_zero(masked, optimizer)  # the embedding's gradient reaches no inactive weight
    layer = masked.masked_layers()["head"]
    assert layer.active_count == active_count(30 * 12, 0.2)
    restored = pickle.loads(pickle.dumps(masked))  # a whole-model copy keeps the tie and the guarantee
    assert restored.net.head.weight is restored.net.embed.weight
    restored_optimizer = torch.optim.Adam(restored.parameters(), lr=0.05)
    train_steps(restored, restored_optimizer, batches, loss_of)
    assert_inactive_exactly_zero(restored, restored_optimizer)


def test_conv1d_conv3d_and_linear_subclasses_are_masked_so_sparsity_covers_every_weight():
    net = nn.Sequential(nn.Conv1d(2, 8, 3), nn.Flatten(), nn.Linear(8 * 6, 16),
                        nn.modules.linear.NonDynamicallyQuantizableLinear(16, 4))
    masked = MaskedNet(net, sparsity=0.9)
    layers = masked.masked_layers()
    assert list(layers) == ["0", "2", "3"] and isinstance(layers["0"], MaskedConv1d)
    all_weights = sum(p.numel() for p in masked.parameters() if p.ndim >= 2)
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers.values())
    assert zeros / all_weights == pytest.approx(0.9, abs=0.01)
    assert masked.global_sparsity() == masked.global_sparsity(all_weights=True)
    volume = MaskedNet(nn.Sequential(nn.Conv3d(1, 4, 2), nn.Flatten(), nn.Linear(4 * 27, 2)), sparsity=0.5)
    conv = volume.masked_layers()["0"]
    assert isinstance(conv, MaskedConv3d) and conv.active_count == active_count(32, 0.5)
    x = torch.randn(2, 1, 4, 4, 4)
    expected = F.linear(F.conv3d(x, conv.weight * conv.mask, conv.bias).flatten(1),
                        volume.net[2].weight * volume.net[2].mask, volume.net[2].bias)
    torch.testing.assert_close(volume(x), expected)


# One net per masked layer type, the layer alone (a Flatten after a conv): (net, input shape, outputs, type).
ONE_LAYER_NETS = {
    "Linear": (lambda: nn.Linear(12, 6), (5, 12), 6, MaskedLinear),
    "Linear subclass": (lambda: nn.modules.linear.NonDynamicallyQuantizableLinear(12, 6), (5, 12), 6, MaskedLinear),
    "Conv1d": (lambda: nn.Conv1d(2, 4, 3), (5, 2, 6), 4 * 4, MaskedConv1d),
    "Conv2d": (lambda: nn.Conv2d(2, 4, 3), (5, 2, 4, 4), 4 * 2 * 2, MaskedConv2d),
    "Conv3d": (lambda: nn.Conv3d(2, 4, 2), (5, 2, 3, 3, 3), 4 * 2 * 2 * 2, MaskedConv3d),
}


@pytest.mark.parametrize("masking", ["gradient", "forward"])
@pytest.mark.parametrize("kind", sorted(ONE_LAYER_NETS))
def test_every_masked_layer_type_trains_with_inactive_weights_exactly_zero(kind, masking):
    make, shape, outputs, masked_class = ONE_LAYER_NETS[kind]
    torch.manual_seed(0)
    masked = MaskedNet(nn.Sequential(make(), nn.Flatten()), sparsity=0.6, masking=masking)
    layer = masked.net[0]
    assert type(layer) is masked_class and 0 < layer.active_count < layer.mask.numel()
    optimizer = torch.optim.Adam(masked.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    start = layer.weight.detach().clone()
    for _ in range(3):
        inputs = torch.randn(*shape, generator=generator)
        targets = torch.randint(0, outputs, (shape[0],), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(masked(inputs), targets).backward()
        assert torch.all(layer.weight.grad[~layer.mask] == 0), f"{kind}: gradient reaches inactive weights"
        assert torch.any(layer.weight.grad[layer.mask] != 0)
        optimizer.step()
        assert torch.all(layer.weight[~layer.mask] == 0), f"{kind}: an inactive weight moved"
        assert_inactive_exactly_zero(masked, optimizer)
    assert torch.all(layer.weight[layer.mask] != start[layer.mask]), f"{kind}: an active weight did not train"


def test_attention_out_proj_is_masked_and_extra_forward_arguments_reach_the_net():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    with pytest.warns(UserWarning, match=r"self_attn\.in_proj_weight \(MultiheadAttention, 768 weights\)"):
        masked = MaskedNet(layer, sparsity=0.8)
    assert list(masked.masked_layers()) == ["self_attn.out_proj", "linear1", "linear2"]
    assert set(masked.skipped_weights()) == {"self_attn.in_proj_weight"}
    assert masked.global_sparsity(all_weights=True) == pytest.approx(
        masked.global_sparsity() * (16 * 16 + 2 * 16 * 32) / (4 * 16 * 16 + 2 * 16 * 32))
    x, padding = torch.randn(4, 6, 16), torch.zeros(4, 6, dtype=torch.bool)
    padding[:, -2:] = True
    with torch.no_grad():
        reference = layer(x, src_key_padding_mask=padding)  # the dense layer: outputs differ
    assert not torch.allclose(masked(x, src_key_padding_mask=padding), reference)
    optimizer = torch.optim.SGD(masked.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    train_steps(masked, optimizer, [(x, padding)], lambda model, batch: model(batch[0], src_key_padding_mask=batch[1])
                .pow(2).mean())
    assert_inactive_exactly_zero(masked, optimizer)  # attention reads out_proj.weight without its forward


class Scaled(nn.Module):
    """A net whose forward takes a second positional argument and a keyword."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x, shift, scale=1.0):
        return self.fc(x + shift) * scale


def test_forward_passes_every_positional_and_keyword_argument_on():
    masked = MaskedNet(Scaled(), sparsity=0.5)
    x, shift = torch.randn(3, 4), torch.randn(3, 4)
    fc = masked.net.fc
    expected = F.linear(x + shift, fc.weight * fc.mask, fc.bias) * 3.0
    torch.testing.assert_close(masked(x, shift, scale=3.0), expected)


def test_weights_nothing_masks_are_named_with_their_size_in_a_warning():
    net = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(8 * 3, 4))
    with pytest.warns(UserWarning, match=r"0\.weight \(Embedding, 400 weights\)"):
        masked = MaskedNet(net, sparsity=0.9)
    assert masked.skipped_weights() == {"0.weight": {
        "module": "Embedding", "shape": [50, 8], "numel": 400,
        "reason": "MaskedNet does not mask Embedding weights"}}
    masked_zeros = 96 - active_count(96, 0.1)
    assert masked.global_sparsity() == pytest.approx(masked_zeros / 96)
    assert masked.global_sparsity(all_weights=True) == pytest.approx(masked_zeros / (96 + 400))


def test_frozen_layers_keep_requires_grad_and_stay_dense():
    base = MLP(20, (16,), num_classes=4)
    base.fc1.requires_grad_(False)
    base.fc2.bias.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"fc1\.weight \(Linear, 320 weights\): frozen"):
        masked = MaskedNet(base, sparsity=0.75)
    assert list(masked.masked_layers()) == ["fc2"]
    fc1, fc2 = masked.net.fc1, masked.net.fc2
    assert type(fc1) is nn.Linear and torch.equal(fc1.weight, base.fc1.weight)  # untouched, not pruned
    assert not fc1.weight.requires_grad and not fc1.bias.requires_grad
    assert fc2.weight.requires_grad and not fc2.bias.requires_grad


def test_loading_dense_weights_without_masks_keeps_inactive_weights_zero():
    masked = MaskedNet(MLP(20, (16,), num_classes=4), sparsity=0.75)
    dense = {key: value for key, value in MLP(20, (16,), num_classes=4).state_dict().items()}
    result = masked.net.load_state_dict(dense, strict=False)  # a dense checkpoint: no masks in it
    assert result.missing_keys == ["fc1.mask", "fc2.mask"]
    for name, layer in masked.masked_layers().items():
        assert torch.all(layer.weight[~layer.mask] == 0)
        assert torch.equal(layer.weight[layer.mask], dense[f"{name}.weight"][layer.mask])
    x = torch.randn(3, 20)
    sparse_outputs = masked(x)
    with masked.masks_bypassed():  # what RigL's pass sees is the sparse net, too
        torch.testing.assert_close(masked(x), sparse_outputs)


def test_a_model_with_nothing_trainable_to_mask_says_what_it_found():
    frozen = nn.Sequential(nn.Linear(4, 4))
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no nn.Conv2d or nn.Linear.*0\.weight \(Linear, 16 weights\): frozen"):
        MaskedNet(frozen, sparsity=0.5)


def test_a_float_mask_loaded_with_assign_becomes_boolean_or_is_refused_by_name():
    net = MaskedNet(MLP(6, (5,), 3), 0.5, generator=torch.Generator().manual_seed(0))
    state = {key: value.float() if key.endswith("mask") else value for key, value in net.state_dict().items()}
    net.load_state_dict(state, assign=True)
    for layer in net.masked_layers().values():
        assert layer.mask.dtype == torch.bool
        assert torch.all(layer.weight[~layer.mask] == 0)
    state["net.fc1.mask"][0, 0] = 0.5
    with pytest.raises(ValueError, match="mask loaded for layer 'fc1' holds values other than 0 and 1"):
        net.load_state_dict(state, assign=True)


def test_an_allocation_that_is_not_a_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown allocation \['erk'\]; choose one of \['erk', 'uniform'\]"):
        MaskedNet(MLP(6, (5,), 3), 0.5, allocation=["erk"])


def test_an_optimizer_built_on_the_base_net_is_caught_after_a_hundred_training_passes():
    import warnings

    from dst.engine.masked import UNTRAINED_AFTER, UntrainedWarning

    base = MLP(6, (5,), 3)
    wrong = torch.optim.SGD(base.parameters(), lr=0.1)  # built before wrapping: steps the original
    for optimizer_of in (lambda net: wrong, lambda net: torch.optim.SGD(net.parameters(), lr=0.1)):
        net = MaskedNet(base, 0.5, generator=torch.Generator().manual_seed(0))
        optimizer = optimizer_of(net)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(UNTRAINED_AFTER + 5):
                optimizer.zero_grad()
                F.cross_entropy(net(torch.randn(4, 6)), torch.zeros(4, dtype=torch.long)).backward()
                optimizer.step()
        untrained = [str(warning.message) for warning in caught if issubclass(warning.category, UntrainedWarning)]
        if optimizer is wrong:
            assert len(untrained) == 1 and "build the optimizer on MaskedNet(...).parameters()" in untrained[0]
        else:
            assert untrained == []


def test_dense_gradient_passes_are_not_counted_as_untrained_training():
    import warnings

    from dst.engine.masked import UNTRAINED_AFTER, UntrainedWarning
    from dst.engine.prune_regrow import dense_gradients

    net = MaskedNet(MLP(6, (5,), 3), 0.5, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedWarning)
        for _ in range(UNTRAINED_AFTER + 1):
            dense_gradients(net, (torch.randn(4, 6), torch.zeros(4, dtype=torch.long)))
