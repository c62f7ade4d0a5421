"""N:M sparsity (Zhou et al. ICLR 2021; NVIDIA Ampere's 2:4): ``n`` of every ``m`` consecutive input weights.

Groups are ``m`` consecutive positions along a row of the weight matrix (the reduction
dimension: a conv's ``in*kh*kw`` in the mask's numbering), each with exactly ``n`` active,
so the density is exactly ``n/m``: a layer's density is rounded to it when it is the nearest
``k/m`` (49.8 %, where a dense output layer takes a little of a 50 % budget, is 2:4), and a
layer asked for a density nearer another ``k/m`` (an ERK allocation, a global sparsity far
from ``1 - n/m``) is refused, naming what it can hold. Every row then holds ``in * n / m``
weights: a constant fan-in too, which ``dst.csr`` stores as its ``fan_in`` kind; GPUs with
sparse tensor cores run 2:4 in hardware.
"""

from dataclasses import dataclass

from dst.engine.patterns.base import Pattern


@dataclass(frozen=True)
class NM(Pattern):
    """``n`` active in every ``m`` consecutive inputs of a row."""

    kind = "n_m"
    spelling = "N:M (e.g. '2:4')"
    sparse_kind = "fan_in"
    n: int = 2
    m: int = 4

    def __post_init__(self):
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n <= self.m):
            raise ValueError(f"an N:M pattern needs whole numbers 0 < N <= M, got {self.n}:{self.m}")

    @classmethod
    def parse(cls, spec):
        n, colon, m = spec.partition(":")
        if colon and n.isdigit() and m.isdigit():
            return cls(int(n), int(m))
        return None

    @property
    def label(self):
        return f"{self.n}:{self.m}"

    def group_length(self, grid):
        return self.m

    def active_per_group(self, grid, density):
        if density == 1.0:  # a layer kept dense
            return self.m
        if round(density * self.m) != self.n:
            raise ValueError(f"pattern {self.label!r} keeps exactly {self.n}/{self.m} = {self.n / self.m:.4g} of "
                             f"a layer's weights (or all of them), not {density:.4g}: use allocation='uniform' at "
                             f"sparsity {1 - self.n / self.m:.4g}")
        return self.n

    def grid(self, shape):
        if shape[1] % self.m:
            raise ValueError(f"pattern {self.label!r} groups {self.m} consecutive inputs, and this layer's "
                             f"{shape[1]} inputs are not a multiple of {self.m}")
        return super().grid(shape)
