"""A decade of sparse training by name: dense, static, SET, RigL, sparse momentum and gradual pruning.

Each method is a small frozen dataclass (its hyperparameters, with their papers'
defaults) that says two things: how the net starts (``build``: dense, or a random
sparse mask) and what changes it during training (``scheduler``: nothing, the
shared DST update on a schedule, or gradual pruning). ``METHODS`` maps the names
to their defaults; ``dataclasses.replace(METHODS["rigl"], every=20)`` tunes one.

Every sparse method ends with exactly the active counts ``MaskedNet`` gives the
same ``Target``: the DST methods keep them throughout (sparse momentum per net,
the others per layer), gradual pruning reaches them at its last pruning step.

Static, SET, RigL and GMP take a ``pattern`` (``dst.engine.patterns``: "fan_in", "2:4",
"block4x4", ...) that their masks keep at every step; ``srigl`` is RigL under constant
fan-in (SRigL, Lasby et al. ICLR 2024). Sparse momentum refuses a pattern: it moves
weights between layers, which no per-group count can hold.
"""

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from dst.core.checks import check_fraction, check_steps
from dst.engine.allocation import check_allocation, check_sparsity, layer_densities
from dst.engine.masked import MaskedNet
from dst.engine.patterns import Pattern, get_pattern
from dst.engine.prune_regrow import masked_scheduler
from dst.engine.schedule import SCHEDULES, DSTConfig, DSTScheduler
from dst.engine.update_rule import RegrowCriterion, check_prune_ratio, get_regrow
from dst.methods.gradual_pruning import GradualPruning
from dst.methods.sparse_momentum import SparseMomentumStep


@dataclass(frozen=True)
class Target:
    """The sparse net every method is compared at: same sparsity, same split over layers."""

    sparsity: float
    # ERK: uniform starves the small layers (at 99 % LeNet-300-100's output layer keeps 10 weights).
    allocation: str = "erk"
    # "first" and/or "last" (or layer names) kept dense, the others sparser to keep the same total.
    keep_dense: tuple[str, ...] = ()

    def __post_init__(self):
        check_sparsity(self.sparsity)
        check_allocation(self.allocation)
        object.__setattr__(self, "keep_dense", (self.keep_dense,) if isinstance(self.keep_dense, str)
                           else tuple(self.keep_dense))

    def densities(self, masked_net: MaskedNet) -> dict[str, float]:
        """Per-layer densities of this target for ``masked_net``'s layers."""
        shapes = {name: tuple(layer.weight.shape) for name, layer in masked_net.masked_layers().items()}
        return layer_densities(shapes, self.sparsity, self.allocation, self.keep_dense)


@dataclass(frozen=True)
class Method:
    """Base: a method builds the net it trains and, if it changes the mask, a scheduler."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # True where training holds every weight densely (memory is the dense net's, whatever the final sparsity).
    dense_training: ClassVar[bool] = False
    # True where every step computes the gradient of every weight, active or not (training FLOPs).
    dense_weight_gradient: ClassVar[bool] = False

    @property
    def gradient_per_update(self) -> bool:
        """True where each topology update computes one extra dense gradient on a batch (training FLOPs)."""
        regrow = getattr(self, "regrow", None)
        return regrow is not None and get_regrow(regrow).needs_gradient

    @property
    def label(self) -> str:
        """The name its results carry: the method's, plus a regrow criterion and a pattern that are not its own
        ("rigl+random", "set/2:4")."""
        label = self.name
        regrow = getattr(self, "regrow", None)
        if regrow is not None and regrow != _default(self, "regrow"):
            label += f"+{get_regrow(regrow).name}"
        pattern = getattr(self, "pattern", None)
        if pattern is not None and get_pattern(pattern) != get_pattern(_default(self, "pattern")):
            label += f"/{get_pattern(pattern).label}"
        return label

    def build(self, base_net: nn.Module, target: Target, generator: torch.Generator | None = None) -> nn.Module:
        """A random sparse mask at ``target`` (in the method's pattern) over a copy of ``base_net``."""
        return MaskedNet(base_net, target.sparsity, target.allocation, generator=generator,
                         keep_dense=target.keep_dense, pattern=getattr(self, "pattern", "unstructured"))

    def scheduler(self, model: nn.Module, target: Target, optimizer: torch.optim.Optimizer, total_steps: int,
                  steps_per_epoch: int, generator: torch.Generator | None = None):
        """What changes the mask during training (``after_step(batch)`` after each step), or None."""
        return None

    def close(self, scheduler) -> None:
        """Release what the scheduler holds once training is over."""


@dataclass(frozen=True)
class Dense(Method):
    name: ClassVar[str] = "dense"
    summary: ClassVar[str] = "Every weight, trained as usual: the accuracy every sparse method aims for."
    dense_training: ClassVar[bool] = True

    def build(self, base_net, target, generator=None):
        return copy.deepcopy(base_net)


@dataclass(frozen=True)
class Static(Method):
    name: ClassVar[str] = "static"
    summary: ClassVar[str] = ("A random sparse mask that never changes: the control every DST paper needs "
                              "(same weights, no topology search).")
    pattern: str | Pattern = "unstructured"  # the mask's sparsity pattern (dst.engine.patterns)

    def __post_init__(self):
        _check_pattern("static", self.pattern)


@dataclass(frozen=True)
class SET(Method):
    name: ClassVar[str] = "set"
    summary: ClassVar[str] = ("SET (Mocanu et al. 2018): once an epoch, prune the smallest 30 % of each layer's "
                              "weights and regrow as many at random positions.")
    prune_ratio: float = 0.3  # zeta in the SET paper
    updates_per_epoch: int = 1  # SET updates at the end of each epoch
    # SET's zeta is constant; sparse_learning's SET (the published MNIST numbers) decays 0.5 by a cosine.
    schedule: str = "constant"
    # SET regrows at random; another criterion (a name of REGROW or a RegrowCriterion) makes a variant,
    # whose rows carry the label "set+<criterion>".
    regrow: str | RegrowCriterion = "random"
    pattern: str | Pattern = "unstructured"  # kept at every update: pruned and regrown within its groups

    def __post_init__(self):
        _check_ratio("set", self.prune_ratio)
        _check_pattern("set", self.pattern)
        get_regrow(self.regrow)
        check_steps("set.updates_per_epoch", self.updates_per_epoch)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"set.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")

    def scheduler(self, model, target, optimizer, total_steps, steps_per_epoch, generator=None):
        # end one step before the last: an update after the last step would only remove trained weights.
        config = DSTConfig(prune_ratio=self.prune_ratio, regrow=self.regrow, schedule=self.schedule, every=max(
            1, steps_per_epoch // self.updates_per_epoch), unit="step", end=max(1, total_steps - 1))
        return masked_scheduler(model, config, optimizer=optimizer, generator=generator)


@dataclass(frozen=True)
class RigL(Method):
    name: ClassVar[str] = "rigl"
    summary: ClassVar[str] = ("RigL (Evci et al. 2020): every 100 steps, regrow where the dense gradient is "
                              "largest; the fraction moved decays (cosine) and updates stop at 75 % of training.")
    prune_ratio: float = 0.3  # alpha, the initial fraction moved
    every: int = 100  # Delta T, steps between updates
    end_fraction: float = 0.75  # no updates in the last quarter: the final mask is fine-tuned
    # RigL regrows by the dense gradient; another criterion makes a variant labelled "rigl+<criterion>".
    regrow: str | RegrowCriterion = "gradient"
    pattern: str | Pattern = "unstructured"  # kept at every update: pruned and regrown within its groups

    def __post_init__(self):
        _check_ratio(self.name, self.prune_ratio)
        _check_pattern(self.name, self.pattern)
        get_regrow(self.regrow)
        check_steps(f"{self.name}.every", self.every)
        check_fraction(f"{self.name}.end_fraction (of training, where updates stop)", self.end_fraction,
                       include_low=False)

    def scheduler(self, model, target, optimizer, total_steps, steps_per_epoch, generator=None):
        config = DSTConfig(prune_ratio=self.prune_ratio, regrow=self.regrow, schedule="cosine", every=self.every,
                           unit="step", end=max(1, int(self.end_fraction * total_steps)))
        return masked_scheduler(model, config, optimizer=optimizer, generator=generator)


@dataclass(frozen=True)
class SRigL(RigL):
    """RigL under constant fan-in: its drop is layer-wide by magnitude and each neuron regrows what it lost.

    As ``RigLConstFanScheduler._rigl_step`` in calgaryml/condensed-sparsity. Not included: SRigL's
    dynamic neuron ablation (a neuron with too few salient weights is switched off and the others'
    fan-in raised). It changes a layer's fan-in during training, where this project keeps ``k``
    fixed from the first mask so a layer's condensed (out, k) shape is known before training; the
    paper applies it mainly at 90 %+ sparsity on wide vision models.
    """

    name: ClassVar[str] = "srigl"
    summary: ClassVar[str] = ("SRigL (Lasby et al. 2024): RigL under constant fan-in, every neuron keeps the same "
                              "number of inputs, so a layer is a dense (out, k) array: fast on a CPU.")
    pattern: str | Pattern = "fan_in"

    def __post_init__(self):
        super().__post_init__()
        if get_pattern(self.pattern).kind != "fan_in":
            raise ValueError(f"srigl is RigL under constant fan-in; got pattern={self.pattern!r}. For another "
                             "pattern use rigl with pattern=...")


@dataclass(frozen=True)
class SNFS(Method):
    name: ClassVar[str] = "snfs"
    summary: ClassVar[str] = ("Sparse momentum (Dettmers & Zettlemoyer 2019): regrow where the gradient's momentum "
                              "is largest, and give layers whose momentum is larger more of the regrown weights.")
    dense_weight_gradient: ClassVar[bool] = True
    prune_ratio: float = 0.5  # sparse_learning's death rate, cosine-decayed over training
    momentum: float = 0.9  # the decay of the gradient average (SGD's momentum in the paper)
    # Only unstructured: SNFS moves weights between layers, which no per-group count can hold.
    pattern: str | Pattern = "unstructured"

    def __post_init__(self):
        _check_ratio("snfs", self.prune_ratio)
        _check_pattern("snfs", self.pattern)
        if get_pattern(self.pattern).kind != "unstructured":
            raise ValueError(f"snfs moves regrown weights between layers, so a layer's count changes, which "
                             f"pattern {get_pattern(self.pattern).label!r} cannot hold; snfs takes "
                             "pattern='unstructured' only (SET, RigL and srigl keep a pattern)")
        check_fraction("snfs.momentum (the decay of the gradient average)", self.momentum)
        if self.momentum == 1.0:
            raise ValueError("snfs.momentum must be below 1 (at 1 the average never forgets), got 1.0")

    def scheduler(self, model, target, optimizer, total_steps, steps_per_epoch, generator=None):
        # The config's regrow is left at its default and unused: the step regrows by momentum (and needs no batch).
        config = DSTConfig(prune_ratio=self.prune_ratio, schedule="cosine", every=steps_per_epoch, unit="step",
                           end=total_steps)
        return DSTScheduler(config, SparseMomentumStep(model, self.momentum, optimizer))

    def close(self, scheduler) -> None:
        scheduler.close()


@dataclass(frozen=True)
class GMP(Method):
    name: ClassVar[str] = "gmp"
    summary: ClassVar[str] = ("Gradual magnitude pruning (Zhu & Gupta 2017): start dense, prune the smallest "
                              "weights on a cubic schedule to the target; dense memory during training.")
    dense_training: ClassVar[bool] = True
    every: int = 100  # steps between prunings
    start_fraction: float = 0.1  # dense first, so magnitudes mean something when pruning starts
    end_fraction: float = 0.75  # target reached where RigL stops: both fine-tune the last quarter
    pattern: str | Pattern = "unstructured"  # pruned within its groups, so it holds at every pruning

    def __post_init__(self):
        check_steps("gmp.every", self.every)
        _check_pattern("gmp", self.pattern)
        check_fraction("gmp.start_fraction (of training)", self.start_fraction)
        check_fraction("gmp.end_fraction (of training)", self.end_fraction)
        if not self.start_fraction < self.end_fraction:
            raise ValueError(f"gmp needs start_fraction < end_fraction (prune between them), got "
                             f"{self.start_fraction} and {self.end_fraction}")

    def build(self, base_net, target, generator=None):
        # Every weight active: no sparse fan-in scaling, the dense net's own init.
        return MaskedNet(base_net, 0.0, target.allocation, generator=generator)

    def scheduler(self, model, target, optimizer, total_steps, steps_per_epoch, generator=None):
        start = int(self.start_fraction * total_steps)
        end = max(start + 1, int(self.end_fraction * total_steps))
        return GradualPruning(model, target.densities(model), start=start, end=end, every=self.every,
                              optimizer=optimizer, pattern=self.pattern)


def _default(method: Method, field_name: str):
    """The default of one of ``method``'s fields (its own setting, which its label leaves out)."""
    return type(method).__dataclass_fields__[field_name].default


def _check_pattern(method: str, pattern) -> None:
    try:
        get_pattern(pattern)
    except ValueError as error:
        raise ValueError(f"{method}.pattern: {error}") from None


def _check_ratio(method: str, prune_ratio) -> None:
    try:
        check_prune_ratio(prune_ratio)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{method}.{error}") from None


METHODS: dict[str, Method] = {method.name: method for method in (Dense(), Static(), SET(), RigL(), SRigL(), SNFS(),
                                                                   GMP())}


def get_method(method: str | Method) -> Method:
    """The method of that name with its defaults (a ``Method`` passes through)."""
    if isinstance(method, Method):
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    return METHODS[method]
