"""The numba kernel of the ``bsr`` kind: block rows of ``r`` outputs, each a sum of dense ``r x c`` blocks
times the ``(c, N)`` input slab under them, bias and ReLU fused.

Activations batch-last, ``x (I, N)``: a block's slab is ``c`` contiguous runs of ``N`` floats,
and each output row of a block adds four of them per pass (SIMD over the batch). At batch 1
each block is a small dense matrix-vector product. Block rows are split over threads
(``prange``) only when a call has enough work to pay for waking them.
"""

import numba
import numpy as np

from dst.csr.array_ops import narrowest_dtype
from dst.csr.kinds.base import KeptOutputStep
from dst.csr.numba_kernels import FASTMATH, NO_BIAS, runs_serially


@numba.njit(cache=True, fastmath=FASTMATH, inline="always")
def _block_row(flat_x, flat_blocks, block_columns, row_pointers, bias, relu, flat_out, block_row, r, c,
               batch):  # pragma: no cover - compiled
    """Output rows ``block_row*r ...`` of it; arrays flat, indexed with unsigned ints."""
    unsigned_batch, area = np.uint64(batch), np.uint64(r * c)
    for i in range(r):
        row = block_row * r + i
        offset = bias[row] if bias.size > 0 else np.float32(0.0)
        target = np.uint64(row) * unsigned_batch
        for n in range(unsigned_batch):
            flat_out[target + n] = offset
    for b in range(row_pointers[block_row], row_pointers[block_row + 1]):
        first_column = np.uint64(block_columns[b]) * np.uint64(c)
        base = np.uint64(b) * area
        if batch == 1:
            for i in range(r):
                total = np.float32(0.0)
                for j in range(c):
                    total += flat_blocks[base + np.uint64(i * c + j)] * flat_x[first_column + np.uint64(j)]
                flat_out[np.uint64(block_row * r + i)] += total
        else:
            for i in range(r):
                target = np.uint64(block_row * r + i) * unsigned_batch
                weights = base + np.uint64(i * c)
                # Four block columns per pass over the output row, as numba_kernels.linear does.
                for j in range(0, c - 3, 4):
                    v0, v1 = flat_blocks[weights + np.uint64(j)], flat_blocks[weights + np.uint64(j + 1)]
                    v2, v3 = flat_blocks[weights + np.uint64(j + 2)], flat_blocks[weights + np.uint64(j + 3)]
                    x0 = (first_column + np.uint64(j)) * unsigned_batch
                    x1 = x0 + unsigned_batch
                    x2, x3 = x1 + unsigned_batch, x1 + unsigned_batch + unsigned_batch
                    for n in range(unsigned_batch):
                        flat_out[target + n] += (v0 * flat_x[x0 + n] + v1 * flat_x[x1 + n]
                                                 + v2 * flat_x[x2 + n] + v3 * flat_x[x3 + n])
                for j in range(c - c % 4, c):
                    value = flat_blocks[weights + np.uint64(j)]
                    source = (first_column + np.uint64(j)) * unsigned_batch
                    for n in range(unsigned_batch):
                        flat_out[target + n] += value * flat_x[source + n]
    if relu:
        for n in range(np.uint64(block_row * r) * unsigned_batch, np.uint64((block_row + 1) * r) * unsigned_batch):
            flat_out[n] = max(flat_out[n], np.float32(0.0))


@numba.njit(cache=True, fastmath=FASTMATH)
def bsr_serial(x, blocks, block_columns, row_pointers, bias, relu, out):  # pragma: no cover - compiled
    """``out (O, N) = relu(B @ x (I, N) + bias)``, B block-sparse: ``blocks (b, r, c)``; one thread."""
    (features, batch), (count, r, c) = x.shape, blocks.shape
    flat_x, flat_out = x.reshape(features * batch), out.reshape(out.shape[0] * batch)
    flat_blocks = blocks.reshape(count * r * c)
    for block_row in range(len(row_pointers) - 1):
        _block_row(flat_x, flat_blocks, block_columns, row_pointers, bias, relu, flat_out, block_row, r, c, batch)


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def bsr_parallel(x, blocks, block_columns, row_pointers, bias, relu, out):  # pragma: no cover - compiled
    """``bsr_serial`` with the block rows split over numba's threads."""
    (features, batch), (count, r, c) = x.shape, blocks.shape
    flat_x, flat_out = x.reshape(features * batch), out.reshape(out.shape[0] * batch)
    flat_blocks = blocks.reshape(count * r * c)
    for block_row in numba.prange(len(row_pointers) - 1):
        _block_row(flat_x, flat_blocks, block_columns, row_pointers, bias, relu, flat_out, block_row, r, c, batch)


class NumbaBSRStep(KeptOutputStep):
    """``dst.csr.kinds.bsr.BSRStep`` on numpy arrays run by the kernels above, into a buffer kept per input
    shape; block column indices 16-bit where the layer has at most 65,536 block columns."""

    kind = "bsr"

    def __init__(self, ops, name: str, host: dict, relu: bool = False):
        self.ops, self.name, self.relu = ops, name, relu
        self.out_features, self.in_features = (int(size) for size in host["shape"])
        self.blocks = np.ascontiguousarray(host["values"], dtype=np.float32)
        self.block_shape = self.blocks.shape[1:]
        index_type = narrowest_dtype(self.in_features // self.block_shape[1] - 1, (np.uint16, np.int32))
        self.block_columns = np.ascontiguousarray(host["col_indices"], dtype=index_type)
        self.row_pointers = np.ascontiguousarray(host["row_pointers"], dtype=np.int32)
        bias = host.get("bias")
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)

    def __call__(self, x, out):
        kernel = bsr_serial if runs_serially(self.blocks.size * x.shape[1], x.shape[1]) else bsr_parallel
        kernel(np.ascontiguousarray(x), self.blocks, self.block_columns, self.row_pointers,
               NO_BIAS if self.bias is None else self.bias, self.relu, out)
        return out

    def host(self) -> dict:
        return {"shape": (self.out_features, self.in_features), "values": self.blocks,
                "col_indices": self.block_columns.astype(np.int64), "row_pointers": self.row_pointers.astype(np.int64),
                "bias": self.bias}

    def held_arrays(self) -> list:
        return [self.blocks, self.block_columns, self.row_pointers, *([] if self.bias is None else [self.bias])]
