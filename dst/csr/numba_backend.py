"""The ``numba`` backend: numpy arrays, with compiled kernels (``dst.csr.numba_kernels``) on the CSR arrays.

Inference: activations stay batch-last, as in ``dst.csr.steps``, and two fused
kernels do all the work: a conv computed directly on its CSR weight with bias,
ReLU and max-pool fused (no im2col), and CSR x dense linears with bias and ReLU.
The weights are stored in the mask's own numbering (conv column ``c*kh*kw + i*kw + j``)
with 16-bit column indices where a layer has at most 65,536 columns (every SimpleNet
layer), so an active weight costs 6 bytes in memory instead of 8. Output buffers are
allocated once per input shape and reused; the forward returns a copy (the batch-first
transpose), so a caller never sees a buffer change under it.

Training: the three products of a step (``dst.csr.numba_training``), on the int32 CSR
arrays of ``dst.csr.linear.SparseLinear``: serial on small layers (the SDDMM ~10x
faster than numpy's gathers, the other two ~1.5x faster than scipy's), parallel,
cache-blocked or tiled, on wide ones, with the same sums.

numba compiles each kernel on its first call (cached on disk); time a forward only after one call.
"""

import numpy as np

from dst.csr.array_ops import ArrayOps, narrowest_dtype
from dst.csr.numba_kernels import NO_BIAS, conv_pool, conv_pool_serial, linear, linear_serial, runs_serially
from dst.csr.numba_training import numba_training
from dst.csr.steps import LinearStep, MaskNumberedWeight, conv_output_shape

# Floats in one conv work item's accumulator: 16 KiB leaves most of a 32-48 KiB L1 cache to the input runs.
ACCUMULATOR_FLOATS = 4096


def index_type(columns: int) -> type:
    """The narrowest column index type the kernels take for a layer with ``columns`` columns."""
    return narrowest_dtype(columns - 1, (np.uint16, np.int32))


class CSR:
    """A CSR matrix as the three arrays the kernels read: float32 values, column indices, row pointers."""

    def __init__(self, values, col_indices, row_pointers, shape):
        self.shape = tuple(int(size) for size in shape)
        self.values = np.ascontiguousarray(values, dtype=np.float32)
        self.col_indices = np.ascontiguousarray(col_indices, dtype=index_type(self.shape[1]))
        pointer_type = np.int32 if self.values.size <= np.iinfo(np.int32).max else np.int64
        self.row_pointers = np.ascontiguousarray(row_pointers, dtype=pointer_type)


class NumbaConvStep(MaskNumberedWeight):
    """Conv2d (stride 1, zero padding) with the max-pool, bias and ReLU after it, in one ``conv_pool`` call.

    The kernel reads its input zero-padded: a step copies its input into the interior of a padded buffer
    (allocated once per input shape, the border zeroed once), unless the conv before it writes its output
    there directly (``NumbaOps.link``: ``out_pad`` on that conv, ``input_padded`` on this one).
    """

    kind = "conv"

    def __init__(self, ops, name: str, host: dict, in_channels: int, kernel_size, padding,
                 pool_kernel=(1, 1), relu: bool = False):
        self.ops, self.name, self.relu = ops, name, relu
        self.in_channels, self.kernel_size, self.padding = in_channels, tuple(kernel_size), tuple(padding)
        self.pool_kernel = tuple(pool_kernel)
        self.weight = ops.csr(host["values"], host["col_indices"], host["row_pointers"], host["shape"])
        bias = host.get("bias")
        self.bias = None if bias is None else np.ascontiguousarray(bias.reshape(-1), dtype=np.float32)
        self.out_pad, self.input_padded = (0, 0), False

    def prepare(self, shape):
        out_shape = conv_output_shape(self.name, self.in_channels, self.out_features, self.kernel_size,
                                      self.padding, self.pool_kernel, shape)
        channels, out_height, out_width, batch = out_shape
        (pool_h, pool_w), (pad_h, pad_w), (out_pad_h, out_pad_w) = self.pool_kernel, self.padding, self.out_pad
        rows_per_item = max(1, min(out_height, ACCUMULATOR_FLOATS // max(1, pool_h * pool_w * out_width * batch)))
        # multiply-adds of one call: every active weight over every conv output position the pool reads
        work = self.weight.values.size * out_height * pool_h * out_width * pool_w * batch
        padded = None  # where the input is copied to, zero-padded; None: it arrives so (or needs no padding)
        if not self.input_padded and (pad_h or pad_w):
            padded = np.zeros((shape[0], shape[1] + 2 * pad_h, shape[2] + 2 * pad_w, batch), dtype=np.float32)
        # the output with the next conv's zero border around it (zeros: the kernel writes the interior only)
        out = np.zeros((channels, out_height + 2 * out_pad_h, out_width + 2 * out_pad_w, batch), dtype=np.float32)
        return out_shape, (rows_per_item, work, padded, out)

    def __call__(self, x, buffers):
        rows_per_item, work, padded, out = buffers
        if padded is not None:
            (pad_h, pad_w), (_, height, width, _) = self.padding, x.shape
            padded[:, pad_h:pad_h + height, pad_w:pad_w + width] = x
            x = padded
        weight = self.weight
        kernel = conv_pool_serial if runs_serially(work, x.shape[-1]) else conv_pool
        kernel(np.ascontiguousarray(x), weight.values, weight.col_indices, weight.row_pointers,
               NO_BIAS if self.bias is None else self.bias, *self.kernel_size, *self.pool_kernel, self.relu,
               rows_per_item, *self.out_pad, out)
        return out


class NumbaLinearStep(LinearStep):
    """Linear with its bias and ReLU in one ``linear`` call, into a buffer kept per input shape."""

    def __init__(self, ops, name: str, host: dict, relu: bool = False):
        super().__init__(ops, name, host, relu)
        self.bias = None if self.bias is None else np.ascontiguousarray(self.bias.reshape(-1))

    def prepare(self, shape):
        out_shape, _ = super().prepare(shape)
        return out_shape, np.empty(out_shape, dtype=np.float32)

    def __call__(self, x, out):
        weight = self.weight
        kernel = linear_serial if runs_serially(weight.values.size * x.shape[1], x.shape[1]) else linear
        kernel(np.ascontiguousarray(x), weight.values, weight.col_indices, weight.row_pointers,
               NO_BIAS if self.bias is None else self.bias, self.relu, out)
        return out


class NumbaOps(ArrayOps):
    """``ArrayOps`` on numpy whose conv and linear steps are the fused numba kernels."""

    def __init__(self):
        super().__init__("numba", np, None, training=numba_training())

    def csr(self, values, col_indices, row_pointers, shape) -> CSR:
        return CSR(values, col_indices, row_pointers, shape)

    def csr_arrays(self, matrix: CSR) -> tuple:
        return matrix.values, matrix.col_indices, matrix.row_pointers

    def link(self, steps: list) -> None:
        """Let each conv that feeds another conv write its output into that conv's zero-padded input."""
        for producer, consumer in zip(steps, steps[1:]):
            if isinstance(producer, NumbaConvStep) and isinstance(consumer, NumbaConvStep) and any(consumer.padding):
                producer.out_pad, consumer.input_padded = consumer.padding, True
