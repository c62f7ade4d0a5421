"""How a global sparsity target is split across layers.

``uniform`` gives every layer the global sparsity (the seed's choice). ``erk``
(Erdős–Rényi-Kernel, Evci et al. 2020, "Rigging the Lottery") makes a layer's
density proportional to ``sum(shape) / prod(shape)``, so small layers (the
first conv, the classifier) keep more of their weights and the large hidden
matrices carry most of the sparsity. Both meet the target on the total weight
count, up to rounding each layer to a whole number of weights.
"""

import math
import numbers
from collections.abc import Mapping, Sequence


def uniform_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Every layer at the global density."""
    return {name: density for name in shapes}


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel densities whose weighted mean is ``density``.

    A layer whose ERK density would exceed 1 is made dense and the remaining
    budget is spread over the other layers again, until none overflows. A layer
    with no weights (a zero in its shape) has nothing to keep: density 1.
    """
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / sizes[name] for name, shape in shapes.items() if sizes[name] > 0}
    budget = density * sum(sizes.values())
    dense: set[str] = {name for name in shapes if sizes[name] == 0}
    while True:
        sparse_names = [name for name in shapes if name not in dense]
        if not sparse_names:
            break
        remaining = budget - sum(sizes[name] for name in dense)
        scale = remaining / sum(raw[name] * sizes[name] for name in sparse_names)
        overflowing = {name for name in sparse_names if scale * raw[name] > 1.0}
        if not overflowing:
            break
        dense |= overflowing
    return {name: 1.0 if name in dense else min(1.0, scale * raw[name]) for name in shapes}


ALLOCATIONS = {"uniform": uniform_densities, "erk": erk_densities}


def layer_densities(shapes: Mapping[str, Sequence[int]], sparsity: float,
                    allocation: str = "uniform") -> dict[str, float]:
    """Per-layer density (fraction of weights kept) for a global ``sparsity``."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; choose one of {sorted(ALLOCATIONS)}")
    check_sparsity(sparsity)
    return ALLOCATIONS[allocation](shapes, 1.0 - sparsity)


def check_sparsity(sparsity: float) -> None:
    """Raise unless ``sparsity`` is a real number in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"sparsity must be a float in [0, 1), got {type(sparsity).__name__}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (0 = dense, 0.95 = 95% zeros), got {sparsity}")


def active_count(numel: int, density: float) -> int:
    """Whole number of weights kept at ``density``; at least one so no layer is cut off (none of none)."""
    return max(min(1, numel), min(numel, round(density * numel)))
