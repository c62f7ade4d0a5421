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

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dst.core.checks import is_count
from dst.core.training import Batch, split_batch
from dst.engine.masked import MaskedNet
from dst.engine.masked_layers import MaskedLayer
from dst.engine.momentum import MomentumTracker
from dst.engine.optimizer_state import check_optimizer, fill_at, optimizers_of, reset_optimizer_state
from dst.engine.patterns.unstructured import Unstructured
from dst.engine.schedule import DSTConfig, DSTScheduler
from dst.engine.update_rule import (
    PROJECT_RULE,
    SIGNALS,
    LayerUpdate,
    MoveRule,
    RegrowCriterion,
    check_prune_ratio,
    choose_moves,
    get_regrow,
    layer_scores,
    moved_count,
    sign_split_prune,
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


def update_layer(layer: MaskedLayer, prune_ratio: float, regrow: str | RegrowCriterion = "random",
                 signal: torch.Tensor | None = None, optimizers=(),
                 generator: torch.Generator | None = None, rule: MoveRule = PROJECT_RULE) -> LayerUpdate:
    """One DST step on one masked layer (``update_rule``'s choices, within its pattern's groups), its moved
    weights and their optimizer state zeroed.

    ``signal`` is the dense signal the criterion ``needs`` (RigL's gradient, the momentum), shaped like
    the weight; ``optimizers`` are those whose state at the moved positions is reset; ``rule`` the
    step's details (``dst.engine.update_rule.MoveRule``: rounding, regrowth of just-pruned weights, SET's
    sign split).
    """
    if rule.sign_split:
        return _move(layer, None, None, get_regrow(regrow), signal, optimizers, generator, rule, prune_ratio)
    count = layer_moved_count(layer, prune_ratio, rule)
    return _move(layer, count, count, get_regrow(regrow), signal, optimizers, generator, rule)


def layer_moved_count(layer: MaskedLayer, prune_ratio: float, rule: MoveRule = PROJECT_RULE) -> int:
    """Connections (units, for a block pattern) one step at ``prune_ratio`` moves in ``layer``."""
    if isinstance(layer.pattern, Unstructured):
        return moved_count(layer.active_count, layer.mask.numel(), prune_ratio, rule)
    return layer.pattern.moved_count(layer.mask_2d(), prune_ratio, rule.rounding)


def _move(layer: MaskedLayer, prune_count: int | None, regrow_count: int | None, criterion: RegrowCriterion,
          signal: torch.Tensor | None, optimizers, generator: torch.Generator | None, rule: MoveRule,
          sign_split_ratio: float | None = None) -> LayerUpdate:
    """Prune and regrow one masked layer: flip its mask, zero the moved weights and their optimizer state.

    Unstructured layers take ``choose_moves`` (which scales to any layer size); a structured
    pattern its own ``moves``, the same rule within its groups, counted in its units. Under
    ``rule.sign_split`` the counts are None: ``sign_split_prune`` at ``sign_split_ratio`` chooses
    the pruned weights, and as many regrow.
    """
    if prune_count == 0 and regrow_count == 0:
        return LayerUpdate(active=layer.active_count, pruned=0, regrown=0)
    # The rule runs on the host: the magnitudes (and the criterion's signal) come over.
    flat_signal = None if signal is None else signal.detach().reshape(-1).float().cpu().numpy()
    if isinstance(layer.pattern, Unstructured):
        # Positions are row-major whatever the memory format: reshape reads (a copy if channels-last),
        # fill_at writes in place.
        active = layer.mask.reshape(-1).nonzero().squeeze(1)
        values = layer.weight.detach().reshape(-1)[active].float().cpu().numpy()
        chosen = None
        if rule.sign_split:
            chosen = sign_split_prune(values, layer.mask.numel(), sign_split_ratio)
            if not rule.regrow_pruned:  # as many as the inactive positions can take back, the smallest first
                room = layer.mask.numel() - len(values)
                chosen = chosen[np.argsort(np.abs(values[chosen]), kind="stable")[:room]]
            prune_count = regrow_count = len(chosen)
        pruned, regrown = choose_moves(active.cpu().numpy(), np.abs(values), layer.mask.numel(), prune_count,
                                       criterion, signal=flat_signal, random=generator, regrow_count=regrow_count,
                                       regrow_pruned=rule.regrow_pruned, pruned=chosen)
        pruned = active[torch.from_numpy(pruned).to(active.device)]
    else:
        if rule.sign_split:
            raise ValueError(f"sign_split prunes positive and negative weights separately, which a layer of "
                             f"pattern {layer.pattern.label!r} cannot (it prunes whole units within groups); "
                             "use sign_split=False with a pattern")
        if regrow_count != prune_count:
            raise ValueError(f"a layer of pattern {layer.pattern.label!r} regrows in each group what it pruned "
                             f"there; it cannot prune {prune_count} and regrow {regrow_count}")
        mask = layer.mask_2d()
        magnitudes = layer.weight.detach().reshape(mask.shape).abs().float().cpu().numpy()
        scores = layer_scores(criterion, flat_signal, mask.size, generator).reshape(mask.shape)
        pruned, regrown = layer.pattern.moves(mask, magnitudes, scores, prune_count, rule.regrow_pruned)
        pruned = torch.from_numpy(pruned).to(layer.mask.device)
    regrown = torch.from_numpy(regrown).to(layer.mask.device)
    if rule.regrow_pruned:
        # A weight pruned and regrown in the same step never left: as in rigl, it keeps its value and its
        # optimizer state, and only the connections that really changed are counted as moved.
        pruned, regrown = pruned[~torch.isin(pruned, regrown)], regrown[~torch.isin(regrown, pruned)]
    _apply(layer, pruned, regrown, optimizers)
    return LayerUpdate(active=layer.active_count, pruned=int(pruned.numel()), regrown=int(regrown.numel()))


def _apply(layer: MaskedLayer, pruned: torch.Tensor, regrown: torch.Tensor, optimizers) -> None:
    """Switch ``pruned`` off and ``regrown`` on (flat positions); both start at zero, with zero optimizer state."""
    changed = torch.cat([pruned, regrown])
    with torch.no_grad():
        fill_at(layer.mask, pruned, False)
        fill_at(layer.mask, regrown, True)
        fill_at(layer.weight.detach(), changed, 0.0)
    reset_optimizer_state(optimizers, layer.weight, changed)


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
                   signals: dict[str, torch.Tensor] | None = None,
                   rule: MoveRule = PROJECT_RULE) -> dict[str, LayerUpdate]:
    """One prune-and-regrow step on every masked layer; returns a report per layer.

    Each layer prunes ``round(prune_ratio * active)`` of its active weights with
    the smallest magnitude and regrows the same number (fewer only if the layer
    has fewer inactive positions), so its active count stays exactly constant; a layer
    with a structured pattern (``layer.pattern``) does so within its groups, counted in its
    units, so the pattern holds after the step.
    Pruned and regrown weights are set to zero and their optimizer state
    (momentum, Adam moments) is reset in ``optimizer`` and in every optimizer
    that has stepped the layer, so no optimizer revives a pruned weight (an
    optimizer that has not stepped yet is made to agree before its first step,
    see ``dst.engine.optimizer_state``). Frozen layers, and under RigL layers the batch's
    loss does not reach, are reported with nothing moved.

    Args:
        prune_ratio: fraction of each layer's active weights to move, in [0, 1].
        regrow: a criterion of ``dst.engine.update_rule.REGROW``: "random" (SET), "gradient"
            (RigL; needs ``batch`` or ``signals``) or "momentum" (needs ``signals``: a
            ``MomentumTracker``'s momentum; ``MaskedDSTStep`` keeps one), or a RegrowCriterion.
        batch: (inputs, targets) for a criterion that needs gradients.
        optimizer: the optimizer training ``masked_net``; pass it, so the reset is visible at
            the call. Optimizers that have already stepped these weights are found without it
            (``dst.engine.optimizer_state``). Refused if it is a torch.optim.LBFGS (its history cannot
            be reset per weight).
        generator: random source for "random" regrowth (default: torch's global one).
        signals: the dense signal the criterion needs, by layer name (as in ``masked_layers()``),
            shaped like each weight: precomputed gradients for "gradient" regrowth, used instead
            of computing them from ``batch`` (``dst.distributed`` passes the gradient all-reduced
            over every rank's batch), or the momentum for "momentum".
        rule: the step's details where the reference implementations differ (``MoveRule``: how the count
            is rounded, whether a weight pruned now may regrow now, SET's sign split); this project's
            choices by default, each method's reference in ``dst.methods``.

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
    return local_dst_step(masked_net, prune_ratio, regrow, batch, loss_fn, optimizer, generator, signals, rule)


class MaskedDSTStep:
    """``apply_dst_step`` as a ``TopologyUpdate`` for ``DSTScheduler``: net, criterion and optimizer fixed for a run.

    The criterion's ``needs`` are supplied here: a batch is asked for only when it scores by the
    dense gradient (RigL), and a ``MomentumTracker`` is kept while it scores by momentum (closed
    by ``close()``).
    """

    def __init__(self, masked_net: MaskedNet, regrow: str | RegrowCriterion = "random",
                 optimizer: torch.optim.Optimizer | None = None, loss_fn: Callable = F.cross_entropy,
                 generator: torch.Generator | None = None, momentum: float = 0.9, rule: MoveRule = PROJECT_RULE):
        if not isinstance(masked_net, MaskedNet):
            raise TypeError(f"MaskedDSTStep needs a MaskedNet, got {type(masked_net).__name__}; wrap the model "
                            "first (MaskedNet(model, sparsity=...)), or for a DDP model use DistributedDSTStep")
        self.masked_net, self.regrow, self.optimizer = masked_net, regrow, optimizer
        self.loss_fn, self.generator = loss_fn, generator
        if not isinstance(rule, MoveRule):
            raise TypeError(f"rule must be a dst.engine.update_rule.MoveRule, got {type(rule).__name__}")
        self.rule = rule
        criterion = get_regrow(regrow)
        self.needs_batch = criterion.needs_gradient
        self.tracker = MomentumTracker(masked_net, momentum) if criterion.needs == "momentum" else None

    def __call__(self, prune_ratio: float, batch: Batch | None = None) -> dict[str, LayerUpdate]:
        signals = None if self.tracker is None else self.tracker.momentum
        return apply_dst_step(self.masked_net, prune_ratio, self.regrow, batch, self.loss_fn, self.optimizer,
                              self.generator, signals, self.rule)

    def close(self) -> None:
        """Remove the momentum tracker's hooks, if the criterion needed one."""
        if self.tracker is not None:
            self.tracker.close()


def masked_scheduler(masked_net: MaskedNet, config: DSTConfig, optimizer: torch.optim.Optimizer | None = None,
                     loss_fn: Callable = F.cross_entropy, generator: torch.Generator | None = None,
                     steps: int = 0, epochs: int = 0) -> DSTScheduler:
    """``DSTScheduler(config, MaskedDSTStep(masked_net, config.regrow, ..., rule=config.rule))``: the common case,
    in one call."""
    return DSTScheduler(config, MaskedDSTStep(masked_net, config.regrow, optimizer, loss_fn, generator,
                                              rule=config.rule), steps=steps, epochs=epochs)


def local_dst_step(masked_net: MaskedNet, prune_ratio: float = 0.1, regrow: str = "random",
                   batch: Batch | None = None, loss_fn: Callable = F.cross_entropy,
                   optimizer: torch.optim.Optimizer | None = None,
                   generator: torch.Generator | None = None,
                   signals: dict[str, torch.Tensor] | None = None,
                   rule: MoveRule = PROJECT_RULE) -> dict[str, LayerUpdate]:
    """``apply_dst_step`` on this process alone, whatever the process group: what ``distributed_dst_step`` calls
    once it has made the step's inputs (generator, gradients) the same on every rank."""
    if not isinstance(masked_net, MaskedNet):
        raise TypeError(f"apply_dst_step needs a MaskedNet, got {type(masked_net).__name__}; "
                        "wrap the model first: MaskedNet(model, sparsity=...)")
    check_prune_ratio(prune_ratio)
    if not isinstance(rule, MoveRule):
        raise TypeError(f"rule must be a dst.engine.update_rule.MoveRule, got {type(rule).__name__}")
    criterion = get_regrow(regrow)
    if rule.sign_split:
        structured = [name for name, layer in masked_net.masked_layers().items()
                      if not isinstance(layer.pattern, Unstructured)]
        if structured:
            raise ValueError(f"rule.sign_split prunes positive and negative weights separately, which the "
                             f"structured layers {structured} cannot; use sign_split=False with a pattern")
    if optimizer is not None:
        check_optimizer(optimizer)
    if criterion.needs_gradient and signals is None:
        if batch is None:
            raise ValueError(f"regrow={criterion.name!r} ({criterion.description}) needs batch=(inputs, targets) "
                             "to compute gradients")
        signals = dense_gradients(masked_net, batch, loss_fn)
    elif criterion.needs is not None and signals is None:
        raise ValueError(f"regrow={criterion.name!r} ({criterion.description}) needs signals= "
                         f"{SIGNALS[criterion.needs]}, by layer; MaskedDSTStep keeps a MomentumTracker for it")
    elif criterion.needs is not None:
        _check_signals(masked_net, signals)
    else:
        signals = {}
    layers = masked_net.masked_layers()
    moving = {name: layer for name, layer in layers.items()
              if layer.weight.requires_grad and (criterion.needs is None or name in signals)}
    for name, layer in moving.items():  # every check before the first change
        check_finite(name, layer.weight.detach(), "weights")
        if name in signals:
            check_finite(name, signals[name], f"{criterion.needs} values")
    report = {}
    for name, layer in layers.items():
        if name not in moving:
            report[name] = LayerUpdate(active=layer.active_count, pruned=0, regrown=0)
            continue
        report[name] = update_layer(layer, prune_ratio, criterion, signals.get(name),
                                    _optimizers_of(layer, optimizer), generator, rule)
    return report


def _check_signals(masked_net: MaskedNet, signals: dict[str, torch.Tensor]) -> None:
    """Precomputed signals (gradients, momentum) need one entry, shaped like the weight, per trainable masked layer."""
    for name, layer in masked_net.masked_layers().items():
        if name not in signals and not layer.weight.requires_grad:
            continue  # frozen: left out of DST anyway
        if name not in signals:
            raise ValueError(f"signals has no entry for masked layer {name!r}; it needs one per layer: "
                             f"{list(masked_net.masked_layers())}")
        if signals[name].shape != layer.weight.shape:
            raise ValueError(f"signals[{name!r}] has shape {tuple(signals[name].shape)}, "
                             f"the layer's weight {tuple(layer.weight.shape)}")


def update_layer_counts(layer: MaskedLayer, prune_count: int, regrow_count: int,
                        regrow: str | RegrowCriterion = "random", signal: torch.Tensor | None = None,
                        optimizer: torch.optim.Optimizer | None = None,
                        generator: torch.Generator | None = None, regrow_pruned: bool = False) -> LayerUpdate:
    """Prune and regrow one unstructured layer with counts the caller chose, which may differ.

    The same rule as a DST step (``dst.engine.update_rule``'s choices: magnitude pruning among active
    weights, regrowth among positions inactive before the step, by ``regrow``'s score on ``signal``;
    moved weights and their optimizer state zeroed), for sparse momentum, which moves regrowth
    between layers. A layer with a structured pattern is refused: its groups must regrow what they lose.
    ``regrow_pruned``: regrowth may also pick the weights pruned now (``MoveRule.regrow_pruned``).
    """
    if not isinstance(layer.pattern, Unstructured):
        raise ValueError(f"per-layer counts that differ from a DST step's cannot keep pattern {layer.pattern.label!r} "
                         "(each group regrows what it prunes); this method works on unstructured masks only")
    active, numel = layer.active_count, layer.mask.numel()
    if not is_count(prune_count) or prune_count > active:
        raise ValueError(f"prune_count must be a whole number of weights in [0, {active}] for this layer "
                         f"({active} of {numel} active), got {prune_count!r}")
    free = numel - active + (prune_count if regrow_pruned else 0)
    if not is_count(regrow_count) or regrow_count > free:
        raise ValueError(f"regrow_count must be a whole number of weights in [0, {free}] for this layer "
                         f"({active} of {numel} active, {prune_count} pruned), got {regrow_count!r}")
    return _move(layer, prune_count, regrow_count, get_regrow(regrow), signal, _optimizers_of(layer, optimizer),
                 generator, MoveRule(regrow_pruned=regrow_pruned))


def prune_layer_to(layer: MaskedLayer, per_group: int, optimizer: torch.optim.Optimizer | None = None) -> LayerUpdate:
    """Prune ``layer`` by magnitude until each group of its pattern holds ``per_group`` active units (none regrow).

    Gradual pruning's step: the whole layer is one group when unstructured, each neuron under
    ``fan_in``; pruned weights and their optimizer state are zeroed.
    """
    pruned = torch.from_numpy(layer.pattern.prune_to(
        layer.mask_2d(), layer.weight.detach().reshape(layer.mask.shape[0], -1).abs().float().cpu().numpy(),
        per_group)).to(layer.mask.device)
    _apply(layer, pruned, pruned[:0], _optimizers_of(layer, optimizer))
    return LayerUpdate(active=layer.active_count, pruned=int(pruned.numel()), regrown=0)


def _optimizers_of(layer: MaskedLayer, optimizer: torch.optim.Optimizer | None) -> set:
    """Optimizers whose state at a layer's moved positions is reset: every one that stepped it, and ``optimizer``."""
    return optimizers_of(layer.weight) | ({optimizer} if optimizer is not None else set())
