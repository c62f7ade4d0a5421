"""A sparse layer's CSR index arrays, built without dense-size or many-copy temporaries.

``dst.csr.linear.SparseLinear`` keeps its topology as CSR arrays (``indptr``, ``columns``)
in ``index_dtype``. Here they are made from sorted flat positions (``csr_from_positions``),
at random for a wide layer's init, row chunk by row chunk (``random_csr``), and merged
after a DST update from the kept and the regrown entries (``merged``), so a layer of
hundreds of millions of weights is built in memory close to its own size.
"""

import math

import numpy as np

from dst.csr.array_ops import narrowest_dtype
from dst.engine.update_rule import sample_inactive

# Layers up to this many positions draw their random topology whole (``sample_inactive`` over the
# layer); larger ones in chunks of rows of about this many positions, straight into the CSR arrays,
# so an init's temporaries stay ~100 MB however wide the layer (4 Mi positions, 32 MiB as int64).
INIT_CHUNK_POSITIONS = 1 << 22
# numpy's hypergeometric draws need fewer than this many positions in all.
HYPERGEOMETRIC_LIMIT = 10**9



def index_dtype(numel: int) -> type:
    """int32 while every index fits, as scipy itself would pick; int64 beyond."""
    return narrowest_dtype(numel, (np.int32, np.int64))


def merged(xp, values, keep, is_old, fill):
    """``values[keep]`` at the ``is_old`` entries, ``fill`` (a scalar, or one value each) at the others."""
    new = xp.empty_like(values)
    new[is_old] = values[keep]
    new[~is_old] = fill
    return new


def csr_from_positions(positions: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, columns) of sorted unique flat positions ``row * in + col``, in ``index_dtype``, chunk by chunk."""
    out_features, in_features = shape
    dtype = index_dtype(max(len(positions), out_features, in_features) + 1)
    row_starts = np.arange(out_features + 1, dtype=np.int64) * in_features
    indptr = np.searchsorted(positions, row_starts).astype(dtype)
    columns = np.empty(len(positions), dtype=dtype)
    for start in range(0, len(positions), INIT_CHUNK_POSITIONS):
        stop = start + INIT_CHUNK_POSITIONS
        columns[start:stop] = positions[start:stop] % in_features
    return indptr, columns


def random_csr(shape: tuple[int, int], count: int, bound: float, density: float,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, columns, float32 weight): ``count`` uniform random positions, values U(-bound, bound) / sqrt(density).

    Drawn in chunks of rows of about ``INIT_CHUNK_POSITIONS`` positions: how many of the
    ``count`` fall in each chunk is a hypergeometric draw (so the set is uniform over all
    ``count``-subsets, as one ``sample_inactive`` over the layer would be), then the chunk's
    positions and values go straight into the arrays. No temporary outgrows a chunk.
    """
    out_features, in_features = shape
    dtype = index_dtype(max(count, out_features, in_features) + 1)
    indptr = np.zeros(out_features + 1, dtype=dtype)
    columns = np.empty(count, dtype=dtype)
    weight = np.empty(count, dtype=np.float32)
    rows_per_chunk = max(1, INIT_CHUNK_POSITIONS // in_features)
    remaining_positions, remaining, filled = out_features * in_features, count, 0
    for first in range(0, out_features, rows_per_chunk):
        rows = min(rows_per_chunk, out_features - first)
        size = rows * in_features
        taken = hypergeometric(rng, size, remaining_positions - size, remaining)
        positions = sample_inactive(np.empty(0, dtype=np.int64), size, taken, rng)
        local_rows, local_columns = np.divmod(positions, in_features)
        columns[filled:filled + taken] = local_columns
        indptr[first + 1:first + rows + 1] = np.bincount(local_rows, minlength=rows)
        weight[filled:filled + taken] = rng.uniform(-bound, bound, size=taken) / math.sqrt(density)
        filled, remaining, remaining_positions = filled + taken, remaining - taken, remaining_positions - size
    np.cumsum(indptr, out=indptr)
    return indptr, columns, weight


def hypergeometric(rng: np.random.Generator, good: int, bad: int, sample: int) -> int:
    """How many of ``sample`` positions drawn without replacement from ``good + bad`` are good.

    numpy draws it exactly below ``HYPERGEOMETRIC_LIMIT`` positions; beyond, the binomial
    (the same law up to the finite-population correction, negligible at such sizes), kept feasible.
    """
    if sample == 0 or bad == 0:
        return min(sample, good)
    if good + bad < HYPERGEOMETRIC_LIMIT:
        return int(rng.hypergeometric(good, bad, sample))
    return int(min(max(rng.binomial(sample, good / (good + bad)), sample - bad), good))
