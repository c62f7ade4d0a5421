"""The decade in one figure: test accuracy and training FLOPs against sparsity, one line per method.

Takes the rows of ``dst.methods.sweep`` (one per run) and returns a matplotlib Figure, like
``dst.tutorial.plots``: one column per model; the top row is test accuracy (mean over seeds,
error bars one standard deviation, dense as a band), the bottom row the training
FLOPs as a fraction of dense. The x axis is the density on a log scale, labelled by
sparsity, so 90 %, 99 % and 99.9 % are evenly spaced. The accuracy axis is the test
*error* on a log scale, labelled in accuracy: a static mask at 75 % and RigL at 97 %
both stay readable, where a linear axis squeezes every DST method into its top strip.
"""

import matplotlib.pyplot as plt
from matplotlib.ticker import FixedLocator, NullLocator

from dst.methods.sweep import density_ticks, summarize
from dst.tutorial.plots import check_rows, finish, lecture_style

METHOD_STYLE = {"static": ("tab:gray", "v"), "set": ("tab:blue", "o"), "rigl": ("tab:red", "s"),
                "srigl": ("tab:orange", "P"), "snfs": ("tab:green", "D"), "gmp": ("tab:purple", "^")}
METHOD_LABEL = {"static": "static mask", "set": "SET", "rigl": "RigL", "srigl": "SRigL (constant fan-in)",
                "snfs": "sparse momentum", "gmp": "GMP (dense memory)"}
# Accuracy ticks (%) of the log-error axis; those inside the plotted range are shown.
ACCURACY_TICKS = (99.5, 99, 98.5, 98, 97, 96, 95, 93, 90, 85, 80, 70, 50, 20)


@lecture_style
def plot_method_sweep(rows, references=None, reference_label="published", title=None, save_path=None):
    """Accuracy (%) and training FLOPs (fraction of dense) vs sparsity per method; ``references`` as hollow marks.

    ``references``: optional rows ``{"model", "method", "sparsity", "test_acc"}`` (published numbers)
    drawn as hollow markers in the method's colour (dense as a dotted line), named ``reference_label``,
    at the sparsities the rows measured. A reference that says its ``allocation`` and ``epochs`` is drawn
    only on a panel whose rows were trained with the same: a published uniform, 100-epoch point next to
    ERK rows of 20 epochs would read as the same experiment.
    One legend, under the figure, names what the first model's panel draws.
    """
    check_rows(rows, ["model", "method", "sparsity", "test_acc", "train_flops_vs_dense", "dense_training"])
    summary = summarize(rows)
    models = list(dict.fromkeys(row["model"] for row in summary))
    fig, axes = plt.subplots(2, len(models), figsize=(7.5 * len(models), 10), squeeze=False,
                             gridspec_kw={"height_ratios": [2.2, 1]}, sharex="col")
    for column, model in enumerate(models):
        accuracy_ax, flops_ax = axes[0, column], axes[1, column]
        points = [row for row in summary if row["model"] == model]
        measured = {row["sparsity"] for row in points}
        # Only at sparsities this sweep measured: a published point between them would read as one of ours.
        trained = [row for row in rows if row["model"] == model]
        references_here = [r for r in references or () if r["model"] == model
                           and (r["method"] == "dense" or r["sparsity"] in measured) and _same_setting(r, trained)]
        _draw_accuracy(accuracy_ax, points, references_here, reference_label)
        for method in dict.fromkeys(row["method"] for row in points if row["method"] != "dense"):
            line = sorted((row for row in points if row["method"] == method), key=lambda row: row["sparsity"])
            color, marker = METHOD_STYLE.get(method, (None, "x"))
            flops_ax.plot([1.0 - row["sparsity"] for row in line], [row["train_flops_vs_dense"] for row in line],
                          color=color, marker=marker, label=METHOD_LABEL.get(method, method))
        flops_ax.axhline(1.0, color="black", linewidth=1.5, label="dense")
        ticks = density_ticks(row["sparsity"] for row in points if row["method"] != "dense")
        for ax in (accuracy_ax, flops_ax):
            ax.set_xscale("log")
            ax.set_xticks([density for density, _ in ticks], [label for _, label in ticks])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.grid(alpha=0.3)
        flops_ax.invert_xaxis()  # sparser to the right (once: the two axes share x)
        flops_ax.set_yscale("log")
        flops_ax.set(xlabel="sparsity (log density axis)", ylabel="training FLOPs / dense")
        accuracy_ax.set_title(model, loc="left")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07 + 0.03 * (len(labels) > 6), 1, 1))
    return finish(fig, save_path)


def _same_setting(reference: dict, rows: list[dict]) -> bool:
    """Whether every row was trained at the reference's allocation and number of epochs (where it names them)."""
    if "allocation" in reference and any(row.get("allocation") != reference["allocation"] for row in rows):
        return False
    return "epochs" not in reference or all(row.get("recipe", {}).get("epochs") == reference["epochs"]
                                            for row in rows)


def _draw_accuracy(ax, points, references, reference_label):
    """Test error on a log axis, inverted and labelled in accuracy (%), so higher is better."""
    errors = []
    for dense in (row for row in points if row["method"] == "dense"):
        error, spread = 100.0 - dense["test_acc"], dense["test_acc_std"]
        ax.axhspan(max(error - spread, 1e-3) * 0.99, (error + spread) * 1.01, color="black", alpha=0.15)
        ax.axhline(error, color="black", linewidth=1.5, label="dense (band: ±1 std over seeds)")
        ax.set_title(f"dense {dense['test_acc']:.2f} %", loc="right", fontsize="medium")
        errors.append(error)
    for method in dict.fromkeys(row["method"] for row in points if row["method"] != "dense"):
        line = sorted((row for row in points if row["method"] == method), key=lambda row: row["sparsity"])
        color, marker = METHOD_STYLE.get(method, (None, "x"))
        line_errors = [100.0 - row["test_acc"] for row in line]
        ax.errorbar([1.0 - row["sparsity"] for row in line], line_errors,
                    yerr=[row["test_acc_std"] for row in line], color=color, marker=marker, capsize=3,
                    label=METHOD_LABEL.get(method, method))
        errors += line_errors
    for reference in references:
        error = 100.0 - reference["test_acc"]
        errors.append(error)
        if reference["method"] == "dense":
            ax.axhline(error, color="black", linestyle=":", linewidth=1.5,
                       label=f"dense, published {reference['test_acc']:.2f} %")
            continue
        color, marker = METHOD_STYLE.get(reference["method"], ("black", "*"))
        ax.plot([1.0 - reference["sparsity"]], [error], marker=marker, markerfacecolor="none",
                markeredgecolor=color, markersize=11, linestyle="none")
    if any(reference["method"] != "dense" for reference in references):
        ax.plot([], [], marker="o", markerfacecolor="none", markeredgecolor="black", linestyle="none",
                label=f"{reference_label} (hollow markers)")
    low, high = min(errors) / 1.3, min(100.0, max(errors) * 1.3)
    ax.set_yscale("log")
    ax.set_ylim(high, low)  # inverted: small error (high accuracy) at the top
    ax.yaxis.set_major_locator(FixedLocator([100.0 - a for a in ACCURACY_TICKS if low <= 100.0 - a <= high]))
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda error, _: f"{100.0 - error:g}"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylabel("test accuracy (%), log scale of the error")
