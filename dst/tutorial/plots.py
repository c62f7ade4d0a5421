"""Figures for the tutorial: dense vs masked curves, benchmarks, runs; the mask figures are in ``mask_plots``.

Every function takes plain data and returns the Figure; ``save_path``
additionally writes it to disk. ``show`` displays a figure once, as a PNG, and
closes it: the notebook calls it for every figure, so what appears never depends
on matplotlib's interactive mode, on the cell's last expression or on a rerun.
Accuracies are in percent and sparsities are fractions in [0, 1], as the training
code records them.
"""

import functools
import io
import textwrap
from pathlib import Path

import matplotlib.figure
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from dst.tutorial import benchmark_rows
from dst.tutorial.results import speed_phrase, sweep_row_allocation, sweep_row_engine

# Text sizes for a figure shown on a lecture-hall projector: saved at 120 dpi and scaled to a
# ~1300 px wide screen, 12-13 pt stays about as large as a slide's body text.
LECTURE_STYLE = {"font.size": 13, "axes.titlesize": 13, "axes.labelsize": 13, "legend.fontsize": 12,
                 "xtick.labelsize": 12, "ytick.labelsize": 12, "figure.titlesize": 15, "lines.linewidth": 2,
                 "lines.markersize": 7}


def lecture_style(plot):
    """Draw ``plot``'s figure with LECTURE_STYLE's text sizes, leaving matplotlib's interactive mode as it was."""
    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        with plt.rc_context(LECTURE_STYLE):
            figure = plot(*args, **kwargs)
            # The first figure of a Jupyter kernel activates the inline backend, which turns interactive
            # mode on; leaving rc_context would restore the mode from before and switch it off for good.
            interactive = plt.isinteractive()
        plt.interactive(interactive)
        return figure
    return wrapper


def show(figure, dpi: int = 100):
    """Display ``figure`` once as a PNG (a Figure, or the path of a saved image) and close it.

    The notebook shows every figure through here, so each appears exactly once in its own
    cell, in JupyterLab, VS Code, Colab and papermill alike, and on every rerun; closing it
    keeps reruns from piling up open figures.
    """
    from IPython.display import Image, display  # only the notebook displays

    if isinstance(figure, (str, Path)):
        png = Path(figure).read_bytes()
        if not png.startswith(b"\x89PNG"):
            raise ValueError(f"show() displays PNG files; {figure} is not one")
    elif not isinstance(figure, matplotlib.figure.Figure):
        raise TypeError(f"show() takes a matplotlib Figure (what the plot functions return) or the path of a PNG, "
                        f"got {type(figure).__name__}")
    else:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(figure)
        png = buffer.getvalue()
    display(Image(data=png, format="png"))


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
    time_ax.set_xlim(-0.8, len(labels) - 0.2)  # room for the outer bars' labels inside the axes
    time_ax.set_xticks(range(len(labels)), [textwrap.fill(label, 12) for label in labels])
    time_ax.set(ylabel="median time per batch (ms)",
                title=f"Inference time (ratio vs {benchmark_rows.MASKED} on the same device)")
    if memory:
        _plot_memory(axes[0, 1], memory)
    fig.tight_layout()
    return finish(fig, save_path)


@lecture_style
def plot_sparsity_sweep(rows, save_path=None):
    """Speedup of each CSR backend over dense+mask vs sparsity (one panel per batch size), and memory (MiB).

    Colour is the backend, a solid line uniform allocation and a dotted one ERK (a backend
    label's " (erk)" suffix, as ``benchmarks/sparse_inference.py`` writes it, is read the same
    way). Memory lines that coincide are drawn once, labelled with every backend they stand for.
    """
    check_rows(rows, ["sparsity", "batch_size", "backend", "speedup", "dense_bytes", "sparse_bytes"])
    rows = [{**row, "allocation": sweep_row_allocation(row), "engine": sweep_row_engine(row)} for row in rows]
    engines = sorted({row["engine"] for row in rows})
    colors = {engine: plt.cm.tab10(index % 10) for index, engine in enumerate(engines)}
    styles = {"uniform": "-", "erk": ":"}
    batch_sizes = sorted({row["batch_size"] for row in rows})
    fig, axes = plt.subplots(1, len(batch_sizes) + 1, figsize=(6 * (len(batch_sizes) + 1), 5.2))
    speed_axes, memory_ax = axes[:-1], axes[-1]
    for ax, batch_size in zip(speed_axes, batch_sizes, strict=True):
        for engine in engines:
            for allocation in sorted({row["allocation"] for row in rows}):
                line = sorted((row["sparsity"], row["speedup"]) for row in rows if row["engine"] == engine
                              and row["allocation"] == allocation and row["batch_size"] == batch_size)
                if line:
                    ax.plot([100 * s for s, _ in line], [speedup for _, speedup in line], marker="o",
                            linestyle=styles.get(allocation, "--"), color=colors[engine],
                            label=f"{engine}, {allocation}")
        _ratio_axis(ax)
        ax.set(xlabel="sparsity (%)", title=f"batch {batch_size}: CSR time vs dense+mask")
    speed_axes[0].set_ylabel("speedup (dense+mask time / CSR time)")
    # Memory hardly depends on the allocation (the same active count); one line per engine, and
    # engines whose bytes agree to 3 significant digits share a line rather than hide each other.
    memory_series: dict[tuple, list[str]] = {}
    for engine in engines:
        sizes = {}
        for row in rows:
            if row["engine"] == engine:
                sizes.setdefault(row["sparsity"], []).append(row["sparse_bytes"] / 2**20)
        points = [(sparsity, float(np.mean(values))) for sparsity, values in sorted(sizes.items())]
        key = tuple((sparsity, float(f"{size:.3g}")) for sparsity, size in points)
        memory_series.setdefault(key, [points]).append(engine)
    dense = sorted({(row["sparsity"], row["dense_bytes"]) for row in rows})
    memory_ax.plot([100 * s for s, _ in dense], [size / 2**20 for _, size in dense], "k-o",
                   label="dense weights + mask")
    for points, *names in memory_series.values():  # drawn at the first engine's exact values
        memory_ax.plot([100 * s for s, _ in points], [size for _, size in points], "o-", color=colors[names[0]],
                       label=f"CSR ({', '.join(names)})")
    memory_ax.set(xlabel="sparsity (%)", ylabel="memory (MiB)", title="Weight memory")
    memory_ax.set_ylim(bottom=0)
    memory_ax.legend(loc="lower left", fontsize="small")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    handles, labels = speed_axes[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.34, 0.0), ncol=4, fontsize="small")
    return finish(fig, save_path)


@lecture_style
def plot_runs_comparison(runs, save_path=None):
    """Compare runs at several sparsities: final test accuracy (%), CSR speedup and memory ratio.

    With one run there is nothing to compare yet: its points are drawn and labelled in the titles,
    without legends; from two runs on, each panel's legend sits under it, clear of the data and labels.
    """
    check_rows(runs, ["sparsity", "label", "dense_test_acc", "masked_test_acc", "speedup", "memory_ratio"])
    runs = sorted(runs, key=lambda run: run["sparsity"])
    sparsity = [100 * run["sparsity"] for run in runs]
    fig, (accuracy_ax, ratio_ax) = plt.subplots(1, 2, figsize=(13, 5.5))
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
        if len(runs) > 1:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=1)
        else:  # one point per line: its name next to it says more than a legend
            for line in ax.lines:
                if line.get_label() != "break-even" and np.isfinite(line.get_ydata()[0]):
                    ax.annotate(line.get_label(), (line.get_xdata()[0], line.get_ydata()[0]), xytext=(10, 0),
                                textcoords="offset points", va="center", fontsize="small")
    if len(runs) == 1:
        fig.suptitle("One run saved so far: rerun at another GLOBAL_SPARSITY to compare")
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
