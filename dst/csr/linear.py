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
one contiguous run of ``batch`` floats. The products come from an ``ArrayBackend``:
numpy + scipy.sparse (what SET's own code used), the same arrays with numba-compiled
products, or cupy + cupyx.scipy.sparse; everything else is written once against
the backend's array module.

The DST topology update (magnitude prune, random regrow) rebuilds the CSR arrays
from sorted flat positions ``row * in + col``: nothing in it is the size of the
dense matrix either. ``OptimizerConfig`` and the update rules that follow it (torch's
SGD and Adam, on the arrays of active weights) live here too.
"""

import functools
import importlib
import importlib.util
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from dst.allocation import active_count
from dst.gpu import require_cupy
from dst.prune_regrow import LayerUpdate

# The numpy SDDMM works on chunks of this many gathered floats per operand: 1 Mi floats
# (4 MiB) stays in cache; one whole-matrix gather was 5-10x slower here.
SDDMM_CHUNK_FLOATS = 1 << 20


@dataclass(frozen=True)
class ArrayBackend:
    """An array module, host transfers, and the three products of a training step.

    Each product takes a ``SparseLinear`` and feature-major dense operands:
    ``matmul(layer, A)`` is W @ A (out, batch), ``matmul_transposed(layer, dZ)`` is
    W.T @ dZ (in, batch), and ``sddmm(layer, dZ, A)`` writes ``dZ[row_k] . A[col_k]``
    for every active weight ``k`` into ``layer.weight_grad``.
    """

    name: str
    xp: ModuleType
    keeps_rows: bool  # whether layers hold each weight's row index (the gathering SDDMM needs it)
    to_host: Callable
    from_host: Callable
    csr: Callable  # (weight, columns, indptr, shape) -> a CSR matrix sharing those arrays
    matmul: Callable
    matmul_transposed: Callable
    sddmm: Callable


def _numpy_backend() -> ArrayBackend:
    import scipy.sparse

    def csr(weight, columns, indptr, shape):
        return scipy.sparse.csr_array((weight, columns, indptr), shape=shape, copy=False)

    return ArrayBackend("numpy", np, True, np.asarray, np.asarray, csr, _matmul_csr, _matmul_transposed_csr,
                        _sddmm_gather)


def _numba_backend() -> ArrayBackend:
    kernels = _numba_kernels()

    def matmul(layer, inputs):
        outputs = np.empty((layer.shape[0], inputs.shape[1]), dtype=inputs.dtype)
        kernels["matmul"](layer.indptr, layer.columns, layer.weight, inputs, outputs)
        return outputs

    def matmul_transposed(layer, grad_outputs):
        grad_inputs = np.zeros((layer.shape[1], grad_outputs.shape[1]), dtype=grad_outputs.dtype)
        kernels["matmul_transposed"](layer.indptr, layer.columns, layer.weight, grad_outputs, grad_inputs)
        return grad_inputs

    def sddmm(layer, left, right):
        kernels["sddmm"](layer.indptr, layer.columns, left, right, layer.weight_grad)

    return ArrayBackend("numba", np, False, np.asarray, np.asarray, lambda *args: None, matmul, matmul_transposed,
                        sddmm)


def _cupy_backend() -> ArrayBackend:
    cupy = require_cupy()
    import cupyx.scipy.sparse

    def csr(weight, columns, indptr, shape):
        return cupyx.scipy.sparse.csr_matrix((weight, columns, indptr), shape=shape, copy=False)

    return ArrayBackend("cupy", cupy, True, cupy.asnumpy, cupy.asarray, csr, _matmul_csr, _matmul_transposed_csr,
                        _sddmm_gather)


# "numpy": numpy + scipy.sparse, as SET's own code. "numba": the same arrays with the three
# products compiled (the SDDMM ~10x faster than numpy's gathers, the others ~1.5x faster
# than scipy's). "cupy": numpy's code on a CUDA GPU through cupy and cupyx.scipy.sparse.
BACKENDS = {"numpy": _numpy_backend, "numba": _numba_backend, "cupy": _cupy_backend}


def get_backend(name: str | None = None) -> ArrayBackend:
    """The array backend called ``name``; None picks "numba" where numba is installed, else "numpy"."""
    if name is None:
        name = "numba" if importlib.util.find_spec("numba") is not None else "numpy"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]()


def _matmul_csr(layer, inputs):
    return layer.matrix @ inputs


def _matmul_transposed_csr(layer, grad_outputs):
    return layer.matrix.T @ grad_outputs  # the CSR arrays read as CSC: no copy


def _sddmm_gather(layer, left, right) -> None:
    """Gather the rows each chunk of weights needs and dot them, ``batch`` floats each."""
    xp, rows, columns, out = layer.backend.xp, layer.rows, layer.columns, layer.weight_grad
    chunk = max(1, SDDMM_CHUNK_FLOATS // max(1, left.shape[1]))
    for start in range(0, len(rows), chunk):
        stop = min(start + chunk, len(rows))
        out[start:stop] = xp.einsum("ij,ij->i", left[rows[start:stop]], right[columns[start:stop]])


@functools.cache
def _numba_kernels() -> dict[str, Callable]:
    """Compile (once; cached on disk) the three products over a CSR pattern.

    Serial on purpose: on this 2-core machine shared with other work, numba's
    parallel versions waited ~8 ms a call for their second thread and were no
    faster on wide layers, whose time goes into fetching rows from memory.
    """
    try:
        numba = importlib.import_module("numba")
    except ImportError as error:
        raise RuntimeError("backend='numba' needs the numba package (pip install numba); "
                           "backend='numpy' computes the same without it, slower") from error
    jit = numba.njit(fastmath=True, cache=True)

    @jit
    def matmul(indptr, columns, weight, inputs, outputs):  # pragma: no cover - compiled
        for row in range(len(indptr) - 1):
            outputs[row, :] = 0.0
            for k in range(indptr[row], indptr[row + 1]):
                value, column = weight[k], columns[k]
                for b in range(inputs.shape[1]):
                    outputs[row, b] += value * inputs[column, b]

    @jit
    def matmul_transposed(indptr, columns, weight, grad_outputs, grad_inputs):  # pragma: no cover
        for row in range(len(indptr) - 1):
            for k in range(indptr[row], indptr[row + 1]):
                value, column = weight[k], columns[k]
                for b in range(grad_outputs.shape[1]):
                    grad_inputs[column, b] += value * grad_outputs[row, b]

    @jit
    def sddmm(indptr, columns, left, right, out):  # pragma: no cover - compiled
        for row in range(len(indptr) - 1):
            for k in range(indptr[row], indptr[row + 1]):
                column, total = columns[k], np.float32(0.0)
                for b in range(left.shape[1]):
                    total += left[row, b] * right[column, b]
                out[k] = total

    return {"matmul": matmul, "matmul_transposed": matmul_transposed, "sddmm": sddmm}


def index_dtype(numel: int) -> type:
    """int32 while every index fits, as scipy itself would pick; int64 beyond."""
    return np.int32 if numel < 2**31 else np.int64


def sample_inactive(active: np.ndarray, numel: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct flat positions drawn uniformly from [0, numel) minus ``active`` (sorted int64).

    While the result stays under half full, positions are drawn by rejection, so
    nothing of size ``numel`` is made. Past that the free positions are listed
    outright: then ``numel < 2 * (len(active) + count)``, so the list still scales
    with the number of active weights.
    """
    if count > numel - len(active):
        raise ValueError(f"cannot draw {count} inactive positions out of {numel - len(active)}")
    if 2 * (len(active) + count) > numel:
        taken = np.zeros(numel, dtype=bool)
        taken[active] = True
        return np.sort(rng.choice(np.flatnonzero(~taken), size=count, replace=False))
    chosen = np.empty(0, dtype=np.int64)
    while len(chosen) < count:
        need = count - len(chosen)
        free = numel - len(active) - len(chosen)  # at least half of numel, so few rounds
        draws = np.sort(rng.integers(0, numel, size=int(need * numel / free * 1.1) + 16))
        first = np.concatenate([[True], draws[1:] != draws[:-1]])  # np.unique, minus its slower hashing
        new = draws[first & ~_contains(active, draws) & ~_contains(chosen, draws)]
        chosen = np.sort(np.concatenate([chosen, rng.permutation(new)[:need]]))  # disjoint by construction
    return chosen


def _contains(sorted_values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Whether each query is in ``sorted_values``."""
    if len(sorted_values) == 0:
        return np.zeros(len(queries), dtype=bool)
    where = np.minimum(np.searchsorted(sorted_values, queries), len(sorted_values) - 1)
    return sorted_values[where] == queries


class SparseLinear:
    """A linear layer ``y = W x + b`` whose weight W (out, in) exists only as its active entries.

    Arrays, all on the backend's device:
        weight, columns: (nnz,) the value and column of each active weight, sorted
            row-major: with ``indptr`` they are the CSR data and indices arrays.
        indptr: (out + 1,) row ``i`` owns entries ``indptr[i]:indptr[i + 1]``.
        rows: (nnz,) each weight's row, only where the backend's SDDMM needs it (else None).
        matrix: the backend's CSR matrix over those same arrays (None for numba).
        bias, bias_grad: (out,) dense.
        weight_grad: (nnz,) the loss gradient at the active positions only.
        state, bias_state: optimizer values by name (momentum, Adam moments),
            shaped like ``weight`` and ``bias``; a topology update keeps a surviving
            connection's values and starts a new connection's at zero.
    """

    def __init__(self, shape: tuple[int, int], positions, weight, bias, backend: ArrayBackend):
        """Build from sorted unique flat positions ``row * in + col`` (host int64) and matching values."""
        self.shape = (int(shape[0]), int(shape[1]))
        self.backend = backend
        xp = backend.xp
        self.bias = xp.array(bias, dtype=xp.float32)  # a copy: never share a caller's (torch) memory
        self.bias_grad = xp.zeros_like(self.bias)
        self.bias_state: dict = {}
        self.state: dict = {}
        self._set_topology(np.asarray(positions, dtype=np.int64), xp.array(weight, dtype=xp.float32))

    @classmethod
    def random(cls, out_features: int, in_features: int, density: float, rng: np.random.Generator,
               backend: ArrayBackend) -> "SparseLinear":
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
        return cls((out_features, in_features), positions, weight.astype(np.float32), bias, backend)

    def _set_topology(self, positions: np.ndarray, weight) -> None:
        xp = self.backend.xp
        out_features, in_features = self.shape
        dtype = index_dtype(max(len(positions), out_features, in_features) + 1)
        rows, columns = np.divmod(positions, in_features)
        indptr = np.zeros(out_features + 1, dtype=dtype)
        np.cumsum(np.bincount(rows, minlength=out_features), out=indptr[1:])
        self.rows = xp.asarray(rows.astype(dtype)) if self.backend.keeps_rows else None
        self.columns = xp.asarray(columns.astype(dtype))
        self.indptr = xp.asarray(indptr)
        self.weight = weight
        self.weight_grad = xp.zeros_like(weight)
        self.matrix = self.backend.csr(self.weight, self.columns, self.indptr, self.shape)

    @property
    def active_count(self) -> int:
        return int(self.weight.shape[0])

    def positions(self) -> np.ndarray:
        """Sorted flat positions ``row * in + col`` of the active weights (host int64)."""
        indptr = self.backend.to_host(self.indptr)
        rows = np.repeat(np.arange(self.shape[0], dtype=np.int64), np.diff(indptr))
        return rows * self.shape[1] + self.backend.to_host(self.columns)

    @property
    def density(self) -> float:
        return self.active_count / (self.shape[0] * self.shape[1])

    def forward(self, inputs):
        """(in, batch) -> (out, batch)."""
        outputs = self.backend.matmul(self, inputs)
        outputs += self.bias[:, None]
        return outputs

    def backward(self, grad_outputs, inputs, need_input_grad: bool = True):
        """Fill ``weight_grad`` and ``bias_grad`` from dZ (out, batch); return dA (in, batch) or None."""
        self.backend.sddmm(self, grad_outputs, inputs)
        grad_outputs.sum(axis=1, out=self.bias_grad)
        return self.backend.matmul_transposed(self, grad_outputs) if need_input_grad else None

    def prune_and_regrow(self, prune_ratio: float, rng: np.random.Generator) -> LayerUpdate:
        """SET: drop the ``prune_ratio`` smallest-magnitude weights, regrow as many at random.

        The rule of ``dst.prune_regrow.apply_dst_step``: ``min(round(ratio * active),
        inactive)`` weights move, and regrowth draws from the positions inactive before
        this update (a weight pruned now is not regrown now). Regrown weights start at
        zero, which leaves the network's function unchanged at the update (SET's random
        values make the loss jump) and keeps this trainer comparable with the masked one;
        their optimizer state starts at zero too, so no stale momentum pushes them.
        """
        xp = self.backend.xp
        active = self.active_count
        count = min(round(prune_ratio * active), self.shape[0] * self.shape[1] - active)
        if count == 0:
            return LayerUpdate(active=active, pruned=0, regrown=0)
        pruned = xp.argpartition(xp.abs(self.weight), count - 1)[:count]
        keep = xp.ones(active, dtype=bool)
        keep[pruned] = False
        keep_host = self.backend.to_host(keep)
        before = self.positions()
        regrown = sample_inactive(before, self.shape[0] * self.shape[1], count, rng)
        positions = np.concatenate([before[keep_host], regrown])
        order = np.argsort(positions)
        order_device = self.backend.from_host(order)

        def remap(values):
            return xp.concatenate([values[keep], xp.zeros(count, dtype=values.dtype)])[order_device]

        weight = remap(self.weight)
        self.state = {name: remap(values) for name, values in self.state.items()}
        self._set_topology(positions[order], weight)
        return LayerUpdate(active=self.active_count, pruned=count, regrown=count)

    def to_dense(self) -> np.ndarray:
        """The weight as a dense host array: for tests and export of small layers only."""
        dense = np.zeros(self.shape[0] * self.shape[1], dtype=np.float32)
        dense[self.positions()] = self.backend.to_host(self.weight)
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


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer, shared by the truly sparse and the masked trainer so their runs compare.

    ``dst.csr.mlp.torch_optimizer`` builds the torch twin of this config.
    """

    # "sgd" (torch.optim.SGD, momentum without dampening) or "adam" (torch.optim.Adam, L2 decay).
    name: str = "sgd"
    # A 99%-sparse MLP wants a large step: on MNIST, one epoch at batch 128 reached 90.7% at
    # lr 0.05 and 94.3% at 0.2 (hidden 1024x2, ERK). Use ~0.05 for a dense net or for Adam ~1e-3.
    lr: float = 0.2
    momentum: float = 0.9
    # SET's order of magnitude (2e-4): small weights drift towards the pruning cut.
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; choose one of {sorted(OPTIMIZERS)}")
        for field_name in ("lr", "momentum", "weight_decay", "eps"):
            value = getattr(self, field_name)
            # not (value >= 0) also refuses NaN, which would train every weight to NaN
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 <= value < math.inf):
                raise ValueError(f"{field_name} must be a finite non-negative number, got {value!r}")
        betas_ok = len(self.betas) == 2 and all(isinstance(beta, numbers.Real) and 0 <= beta < 1
                                                for beta in self.betas)
        if not (self.momentum < 1 and betas_ok):
            raise ValueError(f"momentum and betas must be in [0, 1), got {self.momentum}, {self.betas}")

    @property
    def state_names(self) -> tuple[str, ...]:
        """The per-weight state arrays this optimizer keeps."""
        return OPTIMIZERS[self.name].state_names(self)


class SparseSGD:
    """torch.optim.SGD's update on an array of active weights (or a dense bias)."""

    @staticmethod
    def state_names(config: OptimizerConfig) -> tuple[str, ...]:
        return ("momentum",) if config.momentum else ()

    @staticmethod
    def update(config: OptimizerConfig, values, grad, state: dict, step: int) -> None:
        """Update ``values`` in place (it is CSR data: never rebind it); ``grad`` is scratch."""
        if config.weight_decay:
            grad += config.weight_decay * values
        if config.momentum:
            buffer = state["momentum"]
            buffer *= config.momentum
            buffer += grad
            grad = buffer
        values -= config.lr * grad


class SparseAdam:
    """torch.optim.Adam's update (step counted from 1) on an array of active weights."""

    @staticmethod
    def state_names(config: OptimizerConfig) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    @staticmethod
    def update(config: OptimizerConfig, values, grad, state: dict, step: int) -> None:
        """Update ``values`` in place; a regrown weight's zeroed moments start it like a new one."""
        beta1, beta2 = config.betas
        if config.weight_decay:
            grad += config.weight_decay * values
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg *= beta1
        exp_avg += (1 - beta1) * grad
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * grad * grad
        denom = exp_avg_sq ** 0.5 / math.sqrt(1 - beta2 ** step)
        denom += config.eps
        values -= config.lr / (1 - beta1 ** step) * exp_avg / denom


OPTIMIZERS = {"sgd": SparseSGD, "adam": SparseAdam}
