"""The compiled kernels of the ``numba`` backend, all working straight on CSR arrays.

Inference (``dst.csr.numba_backend``'s steps), activations batch-last: images
``(C, H, W, N)``, features ``(F, N)``; each a ``prange`` loop over independent
outputs so both cores share it:

* ``conv_pool``: a conv computed directly from the CSR weight (no im2col), output
  stationary. One work item is one output channel and a block of pooled output rows
  (as many as keep its accumulator in the L1 cache: one at batch 100, all at batch 1).
  Its accumulator holds the conv rows under them; each active weight ``(c, i, j)`` is
  decoded once, then adds ``value * x[c, y+i-pad, :, :]`` to each conv row ``y``: one
  contiguous run of ``width * N`` floats, clipped where it would read the zero padding
  (never materialised). The pool then takes its maximum over the accumulator, and the
  bias and ReLU (which commute with the max) touch the pooled values only.
* ``linear``: ``W (out, in) @ X (in, N)``, one output row per item, four weights per
  pass over the row, bias and ReLU fused.

Training (``dst.csr.linear.SparseLinear``), activations feature-major ``(features,
batch)``: W @ A, W.T @ dZ and the SDDMM ``dZ[row_k] . A[col_k]`` for every active weight,
each twice:

* ``train_matmul``, ``train_matmul_transposed``, ``train_sddmm``: serial, the reference,
  and the path of small layers (the tutorial's), where a ``prange`` costs more than it
  saves: on the shared 2-core development machine a parallel call could wait ~8 ms
  for its second thread.
* ``blocked_matmul``, ``blocked_matmul_transposed``, ``blocked_sddmm``: for wide layers,
  whose time goes into gathering rows at random from activation arrays far bigger
  than the cache. Each work item is a range of output rows (``prange`` over items,
  balanced by active weights); it walks the rows it gathers from in blocks sized to
  share the L3 cache, and within a block takes, row by row, the weights whose column
  lies in it (a cursor per row remembers where the last block stopped). Every output
  still sums its terms in the serial order (columns ascending), so W @ A and the SDDMM
  equal the serial kernels bitwise. W.T @ dZ is the same gather over the CSC
  permutation of the CSR arrays (``csc_permutation``, rebuilt only when the topology
  changes), rows ascending within a column as the serial scatter adds them: bitwise
  equal too, and no two items ever write the same output.

numba compiles each kernel on its first call (cached on disk next to this file, so
later processes only load it); time nothing before one call.
"""

import os

import numba
import numpy as np

# FMA contraction only: no reassociation, so every output sums its terms in one fixed order.
FASTMATH = {"contract"}
# Multiply-adds below which a numba layer runs on the calling thread alone (the CSR conv and linear through
# ``dst.csr.numba_backend.threads_for``, fan_in and bsr through their one-thread kernels). Only where the thread
# pool sleeps between calls (OMP_WAIT_POLICY=PASSIVE, which the benchmarks set so that no engine's spinning
# threads slow the next): waking the second thread then costs ~37 us here (AMD EPYC, 2 cores; a 1568->128 CSR
# layer at 90 %, batch 1: 38 us on two threads, 13 us on one; a 1000->1000 one at 50 %: 169 us and 256 us), and
# the crossover sits near 200,000. Under OpenMP's default the threads spin between calls and two win at every size
# measured (the same 1568->128 layer: 6.2 us on two, 12.4 us on one): no threshold.
SERIAL_WORK = (1 << 18) if os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE" else 0
NO_BIAS = np.zeros(0, dtype=np.float32)  # the kernels' "no bias": an empty array, one type for numba
# UNSIGNED: the hot loops index flat arrays with np.uint64. A signed index makes numba add a
# negative-index check to every access, which stops LLVM from vectorising: 2.5x slower on long runs.


# ----------------------------------------------------------------------------- inference

@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv_pool(x, values, col_indices, row_pointers, bias, kernel_h, kernel_w, pad_h, pad_w, pool_h, pool_w,
              relu, rows_per_item, out):  # pragma: no cover - compiled
    """``out (O, Ho, Wo, N) = relu(maxpool(conv(x (C, H, W, N))) + bias)``, the conv's weight in CSR over
    the mask's columns ``c*kh*kw + i*kw + j``; ``bias`` may be empty, the pool (1, 1) for none."""
    channels, height, width, batch = x.shape
    out_channels, out_height, out_width, _ = out.shape
    flat_x = x.reshape(channels * height * width * batch)  # indexed with unsigned ints: see UNSIGNED
    flat_out = out.reshape(out_channels * out_height * out_width * batch)
    conv_width = pool_w * out_width  # conv output columns the pool reads (floor mode drops the rest)
    run_length = conv_width * batch  # one conv output row: columns x batch, contiguous
    kernel_area = kernel_h * kernel_w
    blocks = (out_height + rows_per_item - 1) // rows_per_item
    for item in numba.prange(out_channels * blocks):
        channel, first_row = item // blocks, item % blocks * rows_per_item
        rows = min(rows_per_item, out_height - first_row)  # pooled rows of this item
        offset = bias[channel] if bias.size > 0 else np.float32(0.0)
        if row_pointers[channel] == row_pointers[channel + 1]:  # no weight: the constant relu(bias)
            out[channel, first_row:first_row + rows] = max(offset, np.float32(0.0)) if relu else offset
            continue
        accumulator = np.zeros(rows * pool_h * run_length, dtype=np.float32)  # the conv rows under them
        for k in range(row_pointers[channel], row_pointers[channel + 1]):
            column = np.int64(col_indices[k])
            c = column // kernel_area
            i = (column - c * kernel_area) // kernel_w
            j = column - c * kernel_area - i * kernel_w
            # conv column u reads input column u + j - pad_w: keep the u where that lies inside
            first, last = max(0, pad_w - j), min(conv_width, width + pad_w - j)
            value, length = values[k], (last - first) * batch
            for conv_row in range(rows * pool_h):
                source_row = first_row * pool_h + conv_row + i - pad_h
                if 0 <= source_row < height and length > 0:
                    source = np.uint64(((c * height + source_row) * width + first + j - pad_w) * batch)
                    target = np.uint64(conv_row * run_length + first * batch)
                    for t in range(np.uint64(length)):
                        accumulator[target + t] += value * flat_x[source + t]
        # Flat indices, no array views: at batch 1 a view per window position cost more than the arithmetic.
        unsigned_batch = np.uint64(batch)
        for row in range(rows):
            pooled = np.uint64(((channel * out_height + first_row + row) * out_width) * batch)
            for w in range(out_width):
                window = pooled + np.uint64(w * batch)
                corner = np.uint64(row * pool_h * run_length + w * pool_w * batch)  # top-left conv output
                for n in range(unsigned_batch):
                    flat_out[window + n] = accumulator[corner + n]
                for a in range(pool_h):
                    for b in range(pool_w):
                        candidate = corner + np.uint64(a * run_length + b * batch)
                        for n in range(unsigned_batch):
                            flat_out[window + n] = max(flat_out[window + n], accumulator[candidate + n])
                # The bias and ReLU commute with the max: they touch the pooled values only.
                for n in range(unsigned_batch):
                    value = flat_out[window + n] + offset
                    flat_out[window + n] = max(value, np.float32(0.0)) if relu else value


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def linear(x, values, col_indices, row_pointers, bias, relu, out):  # pragma: no cover - compiled
    """``out (O, N) = relu(W @ x (I, N) + bias)``, W in CSR; ``bias`` may be empty."""
    (features, batch), out_features = x.shape, out.shape[0]
    flat_x, flat_out = x.reshape(features * batch), out.reshape(out_features * batch)  # see UNSIGNED
    unsigned_batch = np.uint64(batch)
    for row in numba.prange(out_features):
        offset = bias[row] if bias.size > 0 else np.float32(0.0)
        start, stop = row_pointers[row], row_pointers[row + 1]
        if batch == 1:  # a sparse dot product; four running sums, so the additions need not wait in line
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for k in range(start, stop - 3, 4):
                s0 += values[k] * flat_x[np.uint64(col_indices[k])]
                s1 += values[k + 1] * flat_x[np.uint64(col_indices[k + 1])]
                s2 += values[k + 2] * flat_x[np.uint64(col_indices[k + 2])]
                s3 += values[k + 3] * flat_x[np.uint64(col_indices[k + 3])]
            for k in range(stop - (stop - start) % 4, stop):
                s0 += values[k] * flat_x[np.uint64(col_indices[k])]
            flat_out[row] = offset + ((s0 + s1) + (s2 + s3))
        else:
            target = np.uint64(row * batch)
            for n in range(unsigned_batch):
                flat_out[target + n] = offset
            # Four weights per pass over the output row: a quarter of its loads and stores, and of the
            # loop's set-up, which for a batch of 100 costs about as much as the multiply-adds.
            for k in range(start, stop - 3, 4):
                v0, v1, v2, v3 = values[k], values[k + 1], values[k + 2], values[k + 3]
                x0, x1 = np.uint64(col_indices[k]) * unsigned_batch, np.uint64(col_indices[k + 1]) * unsigned_batch
                x2, x3 = np.uint64(col_indices[k + 2]) * unsigned_batch, np.uint64(col_indices[k + 3]) * unsigned_batch
                for n in range(unsigned_batch):
                    flat_out[target + n] += (v0 * flat_x[x0 + n] + v1 * flat_x[x1 + n]
                                             + v2 * flat_x[x2 + n] + v3 * flat_x[x3 + n])
            for k in range(stop - (stop - start) % 4, stop):
                value, source = values[k], np.uint64(col_indices[k]) * unsigned_batch
                for n in range(unsigned_batch):
                    flat_out[target + n] += value * flat_x[source + n]
        if relu:
            for n in range(np.uint64(row * batch), np.uint64((row + 1) * batch)):
                flat_out[n] = max(flat_out[n], np.float32(0.0))


# ----------------------------------------------------------------------------- training

@numba.njit(fastmath=True, cache=True)
def train_matmul(indptr, columns, weight, inputs, outputs):  # pragma: no cover - compiled
    """``outputs (out, batch) = W @ inputs (in, batch)``."""
    for row in range(len(indptr) - 1):
        outputs[row, :] = 0.0
        for k in range(indptr[row], indptr[row + 1]):
            value, column = weight[k], columns[k]
            for b in range(inputs.shape[1]):
                outputs[row, b] += value * inputs[column, b]


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
def blocked_matmul(indptr, columns, weight, inputs, outputs, item_rows, block_rows):  # pragma: no cover
    """``outputs (out, batch) = W @ inputs (in, batch)``, ``train_matmul``'s sums, in parallel and cache blocks.

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
