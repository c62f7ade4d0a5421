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
Under a structured ``pattern`` (``dst.engine.patterns``) each group is pruned to the
schedule's share of its units, so the pattern holds at every pruning step and at ``end``
every group holds what ``MaskedNet`` would give it at ``final``.

``GradualPruning`` is its own scheduler (``after_step``/``after_epoch``/``history``), not a
``dst.engine.topology_update.TopologyUpdate`` driven by ``DSTScheduler``: it sets each layer's
count from its cubic schedule, where a topology update moves a ratio that ``DSTConfig`` chose.
"""

import numbers
from dataclasses import dataclass, field

import torch

from dst.engine.masked import MaskedNet
from dst.engine.patterns import Pattern, get_pattern
from dst.engine.patterns.unstructured import Unstructured
from dst.engine.prune_regrow import prune_layer_to
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
    # The pattern every layer pruned below density 1 follows (set on those layers here).
    pattern: str | Pattern = "unstructured"
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
        self.pattern = get_pattern(self.pattern)
        unpruned = [name for name, layer in layers.items() if layer.active_count != layer.mask.numel()]
        if unpruned:
            raise ValueError(f"gradual pruning starts from a dense net (MaskedNet(..., sparsity=0)); layers "
                             f"{unpruned} are sparse already")
        for name, layer in layers.items():  # every layer checked before any changes
            if self.final_densities[name] < 1.0:
                try:
                    self.pattern.active_count(layer.matrix_shape, self.final_densities[name])
                except ValueError as error:
                    raise ValueError(f"layer {name!r} cannot be pruned to pattern {self.pattern.label!r}: "
                                     f"{error}") from None
        for name, layer in layers.items():
            layer.pattern = self.pattern if self.final_densities[name] < 1.0 else Unstructured()

    def is_pruning_step(self, t: int) -> bool:
        """Whether the schedule prunes after step ``t``: every ``every`` steps after ``start``, and at ``end``."""
        return t == self.end or (self.start < t < self.end and (t - self.start) % self.every == 0)

    def target_counts(self, t: int) -> dict[str, int]:
        """Active units each group of each layer should hold after step ``t`` (weights, when unstructured)."""
        targets = {}
        for name, layer in self.masked_net.masked_layers().items():
            final = self.final_densities[name]
            grid = layer.pattern.grid(layer.matrix_shape)
            length = layer.pattern.group_length(grid)
            density = cubic_density(t, final, self.start, self.end)
            targets[name] = max(layer.pattern.active_per_group(grid, final), min(length, round(density * length)))
        return targets

    def after_step(self, batch=None) -> DSTEvent | None:
        """Count one optimizer step; prune if the schedule says so."""
        self.steps += 1
        if not self.is_pruning_step(self.steps):
            return None
        layers = self.masked_net.masked_layers()
        before = sum(layer.active_count for layer in layers.values())
        report = {}
        for name, target in self.target_counts(self.steps).items():
            report[name] = prune_layer_to(layers[name], target, optimizer=self.optimizer)
        # prune_ratio as in a DST step: the fraction of the active weights this pruning removed.
        ratio = sum(update.pruned for update in report.values()) / before
        event = DSTEvent(unit="step", t=self.steps, prune_ratio=ratio, layers=report)
        self.history.append(event)
        return event

    def after_epoch(self, loader=None) -> None:
        """Nothing happens per epoch (the schedule counts steps)."""
        return None

