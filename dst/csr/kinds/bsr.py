"""The ``bsr`` kind: block-sparse rows, for masked Linears whose mask is a union of aligned ``r x c`` blocks.

Host arrays: ``values`` ``(blocks, r, c)`` float32, each active block dense; ``col_indices``
(int64) each block's block column, rising within a block row; ``row_pointers`` (int64,
``out/r + 1``) where each block row's blocks start: scipy's ``bsr_array`` layout. scipy runs
``bsr_array``, torch ``to_sparse_bsr``'s tensor, other array modules (cupy) a gather of the
``(c, N)`` input slabs and one batched block product per block row (``BSRStep``); numba runs
``dst.csr.kinds.bsr_kernels``, bias and ReLU fused. Chosen under layout="auto" for masks whose
pattern names it (blocks; their ``block_shape``); asking for it where the mask is not made of whole
aligned blocks, or the shape is not divisible by the block, is a ValueError.
"""

import warnings

import numpy as np

from dst.csr.array_ops import narrowest_dtype
from dst.csr.kinds.base import (
    MAX_INDEX,
    MAX_WINDOW,
    FeaturesStep,
    WeightedKind,
    array_module,
    check_ints,
    check_shape,
    check_values_and_bias,
    host_weight,
    register,
)
from dst.csr.kinds.csr import INDEX_TYPES, UNSIGNED, check_columns, check_row_pointers
from dst.engine.masked_layers import MaskedLinear


@register
class BSR(WeightedKind):
    name = "bsr"
    modules = (MaskedLinear,)
    default = False

    def describe(self, module, name: str, label: str, block_shape=None, pattern=None, **options):
        block_shape = getattr(pattern, "block_shape", None) if block_shape is None else block_shape
        if block_shape is None:
            raise ValueError(f"{label}: kind 'bsr' needs a block shape: give the layer a block pattern, or "
                             "ask for ('bsr', {'block_shape': (r, c)}) in layout")
        r, c = check_ints(list(block_shape), 1, MAX_WINDOW, f"{label}: block_shape", 2)
        mask, weight, bias = host_weight(module)
        rows, columns = mask.shape
        if rows % r or columns % c:
            raise ValueError(f"{label}: kind 'bsr' with {r}x{c} blocks needs a shape divisible by the block, "
                             f"got {rows}x{columns}")
        blocked = mask.reshape(rows // r, r, columns // c, c)
        active = blocked.any(axis=(1, 3))  # (rows/r, columns/c)
        partial = int((active & ~blocked.all(axis=(1, 3))).sum())
        if partial:
            raise ValueError(f"{label}: kind 'bsr' needs a mask made of whole aligned {r}x{c} blocks, but "
                             f"{partial} of its {int(active.sum())} active blocks are only partly active")
        values = weight.reshape(rows // r, r, columns // c, c).transpose(0, 2, 1, 3)[active]  # (blocks, r, c)
        row_pointers = np.zeros(rows // r + 1, dtype=np.int64)
        np.cumsum(active.sum(axis=1), out=row_pointers[1:])
        return {"kind": self.name, "name": name, "block_shape": [r, c]}, {
            "shape": mask.shape, "values": np.ascontiguousarray(values), "bias": bias,
            "col_indices": np.nonzero(active)[1].astype(np.int64), "row_pointers": row_pointers}

    def check(self, step: dict, host: dict, where: str) -> None:
        name = step["name"]
        r, c = check_ints(step.get("block_shape"), 1, MAX_WINDOW, f"{where}: block_shape", 2)
        rows, columns = check_shape(name, host)
        if rows % r or columns % c:
            raise ValueError(f"layer {name!r}: its {r}x{c} blocks do not divide its shape {rows}x{columns}")
        values, col_indices, row_pointers = host["values"], host["col_indices"], host["row_pointers"]
        blocks = len(col_indices)
        if (values.shape != (blocks, r, c) or blocks > (rows // r) * (columns // c)
                or len(row_pointers) != rows // r + 1):
            raise ValueError(f"layer {name!r} ({rows}x{columns} in {r}x{c} blocks): values {values.shape}, "
                             f"{blocks} block column indices and {len(row_pointers)} block row pointers do not "
                             "make a block-sparse matrix")
        check_row_pointers(name, row_pointers, blocks)
        check_columns(name, {"col_indices": col_indices, "row_pointers": row_pointers,
                             "shape": (rows // r, columns // c)}, "block column indices")
        check_values_and_bias(name, host, rows)

    def build(self, ops, group: dict, host: dict):
        if ops.name == "numba":
            from dst.csr.kinds.bsr_kernels import NumbaBSRStep as step_class
        else:
            step_class = BSRStep
        return step_class(ops, group["name"], host, group.get("relu", False))

    # --- file: "block_shape", "blocks", "index_type", "pointer_type"; values (blocks*r*c) row-major
    def file_entry(self, host: dict) -> tuple[dict, dict]:
        blocks, r, c = host["values"].shape
        index_type = np.dtype(narrowest_dtype(host["shape"][1] // c - 1, UNSIGNED)).name
        pointer_type = np.dtype(narrowest_dtype(blocks, UNSIGNED)).name
        entry = {"block_shape": [r, c], "blocks": blocks, "index_type": index_type, "pointer_type": pointer_type}
        return entry, {"values": host["values"].astype(np.float32).reshape(-1),
                       f"col_indices_{index_type}": host["col_indices"].astype(index_type),
                       f"row_pointers_{pointer_type}": host["row_pointers"].astype(pointer_type)}

    def file_fields(self, entry: dict, where: str) -> dict:
        if entry.get("index_type") not in INDEX_TYPES or entry.get("pointer_type") not in INDEX_TYPES:
            raise ValueError(f"{where}: malformed layer entry {str(entry)[:200]}")
        label = f"{where}: layer {entry['name']!r}"
        r, c = check_ints(entry.get("block_shape"), 1, MAX_WINDOW, f"{label}: block_shape", 2)
        (rows, columns), blocks = entry["shape"], entry.get("blocks")
        if rows % r or columns % c:
            raise ValueError(f"{label}: its {r}x{c} blocks do not divide its shape {rows}x{columns}")
        check_ints(blocks, 0, min((rows // r) * (columns // c), MAX_INDEX // (r * c)), f"{label}: blocks", 1)
        return {"values": ("values", "float32", blocks * r * c),
                "col_indices": (f"col_indices_{entry['index_type']}", entry["index_type"], blocks),
                "row_pointers": (f"row_pointers_{entry['pointer_type']}", entry["pointer_type"], rows // r + 1)}

    def check_read(self, name: str, host: dict, family: str) -> None:
        entry = host["entry"]
        r, c = entry["block_shape"]
        if family == "row_pointers_":
            check_row_pointers(name, host["row_pointers"], entry["blocks"])
        elif family == "col_indices_":
            check_columns(name, {"col_indices": host["col_indices"], "row_pointers": host["row_pointers"],
                                 "shape": (entry["shape"][0] // r, entry["shape"][1] // c)}, "block column indices")

    def from_file(self, entry: dict, host: dict) -> dict:
        return {"shape": host["shape"], "values": host["values"].reshape(-1, *entry["block_shape"]),
                "bias": host["bias"], "col_indices": host["col_indices"].astype(np.int64),
                "row_pointers": host["row_pointers"].astype(np.int64)}

    def active_mask(self, host: dict) -> np.ndarray:
        (rows, columns), (_, r, c) = host["shape"], host["values"].shape
        active = np.zeros((rows // r, columns // c), dtype=bool)
        active[np.repeat(np.arange(rows // r), np.diff(host["row_pointers"])), host["col_indices"]] = True
        return np.kron(active, np.ones((r, c), dtype=bool))


class BSRStep(FeaturesStep):
    """Linear on a block-sparse weight, then the bias and a folded-in ReLU: ``scipy.sparse.bsr_array`` on
    scipy, a torch BSR tensor on torch (square blocks), else (``library=False``, cupy) a gather over the blocks."""

    kind = "bsr"

    def __init__(self, ops, name: str, host: dict, relu: bool = False, library: bool = True):
        self.ops, self.name, self.relu, self.xp = ops, name, relu, array_module(ops)
        self.out_features, self.in_features = (int(size) for size in host["shape"])
        values = np.ascontiguousarray(host["values"], dtype=np.float32)  # (blocks, r, c)
        self.block_shape = values.shape[1:]
        r, c = self.block_shape
        col_indices, row_pointers = host["col_indices"].astype(np.int64), host["row_pointers"].astype(np.int64)
        self.matrix = None
        if library and ops.name == "scipy":
            import scipy.sparse

            self.matrix = scipy.sparse.bsr_array((values, col_indices, row_pointers), shape=host["shape"])
        elif library and ops.name == "torch" and r == c:  # MKL (torch on the CPU) takes square blocks only
            import torch

            with warnings.catch_warnings():  # "sparse BSR support is in beta": known, and not actionable
                warnings.simplefilter("ignore", UserWarning)
                self.matrix = torch.sparse_bsr_tensor(
                    ops.asarray(row_pointers), ops.asarray(col_indices), ops.asarray(values),
                    size=tuple(host["shape"]), check_invariants=True)
        if self.matrix is None:
            # Each block row padded to the longest with zero blocks: a dense (block rows, most, r, c) product.
            counts = np.diff(row_pointers)
            most = int(counts.max(initial=0))
            padded = np.zeros((len(counts), most, r, c), dtype=np.float32)
            padded_columns = np.zeros((len(counts), most), dtype=np.int64)
            slot = np.arange(len(col_indices)) - np.repeat(row_pointers[:-1], counts)
            block_row = np.repeat(np.arange(len(counts)), counts)
            padded[block_row, slot], padded_columns[block_row, slot] = values, col_indices
            self.blocks, self.block_columns = ops.asarray(padded), ops.asarray(padded_columns)
        self.host_arrays = {"values": values, "col_indices": col_indices, "row_pointers": row_pointers}
        bias = host.get("bias")
        self.bias = None if bias is None else ops.asarray(np.asarray(bias, dtype=np.float32).reshape(-1, 1))

    def __call__(self, x, buffers):
        if self.matrix is not None:
            y = self.matrix @ x
        else:
            r, c = self.block_shape
            slabs = x.reshape(self.in_features // c, c, x.shape[-1])[self.block_columns]  # (rows/r, most, c, N)
            y = self.xp.einsum("kmrc,kmcn->krn", self.blocks, slabs).reshape(self.out_features, x.shape[-1])
        if self.bias is not None:
            y += self.bias
        return self.ops.relu_(y) if self.relu else y

    def host(self) -> dict:
        return {"shape": (self.out_features, self.in_features), **self.host_arrays,
                "bias": None if self.bias is None else self.ops.to_numpy(self.bias).reshape(-1)}

    def held_arrays(self) -> list:
        if self.matrix is None:
            held = [self.blocks, self.block_columns]
        elif self.ops.name == "scipy":
            held = [self.matrix.data, self.matrix.indices, self.matrix.indptr]
        else:
            held = [self.matrix.values(), self.matrix.col_indices(), self.matrix.crow_indices()]
        return held + ([] if self.bias is None else [self.bias])
