"""Inference timing: the masked dense network against its truly sparse (CSR) versions.

Every row times the forward pass only, on an input already in the array library
and on the device that row runs on: the dense rows get a torch tensor, the scipy
row a numpy array, the cupy row a cupy array. Conversion to CSR, copying the model
and moving the input happen before the timer starts. GPU rows are synchronised
before and after each run, so a run's time includes all the GPU work it queued.
The rows take turns, one run of each per round, so a shared machine's slow
moments hit every row alike.
"""

import copy
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import scipy
import torch

from dst.core.checks import check_positive_int
from dst.core.gpu import cupy_gpu_available
from dst.csr.backends import default_cpu_backend, numba_available
from dst.csr.model import SparseNet
from dst.engine.masked import MaskedNet
from dst.tutorial import benchmark_rows as rows


def time_forward(forward: Callable[[], object], runs: int = 10, warmup: int = 3,
                 synchronize: Callable[[], None] | None = None) -> dict:
    """Call ``forward`` ``warmup`` times untimed, then ``runs`` times under ``time.perf_counter``.

    Returns ``{'mean', 'std', 'median', 'min', 'runs'}``: times in milliseconds
    (``std`` is the sample standard deviation, 0 for a single run), ``runs`` a count.
    """
    return time_interleaved({"forward": (forward, synchronize)}, runs, warmup)["forward"]


def time_interleaved(forwards: dict[str, tuple[Callable[[], object], Callable[[], None] | None]],
                     runs: int = 10, warmup: int = 3) -> dict[str, dict]:
    """Time several ``{name: (forward, synchronize or None)}`` in turn, one run of each per round.

    Interleaving the runs spreads any slowdown of a shared machine over every
    entry alike, so their ratios stay fair. Returns ``time_forward``'s dict per name.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    syncs = {name: synchronize or (lambda: None) for name, (_, synchronize) in forwards.items()}
    for name, (forward, _) in forwards.items():
        for _ in range(warmup):
            forward()
        syncs[name]()
    times: dict[str, list[float]] = {name: [] for name in forwards}
    for _ in range(runs):
        for name, (forward, _) in forwards.items():
            start = time.perf_counter()
            forward()
            syncs[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"mean": statistics.fmean(values), "std": statistics.stdev(values) if runs > 1 else 0.0,
                   "median": statistics.median(values), "min": min(values), "runs": runs}
            for name, values in times.items()}


def first_samples(loader: Iterable, num_samples: int) -> torch.Tensor:
    """The first ``num_samples`` inputs of ``loader`` (batches of tensors or (input, target) pairs), on the CPU.

    Raises ValueError when the loader holds fewer, rather than return fewer than asked for.
    """
    check_positive_int(num_samples=num_samples)
    batches, count = [], 0
    for batch in loader:
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(inputs, torch.Tensor):
            kind = f"a dict with keys {sorted(map(str, batch))}" if isinstance(batch, dict) else \
                f"a {type(inputs).__name__}"
            raise TypeError(f"benchmark_inference needs batches of input tensors or (inputs, targets) pairs, got "
                            f"{kind}; make the loader yield (inputs, targets) tuples")
        batches.append(inputs.detach().cpu())
        count += inputs.shape[0]
        if count >= num_samples:
            break
    if not batches:
        raise ValueError("the loader yielded no batches")
    if count < num_samples:
        raise ValueError(f"num_samples={num_samples} but the loader holds only {count} samples: "
                         f"pass num_samples={count} or a larger loader")
    return torch.cat(batches)[:num_samples]


def benchmark_inference(model: MaskedNet, loader: Iterable, device, num_samples: int = 100,
                        runs: int = 10, warmup: int = 3) -> dict[str, dict]:
    """Time the masked dense forward and the truly sparse forwards on the first ``num_samples`` of ``loader``.

    Args:
        model: a MaskedNet; it is copied, never moved or switched to eval mode.
        device: where the GPU rows run. They run only when it is a CUDA device that
            torch can use (``MASKED_GPU``, ``TORCH_SPARSE_GPU``), and the cupy row
            (``CSR_GPU``) only when cupy also sees a GPU.

    Returns:
        ``{row name: {'mean', 'std', 'median', 'min', 'runs'}}`` in milliseconds per
        forward of the whole ``num_samples`` batch; row names are ``dst.tutorial.benchmark_rows``'
        constants. Always present: ``DENSE_CPU`` (the same weights without the mask step,
        i.e. a plain dense net), ``MASKED_CPU``, ``CSR_CPU`` (the default CPU engine:
        numba's fused kernels on numba's threads where numba is installed, else scipy),
        ``CSR_SCIPY_CPU`` (single-threaded scipy, only when numba is the default) and
        ``TORCH_SPARSE_CPU``; the dense and torch rows use torch's
        current thread count (see ``benchmark_environment``). Each sparse model runs once
        before any timing, so numba's compilation is never timed. On a machine shared
        with other jobs, start Python with OMP_WAIT_POLICY=PASSIVE (or use one torch
        thread): spinning OpenMP threads can stall torch's multi-threaded forwards
        by tens of milliseconds and slow the single-threaded scipy row run after them.
    """
    if not isinstance(model, MaskedNet):
        raise TypeError(f"benchmark_inference needs a dst.engine.masked.MaskedNet, got {type(model).__name__}")
    with torch.no_grad():
        return time_interleaved(inference_forwards(model, first_samples(loader, num_samples), device), runs, warmup)


def inference_forwards(model: MaskedNet, inputs: torch.Tensor, device) -> dict[str, tuple]:
    """``benchmark_inference``'s rows as ``{name: (forward, synchronize or None)}`` for ``time_interleaved``.

    Each forward runs one model on ``inputs`` already placed where it runs; the models
    are copies or CSR conversions of ``model``, which is left as it is.
    """
    dense = copy.deepcopy(model).to("cpu").eval()
    # The same weights without the mask step: what a plain dense net of this shape costs.
    unmasked = copy.deepcopy(dense)
    for layer in unmasked.masked_layers().values():
        layer.apply_mask = False
    inputs = inputs.detach().cpu()
    forwards = {rows.DENSE_CPU: (lambda: unmasked(inputs), None),
                rows.MASKED_CPU: (lambda: dense(inputs), None),
                rows.CSR_CPU: _sparse_forward(dense, default_cpu_backend(), None, inputs)}
    if default_cpu_backend() != "scipy":
        forwards[rows.CSR_SCIPY_CPU] = _sparse_forward(dense, "scipy", None, inputs)
    forwards[rows.TORCH_SPARSE_CPU] = _sparse_forward(dense, "torch", None, inputs)
    if _gpu_rows_reason(device) is None:
        gpu = torch.device(device)
        dense_gpu, inputs_gpu = copy.deepcopy(dense).to(gpu), inputs.to(gpu)
        forwards[rows.MASKED_GPU] = (lambda: dense_gpu(inputs_gpu), lambda: torch.cuda.synchronize(gpu))
        if cupy_gpu_available():
            forwards[rows.CSR_GPU] = _sparse_forward(dense, "cupy", gpu, inputs)
        forwards[rows.TORCH_SPARSE_GPU] = _sparse_forward(dense, "torch", gpu, inputs)
    return forwards


def _sparse_forward(masked: MaskedNet, backend: str, device, inputs: torch.Tensor) -> tuple:
    """(forward, synchronize) of ``masked`` converted to ``backend``, its input already on the backend."""
    sparse = SparseNet.from_masked(masked, backend, device)
    array = sparse.as_input(inputs)
    sparse(array)  # untimed: numba compiles (or loads from its disk cache) on the first call
    sparse.synchronize()
    return (lambda: sparse(array)), sparse.synchronize


def _gpu_rows_reason(device) -> str | None:
    """Why the GPU rows do not run on ``device``, or None when they do."""
    if device is None or torch.device(device).type != "cuda":
        return f"device is '{device}', not a CUDA device"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def _numba_environment() -> dict:
    """numba's version and thread count, None where numba is not installed."""
    if not numba_available():
        return {"numba": None, "numba_threads": None}
    import numba

    return {"numba": numba.__version__, "numba_threads": numba.get_num_threads()}


def cpu_model() -> str | None:
    """The CPU's model name (Linux's /proc/cpuinfo, else ``platform.processor()``), or None if neither says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def benchmark_environment(device=None) -> dict:
    """What the timings depend on: library versions, thread counts, CPU count, and which GPU rows run.

    ``device`` is the one given to ``benchmark_inference``; by default CUDA when torch sees it.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = _gpu_rows_reason(device)
    cupy_reason = None if cupy_gpu_available() else "cupy is not installed or sees no GPU"
    return {
        "torch": torch.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
        "python": platform.python_version(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # ACTIVE (the default) lets idle OpenMP threads spin; on a shared machine that can stall torch's
        # multi-threaded forwards and steal the core a single-threaded row runs on.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "scipy_threads": 1,  # scipy.sparse's CSR kernels are single-threaded
        "cpu_sparse_backend": default_cpu_backend(),  # the engine of the rows.CSR_CPU row
        **_numba_environment(),
        "gpu_rows": reason is None, "gpu_skipped_reason": reason,  # reasons are None where the rows run
        "cupy_row": reason is None and cupy_reason is None, "cupy_skipped_reason": reason or cupy_reason,
        "gpu_name": torch.cuda.get_device_name(torch.device(device)) if reason is None else None,
    }
