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
from dst.engine.patterns.unstructured import Unstructured
from dst.engine.process_group import is_distributed
from dst.engine.prune_regrow import LayerUpdate, check_finite, update_layer_counts


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
                         optimizer: torch.optim.Optimizer | None = None) -> dict[str, LayerUpdate]:
    """One sparse momentum update: magnitude pruning per layer, momentum regrowth redistributed across layers.

    A layer prunes ``min(round(prune_ratio * active), inactive, active - 1)`` (it never
    empties, and never prunes more than the whole net could regrow among the positions
    inactive before the step). Frozen layers are left alone.
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
    prune = {name: max(0, min(round(prune_ratio * active[name]), inactive[name], active[name] - 1))
             for name in layers}
    # Mean |momentum| over the weights active before the step, as sparse_learning gathers it.
    shares = {name: float(tracker.momentum[name][layer.mask].abs().mean()) if active[name] else 0.0
              for name, layer in layers.items()}
    regrow = redistribute(sum(prune.values()), shares, inactive)
    report = {name: LayerUpdate(active=layer.active_count, pruned=0, regrown=0)
              for name, layer in masked_net.masked_layers().items()}
    for name, layer in layers.items():
        report[name] = update_layer_counts(layer, prune[name], regrow[name], "momentum", tracker.momentum[name],
                                           optimizer=optimizer)
    if is_distributed():
        check_ranks_agree(masked_net)
    return report


class SparseMomentumStep:
    """``sparse_momentum_step`` as a ``TopologyUpdate`` for ``DSTScheduler``: the scheduler decides when and how much.

    The momentum, not a batch's gradient or chance, decides regrowth, so no batch is asked for.
    ``close()`` removes the tracker's hooks.
    """

    needs_batch = False

    def __init__(self, masked_net: MaskedNet, beta: float = 0.9, optimizer: torch.optim.Optimizer | None = None):
        check_unstructured(masked_net)
        self.masked_net, self.optimizer = masked_net, optimizer
        self.tracker = MomentumTracker(masked_net, beta)

    def __call__(self, prune_ratio: float, batch=None) -> dict[str, LayerUpdate]:
        return sparse_momentum_step(self.masked_net, self.tracker, prune_ratio, self.optimizer)

    def close(self) -> None:
        """Stop tracking (see ``MomentumTracker.close``)."""
        self.tracker.close()
