"""The array backends of the truly sparse engine: one registry, ``BACKENDS``, for inference and training alike.

Names: ``scipy`` (numpy + scipy.sparse, CPU, the readable reference), ``numba``
(numpy arrays with compiled kernels straight on the CSR arrays, CPU, the fastest
there), ``cupy`` (cupy + cupyx.scipy.sparse, CUDA GPU) and ``torch``
(torch.sparse_csr, CPU or CUDA). ``scipy`` and ``cupy`` are one code path,
``ArrayOps``, written against an array module ``xp`` and its sparse module, so the
CPU tests run the code the GPU runs; ``numba`` is ``ArrayOps`` on numpy with its
own conv and linear steps (``dst.csr.numba_backend``); ``torch`` is ``TorchOps``
(``dst.csr.torch_backend``), a thin adapter with the same methods. cupy and numba are imported only when asked for.

``Backend`` is what callers use. Inference (``dst.csr.model.SparseNet``) needs the
array operations and the conv and linear steps; training (``dst.csr.linear``) also
needs ``training``, the three products of a training step (SpMM, transposed SpMM,
SDDMM). That capability is optional: ``torch`` is inference only, and
``require_training`` says so, naming the backends that can train.
"""

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from dst.core.gpu import require_cupy
from dst.csr.steps import ConvStep, LinearStep

# The numpy SDDMM works on chunks of this many gathered floats per operand: 1 Mi floats
# (4 MiB) stays in cache; one whole-matrix gather was 5-10x slower here.
SDDMM_CHUNK_FLOATS = 1 << 20


@dataclass(frozen=True)
class TrainingProducts:
    """A backend's optional training capability: the three sparse products of a training step.

    Each product takes a ``dst.csr.linear.SparseLinear`` and feature-major dense operands:
    ``matmul(layer, A)`` is W @ A (out, batch), ``matmul_transposed(layer, dZ)`` is
    W.T @ dZ (in, batch), and ``sddmm(layer, dZ, A)`` writes ``dZ[row_k] . A[col_k]`` for
    every active weight ``k`` into ``layer.weight_grad``.
    """

    keeps_rows: bool  # whether layers hold each weight's row index (the gathering SDDMM needs it)
    matrix: Callable  # (weight, columns, indptr, shape) -> a CSR matrix sharing those arrays, or None
    matmul: Callable
    matmul_transposed: Callable
    sddmm: Callable


class Backend(Protocol):
    """What the engine uses of a backend; ``ArrayOps``, ``NumbaOps`` and ``TorchOps`` implement it.

    Arrays are the backend's own (numpy, cupy or torch); activations are batch-last.
    """

    name: str
    conv_step: type  # the inference steps that run a conv and a linear on this backend
    linear_step: type
    training: TrainingProducts | None  # None: inference only
    xp: object  # the array module (numpy or cupy) training is written against; None for torch

    def context(self) -> contextlib.AbstractContextManager: ...  # the device arrays are made on
    def asarray(self, host: np.ndarray): ...  # host -> device
    def to_numpy(self, array) -> np.ndarray: ...  # device -> host
    def as_input(self, x): ...  # numpy, torch or the backend's array -> float32 on the device
    def csr(self, values, col_indices, row_pointers, shape): ...  # host CSR arrays -> a CSR matrix
    def csr_arrays(self, matrix) -> tuple: ...  # (values, col_indices, row_pointers) as held
    def zeros(self, shape): ...
    def empty(self, shape): ...
    def matmul(self, matrix, dense): ...  # CSR @ dense
    def maximum(self, a, b, out): ...
    def relu_(self, x): ...
    def relu(self, x): ...
    def batch_last(self, x): ...  # (N, ...) -> (..., N), contiguous
    def batch_first(self, y): ...  # (..., N) -> (N, ...), always a copy
    def synchronize(self) -> None: ...


class ArrayOps:
    """The array operations the engine needs, for a numpy-like module ``xp`` and its sparse module."""

    conv_step, linear_step = ConvStep, LinearStep

    def __init__(self, name: str, xp, sparse, context=contextlib.nullcontext,
                 training: TrainingProducts | None = None):
        self.name, self.xp, self.sparse, self.context, self.training = name, xp, sparse, context, training

    def asarray(self, host: np.ndarray):
        with self.context():
            return self.xp.asarray(host)

    def as_input(self, x):
        """``x`` (numpy, torch or this backend's array) as a float32 array of this backend."""
        if isinstance(x, torch.Tensor):
            x = x.detach()
            x = self.xp.from_dlpack(x) if x.is_cuda and self.xp is not np else x.cpu().numpy()
        with self.context():
            return self.xp.asarray(x, dtype=self.xp.float32)

    def csr(self, values: np.ndarray, col_indices: np.ndarray, row_pointers: np.ndarray, shape):
        with self.context():
            data = (self.asarray(values), self.asarray(col_indices), self.asarray(row_pointers))
            return self.sparse.csr_matrix(data, shape=shape, copy=False)

    def csr_arrays(self, matrix) -> tuple:
        return matrix.data, matrix.indices, matrix.indptr

    def zeros(self, shape):
        with self.context():
            return self.xp.zeros(shape, dtype=self.xp.float32)

    def empty(self, shape):
        with self.context():
            return self.xp.empty(shape, dtype=self.xp.float32)

    def matmul(self, matrix, dense):
        return matrix @ dense

    def maximum(self, a, b, out):
        return self.xp.maximum(a, b, out=out)

    def relu_(self, x):
        return self.xp.maximum(x, 0, out=x)

    def relu(self, x):
        return self.xp.maximum(x, 0)

    def batch_last(self, x):
        return self.xp.ascontiguousarray(self.xp.moveaxis(x, 0, -1))

    def batch_first(self, y):
        # Always a copy: ``y`` may be a step's kept buffer, which the next call overwrites, and at
        # batch 1 the transpose alone is already contiguous, i.e. a view of it.
        return self.xp.moveaxis(y, -1, 0).copy()

    def to_numpy(self, array) -> np.ndarray:
        return array if self.xp is np else self.xp.asnumpy(array)

    def synchronize(self) -> None:
        if self.xp is not np:
            self.xp.cuda.get_current_stream().synchronize()


# ----------------------------------------------------------------------------- training products

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


def _sparse_products(matrix: Callable) -> TrainingProducts:
    """scipy's and cupy's training products: their own CSR products and a gathering SDDMM."""
    return TrainingProducts(keeps_rows=True, matrix=matrix, matmul=_matmul_csr,
                            matmul_transposed=_matmul_transposed_csr, sddmm=_sddmm_gather)


# ----------------------------------------------------------------------------- the registry

def _scipy(device=None) -> ArrayOps:
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"the scipy backend runs on the CPU; got device={device!r} (use 'cupy' for a GPU)")
    import scipy.sparse

    def matrix(weight, columns, indptr, shape):
        return scipy.sparse.csr_array((weight, columns, indptr), shape=shape, copy=False)

    return ArrayOps("scipy", np, scipy.sparse, training=_sparse_products(matrix))


def _cupy(device=None) -> ArrayOps:
    if device is not None and torch.device(device).type != "cuda":
        raise ValueError(f"the cupy backend runs on a CUDA GPU; got device={device!r} (use 'scipy' for the CPU)")
    cupy = require_cupy()
    import cupyx.scipy.sparse

    def matrix(weight, columns, indptr, shape):
        return cupyx.scipy.sparse.csr_matrix((weight, columns, indptr), shape=shape, copy=False)

    index = cupy.cuda.runtime.getDevice() if device is None else torch.device(device).index or 0
    return ArrayOps("cupy", cupy, cupyx.scipy.sparse, context=lambda: cupy.cuda.Device(index),
                    training=_sparse_products(matrix))


def _torch(device=None):
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"the torch backend was asked for {device} but torch sees no CUDA device")
    from dst.csr.torch_backend import TorchOps

    return TorchOps(device)


def _numba(device=None):
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"the numba backend runs on the CPU; got device={device!r} (use 'cupy' for a GPU)")
    if not numba_available():
        raise ImportError("backend='numba' needs the numba package (pip install numba); "
                          "backend='scipy' computes the same without it, slower")
    from dst.csr.numba_backend import NumbaOps

    return NumbaOps()


BACKENDS: dict[str, Callable[..., Backend]] = {"scipy": _scipy, "numba": _numba, "cupy": _cupy, "torch": _torch}
# The backends whose ``training`` is set (checked by tests/test_sparse_training.py).
TRAINING_BACKENDS = ("cupy", "numba", "scipy")


@functools.cache
def numba_available() -> bool:
    """Whether numba imports (the ``numba`` backend's only extra requirement)."""
    try:
        import numba  # noqa: F401
    except ImportError:  # not installed, or built for another numpy
        return False
    return True


def default_cpu_backend() -> str:
    """The fastest CPU backend installed: ``numba`` where numba is importable, else ``scipy`` (the reference)."""
    return "numba" if numba_available() else "scipy"


def get_backend(name: str | None = None, device=None) -> Backend:
    """The backend called ``name`` (one of ``BACKENDS``; None: ``default_cpu_backend()``) on ``device``."""
    if name is None:
        name = default_cpu_backend()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name](device)


def require_training(backend: Backend) -> TrainingProducts:
    """``backend``'s training products, or a clear error for an inference-only backend."""
    if backend.training is None:
        raise ValueError(f"backend {backend.name!r} runs inference only: training needs the transposed "
                         f"product and SDDMM it lacks; the backends that can train are {list(TRAINING_BACKENDS)}")
    return backend.training
