"""Figures of the mask topology over training: which connections each DST step pruned and regrew.

Each function takes plain data (mask snapshots as 2-D boolean arrays, as
``MaskedNet.get_masks_as_2d`` returns them; sparsities as fractions) and returns
the Figure, drawn like every figure of ``dst.tutorial.plots``; ``save_path`` additionally
writes it to disk. The numbers drawn are ``dst.tutorial.topology.mask_changes``'s.
"""

import math
from itertools import pairwise

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from dst.tutorial.plots import check_lengths, finish, lecture_style
from dst.tutorial.topology import as_2d_masks, mask_changes, turnover_percent

# Codes ordered by display priority, so a block of pixels takes the maximum code:
# one regrown connection must stay visible among thousands of kept ones.
EMPTY, KEPT, PRUNED, REGROWN = 0, 1, 2, 3
TRANSITION_COLORS = np.array([[0, 0, 0], [255, 255, 255], [214, 39, 40], [44, 160, 44]], dtype=np.uint8)
TRANSITION_NAMES = ("empty (off in both)", "kept (on in both)", "pruned (on -> off)", "regrown (off -> on)")
# Past ~128 pixels a side a subplot has fewer screen pixels than the image, and
# the few changed connections of a DST step would be lost to aliasing.
MAX_IMAGE_SIDE = 128


def mask_transition_image(previous, current, block=(1, 1)):
    """Colour a 2-D mask against its previous version: pruned red, regrown green, kept white, empty black.

    ``block=(rows, cols)`` reduces the image by blocks of that size; a block shows its
    highest-priority transition (regrown > pruned > kept > empty). Returns (H', W', 3) uint8.
    """
    previous, current = np.asarray(previous, dtype=bool), np.asarray(current, dtype=bool)
    if previous.shape != current.shape or previous.ndim != 2:
        raise ValueError(f"masks must be 2-D and the same shape, got {previous.shape} and {current.shape}")
    codes = np.where(current, np.where(previous, KEPT, REGROWN), np.where(previous, PRUNED, EMPTY))
    block_rows, block_cols = block
    if (block_rows, block_cols) != (1, 1):
        height, width = codes.shape
        padded = np.zeros((-(-height // block_rows) * block_rows, -(-width // block_cols) * block_cols), int)
        padded[:height, :width] = codes
        codes = padded.reshape(padded.shape[0] // block_rows, block_rows, -1, block_cols).max(axis=(1, 3))
    return TRANSITION_COLORS[codes]


@lecture_style
def plot_mask_evolution_per_epoch(sparsity_per_epoch, masks_per_epoch=None, save_path=None, epochs=None):
    """Plot per-layer sparsity (%) per snapshot and, given masks, the topology turnover (%) between snapshots.

    ``epochs`` labels the snapshots (default 1, 2, ...; the notebook passes 0 for the masks before
    training). Layers whose values agree at every snapshot share one line or bar (labelled with all
    their names), so none hides another. Turnover happens at discrete DST steps, so it is drawn as bars
    at the snapshots whose masks changed; the numbers are ``topology.mask_changes`` of the masks.
    """
    if not sparsity_per_epoch:
        raise ValueError("sparsity_per_epoch is empty: record one {layer: sparsity} dict per epoch")
    names = list(sparsity_per_epoch[0])
    epochs = _epoch_labels(epochs, len(sparsity_per_epoch))
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    if masks_per_epoch is None:
        fig, sparsity_ax = plt.subplots(figsize=(8, 5))
    else:
        check_lengths(sparsity_per_epoch=sparsity_per_epoch, masks_per_epoch=masks_per_epoch)
        changes = mask_changes(masks_per_epoch)
        fig, (sparsity_ax, turnover_ax) = plt.subplots(1, 2, figsize=(15, 5.5))
        turnover = {name: [turnover_percent(change[name]) for change in changes]
                    for name in (changes[0] if changes else ())}
        groups = [(series, group) for series, group in _same_series(turnover).items() if any(series)]
        width = 0.8 / max(len(groups), 1)
        for index, (series, group) in enumerate(groups):
            moved = [(epoch, value) for epoch, value in zip(epochs[1:], series, strict=True) if value > 0]
            turnover_ax.bar([epoch - 0.4 + width * (index + 0.5) for epoch, _ in moved], [v for _, v in moved],
                            width, color=colors.get(group[0]), label=", ".join(group))
        turnover_ax.set(xlabel="epoch", ylabel="active connections replaced (%)", xticks=epochs,
                        xlim=(epochs[0] - 0.6, epochs[-1] + 0.6), title="Topology turnover at each DST step")
        tallest = max((max(series) for series, _ in groups), default=0.0)
        turnover_ax.set_ylim(0, 1.35 * tallest if tallest > 0 else 1.0)  # room for the legend above the bars
        turnover_ax.grid(alpha=0.3, axis="y")
        if groups:
            turnover_ax.legend()
        else:
            turnover_ax.text(0.5, 0.5, "no mask changed: no DST step happened", ha="center",
                             transform=turnover_ax.transAxes)
    sparsity = {name: [100 * epoch.get(name, np.nan) for epoch in sparsity_per_epoch] for name in names}
    for series, group in _same_series(sparsity).items():
        sparsity_ax.plot(epochs, series, "o-", color=colors[group[0]], label=", ".join(group))
    sparsity_ax.set(xlabel="epoch", ylabel="sparsity (%)", xticks=epochs, title="Sparsity per layer")
    sparsity_ax.ticklabel_format(axis="y", useOffset=False)  # flat DST lines otherwise read "1e-14 + 95"
    sparsity_ax.grid(alpha=0.3)
    sparsity_ax.legend()
    fig.tight_layout()
    return finish(fig, save_path)


@lecture_style
def plot_mask_2d_evolution(masks_per_epoch, save_path=None, epochs=None):
    """Show each sparse layer's mask (rows) at the first snapshot and at every snapshot whose mask changed.

    Each image is coloured by change since the previous snapshot (pruned red, regrown green);
    snapshots whose masks equal the previous one are named in the title instead of drawn, so the
    columns stay wide enough to read on a projector. Layers dense in every snapshot (ERK keeps
    small ones dense) have nothing to show: they are named in one line instead of drawn as white
    boxes. ``epochs`` labels the snapshots as in ``plot_mask_evolution_per_epoch``.
    """
    masks_per_epoch = as_2d_masks(masks_per_epoch)
    epochs = _epoch_labels(epochs, len(masks_per_epoch))
    changes = mask_changes(masks_per_epoch)
    dense = [name for name in masks_per_epoch[0] if all(masks[name].all() for masks in masks_per_epoch)]
    names = [name for name in masks_per_epoch[0] if name not in dense]
    if not names:
        raise ValueError(f"every layer is dense in every snapshot ({', '.join(dense)}): no mask to draw")
    changed = [index + 1 for index, change in enumerate(changes)
               if any(layer["pruned"] or layer["regrown"] for layer in change.values())]
    columns = [0, *changed]
    unchanged = [epochs[index] for index in range(1, len(masks_per_epoch)) if index not in changed]
    n_layers, n_columns = len(names), len(columns)
    fig, axes = plt.subplots(n_layers, n_columns, squeeze=False,
                             figsize=(max(2.6 * n_columns + 1.0, 7.5), 1.9 * n_layers + 1.6))
    for row, name in enumerate(names):
        height, width = masks_per_epoch[0][name].shape
        block = (math.ceil(height / MAX_IMAGE_SIDE), math.ceil(width / MAX_IMAGE_SIDE))
        for column, index in enumerate(columns):
            ax = axes[row, column]
            previous = masks_per_epoch[max(index - 1, 0)][name]
            ax.imshow(mask_transition_image(previous, masks_per_epoch[index][name], block),
                      aspect="auto", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if index > 0:
                change = changes[index - 1][name]
                moved = change["pruned"] or change["regrown"]
                ax.set_xlabel(f"-{change['pruned']:,} / +{change['regrown']:,}" if moved else "unchanged")
        title = f"{name} {height}x{width}, {100 * masks_per_epoch[0][name].mean():.3g}% on"
        if block != (1, 1):
            title += f" ({block[0]}x{block[1]} blocks)"
        axes[row, 0].set_title(title, loc="left")
    for column, index in enumerate(columns):
        axes[0, column].text(0.5, 1.4, f"epoch {epochs[index]}", ha="center", fontweight="bold",
                             transform=axes[0, column].transAxes)
    fig.tight_layout(h_pad=1.8)  # before the legend and title, which sit above the figure's top edge
    handles = [Patch(facecolor=color / 255, edgecolor="gray", label=label)
               for color, label in zip(TRANSITION_COLORS[::-1], TRANSITION_NAMES[::-1], strict=True)]
    fig.legend(handles=handles, loc="lower center", ncol=2, bbox_to_anchor=(0.5, 1.0))
    subtitle = "x-label: connections pruned / regrown since the previous snapshot"
    if not changed:
        subtitle = f"no mask changed in {len(masks_per_epoch)} snapshot(s): no DST step happened"
    elif unchanged:
        subtitle += f"; epochs {_ranges(unchanged)} unchanged, not drawn"
    if dense:
        subtitle += f"\ndense in every snapshot, not drawn: {', '.join(dense)}"
    fig.suptitle(f"Mask topology per epoch\n({subtitle})", y=1.0 + (0.75 + 0.25 * bool(dense)) / fig.get_figheight()
                 + 0.08)
    return finish(fig, save_path)


@lecture_style
def plot_input_connections(maps, save_path=None):
    """Each input pixel's active outgoing connections (``topology.input_connections``), one image per net.

    ``maps``: ``{label: (H, W) counts}``, drawn on one colour scale so the panels compare; each
    title gives the mean count in the image's central 12x12 pixels (where digits are drawn) and in
    its four outer rows and columns (always blank in MNIST).
    """
    if not maps:
        raise ValueError("maps is empty: expected {label: (H, W) connection counts}")
    maps = {label: np.asarray(counts, dtype=float) for label, counts in maps.items()}
    top = max(counts.max() for counts in maps.values())
    fig, axes = plt.subplots(1, len(maps), figsize=(4.2 * len(maps) + 1.2, 4.8), squeeze=False)
    for ax, (label, counts) in zip(axes[0], maps.items(), strict=True):
        image = ax.imshow(counts, cmap="viridis", vmin=0, vmax=top)
        centre, border = centre_and_border(counts)
        ax.set_title(f"{label}\ncentre {centre:.1f}, border {border:.1f}")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes[0].tolist(), label="active connections per input pixel")
    return finish(fig, save_path)


def centre_and_border(counts) -> tuple[float, float]:
    """Mean of an image's central 12x12 pixels and of its 4-pixel frame (MNIST's digits and its blank margin)."""
    counts = np.asarray(counts, dtype=float)
    height, width = counts.shape
    if height < 12 or width < 12:
        raise ValueError(f"expected an image of at least 12x12 pixels, got {height}x{width}")
    top, left = (height - 12) // 2, (width - 12) // 2
    frame = np.ones_like(counts, dtype=bool)
    frame[4:-4, 4:-4] = False
    return float(counts[top:top + 12, left:left + 12].mean()), float(counts[frame].mean())


def _epoch_labels(epochs, count: int) -> list[int]:
    """``epochs`` as a list of ``count`` increasing ints (default 1 to ``count``)."""
    epochs = list(range(1, count + 1)) if epochs is None else [int(epoch) for epoch in epochs]
    if len(epochs) != count or any(b <= a for a, b in zip(epochs, epochs[1:])):
        raise ValueError(f"epochs must be {count} increasing numbers, one per snapshot, got {epochs}")
    return epochs


def _same_series(series_by_name):
    """Group names whose series (in percent) agree to 0.05 points, so lines that would coincide on the figure
    are drawn once, labelled with all their names (with the first name's values: no figure resolves less)."""
    groups: dict[tuple, list[str]] = {}
    series_of: dict[tuple, list[float]] = {}
    for name, series in series_by_name.items():
        key = tuple(round(value, 1) for value in series)
        groups.setdefault(key, []).append(name)
        series_of.setdefault(key, series)
    return {tuple(series_of[key]): names for key, names in groups.items()}


def _ranges(numbers):
    """'2, 4-6, 9' for [2, 4, 5, 6, 9]."""
    spans, start = [], None
    for previous, current in pairwise([None, *numbers, None]):
        if start is None:
            start = current
        elif current is None or current != previous + 1:
            spans.append(f"{start}" if start == previous else f"{start}-{previous}")
            start = current
    return ", ".join(spans)
