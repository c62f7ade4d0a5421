"""The ``.npz`` file of a truly sparse model: writing it, and reading it as untrusted input.

One file holds a few flat arrays shared by all layers (values, biases, and the
column indices and row pointers grouped by index type) and a JSON header with the
layer chain and each layer's shape and sizes. ``read_npz`` trusts nothing in it:
the archive's members, their types and sizes, the header's schema, and each
layer's CSR structure (indices inside the layer, monotone row pointers, counts
matching the header, conv shapes matching the architecture) are all checked
before a matrix is built, so a crafted file gets a ``ValueError`` instead of
reads outside an array. No array is allocated before its size is checked: each
member's .npy header against the model's header, the member's size in the archive
and what its compressed bytes can hold; the JSON header may nest at most 32
levels (``dst.core.checks.MAX_JSON_DEPTH``). ``check_model`` is the part every
``SparseNet`` runs, whatever built it. Arrays are parsed by hand, never unpickled: no code runs.
"""

import json
import numbers
import os
import zipfile
from pathlib import Path

import numpy as np

from dst.core.checks import load_json
from dst.csr.array_ops import narrowest_dtype

FILE_FORMAT = "dst-truly-sparse-csr-1"
INDEX_TYPES = ("uint8", "uint16", "uint32", "uint64")
UNSIGNED = tuple(np.dtype(name).type for name in INDEX_TYPES)
STEP_TYPES = ("conv", "linear", "relu", "maxpool", "flatten")
# The sparse kernels index rows, columns and entries with int32.
MAX_INDEX = 2**31 - 1
# A conv's index tables are built per column of its (out, in*kh*kw) matrix: 2**24 columns
# (a 128 MiB table) is far above any real conv and keeps a crafted header from asking for more.
MAX_CONV_COLUMNS = 2**24
MAX_WINDOW = 1024  # kernel, padding and pool sizes
MAX_HEADER_BYTES = 2**20
NPY_HEADER_BYTES = 65_546  # the longest header a version-1 .npy member can have
# Deflate's best case is about 1,032 bytes out per byte in: a member claiming more than this times its
# compressed size (plus a little) cannot hold what it claims.
MAX_DEFLATE_RATIO = 1_100


def write_npz(path, architecture: list[dict], host_weights: dict[str, dict], compress: bool = True) -> int:
    """Write the model to ``path`` (zip-deflated unless ``compress=False``); returns the file's size in bytes.

    Each layer's column indices and row pointers are stored in the narrowest unsigned
    type that holds them (uint16 column indices up to 65,536 columns).
    """
    layers, arrays = [], {"values": [], "bias": []}
    for name, host in host_weights.items():
        index_type = np.dtype(narrowest_dtype(host["shape"][1] - 1, UNSIGNED)).name
        pointer_type = np.dtype(narrowest_dtype(host["values"].size, UNSIGNED)).name
        arrays["values"].append(host["values"].astype(np.float32))
        arrays.setdefault(f"col_indices_{index_type}", []).append(host["col_indices"].astype(index_type))
        arrays.setdefault(f"row_pointers_{pointer_type}", []).append(host["row_pointers"].astype(pointer_type))
        if host["bias"] is not None:
            arrays["bias"].append(host["bias"].astype(np.float32))
        layers.append({"name": name, "shape": [int(size) for size in host["shape"]],
                       "nnz": int(host["values"].size), "index_type": index_type, "pointer_type": pointer_type,
                       "bias": host["bias"] is not None})
    header = json.dumps({"format": FILE_FORMAT, "architecture": architecture, "weights": layers})
    flat = {key: np.concatenate(parts) if parts else np.zeros(0, np.float32) for key, parts in arrays.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        (np.savez_compressed if compress else np.savez)(
            file, header=np.frombuffer(header.encode(), dtype=np.uint8), **flat)
    return os.path.getsize(path)


def read_npz(path) -> tuple[list[dict], dict[str, dict]]:
    """(architecture, host weights) read from a file ``write_npz`` wrote; ValueError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as file:
            npy = file.read(6) == b"\x93NUMPY"
        raise ValueError(f"{path} is not a SparseNet file: not a .npz archive"
                         + (" (it is a single .npy array)" if npy else ""))
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{path} is not a SparseNet file: not a readable .npz archive ({error})") from None
    with archive:
        names = archive.namelist()
        files = [name[:-4] for name in names if name.endswith(".npy")]
        if "header" not in files:
            raise ValueError(f"{path} is not a SparseNet file: it has no 'header' array "
                             f"(its arrays: {sorted(files)[:10]})")
        header = _parse_header(_read_member(archive, "header", np.uint8, MAX_HEADER_BYTES, path), path)
        expected = _expected_arrays(header["weights"])
        if sorted(names) != sorted(f"{key}.npy" for key in [*expected, "header"]):
            raise ValueError(f"{path}: the arrays {sorted(names)} are not the ones its header describes "
                             f"({sorted(expected)} and 'header', each a .npy member)")
        # Smallest first, each checked before the next is read: a file whose row pointers or column
        # indices are wrong is refused before its (larger) values are decompressed.
        flat, slices = {}, _layer_slices(header["weights"])
        for kind in ("row_pointers_", "col_indices_", ""):
            for key, (dtype, length) in expected.items():
                if key.startswith(kind) and key not in flat:
                    flat[key] = _read_member(archive, key, dtype, length, path)
            layers = {name: {"shape": shape, "nnz": nnz, **{
                field: flat[key][start:stop] if key in flat else None for field, (key, start, stop) in fields.items()}}
                for name, (shape, nnz, fields) in slices.items()}
            try:
                for name, host in layers.items():
                    if kind == "row_pointers_":
                        _check_row_pointers(name, host)
                    elif kind == "col_indices_":
                        _check_columns(name, host)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from None
    weights = {name: {"shape": host["shape"], "values": host["values"], "bias": host["bias"],
                      "col_indices": host["col_indices"].astype(np.int64),
                      "row_pointers": host["row_pointers"].astype(np.int64)} for name, host in layers.items()}
    try:
        check_model(header["architecture"], weights)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return header["architecture"], weights


def _layer_slices(layers: list[dict]) -> dict[str, tuple]:
    """Per layer: (shape, nnz, {field: (flat array key, start, stop)}) in the flat arrays, in header order."""
    offsets, slices = {}, {}
    for layer in layers:
        rows, nnz = layer["shape"][0], layer["nnz"]
        fields = {}
        for field, key, count in (("values", "values", nnz),
                                  ("col_indices", f"col_indices_{layer['index_type']}", nnz),
                                  ("row_pointers", f"row_pointers_{layer['pointer_type']}", rows + 1),
                                  ("bias", "bias", rows if layer["bias"] else 0)):
            start = offsets.get(key, 0)
            offsets[key] = start + count
            fields[field] = (key, start, start + count)
        if not layer["bias"]:
            fields["bias"] = ("", 0, 0)  # never in flat: None
        slices[layer["name"]] = (tuple(layer["shape"]), nnz, fields)
    return slices


def check_model(architecture: list[dict], weights: dict[str, dict]) -> None:
    """Raise ValueError unless ``architecture`` is a valid layer chain and ``weights`` valid CSR matrices for it."""
    if not isinstance(architecture, list) or not all(isinstance(step, dict) for step in architecture):
        raise ValueError("the architecture must be a list of steps (dicts)")
    layer_names = []
    for index, step in enumerate(architecture):
        kind, where = step.get("type"), f"step {index} of the architecture"
        if kind not in STEP_TYPES:
            raise ValueError(f"{where} has unknown type {kind!r}; valid types are {list(STEP_TYPES)}")
        if kind in ("conv", "linear"):
            name = step.get("name")
            if not isinstance(name, str) or name not in weights:
                raise ValueError(f"{where} ({kind}) names weights {name!r}, which the model does not have")
            layer_names.append(name)
            _check_csr(name, weights[name])
        if kind == "conv":
            _check_ints(step.get("in_channels"), 1, MAX_INDEX, f"{where}: in_channels", 1)
            kh, kw = _check_ints(step.get("kernel_size"), 1, MAX_WINDOW, f"{where}: kernel_size", 2)
            _check_ints(step.get("padding"), 0, MAX_WINDOW, f"{where}: padding", 2)
            columns = step["in_channels"] * kh * kw
            if weights[name]["shape"][1] != columns or columns > MAX_CONV_COLUMNS:
                raise ValueError(f"conv {name!r} has a weight of shape {tuple(weights[name]['shape'])}, but "
                                 f"{step['in_channels']} input channels and a {kh}x{kw} kernel make {columns} "
                                 f"columns (at most {MAX_CONV_COLUMNS:,})")
        elif kind == "maxpool":
            _check_ints(step.get("kernel_size"), 1, MAX_WINDOW, f"{where}: kernel_size", 2)
    if sorted(layer_names) != sorted(weights):
        raise ValueError(f"each weight must be used by exactly one layer: layers use {layer_names}, "
                         f"weights are {sorted(weights)}")


def _check_csr(name: str, host: dict) -> None:
    shape = host.get("shape")
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2
            and all(isinstance(size, numbers.Integral) and 1 <= size <= MAX_INDEX for size in shape)):
        raise ValueError(f"layer {name!r}: shape must be two sizes in [1, {MAX_INDEX}], got {shape!r}")
    rows, columns = shape
    values, col_indices, row_pointers = host["values"], host["col_indices"], host["row_pointers"]
    nnz = len(values)
    if nnz > min(rows * columns, MAX_INDEX) or len(col_indices) != nnz or len(row_pointers) != rows + 1:
        raise ValueError(f"layer {name!r} ({rows}x{columns}): {nnz} values, {len(col_indices)} column indices "
                         f"and {len(row_pointers)} row pointers do not make a CSR matrix")
    _check_row_pointers(name, {**host, "nnz": nnz})
    _check_columns(name, host)
    bias = host.get("bias")
    if bias is not None and len(bias) != rows:
        raise ValueError(f"layer {name!r}: {len(bias)} biases for {rows} rows")
    if not np.all(np.isfinite(values)) or (bias is not None and not np.all(np.isfinite(bias))):
        raise ValueError(f"layer {name!r} holds NaN or infinite weights or biases")


def _check_row_pointers(name: str, host: dict) -> None:
    """Row pointers rising from 0 to the layer's entry count (comparisons, not diff: they may be unsigned)."""
    row_pointers, nnz = host["row_pointers"], host["nnz"]
    if row_pointers[0] != 0 or row_pointers[-1] != nnz or np.any(row_pointers[1:] < row_pointers[:-1]):
        raise ValueError(f"layer {name!r}: row pointers must rise from 0 to its {nnz} entries")


def _check_columns(name: str, host: dict) -> None:
    """Column indices inside the layer and strictly rising within each row (valid row pointers assumed)."""
    col_indices, row_pointers, (_, columns) = host["col_indices"], host["row_pointers"], host["shape"]
    nnz = len(col_indices)
    if nnz and (col_indices.min() < 0 or col_indices.max() >= columns):
        raise ValueError(f"layer {name!r}: column indices must lie in [0, {columns}), got "
                         f"[{col_indices.min()}, {col_indices.max()}]")
    row_starts = np.zeros(max(nnz - 1, 0), dtype=bool)  # entry k+1 begins a row: no order with entry k
    starts = np.asarray(row_pointers[1:-1], dtype=np.int64)
    row_starts[starts[(starts > 0) & (starts < nnz)] - 1] = True
    if not np.all((col_indices[1:] > col_indices[:-1]) | row_starts):
        raise ValueError(f"layer {name!r}: column indices must rise strictly within each row")


def _check_ints(value, low: int, high: int, what: str, count: int):
    items = value if isinstance(value, list) else [value]
    if len(items) != count or not all(isinstance(item, numbers.Integral) and not isinstance(item, bool)
                                      and low <= item <= high for item in items):
        raise ValueError(f"{what} must be {count} int(s) in [{low}, {high}], got {value!r}")
    return items


def _parse_header(raw: np.ndarray, path: Path) -> dict:
    try:
        header = load_json(raw.tobytes().decode())
    except (UnicodeDecodeError, ValueError) as error:  # invalid JSON, nested too deep, a 5,000-digit number
        raise ValueError(f"{path}: the header is not valid JSON ({error})") from None
    if not isinstance(header, dict) or header.get("format") != FILE_FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise ValueError(f"{path} is not a {FILE_FORMAT} file (format {found!r})")
    layers = header.get("weights")
    if not isinstance(header.get("architecture"), list) or not isinstance(layers, list):
        raise ValueError(f"{path}: the header needs an 'architecture' list and a 'weights' list")
    for layer in layers:
        if not (isinstance(layer, dict) and isinstance(layer.get("name"), str)
                and layer.get("index_type") in INDEX_TYPES and layer.get("pointer_type") in INDEX_TYPES
                and isinstance(layer.get("bias"), bool) and isinstance(layer.get("shape"), list)):
            raise ValueError(f"{path}: malformed layer entry {str(layer)[:200]}")
        _check_ints(layer["shape"], 1, MAX_INDEX, f"{path}: shape of layer {layer['name']!r}", 2)
        _check_ints(layer.get("nnz"), 0, MAX_INDEX, f"{path}: nnz of layer {layer['name']!r}", 1)
    if len({layer["name"] for layer in layers}) != len(layers):
        raise ValueError(f"{path}: layer names repeat in the header")
    return header


def _expected_arrays(layers: list[dict]) -> dict[str, tuple[str, int]]:
    """Each flat array the header implies: its dtype and length."""
    expected = {"values": ("float32", 0), "bias": ("float32", 0)}
    for layer in layers:
        rows, nnz = layer["shape"][0], layer["nnz"]
        for key, dtype, length in (("values", "float32", nnz), ("bias", "float32", rows if layer["bias"] else 0),
                                   (f"col_indices_{layer['index_type']}", layer["index_type"], nnz),
                                   (f"row_pointers_{layer['pointer_type']}", layer["pointer_type"], rows + 1)):
            expected[key] = (dtype, expected.get(key, (dtype, 0))[1] + length)
    return expected


def _read_member(archive: zipfile.ZipFile, key: str, dtype, length: int, path: Path) -> np.ndarray:
    """One array of the archive (``length`` entries of ``dtype``; at most ``length`` for the header).

    Before anything is allocated, the .npy header's shape and dtype are checked against what the
    model's header expects, and that size against the member's: its size in the archive's
    directory, and what its compressed bytes can hold (deflate expands at most about 1,032x).
    The data is then read straight into the array, and must be exactly that long.
    """
    dtype = np.dtype(dtype)
    info = archive.getinfo(f"{key}.npy")
    if info.file_size > length * dtype.itemsize + NPY_HEADER_BYTES:
        raise ValueError(f"{path}: array {key!r} is larger than its header says")
    problem = f"{path}: array {key!r} must be a 1-D {dtype.name} .npy of {length} entries"
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f".npy format version {version}")
            shape, fortran_order, stored = read_header(member)
        except (ValueError, SyntaxError, TypeError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"{problem}; its .npy header is unreadable ({error})") from None
        if stored != dtype or len(shape) != 1 or (shape[0] != length if key != "header" else shape[0] > length):
            raise ValueError(f"{problem}, got {stored} of shape {shape}")
        expected_bytes = shape[0] * dtype.itemsize
        holds = info.file_size - member.tell()
        most = info.compress_size if info.compress_type == zipfile.ZIP_STORED else \
            MAX_DEFLATE_RATIO * info.compress_size + 2**16
        if holds != expected_bytes or expected_bytes > most:
            raise ValueError(f"{problem}: its data holds {min(holds, most)} bytes, not {expected_bytes}")
        array = np.empty(shape[0], dtype=dtype)
        view, received = memoryview(array).cast("B"), 0
        try:
            while received < expected_bytes:
                count = member.readinto(view[received:received + 2**20])
                if not count:
                    break
                received += count
            extra = member.read(1)
        except (zipfile.BadZipFile, OSError, EOFError) as error:  # a bad CRC, a truncated stream
            raise ValueError(f"{path}: array {key!r} is corrupt ({error})") from None
    if received != expected_bytes or extra:
        raise ValueError(f"{problem}: its data holds {'more than' if extra else received} bytes, not "
                         f"{expected_bytes}")
    return array
