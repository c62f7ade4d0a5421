"""Figures of hardware-aware sparsity: what each pattern's mask looks like, and what it costs against what it buys.

Both take plain data and return the Figure, drawn like every figure of ``dst.tutorial.plots``;
``save_path`` additionally writes it to disk.
"""

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from dst.tutorial.plots import check_rows, finish, lecture_style

# One colour per pattern kind, shared by both figures.
PATTERN_COLORS = {"unstructured": "tab:gray", "fan_in": "tab:orange", "n_m": "tab:green", "block": "tab:blue"}


@lecture_style
def plot_pattern_masks(masks, save_path=None):
    """One panel per pattern: its 2-D boolean mask (white: an active weight), titled with its density.

    ``masks``: ``{title: (rows, columns) bool array}``, e.g. the same layer drawn by each pattern.
    """
    if not masks:
        raise ValueError("masks is empty: pass {title: 2-D boolean mask}")
    arrays = {title: np.asarray(mask, dtype=bool) for title, mask in masks.items()}
    bad = {title: mask.shape for title, mask in arrays.items() if mask.ndim != 2}
    if bad:
        raise ValueError(f"every mask must be 2-D, got {bad}")
    fig, axes = plt.subplots(1, len(arrays), figsize=(4.2 * len(arrays), 3.6), squeeze=False)
    for ax, (title, mask) in zip(axes[0], arrays.items(), strict=True):
        ax.imshow(mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        ax.set_title(f"{title}\n{100 * mask.mean():.0f} % of weights active", fontsize=11)
        ax.set_xlabel("input")
        ax.set_ylabel("output neuron")
    fig.tight_layout()
    return finish(fig, save_path)


@lecture_style
def plot_pattern_tradeoff(points, save_path=None):
    """Accuracy given up (points, against unstructured) against inference speed bought (x dense), one mark each.

    ``points``: rows ``{"label", "kind", "speedup", "accuracy_change"}``: ``kind`` a pattern kind (its colour),
    ``speedup`` the measured time of dense over the pattern's kernel, ``accuracy_change`` its test accuracy
    minus unstructured's at the same density (0 for unstructured itself).
    """
    check_rows(points, ["label", "kind", "speedup", "accuracy_change"])
    fig, ax = plt.subplots(figsize=(8, 5))
    for point in points:
        ax.scatter(point["speedup"], point["accuracy_change"], s=90, color=PATTERN_COLORS.get(point["kind"], "k"),
                   zorder=3)
        ax.annotate(point["label"], (point["speedup"], point["accuracy_change"]), textcoords="offset points",
                    xytext=(7, 5), fontsize=10)
    ax.axvline(1.0, color="black", linewidth=1.2, label="dense speed")
    ax.axhline(0.0, color="tab:gray", linewidth=1.0, linestyle="--", label="unstructured accuracy")
    ax.set_xscale("log")
    speedups = [point["speedup"] for point in points] + [1.0]
    ax.set_xlim(min(speedups) / 1.4, max(speedups) * 1.6)  # room for the labels right of the marks
    ax.xaxis.set_major_locator(FixedLocator([tick for tick in (0.25, 0.5, 1, 2, 4, 8, 16, 32)
                                             if min(speedups) / 1.4 <= tick <= max(speedups) * 1.6]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.margins(y=0.25)
    ax.set_xlabel("inference speed vs dense (log scale; right is faster)")
    ax.set_ylabel("test accuracy vs unstructured (points)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    return finish(fig, save_path)
