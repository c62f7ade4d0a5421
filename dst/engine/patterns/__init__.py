"""Sparsity patterns: which sets of active weights a layer may hold (``unstructured``, ``fan_in``, ``N:M``, blocks).

A pattern is named as torch's pruning (``PRUNING_TYPE``) and jaxpruner (``sparsity_types``)
name theirs: a small object that says how a layer's positions group and how many per group
are active (``base``). Masks are drawn by it (``MaskedNet(..., pattern=)``), the DST step
prunes and regrows within its groups so it holds after every step, gradual pruning prunes
within them, and the truly sparse engine picks the layer kind it names (``sparse_kind``).

One module per pattern; each registers itself by its ``kind`` when imported, and this
package imports them all, so a new pattern is one module (plus its tests).
"""

import importlib
import pkgutil

from dst.engine.patterns.base import PATTERN_KINDS, Pattern

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def get_pattern(pattern: "str | Pattern") -> Pattern:
    """The pattern ``pattern`` spells ("unstructured", "fan_in", "2:4", "block4x4"); a ``Pattern`` passes through."""
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, str):
        for kind in PATTERN_KINDS.values():
            parsed = kind.parse(pattern)
            if parsed is not None:
                return parsed
    spellings = ", ".join(kind.spelling for kind in PATTERN_KINDS.values())
    raise ValueError(f"unknown sparsity pattern {pattern!r}; choose one of: {spellings}")


__all__ = ["PATTERN_KINDS", "Pattern", "get_pattern"]
