"""The steps of the truly sparse engine: conv and linear on a CSR weight, and the steps between them.

Activations are kept batch-last, images as ``(C, H, W, N)`` and features as
``(F, N)``, so that nothing is transposed between layers:

* conv:    ``W (out, K) @ cols (K, Ho*Wo*N)``, the result already is ``(out, Ho, Wo, N)``;
* linear:  ``W (out, in) @ X (in, N)``;
* flatten: ``(C, H, W, N) -> (C*H*W, N)`` is a free reshape in torch's flatten order.

A max-pool right after a conv, and the ReLUs after a conv or linear, are folded into
that layer: the pool is a running maximum over the window positions, the bias and
ReLU (which commute with a max) then touch 4x fewer values, im2col copies only the
slabs some active weight reads into a preallocated buffer (padding never
materialised), and output channels with no active weight are never computed. See
``ConvStep`` for the details. ``ReLU`` and ``MaxPool`` are the unfolded steps.

Every step has ``prepare(shape) -> (out_shape, buffers)``, called once per input
shape to allocate its work buffers, and is called as ``step(x, buffers)`` (its ``__call__``)
for the forward. Each runs on the array operations ``ops`` of one backend (``dst.csr.array_ops``).
"""

import math

import numpy as np


class ConvStep:
    """Conv2d (stride 1, zero padding) on a CSR weight, with the max-pool, bias and ReLU after it.

    With a ``ph x pw`` max-pool after it (stride == kernel; 1 x 1 when there is none),
    output ``(h, w)`` in window position ``(a, b)`` reads input ``(ph*h + a + i, pw*w + b + j)``
    for kernel offset ``(i, j)``. So one im2col buffer serves every window position: its
    rows are the strided slabs ``x[c, u::ph, v::pw]`` for the ``(kh+ph-1) x (kw+pw-1)``
    shifts ``(u, v)``, row ``(u*grid_w + v)*C + c``, and the CSR column of weight
    ``(c, i, j)`` is ``(i*grid_w + j)*C + c``. Window ``(a, b)`` is then the CSR times a
    contiguous block of rows starting at ``(a*grid_w + b)*C``: 16 slab copies for a 3x3
    conv and a 2x2 pool, where a separate im2col per window position copies 36.

    The pool is a running maximum over the window positions' products, so positions it
    drops are never computed and no strided pass over the full conv output is made; the
    bias and ReLU (which commute with the max) touch the pooled output only. Only the
    slab rows some active weight reads are copied (a gather when fewer than half the
    channels of a shift are read, a plain slice otherwise).

    Output channels with no active weight are the constant ``relu(bias)``: ``W`` holds
    only the other rows, whose results are written into a buffer where the constant
    rows were filled once (at 99%, 15 of the first conv's 16 channels).
    """

    kind = "conv"

    def __init__(self, ops, name: str, host: dict, in_channels: int, kernel_size, padding,
                 pool_kernel=(1, 1), relu: bool = False):
        self.ops, self.name, self.relu = ops, name, relu
        self.in_channels, self.kernel_size, self.padding = in_channels, tuple(kernel_size), tuple(padding)
        self.pool_kernel = tuple(pool_kernel)
        (kh, kw), (ph, pw) = self.kernel_size, self.pool_kernel
        self.out_channels = host["shape"][0]
        self.grid = (kh + ph - 1, kw + pw - 1)
        grid_w = self.grid[1]
        # Only the active weights' columns are renumbered: a table over all kh*kw*C columns would let a
        # file declaring a huge kernel with no weights take hundreds of MiB.
        channel, offset = np.divmod(host["col_indices"].astype(np.int64), kh * kw)  # column c*kh*kw + i*kw + j
        position = (offset // kw * grid_w + offset % kw) * in_channels + channel
        self.window_rows = ((kh - 1) * grid_w + kw) * in_channels  # rows one window position reads
        self.window_starts = [(a * grid_w + b) * in_channels for a in range(ph) for b in range(pw)]
        used = np.unique(host["col_indices"])
        reads: dict[tuple[int, int], set] = {}  # slab shift (u, v) -> channels read from it
        for c, i, j in zip(used // (kh * kw), used % (kh * kw) // kw, used % kw, strict=True):
            for a in range(ph):
                for b in range(pw):
                    reads.setdefault((int(i) + a, int(j) + b), set()).add(int(c))
        self.shifts = []  # (u, v, first row, channel index or None for all, row index or None)
        for (u, v), channels in sorted(reads.items()):
            first = (u * grid_w + v) * in_channels
            if 2 * len(channels) >= in_channels:
                self.shifts.append((u, v, first, None, None))
            else:
                chosen = np.array(sorted(channels), dtype=np.int64)
                self.shifts.append((u, v, first, ops.asarray(chosen), ops.asarray(chosen + first)))
        counts = np.diff(host["row_pointers"])
        self.active_rows = np.flatnonzero(counts).astype(np.int32)  # output channels with weights
        values, col_indices, _ = _reindex_columns(host, position)
        row_pointers = np.concatenate([[0], np.cumsum(counts[self.active_rows])]).astype(np.int32)
        self.weight = ops.csr(values, col_indices, row_pointers, shape=(self.active_rows.size, self.window_rows))
        self.compact = self.active_rows.size < self.out_channels
        self.scatter = ops.asarray(self.active_rows.astype(np.int64)) if self.compact else None
        bias = host.get("bias")
        self.bias = None if bias is None else ops.asarray(bias.reshape(-1, 1, 1, 1))
        self.active_bias = self.bias if bias is None or not self.compact else ops.asarray(
            bias[self.active_rows].reshape(-1, 1, 1, 1))

    def prepare(self, shape):
        out_shape = conv_output_shape(self.name, self.in_channels, self.out_channels, self.kernel_size,
                                      self.padding, self.pool_kernel, shape)
        channels, height, width, _ = shape
        (pad_h, pad_w), (pool_h, pool_w) = self.padding, self.pool_kernel
        # Zero padding is never materialised: each slab copies only the part that lies inside the
        # input, and the rest of the buffer stays zero (as do rows no weight reads).
        slabs = self.ops.zeros((self.grid[0] * self.grid[1] * channels, *out_shape[1:]))
        copies = []
        for u, v, first, channel_index, row_index in self.shifts:
            rows_in, rows_from = _inside(u - pad_h, pool_h, out_shape[1], height)
            columns_in, columns_from = _inside(v - pad_w, pool_w, out_shape[2], width)
            if rows_in.stop > rows_in.start and columns_in.stop > columns_in.start:
                destination = slice(first, first + channels) if row_index is None else row_index
                source = slice(None) if channel_index is None else channel_index
                copies.append(((destination, rows_in, columns_in), (source, rows_from, columns_from)))
        out = None
        if self.compact:  # rows without weights hold their constant once and for all
            out = self.ops.zeros(out_shape)
            if self.bias is not None:
                out += self.bias
            if self.relu:
                self.ops.relu_(out)
        return out_shape, (copies, slabs, out)

    def __call__(self, x, buffers):
        copies, slabs, out = buffers
        if self.weight.shape[0] == 0:
            return out
        for destination, source in copies:
            slabs[destination] = x[source]
        matrix = slabs.reshape(slabs.shape[0], -1)  # (grid_h*grid_w*C, Ho*Wo*N)
        result = None
        for start in self.window_starts:
            product = self.ops.matmul(self.weight, matrix[start:start + self.window_rows])  # (rows, Ho*Wo*N)
            result = product if result is None else self.ops.maximum(result, product, out=result)
        result = result.reshape(-1, *slabs.shape[1:])
        if self.active_bias is not None:
            result += self.active_bias
        if self.relu:
            self.ops.relu_(result)
        if out is None:
            return result
        out[self.scatter] = result
        return out

    @property
    def in_features(self) -> int:  # columns of the mask's (out, in*kh*kw) matrix
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    @property
    def out_features(self) -> int:
        return self.out_channels

    def held_arrays(self) -> list:
        """Everything this layer keeps besides the CSR arrays and the bias."""
        extra = [index for *_, channel_index, row_index in self.shifts if channel_index is not None
                 for index in (channel_index, row_index)]
        if self.compact:
            extra += [self.active_rows, self.scatter] + ([self.active_bias] if self.bias is not None else [])
        return extra

    def host_csr(self, values: np.ndarray, col_indices: np.ndarray, row_pointers: np.ndarray) -> dict:
        """The inverse of the constructor: CSR over all rows, in the mask's column numbering."""
        (kh, kw), grid_w = self.kernel_size, self.grid[1]
        counts = np.zeros(self.out_channels, dtype=np.int64)
        counts[self.active_rows] = np.diff(row_pointers)
        rows = np.repeat(np.arange(self.out_channels), counts)
        shift, channel = np.divmod(col_indices.astype(np.int64), self.in_channels)
        col_indices = channel * kh * kw + shift // grid_w * kw + shift % grid_w
        order = np.lexsort((col_indices, rows))
        return {"shape": (self.out_channels, self.in_channels * kh * kw), "values": values[order],
                "col_indices": col_indices[order], "row_pointers": np.concatenate([[0], np.cumsum(counts)])}


class MaskNumberedWeight:
    """For a step whose CSR ``weight`` is the mask's own ``(out, in)`` matrix: nothing renumbered, nothing kept."""

    @property
    def in_features(self) -> int:  # columns of the mask's matrix (in*kh*kw for a conv)
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def held_arrays(self) -> list:
        return []

    def host_csr(self, values: np.ndarray, col_indices: np.ndarray, row_pointers: np.ndarray) -> dict:
        return {"shape": tuple(int(s) for s in self.weight.shape), "values": values,
                "col_indices": col_indices.astype(np.int64), "row_pointers": row_pointers.astype(np.int64)}


class LinearStep(MaskNumberedWeight):
    """Linear as ``W (out, in) @ X (in, N)``, then the bias and a folded-in ReLU."""

    kind = "linear"

    def __init__(self, ops, name: str, host: dict, relu: bool = False):
        self.ops, self.name, self.relu = ops, name, relu
        self.weight = ops.csr(host["values"], host["col_indices"].astype(np.int32),
                              host["row_pointers"].astype(np.int32), shape=host["shape"])
        self.bias = None if host.get("bias") is None else ops.asarray(host["bias"].reshape(-1, 1))

    def prepare(self, shape):
        if len(shape) != 2 or shape[0] != self.weight.shape[1]:
            raise ValueError(f"layer {self.name!r} expects (N, {self.weight.shape[1]}) features, "
                             f"got activations of shape {_torch_order(shape)} (is a Flatten missing?)")
        return (self.weight.shape[0], shape[1]), None

    def __call__(self, x, buffers):
        y = self.ops.matmul(self.weight, x)
        if self.bias is not None:
            y += self.bias
        return self.ops.relu_(y) if self.relu else y


class ReLU:
    """A ReLU not folded into a layer; out of place, as its input may be a kept buffer."""

    def __init__(self, ops):
        self.ops = ops

    def prepare(self, shape):
        return shape, None

    def __call__(self, x, buffers):
        return self.ops.relu(x)


class MaxPool:
    """A max-pool not folded into a conv (stride == kernel, no padding): the maximum of strided views."""

    def __init__(self, ops, name: str, kernel_size):
        self.ops, self.name, self.kernel_size = ops, name, tuple(kernel_size)

    def prepare(self, shape):
        if len(shape) != 4:
            raise ValueError(f"layer {self.name!r} expects images, got activations "
                             f"of shape {_torch_order(shape)}")
        (kh, kw), (channels, height, width, batch) = self.kernel_size, shape
        out_shape = (channels, height // kh, width // kw, batch)
        return out_shape, self.ops.empty(out_shape)

    def __call__(self, x, out):
        (kh, kw), (_, height, width, _) = self.kernel_size, out.shape
        views = [x[:, i:height * kh:kh, j:width * kw:kw] for i in range(kh) for j in range(kw)]
        out[...] = views[0]
        for view in views[1:]:
            self.ops.maximum(out, view, out=out)
        return out


class Flatten:
    """``(C, H, W, N) -> (C*H*W, N)``: a free reshape, in torch's flatten order."""

    def prepare(self, shape):
        return (math.prod(shape[:-1]), shape[-1]), None

    def __call__(self, x, buffers):
        return x.reshape(-1, x.shape[-1])


# ----------------------------------------------------------------------------- helpers

def conv_output_shape(name: str, in_channels: int, out_channels: int, kernel_size, padding, pool_kernel,
                      shape: tuple) -> tuple:
    """The batch-last ``(out_channels, Ho, Wo, N)`` of a stride-1 conv and the pool after it on ``shape``
    ``(C, H, W, N)``; a clear error naming layer ``name`` when the input does not fit it."""
    if len(shape) != 4 or shape[0] != in_channels:
        raise ValueError(f"layer {name!r} expects images with {in_channels} channels, "
                         f"got activations of shape {_torch_order(shape)}")
    _, height, width, batch = shape
    (kh, kw), (pad_h, pad_w), (pool_h, pool_w) = kernel_size, padding, pool_kernel
    out_height, out_width = height + 2 * pad_h - kh + 1, width + 2 * pad_w - kw + 1
    if out_height < pool_h or out_width < pool_w:
        raise ValueError(f"layer {name!r}: input {height}x{width} is too small for its kernel "
                         f"{tuple(kernel_size)} and the pool {tuple(pool_kernel)} after it")
    return out_channels, out_height // pool_h, out_width // pool_w, batch


def _reindex_columns(host: dict, col_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR arrays with entry k's column renamed ``col_indices[k]``, indices sorted again within each row."""
    row_pointers = host["row_pointers"]
    rows = np.repeat(np.arange(row_pointers.size - 1), np.diff(row_pointers))
    order = np.lexsort((col_indices, rows))
    return (np.ascontiguousarray(host["values"][order], dtype=np.float32),
            col_indices[order].astype(np.int32), row_pointers.astype(np.int32))


def _inside(offset: int, step: int, count: int, size: int) -> tuple[slice, slice]:
    """Which of the ``count`` positions ``offset + step*k`` lie in ``[0, size)``: (those k, the positions)."""
    first = max(0, -(offset // step))
    inside = max(0, min(count, (size - 1 - offset) // step + 1) - first)
    start = offset + step * first
    return slice(first, first + inside), slice(start, start + step * max(0, inside - 1) + 1, step)


def _torch_order(shape: tuple) -> tuple:
    return (shape[-1], *shape[:-1])
