"""The ``numba`` backend: numpy arrays, with compiled kernels (``dst.csr.numba_kernels``) on the CSR arrays.

Inference: activations stay batch-last, as in ``dst.csr.steps``, and two fused
kernels do all the work: a conv computed directly on its CSR weight with bias,
ReLU and max-pool fused (no im2col), and CSR x dense linears with bias and ReLU.
The weights are stored in the mask's own numbering (conv column ``c*kh*kw + i*kw + j``)
with 16-bit column indices where a layer has at most 65,536 columns (every SimpleNet
layer), so an active weight costs 6 bytes in memory instead of 8. Output buffers are
allocated once per input shape and reused; the forward returns a copy (the batch-first
transpose), so a caller never sees a buffer change under it.

Training: the three products of a step (``numba_training``), on the int32 CSR
arrays of ``dst.csr.linear.SparseLinear``: serial on small layers (the SDDMM ~10x
faster than numpy's gathers, the other two ~1.5x faster than scipy's), parallel and
cache-blocked on wide ones, with the same sums (``dst.csr.numba_kernels``).

numba compiles each kernel on its first call (cached on disk); time a forward only after one call.
"""

import numba
import numpy as np

from dst.csr.array_ops import ArrayOps, TrainingProducts, narrowest_dtype
from dst.csr.numba_kernels import (
    NO_BIAS,
    blocked_matmul,
    blocked_matmul_transposed,
    blocked_sddmm,
    conv_pool,
    conv_pool_serial,
    csc_permutation,
    linear,
    linear_serial,
    runs_serially,
    train_matmul,
    train_matmul_transposed,
    train_sddmm,
)
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


# A training product below this many multiply-adds (active weights x batch) runs serially: the
# tutorial's layers take well under a millisecond there, less than a parallel call can wait for
# its second thread on a busy machine. 4 Mi is ~1 ms of serial work.
SERIAL_BELOW = 1 << 22
# Bytes of gathered rows one cache block of the parallel products holds: half of this machine's
# 32 MiB L3, so the block stays there while every work item takes its weights in it. The best size measured
# (AMD EPYC, a training step at width 524288, eps20, medians of 4: 16 MiB 1.87-2.18 s, 32/64 MiB 2.31-2.57 s,
# 4 MiB 3.13-3.15 s, 1 MiB 4.33-4.64 s): smaller blocks pass over each item's rows once more per block.
BLOCK_BYTES = 16 << 20
# Work items per thread, handed out one at a time (``numba.parallel_chunksize(1)``), so a thread
# slowed by other work on the machine takes fewer of them instead of holding the step up.
ITEMS_PER_THREAD = 8


def balanced_items(pointers: np.ndarray, items: int) -> np.ndarray:
    """Split the rows of the pointer array ``pointers`` (CSR ``indptr`` or CSC ``csc_indptr``) into
    ``items`` contiguous ranges holding about as many entries each: (items + 1,) int64 bounds."""
    rows = len(pointers) - 1
    bounds = np.searchsorted(pointers, np.linspace(0, pointers[-1], items + 1)).astype(np.int64)
    bounds[0], bounds[-1] = 0, rows
    return np.minimum(bounds, rows)


class TrainingLayout:
    """What the numba training products keep for one topology of a layer (its ``matrix``).

    Rebuilt whenever the layer's CSR arrays are (``SparseLinear._set_topology``: at construction
    and after every DST update); the CSC permutation is built on the first parallel W.T @ dZ.
    """

    def __init__(self, weight, columns, indptr, shape):
        self.columns, self.indptr, self.shape = columns, indptr, shape
        self._row_items = self._column_items = self._csc = None

    @staticmethod
    def warm_up() -> None:
        """Compile (or load) the parallel products and the CSC permutation on a tiny layer.

        ``SparseMLP.warm_up`` calls it: its twin is too small to take the parallel path,
        and a wide model's first step would otherwise pay for their compilation.
        """
        indptr, columns = np.array([0, 1, 2], dtype=np.int32), np.array([0, 1], dtype=np.int32)
        weight, dense = np.ones(2, dtype=np.float32), np.ones((2, 1), dtype=np.float32)
        layout, items = TrainingLayout(weight, columns, indptr, (2, 2)), np.array([0, 2], dtype=np.int64)
        out = np.empty((2, 1), dtype=np.float32)
        blocked_matmul(indptr, columns, weight, dense, out, items, 1)
        blocked_matmul_transposed(*layout.csc(), weight, dense, out, items, 1)
        blocked_sddmm(indptr, columns, dense, dense, np.empty(2, dtype=np.float32), items, 1)

    def row_items(self) -> np.ndarray:
        items = ITEMS_PER_THREAD * numba.get_num_threads()
        if self._row_items is None or len(self._row_items) != items + 1:
            self._row_items = balanced_items(self.indptr, items)
        return self._row_items

    def csc(self) -> tuple:
        """(csc_indptr, csc_rows, csc_order): the CSC permutation of the CSR arrays."""
        if self._csc is None:
            csc_indptr = np.zeros(self.shape[1] + 1, dtype=self.indptr.dtype)
            csc_rows = np.empty(len(self.columns), dtype=self.columns.dtype)
            csc_order = np.empty(len(self.columns), dtype=self.indptr.dtype)
            csc_permutation(self.indptr, self.columns, self.shape[1], csc_indptr, csc_rows, csc_order)
            self._csc = (csc_indptr, csc_rows, csc_order)
        return self._csc

    def column_items(self) -> np.ndarray:
        items = ITEMS_PER_THREAD * numba.get_num_threads()
        if self._column_items is None or len(self._column_items) != items + 1:
            self._column_items = balanced_items(self.csc()[0], items)
        return self._column_items

    def arrays(self) -> dict:
        """The CSC permutation's arrays once built (``SparseLinear.arrays`` counts them), else none."""
        return {} if self._csc is None else dict(zip(("csc_indptr", "csc_rows", "csc_order"), self._csc, strict=True))


def block_rows(batch: int) -> int:
    """Rows of a (rows, batch) float32 operand that fill one cache block (``BLOCK_BYTES``)."""
    return max(1, BLOCK_BYTES // (4 * max(1, batch)))


def numba_training() -> TrainingProducts:
    """The numba backend's training products, serial for small layers and parallel, cache-blocked for wide ones.

    Each layer's ``matrix`` is a ``TrainingLayout``; the outputs are the layer's work buffers
    (``SparseLinear.work_buffer``), allocated once per batch shape and overwritten by the next step.
    """

    def parallel(layer, batch: int) -> bool:
        return layer.active_count * batch >= SERIAL_BELOW

    def matmul(layer, inputs):
        outputs = layer.work_buffer("outputs", (layer.shape[0], inputs.shape[1]), inputs.dtype)
        if parallel(layer, inputs.shape[1]):
            with numba.parallel_chunksize(1):
                blocked_matmul(layer.indptr, layer.columns, layer.weight, inputs, outputs,
                               layer.matrix.row_items(), block_rows(inputs.shape[1]))
        else:
            train_matmul(layer.indptr, layer.columns, layer.weight, inputs, outputs)
        return outputs

    def matmul_transposed(layer, grad_outputs):
        grad_inputs = layer.work_buffer("grad_inputs", (layer.shape[1], grad_outputs.shape[1]), grad_outputs.dtype)
        if parallel(layer, grad_outputs.shape[1]):
            with numba.parallel_chunksize(1):
                blocked_matmul_transposed(*layer.matrix.csc(), layer.weight, grad_outputs, grad_inputs,
                                          layer.matrix.column_items(), block_rows(grad_outputs.shape[1]))
        else:
            grad_inputs.fill(0.0)
            train_matmul_transposed(layer.indptr, layer.columns, layer.weight, grad_outputs, grad_inputs)
        return grad_inputs

    def sddmm(layer, left, right):
        if parallel(layer, left.shape[1]):
            with numba.parallel_chunksize(1):
                blocked_sddmm(layer.indptr, layer.columns, left, right, layer.weight_grad,
                              layer.matrix.row_items(), block_rows(left.shape[1]))
        else:
            train_sddmm(layer.indptr, layer.columns, left, right, layer.weight_grad)

    return TrainingProducts(keeps_rows=False, matrix=TrainingLayout, matmul=matmul,
                            matmul_transposed=matmul_transposed, sddmm=sddmm)
