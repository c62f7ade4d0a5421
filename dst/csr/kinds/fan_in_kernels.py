"""The numba kernel of the ``fan_in`` kind: ``out (O, N) = relu(values ⊙ x[col_indices] summed over k + bias)``.

Activations batch-last, ``x (I, N)``. Every row runs the same ``k`` multiply-adds, so the
loops are regular. At batch 1 (``fan_in_one``) each row is a gathered dot product of fixed
length that LLVM vectorises (AVX2/AVX-512 gathers) because these kernels alone allow it to
reassociate the sum (``fastmath=True``): the order is then the compiled code's, fixed for a
given machine and ``k``, and equal to the masked dense forward within float32 rounding. It
ran 2.5x faster than the four-running-sums loop of the CSR kernel here. At batch N four
weights go per pass over the output row, its inner loop over the batch contiguous (SIMD).
Rows are split over threads (``prange``) only when a call has enough work to pay for waking
them (``dst.csr.numba_kernels.runs_serially``, where the threads sleep between calls): at batch 1 a 1000->1000 layer
at 90 % is 100,000 multiply-adds, 24 us on one thread, less than waking a sleeping second one costs.
"""

import numba
import numpy as np

from dst.csr.array_ops import narrowest_dtype
from dst.csr.kinds.base import KeptOutputStep
from dst.csr.numba_kernels import FASTMATH, NO_BIAS, row_over_batch, runs_serially


@numba.njit(cache=True, fastmath=True, inline="always")
def _dot(x, values, col_indices, bias, relu, out, row):  # pragma: no cover - compiled
    """Batch 1, output ``row``: ``x``, ``out`` 1-D; the gathered sum may be reassociated (vectorised)."""
    total = np.float32(0.0)
    for j in range(values.shape[1]):
        total += values[row, j] * x[col_indices[row, j]]
    total += bias[row] if bias.size > 0 else np.float32(0.0)
    out[row] = max(total, np.float32(0.0)) if relu else total


@numba.njit(cache=True, fastmath=True)
def fan_in_one(x, values, col_indices, bias, relu, out):  # pragma: no cover - compiled
    """Batch 1: ``out (O,) = relu(sum_j values[:, j] * x[col_indices[:, j]] + bias)``, ``x (I,)``; one thread."""
    for row in range(values.shape[0]):
        _dot(x, values, col_indices, bias, relu, out, row)


@numba.njit(parallel=True, cache=True, fastmath=True)
def fan_in_one_parallel(x, values, col_indices, bias, relu, out):  # pragma: no cover - compiled
    """``fan_in_one`` with the rows split over numba's threads."""
    for row in numba.prange(values.shape[0]):
        _dot(x, values, col_indices, bias, relu, out, row)


@numba.njit(cache=True, fastmath=FASTMATH, inline="always")
def _row(flat_x, flat_values, flat_indices, bias, relu, flat_out, row, k, batch):  # pragma: no cover
    """Batch > 1, output row ``row``: the CSR kernel's row over the batch on entries ``row*k:(row+1)*k``."""
    offset = bias[row] if bias.size > 0 else np.float32(0.0)
    first = row * k  # signed: an unsigned first + 1 would be typed float64 (int64 + uint64)
    row_over_batch(flat_x, batch, flat_values, flat_indices, first, first + k, offset, relu, flat_out,
                    np.uint64(row) * np.uint64(batch))


@numba.njit(cache=True, fastmath=FASTMATH)
def fan_in_serial(x, values, col_indices, bias, relu, out):  # pragma: no cover - compiled
    """``out (O, N)`` from ``x (I, N)``, ``values`` and ``col_indices`` ``(O, k)``; one thread."""
    (features, batch), (rows, k) = x.shape, values.shape
    flat_x, flat_out = x.reshape(features * batch), out.reshape(rows * batch)
    flat_values, flat_indices = values.reshape(rows * k), col_indices.reshape(rows * k)
    for row in range(rows):
        _row(flat_x, flat_values, flat_indices, bias, relu, flat_out, row, k, batch)


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def fan_in_parallel(x, values, col_indices, bias, relu, out):  # pragma: no cover - compiled
    """``fan_in_serial`` with the rows split over numba's threads."""
    (features, batch), (rows, k) = x.shape, values.shape
    flat_x, flat_out = x.reshape(features * batch), out.reshape(rows * batch)
    flat_values, flat_indices = values.reshape(rows * k), col_indices.reshape(rows * k)
    for row in numba.prange(rows):
        _row(flat_x, flat_values, flat_indices, bias, relu, flat_out, row, k, batch)


class NumbaFanInStep(KeptOutputStep):
    """``dst.csr.kinds.fan_in.FanInStep`` on numpy arrays run by the kernels above, into a buffer kept per
    input shape; column indices 16-bit where the layer has at most 65,536 inputs."""

    kind = "fan_in"

    def __init__(self, ops, name: str, host: dict, relu: bool = False):
        self.ops, self.name, self.relu = ops, name, relu
        self.out_features, self.in_features = (int(size) for size in host["shape"])
        self.values = np.ascontiguousarray(host["values"], dtype=np.float32)
        index_type = narrowest_dtype(self.in_features - 1, (np.uint16, np.int32))
        self.col_indices = np.ascontiguousarray(host["col_indices"], dtype=index_type)
        bias = host.get("bias")
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)

    def __call__(self, x, out):
        serial = runs_serially(self.values.size * x.shape[1], x.shape[1])
        bias = NO_BIAS if self.bias is None else self.bias
        if x.shape[1] == 1:
            kernel = fan_in_one if serial else fan_in_one_parallel
            kernel(x.reshape(-1), self.values, self.col_indices, bias, self.relu, out.reshape(-1))
        else:
            kernel = fan_in_serial if serial else fan_in_parallel
            kernel(np.ascontiguousarray(x), self.values, self.col_indices, bias, self.relu, out)
        return out

    def host(self) -> dict:
        return {"shape": (self.out_features, self.in_features), "values": self.values,
                "col_indices": self.col_indices.astype(np.int64), "bias": self.bias}

    def held_arrays(self) -> list:
        return [self.values, self.col_indices, *([] if self.bias is None else [self.bias])]
