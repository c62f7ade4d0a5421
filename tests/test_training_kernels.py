"""The parallel, cache-blocked training kernels equal the serial ones; the layer's bounded init and update.

The serial kernels (``train_matmul``, ``train_matmul_transposed``, ``train_sddmm``) are the
reference; a numpy product of the dense matrix checks them in turn. Shapes include empty
rows and columns, batch 1 and blocks of one row, so every cursor path runs.
"""

import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dst.csr import csr_build, memory
from dst.csr.backends import get_backend
from dst.csr.csr_build import csr_from_positions, random_csr
from dst.csr.linear import SparseLinear
from dst.csr.mlp import SparseMLP

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                reason="numba is not installed (optional backend)")


def random_layer(rng, out_features, in_features, density, empty_rows=(), empty_columns=()):
    """Sorted int32 CSR arrays of a random pattern, with the given rows and columns left empty."""
    mask = rng.random((out_features, in_features)) < density
    mask[list(empty_rows), :] = False
    mask[:, list(empty_columns)] = False
    positions = np.flatnonzero(mask).astype(np.int64)
    indptr, columns = csr_from_positions(positions, (out_features, in_features))
    weight = rng.standard_normal(len(positions)).astype(np.float32)
    return indptr, columns, weight, mask


def csc_of(indptr, columns, in_features):
    from dst.csr.numba_training_kernels import csc_permutation

    csc_indptr = np.zeros(in_features + 1, dtype=indptr.dtype)
    csc_rows = np.empty(len(columns), dtype=columns.dtype)
    csc_order = np.empty(len(columns), dtype=indptr.dtype)
    csc_permutation(indptr, columns, in_features, csc_indptr, csc_rows, csc_order)
    return csc_indptr, csc_rows, csc_order


layer_shapes = st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from([0.0, 0.05, 0.3, 1.0]),
                         st.integers(1, 9), st.integers(1, 8), st.integers(1, 6), st.integers(0, 10**6))


def serial_case(out_features, in_features, density, batch, seed):
    """A random layer (empty rows and columns included), its operands, and the serial kernels' products.

    The serial products are checked against numpy on the dense matrix here, so a kernel equal to
    them bitwise is right too. Returns the CSR arrays, the operands and ``(outputs, dA, dW)``.
    """
    from dst.csr.numba_training_kernels import train_matmul, train_matmul_transposed, train_sddmm

    rng = np.random.default_rng(seed)
    indptr, columns, weight, mask = random_layer(rng, out_features, in_features, density,
                                                 empty_rows=range(0, out_features, 3),
                                                 empty_columns=range(1, in_features, 4))
    inputs = rng.standard_normal((in_features, batch)).astype(np.float32)
    grad_outputs = rng.standard_normal((out_features, batch)).astype(np.float32)
    bias, relu = rng.standard_normal(out_features).astype(np.float32), bool(seed % 2)
    outputs, grad_inputs = np.empty((out_features, batch), np.float32), np.zeros((in_features, batch), np.float32)
    weight_grad = np.empty(len(weight), np.float32)
    train_matmul(indptr, columns, weight, inputs, bias, relu, outputs)
    train_matmul_transposed(indptr, columns, weight, grad_outputs, grad_inputs)
    train_sddmm(indptr, columns, grad_outputs, inputs, weight_grad)

    dense = np.zeros((out_features, in_features), np.float32)
    dense[mask] = weight
    expected = dense @ inputs + bias[:, None]
    np.testing.assert_allclose(outputs, np.maximum(expected, 0) if relu else expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_inputs, dense.T @ grad_outputs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(weight_grad, (grad_outputs @ inputs.T)[mask], rtol=1e-5, atol=1e-5)
    return (indptr, columns, weight), (inputs, grad_outputs, bias, relu), (outputs, grad_inputs, weight_grad)


def unwritten(serial):
    """NaN arrays shaped like the serial products: a kernel must overwrite every entry (empty rows and columns
    too)."""
    return tuple(np.full(product.shape, np.nan, np.float32) for product in serial)


@settings(max_examples=60, deadline=None)
@given(layer_shapes)
def test_blocked_kernels_equal_the_serial_ones_bitwise(case):
    from dst.csr.numba_training import balanced_items
    from dst.csr.numba_training_kernels import blocked_matmul, blocked_matmul_transposed, blocked_sddmm

    out_features, in_features, density, batch, block, items, seed = case
    (indptr, columns, weight), (inputs, grad_outputs, bias, relu), serial = serial_case(
        out_features, in_features, density, batch, seed)
    row_items = balanced_items(indptr, items)
    outputs, grad_inputs, weight_grad = unwritten(serial)
    blocked_matmul(indptr, columns, weight, inputs, bias, relu, outputs, row_items, block)
    csc = csc_of(indptr, columns, in_features)
    blocked_matmul_transposed(*csc, weight, grad_outputs, grad_inputs, balanced_items(csc[0], items), block)
    blocked_sddmm(indptr, columns, grad_outputs, inputs, weight_grad, row_items, block)
    for blocked, reference in zip((outputs, grad_inputs, weight_grad), serial, strict=True):
        np.testing.assert_array_equal(blocked, reference)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.sampled_from([0.0, 0.1, 0.5, 1.0]), st.integers(0, 1000))
def test_csc_permutation_lists_each_column_rows_ascending(out_features, in_features, density, seed):
    indptr, columns, weight, mask = random_layer(np.random.default_rng(seed), out_features, in_features, density)
    csc_indptr, csc_rows, csc_order = csc_of(indptr, columns, in_features)
    np.testing.assert_array_equal(np.diff(csc_indptr), mask.sum(axis=0))
    rows_of = np.repeat(np.arange(out_features), np.diff(indptr))
    np.testing.assert_array_equal(rows_of[csc_order], csc_rows)  # each entry's row, through the order
    np.testing.assert_array_equal(columns[csc_order], np.repeat(np.arange(in_features), np.diff(csc_indptr)))
    for column in range(in_features):
        assert np.all(np.diff(csc_rows[csc_indptr[column]:csc_indptr[column + 1]]) > 0)
    assert sorted(csc_order.tolist()) == list(range(len(columns)))


def tiles_of(indptr, columns, shape, height, width):
    """Both tile layouts of a CSR pattern, as the layer's ``TrainingLayout`` builds them."""
    from dst.csr.numba_training import TrainingLayout

    layout = TrainingLayout(None, columns, indptr, shape)
    return layout.row_tiles(height), layout.column_tiles(width)


@settings(max_examples=60, deadline=None)
@given(layer_shapes)
def test_tiled_kernels_equal_the_serial_ones_bitwise(case):
    from dst.csr.numba_training_kernels import tiled_backward, tiled_matmul

    out_features, in_features, density, batch, height, width, seed = case
    (indptr, columns, weight), (inputs, grad_outputs, bias, relu), serial = serial_case(
        out_features, in_features, density, batch, seed)
    by_row, by_column = tiles_of(indptr, columns, (out_features, in_features), height, width)
    outputs, grad_inputs, weight_grad = unwritten(serial)
    tiled_matmul(*by_row, weight, inputs, bias, relu, outputs, height)
    tiled_backward(*by_column, weight, grad_outputs, inputs, relu, grad_inputs, weight_grad, width)
    np.testing.assert_array_equal(outputs, serial[0])
    np.testing.assert_array_equal(grad_inputs, serial[1] * (inputs > 0) if relu else serial[1])  # ReLU's backward
    np.testing.assert_array_equal(weight_grad, serial[2])


@settings(max_examples=30, deadline=None)
@given(layer_shapes)
def test_the_tiles_hold_every_weight_once_in_their_order(case):
    out_features, in_features, density, _, height, width, seed = case
    indptr, columns, _, mask = random_layer(np.random.default_rng(seed), out_features, in_features, density)
    rows_of = np.repeat(np.arange(out_features), np.diff(indptr))
    tiles = tiles_of(indptr, columns, (out_features, in_features), height, width)
    for (pointers, rows, cols, order), by_rows in ((tiles[0], True), (tiles[1], False)):
        assert sorted(order.tolist()) == list(range(len(columns)))
        np.testing.assert_array_equal(rows, rows_of[order])
        np.testing.assert_array_equal(cols, columns[order])
        # row tiles: a tile of `height` rows, by column then row; column tiles: `width` columns, by row then column
        tile_of, major, minor = (rows // height, cols, rows) if by_rows else (cols // width, rows, cols)
        np.testing.assert_array_equal(np.diff(pointers), np.bincount(tile_of, minlength=len(pointers) - 1))
        for tile in range(len(pointers) - 1):
            span = slice(pointers[tile], pointers[tile + 1])
            assert np.all(tile_of[span] == tile)
            keys = major[span].astype(np.int64) * max(out_features, in_features) + minor[span]
            assert np.all(np.diff(keys) > 0)


def test_tiles_only_where_the_operand_outgrows_a_cache_block_and_every_thread_gets_work(monkeypatch):
    import numba

    from dst.csr import numba_training
    from dst.csr.numba_training import BLOCK_BYTES, TILE_BYTES, column_tiling, row_tiling

    threads, past_block = numba.get_num_threads(), BLOCK_BYTES // (4 * 128) + 1
    height, width = TILE_BYTES // (4 * 128), TILE_BYTES // (8 * 128)  # rows of outputs; rows of dA and of A
    assert row_tiling((10**6, past_block - 1), 128) is None  # the inputs fit a block: the blocked kernel
    assert row_tiling((2 * threads * height, past_block), 128) == height
    assert row_tiling((2 * threads * height - height, past_block), 128) is None  # a thread would get one tile
    assert column_tiling((10, max(2 * threads * width, past_block)), 128) == width
    assert column_tiling((10**6, BLOCK_BYTES // (4 * 128)), 128) is None  # A and dA fit a block
    monkeypatch.setattr(numba_training, "BLOCK_BYTES", 0)
    assert column_tiling((10**6, 2 * threads * width - width), 128) is None  # a thread would get one tile


def test_balanced_items_cover_every_row_once_with_about_equal_work():
    from dst.csr.numba_training import balanced_items

    indptr = np.array([0, 0, 10, 10, 11, 30, 30, 40], dtype=np.int32)
    bounds = balanced_items(indptr, 4)
    assert bounds[0] == 0 and bounds[-1] == 7 and np.all(np.diff(bounds) >= 0)
    assert balanced_items(np.zeros(6, np.int32), 3).tolist()[-1] == 5  # no weights at all


@pytest.mark.parametrize("batch", [1, 7, 128])
def test_a_step_on_the_parallel_path_equals_one_on_the_serial_path(monkeypatch, batch):
    from dst.csr import numba_training

    rng = np.random.default_rng(batch)
    x, y = rng.standard_normal((batch, 50)).astype(np.float32), rng.integers(0, 5, batch)
    runs, layouts = {}, {}
    # serial; blocked (three rows a block: many blocks; tiles of one row, never enough a thread); tiled
    # (every operand past a block, tiles of six rows of outputs, three of dA and A: every product tiles
    # but the 5-class layer's W @ A, one tile)
    for path, threshold, block_bytes, tile_bytes, tiles_per_thread in (
            ("serial", 1 << 60, 1 << 24, 1 << 23, 2), ("blocked", 0, 4 * batch * 3, 1, 10**9),
            ("tiled", 0, 0, 4 * batch * 6, 2)):
        monkeypatch.setattr(numba_training, "SERIAL_BELOW", threshold)
        monkeypatch.setattr(numba_training, "BLOCK_BYTES", block_bytes)
        monkeypatch.setattr(numba_training, "TILE_BYTES", tile_bytes)
        monkeypatch.setattr(numba_training, "TILES_PER_THREAD", tiles_per_thread)
        model = SparseMLP.random(50, (40, 30), 5, sparsity=0.7, seed=3, backend="numba")
        losses = [model.train_step(x, y) for _ in range(3)]
        model.update_topology(0.3)
        losses += [model.train_step(x, y) for _ in range(2)]
        runs[path] = losses, {name: (layer.weight.copy(), layer.weight_grad.copy())
                              for name, layer in model.layers.items()}
        layouts[path] = {name: sorted({key.split(".")[0] for key in layer.matrix.arrays()})
                         for name, layer in model.layers.items()}
    assert layouts["serial"] == {"fc1": [], "fc2": [], "fc3": []}
    assert layouts["blocked"] == {"fc1": [], "fc2": ["csc_indptr", "csc_order", "csc_rows"],
                                  "fc3": ["csc_indptr", "csc_order", "csc_rows"]}
    # fc1 is never asked for dA
    assert layouts["tiled"] == {"fc1": ["row_tiles"], "fc2": ["column_tiles", "row_tiles"], "fc3": ["column_tiles"]}
    for path in ("blocked", "tiled"):
        assert runs[path][0] == runs["serial"][0], path
        for name, (weight, grad) in runs["serial"][1].items():
            np.testing.assert_array_equal(runs[path][1][name][0], weight)
            np.testing.assert_array_equal(runs[path][1][name][1], grad)


def test_work_buffers_are_reused_across_steps_and_replaced_for_a_new_batch_shape(monkeypatch):
    from dst.csr import numba_training

    monkeypatch.setattr(numba_training, "SERIAL_BELOW", 0)
    model = SparseMLP.random(20, (16,), 4, sparsity=0.5, backend="numba")
    rng = np.random.default_rng(0)
    model.train_step(rng.standard_normal((8, 20)), rng.integers(0, 4, 8))
    held = {name: dict(layer._buffers) for name, layer in model.layers.items()}
    model.train_step(rng.standard_normal((8, 20)), rng.integers(0, 4, 8))
    model.update_topology(0.5)  # a new topology keeps the buffers: their shape is the batch's
    model.train_step(rng.standard_normal((8, 20)), rng.integers(0, 4, 8))
    for name, layer in model.layers.items():
        assert all(layer._buffers[key] is buffer for key, buffer in held[name].items())
    first = model.predict(np.ones((3, 20)))
    second = model.predict(np.zeros((3, 20)))
    assert not np.array_equal(first, second)  # predict hands back a copy, not the buffer
    assert model.layers["fc1"]._buffers["outputs"].shape == (16, 3)


# ----------------------------------------------------------------------------- bounded init and update

def test_chunked_init_draws_exactly_the_count_sorted_unique_and_in_range(monkeypatch):
    monkeypatch.setattr(csr_build, "INIT_CHUNK_POSITIONS", 64)  # 64 positions a chunk: many chunks
    rng = np.random.default_rng(0)
    indptr, columns, weight = random_csr((50, 30), 400, 0.1, 0.25, rng)
    assert indptr[-1] == len(columns) == len(weight) == 400 and np.all(np.diff(indptr) >= 0)
    positions = np.repeat(np.arange(50) * 30, np.diff(indptr)) + columns
    assert np.all(np.diff(positions) > 0) and positions[-1] < 1500 and np.all((columns >= 0) & (columns < 30))
    assert np.abs(weight).max() <= 0.1 / np.sqrt(0.25) and weight.dtype == np.float32
    layer = SparseLinear.random(50, 30, 0.25, rng, get_backend("scipy"))
    assert layer.active_count == 375 and np.all(np.diff(layer.positions()) > 0)


def test_chunked_init_is_uniform_over_positions(monkeypatch):
    monkeypatch.setattr(csr_build, "INIT_CHUNK_POSITIONS", 8)
    rng = np.random.default_rng(1)
    counts = np.zeros(6 * 4)
    for _ in range(2000):
        indptr, columns, _ = random_csr((6, 4), 5, 1.0, 1.0, rng)
        counts[np.repeat(np.arange(6) * 4, np.diff(indptr)) + columns] += 1
    np.testing.assert_allclose(counts / 2000, 5 / 24, atol=0.04)


def test_hypergeometric_beyond_numpys_limit_stays_feasible():
    rng = np.random.default_rng(0)
    assert csr_build.hypergeometric(rng, 10**10, 5, 10) >= 5
    assert csr_build.hypergeometric(rng, 3, 10**10, 10) <= 3
    assert csr_build.hypergeometric(rng, 5, 0, 5) == 5 and csr_build.hypergeometric(rng, 5, 7, 0) == 0


def old_prune_and_regrow(layer, prune_ratio, random):
    """The update as it was before its temporaries were bounded: concatenate, argsort, gather."""
    from dst.engine.update_rule import REGROW, choose_moves, moved_count

    before = layer.positions()
    numel = layer.shape[0] * layer.shape[1]
    count = moved_count(len(before), numel, prune_ratio)
    pruned, regrown = choose_moves(before, np.abs(layer.weight), numel, count, REGROW["random"], random=random)
    keep = np.ones(len(before), dtype=bool)
    keep[pruned] = False
    positions = np.concatenate([before[keep], regrown])
    order = np.argsort(positions)

    def remap(values):
        return np.concatenate([values[keep], np.zeros(count, dtype=values.dtype)])[order]

    return positions[order], remap(layer.weight), {name: remap(values) for name, values in layer.state.items()}


@pytest.mark.parametrize("backend", ["scipy", "numba"])
@settings(max_examples=25, deadline=None)
@given(sparsity=st.floats(0.0, 0.97), prune_ratio=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_the_merged_update_equals_concatenate_and_argsort(backend, sparsity, prune_ratio, seed):
    model = SparseMLP.random(20, (30,), 5, sparsity=sparsity, seed=seed, backend=backend)
    rng = np.random.default_rng(seed)
    for _ in range(2):
        model.train_step(rng.standard_normal((8, 20)), rng.integers(0, 5, 8))
    for layer in model.layers.values():
        positions, weight, state = old_prune_and_regrow(layer, prune_ratio, np.random.default_rng(seed))
        layer.prune_and_regrow(prune_ratio, np.random.default_rng(seed))
        np.testing.assert_array_equal(layer.positions(), positions)
        np.testing.assert_array_equal(layer.weight, weight)
        for name, values in state.items():
            np.testing.assert_array_equal(layer.state[name], values)
        assert layer.columns.dtype == layer.indptr.dtype == np.int32
        assert layer.indptr[-1] == layer.active_count == len(layer.weight_grad)


# ----------------------------------------------------------------------------- the memory check

def test_a_model_that_cannot_fit_fails_before_allocating_and_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 2**30)  # a 1 GiB machine
    with pytest.raises(MemoryError, match=r"needs \d+\.\d\d GiB .* has 1\.00 GiB available"):
        SparseMLP.random(784, (262144, 262144), 10, sparsity=0.99, allocation="uniform")
    SparseMLP.random(784, (256, 256), 10, sparsity=0.9)  # a small one still builds


def test_the_estimate_bounds_what_the_layers_hold_and_equals_it_with_every_layout_built(monkeypatch):
    from dst.csr import numba_training

    def held_and_estimate():
        model = SparseMLP.random(30, (40, 20), 5, sparsity=0.6, seed=0, backend="numba")
        model.train_step(np.ones((4, 30)), [0, 1, 2, 3])
        layers = [(layer.shape, layer.active_count) for layer in model.layers.values()]
        needed = memory.training_bytes(layers, 1, keeps_rows=False,
                                       layout_bytes=numba_training.TrainingLayout.most_bytes)
        return model.nbytes(), needed["held"]

    monkeypatch.setattr(numba_training, "SERIAL_BELOW", 0)  # the blocked kernels: CSC permutations
    held, estimate = held_and_estimate()
    assert held < estimate
    monkeypatch.setattr(numba_training, "BLOCK_BYTES", 0)
    monkeypatch.setattr(numba_training, "TILE_BYTES", 1)  # tiles of one row: a pointer a row
    monkeypatch.setattr(numba_training, "TILES_PER_THREAD", 0)  # the 5-class layer tiles too
    assert held_and_estimate()[0] == held_and_estimate()[1]
    scipy_model = SparseMLP.random(30, (40, 20), 5, sparsity=0.6, seed=0, backend="scipy")
    layers = [(layer.shape, layer.active_count) for layer in scipy_model.layers.values()]
    assert memory.training_bytes(layers, 1, keeps_rows=True)["held"] == scipy_model.nbytes()


def test_available_memory_reads_meminfo_and_falls_back(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemAvailable:    512 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    assert memory.available_memory_bytes() == 512 * 1024
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "missing")
    assert memory.available_memory_bytes() is None or memory.available_memory_bytes() > 0


def test_warm_up_also_readies_the_parallel_kernels():
    model = SparseMLP.random(12, (6,), 3, sparsity=0.5, backend="numba")
    rng = np.random.default_rng(0)
    assert model.warm_up(rng.standard_normal((4, 12)), rng.integers(0, 3, 4)) > 0
    from dst.csr.numba_training import TrainingLayout

    assert model.layers["fc1"].matrix.__class__ is TrainingLayout


def test_a_criterion_that_fails_leaves_the_layer_able_to_train():
    from dst.engine.update_rule import RegrowCriterion

    def wrong(active, numel, count, random):
        return active[:count]  # active positions: refused by the update rule

    model = SparseMLP.random(12, (10,), 3, sparsity=0.5, backend="numba")
    criterion = RegrowCriterion("wrong", "active positions", needs=None, uses_random=False,
                                score=lambda signal, numel, random: np.zeros(numel), sample=wrong)
    with pytest.raises(ValueError, match="inactive"):
        model.update_topology(0.3, criterion)
    rng = np.random.default_rng(0)
    assert np.isfinite(model.train_step(rng.standard_normal((4, 12)), rng.integers(0, 3, 4)))
