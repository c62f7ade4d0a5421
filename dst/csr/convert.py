"""A MaskedNet's layer chain as plain data: the architecture and each weighted layer's host arrays.

Each layer is described by its kind (``dst.csr.kinds``): a masked Conv2d or Linear becomes
a CSR matrix by default (``conv``, ``linear``), a masked Linear may also become a condensed
constant fan-in layer (``fan_in``) or a block-sparse one (``bsr``), as ``layout`` says. The
positions always come from the MASK, so an active weight that happens to be 0.0 (a freshly
regrown connection) stays as an explicit zero. Biases stay dense; no dense copy of any
weight is kept. ``dst.csr.model.SparseNet`` is built from this data, and ``dst.csr.npz``
writes it to a file.
"""

from torch import nn

from dst.csr.kinds import KINDS
from dst.engine.masked import MaskedNet
from dst.engine.masked_layers import MaskedLayer

SKIPPED_LAYERS = (nn.Dropout, nn.Identity)  # no-ops at inference
# The generic "unstructured" name for each weighted module's default (CSR) kind.
CSR = "csr"


def supported_layers() -> tuple[str, ...]:
    """Names of the module types the registered kinds convert, and of those skipped."""
    names = {module.__name__ for kind in KINDS.values() for module in kind.modules}
    return tuple(sorted(names)) + tuple(module.__name__ for module in SKIPPED_LAYERS)


def describe(masked_net: MaskedNet, layout="auto") -> tuple[list[dict], dict[str, dict]]:
    """The layer chain of ``masked_net`` as (architecture, host weights), both plain data.

    The architecture is a JSON-able list of steps, each with its ``"kind"``; the weights map
    each masked layer's name to its kind's numpy arrays (``dst.csr.kinds``), with the structure
    taken from the mask (explicit zeros kept). ``layout`` picks each weighted layer's kind:
    "auto" takes the kind the layer's ``pattern`` names (its ``sparse_kind``: fan_in and N:M ->
    ``fan_in``, blocks -> ``bsr`` with their block shape, unstructured -> CSR; CSR too where that
    kind does not convert the layer, a conv under fan_in), "csr" or a kind name applies to every masked layer that
    kind converts (the others, convs for fan_in and bsr, stay CSR), a dict maps layer names to
    either (layers it leaves out are "auto"; a kind it names must convert that layer). A kind may come with its
    options as ``(name, {option: value})``, e.g. ``("bsr", {"block_shape": (4, 4)})``. ValueError
    where a layer's mask does not fit the kind asked for.
    """
    if not isinstance(masked_net, MaskedNet):
        raise TypeError(f"expected a dst.engine.masked.MaskedNet, got {type(masked_net).__name__}")
    choices = _check_layout(layout, masked_net)
    architecture, weights = [], {}
    places: dict[int, str] = {}  # id of each masked layer -> where the chain first uses it
    for name, module in _layer_chain(masked_net.net, ""):
        label = f"layer {name or '(the wrapped net)'!r} ({type(module).__name__})"
        if isinstance(module, MaskedLayer) and places.setdefault(id(module), name) != name:
            raise ValueError(f"{label} is the module already used at {places[id(module)]!r}: the truly sparse "
                             "format holds each weight for one place in the chain; give each place its own "
                             "layer, or convert a net without the repeated layer")
        if isinstance(module, SKIPPED_LAYERS):
            continue
        by_name = isinstance(choices, dict)
        kind, options = _kind_for(module, choices.get(name, "auto") if by_name else choices, label, by_name)
        # The layer's pattern goes along: a kind may read its options there (bsr its block shape).
        step, host = kind.describe(module, name, label, pattern=getattr(module, "pattern", None), **options)
        architecture.append(step)
        if host is not None:
            weights[name] = host
    return architecture, weights


def _check_layout(layout, masked_net: MaskedNet):
    """``layout`` validated up front: kind names that exist, dict keys that name masked layers."""
    if isinstance(layout, dict):
        unknown = sorted(set(layout) - set(masked_net.masked_layers()))
        if unknown:
            raise ValueError(f"layout names {unknown}, which are not masked layers of this net "
                             f"({sorted(masked_net.masked_layers())})")
        for choice in layout.values():
            _parse_choice(choice)
    else:
        _parse_choice(layout)
    return layout


def _parse_choice(choice) -> tuple[str, dict]:
    """A layout value as (kind name, "auto" or "csr"; its options); ValueError listing the choices."""
    if isinstance(choice, (tuple, list)) and len(choice) == 2 and isinstance(choice[1], dict):
        name, options = choice
    else:
        name, options = choice, {}
    structured = sorted(kind.name for kind in KINDS.values() if kind.weighted and not kind.default)
    if not isinstance(name, str) or name not in ("auto", CSR, *structured):
        raise ValueError(f"unknown layout {choice!r}: choose 'auto', {CSR!r} or one of {structured} (a name, "
                         "or (name, options)), or a dict of those by layer name")
    return name, dict(options)


def _kind_for(module: nn.Module, choice, label: str, strict: bool):
    """(the kind that describes ``module``, its options) under the layout ``choice``; ``strict``: a kind
    that does not convert ``module`` is an error (else the module's default kind)."""
    defaults = [kind for kind in KINDS.values() if kind.default and isinstance(module, kind.modules)]
    if not isinstance(module, MaskedLayer):
        if not defaults:
            raise TypeError(f"cannot convert {label} to the truly sparse format; supported layers are "
                            f"{', '.join(supported_layers())}, chained in nn.Sequential containers")
        return defaults[0], {}
    name, options = _parse_choice(choice)
    if not defaults:
        raise TypeError(f"cannot convert {label}: no layer kind converts {type(module).__name__}")
    if name == "auto":
        chosen = KINDS.get(getattr(module, "pattern", None).sparse_kind)
        if chosen is None or not isinstance(module, chosen.modules):  # CSR, or a kind for other modules
            return defaults[0], {}
        return chosen, {}
    if name == CSR:
        return defaults[0], {}
    kind = KINDS[name]
    if not isinstance(module, kind.modules):
        if not strict:
            return defaults[0], {}
        raise ValueError(f"{label}: kind {name!r} converts {[m.__name__ for m in kind.modules]} only")
    return kind, options


def _layer_chain(module: nn.Module, prefix: str):
    """Leaf layers in forward (call) order: nn.Sequential containers (with their own forward) are walked.

    Every place is listed, a module held twice (one nn.ReLU() instance reused) at each of them:
    ``_modules``, which nn.Sequential's forward runs, not ``named_children()``, which lists it once.
    """
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        for child_name, child in module._modules.items():
            if child is not None:
                yield from _layer_chain(child, f"{prefix}.{child_name}" if prefix else child_name)
    else:
        yield prefix, module

