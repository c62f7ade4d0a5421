"""What a sparsity pattern is: how a layer's weight positions group, and how many of each group are active.

A layer's weight is read as its 2-D matrix ``(out, in)`` (a conv's ``(out, in*kh*kw)``, the
mask's own numbering), cut into *units* of ``unit_shape`` (single weights, or ``r x c``
blocks). In row-major order the units fall into consecutive *groups* of ``group_length``
units, and every group of a layer holds the same number of active units:

=============  ==========  ==========================  =======================================
pattern        unit        group                       active per group
=============  ==========  ==========================  =======================================
unstructured   1 x 1       the whole layer             ``round(density * numel)``
fan_in         1 x 1       one output row (a neuron)   ``k = round(density * in)``
n:m            1 x 1       m consecutive inputs        exactly ``n`` (density ``n/m`` only)
block r x c    r x c       the whole layer             ``round(density * blocks)`` blocks
=============  ==========  ==========================  =======================================

A DST step then keeps the pattern by construction (``Pattern.moves``): the ``count``
active units of smallest magnitude are pruned layer-wide, as SRigL does
(calgaryml/condensed-sparsity, ``RigLConstFanScheduler._get_drop_mask``), but no group
may lose more than it can regrow, and each group regrows exactly as many as it lost, by
the criterion's score among its units that were inactive before the step.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from dst.engine.update_rule import ROUNDINGS

# Every Pattern subclass with a ``kind`` registers here when its module is imported (dst.engine.patterns
# imports every module of the package), so a new pattern is one module.
PATTERN_KINDS: dict[str, type["Pattern"]] = {}


@dataclass(frozen=True)
class Pattern:
    """How a layer's positions group (``unit_shape``, ``group_length``) and how many per group are active."""

    kind: ClassVar[str]
    # The spelling ``get_pattern`` parses, for error messages: "fan_in", "N:M", "blockRxC".
    spelling: ClassVar[str]
    # Which truly sparse layer kind holds a layer of this pattern best (dst.csr reads it when converting).
    sparse_kind: ClassVar[str] = "csr"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            PATTERN_KINDS[cls.kind] = cls

    @classmethod
    def parse(cls, spec: str) -> "Pattern | None":
        """The pattern ``spec`` spells, if it is this kind's spelling; None otherwise."""
        return cls() if spec == cls.kind else None

    @property
    def label(self) -> str:
        """How results name it; ``get_pattern(label)`` gives it back."""
        return self.kind

    @property
    def unit_shape(self) -> tuple[int, int]:
        return (1, 1)

    def group_length(self, grid: tuple[int, int]) -> int:
        """Units per group, for a layer of ``grid`` = (rows, columns) of units."""
        return grid[0] * grid[1]

    def active_per_group(self, grid: tuple[int, int], density: float) -> int:
        """Active units in every group at ``density``; ValueError where the pattern cannot express it."""
        length = self.group_length(grid)
        return max(min(1, length), min(length, round(density * length)))

    # ------------------------------------------------------------------------- a layer under the pattern

    def grid(self, shape: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of units of a 2-D weight ``shape``; ValueError if the units do not tile it."""
        (rows, columns), (unit_rows, unit_columns) = shape, self.unit_shape
        if rows % unit_rows or columns % unit_columns:
            raise ValueError(f"pattern {self.label!r} needs a weight matrix whose shape is a multiple of "
                             f"{unit_rows}x{unit_columns}, got {rows}x{columns}")
        grid = (rows // unit_rows, columns // unit_columns)
        if grid[0] * grid[1] % self.group_length(grid):
            raise ValueError(f"pattern {self.label!r} groups {self.group_length(grid)} consecutive units, "
                             f"which does not divide a {rows}x{columns} weight matrix")
        return grid

    def active_count(self, shape: tuple[int, int], density: float) -> int:
        """Weights a ``shape`` layer keeps at ``density`` under this pattern (what ``random_mask`` gives)."""
        grid = self.grid(shape)
        groups = grid[0] * grid[1] // self.group_length(grid)
        return groups * self.active_per_group(grid, density) * math.prod(self.unit_shape)

    def random_mask(self, shape: tuple[int, int], density: float,
                    generator: torch.Generator | None = None) -> np.ndarray:
        """A ``shape`` boolean mask with ``active_per_group`` units at random in every group."""
        grid = self.grid(shape)
        length, active = self.group_length(grid), self.active_per_group(grid, density)
        scores = torch.rand(grid[0] * grid[1], generator=generator).numpy().reshape(-1, length)
        units = np.zeros(scores.shape, dtype=bool)
        np.put_along_axis(units, _largest(scores, active), True, axis=1)
        return self.expand(units.reshape(grid))

    def check_mask(self, mask: np.ndarray) -> None:
        """Raise ValueError unless ``mask`` (2-D) follows the pattern: whole units, equal counts per group."""
        grid = self.grid(mask.shape)
        units = self.reduce(mask.astype(np.int64))
        unit_size = math.prod(self.unit_shape)
        if not np.isin(units, (0, unit_size)).all():
            raise ValueError(f"the mask is not made of whole {self.unit_shape[0]}x{self.unit_shape[1]} units")
        counts = (units > 0).reshape(-1, self.group_length(grid)).sum(axis=1)
        if counts.size and (counts != counts[0]).any():
            raise ValueError(f"the groups of pattern {self.label!r} hold {counts.min()} to {counts.max()} active "
                             "units; every group must hold the same number")

    def reduce(self, values: np.ndarray) -> np.ndarray:
        """(out, in) per-weight values summed over each unit: (rows, columns) of units."""
        (unit_rows, unit_columns), (rows, columns) = self.unit_shape, values.shape
        if (unit_rows, unit_columns) == (1, 1):
            return values
        return values.reshape(rows // unit_rows, unit_rows, columns // unit_columns, unit_columns).sum(axis=(1, 3))

    def expand(self, units: np.ndarray) -> np.ndarray:
        """(rows, columns) of units -> (out, in), each unit's value repeated over its weights."""
        unit_rows, unit_columns = self.unit_shape
        if (unit_rows, unit_columns) == (1, 1):
            return units
        return np.repeat(np.repeat(units, unit_rows, axis=0), unit_columns, axis=1)

    def groups(self, mask: np.ndarray) -> np.ndarray:
        """(groups, length) bool: which units of each group are active in the 2-D ``mask``."""
        grid = self.grid(mask.shape)
        return (self.reduce(mask.astype(np.int64)) > 0).reshape(-1, self.group_length(grid))

    def moved_count(self, mask: np.ndarray, prune_ratio: float, rounding: str = "round") -> int:
        """Units one DST step at ``prune_ratio`` moves: ``prune_ratio * active units`` rounded (``rounding``, see
        ``dst.engine.update_rule.ROUNDINGS``), fewer only where the groups cannot take that many back (a group
        regrows what it loses, among its inactive units)."""
        active = self.groups(mask)
        per_group, length = active.sum(axis=1), active.shape[1]
        movable = int(np.minimum(per_group, length - per_group).sum())
        return min(int(ROUNDINGS[rounding](prune_ratio * int(per_group.sum()))), movable)

    def moves(self, mask: np.ndarray, magnitudes: np.ndarray, scores: np.ndarray,
              count: int, regrow_pruned: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The flat positions one DST step prunes and regrows in a ``mask`` that follows the pattern.

        Args:
            mask: (out, in) bool, the layer's mask before the step.
            magnitudes: (out, in) |weight|; a unit's magnitude is the sum over its weights (L1).
            scores: (out, in) regrow scores, higher first (a unit's is the sum over its weights),
                read only at positions inactive before the step.
            count: active units to prune, the smallest magnitudes layer-wide, except that no group
                loses more than it can take back (its inactive units); at most ``moved_count(mask, 1)``.
            regrow_pruned: False: a group regrows among its units inactive before the step. True (rigl's
                rule, which SRigL keeps): among those inactive after pruning, so a pruned unit may come back.

        Returns:
            ``(pruned, regrown)``: sorted int64 flat positions in the (out, in) numbering; each group
            regrows as many units as it lost, its highest-scoring ones that were inactive.
        """
        active = self.groups(mask)
        length = active.shape[1]
        unit_magnitudes = self.reduce(magnitudes.astype(np.float64)).reshape(-1, length)
        per_group = active.sum(axis=1)
        # The smallest ``cap`` of each group are the candidates, so the layer-wide choice stays by magnitude.
        eligible = active & (_rank_within(np.where(active, unit_magnitudes, np.inf))
                             < np.minimum(per_group, length - per_group)[:, None])
        if not 0 <= count <= int(eligible.sum()):
            raise ValueError(f"pattern {self.label!r} can move 0 to {int(eligible.sum())} units of this layer in one "
                             f"step, asked for {count}")
        candidates = np.flatnonzero(eligible)
        pruned = candidates[_smallest(unit_magnitudes.reshape(-1)[candidates], count)]
        lost = np.bincount(pruned // length, minlength=len(active))
        unit_scores = self.reduce(np.asarray(scores, dtype=np.float64)).reshape(-1, length)
        taken = active.copy()
        if regrow_pruned:
            taken.reshape(-1)[pruned] = False
        ranked = np.argsort(np.where(taken, np.inf, -unit_scores), axis=1, kind="stable")  # free units, best first
        regrown = (ranked + (np.arange(len(active)) * length)[:, None])[np.arange(length)[None, :] < lost[:, None]]
        grid = self.grid(mask.shape)
        return self._positions(np.sort(pruned), grid), self._positions(np.sort(regrown), grid)

    def prune_to(self, mask: np.ndarray, magnitudes: np.ndarray, per_group: int) -> np.ndarray:
        """Sorted flat positions to prune so that every group keeps its ``per_group`` largest active units."""
        active = self.groups(mask)
        if not 0 < per_group <= active.shape[1] or (active.sum(axis=1) < per_group).any():
            raise ValueError(f"cannot prune a layer of pattern {self.label!r} to {per_group} units per group: its "
                             f"groups hold {active.sum(axis=1).min()} to {active.sum(axis=1).max()} of "
                             f"{active.shape[1]}")
        unit_magnitudes = self.reduce(magnitudes.astype(np.float64)).reshape(active.shape)
        # Rank by descending magnitude among the active units; inactive ones rank last.
        rank = _rank_within(np.where(active, -unit_magnitudes, np.inf))
        pruned = np.flatnonzero(active & (rank >= per_group))
        return self._positions(pruned, self.grid(mask.shape))

    def _positions(self, units: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """Flat (out, in) positions of the weights of ``units`` (flat unit indices), sorted."""
        unit_rows, unit_columns = self.unit_shape
        if (unit_rows, unit_columns) == (1, 1):
            return units.astype(np.int64)
        row, column = np.divmod(units.astype(np.int64), grid[1])
        rows = (row * unit_rows)[:, None, None] + np.arange(unit_rows)[None, :, None]
        columns = (column * unit_columns)[:, None, None] + np.arange(unit_columns)[None, None, :]
        return np.sort((rows * grid[1] * unit_columns + columns).reshape(-1))


def _rank_within(values: np.ndarray) -> np.ndarray:
    """Each entry's rank (0 = smallest) within its row; ties by position."""
    order = np.argsort(values, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(values.shape[1]), values.shape), axis=1)
    return rank


def _largest(scores: np.ndarray, count: int) -> np.ndarray:
    """Per row of ``scores``, the indices of its ``count`` largest entries (any order)."""
    if count == scores.shape[1]:
        return np.broadcast_to(np.arange(count), scores.shape).copy()
    return np.argpartition(-scores, count, axis=1)[:, :count]


def _smallest(values: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` smallest of ``values`` (any order)."""
    if count == 0:
        return np.empty(0, dtype=np.int64)
    return np.argpartition(values, count - 1)[:count]
