"""The numba backend of the truly sparse engine: fused kernels that run straight on the CSR weights.

Activations stay batch-last, as in ``dst.sparse_layers``: images ``(C, H, W, N)``,
features ``(F, N)``. Two compiled kernels do all the work, each a ``prange`` loop
over independent outputs so both cores share it:

* ``conv_pool``: a conv computed directly from the CSR weight (no im2col), output
  stationary. One work item is one output channel and one pooled output row: for each
  conv row under it, every active weight ``(c, i, j)`` adds ``value * x[c, y+i-pad, :, :]``
  to a row accumulator, one contiguous run of ``width * N`` floats (the padding is
  skipped by clipping the run, never materialised). The rows are max-pooled into the
  output as they are done, then the bias and ReLU touch the pooled values only.
* ``linear``: ``W (out, in) @ X (in, N)`` one output row per item, bias and ReLU fused.

The weights are stored in the mask's own numbering (conv column ``c*kh*kw + i*kw + j``)
with 16-bit column indices where a layer has at most 65,536 columns (every SimpleNet
layer), so an active weight costs 6 bytes in memory instead of 8. Output buffers are
allocated once per input shape and reused; the forward returns a copy (the batch-first
transpose), so a caller never sees a buffer change under it.

numba compiles each kernel on its first call (cached on disk next to this file, so
later processes only load it); time a forward only after one call.
"""

import numba
import numpy as np

from dst.sparse_backends import ArrayOps
from dst.sparse_layers import SparseLinear, conv_output_shape

NO_BIAS = np.zeros(0, dtype=np.float32)
# FMA contraction only: no reassociation, so every output sums its terms in one fixed order.
FASTMATH = {"contract"}


def index_type(columns: int) -> type:
    """The narrowest column index type the kernels take for a layer with ``columns`` columns."""
    return np.uint16 if columns <= np.iinfo(np.uint16).max + 1 else np.int32


class CSR:
    """A CSR matrix as the three arrays the kernels read: float32 values, column indices, row pointers."""

    def __init__(self, values, col_indices, row_pointers, shape):
        self.shape = tuple(int(size) for size in shape)
        self.values = np.ascontiguousarray(values, dtype=np.float32)
        self.col_indices = np.ascontiguousarray(col_indices, dtype=index_type(self.shape[1]))
        pointer_type = np.int32 if self.values.size <= np.iinfo(np.int32).max else np.int64
        self.row_pointers = np.ascontiguousarray(row_pointers, dtype=pointer_type)


class NumbaOps(ArrayOps):
    """``ArrayOps`` on numpy whose conv and linear steps are the fused numba kernels."""

    def __init__(self):
        super().__init__("numba", np, None)

    def csr(self, values, col_indices, row_pointers, shape) -> CSR:
        return CSR(values, col_indices, row_pointers, shape)

    def csr_arrays(self, matrix: CSR) -> tuple:
        return matrix.values, matrix.col_indices, matrix.row_pointers


class NumbaConv:
    """Conv2d (stride 1, zero padding) with the max-pool, bias and ReLU after it, in one ``conv_pool`` call."""

    kind = "conv"

    def __init__(self, ops, name: str, host: dict, in_channels: int, kernel_size, padding,
                 pool_kernel=(1, 1), relu: bool = False):
        self.ops, self.name, self.relu = ops, name, relu
        self.in_channels, self.kernel_size, self.padding = in_channels, tuple(kernel_size), tuple(padding)
        self.pool_kernel = tuple(pool_kernel)
        self.weight = ops.csr(host["values"], host["col_indices"], host["row_pointers"], host["shape"])
        bias = host.get("bias")
        self.bias = None if bias is None else np.ascontiguousarray(bias.reshape(-1), dtype=np.float32)

    def prepare(self, shape):
        out_shape = conv_output_shape(self.name, self.in_channels, self.out_features, self.kernel_size,
                                      self.padding, self.pool_kernel, shape)
        return out_shape, np.empty(out_shape, dtype=np.float32)

    def __call__(self, x, out):
        weight = self.weight
        conv_pool(np.ascontiguousarray(x), weight.values, weight.col_indices, weight.row_pointers,
                  NO_BIAS if self.bias is None else self.bias, *self.kernel_size, *self.padding,
                  *self.pool_kernel, self.relu, out)
        return out

    @property
    def in_features(self) -> int:  # columns of the mask's (out, in*kh*kw) matrix
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def held_arrays(self) -> list:
        return []

    def host_csr(self, values: np.ndarray, col_indices: np.ndarray, row_pointers: np.ndarray) -> dict:
        return {"shape": self.weight.shape, "values": values,
                "col_indices": col_indices.astype(np.int64), "row_pointers": row_pointers.astype(np.int64)}


class NumbaLinear(SparseLinear):
    """Linear with its bias and ReLU in one ``linear`` call, into a buffer kept per input shape."""

    def __init__(self, ops, name: str, host: dict, relu: bool = False):
        super().__init__(ops, name, host, relu)
        self.bias = None if self.bias is None else np.ascontiguousarray(self.bias.reshape(-1))

    def prepare(self, shape):
        out_shape, _ = super().prepare(shape)
        return out_shape, np.empty(out_shape, dtype=np.float32)

    def __call__(self, x, out):
        weight = self.weight
        linear(np.ascontiguousarray(x), weight.values, weight.col_indices, weight.row_pointers,
               NO_BIAS if self.bias is None else self.bias, self.relu, out)
        return out


NumbaOps.conv_step, NumbaOps.linear_step = NumbaConv, NumbaLinear


# ----------------------------------------------------------------------------- kernels

@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv_pool(x, values, col_indices, row_pointers, bias, kernel_h, kernel_w, pad_h, pad_w,
              pool_h, pool_w, relu, out):  # pragma: no cover - compiled
    """``out (O, Ho, Wo, N) = relu(maxpool(conv(x (C, H, W, N))) + bias)``, the conv's weight in CSR over
    the mask's columns ``c*kh*kw + i*kw + j``; ``bias`` may be empty, ``pool`` (1, 1) for none."""
    channels, height, width, batch = x.shape
    out_channels, out_height, out_width, _ = out.shape
    flat_x = x.reshape(channels * height * width * batch)
    conv_width = pool_w * out_width  # conv output columns the pool reads (floor mode drops the rest)
    run_length = conv_width * batch  # one conv output row: columns x batch, contiguous
    kernel_area = kernel_h * kernel_w
    for item in numba.prange(out_channels * out_height):
        channel, row = item // out_height, item % out_height
        pooled = out[channel, row].reshape(out_width * batch)
        offset = bias[channel] if bias.size > 0 else np.float32(0.0)
        if row_pointers[channel] == row_pointers[channel + 1]:  # no weight: the constant relu(bias)
            pooled[:] = max(offset, np.float32(0.0)) if relu else offset
        else:
            # The pool_h conv rows under this pooled row, each summed over the channel's weights.
            conv_rows = np.zeros(pool_h * run_length, dtype=np.float32)
            for a in range(pool_h):
                conv_row = conv_rows[a * run_length:(a + 1) * run_length]
                y = row * pool_h + a
                for k in range(row_pointers[channel], row_pointers[channel + 1]):
                    column = np.int64(col_indices[k])
                    c = column // kernel_area
                    i = (column - c * kernel_area) // kernel_w
                    j = column - c * kernel_area - i * kernel_w
                    source_row = y + i - pad_h
                    # conv column u reads input column u + j - pad_w: keep the u where that lies inside
                    first = max(0, pad_w - j)
                    last = min(conv_width, width + pad_w - j)
                    if 0 <= source_row < height and first < last:
                        value, length = values[k], (last - first) * batch
                        start = ((c * height + source_row) * width + first + j - pad_w) * batch
                        # Slices indexed by the loop counter: numba then drops its negative-index check
                        # and LLVM vectorises the loop (10x faster than indexing with ``start + t``).
                        source = flat_x[start:start + length]
                        target = conv_row[first * batch:first * batch + length]
                        for t in range(length):
                            target[t] += value * source[t]
            # One pass per pooled pixel: the max over its window, then the bias and ReLU (they commute
            # with the max, so they touch the pooled values only).
            for w in range(out_width):
                window = pooled[w * batch:(w + 1) * batch]
                window[:] = conv_rows[w * pool_w * batch:(w * pool_w + 1) * batch]
                for a in range(pool_h):
                    for b in range(pool_w):
                        start = (a * conv_width + w * pool_w + b) * batch
                        candidate = conv_rows[start:start + batch]
                        for n in range(batch):
                            window[n] = max(window[n], candidate[n])
                for n in range(batch):
                    window[n] = max(window[n] + offset, np.float32(0.0)) if relu else window[n] + offset


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def linear(x, values, col_indices, row_pointers, bias, relu, out):  # pragma: no cover - compiled
    """``out (O, N) = relu(W @ x (I, N) + bias)``, W in CSR; ``bias`` may be empty."""
    batch = x.shape[1]
    for row in numba.prange(out.shape[0]):
        offset = bias[row] if bias.size > 0 else np.float32(0.0)
        target = out[row]
        if batch == 1:  # a sparse dot product: one running sum, no per-weight loop over the batch
            total = offset
            for k in range(row_pointers[row], row_pointers[row + 1]):
                total += values[k] * x[np.int64(col_indices[k]), 0]
            target[0] = total
        else:
            target[:] = offset
            start, stop = row_pointers[row], row_pointers[row + 1]
            # Four weights per pass over the row: a quarter of the loads and stores of the accumulating
            # row, and of the loop's set-up, which for a batch of 100 costs about as much as the work.
            for k in range(start, stop - 3, 4):
                v0, v1, v2, v3 = values[k], values[k + 1], values[k + 2], values[k + 3]
                s0, s1 = x[np.int64(col_indices[k])], x[np.int64(col_indices[k + 1])]
                s2, s3 = x[np.int64(col_indices[k + 2])], x[np.int64(col_indices[k + 3])]
                for n in range(batch):
                    target[n] += v0 * s0[n] + v1 * s1[n] + v2 * s2[n] + v3 * s3[n]
            for k in range(stop - (stop - start) % 4, stop):
                value, source = values[k], x[np.int64(col_indices[k])]
                for n in range(batch):
                    target[n] += value * source[n]
        if relu:
            for n in range(batch):
                target[n] = max(target[n], np.float32(0.0))
