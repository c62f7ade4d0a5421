"""Argument checks shared across the package, so every function words the same mistake the same way.

Positive integers (sizes, counts), fractions and step counts (the methods' and recipes' settings),
the widths and labelled data both MLP trainers take, and JSON from files someone else wrote
(nesting bounded before it is parsed).
"""

import json
import math
import numbers
import re

import numpy as np
import torch


def is_positive_int(value) -> bool:
    """Whether ``value`` is an integer >= 1 (numpy integers included, bools excluded)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def is_count(value) -> bool:
    """Whether ``value`` is an integer >= 0 (numpy integers included, bools excluded)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def check_fraction(name: str, value, low: float = 0.0, high: float = 1.0, include_low: bool = True) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a real number in [low, high] ((low, high] if not
    ``include_low``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not (
            (low <= value if include_low else low < value) and value <= high):
        interval = f"{'[' if include_low else '('}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")


def check_steps(name: str, value) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a positive int."""
    if not is_positive_int(value):
        raise ValueError(f"{name} must be a positive int (steps or updates), got {value!r}")


def check_positive_int(**values) -> None:
    """Raise ValueError naming the first of ``name=value`` that is not a positive int."""
    for name, value in values.items():
        if not is_positive_int(value):
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def class_labels(y, count: int, num_classes: int) -> np.ndarray:
    """``count`` integer class labels in [0, ``num_classes``) as int64, or a clear error (float labels refused)."""
    labels = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype} (a float label "
                        "such as 3.7 would be truncated to 3); convert whole-number labels with .astype(int)")
    labels = labels.astype(np.int64).reshape(-1)
    if len(labels) != count:
        raise ValueError(f"x and y differ in length: {count} vs {len(labels)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return labels


def check_hidden(hidden) -> tuple[int, ...]:
    """``hidden`` as a tuple of widths, or a clear error for a bare width or anything else."""
    if isinstance(hidden, (numbers.Number, str)) or not hasattr(hidden, "__iter__"):
        raise ValueError(f"hidden must be a tuple of widths, e.g. ({hidden!r}, {hidden!r}), got {hidden!r}")
    hidden = tuple(hidden)
    if not all(is_positive_int(width) for width in hidden):
        raise ValueError(f"hidden widths must be positive ints, got {hidden}")
    return tuple(int(width) for width in hidden)


def check_data(x, y, split: str, num_classes: int) -> np.ndarray:
    """The labels of (x, y) as int64, after checking both hold the same, non-zero number of samples."""
    if len(x) == 0:
        raise ValueError(f"the {split} data is empty (0 samples)")
    if len(x) != len(y):
        raise ValueError(f"x and y of the {split} data differ in length: {len(x)} vs {len(y)}")
    return class_labels(y, len(x), num_classes)


# Nesting a file of this package may have (a run record, a CSR model's header): a few levels are used; the
# bound keeps a crafted file (100,000 nested brackets) from exhausting Python's recursion in json.loads.
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def json_depth(text: str) -> int:
    """How deeply ``text``'s arrays and objects nest (brackets inside strings do not count)."""
    depth = deepest = 0
    for bracket in re.findall(r"[\[\]{}]", _JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def load_json(text: str, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads(text)``, refusing with ValueError nesting deeper than ``max_depth`` before parsing.

    Every failure is a ValueError (json.JSONDecodeError is one; so is an integer of more digits than Python
    converts).
    """
    depth = json_depth(text)
    if depth > max_depth:
        raise ValueError(f"JSON nested {depth} levels deep, more than the {max_depth} allowed")
    return json.loads(text)
