"""The ``numba`` backend's training products (``numba_training``): which kernel runs each product of a
step, and the index layouts those kernels read, kept per topology (``TrainingLayout``).

Kernels in ``dst.csr.numba_training_kernels``. A product on a small layer runs serially (the
tutorial's layers: ``SERIAL_BELOW``); on a wide one in parallel, cache-blocked where the
operand it gathers from fits the L3 cache, and in tiles where it does not (``row_tiling``,
``column_tiling``: a million-neuron MLP, whose activations are 268 MB a layer at batch 128).
Every path adds each output's terms in the serial kernels' order: the same sums, bitwise.
"""

import numba
import numpy as np

from dst.csr.array_ops import TrainingProducts, separate_backward
from dst.csr.csr_build import index_dtype
from dst.csr.numba_training_kernels import (
    blocked_matmul,
    blocked_matmul_transposed,
    blocked_sddmm,
    column_tiles,
    csc_permutation,
    row_tiles,
    tiled_backward,
    tiled_matmul,
    train_matmul,
    train_matmul_transposed,
    train_sddmm,
)

# A training product below this many multiply-adds (active weights x batch) runs serially: the
# tutorial's layers take well under a millisecond there, less than a parallel call can wait for
# its second thread on a busy machine. 4 Mi is ~1 ms of serial work.
SERIAL_BELOW = 1 << 22
# Bytes of gathered rows one cache block of the parallel products holds: half of this machine's
# 32 MiB L3, so the block stays there while every work item takes its weights in it. The best size measured
# (AMD EPYC, a training step at width 524288, eps20, medians of 4: 16 MiB 1.87-2.18 s, 32/64 MiB 2.31-2.57 s,
# 4 MiB 3.13-3.15 s, 1 MiB 4.33-4.64 s): smaller blocks pass over each item's rows once more per block.
# An operand bigger than a block is where tiles take over (``outgrows_cache``).
BLOCK_BYTES = 16 << 20
# Bytes of the rows one tile keeps in cache (its outputs; for the backward, its rows of dA and of A), a
# quarter of the L3 so both threads' tiles and the rows streaming past them fit. Measured on the
# 524288 x 524288 layer at 40 weights a row, batch 128 (AMD EPYC, medians of 5, ms, W @ A / fused backward):
# 4 MiB 558 / 1022, 8 MiB 434 / 867, 16 MiB 516 / 897, 32 MiB - / 942; the blocked kernels 496 / 1195.
TILE_BYTES = 8 << 20
# Tiles per thread below which a layer keeps the blocked kernels: fewer leave a thread idle at the end.
TILES_PER_THREAD = 2
# Work items per thread of the blocked kernels, handed out one at a time (``numba.parallel_chunksize(1)``),
# so a thread slowed by other work on the machine takes fewer of them instead of holding the step up.
ITEMS_PER_THREAD = 8


def balanced_items(pointers: np.ndarray, items: int) -> np.ndarray:
    """Split the rows of the pointer array ``pointers`` (CSR ``indptr`` or CSC ``csc_indptr``) into
    ``items`` contiguous ranges holding about as many entries each: (items + 1,) int64 bounds."""
    rows = len(pointers) - 1
    bounds = np.searchsorted(pointers, np.linspace(0, pointers[-1], items + 1)).astype(np.int64)
    bounds[0], bounds[-1] = 0, rows
    return np.minimum(bounds, rows)


def block_rows(batch: int) -> int:
    """Rows of a (rows, batch) float32 operand that fill one cache block (``BLOCK_BYTES``)."""
    return max(1, BLOCK_BYTES // (4 * max(1, batch)))


def tile_extent(batch: int, operands: int) -> int:
    """Rows of each of ``operands`` (rows, batch) float32 arrays that one tile keeps in cache (``TILE_BYTES``)."""
    return max(1, TILE_BYTES // (4 * max(1, batch) * operands))


def outgrows_cache(rows: int, batch: int) -> bool:
    """Whether a (rows, batch) float32 operand a blocked kernel gathers from is bigger than its cache block."""
    return 4 * rows * batch > BLOCK_BYTES


def enough_tiles(rows: int, extent: int) -> bool:
    """Whether ``rows`` make at least ``TILES_PER_THREAD`` tiles of ``extent`` rows for every thread."""
    return -(-rows // extent) >= TILES_PER_THREAD * numba.get_num_threads()


def row_tiling(shape: tuple[int, int], batch: int) -> int | None:
    """Tile height (output rows) of the tiled W @ A for an (out, in) layer, or None: the blocked kernel.
    Tiles where the inputs outgrow the cache and make ``TILES_PER_THREAD`` tiles a thread. (A layer of a
    few outputs, the 10-class one, stays blocked: in one tile, even with the batch split between the
    threads, its W @ A at width 524288 took 126 ms against the blocked kernel's 91 ms.)"""
    height = tile_extent(batch, 1)
    out_features, in_features = shape
    return height if outgrows_cache(in_features, batch) and enough_tiles(out_features, height) else None


def column_tiling(shape: tuple[int, int], batch: int) -> int | None:
    """Tile width (input columns) of the fused, tiled backward for an (out, in) layer, or None: the blocked
    kernels. Tiles where A and dA outgrow the cache and make ``TILES_PER_THREAD`` tiles a thread."""
    width = tile_extent(batch, 2)  # a tile keeps its rows of dA and of A
    in_features = shape[1]
    return width if outgrows_cache(in_features, batch) and enough_tiles(in_features, width) else None


class TrainingLayout:
    """What the numba training products keep for one topology of a layer (its ``matrix``).

    Rebuilt whenever the layer's CSR arrays are (``SparseLinear._set_topology``: at construction
    and after every DST update); each index layout is built on the first product that needs it: the
    CSC permutation (blocked W.T @ dZ), the row tiles (tiled W @ A) and the column tiles (the tiled
    backward). One of each at a time: a new tile size replaces the old tiles, and the column tiles
    and the CSC permutation (both only for the backward) replace each other.
    """

    def __init__(self, weight, columns, indptr, shape):
        self.columns, self.indptr, self.shape = columns, indptr, shape
        self._row_items = self._column_items = self._csc = None
        self._row_tiles = self._column_tiles = None  # (extent, arrays)

    @staticmethod
    def warm_up() -> None:
        """Compile (or load) the parallel products and the layouts' builders on a tiny layer.

        ``SparseMLP.warm_up`` calls it: its twin is too small to take the parallel path,
        and a wide model's first step would otherwise pay for their compilation.
        """
        indptr, columns = np.array([0, 1, 2], dtype=np.int32), np.array([0, 1], dtype=np.int32)
        weight, dense = np.ones(2, dtype=np.float32), np.ones((2, 1), dtype=np.float32)
        layout, items = TrainingLayout(weight, columns, indptr, (2, 2)), np.array([0, 2], dtype=np.int64)
        out, grad = np.empty((2, 1), dtype=np.float32), np.empty(2, dtype=np.float32)
        bias = np.zeros(2, dtype=np.float32)
        blocked_matmul(indptr, columns, weight, dense, bias, True, out, items, 1)
        blocked_matmul_transposed(*layout.csc(), weight, dense, out, items, 1)
        blocked_sddmm(indptr, columns, dense, dense, grad, items, 1)
        tiled_matmul(*layout.row_tiles(1), weight, dense, bias, True, out, 1)
        tiled_backward(*layout.column_tiles(1), weight, dense, dense, True, out, grad, 1)

    @staticmethod
    def most_bytes(shape: tuple[int, int], active_count: int, first: bool) -> int:
        """The most bytes a layer's layouts hold at once (``dst.csr.memory``): row tiles (three indices a
        weight, a pointer at most every row) and, but on the first layer (no dA asked), the larger of the
        CSC permutation and the column tiles; numba's index type is ``index_dtype``'s."""
        out_features, in_features = shape
        index = index_dtype(max(active_count, out_features, in_features) + 1)(0).itemsize
        row_tiles = 3 * index * active_count + 8 * (out_features + 1)
        csc = 2 * index * active_count + index * (in_features + 1)
        tiles = 3 * index * active_count + 8 * (in_features + 1)
        return row_tiles + (0 if first else max(csc, tiles))

    def row_items(self) -> np.ndarray:
        items = ITEMS_PER_THREAD * numba.get_num_threads()
        if self._row_items is None or len(self._row_items) != items + 1:
            self._row_items = balanced_items(self.indptr, items)
        return self._row_items

    def csc(self) -> tuple:
        """(csc_indptr, csc_rows, csc_order): the CSC permutation of the CSR arrays."""
        if self._csc is None:
            self._column_tiles = None  # the backward's other layout goes before this one is made
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

    def row_tiles(self, height: int) -> tuple:
        """(pointers, rows, columns, order) of tiles of ``height`` output rows (``row_tiles``' order)."""
        if self._row_tiles is None or self._row_tiles[0] != height:
            self._row_tiles = None
            rows, columns, order = self._entry_arrays()
            row_tiles(self.indptr, self.columns, self.shape[1], height, rows, columns, order)
            pointers = self.indptr[np.append(np.arange(0, self.shape[0], height), self.shape[0])].astype(np.int64)
            self._row_tiles = (height, (pointers, rows, columns, order))
        return self._row_tiles[1]

    def column_tiles(self, width: int) -> tuple:
        """(pointers, rows, columns, order) of tiles of ``width`` input columns (``column_tiles``' order)."""
        if self._column_tiles is None or self._column_tiles[0] != width:
            self._column_tiles = self._csc = self._column_items = None
            rows, columns, order = self._entry_arrays()
            pointers = np.zeros(-(-self.shape[1] // width) + 1, dtype=np.int64)
            column_tiles(self.indptr, self.columns, width, pointers, rows, columns, order)
            self._column_tiles = (width, (pointers, rows, columns, order))
        return self._column_tiles[1]

    def _entry_arrays(self) -> tuple:
        """Empty (row, column, CSR index) arrays, one entry per active weight, in the layer's index type."""
        return tuple(np.empty(len(self.columns), dtype=dtype)
                     for dtype in (self.columns.dtype, self.columns.dtype, self.indptr.dtype))

    def arrays(self) -> dict:
        """The index arrays built so far (``SparseLinear.arrays`` counts them)."""
        held = {} if self._csc is None else dict(zip(("csc_indptr", "csc_rows", "csc_order"), self._csc, strict=True))
        for kind, tiles in (("row_tiles", self._row_tiles), ("column_tiles", self._column_tiles)):
            if tiles is not None:
                held.update({f"{kind}.{name}": values
                             for name, values in zip(("pointers", "rows", "columns", "order"), tiles[1], strict=True)})
        return held


def numba_training() -> TrainingProducts:
    """The numba backend's training products, serial for small layers and parallel for wide ones.

    Each layer's ``matrix`` is a ``TrainingLayout``; the outputs are the layer's work buffers
    (``SparseLinear.work_buffer``), allocated once per batch shape and overwritten by the next step.
    """

    def parallel(layer, batch: int) -> bool:
        return layer.active_count * batch >= SERIAL_BELOW

    def matmul(layer, inputs, relu: bool):
        batch = inputs.shape[1]
        outputs = layer.work_buffer("outputs", (layer.shape[0], batch), inputs.dtype)
        if not parallel(layer, batch):
            train_matmul(layer.indptr, layer.columns, layer.weight, inputs, layer.bias, relu, outputs)
        elif (height := row_tiling(layer.shape, batch)) is not None:
            with numba.parallel_chunksize(1):
                tiled_matmul(*layer.matrix.row_tiles(height), layer.weight, inputs, layer.bias, relu, outputs, height)
        else:
            with numba.parallel_chunksize(1):
                blocked_matmul(layer.indptr, layer.columns, layer.weight, inputs, layer.bias, relu, outputs,
                               layer.matrix.row_items(), block_rows(batch))
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

    def backward(layer, grad_outputs, inputs, need_input_grad: bool, relu_input: bool):
        batch = grad_outputs.shape[1]
        width = column_tiling(layer.shape, batch) if need_input_grad and parallel(layer, batch) else None
        if width is None:
            return separate_backward(layer, grad_outputs, inputs, need_input_grad, relu_input)
        grad_inputs = layer.work_buffer("grad_inputs", (layer.shape[1], batch), grad_outputs.dtype)
        with numba.parallel_chunksize(1):
            tiled_backward(*layer.matrix.column_tiles(width), layer.weight, grad_outputs, inputs, relu_input,
                           grad_inputs, layer.weight_grad, width)
        return grad_inputs

    return TrainingProducts(keeps_rows=False, matrix=TrainingLayout, matmul=matmul,
                            matmul_transposed=matmul_transposed, sddmm=sddmm, backward=backward)
