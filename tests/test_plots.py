"""Tests for dst.tutorial.plots: the mask colouring against an oracle, and that every figure draws and saves."""

import matplotlib

matplotlib.use("Agg")  # headless; must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from dst.tutorial import mask_plots, plots  # noqa: E402

BLACK, WHITE, RED, GREEN = (tuple(color) for color in mask_plots.TRANSITION_COLORS)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def random_masks(epochs=3, shapes=None, density=0.2, seed=0):
    rng = np.random.default_rng(seed)
    shapes = shapes or {"conv1": (4, 9), "fc1": (8, 300)}
    return [{name: rng.random(shape) < density for name, shape in shapes.items()} for _ in range(epochs)]


def test_mask_transition_image_colours_each_transition():
    previous = np.array([[1, 1, 0], [0, 1, 0]], dtype=bool)
    current = np.array([[1, 0, 1], [0, 1, 0]], dtype=bool)
    image = mask_plots.mask_transition_image(previous, current)
    assert image.shape == (2, 3, 3)
    assert image.dtype == np.uint8
    expected = [[WHITE, RED, GREEN], [BLACK, WHITE, BLACK]]
    assert [[tuple(pixel) for pixel in row] for row in image] == expected


def test_first_epoch_against_itself_is_only_white_and_black():
    mask = np.array([[1, 0, 1], [0, 0, 1]], dtype=bool)
    image = mask_plots.mask_transition_image(mask, mask)
    assert {tuple(pixel) for pixel in image.reshape(-1, 3)} == {WHITE, BLACK}


def test_block_with_one_regrown_pixel_among_kept_is_green():
    previous = np.ones((8, 8), dtype=bool)
    current = previous.copy()
    current[3, 5] = False  # pruned
    previous[6, 1] = False  # regrown: off before, on now
    image = mask_plots.mask_transition_image(previous, current, block=(8, 8))
    assert image.shape == (1, 1, 3)
    assert tuple(image[0, 0]) == GREEN


def test_block_priority_pruned_over_kept_over_empty():
    previous = np.zeros((4, 6), dtype=bool)
    current = np.zeros((4, 6), dtype=bool)
    previous[0, 0] = True  # block (0, 0): one pruned pixel
    previous[0, 3] = current[0, 3] = True  # block (0, 1): one kept pixel
    image = mask_plots.mask_transition_image(previous, current, block=(2, 3))
    assert [[tuple(pixel) for pixel in row] for row in image] == [[RED, WHITE], [BLACK, BLACK]]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 9), st.integers(1, 9), st.integers(0, 10**6))
def test_block_reduction_takes_each_blocks_highest_priority(height, width, block_rows, block_cols, seed):
    rng = np.random.default_rng(seed)
    previous, current = rng.random((2, height, width)) < 0.3
    full = mask_plots.mask_transition_image(previous, current)
    reduced = mask_plots.mask_transition_image(previous, current, block=(block_rows, block_cols))
    priority = [BLACK, WHITE, RED, GREEN]
    assert reduced.shape == (-(-height // block_rows), -(-width // block_cols), 3)
    for row in range(reduced.shape[0]):
        for column in range(reduced.shape[1]):
            rows = slice(row * block_rows, (row + 1) * block_rows)
            columns = slice(column * block_cols, (column + 1) * block_cols)
            expected = max((tuple(pixel) for pixel in full[rows, columns].reshape(-1, 3)), key=priority.index)
            assert tuple(reduced[row, column]) == expected


def test_mask_transition_image_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        mask_plots.mask_transition_image(np.zeros((2, 3), bool), np.zeros((3, 2), bool))


def test_mask_2d_evolution_reduces_large_masks_and_names_the_block_size(tmp_path):
    masks = random_masks(epochs=2, shapes={"fc3": (1000, 1000), "conv1": (16, 9)}, density=0.05)
    path = tmp_path / "nested" / "dir" / "mask_2d.png"
    fig = mask_plots.plot_mask_2d_evolution(masks, save_path=path)
    assert isinstance(fig, Figure)
    assert path.is_file()
    big_image = fig.axes[0].images[0].get_array()
    assert max(big_image.shape[:2]) <= mask_plots.MAX_IMAGE_SIDE
    assert "(8x8 blocks)" in fig.axes[0].get_title(loc="left")
    assert "blocks" not in fig.axes[2].get_title(loc="left")


def test_mask_2d_evolution_rejects_layers_that_change_between_epochs():
    masks = random_masks(epochs=2)
    del masks[1]["fc1"]
    with pytest.raises(ValueError, match="epoch 2"):
        mask_plots.plot_mask_2d_evolution(masks)


def test_mask_evolution_per_epoch_reports_turnover(tmp_path):
    masks = random_masks(epochs=3)
    masks[2] = {name: mask.copy() for name, mask in masks[1].items()}  # no change from epoch 2 to 3
    sparsity = [{name: 1 - mask.mean() for name, mask in epoch.items()} for epoch in masks]
    path = tmp_path / "a" / "evolution.png"
    fig = mask_plots.plot_mask_evolution_per_epoch(sparsity, masks, save_path=path, epochs=[0, 1, 2])
    assert path.is_file()
    # Bars only where masks changed (snapshot 1, between epochs 0 and 1), one per layer, at the
    # turnover computed by hand: previously active connections that are gone, in percent.
    bars = fig.axes[1].patches
    expected = {name: 100 * (masks[0][name] & ~masks[1][name]).sum() / masks[0][name].sum() for name in masks[0]}
    assert len(bars) == 2
    assert sorted(bar.get_height() for bar in bars) == pytest.approx(sorted(expected.values()))
    assert all(0.5 < bar.get_x() + bar.get_width() / 2 < 1.5 for bar in bars)
    assert [label.get_text() for label in fig.axes[1].get_xticklabels()] == ["0", "1", "2"]
    assert isinstance(mask_plots.plot_mask_evolution_per_epoch(sparsity), Figure)
    with pytest.raises(ValueError, match="increasing"):
        mask_plots.plot_mask_evolution_per_epoch(sparsity, masks, epochs=[0, 0, 1])


def test_mask_evolution_per_epoch_rejects_mismatched_epochs():
    masks = random_masks(epochs=3)
    sparsity = [{name: 0.8 for name in masks[0]}] * 2
    with pytest.raises(ValueError, match="masks_per_epoch"):
        mask_plots.plot_mask_evolution_per_epoch(sparsity, masks)


def curves(epochs=4):
    return [list(np.linspace(1, 0.1, epochs)), list(np.linspace(80, 98, epochs))] * 4


def test_dense_vs_masked_comparison_draws_and_saves(tmp_path):
    path = tmp_path / "out" / "comparison.png"
    fig = plots.plot_dense_vs_masked_comparison(*curves(), save_path=path)
    assert isinstance(fig, Figure)
    assert path.is_file()


def test_dense_vs_masked_comparison_names_the_short_list():
    arguments = curves()
    arguments[6] = arguments[6][:-1]  # masked_test_losses
    with pytest.raises(ValueError, match="masked_test_losses has 3"):
        plots.plot_dense_vs_masked_comparison(*arguments)


def timing(median):
    return {"mean": median * 1.05, "std": median * 0.1, "median": median, "runs": 10}


def annotation_for(fig, prefix):
    texts = [text.get_text() for text in fig.axes[0].texts]
    return next(text for text in texts if text.startswith(prefix))


def test_benchmark_ratio_wording_both_directions(tmp_path):
    timings = {"Dense+Mask (CPU)": timing(4.0), "Truly Sparse CSR (CPU)": timing(0.8),
               "Truly Sparse torch.sparse (CPU)": timing(10.0),
               "Dense+Mask (GPU)": timing(0.1), "Truly Sparse CSR (GPU)": timing(0.25)}
    layers = {"fc1": {"shape": [128, 1568], "nnz": 10035, "dense_bytes": 1003520, "sparse_bytes": 80796}}
    memory = {"dense_bytes": 1003520, "sparse_bytes": 80796, "ratio": 12.4, "layers": layers}
    path = tmp_path / "bench" / "benchmark.png"
    fig = plots.plot_benchmark(timings, memory, save_path=path)
    assert path.is_file()
    assert annotation_for(fig, "4.00 ms").endswith("baseline")
    assert annotation_for(fig, "0.800 ms").endswith("5x faster")  # against the CPU baseline
    assert annotation_for(fig, "10.0 ms").endswith("2.5x slower")
    assert annotation_for(fig, "0.250 ms").endswith("2.5x slower")  # against the GPU baseline, not CPU
    assert "12.4x smaller" in fig.axes[1].get_title()


def test_benchmark_calls_equal_times_the_same_speed():
    fig = plots.plot_benchmark({"Dense+Mask": timing(1.0), "Truly Sparse CSR": timing(1.01)})
    assert annotation_for(fig, "1.01 ms").endswith("same speed")


def test_benchmark_without_baseline_shows_time_only():
    fig = plots.plot_benchmark({"Truly Sparse CSR (GPU)": timing(0.3)})
    assert [text.get_text() for text in fig.axes[0].texts] == ["0.300 ms"]


def sweep_rows():
    return [{"sparsity": sparsity, "batch_size": batch_size, "backend": backend,
             "speedup": (1 - sparsity) ** -0.8 / 8, "dense_bytes": 5_000_000,
             "sparse_bytes": int(8_000_000 * (1 - sparsity))}
            for backend in ("scipy", "torch") for batch_size in (1, 64) for sparsity in (0.5, 0.9, 0.99)]


def test_sparsity_sweep_draws_a_panel_per_batch_size_a_line_per_backend_and_each_memory_series_once(tmp_path):
    path = tmp_path / "sweep" / "sweep.png"
    rows = sweep_rows()
    rows += [{**row, "backend": row["backend"] + " (erk)", "speedup": 2 * row["speedup"]} for row in sweep_rows()]
    fig = plots.plot_sparsity_sweep(rows, save_path=path)
    assert path.is_file()
    batch_1, batch_64, memory = fig.axes
    for ax, batch_size in ((batch_1, 1), (batch_64, 64)):
        drawn = {line.get_label(): list(line.get_ydata()) for line in ax.lines if line.get_label() != "break-even"}
        assert set(drawn) == {"scipy, uniform", "torch, uniform", "scipy, erk", "torch, erk"}
        for label, values in drawn.items():
            engine, allocation = label.split(", ")
            backend = engine + (" (erk)" if allocation == "erk" else "")
            assert values == [row["speedup"] for row in rows if row["backend"] == backend
                              and row["batch_size"] == batch_size]
        # a backend keeps its colour in every allocation; the allocation is the line style
        colours = {label.split(", ")[0]: line.get_color() for line in ax.lines for label in [line.get_label()]
                   if label != "break-even"}
        assert len(set(colours.values())) == 2
    # scipy and torch hold the same bytes here: one memory line says so instead of one hiding the other
    assert [line.get_label() for line in memory.lines] == ["dense weights + mask", "CSR (scipy, torch)"]
    assert list(memory.lines[1].get_ydata()) == pytest.approx([8_000_000 * (1 - s) / 2**20 for s in (0.5, 0.9, 0.99)],
                                                              rel=5e-3)  # 3 digits


def test_sparsity_sweep_rejects_rows_missing_keys():
    rows = sweep_rows()
    del rows[2]["speedup"]
    with pytest.raises(ValueError, match="row 2 .*speedup"):
        plots.plot_sparsity_sweep(rows)


def test_runs_comparison_draws_and_saves_with_missing_speedup(tmp_path):
    runs = [{"sparsity": sparsity, "label": f"s={sparsity}", "dense_test_acc": 98.9,
             "masked_test_acc": 98.9 - 10 * (sparsity - 0.8), "speedup": speedup,
             "memory_ratio": memory_ratio}
            for sparsity, speedup, memory_ratio in [(0.99, None, 50.0), (0.8, 0.7, 2.9), (0.95, 2.1, None)]]
    path = tmp_path / "runs" / "runs.png"
    fig = plots.plot_runs_comparison(runs, save_path=path)
    assert isinstance(fig, Figure)
    assert path.is_file()
    assert list(fig.axes[0].lines[0].get_xdata()) == [80, 95, 99]  # sorted by sparsity


# ----------------------------------------------------------------------------- the data each figure draws
# Found by what is drawn (a line's data, a bar's height, an image's pixels), not by which axes or in what
# order, so these survive a figure's layout changing; each expected series is distinct from every other.

def drawn_lines(fig) -> list[tuple[int, str, np.ndarray, np.ndarray]]:
    """(axes index, label, x, y) of every line on every axes of ``fig``."""
    return [(index, line.get_label(), np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float))
            for index, ax in enumerate(fig.axes) for line in ax.lines]


def lines_drawing(fig, y, x=None) -> list[tuple[int, str]]:
    """(axes index, label) of the lines whose y data is exactly ``y`` (NaN equal to NaN), and x data ``x`` if given."""
    y = np.asarray(y, float)
    return [(index, label) for index, label, xdata, ydata in drawn_lines(fig)
            if ydata.shape == y.shape and np.array_equal(ydata, y, equal_nan=True)
            and (x is None or np.array_equal(xdata, np.asarray(x, float)))]


def test_dense_vs_masked_comparison_draws_each_curve_and_masked_minus_dense():
    rng = np.random.default_rng(0)
    series = {f"{net}_{split}_{metric}": rng.uniform(1, 99, 5).round(2).tolist()
              for net in ("dense", "masked") for split in ("train", "test") for metric in ("losses", "accs")}
    fig = plots.plot_dense_vs_masked_comparison(**series)
    epochs = [1, 2, 3, 4, 5]
    for name, values in series.items():
        assert len(lines_drawing(fig, values, epochs)) == 1, f"{name} is not drawn once against the epochs"
    for split in ("train", "test"):
        for metric in ("losses", "accs"):
            dense, masked = (np.array(series[f"{net}_{split}_{metric}"]) for net in ("dense", "masked"))
            [(dense_axes, _)], [(masked_axes, _)] = lines_drawing(fig, dense), lines_drawing(fig, masked)
            assert dense_axes == masked_axes, f"dense and masked {split} {metric} are not on one axes"
            assert len(lines_drawing(fig, masked - dense, epochs)) == 1, f"masked minus dense {split} {metric}"
            assert not lines_drawing(fig, dense - masked), f"{split} {metric}: the difference's sign is flipped"


def test_benchmark_bars_are_the_medians_and_the_memory_bars_each_layers_kib():
    timings = {"Dense+Mask (CPU)": timing(4.0), "Truly Sparse CSR (CPU)": timing(0.8),
               "Truly Sparse torch.sparse (CPU)": timing(10.0)}
    layers = {"conv1": {"dense_bytes": 2048, "sparse_bytes": 512}, "fc1": {"dense_bytes": 1003520,
                                                                          "sparse_bytes": 80796}}
    memory = {"dense_bytes": 1005568, "sparse_bytes": 81308, "layers": layers}
    fig = plots.plot_benchmark(timings, memory)
    heights = [[patch.get_height() for patch in ax.patches] for ax in fig.axes]
    assert [4.0, 0.8, 10.0] in heights  # the time bars, in the order given
    memory_bars = next(bars for bars in heights if len(bars) == 4)
    dense, sparse = [2048 / 1024, 1003520 / 1024], [512 / 1024, 80796 / 1024]
    assert sorted(memory_bars) == sorted(dense + sparse)
    memory_ax = fig.axes[heights.index(memory_bars)]
    by_label = {container.get_label(): [bar.get_height() for bar in container] for container in memory_ax.containers}
    assert dense in by_label.values() and sparse in by_label.values()
    assert [label for label, bars in by_label.items() if bars == sparse][0].startswith("CSR")


def test_sparsity_sweep_draws_each_rows_speedup_and_memory_sorted_by_sparsity():
    factor = {("scipy", 1): 1.0, ("scipy", 64): 1.5, ("torch", 1): 0.5, ("torch", 64): 0.75}
    rows = [{"sparsity": sparsity, "batch_size": batch_size, "backend": backend,
             "speedup": factor[backend, batch_size] / (1 - sparsity), "dense_bytes": 5_000_000,
             "sparse_bytes": int((8_000_000 if backend == "scipy" else 6_000_000) * (1 - sparsity))}
            for backend, batch_size in factor for sparsity in (0.99, 0.5, 0.9)]  # out of order: the figure sorts
    fig = plots.plot_sparsity_sweep(rows)
    percents = [50, 90, 99]
    for (backend, batch_size), scale in factor.items():
        speedups = [scale / (1 - sparsity) for sparsity in (0.5, 0.9, 0.99)]
        drawn = lines_drawing(fig, speedups, percents)
        assert [label for _, label in drawn] == [f"{backend}, uniform"]  # one panel per batch size
        assert fig.axes[drawn[0][0]].get_title().startswith(f"batch {batch_size}:")
    for backend, size in (("scipy", 8_000_000), ("torch", 6_000_000)):
        sparse_mib = [int(size * (1 - sparsity)) / 2**20 for sparsity in (0.5, 0.9, 0.99)]
        assert [label for _, label in lines_drawing(fig, sparse_mib, percents)] == [f"CSR ({backend})"]
    assert len(lines_drawing(fig, [5_000_000 / 2**20] * 3, percents)) == 1  # dense weights + mask


def test_runs_comparison_draws_each_runs_accuracy_and_ratios_with_gaps_for_missing_ones():
    runs = [{"sparsity": sparsity, "label": f"s={sparsity}", "dense_test_acc": dense, "masked_test_acc": masked,
             "speedup": speedup, "memory_ratio": memory_ratio}
            for sparsity, dense, masked, speedup, memory_ratio in [(0.99, 98.7, 95.1, None, 50.0),
                                                                   (0.8, 98.9, 98.2, 0.7, 2.9),
                                                                   (0.95, 98.8, 97.4, 2.1, None)]]
    fig = plots.plot_runs_comparison(runs)
    percents = [80, 95, 99]
    for values in ([98.9, 98.8, 98.7], [98.2, 97.4, 95.1], [0.7, 2.1, np.nan], [2.9, np.nan, 50.0]):
        assert len(lines_drawing(fig, values, percents)) == 1, values
    [(dense_axes, _)], [(masked_axes, _)] = lines_drawing(fig, [98.9, 98.8, 98.7]), lines_drawing(fig, [98.2, 97.4,
                                                                                                         95.1])
    assert dense_axes == masked_axes


def test_mask_evolution_per_epoch_draws_each_layers_sparsity_and_turnover():
    masks = random_masks(epochs=4, shapes={"conv1": (4, 9), "fc1": (8, 300), "fc2": (10, 8)}, density=0.3, seed=3)
    sparsity = [{name: float(1 - mask.mean()) for name, mask in epoch.items()} for epoch in masks]
    fig = mask_plots.plot_mask_evolution_per_epoch(sparsity, masks)
    for name in masks[0]:
        percent = [100 * epoch[name] for epoch in sparsity]
        assert [label for _, label in lines_drawing(fig, percent, [1, 2, 3, 4])] == [name]
        # Oracle: the share of the previous epoch's active connections that are off now, a bar at each epoch.
        turnover = [100 * (before[name] & ~after[name]).sum() / before[name].sum()
                    for before, after in zip(masks, masks[1:])]
        (bars,) = [container for container in fig.axes[1].containers if container.get_label() == name]
        assert {round(bar.get_x() + bar.get_width() / 2): bar.get_height() for bar in bars} == dict(
            zip([2, 3, 4], turnover))


def test_mask_2d_evolution_draws_each_transition_at_its_layer_and_epoch():
    masks = random_masks(epochs=3, shapes={"conv1": (4, 9), "fc1": (8, 30)}, seed=4)
    masks[2] = {name: mask.copy() for name, mask in masks[1].items()}  # epoch 3 unchanged: not drawn
    fig = mask_plots.plot_mask_2d_evolution(masks)
    drawn = [np.asarray(image.get_array()) for ax in fig.axes for image in ax.images]
    expected = [mask_plots.mask_transition_image(masks[max(epoch - 1, 0)][name], masks[epoch][name])
                for name in ("conv1", "fc1") for epoch in (0, 1)]
    assert len(drawn) == len(expected)
    for image in expected:
        assert sum(np.array_equal(image, pixels) for pixels in drawn) == 1


def test_pattern_masks_are_drawn_as_given_and_the_tradeoff_puts_each_point_where_its_numbers_say():
    from dst.tutorial.pattern_figure import plot_pattern_masks, plot_pattern_tradeoff

    rng = np.random.default_rng(0)
    masks = {"unstructured": rng.random((8, 16)) < 0.5, "2:4": np.tile([True, False, True, False], (8, 4))}
    figure = plot_pattern_masks(masks)
    assert len(figure.axes) == 2
    for ax, mask in zip(figure.axes, masks.values(), strict=True):
        assert np.array_equal(ax.images[0].get_array().astype(bool), mask)
        assert f"{100 * mask.mean():.0f} % of weights active" in ax.get_title()
    with pytest.raises(ValueError, match="must be 2-D"):
        plot_pattern_masks({"flat": np.ones(4, dtype=bool)})
    points = [{"label": "fan_in", "kind": "fan_in", "speedup": 3.0, "accuracy_change": -0.2},
              {"label": "unstructured", "kind": "unstructured", "speedup": 1.5, "accuracy_change": 0.0}]
    tradeoff = plot_pattern_tradeoff(points)
    offsets = np.concatenate([collection.get_offsets() for collection in tradeoff.axes[0].collections])
    assert offsets.tolist() == [[3.0, -0.2], [1.5, 0.0]]
    with pytest.raises(ValueError, match="speedup"):
        plot_pattern_tradeoff([{"label": "x", "kind": "block"}])
    plt.close("all")
