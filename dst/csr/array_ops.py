"""What a backend of the truly sparse engine is, apart from the registry that names them.

``Ops`` is the Protocol callers use; ``ArrayOps`` implements it once for a numpy-like
array module and its scipy-like sparse module (``scipy`` and ``cupy`` are instances of it,
``numba``'s ``NumbaOps`` a subclass); ``TrainingProducts`` is a backend's optional training
capability (SpMM, transposed SpMM, SDDMM), and ``sparse_products`` builds the one scipy and
cupy share. Here, not in ``dst.csr.backends``, so the backend modules the registry imports
(``numba_backend``, ``torch_backend``) import this and never the registry: no import circle.
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


def narrowest_dtype(largest: int, dtypes: tuple) -> type:
    """The first of ``dtypes`` (narrowest first) that holds ``largest``, else the last one.

    The engine's one index-width rule: numba's 16-bit column indices, SparseLinear's int32 arrays
    (int64 beyond), and the compact unsigned indices of the .npz file.
    """
    return next((dtype for dtype in dtypes if largest <= np.iinfo(dtype).max), dtypes[-1])


# The numpy SDDMM works on chunks of this many gathered floats per operand: 1 Mi floats
# (4 MiB) stays in cache; one whole-matrix gather was 5-10x slower here.
SDDMM_CHUNK_FLOATS = 1 << 20
# ReLU's backward masks the gradient this many rows at a time, so its boolean temporary stays
# small (1 MiB at batch 128) however wide the layer.
RELU_CHUNK_ROWS = 8192


@dataclass(frozen=True)
class TrainingProducts:
    """A backend's optional training capability: the three sparse products of a training step.

    Each product takes a ``dst.csr.linear.SparseLinear`` and feature-major dense operands:
    ``matmul(layer, A, relu)`` is W @ A + b (out, batch), through a ReLU if ``relu``;
    ``matmul_transposed(layer, dZ)`` is W.T @ dZ (in, batch), and ``sddmm(layer, dZ, A)``
    writes ``dZ[row_k] . A[col_k]`` for every active weight ``k`` into ``layer.weight_grad``.
    ``backward(layer, dZ, A, need_input_grad, relu_input)`` does the last two (W.T @ dZ only
    if asked, times ``A > 0`` if ``A`` is a ReLU's output; returns it, else None):
    ``separate_backward`` calls them in turn, a backend may fuse them.
    """

    keeps_rows: bool  # whether layers hold each weight's row index (the gathering SDDMM needs it)
    matrix: Callable  # (weight, columns, indptr, shape) -> a CSR matrix sharing those arrays, or None
    matmul: Callable
    matmul_transposed: Callable
    sddmm: Callable
    backward: Callable


class Ops(Protocol):
    """What the engine uses of a backend; ``ArrayOps``, ``NumbaOps`` and ``TorchOps`` implement it.

    Arrays are the backend's own (numpy, cupy or torch); activations are batch-last.
    """

    name: str
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

    def link(self, steps: list) -> None:
        """Let neighbouring steps agree on how they hand activations over (``SparseNet`` calls it once the steps
        are built); nothing here: each step takes its input as the one before returns it."""

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
        # transpose, not moveaxis: the same view, without moveaxis's microseconds of argument checks,
        # which a batch-1 forward of a small layer notices.
        return self.xp.ascontiguousarray(x.transpose(*range(1, x.ndim), 0))

    def batch_first(self, y):
        # Always a copy: ``y`` may be a step's kept buffer, which the next call overwrites, and at
        # batch 1 the transpose alone is already contiguous, i.e. a view of it.
        return y.transpose(y.ndim - 1, *range(y.ndim - 1)).copy()

    def to_numpy(self, array) -> np.ndarray:
        return array if self.xp is np else self.xp.asnumpy(array)

    def synchronize(self) -> None:
        if self.xp is not np:
            self.xp.cuda.get_current_stream().synchronize()


# ----------------------------------------------------------------------------- training products

def _matmul_csr(layer, inputs, relu: bool):
    outputs = layer.matrix @ inputs
    outputs += layer.bias[:, None]
    return layer.ops.xp.maximum(outputs, 0, out=outputs) if relu else outputs


def _matmul_transposed_csr(layer, grad_outputs):
    return layer.matrix.T @ grad_outputs  # the CSR arrays read as CSC: no copy


def _sddmm_gather(layer, left, right) -> None:
    """Gather the rows each chunk of weights needs and dot them, ``batch`` floats each."""
    xp, rows, columns, out = layer.ops.xp, layer.rows, layer.columns, layer.weight_grad
    chunk = max(1, SDDMM_CHUNK_FLOATS // max(1, left.shape[1]))
    for start in range(0, len(rows), chunk):
        stop = min(start + chunk, len(rows))
        out[start:stop] = xp.einsum("ij,ij->i", left[rows[start:stop]], right[columns[start:stop]])


def separate_backward(layer, grad_outputs, inputs, need_input_grad: bool, relu_input: bool):
    """The backward as two products: the SDDMM into ``layer.weight_grad``, then W.T @ dZ if asked (else None),
    times ``inputs > 0`` if ``relu_input``."""
    layer.products.sddmm(layer, grad_outputs, inputs)
    if not need_input_grad:
        return None
    grad_inputs = layer.products.matmul_transposed(layer, grad_outputs)
    if relu_input:
        relu_backward_(grad_inputs, inputs)
    return grad_inputs


def relu_backward_(grad, activations) -> None:
    """``grad *= activations > 0`` in place, in chunks of rows (no activation-sized temporary)."""
    for start in range(0, len(grad), RELU_CHUNK_ROWS):
        grad[start:start + RELU_CHUNK_ROWS] *= activations[start:start + RELU_CHUNK_ROWS] > 0


def sparse_products(matrix: Callable) -> TrainingProducts:
    """scipy's and cupy's training products: their own CSR products and a gathering SDDMM."""
    return TrainingProducts(keeps_rows=True, matrix=matrix, matmul=_matmul_csr,
                            matmul_transposed=_matmul_transposed_csr, sddmm=_sddmm_gather,
                            backward=separate_backward)
