"""A decade of sparse training by name: dense, static, SET, RigL, sparse momentum and gradual pruning.

Each method is a small frozen dataclass (its hyperparameters, with their papers'
defaults) that says two things: how the net starts (``build``: dense, or a random
sparse mask) and what changes it during training (``scheduler``: nothing, the
shared DST update on a schedule, or gradual pruning). ``METHODS`` maps the names
to their defaults; ``dataclasses.replace(METHODS["rigl"], every=20)`` tunes one.

By default each method runs as its reference code does, on the points where the
references differ from this project's own DST step (each class's docstring cites the
reference file and function): how the prune count is rounded, whether a weight pruned in a
step may regrow in it (``regrow_pruned``), SET's separate pruning of positive and negative
weights (``sign_split``), RigL's skipped weight update on a mask-update step
(``step_on_update``), sparse momentum's floor on its prune rate (``ratio_min``) and the
momentum it gives regrown weights (``regrown_momentum``), and no rescaled init
(``scale_init``). This project's deliberate improvements are those options set the other
way; ``IMPROVEMENTS`` lists them and ``improved(method)`` applies them. What is left
different from a reference on purpose (exact counts where a reference draws them by chance,
zero-valued regrown weights) is in each docstring.

Every sparse method ends with exactly the active counts ``MaskedNet`` gives the
same ``Target``: the DST methods keep them throughout (sparse momentum per net,
the others per layer), gradual pruning reaches them at its last pruning step.

Static, SET, RigL and GMP take a ``pattern`` (``dst.engine.patterns``: "fan_in", "2:4",
"block4x4", ...) that their masks keep at every step; ``srigl`` is RigL under constant
fan-in (SRigL, Lasby et al. ICLR 2024). Sparse momentum refuses a pattern: it moves
weights between layers, which no per-group count can hold.
"""

import copy
import dataclasses
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
from dst.engine.update_rule import MoveRule, RegrowCriterion, check_prune_ratio, get_regrow
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
        """A random sparse mask at ``target`` (in the method's pattern) over a copy of ``base_net``; its weights
        scaled by ``1/sqrt(density)`` where the method's ``scale_init`` says so."""
        return MaskedNet(base_net, target.sparsity, target.allocation, generator=generator,
                         keep_dense=target.keep_dense, pattern=getattr(self, "pattern", "unstructured"),
                         scale_init=getattr(self, "scale_init", False))

    @property
    def rule(self) -> MoveRule:
        """The details of the method's DST step (``dst.engine.update_rule.MoveRule``) from its settings."""
        return MoveRule(rounding=getattr(self, "rounding", "round"),
                        regrow_pruned=getattr(self, "regrow_pruned", False),
                        sign_split=getattr(self, "sign_split", False))

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
    # rigl's static baseline keeps the dense init (init_method='baseline'); True scales by 1/sqrt(density).
    scale_init: bool = False

    def __post_init__(self):
        _check_pattern("static", self.pattern)
        _check_bools(self, "scale_init")


@dataclass(frozen=True)
class SET(Method):
    """SET as Mocanu et al.'s code: ``rewireMask`` in dcmocanu/sparse-evolutionary-artificial-neural-networks
    (``SET-MLP-Keras-Weights-Mask/set_mlp_keras_cifar10.py``; ``weightsEvolution_II`` in the IJCAI-2019
    tutorial's ``set_mlp.py`` is the same rule).

    After every epoch each layer prunes ``zeta`` of its negative weights nearest zero and ``zeta`` of its
    positive ones (thresholds at ``int((1 - zeta) * negatives)`` and ``int(zeta * (positives + 1))`` places,
    ``sign_split``) and regrows exactly as many at random positions that are free after pruning
    (``regrow_pruned``: a weight pruned now may come back, keeping its value). Left different on purpose:
    the masks start with exact counts (the reference draws each weight with the ER probability), regrown
    weights start at zero (the Keras reference's; ``set_mlp.py`` draws ``randn / 10``), and no update
    follows the last epoch (nothing would train the regrown weights).
    """

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
    # Mocanu et al. prune positive and negative weights separately; False prunes the smallest |w| (a pattern needs it).
    sign_split: bool = True
    regrow_pruned: bool = True  # the reference regrows on the rewired mask; False: only at positions free before
    scale_init: bool = False  # the reference keeps the dense init; True scales by 1/sqrt(density)

    def __post_init__(self):
        _check_ratio("set", self.prune_ratio)
        _check_pattern("set", self.pattern)
        _check_bools(self, "scale_init")
        _check_rule(self)
        if self.sign_split and get_pattern(self.pattern).kind != "unstructured":
            raise ValueError(f"set.sign_split (Mocanu et al.'s pruning of positive and negative weights apart) "
                             f"cannot keep pattern {get_pattern(self.pattern).label!r}, which prunes whole units "
                             "within groups; use replace(METHODS['set'], pattern=..., sign_split=False)")
        get_regrow(self.regrow)
        check_steps("set.updates_per_epoch", self.updates_per_epoch)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"set.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")

    def scheduler(self, model, target, optimizer, total_steps, steps_per_epoch, generator=None):
        # end one step before the last: an update after the last step would only remove trained weights.
        config = DSTConfig(prune_ratio=self.prune_ratio, regrow=self.regrow, schedule=self.schedule, every=max(
            1, steps_per_epoch // self.updates_per_epoch), unit="step", end=max(1, total_steps - 1), rule=self.rule)
        return masked_scheduler(model, config, optimizer=optimizer, generator=generator)


@dataclass(frozen=True)
class RigL(Method):
    """RigL as google-research/rigl: ``SparseRigLOptimizer`` and ``_get_update_op`` in
    ``rigl/sparse_optimizers_base.py``.

    Every ``every`` steps each layer drops ``int(drop_fraction * active)`` of its smallest weights
    (``rounding="floor"``) and grows as many where ``|dense gradient|`` is largest among the positions
    free after dropping (``regrow_pruned``: the "lifted" grow score, so a dropped weight may come back,
    keeping its value); the fraction decays by a cosine to 0 at ``end_fraction`` of training. On a
    mask-update step the weights are not updated (``step_on_update=False``: rigl's
    ``cond_mask_update_op`` runs the mask update instead of the optimizer), and the gradient is taken on
    that step's batch at the weights before it. Left different on purpose: no 1e-5 noise on the drop
    scores (it only breaks ties), masks with exactly the allocation's counts, and no update before the
    first step (rigl's condition ``last_update_step + frequency <= global_step`` holds at global step 0, so
    it updates the mask once on the init; here the first update follows ``every`` steps of training).
    """

    name: ClassVar[str] = "rigl"
    summary: ClassVar[str] = ("RigL (Evci et al. 2020): every 100 steps, regrow where the dense gradient is "
                              "largest; the fraction moved decays (cosine) and updates stop at 75 % of training.")
    prune_ratio: float = 0.3  # alpha, the initial fraction moved
    every: int = 100  # Delta T, steps between updates
    end_fraction: float = 0.75  # no updates in the last quarter: the final mask is fine-tuned
    # RigL regrows by the dense gradient; another criterion makes a variant labelled "rigl+<criterion>".
    regrow: str | RegrowCriterion = "gradient"
    pattern: str | Pattern = "unstructured"  # kept at every update: pruned and regrown within its groups
    rounding: str = "floor"  # rigl casts the drop count to an int; "round" is this project's
    regrow_pruned: bool = True  # rigl grows on the post-drop mask; False: only at positions free before the step
    step_on_update: bool = False  # rigl skips the weight update on a mask-update step; True also steps (SGD first)
    scale_init: bool = False  # rigl's init_method='baseline' keeps the dense init; True scales by 1/sqrt(density)

    def __post_init__(self):
        _check_ratio(self.name, self.prune_ratio)
        _check_pattern(self.name, self.pattern)
        _check_bools(self, "step_on_update", "scale_init")
        _check_rule(self)
        get_regrow(self.regrow)
        check_steps(f"{self.name}.every", self.every)
        check_fraction(f"{self.name}.end_fraction (of training, where updates stop)", self.end_fraction,
                       include_low=False)

    def scheduler(self, model, target, optimizer, total_steps, steps_per_epoch, generator=None):
        config = DSTConfig(prune_ratio=self.prune_ratio, regrow=self.regrow, schedule="cosine", every=self.every,
                           unit="step", end=max(1, int(self.end_fraction * total_steps)), rule=self.rule)
        return masked_scheduler(model, config, optimizer=optimizer, generator=generator)


@dataclass(frozen=True)
class SRigL(RigL):
    """RigL under constant fan-in: its drop is layer-wide by magnitude and each neuron regrows what it lost.

    As ``RigLConstFanScheduler._rigl_step`` in calgaryml/condensed-sparsity (``src/rigl_torch/rigl_constant_fan.py``),
    which keeps RigL's floored drop count, lifted grow score (a dropped weight may regrow) and skipped
    optimizer step on a mask-update step, so the defaults are RigL's. Not included: SRigL's
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
    """Sparse momentum as TimDettmers/sparse_learning: ``Masking.truncate_weights`` with ``magnitude_prune``,
    ``momentum_growth`` and ``momentum_redistribution`` in ``sparselearning/core.py`` and ``funcs.py``.

    After every epoch but the last each layer prunes ``ceil(rate * active)`` of its smallest weights
    (``rounding="ceil"``); the total is regrown where ``|momentum|`` is largest among the positions free
    after pruning (``regrow_pruned``), shared over layers by their mean ``|momentum|``. The rate follows
    ``CosineDecay`` (torch's CosineAnnealingLR from ``prune_ratio`` to ``eta_min=0.005``, ``ratio_min``) over
    training. Regrown weights start at zero with the momentum their position had accumulated
    (``regrown_momentum``: sparse_learning's SGD buffer covers every position, since it masks weights and
    not gradients). Left different on purpose: each layer's share is rounded so the net's total is exact
    (sparse_learning rounds each share up and corrects the drift at the next update with
    ``adjusted_growth``), and masks start with exact counts (it draws each weight with probability density).
    The cosine runs to the last update (after epoch E - 1) rather than to the last step: one step in E.
    Not ported: ``adjust_prune_rate``, which lowers the rate of a layer less than 20 % sparse that is gaining
    weights (in the sweeps' ERK and uniform targets every layer is either dense, where neither version prunes,
    or more than 20 % sparse).
    """

    name: ClassVar[str] = "snfs"
    summary: ClassVar[str] = ("Sparse momentum (Dettmers & Zettlemoyer 2019): regrow where the gradient's momentum "
                              "is largest, and give layers whose momentum is larger more of the regrown weights.")
    dense_weight_gradient: ClassVar[bool] = True
    prune_ratio: float = 0.5  # sparse_learning's death rate, cosine-decayed over training
    momentum: float = 0.9  # the decay of the gradient average (SGD's momentum in the paper)
    # Only unstructured: SNFS moves weights between layers, which no per-group count can hold.
    pattern: str | Pattern = "unstructured"
    rounding: str = "ceil"  # sparse_learning's math.ceil; "round" is this project's
    regrow_pruned: bool = True  # growth on the mask after death; False: only at positions free before the step
    ratio_min: float = 0.005  # CosineDecay's eta_min; 0 decays to nothing
    # True: a regrown weight's SGD momentum is the momentum its position accumulated (sparse_learning);
    # False: zero, as every other method's moved weights (needs no SGD).
    regrown_momentum: bool = True
    scale_init: bool = False  # sparse_learning only masks the init; True scales by 1/sqrt(density)

    def __post_init__(self):
        _check_ratio("snfs", self.prune_ratio)
        _check_pattern("snfs", self.pattern)
        _check_bools(self, "regrown_momentum", "scale_init")
        _check_rule(self)
        try:
            check_prune_ratio(self.ratio_min)
        except (TypeError, ValueError):
            raise ValueError(f"snfs.ratio_min (the floor of the cosine-decayed prune rate) must be in "
                             f"[0, prune_ratio={self.prune_ratio}], got {self.ratio_min!r}") from None
        if self.ratio_min > self.prune_ratio:
            raise ValueError(f"snfs.ratio_min (the floor of the cosine-decayed prune rate) must be in "
                             f"[0, prune_ratio={self.prune_ratio}], got {self.ratio_min!r}")
        if get_pattern(self.pattern).kind != "unstructured":
            raise ValueError(f"snfs moves regrown weights between layers, so a layer's count changes, which "
                             f"pattern {get_pattern(self.pattern).label!r} cannot hold; snfs takes "
                             "pattern='unstructured' only (SET, RigL and srigl keep a pattern)")
        check_fraction("snfs.momentum (the decay of the gradient average)", self.momentum)
        if self.momentum == 1.0:
            raise ValueError("snfs.momentum must be below 1 (at 1 the average never forgets), got 1.0")

    def scheduler(self, model, target, optimizer, total_steps, steps_per_epoch, generator=None):
        # The config's regrow is left at its default and unused: the step regrows by momentum (and needs no batch).
        # Updates after every epoch but the last: ``end`` stops them there (the floor would otherwise keep one).
        config = DSTConfig(prune_ratio=self.prune_ratio, schedule="cosine", every=steps_per_epoch, unit="step",
                           end=max(1, total_steps - 1), rule=self.rule, ratio_min=self.ratio_min)
        return DSTScheduler(config, SparseMomentumStep(model, self.momentum, optimizer, rule=self.rule,
                                                       regrown_momentum=self.regrown_momentum))

    def close(self, scheduler) -> None:
        scheduler.close()


@dataclass(frozen=True)
class GMP(Method):
    """Gradual magnitude pruning as Zhu & Gupta 2017 and TensorFlow's model_pruning (``Pruning._setup_sparsity``).

    Every ``every`` steps from ``start_fraction`` to ``end_fraction`` of training each layer keeps its
    ``round(size * (1 - s_t))`` largest weights, ``s_t = s_f * (1 - (1 - p) ** 3)`` with one progress ``p``
    for every layer. Under a uniform target that is one ``s_t`` for the whole net, the paper's rule; under
    ERK each layer's ``s_f`` is its own, with the progress shared, as model_pruning's ``weight_sparsity_map``
    and rigl's ERK pruning baseline (``rigl/rl/tfagents/tf_sparse_utils.py``: a ``PolynomialDecay`` per
    layer from 0 to its sparsity) do. Left different: no moving-average threshold (model_pruning's
    ``threshold_decay``, 0 by default).
    """

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


def _check_bools(method: Method, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(method, name), bool):
            raise ValueError(f"{method.name}.{name} must be True or False, got {getattr(method, name)!r}")


def _check_rule(method: Method) -> None:
    """The method's MoveRule settings (rounding, regrow_pruned, sign_split), checked by MoveRule itself."""
    try:
        method.rule  # noqa: B018 - built to be checked
    except ValueError as error:
        raise ValueError(f"{method.name}.{error}") from None


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

# This project's deliberate departures from the references, as settings: (value, why). ``improved`` applies
# each to the methods that have it; the tutorial's own DST step (``apply_dst_step``, ``MaskedNet``) has them all.
IMPROVEMENTS: dict[str, tuple[object, str]] = {
    "scale_init": (True, "weights scaled by 1/sqrt(density), so a sparse layer's outputs start at the dense scale"),
    "regrow_pruned": (False, "regrow only where nothing was before, so a step really moves its count"),
    "rounding": ("round", "the count moved is rounded, not floored or rounded up"),
    "sign_split": (False, "prune the smallest |w|, whatever the sign"),
    "step_on_update": (True, "the optimizer steps on a mask-update step too (no batch is spent on the mask alone)"),
    "ratio_min": (0.0, "the cosine-decayed prune rate decays to 0"),
    "regrown_momentum": (False, "regrown weights start with zero optimizer state, as in every other method"),
}


def improved(method: str | Method) -> Method:
    """``method`` with this project's improvements (``IMPROVEMENTS``) in place of its reference's behaviour."""
    method = get_method(method)
    own = {field.name for field in dataclasses.fields(method)}
    return dataclasses.replace(method, **{name: value for name, (value, _) in IMPROVEMENTS.items() if name in own})


def get_method(method: str | Method) -> Method:
    """The method of that name with its defaults (a ``Method`` passes through)."""
    if isinstance(method, Method):
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    return METHODS[method]
