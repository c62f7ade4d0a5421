"""The DST topology update: prune the weakest active weights, regrow as many elsewhere.

Regrowth criteria (``REGROW``):
- ``"random"`` (SET, Mocanu et al. 2018): new connections at uniformly random
  inactive positions.
- ``"gradient"`` (RigL, Evci et al. 2020): the inactive positions whose dense
  loss gradient is largest in magnitude, from a batch the caller provides.

Both start regrown weights at exactly zero. RigL does so by design; the
original SET drew them from the init distribution, but a random value injected
into a trained net changes its function at once (the loss jumps after every
update), while a zero leaves the function unchanged and lets the next gradient
steps decide what the connection is worth.

Candidates for regrowth are the positions inactive *before* the step, so a
weight pruned now is not regrown in the same step and the update really moves
``pruned`` connections.

Every count is exact whatever the weights hold: pruning picks among the active
positions only and regrowth among the inactive ones. A layer with a NaN or
infinite weight (training has diverged) stops the step with an error naming the
layer, before anything changes. Frozen layers (``requires_grad=False`` weight)
are left out of DST, and so, under RigL, are layers the loss does not reach.
"""

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dst.masked import MaskedLayer, MaskedNet
from dst.optimizer_state import check_optimizer, optimizers_of, reset_optimizer_state

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LayerUpdate:
    """What one DST step did to one layer (counts of weights)."""

    active: int
    pruned: int
    regrown: int


def regrow_random(candidates: torch.Tensor, count: int, gradient: torch.Tensor | None,
                  generator: torch.Generator | None) -> torch.Tensor:
    """``count`` flat indices drawn uniformly from the True entries of ``candidates``."""
    pool = candidates.nonzero().squeeze(1)
    order = torch.randperm(pool.numel(), generator=generator).to(pool.device)
    return pool[order[:count]]


def regrow_gradient(candidates: torch.Tensor, count: int, gradient: torch.Tensor | None,
                    generator: torch.Generator | None) -> torch.Tensor:
    """Flat indices of the ``count`` candidates with the largest gradient magnitude."""
    scores = gradient.abs().masked_fill(~candidates, -1.0)
    return torch.topk(scores, count, sorted=False).indices


REGROW = {"random": regrow_random, "gradient": regrow_gradient}


def split_batch(batch) -> Batch:
    """``(inputs, targets)`` of one batch, or a clear error for anything else (a dict, a bare tensor)."""
    if isinstance(batch, Mapping):
        raise TypeError(f"expected each batch as an (inputs, targets) pair, got a dict with keys "
                        f"{sorted(map(str, batch))}; make the loader yield (inputs, targets) tuples")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        items = f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else ""
        raise TypeError(f"expected each batch as an (inputs, targets) pair, got a {type(batch).__name__}{items}")
    return batch[0], batch[1]


def dense_gradients(masked_net: MaskedNet, batch: Batch,
                    loss_fn: Callable = F.cross_entropy) -> dict[str, torch.Tensor]:
    """Loss gradient for every weight position, active or not, on one batch.

    The forward skips the mask multiply (same outputs: inactive weights are
    zero), so the gradient is dense. It runs in the net's current mode, and
    every buffer (BatchNorm's running statistics and batch count) is put back
    afterwards. ``.grad`` attributes are left untouched. Frozen layers, and
    layers the loss does not reach, get no entry.
    """
    inputs, targets = split_batch(batch)
    layers = {name: layer for name, layer in masked_net.masked_layers().items() if layer.weight.requires_grad}
    if not layers:
        return {}
    device = next(iter(layers.values())).weight.device
    masks = {id(layer.mask) for layer in masked_net.masked_layers().values()}
    saved = [(buffer, buffer.clone()) for buffer in masked_net.buffers() if id(buffer) not in masks]
    try:
        with torch.enable_grad(), masked_net.masks_bypassed():
            loss = loss_fn(masked_net(inputs.to(device)), targets.to(device))
            if not loss.requires_grad:
                return {}
            grads = torch.autograd.grad(loss, [layer.weight for layer in layers.values()], allow_unused=True)
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
    return {name: grad for name, grad in zip(layers, grads) if grad is not None}


def _update_layer(layer: MaskedLayer, prune_ratio: float, regrow: str, gradient: torch.Tensor | None,
                  optimizers: set, generator: torch.Generator | None) -> LayerUpdate:
    mask = layer.mask.view(-1)
    active_positions = mask.nonzero().squeeze(1)
    active = active_positions.numel()
    count = min(round(prune_ratio * active), mask.numel() - active)
    if count == 0:
        return LayerUpdate(active=active, pruned=0, regrown=0)
    weight = layer.weight.detach().view(-1)
    smallest = torch.topk(weight[active_positions].abs(), count, largest=False, sorted=False).indices
    pruned = active_positions[smallest]
    flat_gradient = None if gradient is None else gradient.reshape(-1)
    regrown = REGROW[regrow](~mask, count, flat_gradient, generator)
    with torch.no_grad():
        mask[pruned] = False
        mask[regrown] = True
        changed = torch.cat([pruned, regrown])
        weight[changed] = 0.0
    reset_optimizer_state(optimizers, layer.weight, changed)
    return LayerUpdate(active=int(mask.sum()), pruned=count, regrown=count)


def _check_finite(name: str, values: torch.Tensor, what: str) -> None:
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        raise ValueError(f"layer {name!r} has {bad:,} non-finite {what} (NaN or inf) out of {values.numel():,}: "
                         "a DST step ranks by magnitude and cannot rank these. Training has probably diverged "
                         "(lower the learning rate, or go back to a checkpoint); nothing was changed")


def apply_dst_step(masked_net: MaskedNet, prune_ratio: float = 0.1, regrow: str = "random",
                   batch: Batch | None = None, loss_fn: Callable = F.cross_entropy,
                   optimizer: torch.optim.Optimizer | None = None,
                   generator: torch.Generator | None = None,
                   gradients: dict[str, torch.Tensor] | None = None) -> dict[str, LayerUpdate]:
    """One prune-and-regrow step on every masked layer; returns a report per layer.

    Each layer prunes ``round(prune_ratio * active)`` of its active weights with
    the smallest magnitude and regrows the same number (fewer only if the layer
    has fewer inactive positions), so its active count stays exactly constant.
    Pruned and regrown weights are set to zero and their optimizer state
    (momentum, Adam moments) is reset in ``optimizer`` and in every optimizer
    that has stepped the layer, so no optimizer revives a pruned weight (an
    optimizer that has not stepped yet is made to agree before its first step,
    see ``dst.optimizer_state``). Frozen layers, and under RigL layers the batch's
    loss does not reach, are reported with nothing moved.

    Args:
        prune_ratio: fraction of each layer's active weights to move, in [0, 1].
        regrow: "random" (SET) or "gradient" (RigL; needs ``batch``).
        batch: (inputs, targets) for the gradient criterion.
        optimizer: refused if it is a torch.optim.LBFGS (its history cannot be reset per weight).
        generator: random source for "random" regrowth (default: torch's global one).
        gradients: precomputed dense gradients by layer name (as in ``masked_layers()``)
            for "gradient" regrowth, used instead of computing them from ``batch``;
            ``dst.distributed`` passes the gradient all-reduced over every rank's batch.

    Raises:
        ValueError: a layer holds NaN or infinite weights (or RigL gradients); nothing is changed.
    """
    if not isinstance(masked_net, MaskedNet):
        raise TypeError(f"apply_dst_step needs a MaskedNet, got {type(masked_net).__name__}; "
                        "wrap the model first: MaskedNet(model, sparsity=...)")
    check_prune_ratio(prune_ratio)
    if regrow not in REGROW:
        raise ValueError(f"unknown regrow method {regrow!r}; choose one of {sorted(REGROW)}")
    if optimizer is not None:
        check_optimizer(optimizer)
    if regrow == "gradient" and gradients is None:
        if batch is None:
            raise ValueError("regrow='gradient' (RigL) needs batch=(inputs, targets) to compute gradients")
        gradients = dense_gradients(masked_net, batch, loss_fn)
    elif regrow == "gradient":
        _check_gradients(masked_net, gradients)
    else:
        gradients = {}
    layers = masked_net.masked_layers()
    moving = {name: layer for name, layer in layers.items()
              if layer.weight.requires_grad and (regrow != "gradient" or name in gradients)}
    for name, layer in moving.items():  # every check before the first change
        _check_finite(name, layer.weight.detach(), "weights")
        if name in gradients:
            _check_finite(name, gradients[name], "RigL gradients")
    report = {}
    for name, layer in layers.items():
        if name not in moving:
            report[name] = LayerUpdate(active=layer.active_count, pruned=0, regrown=0)
            continue
        optimizers = optimizers_of(layer.weight) | ({optimizer} if optimizer is not None else set())
        report[name] = _update_layer(layer, prune_ratio, regrow, gradients.get(name), optimizers, generator)
    return report


def _check_gradients(masked_net: MaskedNet, gradients: dict[str, torch.Tensor]) -> None:
    """Precomputed RigL gradients need one entry, shaped like the weight, per trainable masked layer."""
    for name, layer in masked_net.masked_layers().items():
        if name not in gradients and not layer.weight.requires_grad:
            continue  # frozen: left out of DST anyway
        if name not in gradients:
            raise ValueError(f"gradients has no entry for masked layer {name!r}; it needs one per layer: "
                             f"{list(masked_net.masked_layers())}")
        if gradients[name].shape != layer.weight.shape:
            raise ValueError(f"gradients[{name!r}] has shape {tuple(gradients[name].shape)}, "
                             f"the layer's weight {tuple(layer.weight.shape)}")


def check_prune_ratio(prune_ratio: float) -> None:
    """Raise unless ``prune_ratio`` is a number in [0, 1]."""
    if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, numbers.Real):
        raise TypeError(f"prune_ratio must be a float in [0, 1], got {type(prune_ratio).__name__}")
    if not 0.0 <= prune_ratio <= 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1] (fraction of active weights moved), got {prune_ratio}")


def update_layer_counts(layer: MaskedLayer, prune_count: int, regrow_count: int,
                        scores: torch.Tensor | None = None, optimizer: torch.optim.Optimizer | None = None,
                        generator: torch.Generator | None = None) -> LayerUpdate:
    """Prune and regrow one layer with counts the caller chose, which may differ.

    The same rule as a DST step (magnitude pruning among active weights, regrowth among
    positions inactive before the step, moved weights and their optimizer state zeroed),
    for the methods whose per-layer counts are not "regrow what was pruned": sparse
    momentum moves regrowth between layers, gradual pruning regrows nothing. Regrowth
    takes the largest ``|scores|`` (momentum, gradient; shaped like the weight), or
    uniformly random positions when ``scores`` is None.
    """
    mask = layer.mask.view(-1)
    active_positions = mask.nonzero().squeeze(1)
    active, inactive = active_positions.numel(), mask.numel() - active_positions.numel()
    if not 0 <= prune_count <= active:
        raise ValueError(f"prune_count must be in [0, {active}] (the layer's active weights), got {prune_count}")
    if not 0 <= regrow_count <= inactive:
        raise ValueError(f"regrow_count must be in [0, {inactive}] (the layer's inactive positions), "
                         f"got {regrow_count}")
    weight = layer.weight.detach().view(-1)
    smallest = torch.topk(weight[active_positions].abs(), prune_count, largest=False, sorted=False).indices
    pruned = active_positions[smallest]
    if scores is None:
        regrown = regrow_random(~mask, regrow_count, None, generator)
    else:
        regrown = regrow_gradient(~mask, regrow_count, scores.reshape(-1), generator)
    with torch.no_grad():
        mask[pruned] = False
        mask[regrown] = True
        changed = torch.cat([pruned, regrown])
        weight[changed] = 0.0
    optimizers = optimizers_of(layer.weight) | ({optimizer} if optimizer is not None else set())
    reset_optimizer_state(optimizers, layer.weight, changed)
    return LayerUpdate(active=int(mask.sum()), pruned=prune_count, regrown=regrow_count)
