"""The compiled training kernels of the ``numba`` backend: W @ A, W.T @ dZ and the SDDMM on CSR arrays.

Activations feature-major ``(features, batch)`` (``dst.csr.linear.SparseLinear``); the SDDMM
writes ``dZ[row_k] . A[col_k]`` for every active weight ``k``. Three families, all with
the same sums (every output adds its terms in the serial kernels' order):

* ``train_matmul``, ``train_matmul_transposed``, ``train_sddmm``: serial, the reference,
  and the path of small layers (the tutorial's), where a ``prange`` costs more than it
  saves: on the shared 2-core development machine a parallel call could wait ~8 ms
  for its second thread.
* ``blocked_matmul``, ``blocked_matmul_transposed``, ``blocked_sddmm``: for wide layers
  whose gathered operand still fits the L3 cache, or whose other side is too narrow to
  tile. Each work item is a range of output rows (``prange`` over items, balanced by
  active weights); it walks the rows it gathers from in blocks sized to share the L3
  cache, and within a block takes, row by row, the weights whose column lies in it (a
  cursor per row remembers where the last block stopped). Every output still sums its
  terms in the serial order (columns ascending), so W @ A and the SDDMM equal the serial
  kernels bitwise. W.T @ dZ is the same gather over the CSC permutation of the CSR
  arrays (``csc_permutation``, rebuilt only when the topology changes), rows ascending
  within a column as the serial scatter adds them: bitwise equal too, and no two items
  ever write the same output.
* ``tiled_matmul`` and ``tiled_backward``: for layers whose activations are far bigger
  than the cache (a million-neuron MLP: 268 MB a layer at batch 128). There a gather
  fetches a 512-byte row from memory for every weight, so the tiles turn it around:
  a work item keeps a tile of the rows it *writes* in cache and reads the other operand
  in order, once. ``tiled_matmul``'s tile is a range of output rows, its weights
  ordered by column (``row_tiles``): each input row is read once per tile, and each
  output row still adds its terms columns ascending. ``tiled_backward``'s tile is a
  range of input columns, its weights ordered by row (``column_tiles``): it reads dZ
  row by row and does W.T @ dZ (into the tile's rows of dA, rows ascending as the
  serial scatter) and the SDDMM (with the tile's rows of A) in one pass. Both bitwise
  equal to the serial kernels.

numba compiles each kernel on its first call (cached on disk next to this file, so
later processes only load it); time nothing before one call.
"""

import numba
import numpy as np


@numba.njit(fastmath=True, cache=True)
def add_bias(outputs, first, last, bias, relu):  # pragma: no cover - compiled
    """Rows ``first:last`` of ``outputs`` plus their bias, through a ReLU if ``relu``: the epilogue of W @ A."""
    for row in range(first, last):
        for b in range(outputs.shape[1]):
            value = outputs[row, b] + bias[row]
            outputs[row, b] = np.float32(0.0) if relu and value < 0 else value  # NaN stays, as in np.maximum


@numba.njit(fastmath=True, cache=True)
def train_matmul(indptr, columns, weight, inputs, bias, relu, outputs):  # pragma: no cover - compiled
    """``outputs (out, batch) = W @ inputs (in, batch) + bias``, through a ReLU if ``relu``."""
    for row in range(len(indptr) - 1):
        outputs[row, :] = 0.0
        for k in range(indptr[row], indptr[row + 1]):
            value, column = weight[k], columns[k]
            for b in range(inputs.shape[1]):
                outputs[row, b] += value * inputs[column, b]
    add_bias(outputs, 0, outputs.shape[0], bias, relu)


@numba.njit(fastmath=True, cache=True)
def train_matmul_transposed(indptr, columns, weight, grad_outputs, grad_inputs):  # pragma: no cover
    """``grad_inputs (in, batch) += W.T @ grad_outputs (out, batch)``; pass zeros."""
    for row in range(len(indptr) - 1):
        for k in range(indptr[row], indptr[row + 1]):
            value, column = weight[k], columns[k]
            for b in range(grad_outputs.shape[1]):
                grad_inputs[column, b] += value * grad_outputs[row, b]


@numba.njit(fastmath=True, cache=True)
def train_sddmm(indptr, columns, left, right, out):  # pragma: no cover - compiled
    """``out[k] = left[row_k] . right[col_k]`` for every entry ``k`` of the CSR pattern."""
    for row in range(len(indptr) - 1):
        for k in range(indptr[row], indptr[row + 1]):
            column, total = columns[k], np.float32(0.0)
            for b in range(left.shape[1]):
                total += left[row, b] * right[column, b]
            out[k] = total


@numba.njit(parallel=True, cache=True, fastmath=True)
def blocked_matmul(indptr, columns, weight, inputs, bias, relu, outputs, item_rows,
                   block_rows):  # pragma: no cover - compiled
    """``train_matmul``'s outputs and sums, in parallel and cache blocks.

    ``item_rows``: (items + 1,) the output rows of each work item, ``item_rows[i]:item_rows[i + 1]``;
    ``block_rows``: how many rows of ``inputs`` one cache block holds.
    """
    batch, in_rows = inputs.shape[1], inputs.shape[0]
    for item in numba.prange(len(item_rows) - 1):
        first, last = item_rows[item], item_rows[item + 1]
        cursor = indptr[first:last].copy()  # each row's next weight: columns ascend within a row
        outputs[first:last, :] = 0.0
        for block_stop in range(block_rows, in_rows + block_rows, block_rows):
            for row in range(first, last):
                k, stop = cursor[row - first], indptr[row + 1]
                while k < stop and columns[k] < block_stop:
                    value, column = weight[k], columns[k]
                    for b in range(batch):
                        outputs[row, b] += value * inputs[column, b]
                    k += 1
                cursor[row - first] = k
        add_bias(outputs, first, last, bias, relu)


@numba.njit(parallel=True, cache=True, fastmath=True)
def blocked_matmul_transposed(csc_indptr, csc_rows, csc_order, weight, grad_outputs, grad_inputs,
                              item_columns, block_rows):  # pragma: no cover - compiled
    """``grad_inputs (in, batch) = W.T @ grad_outputs (out, batch)`` (overwritten), as ``train_matmul_transposed`` sums.

    The CSC arrays come from ``csc_permutation``: input column ``c`` owns entries
    ``csc_indptr[c]:csc_indptr[c + 1]``, of rows ``csc_rows`` (ascending) and CSR index ``csc_order``,
    so the values are read from the CSR ``weight`` the optimizer updates. ``item_columns`` splits the
    input columns into work items; ``block_rows``: how many rows of ``grad_outputs`` one cache block holds.
    """
    batch, out_rows = grad_outputs.shape[1], grad_outputs.shape[0]
    for item in numba.prange(len(item_columns) - 1):
        first, last = item_columns[item], item_columns[item + 1]
        cursor = csc_indptr[first:last].copy()
        grad_inputs[first:last, :] = 0.0
        for block_stop in range(block_rows, out_rows + block_rows, block_rows):
            for column in range(first, last):
                k, stop = cursor[column - first], csc_indptr[column + 1]
                while k < stop and csc_rows[k] < block_stop:
                    value, row = weight[csc_order[k]], csc_rows[k]
                    for b in range(batch):
                        grad_inputs[column, b] += value * grad_outputs[row, b]
                    k += 1
                cursor[column - first] = k


@numba.njit(parallel=True, cache=True, fastmath=True)
def blocked_sddmm(indptr, columns, left, right, out, item_rows, block_rows):  # pragma: no cover - compiled
    """``out[k] = left[row_k] . right[col_k]``, ``train_sddmm``'s dot products, in parallel, ``right`` in blocks."""
    batch, right_rows = left.shape[1], right.shape[0]
    for item in numba.prange(len(item_rows) - 1):
        first, last = item_rows[item], item_rows[item + 1]
        cursor = indptr[first:last].copy()
        for block_stop in range(block_rows, right_rows + block_rows, block_rows):
            for row in range(first, last):
                k, stop = cursor[row - first], indptr[row + 1]
                while k < stop and columns[k] < block_stop:
                    column, total = columns[k], np.float32(0.0)
                    for b in range(batch):
                        total += left[row, b] * right[column, b]
                    out[k] = total
                    k += 1
                cursor[row - first] = k


@numba.njit(cache=True)
def csc_permutation(indptr, columns, column_count, csc_indptr, csc_rows, csc_order):  # pragma: no cover
    """Fill the CSC arrays of a CSR pattern: a counting sort by column, rows ascending within each column.

    ``csc_indptr`` (column_count + 1,) must come in zeroed; ``csc_rows`` and ``csc_order`` (nnz,) are
    overwritten with each entry's row and its index in the CSR arrays.
    """
    for k in range(len(columns)):
        csc_indptr[columns[k] + 1] += 1
    for column in range(column_count):
        csc_indptr[column + 1] += csc_indptr[column]
    cursor = csc_indptr[:-1].copy()
    for row in range(len(indptr) - 1):
        for k in range(indptr[row], indptr[row + 1]):
            position = cursor[columns[k]]
            csc_rows[position], csc_order[position] = row, k
            cursor[columns[k]] = position + 1


@numba.njit(cache=True)
def row_tiles(indptr, columns, column_count, height, tile_rows, tile_columns, tile_order):  # pragma: no cover
    """Fill ``tiled_matmul``'s order: tiles of ``height`` output rows, a tile's weights by column, then row.

    Tile ``t`` holds CSR entries ``indptr[t * height]:indptr[(t + 1) * height]`` at the same positions,
    reordered (a counting sort by column per tile, stable, so rows ascend within a column);
    ``tile_rows``, ``tile_columns`` and ``tile_order`` (nnz,) get each one's row, column and CSR index.
    """
    rows = len(indptr) - 1
    cursor = np.empty(column_count + 1, dtype=np.int64)
    for first in range(0, rows, height):
        last = min(rows, first + height)
        cursor[:] = 0
        for k in range(indptr[first], indptr[last]):
            cursor[columns[k] + 1] += 1
        cursor[0] = indptr[first]
        for column in range(column_count):
            cursor[column + 1] += cursor[column]
        for row in range(first, last):
            for k in range(indptr[row], indptr[row + 1]):
                position = cursor[columns[k]]
                tile_rows[position], tile_columns[position], tile_order[position] = row, columns[k], k
                cursor[columns[k]] = position + 1


@numba.njit(cache=True)
def column_tiles(indptr, columns, width, tile_pointers, tile_rows, tile_columns, tile_order):  # pragma: no cover
    """Fill ``tiled_backward``'s order: tiles of ``width`` input columns, a tile's weights by row, then column.

    ``tile_pointers`` (tiles + 1,) must come in zeroed: tile ``t`` gets entries
    ``tile_pointers[t]:tile_pointers[t + 1]``; ``tile_rows``, ``tile_columns`` and ``tile_order``
    (nnz,) get each one's row, column and CSR index (CSR order kept within a tile: a stable partition).
    """
    for k in range(len(columns)):
        tile_pointers[columns[k] // width + 1] += 1
    for tile in range(len(tile_pointers) - 1):
        tile_pointers[tile + 1] += tile_pointers[tile]
    cursor = tile_pointers[:-1].copy()
    for row in range(len(indptr) - 1):
        for k in range(indptr[row], indptr[row + 1]):
            tile = columns[k] // width
            position = cursor[tile]
            tile_rows[position], tile_columns[position], tile_order[position] = row, columns[k], k
            cursor[tile] = position + 1


@numba.njit(parallel=True, cache=True, fastmath=True)
def tiled_matmul(tile_pointers, tile_rows, tile_columns, tile_order, weight, inputs, bias, relu, outputs,
                 height):  # pragma: no cover - compiled
    """``train_matmul``'s outputs and sums over ``row_tiles``' order: a tile of ``height`` output rows
    per work item, the inputs read column by column, bias and ReLU added while the tile is in cache."""
    batch, rows = inputs.shape[1], outputs.shape[0]
    for tile in numba.prange(len(tile_pointers) - 1):
        first, last = tile * height, min(rows, (tile + 1) * height)
        outputs[first:last, :] = 0.0
        for position in range(tile_pointers[tile], tile_pointers[tile + 1]):
            row, column, value = tile_rows[position], tile_columns[position], weight[tile_order[position]]
            for b in range(batch):
                outputs[row, b] += value * inputs[column, b]
        add_bias(outputs, first, last, bias, relu)


@numba.njit(parallel=True, cache=True, fastmath=True)
def tiled_backward(tile_pointers, tile_rows, tile_columns, tile_order, weight, grad_outputs, inputs,
                   relu_input, grad_inputs, weight_grad, width):  # pragma: no cover - compiled
    """``grad_inputs = W.T @ grad_outputs`` (overwritten) and ``weight_grad[k] = grad_outputs[row_k] .
    inputs[col_k]`` in one pass over ``column_tiles``' order: a tile of ``width`` input columns per work
    item, ``grad_outputs`` read row by row; the serial kernels' sums, bitwise (the two loops over the
    batch are theirs, kept apart so each compiles as it does there). ``relu_input``: ``inputs`` came out
    of a ReLU, so ``grad_inputs`` is multiplied by ``inputs > 0`` while the tile is in cache
    (``relu_backward``'s products)."""
    batch, columns = grad_outputs.shape[1], grad_inputs.shape[0]
    for tile in numba.prange(len(tile_pointers) - 1):
        first, last = tile * width, min(columns, (tile + 1) * width)
        grad_inputs[first:last, :] = 0.0
        for position in range(tile_pointers[tile], tile_pointers[tile + 1]):
            row, column, k = tile_rows[position], tile_columns[position], tile_order[position]
            value, total = weight[k], np.float32(0.0)
            for b in range(batch):
                grad_inputs[column, b] += value * grad_outputs[row, b]
            for b in range(batch):
                total += grad_outputs[row, b] * inputs[column, b]
            weight_grad[k] = total
        if relu_input:
            relu_backward(grad_inputs, inputs, first, last)


@numba.njit(fastmath=True, cache=True)
def relu_backward(grad, activations, first, last):  # pragma: no cover - compiled
    """Rows ``first:last`` of ``grad`` times ``activations > 0`` (1.0 or 0.0, as numpy multiplies by a bool)."""
    for row in range(first, last):
        for b in range(grad.shape[1]):
            grad[row, b] *= np.float32(1.0) if activations[row, b] > 0 else np.float32(0.0)
