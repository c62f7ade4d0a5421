"""What DST did to the masks: the changes between consecutive mask snapshots, as data.

The tutorial's mask figures draw exactly these numbers, and its tests check them against
the DST steps' own reports, so a figure can never show something the training did not do.
"""

from itertools import pairwise

import numpy as np


def as_2d_masks(masks_per_epoch) -> list[dict[str, np.ndarray]]:
    """Snapshots as 2-D bool arrays (conv ones as (out, in*kh*kw)); every epoch must hold the same layers."""
    if not masks_per_epoch:
        raise ValueError("masks_per_epoch is empty: record one {layer: 2-D mask} dict per epoch")
    names = list(masks_per_epoch[0])
    result = []
    for epoch, masks in enumerate(masks_per_epoch, start=1):
        if list(masks) != names:
            raise ValueError(f"epoch {epoch} has layers {list(masks)}, epoch 1 has {names}")
        arrays = {name: np.asarray(mask, dtype=bool) for name, mask in masks.items()}
        # Conv masks become (out, in*kh*kw); a 1-D mask becomes one row.
        arrays = {name: mask.reshape(len(mask), -1) if mask.ndim > 2 else np.atleast_2d(mask)
                  for name, mask in arrays.items()}
        for name, mask in arrays.items():
            if result and mask.shape != result[0][name].shape:
                raise ValueError(f"layer {name!r} has shape {mask.shape} at epoch {epoch}, "
                                 f"{result[0][name].shape} at epoch 1")
        result.append(arrays)
    return result


def mask_changes(masks_per_epoch) -> list[dict[str, dict[str, int]]]:
    """For each pair of consecutive snapshots, per layer: connections ``pruned``, ``regrown``, ``active_before``.

    Entry ``i`` compares snapshot ``i`` with snapshot ``i + 1``, so a run with E snapshots has E - 1 entries.
    """
    masks = as_2d_masks(masks_per_epoch)
    return [{name: {"pruned": int((before[name] & ~after[name]).sum()),
                    "regrown": int((~before[name] & after[name]).sum()),
                    "active_before": int(before[name].sum())}
             for name in before}
            for before, after in pairwise(masks)]


def turnover_percent(change: dict[str, int]) -> float:
    """Percent of the previously active connections that one change replaced (NaN for an empty layer)."""
    return 100 * change["pruned"] / change["active_before"] if change["active_before"] else float("nan")


def input_connections(mask, image_shape: tuple[int, ...]) -> np.ndarray:
    """Active connections leaving each input of a first layer, shaped as its input image.

    ``mask``: the layer's (out, in) mask (a Linear on flattened images, ``in = prod(image_shape)``).
    Where DST moves connections onto the pixels that carry the digits, this map shows it.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or mask.shape[1] != int(np.prod(image_shape)):
        raise ValueError(f"expected an (out, {int(np.prod(image_shape))}) mask for images of shape {image_shape}, "
                         f"got shape {mask.shape}")
    return mask.sum(axis=0).reshape(image_shape)
