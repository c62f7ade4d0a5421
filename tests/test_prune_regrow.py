"""The DST step: counts kept, prune/regrow choices against an oracle, optimizer state reset."""

import copy
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dst.core.models import MLP, SimpleNet
from dst.engine.masked import MaskedNet
from dst.engine.prune_regrow import apply_dst_step, masked_scheduler
from dst.engine.schedule import DSTConfig
from dst.engine.update_rule import LayerUpdate


def toy_net(weights: torch.Tensor, mask: torch.Tensor) -> MaskedNet:
    """A single masked Linear (no bias) with the given weights and mask."""
    net = MaskedNet(nn.Sequential(nn.Linear(weights.shape[1], weights.shape[0], bias=False)), sparsity=0.5,
                    scale_init=False)
    layer = net.masked_layers()["0"]
    with torch.no_grad():
        layer.mask.copy_(mask)
        layer.weight.copy_(weights * mask)
    return net


def test_gradient_regrow_prunes_smallest_and_regrows_top_gradient_positions():
    weights = torch.tensor([[0.5, -0.1, 0.0, 0.3], [0.0, 0.05, -0.9, 0.0], [0.2, 0.0, 0.0, -0.4]])
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    net = toy_net(weights, mask)
    inputs, targets = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1])
    # Oracle: dense gradient of the loss w.r.t. the (masked) weight matrix.
    dense = (weights * mask).clone().requires_grad_(True)
    F.cross_entropy(inputs @ dense.T, targets).backward()
    inactive = (~mask).view(-1).nonzero().squeeze(1)
    expected_regrown = set(inactive[dense.grad.view(-1)[inactive].abs().topk(2).indices].tolist())
    active = mask.view(-1).nonzero().squeeze(1)
    expected_pruned = set(active[(weights * mask).view(-1)[active].abs().topk(2, largest=False).indices].tolist())

    report = apply_dst_step(net, prune_ratio=2 / 7, regrow="gradient", batch=(inputs, targets))

    new_mask = net.masked_layers()["0"].mask.view(-1)
    assert report == {"0": LayerUpdate(active=7, pruned=2, regrown=2)}
    assert {i for i in range(12) if mask.view(-1)[i] and not new_mask[i]} == expected_pruned
    assert {i for i in range(12) if not mask.view(-1)[i] and new_mask[i]} == expected_regrown
    assert torch.all(net.masked_layers()["0"].weight.view(-1)[list(expected_regrown)] == 0)


@settings(max_examples=30, deadline=None)
@given(sparsity=st.floats(0.0, 0.98), prune_ratio=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_random_regrow_moves_only_inactive_positions_and_keeps_counts(sparsity, prune_ratio, seed):
    torch.manual_seed(seed)
    net = MaskedNet(MLP(20, (30,), num_classes=5), sparsity=sparsity)
    before = {name: layer.mask.clone() for name, layer in net.masked_layers().items()}
    report = apply_dst_step(net, prune_ratio=prune_ratio, generator=torch.Generator().manual_seed(seed))
    for name, layer in net.masked_layers().items():
        old, new = before[name], layer.mask
        regrown, pruned = new & ~old, old & ~new
        assert int(new.sum()) == int(old.sum()) == report[name].active
        assert int(regrown.sum()) == int(pruned.sum()) == report[name].regrown == report[name].pruned
        expected = min(round(prune_ratio * int(old.sum())), int((~old).sum()))
        assert report[name].pruned == expected
        assert torch.all(layer.weight[~new] == 0) and torch.all(layer.weight[regrown] == 0)


def test_pruned_weights_are_the_smallest_active_magnitudes():
    torch.manual_seed(1)
    net = MaskedNet(MLP(50, (40,)), sparsity=0.7)
    before = {n: (layer.mask.clone(), layer.weight.detach().abs().clone()) for n, layer in net.masked_layers().items()}
    apply_dst_step(net, prune_ratio=0.25)
    for name, layer in net.masked_layers().items():
        old_mask, magnitude = before[name]
        pruned = old_mask & ~layer.mask
        survivors = old_mask & layer.mask
        assert magnitude[pruned].max() <= magnitude[survivors].min()


def run_training(optimizer_factory, steps=40, unit_every=7, regrow="random", seed=0, masking="gradient"):
    """Train a small masked MLP with step-based DST, checking invariants after every step."""
    torch.manual_seed(seed)
    net = MaskedNet(MLP(30, (40, 40), num_classes=4), sparsity=0.8, allocation="erk", masking=masking)
    optimizer = optimizer_factory(net.parameters())
    scheduler = masked_scheduler(net, DSTConfig(prune_ratio=0.3, regrow=regrow, every=unit_every, unit="step"))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        inputs = torch.randn(16, 30, generator=generator)
        targets = torch.randint(0, 4, (16,), generator=generator)
        optimizer.zero_grad()
        loss = F.cross_entropy(net(inputs), targets)
        loss.backward()
        for layer in net.masked_layers().values():
            assert torch.all(layer.weight.grad[~layer.mask] == 0)
        optimizer.step()
        scheduler.after_step((inputs, targets))
        losses.append(loss.item())
        for layer in net.masked_layers().values():
            assert torch.all(layer.weight[~layer.mask] == 0)
            for value in optimizer.state[layer.weight].values():
                if torch.is_tensor(value) and value.shape == layer.weight.shape:
                    assert torch.all(value[~layer.mask] == 0)
    return net, scheduler, losses


OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "sgd_momentum_wd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "adam_amsgrad": lambda params: torch.optim.Adam(params, lr=1e-2, amsgrad=True),
    "adam_fused": lambda params: torch.optim.Adam(params, lr=1e-2, fused=True),
}


@pytest.mark.parametrize("masking", ["gradient", "forward"])
@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("regrow", ["random", "gradient"])
def test_inactive_weights_and_optimizer_state_stay_exactly_zero(optimizer_name, regrow, masking):
    _, scheduler, _ = run_training(OPTIMIZERS[optimizer_name], regrow=regrow, masking=masking)
    assert len(scheduler.history) == 40 // 7
    assert all(sum(u.pruned for u in event.layers.values()) > 0 for event in scheduler.history)


def test_regrown_connections_start_with_fresh_optimizer_state():
    torch.manual_seed(0)
    net = MaskedNet(MLP(30, (40,), num_classes=4), sparsity=0.5)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    inputs, targets = torch.randn(16, 30), torch.randint(0, 4, (16,))
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(net(inputs), targets).backward()
        optimizer.step()
    layer = net.masked_layers()["fc1"]
    before = layer.mask.clone()
    apply_dst_step(net, prune_ratio=0.5)  # optimizer found through the step hook, not passed
    buffer = optimizer.state[layer.weight]["momentum_buffer"]
    changed = before ^ layer.mask
    assert changed.any() and torch.all(buffer[changed] == 0)
    assert torch.any(buffer[before & layer.mask] != 0)  # survivors keep their momentum


def weight_state(optimizer: torch.optim.Optimizer, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The optimizer's state tensors shaped like ``weight`` (momentum, Adam's moments), by their key."""
    return {key: value for key, value in optimizer.state[weight].items()
            if torch.is_tensor(value) and value.shape == weight.shape}


@pytest.mark.parametrize("passed", [True, False], ids=["optimizer passed", "optimizer found"])
@pytest.mark.parametrize("regrow", ["random", "gradient"])
@pytest.mark.parametrize("optimizer_name", ["adam", "adam_amsgrad", "adamw", "sgd_momentum_wd"])
def test_a_dst_step_zeroes_every_moment_at_every_moved_position_whatever_the_state_held(optimizer_name, regrow,
                                                                                        passed):
    # State that is non-zero at inactive positions: what a dense checkpoint's optimizer holds. The pre-step
    # hook zeroes it only before the optimizer's next step, so here the DST step alone must reset it,
    # at the pruned positions and at the regrown ones alike, and leave every other position as it was.
    torch.manual_seed(0)
    net = MaskedNet(MLP(30, (40,), num_classes=4), sparsity=0.7)
    optimizer = OPTIMIZERS[optimizer_name](net.parameters())
    generator = torch.Generator().manual_seed(1)
    batch = torch.randn(16, 30, generator=generator), torch.randint(0, 4, (16,), generator=generator)
    optimizer.zero_grad()
    F.cross_entropy(net(batch[0]), batch[1]).backward()
    optimizer.step()
    layers = net.masked_layers()
    before = {}
    for name, layer in layers.items():
        state = weight_state(optimizer, layer.weight)
        assert len(state) == {"adam": 2, "adam_amsgrad": 3, "adamw": 2, "sgd_momentum_wd": 1}[optimizer_name]
        for value in state.values():  # positive everywhere (Adam's second moments must be)
            value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
        before[name] = layer.mask.clone(), {key: value.clone() for key, value in state.items()}

    apply_dst_step(net, prune_ratio=0.3, regrow=regrow, batch=batch, generator=torch.Generator().manual_seed(2),
                   optimizer=optimizer if passed else None)

    for name, layer in layers.items():
        old_mask, old_state = before[name]
        pruned, regrown = old_mask & ~layer.mask, ~old_mask & layer.mask
        assert pruned.any() and regrown.any(), name
        for key, value in weight_state(optimizer, layer.weight).items():
            expected = old_state[key].masked_fill(pruned | regrown, 0.0)
            assert torch.equal(value, expected), f"{name}: {key} not reset exactly at the moved positions"


def test_same_seed_gives_same_masks_choices_and_losses():
    first_net, first_scheduler, first_losses = run_training(OPTIMIZERS["adam"], seed=5)
    second_net, second_scheduler, second_losses = run_training(OPTIMIZERS["adam"], seed=5)
    assert first_losses == second_losses
    for name, layer in first_net.masked_layers().items():
        assert torch.equal(layer.mask, second_net.masked_layers()[name].mask)
        assert torch.equal(layer.weight, second_net.masked_layers()[name].weight)


def test_training_resumes_exactly_from_a_checkpoint():
    net, _, _ = run_training(OPTIMIZERS["adam"], steps=10)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(3)
    inputs, targets = torch.randn(16, 30, generator=generator), torch.randint(0, 4, (16,), generator=generator)
    for _ in range(2):  # the optimizer has state worth saving
        optimizer.zero_grad()
        F.cross_entropy(net(inputs), targets).backward()
        optimizer.step()
    buffer = io.BytesIO()  # a checkpoint file: model (masks included) and optimizer state
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = MaskedNet(MLP(30, (40, 40), num_classes=4), sparsity=0.8, allocation="erk")  # other masks, weights
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    losses = {}
    for name, model, opt in (("original", net, optimizer), ("resumed", resumed, resumed_optimizer)):
        losses[name] = []
        for step in range(6):
            opt.zero_grad()
            loss = F.cross_entropy(model(inputs), targets)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
            if step in (1, 4):
                apply_dst_step(model, 0.2, generator=torch.Generator().manual_seed(9 + step))
    assert losses["original"] == losses["resumed"]
    for name, layer in net.masked_layers().items():
        other = resumed.masked_layers()[name]
        assert torch.equal(layer.mask, other.mask) and torch.equal(layer.weight, other.weight), name
    for param, other in zip(net.parameters(), resumed.parameters(), strict=True):
        for key, value in optimizer.state[param].items():
            assert torch.equal(value, resumed_optimizer.state[other][key]), key


def test_apply_dst_step_on_unmasked_model_is_rejected():
    with pytest.raises(TypeError, match="MaskedNet"):
        apply_dst_step(SimpleNet(), prune_ratio=0.1)


@pytest.mark.parametrize("ratio, error", [(1.5, ValueError), (-0.1, ValueError), ("0.1", TypeError)])
def test_bad_prune_ratio_is_rejected(ratio, error):
    with pytest.raises(error, match="prune_ratio"):
        apply_dst_step(MaskedNet(MLP(10, (5,)), 0.5), prune_ratio=ratio)


def test_unknown_regrow_lists_choices():
    with pytest.raises(ValueError, match=r"\['gradient', 'momentum', 'random'\]"):
        apply_dst_step(MaskedNet(MLP(10, (5,)), 0.5), regrow="magnitude")


def test_momentum_regrow_without_the_momentum_is_rejected():
    with pytest.raises(ValueError, match="MomentumTracker"):
        apply_dst_step(MaskedNet(MLP(10, (5,)), 0.5), regrow="momentum")


def test_gradient_regrow_without_batch_is_rejected():
    with pytest.raises(ValueError, match="batch"):
        apply_dst_step(MaskedNet(MLP(10, (5,)), 0.5), regrow="gradient")


def test_dense_layer_has_nothing_to_regrow():
    net = MaskedNet(MLP(10, (5,)), sparsity=0.0)
    report = apply_dst_step(net, prune_ratio=0.5)
    assert all(update.pruned == 0 for update in report.values())


# ----------------------------------------------------------------------------- hostile values and odd nets

def test_non_finite_weights_stop_the_step_naming_the_layer_and_change_nothing():
    torch.manual_seed(0)
    net = MaskedNet(MLP(20, (30,), num_classes=5), sparsity=0.8)
    fc1 = net.masked_layers()["fc1"]
    active = fc1.mask.view(-1).nonzero().squeeze(1)
    with torch.no_grad():
        fc1.weight.view(-1)[active[:3]] = float("nan")
        fc1.weight.view(-1)[active[3]] = float("inf")
    masks = {name: layer.mask.clone() for name, layer in net.masked_layers().items()}
    with pytest.raises(ValueError, match=r"layer 'fc1' has 4 non-finite weights"):
        apply_dst_step(net, prune_ratio=0.3)
    for name, layer in net.masked_layers().items():
        assert torch.equal(layer.mask, masks[name])


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), prune_ratio=st.floats(0.0, 1.0))
def test_active_counts_stay_exact_with_extreme_and_tied_magnitudes(seed, prune_ratio):
    generator = torch.Generator().manual_seed(seed)
    net = MaskedNet(MLP(12, (10,), num_classes=3), sparsity=0.7, generator=generator)
    with torch.no_grad():
        for layer in net.masked_layers().values():  # huge, tiny and exactly equal magnitudes
            choices = torch.tensor([3e38, -3e38, 1e-45, 0.0, 1.0, -1.0])
            picks = torch.randint(0, len(choices), layer.weight.shape, generator=generator)
            layer.weight.copy_(choices[picks] * layer.mask)
    before = {name: layer.active_count for name, layer in net.masked_layers().items()}
    apply_dst_step(net, prune_ratio=prune_ratio, generator=generator)
    assert {name: layer.active_count for name, layer in net.masked_layers().items()} == before


def test_rigl_pass_leaves_batchnorm_buffers_as_they_were():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    net = MaskedNet(base, sparsity=0.5).train()
    buffers = {name: value.clone() for name, value in net.named_buffers() if not name.endswith("mask")}
    batch = (torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,)))
    report = apply_dst_step(net, prune_ratio=0.3, regrow="gradient", batch=batch)
    assert sum(update.pruned for update in report.values()) > 0
    assert net.training
    for name, value in net.named_buffers():
        if name in buffers:
            assert torch.equal(value, buffers[name]), name


class WithSpareHead(nn.Module):
    """An MLP whose second head is never used in the forward."""

    def __init__(self):
        super().__init__()
        self.body, self.spare = MLP(10, (8,), num_classes=3), nn.Linear(8, 3)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("regrow", ["random", "gradient"])
def test_frozen_and_unused_layers_are_left_out_of_dst(regrow):
    torch.manual_seed(0)
    net = MaskedNet(WithSpareHead(), sparsity=0.5)
    net.masked_layers()["body.fc1"].weight.requires_grad_(False)  # frozen after wrapping: fine-tuning the rest
    masks = {name: layer.mask.clone() for name, layer in net.masked_layers().items()}
    batch = (torch.randn(5, 10), torch.randint(0, 3, (5,)))
    report = apply_dst_step(net, prune_ratio=0.5, regrow=regrow, batch=batch)
    assert report["body.fc1"].pruned == 0 and torch.equal(net.masked_layers()["body.fc1"].mask, masks["body.fc1"])
    assert report["body.fc2"].pruned > 0
    # under RigL no gradient reaches the unused layer, so it has no criterion and stays put
    assert (report["spare"].pruned == 0) == (regrow == "gradient")


@pytest.mark.parametrize("batch, match", [
    ({"image": torch.randn(2, 10), "label": torch.tensor([0, 1])}, r"dict with keys \['image', 'label'\]"),
    (torch.randn(2, 10), "Tensor"),
])
def test_batches_that_are_not_pairs_are_named(batch, match):
    with pytest.raises(TypeError, match=match):
        apply_dst_step(MaskedNet(MLP(10, (5,)), 0.5), regrow="gradient", batch=batch)


def test_gradient_regrow_on_an_empty_loader_says_so():
    scheduler = masked_scheduler(MaskedNet(MLP(10, (5,)), 0.5), DSTConfig(every=1, regrow="gradient"))
    with pytest.raises(ValueError, match="loader yielded none"):
        scheduler.after_epoch([])


def test_lbfgs_is_refused_for_masked_weights():
    net = MaskedNet(MLP(10, (5,)), 0.5)
    optimizer = torch.optim.LBFGS(net.parameters())
    with pytest.raises(ValueError, match="LBFGS"):
        apply_dst_step(net, 0.2, optimizer=optimizer)
    inputs, targets = torch.randn(4, 10), torch.tensor([0, 1, 2, 3])

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(net(inputs), targets)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="flat history"):
        optimizer.step(closure)


# ----------------------------------------------------------------------------- save, load, resume in every order

def trained_checkpoint(seed: int = 0):
    """A masked MLP trained with Adam, then its model and optimizer state as a checkpoint would hold them."""
    net, _, _ = run_training(OPTIMIZERS["adam"], steps=12, seed=seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(net(torch.randn(16, 30, generator=generator)), torch.randint(0, 4, (16,))).backward()
        optimizer.step()
    return copy.deepcopy(net.state_dict()), copy.deepcopy(optimizer.state_dict())


def fresh():
    net = MaskedNet(MLP(30, (40, 40), num_classes=4), sparsity=0.8, allocation="erk")
    return net, torch.optim.Adam(net.parameters(), lr=1e-2)


RESUME_ORDERS = {
    "model, optimizer, dst": ("model", "optimizer", "dst"),
    "optimizer, model, dst": ("optimizer", "model", "dst"),
    "model, dst, optimizer": ("model", "dst", "optimizer"),
    "dst before any load": ("dst", "model", "optimizer"),
    "load, dst, save, load again": ("model", "optimizer", "dst", "save-load"),
}


@pytest.mark.parametrize("order", sorted(RESUME_ORDERS))
def test_inactive_weights_and_state_stay_zero_whatever_the_resume_order(order):
    model_state, optimizer_state = trained_checkpoint()
    net, optimizer = fresh()
    for action in RESUME_ORDERS[order]:
        if action == "model":
            net.load_state_dict(copy.deepcopy(model_state))
        elif action == "optimizer":
            optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        elif action == "dst":  # before this optimizer ever stepped, and without optimizer=
            apply_dst_step(net, prune_ratio=0.3, generator=torch.Generator().manual_seed(1))
        else:  # the not-yet-stepped state goes through a checkpoint into another process
            saved = copy.deepcopy((net.state_dict(), optimizer.state_dict()))
            net, optimizer = fresh()
            net.load_state_dict(saved[0])
            optimizer.load_state_dict(saved[1])
    generator = torch.Generator().manual_seed(2)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(net(torch.randn(16, 30, generator=generator)), torch.randint(0, 4, (16,))).backward()
        optimizer.step()
    for name, layer in net.masked_layers().items():
        assert torch.all(layer.weight[~layer.mask] == 0), name
        state = optimizer.state[layer.weight]
        assert torch.all(state["exp_avg"][~layer.mask] == 0) and torch.all(state["exp_avg_sq"][~layer.mask] == 0)


def test_optimizer_hooks_come_with_the_first_masked_weight_not_with_an_import():
    code = ("import torch, dst, utils\nfrom dst.engine import optimizer_state\n"
            "before = len(optimizer_state._HOOKS)\n"
            "from dst.engine.masked import MaskedNet\nfrom dst.core.models import MLP\nMaskedNet(MLP(4, (3,)), 0.5)\n"
            "print(before, len(optimizer_state._HOOKS))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.split() == ["0", "2"]


@pytest.mark.parametrize("regrow", ["random", "gradient"])
def test_a_channels_last_model_takes_dst_steps_like_a_contiguous_one(regrow):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    plain = MaskedNet(base, 0.6, generator=torch.Generator().manual_seed(0))
    channels_last = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    assert not channels_last.masked_layers()["0"].mask.is_contiguous()
    batch = torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,))
    models = {"contiguous": plain, "channels_last": channels_last}
    optimizers = {key: torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) for key, net in models.items()}
    for key, net in models.items():
        F.cross_entropy(net(batch[0]), batch[1]).backward()
        optimizers[key].step()
        apply_dst_step(net, 0.3, regrow, batch=batch, generator=torch.Generator().manual_seed(1))
    for name, layer in plain.masked_layers().items():
        other = channels_last.masked_layers()[name]
        assert torch.equal(layer.mask, other.mask) and torch.equal(layer.weight, other.weight)
        assert torch.all(optimizers["channels_last"].state[other.weight]["momentum_buffer"][~other.mask] == 0)


def test_optimizer_hooks_go_when_the_last_masked_layer_does():
    code = ("import gc, torch\nfrom dst.engine import optimizer_state\nfrom dst.engine.masked import MaskedNet\n"
            "from dst.core.models import MLP\n"
            "first, second = MaskedNet(MLP(4, (3,)), 0.5), MaskedNet(MLP(4, (3,)), 0.5)\n"
            "counts = [len(optimizer_state._HOOKS)]\n"
            "del first\ngc.collect()\ncounts.append(len(optimizer_state._HOOKS))\n"
            "del second\ngc.collect()\ncounts.append(len(optimizer_state._HOOKS))\n"
            "third = MaskedNet(MLP(4, (3,)), 0.5)\ncounts.append(len(optimizer_state._HOOKS))\n"
            "print(*counts)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.split() == ["2", "2", "0", "2"]


def test_an_optimizer_without_masked_weights_is_not_searched_at_every_step(monkeypatch):
    from dst.engine import optimizer_state

    masked = MaskedNet(MLP(6, (5,), 3), 0.5, generator=torch.Generator().manual_seed(0))
    plain = nn.Sequential(*[nn.Linear(3, 3) for _ in range(20)])
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for param in plain.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    looked_up = []
    original = optimizer_state.masked_layer_of
    monkeypatch.setattr(optimizer_state, "masked_layer_of", lambda weight: looked_up.append(1) or original(weight))
    for _ in range(3):
        optimizer.step()
    assert looked_up == []  # old code: one lookup per parameter per step
    # Masked weights added to the optimizer later are found: their state follows the mask from the next step.
    layer = masked.masked_layers()["fc1"]
    optimizer.add_param_group({"params": [layer.weight]})
    layer.weight.grad = torch.ones_like(layer.weight)
    optimizer.step()
    assert optimizer in optimizer_state.optimizers_of(layer.weight)
    assert looked_up


@pytest.mark.parametrize("prune, regrow, named", [(1.5, 0, "prune_count"), (-1, 0, "prune_count"),
                                                  (0, 10**6, "regrow_count"), (True, 0, "prune_count")])
def test_update_layer_counts_refuses_counts_that_are_not_whole_numbers_in_range(prune, regrow, named):
    from dst.engine.prune_regrow import update_layer_counts

    layer = MaskedNet(MLP(6, (5,), 3), 0.5, generator=torch.Generator().manual_seed(0)).masked_layers()["fc1"]
    with pytest.raises(ValueError, match=f"{named} must be a whole number of weights in"):
        update_layer_counts(layer, prune, regrow)
