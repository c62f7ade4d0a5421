"""A MaskedNet's layer chain as plain data: the architecture and each layer's CSR arrays.

Every masked Conv2d and Linear becomes a CSR matrix that holds exactly its active
weights: the positions come from the MASK, so an active weight that happens to be
0.0 (a freshly regrown connection) stays as an explicit zero. A conv is the
``(out, in*kh*kw)`` matrix of its im2col product. Biases stay dense; no dense copy
of any weight is kept. ``dst.csr.model.SparseNet`` is built from this data, and
``dst.csr.npz`` writes it to a file.
"""

import numpy as np
import torch
from torch import nn

from dst.engine.masked import MaskedNet
from dst.engine.masked_layers import MaskedConv2d, MaskedLayer, MaskedLinear

SUPPORTED_LAYERS = ("MaskedConv2d", "MaskedLinear", "ReLU", "MaxPool2d", "Flatten", "Dropout", "Identity")


def describe(masked_net: MaskedNet) -> tuple[list[dict], dict[str, dict]]:
    """The layer chain of ``masked_net`` as (architecture, host CSR weights), both plain data.

    The architecture is a JSON-able list of steps; the weights map each masked
    layer's name to numpy arrays ``values`` (float32), ``col_indices``,
    ``row_pointers``, ``bias`` and its 2-D ``shape``, with the structure taken from
    the mask (explicit zeros kept).
    """
    if not isinstance(masked_net, MaskedNet):
        raise TypeError(f"expected a dst.engine.masked.MaskedNet, got {type(masked_net).__name__}")
    architecture, weights = [], {}
    places: dict[int, str] = {}  # id of each masked layer -> where the chain first uses it
    for name, module in _layer_chain(masked_net.net, ""):
        label = f"layer {name or '(the wrapped net)'!r} ({type(module).__name__})"
        if isinstance(module, MaskedLayer) and places.setdefault(id(module), name) != name:
            raise ValueError(f"{label} is the module already used at {places[id(module)]!r}: the truly sparse "
                             "format holds each weight for one place in the chain; give each place its own "
                             "layer, or convert a net without the repeated layer")
        if isinstance(module, MaskedConv2d):
            if (module.groups != 1 or tuple(module.stride) != (1, 1) or tuple(module.dilation) != (1, 1)
                    or module.padding_mode != "zeros" or isinstance(module.padding, str)):
                raise ValueError(f"{label}: the sparse conv supports groups=1, stride 1, dilation 1 and "
                                 f"numeric zero padding, got groups={module.groups}, stride={module.stride}, "
                                 f"dilation={module.dilation}, padding={module.padding!r} "
                                 f"({module.padding_mode})")
            architecture.append({"type": "conv", "name": name, "in_channels": module.in_channels,
                                 "kernel_size": list(module.kernel_size), "padding": list(module.padding)})
            weights[name] = _host_csr(module)
        elif isinstance(module, MaskedLinear):
            architecture.append({"type": "linear", "name": name})
            weights[name] = _host_csr(module)
        elif isinstance(module, nn.ReLU):
            architecture.append({"type": "relu", "name": name})
        elif isinstance(module, nn.MaxPool2d):
            kernel, stride = _pair(module.kernel_size), _pair(module.stride)
            if kernel != stride or _pair(module.padding) != (0, 0) or _pair(module.dilation) != (1, 1) \
                    or module.ceil_mode:
                raise ValueError(f"{label}: the sparse max-pool supports stride == kernel_size, no padding, "
                                 f"dilation 1, floor mode; got kernel_size={module.kernel_size}, "
                                 f"stride={module.stride}, padding={module.padding}")
            architecture.append({"type": "maxpool", "name": name, "kernel_size": list(kernel)})
        elif isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                raise ValueError(f"{label}: only Flatten(start_dim=1, end_dim=-1) is supported")
            architecture.append({"type": "flatten", "name": name})
        elif isinstance(module, (nn.Dropout, nn.Identity)):
            continue  # no-ops at inference
        else:
            raise TypeError(f"cannot convert {label} to the truly sparse format; supported layers are "
                            f"{', '.join(SUPPORTED_LAYERS)}, chained in nn.Sequential containers")
    return architecture, weights


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


def _host_csr(layer: MaskedConv2d | MaskedLinear) -> dict:
    """A masked layer's active weights as numpy CSR arrays, rows = output units."""
    mask = layer.mask_2d()  # (out, in) or (out, in*kh*kw)
    weight = layer.weight.detach().reshape(mask.shape).to(device="cpu", dtype=torch.float32).numpy()
    row_pointers = np.zeros(mask.shape[0] + 1, dtype=np.int64)
    np.cumsum(mask.sum(axis=1), out=row_pointers[1:])
    bias = None if layer.bias is None else layer.bias.detach().to(device="cpu", dtype=torch.float32).numpy()
    return {"shape": mask.shape, "values": weight[mask], "col_indices": np.nonzero(mask)[1],
            "row_pointers": row_pointers, "bias": bias}


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)
