"""The compiled kernels of the ``numba`` backend, all working straight on CSR arrays.

Inference (``dst.csr.numba_backend``'s steps), activations batch-last: images
``(C, H, W, N)``, features ``(F, N)``; each a ``prange`` loop over independent
outputs so both cores share it, and the same loop on the calling thread alone
(``*_serial``: the same work items in the same order, so the same sums) for calls
too small to wake a second thread for (``SERIAL_WORK``):

* ``conv_pool``: a conv computed directly from the CSR weight (no im2col), output
  stationary. One work item is one output channel and a block of pooled output rows
  (as many as keep its accumulator in the L1 cache: one at batch 100, all at batch 1);
  the items of one block of rows, every channel, follow each other, so the input rows
  they read stay in cache. The input comes zero-padded (the step copies it into a
  padded buffer, or the conv before writes its output there). The accumulator holds
  the conv rows under the item's pooled rows; weight ``(c, i, j)`` adds ``value *
  x[c, y+i, j:j+width, :]`` to conv row ``y``: one contiguous run of ``width * N``
  floats, and four weights go in one pass over the accumulator. The pool then takes
  its maximum over the accumulator, and the bias and ReLU (which commute with the
  max) touch the pooled values only.
* ``linear``: ``W (out, in) @ X (in, N)``, one output row per item, four weights per
  pass over the row, bias and ReLU fused.

The training kernels are in ``dst.csr.numba_training``.

numba compiles each kernel on its first call (cached on disk next to this file, so
later processes only load it); time nothing before one call.
"""

import os

import numba
import numpy as np

# FMA contraction only: no reassociation, so every output sums its terms in one fixed order.
FASTMATH = {"contract"}
# Multiply-adds below which a numba layer runs on the calling thread alone (``runs_serially``: through the one-thread
# kernels, ``conv_pool_serial`` and ``linear_serial`` here, fan_in's and bsr's in ``dst.csr.kinds``). Only where the
# thread pool sleeps between calls (OMP_WAIT_POLICY=PASSIVE, which the benchmarks set so that no engine's spinning
# threads slow the next): waking the second thread then costs ~40-55 us a call here (AMD EPYC, 2 cores: the
# 1000->10 layer of SimpleNet at 95 %, batch 1, 1 us on one thread and 44 us on two). SimpleNet's whole forward,
# uniform, medians of 40 interleaved runs, ms, for thresholds 2^18 / 2^20 / 2^21 / 2^22 / all calls on one thread /
# all on two: batch 100 at 95 % 0.622 / 0.547 / 0.537 / 0.537 / 0.638 / 0.641, 99 % 0.336 / 0.253 / 0.236 / 0.233 /
# 0.231 / 0.464, 80 % 1.327 / 1.303 / 1.308 / 1.393 / 2.103 / 1.339, 50 % 2.598 / 2.526 / 2.534 / 2.528 / 4.658 /
# 2.550; batch 1 at 50 % 0.458 / 0.382 / 0.383 / 0.482 / 0.476 / 0.505: 2^21, with batch 1's gathered
# multiply-adds counted 8 times (``GATHERED_BATCH``). Under OpenMP's default the threads spin between calls and two
# win at every size measured (a 1568->128 layer at 90 %, batch 1: 6.2 us on two, 12.4 us on one): no threshold.
SERIAL_WORK = (1 << 21) if os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE" else 0
# Below this batch a multiply-add gathers its input one value at a time instead of running along the batch:
# about 8x slower per multiply-add (SimpleNet's 1000->1000 layer at 95 %: 0.56 ns at batch 1, 0.05 at 100).
GATHERED_BATCH = 8


def runs_serially(multiply_adds: int, batch: int) -> bool:
    """Whether a call of ``multiply_adds`` on a batch of ``batch`` runs on the calling thread: its work, each
    multiply-add of a batch under ``GATHERED_BATCH`` counted ``GATHERED_BATCH // batch`` times, below
    ``SERIAL_WORK``."""
    return multiply_adds * max(1, GATHERED_BATCH // max(1, batch)) < SERIAL_WORK


NO_BIAS = np.zeros(0, dtype=np.float32)  # the kernels' "no bias": an empty array, one type for numba
# UNSIGNED: the hot loops index flat arrays with np.uint64. A signed index makes numba add a
# negative-index check to every access, which stops LLVM from vectorising: 2.5x slower on long runs.


# ----------------------------------------------------------------------------- inference

@numba.njit(cache=True, fastmath=FASTMATH, inline="always")
def _conv_pool_item(item, flat_x, x_shape, values, col_indices, row_pointers, bias, kernel_h, kernel_w, pool_h,
                    pool_w, relu, rows_per_item, out_pad_h, out_pad_w, flat_out, out_shape):  # pragma: no cover
    """Work item ``item`` of ``conv_pool``: one output channel over one block of pooled output rows, on the
    flat input and output (indexed with unsigned ints: see UNSIGNED) of shapes ``x_shape`` and ``out_shape``."""
    _, height, width, batch = x_shape
    out_channels, padded_height, padded_width, _ = out_shape
    out_height, out_width = padded_height - 2 * out_pad_h, padded_width - 2 * out_pad_w
    conv_width = pool_w * out_width  # conv output columns the pool reads (floor mode drops the rest)
    run_length = np.uint64(conv_width * batch)  # one conv output row: columns x batch, contiguous
    input_row = np.uint64(width * batch)  # one input row, the step between conv rows
    kernel_area = kernel_h * kernel_w
    first_row, channel = item // out_channels * rows_per_item, item % out_channels
    rows = min(rows_per_item, out_height - first_row)  # pooled rows of this item
    conv_rows = rows * pool_h
    offset = bias[channel] if bias.size > 0 else np.float32(0.0)
    start, stop = row_pointers[channel], row_pointers[channel + 1]
    if start == stop:  # no weight: the constant relu(bias)
        constant = max(offset, np.float32(0.0)) if relu else offset
        for row in range(rows):
            pooled = np.uint64(((channel * padded_height + out_pad_h + first_row + row) * padded_width
                                + out_pad_w) * batch)
            for n in range(np.uint64(out_width * batch)):
                flat_out[pooled + n] = constant
        return
    accumulator = np.empty(conv_rows * run_length, dtype=np.float32)  # the conv rows under them
    first_input = np.uint64(first_row * pool_h) * input_row  # conv row r reads input rows r + i
    # Four weights per pass over the accumulator: a quarter of its loads and stores. Weight (c, i, j) adds
    # value * x[c, r + i, j:j + conv_width, :] to conv row r: one contiguous run, the padding in x.
    k = start
    while k < stop:
        taken = min(4, stop - k)
        s0 = s1 = s2 = s3 = first_input
        v0 = v1 = v2 = v3 = np.float32(0.0)
        for m in range(taken):
            column = np.int64(col_indices[k + m])
            c = column // kernel_area
            i = (column - c * kernel_area) // kernel_w
            j = column - c * kernel_area - i * kernel_w
            source = first_input + np.uint64(((c * height + i) * width + j) * batch)
            if m == 0:
                s0, v0 = source, values[k]
            elif m == 1:
                s1, v1 = source, values[k + 1]
            elif m == 2:
                s2, v2 = source, values[k + 2]
            else:
                s3, v3 = source, values[k + 3]
        fresh = k == start  # the first pass writes the accumulator (allocated empty) instead of adding to it
        for conv_row in range(np.uint64(conv_rows)):
            target, shift = conv_row * run_length, conv_row * input_row
            a0, a1, a2, a3 = s0 + shift, s1 + shift, s2 + shift, s3 + shift
            if taken == 4:
                for t in range(run_length):
                    prior = np.float32(0.0) if fresh else accumulator[target + t]
                    accumulator[target + t] = prior + (v0 * flat_x[a0 + t] + v1 * flat_x[a1 + t]
                                                       + v2 * flat_x[a2 + t] + v3 * flat_x[a3 + t])
            elif taken == 3:
                for t in range(run_length):
                    prior = np.float32(0.0) if fresh else accumulator[target + t]
                    accumulator[target + t] = prior + (v0 * flat_x[a0 + t] + v1 * flat_x[a1 + t]
                                                       + v2 * flat_x[a2 + t])
            elif taken == 2:
                for t in range(run_length):
                    prior = np.float32(0.0) if fresh else accumulator[target + t]
                    accumulator[target + t] = prior + (v0 * flat_x[a0 + t] + v1 * flat_x[a1 + t])
            else:
                for t in range(run_length):
                    prior = np.float32(0.0) if fresh else accumulator[target + t]
                    accumulator[target + t] = prior + v0 * flat_x[a0 + t]
        k += taken
    # Flat indices, no array views: at batch 1 a view per window position cost more than the arithmetic.
    unsigned_batch = np.uint64(batch)
    if batch == 1:  # one value per window position: the maximum in a register, no loops over the batch
        for row in range(rows):
            pooled = np.uint64((channel * padded_height + out_pad_h + first_row + row) * padded_width + out_pad_w)
            for w in range(out_width):
                corner = np.uint64(row * pool_h) * run_length + np.uint64(w * pool_w)
                best = accumulator[corner]
                for a in range(pool_h):
                    for b in range(pool_w):
                        best = max(best, accumulator[corner + np.uint64(a) * run_length + np.uint64(b)])
                value = best + offset
                flat_out[pooled + np.uint64(w)] = max(value, np.float32(0.0)) if relu else value
        return
    for row in range(rows):
        pooled = np.uint64(((channel * padded_height + out_pad_h + first_row + row) * padded_width
                            + out_pad_w) * batch)
        if pool_h == 2 and pool_w == 2:  # the usual pool, in one pass over each window's four runs
            for w in range(out_width):
                window = pooled + np.uint64(w * batch)
                c0 = np.uint64(row * 2) * run_length + np.uint64(w * 2 * batch)
                c1, c2 = c0 + unsigned_batch, c0 + run_length
                c3 = c2 + unsigned_batch
                for n in range(unsigned_batch):
                    value = max(max(accumulator[c0 + n], accumulator[c1 + n]),
                                max(accumulator[c2 + n], accumulator[c3 + n])) + offset
                    flat_out[window + n] = max(value, np.float32(0.0)) if relu else value
            continue
        for w in range(out_width):
            window = pooled + np.uint64(w * batch)
            corner = np.uint64(row * pool_h) * run_length + np.uint64(w * pool_w * batch)  # top-left conv output
            for n in range(unsigned_batch):
                flat_out[window + n] = accumulator[corner + n]
            for a in range(pool_h):
                for b in range(pool_w):
                    candidate = corner + np.uint64(a) * run_length + np.uint64(b * batch)
                    for n in range(unsigned_batch):
                        flat_out[window + n] = max(flat_out[window + n], accumulator[candidate + n])
            # The bias and ReLU commute with the max: they touch the pooled values only.
            for n in range(unsigned_batch):
                value = flat_out[window + n] + offset
                flat_out[window + n] = max(value, np.float32(0.0)) if relu else value


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv_pool(x, values, col_indices, row_pointers, bias, kernel_h, kernel_w, pool_h, pool_w, relu,
              rows_per_item, out_pad_h, out_pad_w, out):  # pragma: no cover - compiled
    """``out (O, Ho + 2*out_pad_h, Wo + 2*out_pad_w, N)``'s interior ``= relu(maxpool(conv(x)) + bias)`` for
    ``x (C, H, W, N)`` already zero-padded for the conv; the border of ``out`` (the next conv's padding) is
    never written. The conv's weight is CSR over the mask's columns ``c*kh*kw + i*kw + j``; ``bias`` may be
    empty, the pool (1, 1) for none. The work items run on numba's threads."""
    out_height = out.shape[1] - 2 * out_pad_h
    # Row-block-major items (see _conv_pool_item): the items of one block of rows, every channel, run one
    # after the other on a thread, so the input rows they read stay in its cache.
    flat_x, flat_out = x.reshape(x.size), out.reshape(out.size)
    for item in numba.prange(out.shape[0] * ((out_height + rows_per_item - 1) // rows_per_item)):
        _conv_pool_item(item, flat_x, x.shape, values, col_indices, row_pointers, bias, kernel_h, kernel_w, pool_h,
                        pool_w, relu, rows_per_item, out_pad_h, out_pad_w, flat_out, out.shape)


@numba.njit(cache=True, fastmath=FASTMATH)
def conv_pool_serial(x, values, col_indices, row_pointers, bias, kernel_h, kernel_w, pool_h, pool_w, relu,
                     rows_per_item, out_pad_h, out_pad_w, out):  # pragma: no cover - compiled
    """``conv_pool`` on the calling thread: the same items in the same order, so the same sums."""
    out_height = out.shape[1] - 2 * out_pad_h
    flat_x, flat_out = x.reshape(x.size), out.reshape(out.size)
    for item in range(out.shape[0] * ((out_height + rows_per_item - 1) // rows_per_item)):
        _conv_pool_item(item, flat_x, x.shape, values, col_indices, row_pointers, bias, kernel_h, kernel_w, pool_h,
                        pool_w, relu, rows_per_item, out_pad_h, out_pad_w, flat_out, out.shape)


@numba.njit(cache=True, fastmath=FASTMATH, inline="always")
def row_over_batch(flat_x, batch, values, col_indices, start, stop, offset, relu, flat_out, target):  # pragma: no cover
    """``flat_out[target:target + batch] = relu(offset + sum_k values[k] * x[col_indices[k], :])`` over entries
    ``start:stop`` in order, x the flat ``(features * batch)`` input (indexed unsigned: see UNSIGNED). Four weights
    per pass over the output row: a quarter of its loads and stores, and of the loop's set-up, which for a batch of
    100 costs about as much as the multiply-adds. The CSR rows here and the constant fan-in rows
    (``dst.csr.kinds.fan_in_kernels``) at batches over 1."""
    unsigned_batch = np.uint64(batch)
    for n in range(unsigned_batch):
        flat_out[target + n] = offset
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
        for n in range(unsigned_batch):
            flat_out[target + n] = max(flat_out[target + n], np.float32(0.0))


@numba.njit(cache=True, fastmath=FASTMATH, inline="always")
def _linear_row(row, flat_x, batch, values, col_indices, row_pointers, bias, relu, flat_out):  # pragma: no cover
    """Output row ``row`` of ``linear``, on the flat (features * batch) arrays (indexed unsigned: see UNSIGNED).

    At batch 1 a vectorised gather (the compiler reassociating the sum) was slower here: SimpleNet's 1000->1000
    layer at 95 % took 46 us against 27 with four running sums (AMD EPYC, whose gathers are slow)."""
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
        total = offset + ((s0 + s1) + (s2 + s3))
        flat_out[row] = max(total, np.float32(0.0)) if relu else total
    else:
        row_over_batch(flat_x, batch, values, col_indices, start, stop, offset, relu, flat_out,
                        np.uint64(row * batch))


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def linear(x, values, col_indices, row_pointers, bias, relu, out):  # pragma: no cover - compiled
    """``out (O, N) = relu(W @ x (I, N) + bias)``, W in CSR; ``bias`` may be empty. Rows on numba's threads."""
    (features, batch), out_features = x.shape, out.shape[0]
    flat_x, flat_out = x.reshape(features * batch), out.reshape(out_features * batch)
    for row in numba.prange(out_features):
        _linear_row(row, flat_x, batch, values, col_indices, row_pointers, bias, relu, flat_out)


@numba.njit(cache=True, fastmath=FASTMATH)
def linear_serial(x, values, col_indices, row_pointers, bias, relu, out):  # pragma: no cover - compiled
    """``linear`` on the calling thread, the same sums."""
    (features, batch), out_features = x.shape, out.shape[0]
    flat_x, flat_out = x.reshape(features * batch), out.reshape(out_features * batch)
    for row in range(out_features):
        _linear_row(row, flat_x, batch, values, col_indices, row_pointers, bias, relu, flat_out)
