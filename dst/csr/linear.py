"""The truly sparse layer: a CSR weight matrix trained without ever being dense.

``SparseLinear`` holds only the active weights of an (out, in) matrix: their
values, their columns and the row pointers (CSR, entries sorted row-major),
plus every per-connection optimizer value aligned with them. A training step
costs three sparse products, each proportional to the active weights times the
batch size, and never forms a dense weight or gradient:

- forward   ``Z = W @ A``
- backward  ``dA = W.T @ dZ``                 (the same CSR arrays, read as CSC)
- gradient  ``dW[k] = dZ[row_k] . A[col_k]``  (a sampled dense-dense product, SDDMM)

Activations are feature-major, (features, batch), so every row a kernel reads is
one contiguous run of ``batch`` floats. The products are the backend's training
capability (``dst.csr.backends``: scipy, numba or cupy); everything else is written
once against the backend's array module.

The DST topology update is ``dst.engine.update_rule``'s, the simulated engine's rule: it
works on sorted flat positions ``row * in + col``, from which the CSR arrays are
rebuilt, so nothing in it is the size of the dense matrix either. Nor are its
temporaries many copies of the model: the new arrays are merged from the kept and the
regrown entries (no concatenation and argsort of every position), one array at a time,
and a wide layer's random init is drawn in row chunks straight into its CSR arrays.
"""

import math

import numpy as np

from dst.csr import csr_build
from dst.csr.backends import Ops, require_training
from dst.csr.csr_build import csr_from_positions, index_dtype, merged, random_csr
from dst.engine.allocation import active_count
from dst.engine.update_rule import (
    REGROW,
    LayerUpdate,
    RandomSource,
    RegrowCriterion,
    choose_moves,
    get_regrow,
    moved_count,
    sample_inactive,
)


def trainable_regrow(regrow: str) -> RegrowCriterion:
    """The criterion ``regrow`` if this engine can run it: not one that reads a dense signal (RigL's gradient,
    sparse momentum's momentum), which this trainer never forms."""
    criterion = get_regrow(regrow)
    if criterion.needs is not None:
        raise ValueError(f"the truly sparse trainer cannot regrow by {criterion.name!r} ({criterion.description}): "
                         f"that needs the dense {criterion.needs} this trainer never forms; choose one of "
                         f"{sorted(name for name, other in REGROW.items() if other.needs is None)}")
    return criterion


class SparseLinear:
    """A linear layer ``y = W x + b`` whose weight W (out, in) exists only as its active entries.

    Arrays, all on the backend's device:
        weight, columns: (nnz,) the value and column of each active weight, sorted
            row-major: with ``indptr`` they are the CSR data and indices arrays.
        indptr: (out + 1,) row ``i`` owns entries ``indptr[i]:indptr[i + 1]``.
        rows: (nnz,) each weight's row, only where the backend's SDDMM needs it (else None).
        matrix: the backend's CSR matrix over those same arrays (for numba, a ``TrainingLayout``: its
            work split and the index layouts its parallel products read, built on first use).
        bias, bias_grad: (out,) dense.
        weight_grad: (nnz,) the loss gradient at the active positions only.
        state, bias_state: optimizer values by name (momentum, Adam moments),
            shaped like ``weight`` and ``bias``; a topology update keeps a surviving
            connection's values and starts a new connection's at zero.
    """

    def __init__(self, shape: tuple[int, int], positions, weight, bias, ops: Ops):
        """Build from sorted unique flat positions ``row * in + col`` (host int64) and matching values."""
        self._set_state(shape, bias, ops)
        self._set_topology(np.asarray(positions, dtype=np.int64), ops.xp.array(weight, dtype=ops.xp.float32))

    @classmethod
    def random(cls, out_features: int, in_features: int, density: float, rng: np.random.Generator,
               ops: Ops) -> "SparseLinear":
        """Random topology of ``active_count``-many weights with the sparse fan-in init.

        Values are drawn like ``nn.Linear``'s default init, U(-1/sqrt(in), 1/sqrt(in)),
        times ``1/sqrt(density)`` (as ``MaskedNet(scale_init=True)`` does): each unit
        sees ``density * in`` inputs, so this keeps its activation variance where
        a dense layer's would be instead of shrinking it layer after layer. A layer of
        more than ``INIT_CHUNK_POSITIONS`` positions is drawn in row chunks (``csr_build.random_csr``).
        """
        numel = out_features * in_features
        count = active_count(numel, density)
        bound = 1.0 / math.sqrt(in_features)
        if numel <= csr_build.INIT_CHUNK_POSITIONS:
            positions = sample_inactive(np.empty(0, dtype=np.int64), numel, count, rng)
            weight = rng.uniform(-bound, bound, size=len(positions)) / math.sqrt(density)
            bias = rng.uniform(-bound, bound, size=out_features)
            return cls((out_features, in_features), positions, weight.astype(np.float32), bias, ops)
        bias = rng.uniform(-bound, bound, size=out_features)
        return cls.from_csr((out_features, in_features), *random_csr((out_features, in_features), count, bound,
                                                                    density, rng), bias, ops)

    @classmethod
    def from_csr(cls, shape: tuple[int, int], indptr, columns, weight, bias, ops: Ops) -> "SparseLinear":
        """Build from host CSR arrays (sorted columns within each row), adopted without a positions round trip.

        ``indptr`` and ``columns`` are cast to ``index_dtype`` (no copy where they have it already);
        optimizer state starts empty (``SparseMLP`` adds zeros, or a checkpoint's values go in ``state``).
        """
        layer = cls.__new__(cls)
        layer._set_state(shape, bias, ops)
        dtype = index_dtype(max(len(columns), *layer.shape) + 1)
        layer._set_csr(np.asarray(indptr).astype(dtype, copy=False), np.asarray(columns).astype(dtype, copy=False),
                       ops.asarray(np.asarray(weight, dtype=np.float32)))
        return layer

    def _set_state(self, shape: tuple[int, int], bias, ops: Ops) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.ops, self.products = ops, require_training(ops)
        xp = ops.xp
        self.bias = xp.array(bias, dtype=xp.float32)  # a copy: never share a caller's (torch) memory
        self.bias_grad = xp.zeros_like(self.bias)
        self.bias_state: dict = {}
        self.state: dict = {}
        self._buffers: dict = {}
        self.matrix = None

    def _set_topology(self, positions: np.ndarray, weight) -> None:
        self._set_csr(*csr_from_positions(positions, self.shape), weight)

    def _set_csr(self, indptr: np.ndarray, columns: np.ndarray, weight) -> None:
        """Adopt host CSR index arrays (of ``index_dtype``) and the matching device ``weight``."""
        xp = self.ops.xp
        self.matrix = self.weight_grad = None  # the old topology's, freed before the new ones are made
        if self.products.keeps_rows:
            rows = np.repeat(np.arange(self.shape[0], dtype=columns.dtype), np.diff(indptr))
            self.rows = xp.asarray(rows)
        else:
            self.rows = None
        self.columns = xp.asarray(columns)
        self.indptr = xp.asarray(indptr)
        self.weight = weight
        self.weight_grad = xp.zeros_like(weight)
        self.matrix = self.products.matrix(self.weight, self.columns, self.indptr, self.shape)

    def work_buffer(self, name: str, shape: tuple[int, ...], dtype=np.float32):
        """A scratch array kept under ``name`` between steps, reallocated only when its shape changes.

        The products write their outputs here (one batch shape at a time, as the inference steps
        do), so a step makes no fresh activation-sized arrays; the next step overwrites them.
        """
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != tuple(shape) or buffer.dtype != dtype:
            self._buffers[name] = None  # the old one goes before the new one is made
            buffer = self._buffers[name] = self.ops.xp.empty(shape, dtype=dtype)
        return buffer

    @property
    def active_count(self) -> int:
        return int(self.weight.shape[0])

    def positions(self) -> np.ndarray:
        """Sorted flat positions ``row * in + col`` of the active weights (host int64)."""
        indptr = self.ops.to_numpy(self.indptr)
        positions = np.repeat(np.arange(self.shape[0], dtype=np.int64) * self.shape[1], np.diff(indptr))
        positions += self.ops.to_numpy(self.columns)  # in place: no second int64 copy
        return positions

    @property
    def density(self) -> float:
        return self.active_count / (self.shape[0] * self.shape[1])

    def forward(self, inputs, relu: bool = False):
        """(in, batch) -> W @ inputs + bias (out, batch), through a ReLU if ``relu``; on numba, a work buffer
        the next forward overwrites."""
        return self.products.matmul(self, inputs, relu)

    def backward(self, grad_outputs, inputs, need_input_grad: bool = True, relu_input: bool = False):
        """Fill ``weight_grad`` and ``bias_grad`` from dZ (out, batch); return dA (in, batch) or None.

        ``relu_input``: ``inputs`` came out of a ReLU, and dA is returned through it (times ``inputs > 0``).
        """
        grad_outputs.sum(axis=1, out=self.bias_grad)
        return self.products.backward(self, grad_outputs, inputs, need_input_grad, relu_input)

    def prune_and_regrow(self, prune_ratio: float, random: RandomSource, regrow: str = "random") -> LayerUpdate:
        """One DST step on this layer by ``dst.engine.update_rule``: prune the smallest magnitudes, regrow as many.

        ``dst.engine.prune_regrow.apply_dst_step``'s rule and choices: ``moved_count`` weights move,
        regrowth picks among the positions inactive before this update. Regrown weights start
        at zero, which leaves the network's function unchanged at the update (SET's random
        values make the loss jump) and keeps this trainer comparable with the masked one;
        their optimizer state starts at zero too, so no stale momentum pushes them. Criteria
        that need the dense gradient (RigL) are refused: this layer never forms it.
        """
        criterion = trainable_regrow(regrow)
        xp, numel = self.ops.xp, self.shape[0] * self.shape[1]
        before = self.positions()
        count = moved_count(len(before), numel, prune_ratio)
        if count == 0:
            return LayerUpdate(active=len(before), pruned=0, regrown=0)
        # The gradient (never an input here: RigL is refused) and numba's index layouts (CSC, tiles) are remade
        # for the new topology anyway; freed now, they leave room for the update's own temporaries.
        self.matrix = self.weight_grad = None
        magnitudes = self.ops.to_numpy(xp.abs(self.weight))
        try:
            pruned, regrown = choose_moves(before, magnitudes, numel, count, criterion, random=random)
        except Exception:  # a criterion's bad answer (the tutorial's exercise): the layer stays as it was
            self.weight_grad = xp.zeros_like(self.weight)  # overwritten by every backward anyway
            self.matrix = self.products.matrix(self.weight, self.columns, self.indptr, self.shape)
            raise
        del magnitudes
        # The new entries are the kept ones and the regrown ones, merged in position order: a regrown
        # position lands after every kept and regrown position below it. No concatenation, no argsort.
        pruned_positions = np.sort(before[pruned])
        regrown_at = (np.searchsorted(before, regrown) - np.searchsorted(pruned_positions, regrown)
                      + np.arange(count))
        del before
        bounds = np.arange(self.shape[0] + 1, dtype=np.int64) * self.shape[1]  # each row's first position
        old_indptr = self.ops.to_numpy(self.indptr)
        indptr = (old_indptr - np.searchsorted(pruned_positions, bounds)
                  + np.searchsorted(regrown, bounds)).astype(old_indptr.dtype)
        keep_host = np.ones(self.active_count, dtype=bool)
        keep_host[pruned] = False
        is_old_host = np.ones(self.active_count, dtype=bool)
        is_old_host[regrown_at] = False
        columns = merged(np, self.ops.to_numpy(self.columns), keep_host, is_old_host, regrown % self.shape[1])
        keep, is_old = self.ops.asarray(keep_host), self.ops.asarray(is_old_host)
        weight = merged(xp, self.weight, keep, is_old, 0)
        for name in list(self.state):  # one at a time: each old array is freed before the next is made
            self.state[name] = merged(xp, self.state[name], keep, is_old, 0)
        self._set_csr(indptr, columns, weight)
        return LayerUpdate(active=self.active_count, pruned=count, regrown=count)

    def to_dense(self) -> np.ndarray:
        """The weight as a dense host array: for tests and export of small layers only."""
        dense = np.zeros(self.shape[0] * self.shape[1], dtype=np.float32)
        dense[self.positions()] = self.ops.to_numpy(self.weight)
        return dense.reshape(self.shape)

    def arrays(self) -> dict:
        """Every array this layer holds between steps, by name (for memory accounting)."""
        held = {"weight": self.weight, "weight_grad": self.weight_grad, "columns": self.columns,
                "indptr": self.indptr, "bias": self.bias, "bias_grad": self.bias_grad}
        if self.rows is not None:
            held["rows"] = self.rows
        held.update({f"state.{name}": values for name, values in self.state.items()})
        held.update({f"matrix.{name}": values for name, values in getattr(self.matrix, "arrays", dict)().items()})
        held.update({f"bias_state.{name}": values for name, values in self.bias_state.items()})
        return held

    def nbytes(self) -> int:
        """Bytes of weights, indices, gradients and optimizer state held by this layer."""
        return sum(int(values.nbytes) for values in self.arrays().values())

