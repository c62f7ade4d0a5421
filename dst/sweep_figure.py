"""The decade in one figure: test accuracy and training FLOPs against sparsity, one line per method.

Takes the rows of ``dst.sweep`` (one per run) and returns a matplotlib Figure, like
``dst.plots``: one column per model; the top row is test accuracy (mean over seeds,
error bars one standard deviation, dense as a band), the bottom row the training
FLOPs as a fraction of dense. The x axis is the density on a log scale, labelled by
sparsity, so 90 %, 99 % and 99.9 % are evenly spaced and the high-sparsity end,
where the methods part ways, is not squeezed into a corner.
"""

import matplotlib.pyplot as plt

from dst.plots import check_rows, finish, lecture_style
from dst.sweep import density_ticks, summarize

METHOD_STYLE = {"static": ("tab:gray", "v"), "set": ("tab:blue", "o"), "rigl": ("tab:red", "s"),
                "snfs": ("tab:green", "D"), "gmp": ("tab:purple", "^")}
METHOD_LABEL = {"static": "static mask", "set": "SET", "rigl": "RigL", "snfs": "sparse momentum",
                "gmp": "GMP (dense memory)"}


@lecture_style
def plot_method_sweep(rows, references=None, title=None, save_path=None):
    """Accuracy (%) and training FLOPs (fraction of dense) vs sparsity per method; ``references`` as hollow marks.

    ``references``: optional rows ``{"model", "method", "sparsity", "test_acc"}`` (published numbers)
    drawn as hollow markers in the method's colour (dense as a dotted line).
    """
    check_rows(rows, ["model", "method", "sparsity", "test_acc", "train_flops_vs_dense", "dense_training"])
    summary = summarize(rows)
    models = list(dict.fromkeys(row["model"] for row in summary))
    fig, axes = plt.subplots(2, len(models), figsize=(7.5 * len(models), 9), squeeze=False,
                             gridspec_kw={"height_ratios": [2.2, 1]}, sharex="col")
    for column, model in enumerate(models):
        accuracy_ax, flops_ax = axes[0, column], axes[1, column]
        points = [row for row in summary if row["model"] == model]
        sparsities = [row["sparsity"] for row in points if row["method"] != "dense"]
        for dense in (row for row in points if row["method"] == "dense"):
            low, high = dense["test_acc"] - dense["test_acc_std"], dense["test_acc"] + dense["test_acc_std"]
            accuracy_ax.axhspan(low - 0.02, high + 0.02, color="black", alpha=0.15)
            accuracy_ax.axhline(dense["test_acc"], color="black", linewidth=1.5,
                                label=f"dense {dense['test_acc']:.2f} %")
            flops_ax.axhline(1.0, color="black", linewidth=1.5, label="dense")
        for method in dict.fromkeys(row["method"] for row in points if row["method"] != "dense"):
            line = sorted((row for row in points if row["method"] == method), key=lambda row: row["sparsity"])
            color, marker = METHOD_STYLE.get(method, (None, "x"))
            density = [1.0 - row["sparsity"] for row in line]
            accuracy_ax.errorbar(density, [row["test_acc"] for row in line],
                                 yerr=[row["test_acc_std"] for row in line], color=color, marker=marker,
                                 capsize=3, label=METHOD_LABEL.get(method, method))
            flops_ax.plot(density, [row["train_flops_vs_dense"] for row in line], color=color, marker=marker,
                          label=METHOD_LABEL.get(method, method))
        for reference in (r for r in references or () if r["model"] == model):
            if reference["method"] == "dense":
                accuracy_ax.axhline(reference["test_acc"], color="black", linestyle=":", linewidth=1.5,
                                    label=f"dense, published {reference['test_acc']:.2f} %")
                continue
            color, marker = METHOD_STYLE.get(reference["method"], ("black", "*"))
            accuracy_ax.plot([1.0 - reference["sparsity"]], [reference["test_acc"]], marker=marker,
                             markerfacecolor="none", markeredgecolor=color, markersize=11, linestyle="none")
        if references:
            accuracy_ax.plot([], [], marker="o", markerfacecolor="none", markeredgecolor="black",
                             linestyle="none", label="published (hollow)")
        ticks = density_ticks(sparsities)
        for ax in (accuracy_ax, flops_ax):
            ax.set_xscale("log")
            ax.set_xticks([density for density, _ in ticks], [label for _, label in ticks])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
        flops_ax.invert_xaxis()  # sparser to the right (once: the two axes share x)
        flops_ax.set_yscale("log")
        accuracy_ax.set(ylabel="test accuracy (%)", title=model)
        flops_ax.set(xlabel="sparsity (log density axis)", ylabel="training FLOPs / dense")
        accuracy_ax.legend(loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return finish(fig, save_path)
