"""The array backends of the truly sparse engine: one registry, ``BACKENDS``, for inference and training alike.

Names: ``scipy`` (numpy + scipy.sparse, CPU, the readable reference), ``numba``
(numpy arrays with compiled kernels straight on the CSR arrays, CPU, the fastest
there), ``cupy`` (cupy + cupyx.scipy.sparse, CUDA GPU) and ``torch``
(torch.sparse_csr, CPU or CUDA). ``scipy`` and ``cupy`` are one code path,
``ArrayOps``, written against an array module ``xp`` and its sparse module, so the
CPU tests run the code the GPU runs; ``numba`` is ``ArrayOps`` on numpy with its
own conv and linear steps (``dst.csr.numba_backend``); ``torch`` is ``TorchOps``
(``dst.csr.torch_backend``), a thin adapter with the same methods. cupy and numba are imported only when asked for.

``Ops`` is what callers use: a backend's operations object (it and ``ArrayOps`` live in ``dst.csr.array_ops``, which the
backend modules import instead of this registry). A backend is named by a string (``backend="numba"``)
and its operations object is ``ops``. Inference (``dst.csr.model.SparseNet``) needs the array operations,
on which each layer kind (``dst.csr.kinds``) builds its steps; training (``dst.csr.linear``) also
needs ``training``, the three products of a training step (SpMM, transposed SpMM,
SDDMM). That capability is optional: ``torch`` is inference only, and
``require_training`` says so, naming the backends that can train.
"""

import functools
from collections.abc import Callable

import numpy as np
import torch

from dst.core.gpu import require_cupy
from dst.csr.array_ops import ArrayOps, Ops, TrainingProducts, sparse_products

# ----------------------------------------------------------------------------- the registry

def _scipy(device=None) -> ArrayOps:
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"the scipy backend runs on the CPU; got device={device!r} (use 'cupy' for a GPU)")
    import scipy.sparse

    def matrix(weight, columns, indptr, shape):
        return scipy.sparse.csr_array((weight, columns, indptr), shape=shape, copy=False)

    return ArrayOps("scipy", np, scipy.sparse, training=sparse_products(matrix))


def _cupy(device=None) -> ArrayOps:
    if device is not None and torch.device(device).type != "cuda":
        raise ValueError(f"the cupy backend runs on a CUDA GPU; got device={device!r} (use 'scipy' for the CPU)")
    cupy = require_cupy()
    import cupyx.scipy.sparse

    def matrix(weight, columns, indptr, shape):
        return cupyx.scipy.sparse.csr_matrix((weight, columns, indptr), shape=shape, copy=False)

    index = cupy.cuda.runtime.getDevice() if device is None else torch.device(device).index or 0
    return ArrayOps("cupy", cupy, cupyx.scipy.sparse, context=lambda: cupy.cuda.Device(index),
                    training=sparse_products(matrix))


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


BACKENDS: dict[str, Callable[..., Ops]] = {"scipy": _scipy, "numba": _numba, "cupy": _cupy, "torch": _torch}
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


def get_backend(name: str | None = None, device=None) -> Ops:
    """The ``Ops`` of backend ``name`` (one of ``BACKENDS``; None: ``default_cpu_backend()``) on ``device``."""
    if name is None:
        name = default_cpu_backend()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name](device)


def require_training(ops: Ops) -> TrainingProducts:
    """``ops``'s training products, or a clear error for an inference-only backend."""
    if ops.training is None:
        raise ValueError(f"backend {ops.name!r} runs inference only: training needs the transposed "
                         f"product and SDDMM it lacks; the backends that can train are {list(TRAINING_BACKENDS)}")
    return ops.training
