"""Whether a truly sparse MLP fits in this machine's memory, answered before anything is allocated.

A ``SparseMLP`` holds, per active weight, its value, its gradient, its optimizer state
and its column index (plus its row, for the scipy and cupy SDDMM, and the index layouts
of numba's parallel products: ``TrainingLayout.most_bytes``); per unit, a row pointer,
a bias and the bias's gradient and state. A DST update needs, on top, temporaries on
its widest layer: the sorted int64 positions the update rule works on, the index
array of its partial sort and one merged copy at a time. ``training_bytes`` adds
these up from the layers' shapes and active counts, and ``check_fits`` refuses a
model that would not fit, naming both numbers, so a run that cannot train fails at
once instead of after minutes of allocation (or in the kernel's out-of-memory killer).
"""

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from dst.csr.csr_build import index_dtype

# Bytes per active weight the DST update needs besides the model (``SparseLinear.prune_and_regrow``):
# the int64 positions (8), numpy's argpartition index and magnitudes copy (8 + 4), the keep and
# merge masks (2) and one merged float32 copy with its gather (4 + 4).
UPDATE_BYTES_PER_WEIGHT = 30
MEMINFO = Path("/proc/meminfo")


def available_memory_bytes() -> int | None:
    """Memory the kernel says a new allocation can get without swapping (``MemAvailable``); None if unknown.

    Linux's /proc/meminfo first; elsewhere the free physical pages ``os.sysconf`` reports.
    """
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # reported in KiB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def training_bytes(layers: Iterable[tuple[tuple[int, int], int]], state_count: int, keeps_rows: bool,
                   layout_bytes: Callable[[tuple[int, int], int, bool], int] | None = None) -> dict[str, int]:
    """Bytes a SparseMLP needs to train, from each layer's ``((out, in), active_count)``.

    ``layout_bytes(shape, active_count, first)``: the most a backend's per-topology index layouts
    hold for one layer (numba's ``TrainingLayout.most_bytes``), None where it keeps none.
    Returns ``held`` (what the layers keep between steps, as ``SparseMLP.nbytes`` counts it, those
    layouts at their largest), ``update`` (the widest layer's DST temporaries) and their ``total``.
    """
    held = update = 0
    for position, ((out_features, in_features), count) in enumerate(layers):
        index = index_dtype(max(count, out_features, in_features) + 1)(0).itemsize
        per_weight = 4 * (2 + state_count) + index * (1 + keeps_rows)
        held += count * per_weight + (out_features + 1) * index + 4 * out_features * (2 + state_count)
        if layout_bytes is not None:
            held += layout_bytes((out_features, in_features), count, position == 0)
        update = max(update, count * UPDATE_BYTES_PER_WEIGHT)
    return {"held": held, "update": update, "total": held + update}


def check_fits(needed: dict[str, int], what: str, available: int | None = None) -> None:
    """Raise ``MemoryError`` if ``needed["total"]`` bytes exceed the available memory (unknown: no check)."""
    available = available_memory_bytes() if available is None else available
    if available is None or needed["total"] <= available:
        return
    raise MemoryError(f"{what} needs {gib(needed['total'])} to train ({gib(needed['held'])} of weights, "
                      f"gradients, optimizer state and indices, {gib(needed['update'])} more during a DST update) "
                      f"but this machine has {gib(available)} available; choose a higher sparsity or a "
                      f"narrower net")


def gib(count: int) -> str:
    """Bytes as GiB (MiB below one), for messages."""
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"
