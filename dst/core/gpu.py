"""Whether the optional GPU pieces (cupy and a CUDA device) can be used."""

import importlib


def _cupy_gpu_available() -> bool:
    try:
        cupy = importlib.import_module("cupy")
    except ImportError:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # cupy raises its own CUDARuntimeError (and others) when no driver answers
        return False


CUPY_GPU_AVAILABLE: bool = _cupy_gpu_available()


def require_cupy():
    """Return the cupy module, or raise a RuntimeError that says what is missing."""
    try:
        cupy = importlib.import_module("cupy")
    except ImportError as error:
        raise RuntimeError(
            "the cupy backend needs the cupy package and a CUDA GPU: cupy is not installed "
            "(pip install -r requirements-gpu.txt on a machine with CUDA 12)") from error
    if not CUPY_GPU_AVAILABLE:
        raise RuntimeError("the cupy backend needs a CUDA GPU: cupy is installed but no CUDA device answered")
    return cupy
