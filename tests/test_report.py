"""What the notebook shows and says: figures displayed once, progress lines, and sentences computed from numbers."""

import os
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import dst
from dst.core import progress
from dst.core.models import lenet_300_100
from dst.engine.masked import MaskedNet
from dst.engine.prune_regrow import apply_dst_step
from dst.engine.update_rule import RegrowCriterion
from dst.methods.catalog import METHODS
from dst.tutorial import mask_plots, plots, report


def test_show_displays_one_png_and_closes_the_figure(monkeypatch, tmp_path):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    figure = plots.plot_dense_vs_masked_comparison(*[[1.0, 0.5]] * 8)
    plots.show(figure)
    assert not plt.fignum_exists(figure.number)
    (image,) = shown
    assert image.format == "png" and image.data.startswith(b"\x89PNG")
    path = tmp_path / "saved.png"
    path.write_bytes(image.data)
    plots.show(path)
    assert shown[1].data == image.data
    with pytest.raises(TypeError, match="takes a matplotlib Figure"):
        plots.show(None)
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(ValueError, match="displays PNG files"):
        plots.show(tmp_path / "notes.txt")


def test_lecture_style_leaves_interactive_mode_as_a_backend_switched_on_inside_set_it():
    # The inline backend, activated by a kernel's first figure, turns interactive mode on inside the plot;
    # rc_context alone would switch it off again on the way out, and no later figure would display.
    @plots.lecture_style
    def plot():
        plt.ion()
        return plt.figure()

    plt.ioff()
    try:
        plt.close(plot())
        assert plt.isinteractive()
    finally:
        plt.ioff()


def timing(median):
    return {"median": median, "mean": median, "std": 0.0, "min": median, "runs": 30}


def test_every_benchmark_row_gets_its_sentence_against_its_devices_baseline():
    timings = {report.DENSE_CPU: timing(10.0), report.MASKED_CPU: timing(10.5), report.CSR_CPU: timing(2.0),
               report.CSR_SCIPY_CPU: timing(14.0), report.TORCH_SPARSE_CPU: timing(5.0)}
    sentences = report.describe_benchmark(timings)
    assert sentences == [
        "Dense+Mask (CPU) and Dense, no mask (CPU) run at about the same speed (within 10%) "
        "(10.50 ms vs 10.00 ms, medians of 30 runs): simulated sparsity at inference, all weights through the same "
        "dense kernels",
        "Truly Sparse CSR (CPU) is 5.25x faster than Dense+Mask (CPU) (2.00 ms vs 10.50 ms, medians of 30 runs)",
        "Truly Sparse CSR scipy (CPU) is 1.33x slower than Dense+Mask (CPU) (14.00 ms vs 10.50 ms, medians of 30 runs)",
        "Truly Sparse torch.sparse (CPU) is 2.1x faster than Dense+Mask (CPU) (5.00 ms vs 10.50 ms, "
        "medians of 30 runs)",
    ]
    timings[report.MASKED_GPU] = timing(1.0)
    last = report.describe_benchmark(timings)[-1]
    assert last.startswith("Truly Sparse CSR (CPU) is 2x slower than Dense+Mask (GPU)")


def test_crossovers_name_the_lowest_sparsity_from_which_an_engine_always_wins():
    rows = [{"sparsity": s, "batch_size": 100, "backend": "numba", "speedup": x}
            for s, x in ((0.5, 0.8), (0.9, 1.3), (0.95, 0.9), (0.99, 2.0))]  # a win at 90 % that 95 % breaks
    rows += [{"sparsity": s, "batch_size": 1, "backend": "numba", "speedup": x} for s, x in ((0.5, 1.1), (0.99, 3.0))]
    rows += [{"sparsity": s, "batch_size": 1, "backend": "torch", "speedup": x} for s, x in ((0.5, 0.3), (0.99, 0.5))]
    rows += [{"sparsity": 0.5, "batch_size": 1, "backend": "numba (erk)", "speedup": 9.0}]  # ERK: not read
    assert report.describe_crossovers(rows) == [
        "numba, batch 1: faster than dense+mask at every sparsity measured, from 50 % (1.10x) to 99 % (3.00x)",
        "numba, batch 100: faster than dense+mask from 99 % on (2.00x; 0.90x at 95 %), 2.00x at 99 %",
        "torch, batch 1: slower than dense+mask at the highest sparsity measured (99 %: 0.50x; best 0.50x at 99 %); "
        "measured at 50 %, 99 %",
    ]
    assert report.describe_crossovers(rows, "erk") == [
        "numba, batch 1: faster than dense+mask at every sparsity measured, from 50 % (9.00x) to 50 % (9.00x)"]
    with pytest.raises(ValueError, match="no rows with 'uniform'"):
        report.describe_crossovers(rows[-1:])


def test_the_sweep_in_sentences_compares_every_method_with_the_static_mask():
    summary = [{"model": "m", "method": method, "sparsity": sparsity, "test_acc": acc, "seeds": 2}
               for method, sparsity, acc in (("dense", 0.0, 98.0), ("static", 0.9, 95.0), ("set", 0.9, 95.004),
                                             ("rigl", 0.9, 96.5))]
    assert report.describe_sweep(summary) == [
        "m at 90 %: best rigl 96.50 % (dense 98.00 %); against the static mask (95.00 %): set +0.00, rigl +1.50 "
        "points [2 seeds]"]


def test_memory_sentences_show_the_plain_dense_bytes_beside_weights_and_masks():
    net = MaskedNet(lenet_300_100(), 0.9)
    memory = report.memory_report(net, dst.SparseNet.from_masked(net, "scipy"))
    weights = sum(p.numel() * 4 for p in net.parameters())
    assert memory["plain_dense_bytes"] == weights
    assert memory["dense_bytes"] == weights + sum(layer.mask.numel() for layer in net.masked_layers().values())
    ratio = memory["dense_bytes"] / weights
    assert f"{ratio:.2f}x the plain dense model's {weights / 2**20:.2f} MiB" in report.describe_mask_overhead(memory)
    assert f"holds {weights / 2**20:.2f} MiB" in report.describe_memory(memory)


def test_a_saved_run_is_readable_like_the_plots(tmp_path):
    previous = os.umask(0o022)
    try:
        path = report.save_run({"label": "s90_erk_random_e1_abcdef", "config": {}}, tmp_path)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_progress_outside_a_kernel_is_tqdm_and_inside_one_a_single_line_updated_in_place(monkeypatch):
    with progress.Progress(3, "work") as bar:
        assert bar._bar is not None and bar._handle is None
        bar.update(2, "half")
        assert bar._bar.n == 2
    updates = []

    class Handle:
        def update(self, obj):
            updates.append(obj.data)

    monkeypatch.setattr(progress, "in_jupyter_kernel", lambda: True)
    monkeypatch.setattr("IPython.display.display", lambda obj, display_id=False: Handle())
    with progress.Progress(4, "runs", min_interval=0.0) as bar:
        bar.update(1, "set 90 %")
        bar.update(3)
    assert updates[0].startswith("runs: 1/4 (set 90 %)")
    assert updates[-1].startswith("runs: 4/4, done in")
    monkeypatch.undo()
    assert progress.in_jupyter_kernel() is False  # pytest is no Jupyter kernel


def test_input_connections_count_each_pixels_active_outgoing_weights():
    mask = np.zeros((3, 16), dtype=bool)
    mask[:, 5] = True
    mask[1, 0] = True
    counts = report_counts = dst.input_connections(mask, (4, 4))
    assert counts.shape == (4, 4) and counts[1, 1] == 3 and counts[0, 0] == 1 and counts.sum() == 4
    with pytest.raises(ValueError, match=r"expected an \(out, 16\) mask"):
        dst.input_connections(mask[:, :15], (4, 4))
    image = np.zeros((28, 28))
    image[8:20, 8:20] = 6.0
    image[:4] = 2.0
    assert mask_plots.centre_and_border(image) == (6.0, pytest.approx(2.0 * 4 * 28 / (28 * 28 - 20 * 20)))
    figure = mask_plots.plot_input_connections({"a": image, "b": report_counts.repeat(7, 0).repeat(7, 1)})
    assert np.array_equal(figure.axes[0].images[0].get_array(), image)
    assert figure.axes[0].get_title().startswith("a\ncentre 6.0, border")
    plt.close(figure)


def test_dense_layers_are_named_not_drawn_in_the_mask_figure():
    rng = np.random.default_rng(0)
    masks = [{"conv1": np.ones((4, 9), bool), "fc1": rng.random((8, 30)) < 0.2} for _ in range(2)]
    figure = mask_plots.plot_mask_2d_evolution(masks, epochs=[0, 1])
    assert len(figure.axes) == 2  # fc1 at epoch 0 and at epoch 1, no row for conv1
    assert "dense in every snapshot, not drawn: conv1" in figure._suptitle.get_text()
    plt.close(figure)
    with pytest.raises(ValueError, match="every layer is dense"):
        mask_plots.plot_mask_2d_evolution([{"conv1": np.ones((4, 9), bool)}])


def test_the_runs_figure_draws_legends_only_when_there_is_something_to_compare():
    run = {"sparsity": 0.9, "label": "a", "dense_test_acc": 98.0, "masked_test_acc": 97.0, "speedup": 2.0,
           "memory_ratio": 5.0}
    one = plots.plot_runs_comparison([run])
    assert all(ax.get_legend() is None for ax in one.axes)
    two = plots.plot_runs_comparison([run, {**run, "sparsity": 0.99, "label": "b", "speedup": 4.0}])
    assert all(ax.get_legend() is not None for ax in two.axes)
    assert list(two.axes[1].lines[0].get_ydata()) == [2.0, 4.0]
    plt.close("all")


def test_a_regrow_criterion_of_your_own_runs_through_the_librarys_rule():
    def lowest_first(signal, numel, random):
        return -np.arange(numel, dtype=float)  # the lowest positions score highest

    criterion = RegrowCriterion("lowest", "the lowest free positions", needs=None, uses_random=False,
                                score=lowest_first)
    for pattern in ("unstructured", "fan_in"):
        net = MaskedNet(lenet_300_100(), 0.9, generator=torch.Generator().manual_seed(0), pattern=pattern)
        before = {name: layer.mask.clone() for name, layer in net.masked_layers().items()}
        report_ = apply_dst_step(net, prune_ratio=0.2, regrow=criterion)
        for name, layer in net.masked_layers().items():
            if pattern == "unstructured":
                flat_before, flat_after = before[name].view(-1), layer.mask.view(-1)
                regrown = (~flat_before & flat_after).nonzero().squeeze(1)
                expected = (~flat_before).nonzero().squeeze(1)[:report_[name].regrown]
                assert torch.equal(regrown, expected), name
                continue
            for row in range(layer.mask.shape[0]):  # per neuron: its lowest inactive inputs, as many as it lost
                was, now = before[name][row], layer.mask[row]
                grown = (~was & now).nonzero().squeeze(1)
                assert torch.equal(grown, (~was).nonzero().squeeze(1)[:len(grown)]), (name, row)
    assert dst.DSTConfig(regrow=criterion).regrow is criterion
    with pytest.raises(ValueError, match="or pass a RegrowCriterion"):
        dst.DSTConfig(regrow=["gradient"])


def test_a_method_with_another_criterion_is_labelled_and_counts_its_gradient_pass():
    assert METHODS["rigl"].label == "rigl" and METHODS["set"].label == "set"
    assert METHODS["rigl"].gradient_per_update and not METHODS["set"].gradient_per_update
    set_by_gradient = replace(METHODS["set"], regrow="gradient")
    assert set_by_gradient.label == "set+gradient" and set_by_gradient.gradient_per_update
    assert replace(METHODS["rigl"], regrow="random").label == "rigl+random"
    with pytest.raises(ValueError, match="unknown regrow method 'nope'"):
        replace(METHODS["set"], regrow="nope")


@pytest.mark.parametrize("answer, reason", [
    (lambda numel: None, "got NoneType|got shape"),
    (lambda numel: np.zeros(numel - 1), r"got shape \(19,\)"),
    (lambda numel: np.full(numel, np.nan), "got 20 NaN"),
    (lambda numel: ["high"] * numel, "got list"),
])
def test_a_criterion_that_scores_wrong_is_refused_with_what_is_wrong(answer, reason):
    criterion = RegrowCriterion("mine", "an attendee's", needs=None, uses_random=False,
                                score=lambda signal, numel, random: answer(numel))
    from dst.engine.update_rule import choose_moves

    active = np.array([0, 5, 7], dtype=np.int64)
    with pytest.raises(ValueError, match=f"regrow criterion 'mine' must score every position: 20 real numbers, "
                                         f"no NaN; ({reason})"):
        choose_moves(active, np.ones(3), 20, 3, criterion)


@pytest.mark.parametrize("answer, reason", [
    (lambda free: None, "got NoneType|got shape"),
    (lambda free: free[:2], r"got shape \(2,\)"),
    (lambda free: np.concatenate([free[:2], free[:1]]), "got 1 repeated"),
    (lambda free: np.array([0, free[0], free[1]]), "got 1 that are active already"),
    (lambda free: np.array([free[0], free[1], 10**9]), "got positions from"),
    (lambda free: free[:3].astype(float), "got dtype float64"),
])
def test_a_criterion_that_samples_wrong_is_refused_with_what_is_wrong(answer, reason):
    criterion = RegrowCriterion("mine", "an attendee's", needs=None, uses_random=False,
                                score=lambda signal, numel, random: np.zeros(numel),
                                sample=lambda active, numel, count, random: answer(
                                    np.setdiff1d(np.arange(numel), active)))
    from dst.engine.update_rule import choose_moves

    active = np.array([0, 5, 7], dtype=np.int64)
    with pytest.raises(ValueError, match=f"regrow criterion 'mine'.s sample must return 3 distinct inactive "
                                         f"positions in \\[0, 20\\); ({reason})"):
        choose_moves(active, np.ones(3), 20, 3, criterion)


def test_a_criterion_must_name_a_signal_there_is():
    with pytest.raises(ValueError, match=r"needs must be None or one of \['gradient', 'momentum'\]"):
        RegrowCriterion("mine", "an attendee's", needs="hessian", uses_random=False,
                        score=lambda signal, numel, random: np.zeros(numel))
