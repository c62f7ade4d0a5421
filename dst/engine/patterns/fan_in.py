"""Constant fan-in (SRigL, Lasby et al. ICLR 2024): every output neuron keeps the same number ``k`` of inputs.

The group is one row of the weight matrix (one neuron; a conv's output channel over
``in*kh*kw``), ``k = round(density * in)``, at least one. A layer of this pattern is a
dense ``(out, k)`` array of values plus one of input indices ("condensed"): no row
pointers, equal work per neuron, which is what makes it fast on a CPU at batch 1
(``dst.csr``'s ``fan_in`` layer kind).
"""

from dataclasses import dataclass

from dst.engine.patterns.base import Pattern


@dataclass(frozen=True)
class FanIn(Pattern):
    """Every row (output neuron) holds exactly ``k`` active weights."""

    kind = "fan_in"
    spelling = "fan_in"
    sparse_kind = "fan_in"

    def group_length(self, grid):
        return grid[1]
