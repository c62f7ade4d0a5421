"""Layer kinds of the truly sparse engine: one registry, ``KINDS``, one module per kind.

A kind (``dst.csr.kinds.base.Kind``, or ``WeightedKind`` for one that holds weights) is a
class registered with ``@register`` that knows one step of the layer chain end to end:

    name, modules          its architecture ``"kind"`` value; the torch module types it converts
    default                picked for its modules by default (under layout="auto", a layer's pattern names
                           its kind instead: ``layer.pattern.sparse_kind``)
    describe(module, ...)  -> (architecture entry, host arrays or None): ``dst.csr.convert``
    check(step, host, ..)  untrusted-input checks of both: ``dst.csr.npz.check_model``
    build(ops, group, ..)  its step on a backend's ops; ``absorb`` folds a following ReLU or pool in
    file_entry, file_fields, check_read, from_file
                           its arrays in the ``.npz`` file (``dst.csr.npz``), weighted kinds only
    host_of, held_arrays, active_mask, count
                           a built step read back: saving, ``memory_report``

Built-in kinds: ``conv`` and ``linear`` (CSR, any mask), ``fan_in`` (condensed constant
fan-in), ``bsr`` (block-sparse rows) and the weightless ``relu``, ``maxpool``, ``flatten``.
A new kind is one module here (imported below) plus its tests.
"""

from dst.csr.kinds import bsr, conv, fan_in, linear, plain  # noqa: F401  (each registers its kinds)
from dst.csr.kinds.base import KINDS, Kind, WeightedKind, get_kind, register

__all__ = ["KINDS", "Kind", "WeightedKind", "get_kind", "register"]
