"""Figures for the tutorial: dense vs masked curves, benchmarks, runs; the mask figures are in ``dst.mask_plots``.

Every function takes plain data, draws with ``plt.subplots`` (so Jupyter's
inline backend shows the figure at the end of the cell) and returns the
Figure; ``save_path`` additionally writes it to disk. Accuracies are in
percent and sparsities are fractions in [0, 1], as the training code records them.
"""

import functools
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from dst import benchmark_rows
from dst.results import speed_phrase

# Text sizes for a figure shown on a lecture-hall projector: saved at 120 dpi and scaled to a
# ~1300 px wide screen, 12-13 pt stays about as large as a slide's body text.
LECTURE_STYLE = {"font.size": 13, "axes.titlesize": 13, "axes.labelsize": 13, "legend.fontsize": 12,
                 "xtick.labelsize": 12, "ytick.labelsize": 12, "figure.titlesize": 15, "lines.linewidth": 2,
                 "lines.markersize": 7}


def lecture_style(plot):
    """Draw ``plot``'s figure with LECTURE_STYLE's text sizes."""
    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        with plt.rc_context(LECTURE_STYLE):
            return plot(*args, **kwargs)
    return wrapper


@lecture_style
def plot_dense_vs_masked_comparison(dense_train_losses, dense_train_accs, dense_test_losses, dense_test_accs,
                                    masked_train_losses, masked_train_accs, masked_test_losses,
                                    masked_test_accs, save_path=None):
    """Plot loss and accuracy (%) curves of the dense and masked nets, and masked minus dense, per epoch."""
    curves = dict(dense_train_losses=dense_train_losses, dense_train_accs=dense_train_accs,
                  dense_test_losses=dense_test_losses, dense_test_accs=dense_test_accs,
                  masked_train_losses=masked_train_losses, masked_train_accs=masked_train_accs,
                  masked_test_losses=masked_test_losses, masked_test_accs=masked_test_accs)
    check_lengths(**curves)
    curves = {key: np.asarray(values, dtype=float) for key, values in curves.items()}
    epochs = np.arange(1, len(dense_train_losses) + 1)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for row, (metric, unit) in enumerate([("losses", "loss"), ("accs", "accuracy (%)")]):
        for column, split in enumerate(["train", "test"]):
            ax = axes[row, column]
            ax.plot(epochs, curves[f"dense_{split}_{metric}"], "o-", label="dense")
            ax.plot(epochs, curves[f"masked_{split}_{metric}"], "s--", label="dense+mask (sparse)")
            ax.set(title=f"{split.capitalize()} {unit}", ylabel=unit)
        difference_ax = axes[row, 2]
        for split, marker in [("train", "o-"), ("test", "s-")]:
            difference = curves[f"masked_{split}_{metric}"] - curves[f"dense_{split}_{metric}"]
            difference_ax.plot(epochs, difference, marker, label=split)
        difference_ax.axhline(0, color="gray", linestyle=":")
        difference_ax.set(title=f"{unit.capitalize()}: masked minus dense", ylabel=f"difference in {unit}")
    for ax in axes.flat:
        ax.set(xlabel="epoch", xticks=epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return finish(fig, save_path)


@lecture_style
def plot_benchmark(timings, memory=None, save_path=None):
    """Bar-plot median times (ms, std error bars), each with its ratio to the masked net on the same device."""
    if not timings:
        raise ValueError("timings is empty: expected {label: {'mean', 'std', 'median', 'runs'}}")
    labels = list(timings)
    medians = np.array([timings[label]["median"] for label in labels], dtype=float)
    stds = np.array([timings[label]["std"] for label in labels], dtype=float)
    fig, axes = plt.subplots(1, 2 if memory else 1, figsize=(16 if memory else 8.5, 5.5), squeeze=False)
    time_ax = axes[0, 0]
    bars = time_ax.bar(range(len(labels)), medians, color=[plt.cm.tab10(i % 10) for i in range(len(labels))],
                       yerr=[np.minimum(stds, 0.9 * medians), stds], capsize=4)
    # Bars can span orders of magnitude (GPU vs CPU); a log axis keeps the short ones visible.
    if medians.min() > 0 and medians.max() / medians.min() > 30:
        time_ax.set_yscale("log")
    for bar, label, median, std in zip(bars, labels, medians, stds, strict=True):
        time_ax.annotate(_bar_annotation(timings, label), (bar.get_x() + bar.get_width() / 2, median + std),
                         xytext=(0, 4), textcoords="offset points", ha="center", va="bottom")
    time_ax.margins(y=0.2)
    time_ax.set_xticks(range(len(labels)), [textwrap.fill(label, 12) for label in labels])
    time_ax.set(ylabel="median time per batch (ms)",
                title=f"Inference time (ratio vs {benchmark_rows.MASKED} on the same device)")
    if memory:
        _plot_memory(axes[0, 1], memory)
    fig.tight_layout()
    return finish(fig, save_path)


@lecture_style
def plot_sparsity_sweep(rows, save_path=None):
    """Plot sparse speedup over dense+mask and memory (MiB) vs sparsity, a line per backend and batch size."""
    check_rows(rows, ["sparsity", "batch_size", "backend", "speedup", "dense_bytes", "sparse_bytes"])
    fig, (speed_ax, memory_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    for backend, batch_size in sorted({(row["backend"], row["batch_size"]) for row in rows}):
        line = sorted((row["sparsity"], row["speedup"]) for row in rows
                      if (row["backend"], row["batch_size"]) == (backend, batch_size))
        speed_ax.plot([100 * s for s, _ in line], [speedup for _, speedup in line], "o-",
                      label=f"{backend}, batch {batch_size}")
    _ratio_axis(speed_ax)
    speed_ax.set(xlabel="sparsity (%)", ylabel="speedup (dense+mask time / sparse time)",
                 title="Where truly sparse starts to win (above the dashed line)")
    speed_ax.legend()
    sparsities = sorted({row["sparsity"] for row in rows})
    dense = [np.mean([r["dense_bytes"] for r in rows if r["sparsity"] == s]) / 2**20 for s in sparsities]
    memory_ax.plot([100 * s for s in sparsities], dense, "k-o", label="dense weights + mask")
    for backend in sorted({row["backend"] for row in rows}):
        points = sorted({(r["sparsity"], r["sparse_bytes"]) for r in rows if r["backend"] == backend})
        memory_ax.plot([100 * s for s, _ in points], [size / 2**20 for _, size in points], "o--",
                       label=f"CSR ({backend})")
    memory_ax.set(xlabel="sparsity (%)", ylabel="memory (MiB)", title="Weight memory")
    memory_ax.set_ylim(bottom=0)
    memory_ax.legend()
    for ax in (speed_ax, memory_ax):
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return finish(fig, save_path)


@lecture_style
def plot_runs_comparison(runs, save_path=None):
    """Compare runs at several sparsities: final test accuracy (%), CSR speedup and memory ratio."""
    check_rows(runs, ["sparsity", "label", "dense_test_acc", "masked_test_acc", "speedup", "memory_ratio"])
    runs = sorted(runs, key=lambda run: run["sparsity"])
    sparsity = [100 * run["sparsity"] for run in runs]
    fig, (accuracy_ax, ratio_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    accuracy_ax.plot(sparsity, [run["dense_test_acc"] for run in runs], "o-", label="dense")
    accuracy_ax.plot(sparsity, [run["masked_test_acc"] for run in runs], "s--", label="dense+mask (sparse)")
    accuracy_ax.set(xlabel="sparsity (%)", ylabel="final test accuracy (%)", title="Accuracy vs sparsity")
    for key, marker, label in [("speedup", "o-", "CSR speedup (dense+mask time / CSR time)"),
                               ("memory_ratio", "s-", "memory ratio (dense+mask / CSR)")]:
        values = [np.nan if run[key] is None else run[key] for run in runs]
        ratio_ax.plot(sparsity, values, marker, label=label)
    _ratio_axis(ratio_ax)
    ratio_ax.set(xlabel="sparsity (%)", ylabel="ratio (>1 = CSR better)", title="What truly sparse buys")
    for ax in (accuracy_ax, ratio_ax):
        ax.set_xticks(sparsity, [f"{x:g}\n{run['label']}" for x, run in zip(sparsity, runs, strict=True)])
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    return finish(fig, save_path)


def _ratio_axis(ax):
    """Log-scale ratio axis labelled '0.5x', '1x', '2x'... with a dashed break-even line at 1."""
    ax.axhline(1, color="gray", linestyle="--", label="break-even")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _plot_memory(ax, memory):
    names = list(memory["layers"])
    x = np.arange(len(names))
    dense = [memory["layers"][name]["dense_bytes"] / 1024 for name in names]
    sparse = [memory["layers"][name]["sparse_bytes"] / 1024 for name in names]
    ax.bar(x - 0.2, dense, 0.4, label="dense weights + mask", color="gray")
    ax.bar(x + 0.2, sparse, 0.4, label="CSR (values + indices)", color="tab:blue")
    ax.set_yscale("log")
    ax.set_xticks(x, names)
    saving = memory["dense_bytes"] / memory["sparse_bytes"]
    ratio = f"{saving:.1f}x smaller" if saving >= 1 else f"{1 / saving:.1f}x larger"
    ax.set(ylabel="memory (KiB, log scale)",
           title=f"Weight memory: {memory['dense_bytes'] / 2**20:.2f} MiB dense+mask vs "
                 f"{memory['sparse_bytes'] / 2**20:.2f} MiB CSR ({ratio})")
    ax.legend()


def _bar_annotation(timings, label):
    """'0.830 ms' plus, where the same device has a baseline bar (the masked net), 'baseline' or the ratio to it."""
    median = float(timings[label]["median"])
    text = (f"{median:#.3g}" if median < 1000 else f"{median:.0f}") + " ms"
    baseline = _baseline_median(timings, label)
    if baseline is None or baseline <= 0 or median <= 0:
        return text
    return f"{text}\n" + ("baseline" if benchmark_rows.is_baseline(label) else speed_phrase(median, baseline))


def _baseline_median(timings, label):
    """Median of the baseline row on the same device as ``label`` ('CPU' in "... (CPU)"), or None."""
    for other, timing in timings.items():
        if benchmark_rows.is_baseline(other) and benchmark_rows.device_of(other) == benchmark_rows.device_of(label):
            return float(timing["median"])
    return None


def check_lengths(**series):
    """Raise unless every named series has the same, non-zero length (the error names the odd ones)."""
    lengths = {name: len(values) for name, values in series.items()}
    if len(set(lengths.values())) > 1:
        first = next(iter(lengths))
        mismatched = ", ".join(f"{name} has {n}" for name, n in lengths.items() if n != lengths[first])
        raise ValueError(f"lists must have the same length: {first} has {lengths[first]} entries, "
                         f"but {mismatched}")
    if not next(iter(lengths.values())):
        raise ValueError(f"{', '.join(lengths)} are empty")


def check_rows(rows, keys):
    if not rows:
        raise ValueError("no rows to plot")
    for index, row in enumerate(rows):
        missing = [key for key in keys if key not in row]
        if missing:
            raise ValueError(f"row {index} is missing {missing}")


def finish(fig, save_path):
    """Save ``fig`` to ``save_path`` (folders created) when one is given; return ``fig``."""
    if save_path is not None:
        Path(save_path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save_path, dpi=120, bbox_inches="tight")
    return fig
