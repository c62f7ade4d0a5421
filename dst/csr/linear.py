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
rebuilt, so nothing in it is the size of the dense matrix either.
"""

import math

import numpy as np

from dst.csr.array_ops import narrowest_dtype
from dst.csr.backends import Ops, require_training
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
    """The criterion ``regrow`` if this engine can run it: not one that needs the dense gradient (RigL)."""
    criterion = get_regrow(regrow)
    if criterion.needs_gradient:
        raise ValueError(f"the truly sparse trainer cannot regrow by {regrow!r} ({criterion.description}): "
                         "that needs the dense gradient this trainer never forms; choose one of "
                         f"{sorted(name for name, other in REGROW.items() if not other.needs_gradient)}")
    return criterion


def index_dtype(numel: int) -> type:
    """int32 while every index fits, as scipy itself would pick; int64 beyond."""
    return narrowest_dtype(numel, (np.int32, np.int64))


class SparseLinear:
    """A linear layer ``y = W x + b`` whose weight W (out, in) exists only as its active entries.

    Arrays, all on the backend's device:
        weight, columns: (nnz,) the value and column of each active weight, sorted
            row-major: with ``indptr`` they are the CSR data and indices arrays.
        indptr: (out + 1,) row ``i`` owns entries ``indptr[i]:indptr[i + 1]``.
        rows: (nnz,) each weight's row, only where the backend's SDDMM needs it (else None).
        matrix: the backend's CSR matrix over those same arrays (None for numba, whose kernels read them).
        bias, bias_grad: (out,) dense.
        weight_grad: (nnz,) the loss gradient at the active positions only.
        state, bias_state: optimizer values by name (momentum, Adam moments),
            shaped like ``weight`` and ``bias``; a topology update keeps a surviving
            connection's values and starts a new connection's at zero.
    """

    def __init__(self, shape: tuple[int, int], positions, weight, bias, ops: Ops):
        """Build from sorted unique flat positions ``row * in + col`` (host int64) and matching values."""
        self.shape = (int(shape[0]), int(shape[1]))
        self.ops, self.products = ops, require_training(ops)
        xp = ops.xp
        self.bias = xp.array(bias, dtype=xp.float32)  # a copy: never share a caller's (torch) memory
        self.bias_grad = xp.zeros_like(self.bias)
        self.bias_state: dict = {}
        self.state: dict = {}
        self._set_topology(np.asarray(positions, dtype=np.int64), xp.array(weight, dtype=xp.float32))

    @classmethod
    def random(cls, out_features: int, in_features: int, density: float, rng: np.random.Generator,
               ops: Ops) -> "SparseLinear":
        """Random topology of ``active_count``-many weights with the sparse fan-in init.

        Values are drawn like ``nn.Linear``'s default init, U(-1/sqrt(in), 1/sqrt(in)),
        times ``1/sqrt(density)`` (as ``MaskedNet(scale_init=True)`` does): each unit
        sees ``density * in`` inputs, so this keeps its activation variance where
        a dense layer's would be instead of shrinking it layer after layer.
        """
        numel = out_features * in_features
        positions = sample_inactive(np.empty(0, dtype=np.int64), numel, active_count(numel, density), rng)
        bound = 1.0 / math.sqrt(in_features)
        weight = rng.uniform(-bound, bound, size=len(positions)) / math.sqrt(density)
        bias = rng.uniform(-bound, bound, size=out_features)
        return cls((out_features, in_features), positions, weight.astype(np.float32), bias, ops)

    def _set_topology(self, positions: np.ndarray, weight) -> None:
        xp = self.ops.xp
        out_features, in_features = self.shape
        dtype = index_dtype(max(len(positions), out_features, in_features) + 1)
        rows, columns = np.divmod(positions, in_features)
        indptr = np.zeros(out_features + 1, dtype=dtype)
        np.cumsum(np.bincount(rows, minlength=out_features), out=indptr[1:])
        self.rows = xp.asarray(rows.astype(dtype)) if self.products.keeps_rows else None
        self.columns = xp.asarray(columns.astype(dtype))
        self.indptr = xp.asarray(indptr)
        self.weight = weight
        self.weight_grad = xp.zeros_like(weight)
        self.matrix = self.products.matrix(self.weight, self.columns, self.indptr, self.shape)

    @property
    def active_count(self) -> int:
        return int(self.weight.shape[0])

    def positions(self) -> np.ndarray:
        """Sorted flat positions ``row * in + col`` of the active weights (host int64)."""
        indptr = self.ops.to_numpy(self.indptr)
        rows = np.repeat(np.arange(self.shape[0], dtype=np.int64), np.diff(indptr))
        return rows * self.shape[1] + self.ops.to_numpy(self.columns)

    @property
    def density(self) -> float:
        return self.active_count / (self.shape[0] * self.shape[1])

    def forward(self, inputs):
        """(in, batch) -> (out, batch)."""
        outputs = self.products.matmul(self, inputs)
        outputs += self.bias[:, None]
        return outputs

    def backward(self, grad_outputs, inputs, need_input_grad: bool = True):
        """Fill ``weight_grad`` and ``bias_grad`` from dZ (out, batch); return dA (in, batch) or None."""
        self.products.sddmm(self, grad_outputs, inputs)
        grad_outputs.sum(axis=1, out=self.bias_grad)
        return self.products.matmul_transposed(self, grad_outputs) if need_input_grad else None

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
        magnitudes = self.ops.to_numpy(xp.abs(self.weight))
        pruned, regrown = choose_moves(before, magnitudes, numel, count, criterion, random=random)
        keep_host = np.ones(len(before), dtype=bool)
        keep_host[pruned] = False
        keep = self.ops.asarray(keep_host)
        positions = np.concatenate([before[keep_host], regrown])
        order = np.argsort(positions)
        order_device = self.ops.asarray(order)

        def remap(values):
            return xp.concatenate([values[keep], xp.zeros(count, dtype=values.dtype)])[order_device]

        weight = remap(self.weight)
        self.state = {name: remap(values) for name, values in self.state.items()}
        self._set_topology(positions[order], weight)
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
        held.update({f"bias_state.{name}": values for name, values in self.bias_state.items()})
        return held

    def nbytes(self) -> int:
        """Bytes of weights, indices, gradients and optimizer state held by this layer."""
        return sum(int(values.nbytes) for values in self.arrays().values())
