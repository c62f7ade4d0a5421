"""The ``fan_in`` kind: condensed constant fan-in (SRigL, Lasby et al. ICLR 2024), for masked Linears.

Every output row has the same number ``k`` of active inputs, so the layer is two dense
``(out, k)`` arrays: ``values`` (float32) and ``col_indices`` (each row's inputs, rising; in the
file and on numba 16-bit where the layer has at most 65,536 inputs). No row pointers, and
loops of one fixed length: ``y[o] = sum_j values[o, j] * x[col_indices[o, j]]``. The array
backends (scipy, cupy, torch) run that as one gather and a sum over ``k`` (``FanInStep``, the
same code on each); numba runs ``dst.csr.kinds.fan_in_kernels``, bias and ReLU fused.
Chosen under layout="auto" for masks whose pattern names it (``sparse_kind``: fan_in, and N:M, whose
rows hold a constant count too); asking for it where rows differ in count is a ValueError.
"""

import numpy as np

from dst.csr.array_ops import narrowest_dtype
from dst.csr.kinds.base import (
    MAX_INDEX,
    FeaturesStep,
    WeightedKind,
    array_module,
    check_ints,
    check_shape,
    check_values_and_bias,
    host_weight,
    register,
)
from dst.csr.kinds.csr import INDEX_TYPES, UNSIGNED
from dst.engine.masked_layers import MaskedLinear


@register
class FanIn(WeightedKind):
    name = "fan_in"
    modules = (MaskedLinear,)
    default = False

    def describe(self, module, name: str, label: str, **options) -> tuple[dict, dict]:
        mask, weight, bias = host_weight(module)
        counts = mask.sum(axis=1)
        if counts.size and counts.min() != counts.max():
            raise ValueError(f"{label}: kind 'fan_in' needs the same number of active inputs in every row, "
                             f"but rows hold {counts.min()} to {counts.max()}")
        k = int(counts[0]) if counts.size else 0
        col_indices = np.nonzero(mask)[1].reshape(mask.shape[0], k)  # row-major: each row's inputs, rising
        return {"kind": self.name, "name": name}, {
            "shape": mask.shape, "values": np.take_along_axis(weight, col_indices, axis=1),
            "col_indices": col_indices.astype(np.int64), "bias": bias}

    def check(self, step: dict, host: dict, where: str) -> None:
        name = step["name"]
        rows, columns = check_shape(name, host)
        values, col_indices = host["values"], host["col_indices"]
        if not (values.ndim == 2 and values.shape[0] == rows and col_indices.shape == values.shape
                and values.shape[1] <= columns):
            raise ValueError(f"layer {name!r} ({rows}x{columns}): values {values.shape} and column indices "
                             f"{col_indices.shape} must both be (rows, k) with k <= {columns}")
        check_indices(name, col_indices, columns)
        check_values_and_bias(name, host, rows)

    def build(self, ops, group: dict, host: dict):
        if ops.name == "numba":
            from dst.csr.kinds.fan_in_kernels import NumbaFanInStep as step_class
        else:
            step_class = FanInStep
        return step_class(ops, group["name"], host, group.get("relu", False))

    # --- file: "fan_in" (k) and "index_type" in the header; values and col_indices_<type>, row-major
    def file_entry(self, host: dict) -> tuple[dict, dict]:
        index_type = np.dtype(narrowest_dtype(host["shape"][1] - 1, UNSIGNED)).name
        return {"fan_in": int(host["values"].shape[1]), "index_type": index_type}, {
            "values": host["values"].astype(np.float32).reshape(-1),
            f"col_indices_{index_type}": host["col_indices"].astype(index_type).reshape(-1)}

    def file_fields(self, entry: dict, where: str) -> dict:
        if entry.get("index_type") not in INDEX_TYPES:
            raise ValueError(f"{where}: malformed layer entry {str(entry)[:200]}")
        rows, columns = entry["shape"]
        k = check_ints(entry.get("fan_in"), 0, columns, f"{where}: fan_in of layer {entry['name']!r}", 1)[0]
        if rows * k > MAX_INDEX:
            raise ValueError(f"{where}: layer {entry['name']!r} holds {rows} x {k} weights, more than {MAX_INDEX}")
        return {"values": ("values", "float32", rows * k),
                "col_indices": (f"col_indices_{entry['index_type']}", entry["index_type"], rows * k)}

    def check_read(self, name: str, host: dict, family: str) -> None:
        if family == "col_indices_":
            rows, columns = host["shape"]
            check_indices(name, host["col_indices"].reshape(rows, host["entry"]["fan_in"]), columns)

    def from_file(self, entry: dict, host: dict) -> dict:
        rows, k = entry["shape"][0], entry["fan_in"]
        return {"shape": host["shape"], "values": host["values"].reshape(rows, k), "bias": host["bias"],
                "col_indices": host["col_indices"].astype(np.int64).reshape(rows, k)}

    def active_mask(self, host: dict) -> np.ndarray:
        stored = np.zeros(host["shape"], dtype=bool)
        stored[np.arange(host["shape"][0])[:, None], host["col_indices"]] = True
        return stored


def check_indices(name: str, col_indices: np.ndarray, columns: int) -> None:
    """Each row's column indices inside the layer and strictly rising."""
    if col_indices.size and (col_indices.min() < 0 or col_indices.max() >= columns):
        raise ValueError(f"layer {name!r}: column indices must lie in [0, {columns}), got "
                         f"[{col_indices.min()}, {col_indices.max()}]")
    if not np.all(col_indices[:, 1:] > col_indices[:, :-1]):
        raise ValueError(f"layer {name!r}: column indices must rise strictly within each row")


class FanInStep(FeaturesStep):
    """``y (out, N) = sum_j values[:, j] * x[col_indices[:, j]]``: one gather and a sum over k, on any
    array module (numpy, cupy, torch), then the bias and a folded-in ReLU."""

    kind = "fan_in"

    def __init__(self, ops, name: str, host: dict, relu: bool = False):
        self.ops, self.name, self.relu, self.xp = ops, name, relu, array_module(ops)
        self.out_features, self.in_features = (int(size) for size in host["shape"])
        self.values = ops.asarray(np.ascontiguousarray(host["values"], dtype=np.float32))  # (out, k)
        self.col_indices = ops.asarray(np.ascontiguousarray(host["col_indices"], dtype=np.int64))  # (out, k)
        bias = host.get("bias")
        self.bias = None if bias is None else ops.asarray(np.asarray(bias, dtype=np.float32).reshape(-1, 1))

    def __call__(self, x, buffers):
        y = self.xp.einsum("ok,okn->on", self.values, x[self.col_indices])  # the gather: (out, k, N)
        if self.bias is not None:
            y += self.bias
        return self.ops.relu_(y) if self.relu else y

    def host(self) -> dict:
        to_numpy = self.ops.to_numpy
        return {"shape": (self.out_features, self.in_features), "values": to_numpy(self.values),
                "col_indices": to_numpy(self.col_indices).astype(np.int64),
                "bias": None if self.bias is None else to_numpy(self.bias).reshape(-1)}

    def held_arrays(self) -> list:
        return [self.values, self.col_indices, *([] if self.bias is None else [self.bias])]
