"""The DST update rule, one for both engines: how many connections move, which are pruned, where they regrow.

A layer is described by the sorted flat positions of its active weights
(``row * in + col``; a conv's weight flattened the same way), their magnitudes and
its size ``numel``. ``choose_moves`` picks the ``count`` active weights of smallest
magnitude to prune and regrows ``count`` positions that were inactive *before* the step
(a weight pruned now is not regrown now, so the step really moves ``count`` connections).
That, rounding the count, and pruning by |w| over the whole layer are this project's choices;
the reference implementations differ on each, and ``MoveRule`` names the difference
(``regrow_pruned``, ``rounding``, ``sign_split``) so each method in ``dst.methods`` runs as its
reference does.
The simulated engine (``dst.engine.prune_regrow``, boolean masks over torch weights) and
the truly sparse one (``dst.csr.linear``, CSR arrays) both call it, so they make the same
choices on the same layer and random stream. That is the rule for unstructured layers;
a structured pattern (``dst.engine.patterns``) applies the same rule within its groups.

A regrow criterion (``REGROW``) is a *score* over a layer's positions, as in
google-research/rigl; the highest-scoring inactive positions regrow. It declares the
dense signal it reads (``needs``, one of ``SIGNALS``), so whoever runs the update supplies it:

- ``"random"`` (SET, Mocanu et al. 2018): independent uniform scores, i.e. uniformly random
  inactive positions; no signal. For unstructured layers its ``sample`` makes the same choice
  without listing the inactive positions of a large layer (``sample_inactive``), so a
  65536 x 65536 layer regrows in memory proportional to its active weights.
- ``"gradient"`` (RigL, Evci et al. 2020): ``|dense loss gradient|`` on one batch, which only
  the simulated engine forms.
- ``"momentum"`` (sparse momentum, Dettmers & Zettlemoyer 2019): ``|momentum|`` of the dense
  gradient, which a ``dst.engine.momentum.MomentumTracker`` keeps.

The random source is a ``torch.Generator`` (the simulated engine's, shared by every
rank under ``dst.distributed``), a ``numpy.random.Generator`` (the CSR trainer's), or
None for torch's global generator. Everything here works on host numpy arrays.
"""

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

RandomSource = torch.Generator | np.random.Generator | None
# Up to this many positions, random regrowth lists a layer's inactive positions outright
# (9 bytes each: a bool and an int64, so 9 MiB here) and draws from the list, which is
# simple and exact; every SimpleNet layer is below it. Beyond, it samples by rejection.
LIST_INACTIVE_UP_TO = 1 << 20


@dataclass(frozen=True)
class LayerUpdate:
    """What one DST step did to one layer (counts of weights)."""

    active: int
    pruned: int
    regrown: int


# The dense signals a criterion may score by, and who supplies them (a criterion's ``needs``).
SIGNALS = {
    "gradient": "the layer's dense loss gradient on one batch (the scheduler passes a batch to the update)",
    "momentum": "an exponential average of the layer's dense gradient (a MomentumTracker the update keeps)",
}


@dataclass(frozen=True)
class RegrowCriterion:
    """Where a DST step regrows: a *score* for every position of a layer; the highest inactive ones regrow.

    As google-research/rigl feeds drop and grow scores into one update op, a criterion only
    scores; the update rule (``choose_moves``, or a pattern's ``moves``) takes the top ones among
    the positions inactive before the step, per group of the layer's sparsity pattern.
    """

    name: str
    description: str
    # The dense signal ``score`` reads: a key of SIGNALS, or None (the score needs no signal).
    needs: str | None
    uses_random: bool  # draws from the random source (every rank must then share its state)
    # (signal: (numel,) float array or None, numel, random source) -> (numel,) float scores, higher regrows first;
    # scores of active positions are ignored.
    score: Callable[[np.ndarray | None, int, RandomSource], np.ndarray]
    # Optional: (active, numel, count, random) -> ``count`` sorted inactive positions, the same choice as the top
    # scores made without any array of the layer's size (random regrowth in a 65536 x 65536 layer).
    sample: Callable[[np.ndarray, int, int, RandomSource], np.ndarray] | None = None

    def __post_init__(self):
        if self.needs is not None and self.needs not in SIGNALS:
            raise ValueError(f"regrow criterion {self.name!r}: needs must be None or one of {sorted(SIGNALS)}, "
                             f"got {self.needs!r}")
        if not callable(self.score):
            raise TypeError(f"regrow criterion {self.name!r}: score must be a function "
                            "(signal, numel, random) -> scores, got {type(self.score).__name__}")

    @property
    def needs_gradient(self) -> bool:
        """Whether a batch's dense gradient must be computed for it (RigL's extra pass)."""
        return self.needs == "gradient"


def random_scores(signal: np.ndarray | None, numel: int, random: RandomSource) -> np.ndarray:
    """Independent uniform scores: the top ones among the inactive positions are a uniformly random choice (SET)."""
    if isinstance(random, np.random.Generator):
        return random.random(numel)
    return torch.rand(numel, generator=_torch_generator(random), dtype=torch.float64).numpy()


def magnitude_scores(signal: np.ndarray | None, numel: int, random: RandomSource) -> np.ndarray:
    """``|signal|``: the dense gradient's magnitude (RigL), or the momentum's (sparse momentum)."""
    return np.abs(signal)  # a copy: the caller's signal is left as it was


REGROW = {
    "random": RegrowCriterion("random", "uniformly random inactive positions (SET)", needs=None, uses_random=True,
                              score=random_scores, sample=lambda active, numel, count, random: sample_inactive(
                                  active, numel, count, random)),
    "gradient": RegrowCriterion("gradient", "the largest |dense gradient| among inactive positions (RigL)",
                                needs="gradient", uses_random=False, score=magnitude_scores),
    "momentum": RegrowCriterion("momentum", "the largest |momentum of the dense gradient| among inactive "
                                "positions (sparse momentum)", needs="momentum", uses_random=False,
                                score=magnitude_scores),
}


def get_regrow(name: "str | RegrowCriterion") -> RegrowCriterion:
    """The regrow criterion called ``name`` (a ``RegrowCriterion`` of your own passes through), or a ValueError.

    Writing your own: a function ``score(signal, numel, random)`` returning one float per position
    (higher regrows first), wrapped as ``RegrowCriterion(name, description, needs, uses_random, score)``
    with ``needs`` the signal it reads ("gradient", "momentum" or None); every engine and method that
    takes ``regrow=`` runs it (the tutorial's first exercise does).
    """
    if isinstance(name, RegrowCriterion):
        return name
    if not isinstance(name, str) or name not in REGROW:
        raise ValueError(f"unknown regrow method {name!r}; choose one of {sorted(REGROW)} or pass a RegrowCriterion")
    return REGROW[name]


def check_prune_ratio(prune_ratio: float) -> None:
    """Raise unless ``prune_ratio`` is a number in [0, 1]."""
    if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, numbers.Real):
        raise TypeError(f"prune_ratio must be a float in [0, 1], got {type(prune_ratio).__name__}")
    if not 0.0 <= prune_ratio <= 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1] (fraction of active weights moved), got {prune_ratio}")


# How a step turns ``prune_ratio * active`` into a count: this project rounds; google-research/rigl floors
# (``tf.cast`` of the product to an int); sparse_learning rounds up (``math.ceil``).
ROUNDINGS: dict[str, Callable[[float], int]] = {"round": round, "floor": math.floor, "ceil": math.ceil}


@dataclass(frozen=True)
class MoveRule:
    """The details of a DST step on which the reference implementations differ; this project's choices by default.

    The methods of ``dst.methods`` set them to their reference code's (each method's docstring cites it);
    ``apply_dst_step`` and the tutorial keep the defaults.
    """

    # How the number pruned is rounded: "round" (this project), "floor" (rigl), "ceil" (sparse_learning).
    rounding: str = "round"
    # False (this project): regrow only at positions inactive *before* the step, so the step really moves
    # its count of connections. True (rigl, sparse_learning, Mocanu's SET): regrow among the positions inactive
    # after pruning, so a weight pruned now may come straight back (at zero).
    regrow_pruned: bool = False
    # False: prune the smallest |w| of the layer. True (Mocanu et al.'s SET): prune that fraction of the
    # positive weights and, separately, of the negative ones, each nearest zero (``sign_split_prune``: the
    # reference's thresholds, whatever ``rounding``); unstructured layers only.
    sign_split: bool = False

    def __post_init__(self):
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {list(ROUNDINGS)}, got {self.rounding!r}")
        for name in ("regrow_pruned", "sign_split"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def count(self, prune_ratio: float, active: int) -> int:
        """``prune_ratio * active``, rounded by this rule."""
        return int(ROUNDINGS[self.rounding](prune_ratio * active))


# This project's rule (every default of MoveRule): what apply_dst_step and the tutorial use.
PROJECT_RULE = MoveRule()


def moved_count(active: int, numel: int, prune_ratio: float, rule: MoveRule = PROJECT_RULE) -> int:
    """Connections one step moves: ``prune_ratio * active`` rounded by ``rule`` (``round`` by default), fewer only if
    fewer positions are inactive."""
    return min(rule.count(prune_ratio, active), numel - active)


def sign_split_prune(values: np.ndarray, numel: int, prune_ratio: float) -> np.ndarray:
    """Mocanu et al.'s SET pruning: indices into ``values`` (a layer's active weights, signed; ``numel`` its size)
    of the ``prune_ratio`` fraction of the negative weights nearest zero, of the positive ones nearest zero
    (each fraction taken apart), and of any active weight that is exactly zero.

    As ``rewireMask`` in dcmocanu/sparse-evolutionary-artificial-neural-networks
    (``SET-MLP-Keras-Weights-Mask/set_mlp_keras_cifar10.py``): it sorts the layer's weights, zeros
    included, and keeps those below ``values[int((1 - zeta) * firstZeroPos)]`` or above
    ``values[int(min(size - 1, lastZeroPos + zeta * (size - lastZeroPos)))]``; the counts below are
    those positions' (with distinct values), computed in the same floating point.
    """
    negative = np.flatnonzero(values < 0)
    positive = np.flatnonzero(values > 0)
    zero = np.flatnonzero(values == 0)
    first_zero = len(negative)  # where the zeros start in the sorted layer
    last_zero = numel - len(positive) - 1  # and end
    negative_pruned = len(negative) - int((1 - prune_ratio) * first_zero)
    positive_pruned = int(min(numel - 1, last_zero + prune_ratio * (numel - last_zero))) - last_zero
    pruned_negative = negative[np.argsort(-values[negative], kind="stable")[:max(0, negative_pruned)]]
    pruned_positive = positive[np.argsort(values[positive], kind="stable")[:max(0, positive_pruned)]]
    return np.sort(np.concatenate([pruned_negative, zero, pruned_positive])).astype(np.int64)


def choose_moves(active: np.ndarray, magnitudes: np.ndarray, numel: int, count: int, criterion: RegrowCriterion,
                 signal: np.ndarray | None = None, random: RandomSource = None,
                 regrow_count: int | None = None, regrow_pruned: bool = False,
                 pruned: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Which active weights to prune and where to regrow them, in one unstructured layer.

    Args:
        active: (active,) sorted int64 flat positions of the active weights.
        magnitudes: (active,) their absolute values, in the same order.
        count: how many are pruned (``moved_count``); at most the active positions.
        signal: (numel,) the flat dense signal the criterion ``needs`` (gradient, momentum), or None.
        regrow_count: how many regrow, if not ``count`` (sparse momentum moves regrowth between layers,
            gradual pruning regrows none); at most the positions it may regrow at.
        regrow_pruned: False (default): regrow among the positions inactive before the step. True (rigl,
            sparse_learning): among those inactive after pruning, so a weight pruned now may come back.
        pruned: the indices into ``active`` to prune, where the caller chose them (``sign_split_prune``);
            ``count`` must be their number. None: the ``count`` smallest magnitudes.

    Returns:
        ``(pruned, regrown)``: ``pruned`` indexes ``active`` (the ``count`` smallest magnitudes, in
        no particular order; ``active[pruned]`` are their positions), since both engines hold their
        weights in position order; ``regrown`` holds sorted positions that were inactive (before the
        step, or after pruning with ``regrow_pruned``), the ``regrow_count`` of highest score (or the
        criterion's ``sample``, the same choice).
    """
    regrow_count = count if regrow_count is None else regrow_count
    free = numel - len(active) + (count if regrow_pruned else 0)
    if not (0 <= count <= len(active) and 0 <= regrow_count <= free):
        raise ValueError(f"cannot prune {count} of {len(active)} active weights and regrow {regrow_count} "
                         f"of the {free} positions it may regrow at")
    if criterion.needs is not None and signal is None and regrow_count:
        raise ValueError(f"regrow={criterion.name!r} needs the layer's {SIGNALS[criterion.needs]}")
    empty = np.empty(0, dtype=np.int64)
    if pruned is None:
        pruned = np.argpartition(magnitudes, count - 1)[:count] if count else empty
    elif len(pruned) != count or len(np.unique(pruned)) != count or (count and not (
            pruned.min() >= 0 and pruned.max() < len(active))):
        raise ValueError(f"pruned must hold {count} distinct indices into the {len(active)} active weights")
    if not regrow_count:
        return pruned, empty
    # The positions that may not regrow: the active ones, less the pruned ones where they may come back.
    taken = np.delete(active, pruned) if regrow_pruned else active
    if criterion.sample is not None:
        regrown = _checked_choice(criterion, criterion.sample(taken, numel, regrow_count, random), taken, numel,
                                  regrow_count)
        return pruned, regrown
    scores = layer_scores(criterion, signal, numel, random)
    scores[taken] = -np.inf
    return pruned, np.sort(np.argpartition(-scores, regrow_count - 1)[:regrow_count]).astype(np.int64)


def layer_scores(criterion: RegrowCriterion, signal: np.ndarray | None, numel: int,
                 random: RandomSource) -> np.ndarray:
    """The criterion's (numel,) float64 scores, or a ValueError saying what is wrong with them.

    Criteria can be written by anyone (the tutorial's first exercise asks for one); a wrong
    answer (another length, NaN) would otherwise silently regrow the wrong connections.
    """
    if criterion.needs is not None and (signal is None or np.size(signal) != numel):
        raise ValueError(f"regrow={criterion.name!r} needs the layer's {SIGNALS[criterion.needs]}, "
                         f"{numel} entries; got {None if signal is None else np.size(signal)}")
    what = f"regrow criterion {criterion.name!r} must score every position: {numel} real numbers, no NaN"
    scores = criterion.score(signal, numel, random)
    try:
        scores = np.array(scores, dtype=np.float64)  # a copy the rule may write into
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what}; got {type(scores).__name__}") from error
    if scores.shape != (numel,):
        raise ValueError(f"{what}; got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError(f"{what}; got {int(np.isnan(scores).sum())} NaN")
    return scores


def _checked_choice(criterion: RegrowCriterion, chosen, active: np.ndarray, numel: int, count: int) -> np.ndarray:
    """A criterion's sampled positions as sorted int64, or a ValueError saying what is wrong with them."""
    what = (f"regrow criterion {criterion.name!r}'s sample must return {count} distinct inactive positions "
            f"in [0, {numel})")
    try:
        positions = np.asarray(chosen)
    except Exception as error:  # anything that is not array-like
        raise ValueError(f"{what}; got {type(chosen).__name__}") from error
    if positions.ndim != 1 or positions.size != count:
        raise ValueError(f"{what}; got shape {positions.shape}")
    if not np.issubdtype(positions.dtype, np.integer):
        raise ValueError(f"{what}; got dtype {positions.dtype}")
    positions = np.sort(positions.astype(np.int64, copy=False))
    if positions[0] < 0 or positions[-1] >= numel:
        raise ValueError(f"{what}; got positions from {positions[0]} to {positions[-1]}")
    if (positions[1:] == positions[:-1]).any():
        raise ValueError(f"{what}; got {int((positions[1:] == positions[:-1]).sum())} repeated")
    if _contains(active, positions).any():
        raise ValueError(f"{what}; got {int(_contains(active, positions).sum())} that are active already")
    return positions


# ----------------------------------------------------------------------------- random regrowth

def sample_inactive(active: np.ndarray, numel: int, count: int, random: RandomSource) -> np.ndarray:
    """``count`` distinct flat positions drawn uniformly from [0, numel) minus ``active`` (sorted int64).

    A layer of at most ``LIST_INACTIVE_UP_TO`` positions, or one where the result would
    leave fewer than half the positions free, lists its free positions and draws from
    the list: then either the list is small or ``numel < 2 * (len(active) + count)``, so
    it still scales with the number of active weights. Otherwise positions are drawn by
    rejection, and nothing of size ``numel`` is made.
    """
    if count > numel - len(active):
        raise ValueError(f"cannot draw {count} inactive positions out of {numel - len(active)}")
    if numel <= LIST_INACTIVE_UP_TO or 2 * (len(active) + count) > numel:
        taken = np.zeros(numel, dtype=bool)
        taken[active] = True
        free = np.flatnonzero(~taken)
        return np.sort(free[_permutation(random, len(free))[:count]])
    chosen = np.empty(0, dtype=np.int64)
    while len(chosen) < count:
        need = count - len(chosen)
        free = numel - len(active) - len(chosen)  # at least half of numel, so few rounds
        draws = np.sort(_integers(random, numel, int(need * numel / free * 1.1) + 16))
        first = np.concatenate([[True], draws[1:] != draws[:-1]])  # np.unique, minus its slower hashing
        new = draws[first & ~_contains(active, draws) & ~_contains(chosen, draws)]
        chosen = np.sort(np.concatenate([chosen, new[_permutation(random, len(new))[:need]]]))  # disjoint
    return chosen


def _contains(sorted_values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Whether each query is in ``sorted_values``."""
    if len(sorted_values) == 0:
        return np.zeros(len(queries), dtype=bool)
    where = np.minimum(np.searchsorted(sorted_values, queries), len(sorted_values) - 1)
    return sorted_values[where] == queries


def _permutation(random: RandomSource, n: int) -> np.ndarray:
    """A random permutation of range(n) from either library's generator."""
    if isinstance(random, np.random.Generator):
        return random.permutation(n)
    return torch.randperm(n, generator=_torch_generator(random)).numpy()


def _integers(random: RandomSource, high: int, size: int) -> np.ndarray:
    """``size`` uniform int64 draws from [0, high) from either library's generator."""
    if isinstance(random, np.random.Generator):
        return random.integers(0, high, size=size)
    return torch.randint(high, (size,), generator=_torch_generator(random)).numpy()


def _torch_generator(random) -> torch.Generator | None:
    if random is not None and not isinstance(random, torch.Generator):
        raise TypeError(f"the random source must be a torch.Generator, a numpy.random.Generator or None, "
                        f"got {type(random).__name__}")
    return random
