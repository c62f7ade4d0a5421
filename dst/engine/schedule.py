"""When DST updates happen and how much they move: the config and a small scheduler."""

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dst.core.checks import is_positive_int
from dst.core.training import Batch
from dst.engine.topology_update import TopologyUpdate
from dst.engine.update_rule import PROJECT_RULE, LayerUpdate, MoveRule, RegrowCriterion, check_prune_ratio, get_regrow

SCHEDULES = ("constant", "cosine")
UNITS = ("epoch", "step")


@dataclass(frozen=True)
class DSTConfig:
    """Hyperparameters of the topology updates, validated on construction."""

    # Fraction of each layer's active weights moved per update. 0.1 is the seed's;
    # RigL uses 0.3 and lets the cosine schedule decay it.
    prune_ratio: float = 0.1
    # A criterion of dst.engine.update_rule.REGROW: "random" (SET) or "gradient" (RigL), or a RegrowCriterion of
    # your own. Every criterion keeps the active count.
    regrow: str | RegrowCriterion = "random"
    # "constant" (the seed) or "cosine": ratio * (1 + cos(pi * t / end)) / 2, zero from `end` on,
    # so the topology settles before training ends (RigL stops updating at 75% of training).
    schedule: str = "constant"
    # An update every `every` units; the seed updates every 2 epochs.
    every: int = 2
    unit: str = "epoch"
    # Last unit (epoch or optimizer step count) at which updates may happen; None = never stop.
    end: int | None = None
    # The step's details where the reference implementations differ (rounding, regrowth of just-pruned weights,
    # SET's sign split): this project's choices by default; dst.methods sets each method's reference ones.
    rule: MoveRule = PROJECT_RULE
    # The cosine's floor: ratio_min + (prune_ratio - ratio_min) * (1 + cos(pi * t / end)) / 2, as torch's
    # CosineAnnealingLR with eta_min (sparse_learning decays its prune rate to 0.005). 0 for the plain cosine.
    ratio_min: float = 0.0

    def __post_init__(self):
        check_prune_ratio(self.prune_ratio)
        get_regrow(self.regrow)
        if not isinstance(self.rule, MoveRule):
            raise TypeError(f"rule must be a dst.engine.update_rule.MoveRule, got {type(self.rule).__name__}")
        try:
            check_prune_ratio(self.ratio_min)
        except (TypeError, ValueError):
            raise ValueError(f"ratio_min is the cosine schedule's floor, a number in [0, prune_ratio="
                             f"{self.prune_ratio}]; got {self.ratio_min!r}") from None
        if self.ratio_min and (self.schedule != "cosine" or self.ratio_min > self.prune_ratio):
            raise ValueError(f"ratio_min is the cosine schedule's floor, in [0, prune_ratio={self.prune_ratio}]; "
                             f"got ratio_min={self.ratio_min} with schedule={self.schedule!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {list(SCHEDULES)}")
        if self.unit not in UNITS:
            raise ValueError(f"unknown unit {self.unit!r}; choose one of {list(UNITS)}")
        if not is_positive_int(self.every):
            raise ValueError(f"every must be a positive int (units between updates), got {self.every!r}")
        if self.end is not None and not is_positive_int(self.end):
            raise ValueError(f"end must be None or a positive int (the last epoch or step with an update), "
                             f"got {self.end!r}")
        # Plain ints from here on (a numpy integer would otherwise leak into results JSON and reprs).
        object.__setattr__(self, "every", int(self.every))
        object.__setattr__(self, "end", None if self.end is None else int(self.end))
        if self.schedule == "cosine" and self.end is None:
            raise ValueError("schedule='cosine' needs end= (the epoch or step where the ratio reaches 0)")

    def prune_ratio_at(self, t: int) -> float:
        """Prune ratio for an update at unit ``t`` (epochs or steps counted from 1)."""
        if self.end is not None and t > self.end:
            return 0.0
        if self.schedule == "cosine":
            decayed = 0.5 * (1.0 + math.cos(math.pi * t / self.end))
            return self.ratio_min + (self.prune_ratio - self.ratio_min) * decayed
        return self.prune_ratio

    def is_update(self, t: int) -> bool:
        """Whether an update is due after unit ``t`` (counted from 1)."""
        return t % self.every == 0 and self.prune_ratio_at(t) > 0.0

    def updates_within(self, total: int) -> list[int]:
        """The units (1 to ``total``) after which an update will happen: empty means DST never runs."""
        return [t for t in range(1, total + 1) if self.is_update(t)]


@dataclass
class DSTEvent:
    """One update that happened: when, how much, and the per-layer report."""

    unit: str
    t: int
    prune_ratio: float
    layers: dict[str, LayerUpdate]


@dataclass
class DSTScheduler:
    """Calls ``update`` when ``config`` says an update is due, with the prune ratio of that moment.

    ``update`` is a ``TopologyUpdate`` built for one model on either engine: a MaskedNet's
    ``dst.engine.prune_regrow.MaskedDSTStep`` (``masked_scheduler`` builds both for the common
    case), ``dst.engine.distributed.DistributedDSTStep``, a ``SparseMLP``'s
    ``dst.csr.mlp.SparseMLPStep``, ``dst.methods.sparse_momentum.SparseMomentumStep``, or your
    own. Call ``after_step(batch)`` after every optimizer step (``train_epoch`` does when given
    ``dst=``) and ``after_epoch(loader)`` after every epoch; only the calls matching
    ``config.unit`` count. Each returns the ``DSTEvent`` it applied, or None. All events are
    kept in ``history``. ``close()`` closes the update once training is over.
    """

    config: DSTConfig
    update: TopologyUpdate
    history: list[DSTEvent] = field(default_factory=list)
    steps: int = 0
    epochs: int = 0

    def __post_init__(self):
        if not isinstance(self.config, DSTConfig):
            raise TypeError(f"DSTScheduler(config, update) takes a DSTConfig first, got "
                            f"{type(self.config).__name__}; for a MaskedNet, "
                            "dst.masked_scheduler(masked_net, config, optimizer=...) builds both")
        if not isinstance(self.update, TopologyUpdate):
            raise TypeError(f"update must be a TopologyUpdate (needs_batch, __call__(prune_ratio, batch), close()), "
                            f"got {type(self.update).__name__}")
        own_rule = getattr(self.update, "rule", PROJECT_RULE)  # a step without one takes the default rule
        if own_rule != self.config.rule:
            step = type(self.update).__name__ + ("" if hasattr(self.update, "rule") else ", which has no other")
            raise ValueError(f"config.rule is {self.config.rule} but the update applies {own_rule} ({step}); "
                             "give one rule (masked_scheduler builds the step from the config)")
        own = getattr(self.update, "regrow", None)  # the engines' steps carry their criterion; both must agree
        if own is not None and get_regrow(own) is not get_regrow(self.config.regrow):
            raise ValueError(f"the update regrows by {get_regrow(own).name!r} but config.regrow is "
                             f"{get_regrow(self.config.regrow).name!r}: give one criterion (masked_scheduler builds "
                             "the step from the config)")

    def after_step(self, batch: Batch | None = None) -> DSTEvent | None:
        """Count one optimizer step; update if step-based updates are due (RigL takes its gradient on ``batch``).

        ``batch`` may be left out where the update needs none (``update.needs_batch`` is False).
        """
        self.steps += 1
        if self.config.unit != "step":
            return None
        return self._maybe_update(self.steps, lambda: batch)

    def update_after_next_step(self) -> bool:
        """Whether the next ``after_step`` will update (rigl skips that step's weight update: ``dst.methods.RigL``)."""
        return self.config.unit == "step" and self.config.is_update(self.steps + 1)

    def after_epoch(self, loader: Iterable[Batch] | None = None) -> DSTEvent | None:
        """Count one epoch; update if epoch-based updates are due (RigL draws one batch from ``loader``).

        ``loader`` may be left out where the update needs no batch (``update.needs_batch`` is False).
        """
        self.epochs += 1
        if self.config.unit != "epoch":
            return None
        return self._maybe_update(self.epochs, lambda: _first_batch(loader))

    def close(self) -> None:
        """Close the update (a sparse momentum step removes its hooks); call once training is over."""
        self.update.close()

    def _maybe_update(self, t: int, get_batch: Callable[[], Batch]) -> DSTEvent | None:
        if not self.config.is_update(t):
            return None
        ratio = self.config.prune_ratio_at(t)
        layers = self.update(ratio, get_batch() if self.update.needs_batch else None)
        event = DSTEvent(unit=self.config.unit, t=t, prune_ratio=ratio, layers=layers)
        self.history.append(event)
        return event


def _first_batch(loader: Iterable[Batch] | None) -> Batch:
    batch = None if loader is None else next(iter(loader), None)
    if batch is None:
        raise ValueError("a regrow criterion that needs gradients (RigL) draws one batch from the loader given to "
                         "after_epoch, but it was given none or that loader yielded none")
    return batch
