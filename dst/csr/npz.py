"""The ``.npz`` file of a truly sparse model: writing it, and reading it as untrusted input.

One file holds a few flat arrays shared by all layers (``values``, ``bias``, and the
``col_indices_<type>`` and ``row_pointers_<type>`` families, one per unsigned index type) and a
JSON header with the layer chain (each step with its ``"kind"``) and each weighted layer's
entry: its shape, whether it has a bias, and what its kind (``dst.csr.kinds``) stores, from
which the length of each of its slices follows. ``read_npz`` trusts nothing in it: the
archive's members, their types and sizes, the header's schema, and each layer's structure
(indices inside the layer, monotone row pointers, counts matching the header, conv shapes
matching the architecture) are all checked before a matrix is built, so a crafted file gets a
``ValueError`` instead of reads outside an array. No array is allocated before its size is
checked: each member's .npy header against the model's header, the member's size in the
archive and what its compressed bytes can hold; the JSON header may nest at most 32 levels
(``dst.core.checks.MAX_JSON_DEPTH``). ``check_model`` is the part every ``SparseNet`` runs,
whatever built it. Arrays are parsed by hand, never unpickled: no code runs.

Format 2 names each step's kind under ``"kind"`` (format 1 said ``"type"``, and knew CSR layers
only); a format-1 file is refused with a message that says to convert the net again.
"""

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from dst.core.checks import load_json
from dst.csr.kinds import KINDS, get_kind
from dst.csr.kinds.base import MAX_INDEX, check_ints

FILE_FORMAT = "dst-truly-sparse-csr-2"
OLD_FORMATS = ("dst-truly-sparse-csr-1",)
MAX_HEADER_BYTES = 2**20
NPY_HEADER_BYTES = 65_546  # the longest header a version-1 .npy member can have
# Deflate's best case is about 1,032 bytes out per byte in: a member claiming more than this times its
# compressed size (plus a little) cannot hold what it claims.
MAX_DEFLATE_RATIO = 1_100
# Members are read family by family, each family's slices checked before the next is read: a file whose
# row pointers or column indices are wrong is refused before its (larger) values are decompressed.
FAMILIES = ("row_pointers_", "col_indices_", "")


def write_npz(path, architecture: list[dict], host_weights: dict[str, dict], compress: bool = True) -> int:
    """Write the model to ``path`` (zip-deflated unless ``compress=False``); returns the file's size in bytes.

    Each layer's indices are stored in the narrowest unsigned type that holds them (uint16
    column indices up to 65,536 columns).
    """
    kinds = {step["name"]: KINDS[step["kind"]] for step in architecture if KINDS[step["kind"]].weighted}
    layers, arrays = [], {"values": [], "bias": []}
    for name, host in host_weights.items():
        entry, parts = kinds[name].file_entry(host)
        for key, part in parts.items():
            arrays.setdefault(key, []).append(part)
        if host["bias"] is not None:
            arrays["bias"].append(host["bias"].astype(np.float32))
        layers.append({"name": name, "shape": [int(size) for size in host["shape"]],
                       "bias": host["bias"] is not None, **entry})
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
        kinds, fields = header["kinds"], header["fields"]
        expected = _expected_arrays(fields)
        if sorted(names) != sorted(f"{key}.npy" for key in [*expected, "header"]):
            raise ValueError(f"{path}: the arrays {sorted(names)} are not the ones its header describes "
                             f"({sorted(expected)} and 'header', each a .npy member)")
        flat, slices = {}, _layer_slices(fields)
        entries = {entry["name"]: entry for entry in header["weights"]}
        for family in FAMILIES:
            for key, (dtype, length) in expected.items():
                if key.startswith(family) and key not in flat:
                    flat[key] = _read_member(archive, key, dtype, length, path)
            layers = {name: {"shape": tuple(entries[name]["shape"]), "entry": entries[name], **{
                field: flat[key][start:stop] if key in flat else None for field, (key, start, stop) in spans.items()}}
                for name, spans in slices.items()}
            try:
                for name, host in layers.items():
                    kinds[name].check_read(name, host, family)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from None
    weights = {name: kinds[name].from_file(entries[name], host) for name, host in layers.items()}
    try:
        check_model(header["architecture"], weights)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return header["architecture"], weights


def _layer_slices(fields: dict[str, dict]) -> dict[str, dict]:
    """Per layer: {field: (flat array key, start, stop)} in the flat arrays, in header order."""
    offsets, slices = {}, {}
    for name, layer_fields in fields.items():
        slices[name] = {}
        for field, (key, _, length) in layer_fields.items():
            start = offsets.get(key, 0)
            offsets[key] = start + length
            slices[name][field] = (key, start, start + length)
        if "bias" not in layer_fields:
            slices[name]["bias"] = ("", 0, 0)  # never in flat: None
    return slices


def check_model(architecture: list[dict], weights: dict[str, dict]) -> None:
    """Raise ValueError unless ``architecture`` is a valid layer chain and ``weights`` valid arrays for it."""
    if not isinstance(architecture, list) or not all(isinstance(step, dict) for step in architecture):
        raise ValueError("the architecture must be a list of steps (dicts)")
    layer_names = []
    for index, step in enumerate(architecture):
        where = f"step {index} of the architecture"
        if "kind" not in step and "type" in step:
            raise ValueError(f"{where} names its kind under 'type', as format 1 files did: convert the masked "
                             f"net again (SparseNet.from_masked) and save it in format {FILE_FORMAT!r}")
        kind = get_kind(step.get("kind"), where)
        host = None
        if kind.weighted:
            name = step.get("name")
            if not isinstance(name, str) or name not in weights:
                raise ValueError(f"{where} ({kind.name}) names weights {name!r}, which the model does not have")
            layer_names.append(name)
            host = weights[name]
        kind.check(step, host, where)
    if sorted(layer_names) != sorted(weights):
        raise ValueError(f"each weight must be used by exactly one layer: layers use {layer_names}, "
                         f"weights are {sorted(weights)}")


def _parse_header(raw: np.ndarray, path: Path) -> dict:
    """The header, its schema checked; adds ``kinds`` and ``fields`` (each weighted layer's kind and the
    slices its entry implies)."""
    try:
        header = load_json(raw.tobytes().decode())
    except (UnicodeDecodeError, ValueError) as error:  # invalid JSON, nested too deep, a 5,000-digit number
        raise ValueError(f"{path}: the header is not valid JSON ({error})") from None
    if not isinstance(header, dict) or header.get("format") != FILE_FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        if found in OLD_FORMATS:
            raise ValueError(f"{path} is a {found} file, an earlier format this version does not read: convert "
                             f"the masked net again (SparseNet.from_masked) and save it as {FILE_FORMAT}")
        raise ValueError(f"{path} is not a {FILE_FORMAT} file (format {found!r})")
    layers, architecture = header.get("weights"), header.get("architecture")
    if not isinstance(architecture, list) or not isinstance(layers, list):
        raise ValueError(f"{path}: the header needs an 'architecture' list and a 'weights' list")
    steps = {step.get("name"): step.get("kind") for step in architecture if isinstance(step, dict)}
    header["kinds"], header["fields"] = {}, {}
    for layer in layers:
        if not (isinstance(layer, dict) and isinstance(layer.get("name"), str)
                and isinstance(layer.get("bias"), bool) and isinstance(layer.get("shape"), list)):
            raise ValueError(f"{path}: malformed layer entry {str(layer)[:200]}")
        name = layer["name"]
        check_ints(layer["shape"], 1, MAX_INDEX, f"{path}: shape of layer {name!r}", 2)
        kind = KINDS.get(steps.get(name)) if isinstance(steps.get(name), str) else None
        if kind is None or not kind.weighted:
            raise ValueError(f"{path}: layer entry {name!r} is not a weighted step of the architecture")
        if name in header["kinds"]:
            raise ValueError(f"{path}: layer names repeat in the header")
        header["kinds"][name] = kind
        fields = dict(kind.file_fields(layer, str(path)))
        if layer["bias"]:
            fields["bias"] = ("bias", "float32", layer["shape"][0])
        header["fields"][name] = fields
    return header


def _expected_arrays(fields: dict[str, dict]) -> dict[str, tuple[str, int]]:
    """Each flat array the header implies: its dtype and length."""
    expected = {"values": ("float32", 0), "bias": ("float32", 0)}
    for layer_fields in fields.values():
        for key, dtype, length in layer_fields.values():
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
