"""The array-library backends of the truly sparse engine, chosen by name from ``BACKENDS``.

The engine needs a handful of array operations (upload a CSR matrix, sparse @ dense,
an in-place maximum and ReLU, the batch-last transpose, synchronise). ``scipy``
(numpy + scipy.sparse, CPU) and ``cupy`` (cupy + cupyx.scipy.sparse, GPU) are one code
path, ``ArrayOps``, written against an array module ``xp`` and its sparse module, so
the CPU tests run the code the GPU runs. ``torch`` (torch.sparse_csr, CPU or CUDA) is
``TorchOps``, a thin adapter with the same methods. ``get_ops(name, device)`` returns
one; cupy is imported only when the ``cupy`` backend is asked for.

Each ops object also names the steps that run a conv and a linear on it
(``conv_step``, ``linear_step``): the im2col steps of ``dst.csr.steps`` here, the
fused kernels of ``dst.csr.numba_backend`` for ``numba`` (numpy arrays, numba-compiled
loops straight on the CSR weights; numba is imported only when it is asked for).
``default_cpu_backend()`` is ``numba`` where numba is installed, else ``scipy``.
"""

import contextlib
import functools
import warnings

import numpy as np
import torch

from dst.csr.steps import SparseConv, SparseLinear
from dst.gpu import require_cupy


class ArrayOps:
    """The array operations the engine needs, for a numpy-like module ``xp`` and its sparse module."""

    conv_step, linear_step = SparseConv, SparseLinear

    def __init__(self, name: str, xp, sparse, context=contextlib.nullcontext):
        self.name, self.xp, self.sparse, self.context = name, xp, sparse, context

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


class TorchOps:
    """``ArrayOps`` for torch tensors on ``device``, with torch.sparse CSR matrices."""

    name = "torch"
    context = contextlib.nullcontext
    conv_step, linear_step = SparseConv, SparseLinear

    def __init__(self, device: torch.device):
        self.device = device

    def asarray(self, host: np.ndarray):
        return torch.as_tensor(host, device=self.device)

    def as_input(self, x):
        if isinstance(x, torch.Tensor):
            x = x.detach()
        return torch.as_tensor(x, dtype=torch.float32, device=self.device)

    def csr(self, values, col_indices, row_pointers, shape):
        with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and not actionable
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.asarray(row_pointers), self.asarray(col_indices),
                                           self.asarray(values), size=shape, check_invariants=True)

    def csr_arrays(self, matrix) -> tuple:
        return matrix.values(), matrix.col_indices(), matrix.crow_indices()

    def zeros(self, shape):
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def empty(self, shape):
        return torch.empty(shape, dtype=torch.float32, device=self.device)

    def matmul(self, matrix, dense):
        return matrix @ dense

    def maximum(self, a, b, out):
        return torch.maximum(a, b, out=out)

    def relu_(self, x):
        return x.relu_()

    def relu(self, x):
        return x.relu()

    def batch_last(self, x):
        return x.movedim(0, -1).contiguous()

    def batch_first(self, y):
        return y.movedim(-1, 0).clone(memory_format=torch.contiguous_format)  # a copy: see ArrayOps

    def to_numpy(self, array) -> np.ndarray:
        return array.cpu().numpy()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _scipy_ops(device=None) -> ArrayOps:
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"the scipy backend runs on the CPU; got device={device!r} (use 'cupy' for a GPU)")
    import scipy.sparse

    return ArrayOps("scipy", np, scipy.sparse)


def _cupy_ops(device=None) -> ArrayOps:
    if device is not None and torch.device(device).type != "cuda":
        raise ValueError(f"the cupy backend runs on a CUDA GPU; got device={device!r} (use 'scipy' for the CPU)")
    cupy = require_cupy()
    import cupyx.scipy.sparse

    index = cupy.cuda.runtime.getDevice() if device is None else torch.device(device).index or 0
    return ArrayOps("cupy", cupy, cupyx.scipy.sparse, context=lambda: cupy.cuda.Device(index))


def _torch_ops(device=None) -> TorchOps:
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"the torch backend was asked for {device} but torch sees no CUDA device")
    return TorchOps(device)


def _numba_ops(device=None):
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"the numba backend runs on the CPU; got device={device!r} (use 'cupy' for a GPU)")
    if not numba_available():
        raise ImportError("backend='numba' needs the numba package (pip install numba); "
                          "backend='scipy' computes the same without it, slower")
    from dst.csr.numba_backend import NumbaOps

    return NumbaOps()


BACKENDS = {"scipy": _scipy_ops, "numba": _numba_ops, "cupy": _cupy_ops, "torch": _torch_ops}


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


def get_ops(backend: str, device=None):
    """The array operations of ``backend`` (one of ``BACKENDS``) on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[backend](device)
