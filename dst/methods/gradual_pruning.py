"""Gradual magnitude pruning (GMP, Zhu & Gupta 2017): from dense to the target sparsity while training.

The reference that DST is measured against: it reaches the same sparse net, but
trains dense first, so its memory (and, early on, its compute) during training
is that of the dense net. Every ``every`` steps from ``start`` to ``end`` each
layer is pruned by magnitude to the density of the cubic schedule

    density(t) = final + (1 - final) * (1 - (t - start) / (end - start)) ** 3,

Zhu & Gupta's ``s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3`` with ``s_i = 0``, written
in densities so that at ``end`` it is ``final`` exactly: every layer then holds
``active_count(numel, final)`` weights, the count a sparse method starts with.
Pruned weights never come back; the steps after ``end`` fine-tune the sparse net.

``GradualPruning`` is its own scheduler (``after_step``/``after_epoch``/``history``), not a
``dst.engine.topology_update.TopologyUpdate`` driven by ``DSTScheduler``: it sets each layer's
count from its cubic schedule, where a topology update moves a ratio that ``DSTConfig`` chose.
"""

import numbers
from dataclasses import dataclass, field

import torch

from dst.engine.allocation import active_count
from dst.engine.masked import MaskedNet
from dst.engine.prune_regrow import update_layer_counts
from dst.engine.schedule import DSTEvent


def cubic_density(t: int, final: float, start: int, end: int) -> float:
    """Zhu & Gupta's density at step ``t``: 1 before ``start``, ``final`` from ``end`` on, cubic between."""
    if t <= start:
        return 1.0
    if t >= end:
        return final
    return final + (1.0 - final) * (1.0 - (t - start) / (end - start)) ** 3


@dataclass
class GradualPruning:
    """Prunes ``masked_net`` (built dense: sparsity 0) to ``final_densities`` on the cubic schedule.

    Used like ``DSTScheduler``: call ``after_step(batch)`` after every optimizer step;
    each pruning is recorded in ``history``.
    """

    masked_net: MaskedNet
    final_densities: dict[str, float]
    start: int
    end: int
    every: int = 100
    optimizer: torch.optim.Optimizer | None = None
    history: list[DSTEvent] = field(default_factory=list)
    steps: int = 0

    def __post_init__(self):
        layers = self.masked_net.masked_layers()
        if set(self.final_densities) != set(layers):
            raise ValueError(f"final_densities must name every masked layer {list(layers)}, "
                             f"got {list(self.final_densities)}")
        bad = {name: density for name, density in self.final_densities.items()
               if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 < density <= 1}
        if bad:  # NaN fails the comparison too
            raise ValueError(f"final_densities must be fractions of weights kept, in (0, 1], got {bad}")
        if not 0 <= self.start < self.end:
            raise ValueError(f"need 0 <= start < end (steps), got start={self.start}, end={self.end}")
        if self.every < 1:
            raise ValueError(f"every must be a positive number of steps, got {self.every}")

    def is_pruning_step(self, t: int) -> bool:
        """Whether the schedule prunes after step ``t``: every ``every`` steps after ``start``, and at ``end``."""
        return t == self.end or (self.start < t < self.end and (t - self.start) % self.every == 0)

    def target_counts(self, t: int) -> dict[str, int]:
        """Active weights each layer should hold after step ``t``."""
        return {name: active_count(layer.mask.numel(), cubic_density(t, self.final_densities[name],
                                                                     self.start, self.end))
                for name, layer in self.masked_net.masked_layers().items()}

    def after_step(self, batch=None) -> DSTEvent | None:
        """Count one optimizer step; prune if the schedule says so."""
        self.steps += 1
        if not self.is_pruning_step(self.steps):
            return None
        layers = self.masked_net.masked_layers()
        before = sum(layer.active_count for layer in layers.values())
        report = {}
        for name, target in self.target_counts(self.steps).items():
            prune = max(0, layers[name].active_count - target)
            report[name] = update_layer_counts(layers[name], prune, 0, optimizer=self.optimizer)
        # prune_ratio as in a DST step: the fraction of the active weights this pruning removed.
        ratio = sum(update.pruned for update in report.values()) / before
        event = DSTEvent(unit="step", t=self.steps, prune_ratio=ratio, layers=report)
        self.history.append(event)
        return event

    def after_epoch(self, loader=None) -> None:
        """Nothing happens per epoch (the schedule counts steps)."""
        return None

