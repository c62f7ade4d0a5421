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
arrays of ``dst.csr.linear.SparseLinear``; the SDDMM is ~10x faster than numpy's
gathers, the other two ~1.5x faster than scipy's.

numba compiles each kernel on its first call (cached on disk); time a forward only after one call.
"""

import numpy as np

from dst.csr.array_ops import ArrayOps, TrainingProducts, narrowest_dtype
from dst.csr.numba_kernels import conv_pool, linear, train_matmul, train_matmul_transposed, train_sddmm
from dst.csr.steps import LinearStep, MaskNumberedWeight, conv_output_shape

NO_BIAS = np.zeros(0, dtype=np.float32)
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
        _, out_height, out_width, batch = out_shape
        (pool_h, pool_w) = self.pool_kernel
        rows_per_item = max(1, min(out_height, ACCUMULATOR_FLOATS // max(1, pool_h * pool_w * out_width * batch)))
        return out_shape, (rows_per_item, np.empty(out_shape, dtype=np.float32))

    def __call__(self, x, buffers):
        rows_per_item, out = buffers
        weight = self.weight
        conv_pool(np.ascontiguousarray(x), weight.values, weight.col_indices, weight.row_pointers,
                  NO_BIAS if self.bias is None else self.bias, *self.kernel_size, *self.padding,
                  *self.pool_kernel, self.relu, rows_per_item, out)
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
        linear(np.ascontiguousarray(x), weight.values, weight.col_indices, weight.row_pointers,
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


def numba_training() -> TrainingProducts:
    """The numba backend's training products (no CSR matrix object: the kernels read the arrays)."""

    def matmul(layer, inputs):
        outputs = np.empty((layer.shape[0], inputs.shape[1]), dtype=inputs.dtype)
        train_matmul(layer.indptr, layer.columns, layer.weight, inputs, outputs)
        return outputs

    def matmul_transposed(layer, grad_outputs):
        grad_inputs = np.zeros((layer.shape[1], grad_outputs.shape[1]), dtype=grad_outputs.dtype)
        train_matmul_transposed(layer.indptr, layer.columns, layer.weight, grad_outputs, grad_inputs)
        return grad_inputs

    def sddmm(layer, left, right):
        train_sddmm(layer.indptr, layer.columns, left, right, layer.weight_grad)

    return TrainingProducts(keeps_rows=False, matrix=lambda *arrays: None, matmul=matmul,
                            matmul_transposed=matmul_transposed, sddmm=sddmm)
