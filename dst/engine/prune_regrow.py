"""The DST step of the simulated engine: ``apply_dst_step`` on every masked layer of a MaskedNet.

Each layer moves connections by the rule both engines share (``dst.engine.update_rule``):
prune the active weights of smallest magnitude, regrow as many at positions that
were inactive before the step, chosen by a regrow criterion (``REGROW``: ``"random"``
for SET, ``"gradient"`` for RigL, whose dense gradients ``dense_gradients`` computes
from a batch). Here the layer's state is a boolean mask over a dense torch weight.

Both criteria start regrown weights at exactly zero. RigL does so by design; the
original SET drew them from the init distribution, but a random value injected
into a trained net changes its function at once (the loss jumps after every
update), while a zero leaves the function unchanged and lets the next gradient
steps decide what the connection is worth.

Moved connections also start with zero optimizer state (momentum, Adam's moments),
in the optimizer passed to ``apply_dst_step`` and in every optimizer that has stepped
the layer's weight: ``dst.engine.optimizer_state`` finds those, so the seed's call
``apply_dst_step(masked_net, prune_ratio=0.1)`` is correct without one.

Every count is exact whatever the weights hold: pruning picks among the active
positions only and regrowth among the inactive ones. A layer with a NaN or
infinite weight (training has diverged) stops the step with an error naming the
layer, before anything changes. Frozen layers (``requires_grad=False`` weight)
are left out of DST, and so, under RigL, are layers the loss does not reach.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dst.core.checks import is_count
from dst.core.training import Batch, split_batch
from dst.engine.masked import MaskedNet
from dst.engine.masked_layers import MaskedLayer
from dst.engine.optimizer_state import check_optimizer, fill_at, optimizers_of, reset_optimizer_state
from dst.engine.schedule import DSTConfig, DSTScheduler
from dst.engine.update_rule import (
    LayerUpdate,
    RegrowCriterion,
    check_prune_ratio,
    choose_moves,
    get_regrow,
    moved_count,
)


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


def update_layer(layer: MaskedLayer, prune_ratio: float, regrow: str = "random",
                 gradient: torch.Tensor | None = None, optimizers=(),
                 generator: torch.Generator | None = None) -> LayerUpdate:
    """One DST step on one masked layer (``update_rule``'s choices), its moved weights and their state zeroed.

    ``gradient`` is the layer's dense loss gradient (criteria that need one);
    ``optimizers`` are those whose state at the moved positions is reset.
    """
    active = layer.active_count
    count = moved_count(active, layer.mask.numel(), prune_ratio)
    return _move(layer, count, count, get_regrow(regrow), gradient, optimizers, generator)


def _move(layer: MaskedLayer, prune_count: int, regrow_count: int, criterion, scores: torch.Tensor | None,
          optimizers, generator: torch.Generator | None) -> LayerUpdate:
    """Apply ``choose_moves`` to one masked layer: flip its mask, zero the moved weights and their optimizer state."""
    # Positions are row-major whatever the memory format: reshape reads (a copy if channels-last),
    # fill_at writes in place.
    active = layer.mask.reshape(-1).nonzero().squeeze(1)
    if prune_count == 0 and regrow_count == 0:
        return LayerUpdate(active=active.numel(), pruned=0, regrown=0)
    # The rule runs on the host: the active positions and their magnitudes (and RigL's gradient) come over.
    magnitudes = layer.weight.detach().reshape(-1)[active].abs().float().cpu().numpy()
    flat_scores = None if scores is None else scores.detach().reshape(-1).float().cpu().numpy()
    pruned, regrown = choose_moves(active.cpu().numpy(), magnitudes, layer.mask.numel(), prune_count, criterion,
                                   gradient=flat_scores, random=generator, regrow_count=regrow_count)
    pruned = active[torch.from_numpy(pruned).to(active.device)]
    regrown = torch.from_numpy(regrown).to(layer.mask.device)
    changed = torch.cat([pruned, regrown])
    with torch.no_grad():
        fill_at(layer.mask, pruned, False)
        fill_at(layer.mask, regrown, True)
        fill_at(layer.weight.detach(), changed, 0.0)
    reset_optimizer_state(optimizers, layer.weight, changed)
    return LayerUpdate(active=layer.active_count, pruned=prune_count, regrown=regrow_count)


def check_finite(name: str, values: torch.Tensor, what: str) -> None:
    """Raise, naming the layer, if ``values`` (its weights, gradients, momentum) hold a NaN or an inf."""
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
    see ``dst.engine.optimizer_state``). Frozen layers, and under RigL layers the batch's
    loss does not reach, are reported with nothing moved.

    Args:
        prune_ratio: fraction of each layer's active weights to move, in [0, 1].
        regrow: a criterion of ``dst.engine.update_rule.REGROW``: "random" (SET) or "gradient"
            (RigL; needs ``batch`` or ``gradients``).
        batch: (inputs, targets) for a criterion that needs gradients.
        optimizer: the optimizer training ``masked_net``; pass it, so the reset is visible at
            the call. Optimizers that have already stepped these weights are found without it
            (``dst.engine.optimizer_state``). Refused if it is a torch.optim.LBFGS (its history cannot
            be reset per weight).
        generator: random source for "random" regrowth (default: torch's global one).
        gradients: precomputed dense gradients by layer name (as in ``masked_layers()``)
            for "gradient" regrowth, used instead of computing them from ``batch``;
            ``dst.distributed`` passes the gradient all-reduced over every rank's batch.

    Raises:
        ValueError: a layer holds NaN or infinite weights (or RigL gradients); nothing is changed.
        RuntimeError: called in a distributed job of several ranks, where each rank would take its own
            step: use ``dst.distributed.distributed_dst_step`` there.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(f"apply_dst_step in a distributed job ({dist.get_world_size()} ranks) would let each rank "
                           "take its own step (its own random draws, its own batch's gradients) and the masks "
                           "would diverge: use dst.distributed.distributed_dst_step, e.g. "
                           "DSTScheduler(config, DistributedDSTStep(model, ...)), which calls it")
    return local_dst_step(masked_net, prune_ratio, regrow, batch, loss_fn, optimizer, generator, gradients)


class MaskedDSTStep:
    """``apply_dst_step`` as a ``TopologyUpdate`` for ``DSTScheduler``: net, criterion and optimizer fixed for a run.

    A batch is asked for only when the criterion needs the dense gradient (RigL).
    """

    def __init__(self, masked_net: MaskedNet, regrow: str | RegrowCriterion = "random",
                 optimizer: torch.optim.Optimizer | None = None, loss_fn: Callable = F.cross_entropy,
                 generator: torch.Generator | None = None):
        if not isinstance(masked_net, MaskedNet):
            raise TypeError(f"MaskedDSTStep needs a MaskedNet, got {type(masked_net).__name__}; wrap the model "
                            "first (MaskedNet(model, sparsity=...)), or for a DDP model use DistributedDSTStep")
        self.masked_net, self.regrow, self.optimizer = masked_net, regrow, optimizer
        self.loss_fn, self.generator = loss_fn, generator
        self.needs_batch = get_regrow(regrow).needs_gradient

    def __call__(self, prune_ratio: float, batch: Batch | None = None) -> dict[str, LayerUpdate]:
        return apply_dst_step(self.masked_net, prune_ratio, self.regrow, batch, self.loss_fn, self.optimizer,
                              self.generator)

    def close(self) -> None:
        """Nothing to release: the step holds no hooks."""


def masked_scheduler(masked_net: MaskedNet, config: DSTConfig, optimizer: torch.optim.Optimizer | None = None,
                     loss_fn: Callable = F.cross_entropy, generator: torch.Generator | None = None,
                     steps: int = 0, epochs: int = 0) -> DSTScheduler:
    """``DSTScheduler(config, MaskedDSTStep(masked_net, config.regrow, ...))``: the common case, in one call."""
    return DSTScheduler(config, MaskedDSTStep(masked_net, config.regrow, optimizer, loss_fn, generator),
                        steps=steps, epochs=epochs)


def local_dst_step(masked_net: MaskedNet, prune_ratio: float = 0.1, regrow: str = "random",
                   batch: Batch | None = None, loss_fn: Callable = F.cross_entropy,
                   optimizer: torch.optim.Optimizer | None = None,
                   generator: torch.Generator | None = None,
                   gradients: dict[str, torch.Tensor] | None = None) -> dict[str, LayerUpdate]:
    """``apply_dst_step`` on this process alone, whatever the process group: what ``distributed_dst_step`` calls
    once it has made the step's inputs (generator, gradients) the same on every rank."""
    if not isinstance(masked_net, MaskedNet):
        raise TypeError(f"apply_dst_step needs a MaskedNet, got {type(masked_net).__name__}; "
                        "wrap the model first: MaskedNet(model, sparsity=...)")
    check_prune_ratio(prune_ratio)
    criterion = get_regrow(regrow)
    if optimizer is not None:
        check_optimizer(optimizer)
    if criterion.needs_gradient and gradients is None:
        if batch is None:
            raise ValueError(f"regrow={regrow!r} ({criterion.description}) needs batch=(inputs, targets) "
                             "to compute gradients")
        gradients = dense_gradients(masked_net, batch, loss_fn)
    elif criterion.needs_gradient:
        _check_gradients(masked_net, gradients)
    else:
        gradients = {}
    layers = masked_net.masked_layers()
    moving = {name: layer for name, layer in layers.items()
              if layer.weight.requires_grad and (not criterion.needs_gradient or name in gradients)}
    for name, layer in moving.items():  # every check before the first change
        check_finite(name, layer.weight.detach(), "weights")
        if name in gradients:
            check_finite(name, gradients[name], "RigL gradients")
    report = {}
    for name, layer in layers.items():
        if name not in moving:
            report[name] = LayerUpdate(active=layer.active_count, pruned=0, regrown=0)
            continue
        report[name] = update_layer(layer, prune_ratio, regrow, gradients.get(name),
                                    _optimizers_of(layer, optimizer), generator)
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


def update_layer_counts(layer: MaskedLayer, prune_count: int, regrow_count: int,
                        scores: torch.Tensor | None = None, optimizer: torch.optim.Optimizer | None = None,
                        generator: torch.Generator | None = None) -> LayerUpdate:
    """Prune and regrow one layer with counts the caller chose, which may differ.

    The same rule as a DST step (``dst.engine.update_rule``'s choices: magnitude pruning among active
    weights, regrowth among positions inactive before the step; moved weights and their
    optimizer state zeroed), for the methods whose per-layer counts are not "regrow what was
    pruned": sparse momentum moves regrowth between layers, gradual pruning regrows nothing.
    Regrowth takes the largest ``|scores|`` (momentum, gradient; shaped like the weight), or
    uniformly random positions when ``scores`` is None.
    """
    active, numel = layer.active_count, layer.mask.numel()
    for name, count, most in (("prune_count", prune_count, active), ("regrow_count", regrow_count, numel - active)):
        if not is_count(count) or count > most:
            raise ValueError(f"{name} must be a whole number of weights in [0, {most}] for this layer "
                             f"({active} of {numel} active), got {count!r}")
    return _move(layer, prune_count, regrow_count, get_regrow("random" if scores is None else "gradient"),
                 scores, _optimizers_of(layer, optimizer), generator)


def _optimizers_of(layer: MaskedLayer, optimizer: torch.optim.Optimizer | None) -> set:
    """Optimizers whose state at a layer's moved positions is reset: every one that stepped it, and ``optimizer``."""
    return optimizers_of(layer.weight) | ({optimizer} if optimizer is not None else set())
