"""Block sparsity (Gray et al. 2017, OpenAI's block-sparse kernels; scipy's ``bsr_matrix``): whole ``r x c`` blocks.

The weight matrix is tiled by ``r x c`` blocks that are active or not as a whole; a
layer keeps ``round(density * blocks)`` of them, at least one. DST ranks a block by the
sum of its weights' magnitudes (L1) to prune and by the sum of its weights' scores to
regrow. ``1x8`` blocks (8 consecutive inputs of one neuron) suit a CPU's SIMD lanes,
``4x4`` and larger a GPU's tiles; ``dst.csr``'s ``bsr`` layer kind runs them.
"""

import re
from dataclasses import dataclass

from dst.engine.patterns.base import Pattern


@dataclass(frozen=True)
class Block(Pattern):
    """Whole ``rows x columns`` blocks, any number of them per layer."""

    kind = "block"
    spelling = "blockRxC (e.g. 'block4x4', 'block1x8')"
    sparse_kind = "bsr"
    rows: int = 4
    columns: int = 4

    def __post_init__(self):
        if not (isinstance(self.rows, int) and isinstance(self.columns, int) and self.rows > 0 and self.columns > 0):
            raise ValueError(f"a block pattern needs positive whole block sizes, got {self.rows}x{self.columns}")

    @classmethod
    def parse(cls, spec):
        found = re.fullmatch(r"block(\d+)x(\d+)", spec)
        return cls(int(found[1]), int(found[2])) if found else None

    @property
    def label(self):
        return f"block{self.rows}x{self.columns}"

    @property
    def unit_shape(self):
        return (self.rows, self.columns)

    @property
    def block_shape(self) -> tuple[int, int]:
        """(rows, columns) of a block: what a block-sparse (BSR) layer stores."""
        return (self.rows, self.columns)
