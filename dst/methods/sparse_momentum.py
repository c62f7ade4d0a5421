"""Sparse momentum (SNFS, Dettmers & Zettlemoyer 2019): regrow where the gradient's momentum is largest.

Each update, every layer prunes ``round(ratio * active)`` of its smallest active
weights, as in any DST step. The regrowth differs twice:

- *where*: at the inactive positions whose momentum (an exponential average of
  the dense gradient) is largest in magnitude, a smoothed RigL;
- *how many*: the total pruned over the whole net is shared out again across
  layers in proportion to each layer's mean momentum magnitude over its active
  weights, so layers whose weights are still moving get more of them. The
  global active count stays exactly constant; a layer's count may change.

The momentum of an *inactive* weight needs the loss gradient at a position whose
weight does not exist: ``dst.engine.momentum.MomentumTracker`` keeps it (the module
says how), at the cost of a dense weight gradient every step, which training FLOPs
count (``dst.methods.sweep``).
"""

import math
from collections.abc import Mapping

import torch

from dst.engine.distributed import check_ranks_agree
from dst.engine.masked import MaskedNet
from dst.engine.momentum import MomentumTracker, average_over_ranks
from dst.engine.optimizer_state import optimizers_of
from dst.engine.patterns.unstructured import Unstructured
from dst.engine.process_group import is_distributed
from dst.engine.prune_regrow import LayerUpdate, check_finite, update_layer_counts
from dst.engine.update_rule import PROJECT_RULE, MoveRule


def check_unstructured(masked_net: MaskedNet) -> None:
    """Raise unless every layer is unstructured: moving regrowth between layers changes a layer's count, which no
    structured pattern can hold (its groups each keep a fixed number)."""
    structured = {name: layer.pattern.label for name, layer in masked_net.masked_layers().items()
                  if not isinstance(layer.pattern, Unstructured)}
    if structured:
        raise ValueError(f"sparse momentum moves weights between layers, so a layer's count changes, which the "
                         f"structured patterns of {structured} cannot hold; use it on unstructured masks, or "
                         "SET/RigL (one count per layer) for a pattern")


def redistribute(total: int, shares: Mapping[str, float], capacity: Mapping[str, int]) -> dict[str, int]:
    """Split ``total`` over layers in proportion to ``shares``, none above its ``capacity``; sums to ``total``.

    Rounding gives the leftover units to the largest remainders; a layer that would
    exceed its capacity is capped and its excess shared over the others again. Layers
    whose shares are all zero (or not finite) share equally.
    """
    if total > sum(capacity.values()):
        raise ValueError(f"cannot place {total} regrown weights in {sum(capacity.values())} free positions")
    counts = dict.fromkeys(capacity, 0)
    remaining = total
    while remaining > 0:
        open_layers = [name for name in capacity if counts[name] < capacity[name]]
        weights = {name: shares[name] if math.isfinite(shares[name]) and shares[name] > 0 else 0.0
                   for name in open_layers}
        largest = max(weights.values())
        # Divided by the largest share first: a tiny (subnormal) total would make the scale overflow.
        weights = {name: weight / largest for name, weight in weights.items()} if largest > 0 else dict.fromkeys(
            open_layers, 1.0)
        scale = remaining / sum(weights.values())
        ideal = {name: weight * scale for name, weight in weights.items()}
        share = {name: math.floor(value) for name, value in ideal.items()}
        by_remainder = sorted(open_layers, key=lambda name: share[name] - ideal[name])
        for name in by_remainder[:remaining - sum(share.values())]:
            share[name] += 1
        for name in open_layers:
            counts[name] += min(share[name], capacity[name] - counts[name])
        remaining = total - sum(counts.values())
    return counts


def sparse_momentum_step(masked_net: MaskedNet, tracker: MomentumTracker, prune_ratio: float,
                         optimizer: torch.optim.Optimizer | None = None, rule: MoveRule = PROJECT_RULE,
                         regrown_momentum: bool = False) -> dict[str, LayerUpdate]:
    """One sparse momentum update: magnitude pruning per layer, momentum regrowth redistributed across layers.

    A layer prunes ``min(prune_ratio * active rounded by rule.rounding, inactive, active - 1)`` (it never
    empties, and never prunes more than the whole net could regrow among the positions
    inactive before the step). Regrowth is among the positions inactive before the step, or, with
    ``rule.regrow_pruned``, after pruning (sparse_learning's). ``regrown_momentum``: each regrown weight's
    SGD momentum buffer takes the momentum its position accumulated (sparse_learning's buffer covers every
    position); otherwise it starts at zero. Frozen layers are left alone.
    """
    layers = tracker.layers
    if is_distributed():
        # Each rank's tracker saw its own batches' gradients (hooks run before DDP averages them). Their mean
        # is the momentum of the averaged gradients (the average is linear), and every rank then ranks alike.
        average_over_ranks(tracker)
    for name, layer in layers.items():
        check_finite(name, layer.weight.detach(), "weights")
        check_finite(name, tracker.momentum[name], "momentum")
    active = {name: layer.active_count for name, layer in layers.items()}
    inactive = {name: layer.mask.numel() - active[name] for name, layer in layers.items()}
    if rule.sign_split:
        raise ValueError("sparse momentum prunes by |w| per layer; rule.sign_split (SET's) does not apply to it")
    prune = {name: max(0, min(rule.count(prune_ratio, active[name]), inactive[name], active[name] - 1))
             for name in layers}
    # Mean |momentum| over the weights active before the step, as sparse_learning gathers it.
    shares = {name: float(tracker.momentum[name][layer.mask].abs().mean()) if active[name] else 0.0
              for name, layer in layers.items()}
    free = {name: inactive[name] + (prune[name] if rule.regrow_pruned else 0) for name in layers}
    regrow = redistribute(sum(prune.values()), shares, free)
    report = {name: LayerUpdate(active=layer.active_count, pruned=0, regrown=0)
              for name, layer in masked_net.masked_layers().items()}
    for name, layer in layers.items():
        before = layer.mask.clone() if regrown_momentum else None
        report[name] = update_layer_counts(layer, prune[name], regrow[name], "momentum", tracker.momentum[name],
                                           optimizer=optimizer, regrow_pruned=rule.regrow_pruned)
        if regrown_momentum:
            _give_momentum(layer, layer.mask & ~before, tracker.momentum[name], optimizer)
    if is_distributed():
        check_ranks_agree(masked_net)
    return report


def _give_momentum(layer, regrown: torch.Tensor, momentum: torch.Tensor, optimizer) -> None:
    """Set the SGD momentum buffer of ``layer``'s weight at ``regrown`` (bool, weight-shaped) to ``momentum`` there."""
    for each in optimizers_of(layer.weight) | ({optimizer} if optimizer is not None else set()):
        buffer = each.state.get(layer.weight, {}).get("momentum_buffer")
        if buffer is not None:
            with torch.no_grad():
                buffer[regrown] = momentum[regrown].to(buffer.dtype)


def check_momentum_optimizer(optimizer) -> None:
    """Raise unless ``optimizer`` is SGD with momentum: the only one whose buffer ``regrown_momentum`` can set."""
    if not (isinstance(optimizer, torch.optim.SGD) and all(group["momentum"] > 0 for group in optimizer.param_groups)):
        raise ValueError(f"regrown_momentum=True gives regrown weights their position's momentum in SGD's momentum "
                         f"buffer (as sparse_learning does); it needs torch.optim.SGD with momentum > 0, got "
                         f"{type(optimizer).__name__}. Use regrown_momentum=False (zero state) with other optimizers")


class SparseMomentumStep:
    """``sparse_momentum_step`` as a ``TopologyUpdate`` for ``DSTScheduler``: the scheduler decides when and how much.

    The momentum, not a batch's gradient or chance, decides regrowth, so no batch is asked for.
    ``close()`` removes the tracker's hooks.
    """

    needs_batch = False

    def __init__(self, masked_net: MaskedNet, beta: float = 0.9, optimizer: torch.optim.Optimizer | None = None,
                 rule: MoveRule = PROJECT_RULE, regrown_momentum: bool = False):
        check_unstructured(masked_net)
        if not isinstance(rule, MoveRule):
            raise TypeError(f"rule must be a dst.engine.update_rule.MoveRule, got {type(rule).__name__}")
        if rule.sign_split:
            raise ValueError("sparse momentum prunes by |w| per layer; rule.sign_split (SET's) does not apply to it")
        if regrown_momentum:
            check_momentum_optimizer(optimizer)
        self.masked_net, self.optimizer, self.rule = masked_net, optimizer, rule
        self.regrown_momentum = regrown_momentum
        self.tracker = MomentumTracker(masked_net, beta)

    def __call__(self, prune_ratio: float, batch=None) -> dict[str, LayerUpdate]:
        return sparse_momentum_step(self.masked_net, self.tracker, prune_ratio, self.optimizer, self.rule,
                                    self.regrown_momentum)

    def close(self) -> None:
        """Stop tracking (see ``MomentumTracker.close``)."""
        self.tracker.close()
