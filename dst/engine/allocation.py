"""How a global sparsity target is split across layers.

``uniform`` gives every layer the global sparsity (the seed's choice). ``erk``
(Erdős–Rényi-Kernel, Evci et al. 2020, "Rigging the Lottery") makes a layer's
density proportional to ``sum(shape) / prod(shape)``, so small layers (the
first conv, the classifier) keep more of their weights and the large hidden
matrices carry most of the sparsity. Both meet the target on the total weight
count, up to rounding each layer to a whole number of weights.

``keep_dense`` keeps the first and/or last layer (or any named layers) dense, as
much of the literature does, and spreads what the target still allows over the
others, so a net with dense ends has the same number of weights as one without.

A very sparse mask can cut a network off from part of its input or output:
uniform at 99 % gives LeNet-300-100's 100->10 output layer 10 weights, so several
classes get no incoming connection at all. ``connectivity`` counts such units and
``MaskedNet`` warns (``DisconnectedWarning``) when its masks leave any.
"""

import math
import numbers
import warnings
from collections.abc import Collection, Mapping, Sequence

import torch


def uniform_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Every layer at the global density."""
    return {name: density for name in shapes}


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel densities whose weighted mean is ``density``.

    A layer whose ERK density would exceed 1 is made dense and the remaining
    budget is spread over the other layers again, until none overflows. A layer
    with no weights (a zero in its shape) has nothing to keep: density 1.
    """
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / sizes[name] for name, shape in shapes.items() if sizes[name] > 0}
    budget = density * sum(sizes.values())
    dense: set[str] = {name for name in shapes if sizes[name] == 0}
    while True:
        sparse_names = [name for name in shapes if name not in dense]
        if not sparse_names:
            break
        remaining = budget - sum(sizes[name] for name in dense)
        scale = remaining / sum(raw[name] * sizes[name] for name in sparse_names)
        overflowing = {name for name in sparse_names if scale * raw[name] > 1.0}
        if not overflowing:
            break
        dense |= overflowing
    return {name: 1.0 if name in dense else min(1.0, scale * raw[name]) for name in shapes}


ALLOCATIONS = {"uniform": uniform_densities, "erk": erk_densities}


def check_allocation(allocation) -> None:
    """Raise ``ValueError`` listing ``ALLOCATIONS`` unless ``allocation`` is one of their names (a string)."""
    if not isinstance(allocation, str) or allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; choose one of {sorted(ALLOCATIONS)} (a string)")


def layer_densities(shapes: Mapping[str, Sequence[int]], sparsity: float,
                    allocation: str = "uniform", keep_dense: str | Collection[str] = ()) -> dict[str, float]:
    """Per-layer density (fraction of weights kept) for a global ``sparsity``.

    ``keep_dense``: "first", "last" (in the order of ``shapes``), layer names, or a
    collection of these; those layers keep every weight and the others share the rest
    of the budget by ``allocation``, so the total still meets ``sparsity``.
    """
    check_allocation(allocation)
    check_sparsity(sparsity)
    dense = dense_layer_names(list(shapes), keep_dense)
    if not dense:
        return ALLOCATIONS[allocation](shapes, 1.0 - sparsity)
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    rest = {name: shape for name, shape in shapes.items() if name not in dense}
    budget = (1.0 - sparsity) * sum(sizes.values()) - sum(sizes[name] for name in dense)
    rest_size = sum(sizes[name] for name in rest)
    if budget <= 0 and rest_size > 0:
        raise ValueError(f"keep_dense={sorted(dense)} already keeps {sum(sizes[n] for n in dense):,} weights, "
                         f"at least the {(1.0 - sparsity) * sum(sizes.values()):,.0f} that sparsity={sparsity} "
                         "allows in all; lower the sparsity or keep fewer layers dense")
    rest_density = 1.0 if rest_size == 0 else min(1.0, budget / rest_size)
    densities = ALLOCATIONS[allocation](rest, rest_density) if rest else {}
    return {name: 1.0 if name in dense else densities[name] for name in shapes}


def dense_layer_names(names: Sequence[str], keep_dense: str | Collection[str]) -> set[str]:
    """The layer names ``keep_dense`` selects ("first" and "last" in the order of ``names``)."""
    requested = {keep_dense} if isinstance(keep_dense, str) else set(keep_dense)
    valid = {"first", "last", *names}
    unknown = requested - valid
    if unknown:
        raise ValueError(f"keep_dense has unknown layer(s) {sorted(unknown)}; choose from 'first', 'last' "
                         f"or the layer names {list(names)}")
    positions = {"first": names[:1], "last": names[-1:]}
    return {name for item in requested for name in positions.get(item, [item])}


def check_sparsity(sparsity: float) -> None:
    """Raise unless ``sparsity`` is a real number in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"sparsity must be a float in [0, 1), got {type(sparsity).__name__}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (0 = dense, 0.95 = 95% zeros), got {sparsity}")


def active_count(numel: int, density: float) -> int:
    """Whole number of weights kept at ``density``; at least one so no layer is cut off (none of none)."""
    return max(min(1, numel), min(numel, round(density * numel)))


class DisconnectedWarning(UserWarning):
    """A mask leaves a network output unit or an input feature without any connection."""


def connectivity(layers: Mapping[str, torch.nn.Module]) -> dict[str, int | str]:
    """How many of the network's inputs and outputs the masks leave without any connection.

    ``layers`` are masked layers in forward order (``MaskedNet.masked_layers()``): the
    first one's input features (columns; input channels for a convolution) and the
    last one's output units (rows) are counted. An output unit with no incoming weight
    outputs only its bias, so its class can hardly be predicted; an unused input feature
    (a pixel) is ignored by the whole net.
    """
    (first_name, first), (last_name, last) = next(iter(layers.items())), list(layers.items())[-1]
    groups = getattr(first, "groups", 1)
    # (out, in/groups, ...) -> (groups, out/groups, in/groups, positions): input channel c of group g
    # is connected if any output of group g uses it at any kernel position.
    grouped = first.mask.reshape(groups, first.mask.shape[0] // groups, first.mask.shape[1], -1)
    inputs_used = grouped.any(dim=3).any(dim=1)
    outputs_fed = last.mask.reshape(last.mask.shape[0], -1).any(dim=1)
    return {"first_layer": first_name, "inputs": inputs_used.numel(),
            "unconnected_inputs": int((~inputs_used).sum()),
            "last_layer": last_name, "outputs": outputs_fed.numel(),
            "unconnected_outputs": int((~outputs_fed).sum())}


def disconnection_message(report: Mapping[str, int | str]) -> str | None:
    """The warning text for a ``connectivity`` report, or None when every input and output is connected."""
    parts = []
    if report["unconnected_outputs"]:
        parts.append(f"{report['unconnected_outputs']} of the {report['outputs']} output units of "
                     f"{report['last_layer']!r} without any incoming connection (they output only their bias)")
    if report["unconnected_inputs"]:
        parts.append(f"{report['unconnected_inputs']} of the {report['inputs']} input features of "
                     f"{report['first_layer']!r} without any connection (no weight reads them)")
    if not parts:
        return None
    return ("The sparse masks leave " + "; ".join(parts) + ". More weights in these layers (allocation='erk', "
            "keep_dense='first'/'last') or a lower sparsity would connect them; DST may regrow connections to "
            "them during training, a static mask never will.")


def warn_if_disconnected(layers: Mapping[str, torch.nn.Module], stacklevel: int = 2) -> dict[str, int | str]:
    """Warn (``DisconnectedWarning``) if the masks leave an input or output unconnected; returns the report."""
    report = connectivity(layers)
    message = disconnection_message(report)
    if message:
        warnings.warn(message, DisconnectedWarning, stacklevel=stacklevel + 1)
    return report
