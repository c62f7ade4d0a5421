"""Whether the optional GPU pieces (cupy and a CUDA device) can be used.

``CUPY_GPU_AVAILABLE`` is probed on its first read, not when this module is imported: importing
cupy and asking the CUDA driver takes a while, and most imports (``utils``, ``dst.tutorial.benchmark``)
never need the answer.
"""

import functools
import importlib


@functools.cache
def cupy_gpu_available() -> bool:
    """Whether cupy imports and sees a CUDA device (probed once, on the first call)."""
    try:
        cupy = importlib.import_module("cupy")
    except ImportError:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # cupy raises its own CUDARuntimeError (and others) when no driver answers
        return False


def __getattr__(name: str):
    if name == "CUPY_GPU_AVAILABLE":  # the module constant of earlier versions, now read lazily
        return cupy_gpu_available()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def require_cupy():
    """Return the cupy module, or raise a RuntimeError that says what is missing."""
    try:
        cupy = importlib.import_module("cupy")
    except ImportError as error:
        raise RuntimeError(
            "the cupy backend needs the cupy package and a CUDA GPU: cupy is not installed "
            "(pip install -r requirements-gpu.txt on a machine with CUDA 12)") from error
    if not cupy_gpu_available():
        raise RuntimeError("the cupy backend needs a CUDA GPU: cupy is installed but no CUDA device answered")
    return cupy
