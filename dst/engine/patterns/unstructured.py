"""Unstructured sparsity: any weight may be active; a layer keeps ``round(density * numel)`` of them.

The pattern of nearly every DST paper, and the one the truly sparse trainer scales to huge
layers: its DST step (``dst.engine.update_rule.choose_moves``) never forms an array of the
layer's size, where the grouped rule of the structured patterns does.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from dst.engine.allocation import active_count
from dst.engine.patterns.base import Pattern


@dataclass(frozen=True)
class Unstructured(Pattern):
    """Any position; one group, the whole layer."""

    kind = "unstructured"
    spelling = "unstructured"

    def active_per_group(self, grid, density):
        return active_count(grid[0] * grid[1], density)

    def random_mask(self, shape, density, generator=None):
        # randperm, not the grouped top-k: the random stream every earlier result was drawn with.
        numel = math.prod(shape)
        order = torch.randperm(numel, generator=generator)
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[order[:active_count(numel, density)]] = True
        return mask.reshape(shape).numpy()

    def check_mask(self, mask: np.ndarray) -> None:
        """Every mask is unstructured."""
