"""What the two CSR kinds (``conv``, ``linear``) share: their host arrays, their checks and their file entry.

Host arrays: ``values`` (float32, nnz), ``col_indices`` and ``row_pointers`` (int64) over
the mask's ``(out, in)`` matrix (``(out, in*kh*kw)`` for a conv), rows = output units.
The positions come from the MASK, so an active weight that is 0.0 (a freshly regrown
connection) stays as an explicit zero. In the file, column indices and row pointers are
stored in the narrowest unsigned type that holds them.
"""

import numpy as np

from dst.csr.array_ops import narrowest_dtype
from dst.csr.kinds.base import MAX_INDEX, WeightedKind, check_ints, check_shape, check_values_and_bias, host_weight

INDEX_TYPES = ("uint8", "uint16", "uint32", "uint64")
UNSIGNED = tuple(np.dtype(name).type for name in INDEX_TYPES)


class CSRKind(WeightedKind):
    """A weighted kind held as one CSR matrix over the mask's columns: any mask fits."""

    def host_from_layer(self, layer) -> dict:
        """A masked layer's active weights as numpy CSR arrays, rows = output units."""
        mask, weight, bias = host_weight(layer)
        row_pointers = np.zeros(mask.shape[0] + 1, dtype=np.int64)
        np.cumsum(mask.sum(axis=1), out=row_pointers[1:])
        return {"shape": mask.shape, "values": weight[mask], "col_indices": np.nonzero(mask)[1],
                "row_pointers": row_pointers, "bias": bias}

    def check(self, step: dict, host: dict | None, where: str) -> None:
        check_csr(step["name"], host)

    def file_entry(self, host: dict) -> tuple[dict, dict]:
        index_type = np.dtype(narrowest_dtype(host["shape"][1] - 1, UNSIGNED)).name
        pointer_type = np.dtype(narrowest_dtype(host["values"].size, UNSIGNED)).name
        entry = {"nnz": int(host["values"].size), "index_type": index_type, "pointer_type": pointer_type}
        return entry, {"values": host["values"].astype(np.float32),
                       f"col_indices_{index_type}": host["col_indices"].astype(index_type),
                       f"row_pointers_{pointer_type}": host["row_pointers"].astype(pointer_type)}

    def file_fields(self, entry: dict, where: str) -> dict:
        if entry.get("index_type") not in INDEX_TYPES or entry.get("pointer_type") not in INDEX_TYPES:
            raise ValueError(f"{where}: malformed layer entry {str(entry)[:200]}")
        nnz = check_ints(entry.get("nnz"), 0, MAX_INDEX, f"{where}: nnz of layer {entry['name']!r}", 1)[0]
        return {"values": ("values", "float32", nnz),
                "col_indices": (f"col_indices_{entry['index_type']}", entry["index_type"], nnz),
                "row_pointers": (f"row_pointers_{entry['pointer_type']}", entry["pointer_type"],
                                 entry["shape"][0] + 1)}

    def check_read(self, name: str, host: dict, family: str) -> None:
        if family == "row_pointers_":
            check_row_pointers(name, host["row_pointers"], host["entry"]["nnz"])
        elif family == "col_indices_":
            check_columns(name, host)

    def from_file(self, entry: dict, host: dict) -> dict:
        return {"shape": host["shape"], "values": host["values"], "bias": host["bias"],
                "col_indices": host["col_indices"].astype(np.int64),
                "row_pointers": host["row_pointers"].astype(np.int64)}

    def host_of(self, ops, step) -> dict:
        host = step.host_csr(*map(ops.to_numpy, ops.csr_arrays(step.weight)))
        host["bias"] = None if step.bias is None else ops.to_numpy(step.bias).reshape(-1)
        return host

    def held_arrays(self, ops, step) -> list:
        return [*ops.csr_arrays(step.weight), *([] if step.bias is None else [step.bias]), *step.held_arrays()]

    def active_mask(self, host: dict) -> np.ndarray:
        stored = np.zeros(host["shape"], dtype=bool)
        rows = np.repeat(np.arange(host["shape"][0]), np.diff(host["row_pointers"]))
        stored[rows, host["col_indices"]] = True
        return stored


def check_csr(name: str, host: dict) -> None:
    """Raise ValueError unless ``host`` holds a valid CSR matrix (and bias) of its shape."""
    rows, columns = check_shape(name, host)
    values, col_indices, row_pointers = host["values"], host["col_indices"], host["row_pointers"]
    nnz = len(values)
    if nnz > min(rows * columns, MAX_INDEX) or len(col_indices) != nnz or len(row_pointers) != rows + 1:
        raise ValueError(f"layer {name!r} ({rows}x{columns}): {nnz} values, {len(col_indices)} column indices "
                         f"and {len(row_pointers)} row pointers do not make a CSR matrix")
    check_row_pointers(name, row_pointers, nnz)
    check_columns(name, host)
    check_values_and_bias(name, host, rows)


def check_row_pointers(name: str, row_pointers: np.ndarray, nnz: int) -> None:
    """Row pointers rising from 0 to the layer's entry count (comparisons, not diff: they may be unsigned)."""
    if row_pointers[0] != 0 or row_pointers[-1] != nnz or np.any(row_pointers[1:] < row_pointers[:-1]):
        raise ValueError(f"layer {name!r}: row pointers must rise from 0 to its {nnz} entries")


def check_columns(name: str, host: dict, what: str = "column indices") -> None:
    """Column indices inside the layer and strictly rising within each row (valid row pointers assumed)."""
    col_indices, row_pointers, columns = host["col_indices"], host["row_pointers"], host["shape"][1]
    nnz = len(col_indices)
    if nnz and (col_indices.min() < 0 or col_indices.max() >= columns):
        raise ValueError(f"layer {name!r}: {what} must lie in [0, {columns}), got "
                         f"[{col_indices.min()}, {col_indices.max()}]")
    row_starts = np.zeros(max(nnz - 1, 0), dtype=bool)  # entry k+1 begins a row: no order with entry k
    starts = np.asarray(row_pointers[1:-1], dtype=np.int64)
    row_starts[starts[(starts > 0) & (starts < nnz)] - 1] = True
    if not np.all((col_indices[1:] > col_indices[:-1]) | row_starts):
        raise ValueError(f"layer {name!r}: {what} must rise strictly within each row")
