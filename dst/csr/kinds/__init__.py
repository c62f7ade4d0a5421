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
A new kind is one module here plus its tests (and a ``<name>_kernels`` module if it brings numba
kernels): every module of this package is imported below, and each registers its kinds; the
``*_kernels`` modules are left to the numba steps that need them, so numba stays optional.
"""

import importlib
import pkgutil

from dst.csr.kinds.base import KINDS, Kind, WeightedKind, get_kind, register

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.endswith("_kernels"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["KINDS", "Kind", "WeightedKind", "get_kind", "register"]
