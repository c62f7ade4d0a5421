"""What a layer kind is: the ``Kind`` base classes, the ``KINDS`` registry and the checks kinds share.

A kind is one step of a truly sparse model's layer chain, known end to end by one class:
how it is described from a torch module (``describe``), how its architecture entry and
host arrays are checked as untrusted input (``check``), how it runs on a backend
(``build``), which following steps fold into it (``absorb``), and, for a weighted kind,
how it is written to and read from the ``.npz`` file and read back from a built step.
``register`` adds a kind's class to ``KINDS`` under its ``name`` (one instance each);
``dst.csr.convert``, ``dst.csr.npz`` and ``dst.csr.model`` only ever look kinds up there.
"""

import numbers

import numpy as np
import torch

# The sparse kernels index rows, columns and entries with int32.
MAX_INDEX = 2**31 - 1
MAX_WINDOW = 1024  # kernel, padding, pool and block sizes

KINDS: dict[str, "Kind"] = {}


def register(kind_class: type) -> type:
    """Class decorator: add one instance of ``kind_class`` to ``KINDS`` under its ``name``."""
    if kind_class.name in KINDS:
        raise ValueError(f"a layer kind named {kind_class.name!r} is already registered")
    KINDS[kind_class.name] = kind_class()
    return kind_class


def get_kind(name, where: str = "the architecture") -> "Kind":
    """The registered kind called ``name``; ValueError listing the valid kinds otherwise."""
    if not isinstance(name, str) or name not in KINDS:
        raise ValueError(f"{where} has unknown kind {name!r}; valid kinds are {sorted(KINDS)}")
    return KINDS[name]


class Kind:
    """A weightless step (ReLU, max-pool, flatten): described from a module, checked, built."""

    name: str = ""
    weighted = False
    modules: tuple[type, ...] = ()  # the torch module types this kind converts
    default = True  # the kind ``describe`` picks for its modules when no layout asks for another
    takes_images = False  # its input must be (C, H, W, N): the probe input is then images

    def describe(self, module, name: str, label: str, **options) -> tuple[dict, dict | None]:
        """(architecture entry, host arrays or None) for ``module`` at place ``name``; ``label`` names it in errors."""
        return {"kind": self.name, "name": name}, None

    def check(self, step: dict, host: dict | None, where: str) -> None:
        """Raise ValueError unless ``step`` (and ``host``, for a weighted kind) are valid: untrusted input."""

    def build(self, ops, group: dict, host: dict | None):
        """The step that runs ``group`` (the architecture entry plus what folded into it) on ``ops``."""
        raise NotImplementedError

    def absorb(self, group: dict, step: dict) -> bool:
        """Fold the following architecture entry ``step`` into ``group`` if it can; whether it did."""
        return False


class WeightedKind(Kind):
    """A kind that holds weights: it also writes and reads its arrays in the ``.npz`` file.

    Host arrays are numpy and always carry ``shape`` (the mask's 2-D ``(out, in)`` shape) and
    ``bias`` (float32 ``(out,)`` or None). The file stores each kind's arrays in flat members
    shared by all layers (``values``, ``bias``, ``col_indices_<type>``, ``row_pointers_<type>``),
    read in that member family order: ``row_pointers_``, then ``col_indices_``, then the rest, each
    family checked (``check_read``) before the next is read.
    """

    weighted = True

    def absorb(self, group: dict, step: dict) -> bool:
        if step["kind"] == "relu":
            group["relu"] = True
            return True
        return False

    # --- file
    def file_entry(self, host: dict) -> tuple[dict, dict[str, np.ndarray]]:
        """(the header's entry for this layer beyond name, shape and bias; its arrays by flat member key)."""
        raise NotImplementedError

    def file_fields(self, entry: dict, where: str) -> dict[str, tuple[str, str, int]]:
        """Each host field the header ``entry`` implies: (flat member key, dtype, length); ValueError for a
        malformed entry. Lengths must follow from the header alone: nothing is read before they are checked."""
        raise NotImplementedError

    def check_read(self, name: str, host: dict, family: str) -> None:
        """Check the arrays of member ``family`` ("row_pointers_", "col_indices_") just read into ``host``."""

    def from_file(self, entry: dict, host: dict) -> dict:
        """The host arrays as ``describe`` makes them, from the flat slices read (``host``)."""
        return host

    # --- a built step
    def host_of(self, ops, step) -> dict:
        """The host arrays of a built step (``describe``'s format)."""
        return step.host()

    def held_arrays(self, ops, step) -> list:
        """Every array the built step holds for its layer (weights, indices, bias, tables)."""
        return step.held_arrays()

    def active_mask(self, host: dict) -> np.ndarray:
        """The boolean ``(out, in)`` mask of the positions ``host`` stores."""
        raise NotImplementedError

    def count(self, host: dict) -> int:
        """Stored weights: an active weight that is 0.0 still counts."""
        return int(host["values"].size)


# ----------------------------------------------------------------------------- shared checks

def check_ints(value, low: int, high: int, what: str, count: int):
    """``value``: ``count`` ints in [low, high] (a list when count > 1); returns them as a list."""
    items = value if isinstance(value, list) else [value]
    if len(items) != count or not all(isinstance(item, numbers.Integral) and not isinstance(item, bool)
                                      and low <= item <= high for item in items):
        raise ValueError(f"{what} must be {count} int(s) in [{low}, {high}], got {value!r}")
    return items


def check_shape(name: str, host: dict) -> tuple[int, int]:
    """The host's ``(out, in)`` shape, two sizes in [1, MAX_INDEX]."""
    shape = host.get("shape")
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2
            and all(isinstance(size, numbers.Integral) and 1 <= size <= MAX_INDEX for size in shape)):
        raise ValueError(f"layer {name!r}: shape must be two sizes in [1, {MAX_INDEX}], got {shape!r}")
    return int(shape[0]), int(shape[1])


def check_values_and_bias(name: str, host: dict, rows: int) -> None:
    """A bias of one value per row (or None), and only finite weights and biases."""
    bias, values = host.get("bias"), host["values"]
    if bias is not None and (not isinstance(bias, np.ndarray) or bias.shape != (rows,)):
        raise ValueError(f"layer {name!r}: {getattr(bias, 'shape', bias)} biases for {rows} rows")
    if not np.all(np.isfinite(values)) or (bias is not None and not np.all(np.isfinite(bias))):
        raise ValueError(f"layer {name!r} holds NaN or infinite weights or biases")


def host_weight(layer) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A masked layer's (mask (out, in'), weight (out, in') float32, bias or None) as numpy, in' = in*kh*kw."""
    mask = layer.mask_2d()
    weight = layer.weight.detach().reshape(mask.shape).to(device="cpu", dtype=torch.float32).numpy()
    bias = None if layer.bias is None else layer.bias.detach().to(device="cpu", dtype=torch.float32).numpy()
    return mask, weight, bias


class FeaturesStep:
    """What every step of a weighted kind on ``(in, N)`` features shares: its sizes and the input check."""

    name: str
    in_features: int
    out_features: int

    def prepare(self, shape):
        if len(shape) != 2 or shape[0] != self.in_features:
            raise ValueError(f"layer {self.name!r} expects (N, {self.in_features}) features, got activations "
                             f"of shape {(shape[-1], *shape[:-1])} (is a Flatten missing?)")
        return (self.out_features, shape[1]), None


class KeptOutputStep(FeaturesStep):
    """A compiled (numba) step that writes into an output buffer kept per input shape, passed to its call."""

    def prepare(self, shape):
        out_shape, _ = super().prepare(shape)
        return out_shape, np.empty(out_shape, dtype=np.float32)


def array_module(ops):
    """The numpy-like module of ``ops``: numpy or cupy, or torch for the torch backend (same calls used here)."""
    return torch if ops.xp is None else ops.xp
