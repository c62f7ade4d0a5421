"""Simulated sparsity: weight layers whose weights are multiplied by a mask.

This is how nearly every DST paper is implemented: the weights stay a dense
tensor, a boolean mask says which of them exist, and the forward pass uses
``weight * mask``. The mask makes the gradient of every inactive weight exactly
zero, and the stored weight is kept exactly zero wherever the mask is off, so
the network really is the sparse network it claims to be. It saves nothing:
the dense weight, the mask and a dense product are all still there, plus the
masking itself on every forward and backward pass.

``MaskedNet`` masks every trainable Conv1d/2d/3d and Linear, subclasses included
when they keep the base class's forward. A masked layer takes over the original
layer's weight and bias objects, so ``requires_grad``, weight tying and a module
used at several places all survive: a shared module is wrapped once and stays
shared, and a weight tied to another module (an embedding and an output layer
sharing one matrix) keeps one weight and one mask. Weights nothing masks (an
embedding, attention's input projection, recurrent layers, frozen layers) stay
dense: ``MaskedNet`` warns with the list (``skipped_weights()``), and its
sparsity figures cover the masked layers only.

Why subclasses and not ``torch.nn.utils.parametrize``: a training step costs the
same with either (``python -m benchmarks.masking_cost``), while a parametrization
renames every weight in the ``state_dict`` (``parametrizations.weight.original``),
cannot be pickled as a whole model, and makes ``layer.weight`` a computed tensor
instead of the Parameter that optimizers and DST index their state by.
"""

import contextlib
import copy
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parameter import UninitializedParameter
from torch.utils.weak import WeakIdKeyDictionary

from dst.allocation import active_count, check_sparsity, layer_densities, warn_if_disconnected
from dst.optimizer_state import register_masked_weight

# MultiheadAttention passes out_proj.weight to its functional form instead of calling
# out_proj: the mask then acts on that weight's gradient only (see MaskedLayer.mask_gradient).
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention,)
# Weight objects whose gradient hook is registered. Hooks are not copied with a weight (deepcopy,
# pickle), and a copy is a new object, absent from this weak index, so watch() hooks it again.
_GRADIENT_HOOKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


class MaskedLayer(nn.Module):
    """Mix-in for a layer that owns ``mask``: a boolean buffer shaped like its weight.

    ``mask[i]`` True means weight ``i`` is an active connection; False means it
    does not exist (its stored value and its gradient are exactly zero).
    """

    mask: torch.Tensor
    # While False the forward uses the raw weight: identical outputs (inactive weights
    # are zero) but gradients for every position, which RigL's regrowth needs.
    apply_mask: bool = True
    # True when something besides this layer's forward reads the weight (an embedding tied
    # to it, MultiheadAttention reading out_proj.weight): a hook then masks the weight's
    # gradient too. Off otherwise: a pass over the gradient on every backward made a SimpleNet
    # training step 8% slower (benchmarks/masking_cost.py).
    mask_gradient: bool = False

    def take_over(self, layer: nn.Module, mask: torch.Tensor, mask_gradient: bool = False) -> "MaskedLayer":
        """Hold ``layer``'s own weight and bias objects (ties and ``requires_grad`` kept), then mask them."""
        self.weight, self.bias = layer.weight, layer.bias
        self.train(layer.training)
        self.mask_gradient = mask_gradient
        self.init_mask(mask)
        return self

    def init_mask(self, mask: torch.Tensor) -> None:
        """Register ``mask`` as this layer's buffer and zero the weights it switches off."""
        self.register_buffer("mask", mask.to(device=self.weight.device, dtype=torch.bool))
        with torch.no_grad():
            self.weight.masked_fill_(~self.mask, 0.0)  # not mul_: inf * 0 would leave a NaN
        self.watch()

    def watch(self) -> None:
        """Let optimizers find this layer's mask, and hook the gradient if ``mask_gradient``; idempotent."""
        register_masked_weight(self.weight, self)
        if self.mask_gradient and self.weight.requires_grad and self.weight not in _GRADIENT_HOOKED:
            self.weight.register_hook(self._masked_gradient)
            _GRADIENT_HOOKED[self.weight] = True

    def _masked_gradient(self, gradient: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, gradient, 0.0) if self.apply_mask else gradient

    def __setstate__(self, state: dict) -> None:
        # A deep copy or an unpickled layer holds new weight objects: register them again.
        super().__setstate__(state)
        self.watch()

    def masked_weight(self) -> torch.Tensor:
        # where() reads the bool mask directly; weight * mask would first convert it to float,
        # costing an extra pass over every weight in the forward and again in the backward.
        return torch.where(self.mask, self.weight, 0.0) if self.apply_mask else self.weight

    @property
    def active_count(self) -> int:
        return int(self.mask.sum())

    def mask_2d(self) -> np.ndarray:
        """A copy of the mask as a 2-D boolean array: (out, in) for linear, (out, in*kh*kw) for conv.

        A copy, not a view: on the CPU ``.numpy()`` shares memory with the live buffer, so a
        snapshot kept for later (one per epoch, say) would silently follow every DST step.
        """
        return self.mask.reshape(self.mask.shape[0], -1).cpu().numpy().copy()


class MaskedLinear(nn.Linear, MaskedLayer):
    """``nn.Linear`` with a weight mask."""

    @classmethod
    def from_dense(cls, layer: nn.Linear, mask: torch.Tensor, mask_gradient: bool = False) -> "MaskedLinear":
        masked = cls(layer.in_features, layer.out_features, bias=layer.bias is not None,
                     device="meta", dtype=layer.weight.dtype)  # meta: its own tensors are replaced at once
        return masked.take_over(layer, mask, mask_gradient)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


class _MaskedConv(MaskedLayer):
    """What the masked Conv1d, Conv2d and Conv3d share (listed first in their bases, so its forward wins)."""

    @classmethod
    def from_dense(cls, layer: nn.Module, mask: torch.Tensor, mask_gradient: bool = False) -> "_MaskedConv":
        masked = cls(layer.in_channels, layer.out_channels, layer.kernel_size,
                     stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                     groups=layer.groups, bias=layer.bias is not None, padding_mode=layer.padding_mode,
                     device="meta", dtype=layer.weight.dtype)
        return masked.take_over(layer, mask, mask_gradient)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


class MaskedConv1d(_MaskedConv, nn.Conv1d):
    """``nn.Conv1d`` with a weight mask."""


class MaskedConv2d(_MaskedConv, nn.Conv2d):
    """``nn.Conv2d`` with a weight mask."""


class MaskedConv3d(_MaskedConv, nn.Conv3d):
    """``nn.Conv3d`` with a weight mask."""


_MASKED_TYPES = {nn.Linear: MaskedLinear, nn.Conv1d: MaskedConv1d, nn.Conv2d: MaskedConv2d,
                 nn.Conv3d: MaskedConv3d}


def masked_type(module: nn.Module) -> type | None:
    """The masked class for ``module``: one of its base types whose forward it keeps, else None."""
    for base, masked in _MASKED_TYPES.items():
        if isinstance(module, base) and not isinstance(module, MaskedLayer):
            keeps = type(module).forward is base.forward and getattr(type(module), "_conv_forward", None) is \
                getattr(base, "_conv_forward", None)
            return masked if keeps else None
    return None


def random_mask(shape: torch.Size, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean mask with exactly ``active_count(numel, density)`` True entries at random places."""
    numel = math.prod(shape)
    order = torch.randperm(numel, generator=generator)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[order[:active_count(numel, density)]] = True
    return mask.reshape(shape)


class MaskedNet(nn.Module):
    """A copy of ``base_net`` with every trainable Conv1d/2d/3d and Linear replaced by a masked layer.

    Args:
        base_net: any module; it is deep-copied, never changed.
        sparsity: global fraction of the masked layers' weights (biases excluded) that are zero, in [0, 1).
        allocation: how the sparsity is split across layers: "uniform" or "erk".
        scale_init: multiply each layer's copied weights by ``1/sqrt(density)``.
            A layer that keeps 5% of its inputs otherwise starts with activations
            ~4.5x too small (the init was scaled for the dense fan-in), and deep
            sparse nets then train slowly; this is the sparse fan-in init.
        generator: random source for the masks (default: torch's global one).
        keep_dense: "first" and/or "last" masked layer, or layer names, kept dense; the others share the
            rest of the budget (see ``dst.allocation.layer_densities``).

    Layers that are frozen (``requires_grad=False`` weight) stay dense and out of
    DST; any other weight left unmasked is listed in a warning and by ``skipped_weights()``.
    A ``DisconnectedWarning`` says when the masks leave an output unit of the last masked
    layer, or an input feature of the first, without any connection.
    """

    def __init__(self, base_net: nn.Module, sparsity: float = 0.95, allocation: str = "uniform",
                 scale_init: bool = True, generator: torch.Generator | None = None,
                 keep_dense: str | tuple[str, ...] = ()):
        super().__init__()
        check_sparsity(sparsity)
        if not isinstance(base_net, nn.Module):
            raise TypeError(f"base_net must be a torch.nn.Module, got {type(base_net).__name__}")
        net = copy.deepcopy(base_net)
        targets = {name: module for name, module in net.named_modules() if _is_target(module)}
        # One mask per weight object: of several layers holding one (tied) weight, the first is masked
        # and the others read the stored weight, whose inactive entries are zero.
        owners: dict[int, str] = {}
        for name, module in targets.items():
            owners.setdefault(id(module.weight), name)
        targets = {name: targets[name] for name in owners.values()}
        if not targets:
            raise ValueError(f"{type(base_net).__name__} has no nn.Conv2d or nn.Linear layer to mask (MaskedNet "
                             "masks trainable Conv1d/2d/3d and Linear layers, subclasses that keep their forward "
                             f"included); weights found: {_describe(_skipped(net, set()))}")
        densities = layer_densities({name: tuple(m.weight.shape) for name, m in targets.items()},
                                    sparsity, allocation, keep_dense)
        read_elsewhere = _weights_read_outside_forward(net, targets)
        replacements = {}
        for name, module in targets.items():
            mask = random_mask(module.weight.shape, densities[name], generator)
            if scale_init:
                with torch.no_grad():
                    module.weight.mul_(1.0 / math.sqrt(densities[name]))
            replacements[id(module)] = masked_type(module).from_dense(
                module, mask, mask_gradient=id(module.weight) in read_elsewhere)
        self.net = _replace_modules(net, replacements)
        # On the wrapped net, so that loading it directly (a dense checkpoint of the base model) runs it too.
        self.net.register_load_state_dict_post_hook(_after_load)
        warn_if_disconnected(self.masked_layers(), stacklevel=3)
        skipped = self.skipped_weights()
        if skipped:
            warnings.warn(f"MaskedNet leaves {sum(s['numel'] for s in skipped.values()):,} weights dense: "
                          f"{_describe(skipped)}. Its sparsity figures cover the masked layers only "
                          "(see skipped_weights(), global_sparsity(all_weights=True)).", stacklevel=2)

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)

    def masked_layers(self) -> dict[str, MaskedLayer]:
        """The masked layers by name (relative to the wrapped net), in forward order.

        A layer used at several places is listed once, under its first name.
        """
        return {name: module for name, module in self.net.named_modules()
                if isinstance(module, MaskedLayer)}

    def skipped_weights(self) -> dict[str, dict]:
        """Weights (parameters of 2+ dimensions) no mask covers: ``{name: {'module', 'shape', 'numel', 'reason'}}``."""
        return _skipped(self.net, {id(layer.weight) for layer in self.masked_layers().values()})

    def get_sparsity_stats(self) -> dict[str, dict]:
        """Per masked layer: ``{'sparsity': fraction zero, 'zeros': count, 'total': count}``."""
        stats = {}
        for name, layer in self.masked_layers().items():
            total = layer.mask.numel()
            zeros = total - layer.active_count
            stats[name] = {"sparsity": zeros / total, "zeros": zeros, "total": total}
        return stats

    def global_sparsity(self, all_weights: bool = False) -> float:
        """Fraction of the masked layers' weights that are inactive.

        ``all_weights=True`` divides by every weight instead, counting those no mask
        covers (``skipped_weights()``) as dense.
        """
        stats = self.get_sparsity_stats().values()
        total = sum(s["total"] for s in stats)
        if all_weights:
            total += sum(s["numel"] for s in self.skipped_weights().values())
        return sum(s["zeros"] for s in stats) / total

    def get_masks_as_2d(self) -> dict[str, np.ndarray]:
        """A snapshot of each layer's mask as a 2-D boolean numpy array (conv as (out, in*kh*kw))."""
        return {name: layer.mask_2d() for name, layer in self.masked_layers().items()}

    @contextlib.contextmanager
    def masks_bypassed(self):
        """Within this block the forward skips the mask multiply (same outputs, dense gradients)."""
        layers = list(self.masked_layers().values())
        for layer in layers:
            layer.apply_mask = False
        try:
            yield self
        finally:
            for layer in layers:
                layer.apply_mask = True


def _after_load(net: nn.Module, incompatible_keys) -> None:
    """load_state_dict's post hook: it runs once every layer has loaded, so that a checkpoint of dense weights
    (strict=False), or a tied module loaded after its masked owner, cannot leave values where the mask says
    no weight exists. ``assign=True`` brings new weight objects: they are registered again."""
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, MaskedLayer):
                layer.weight.masked_fill_(~layer.mask, 0.0)
                layer.watch()


def _is_target(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (masked_type(module) is not None and not isinstance(weight, UninitializedParameter)
            and weight.requires_grad and weight.numel() > 0)


def _weights_read_outside_forward(net: nn.Module, targets: dict[str, nn.Module]) -> set[int]:
    """ids of the targets' weights that something other than the target's forward reads."""
    target_ids = {id(module) for module in targets.values()}
    weight_ids = {id(module.weight) for module in targets.values()}
    read = set()
    for module in net.modules():
        if isinstance(module, _READS_CHILD_WEIGHTS):
            read |= {id(child.weight) for child in module.children() if id(child) in target_ids}
        if id(module) not in target_ids:  # a tied embedding, or another layer holding the weight
            read |= {id(param) for param in module.parameters(recurse=False) if id(param) in weight_ids}
    return read


def _replace_modules(net: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """``net`` with every reference to a replaced module swapped, however many places hold it."""
    if id(net) in replacements:
        return replacements[id(net)]
    for parent in list(net.modules()):
        # _modules, not named_children(): that lists a child held under two names only once.
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    return net


def _skipped(net: nn.Module, covered: set[int]) -> dict[str, dict]:
    skipped, seen = {}, set(covered)
    for module_name, module in net.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            lazy = isinstance(param, UninitializedParameter)
            if id(param) in seen or (not lazy and (param.ndim < 2 or param.numel() == 0)):
                continue
            seen.add(id(param))
            if lazy:
                reason = "not initialised yet (a lazy layer): run one forward pass before wrapping"
            elif not param.requires_grad:
                reason = "frozen (requires_grad=False), so left out of DST"
            elif isinstance(module, tuple(_MASKED_TYPES)):
                reason = f"{type(module).__name__} has its own forward, which a masked layer would replace"
            else:
                reason = f"MaskedNet does not mask {type(module).__name__} weights"
            skipped[f"{module_name}.{param_name}" if module_name else param_name] = {
                "module": type(module).__name__, "shape": None if lazy else list(param.shape),
                "numel": 0 if lazy else param.numel(), "reason": reason}
    return skipped


def _describe(skipped: dict[str, dict]) -> str:
    if not skipped:
        return "none"
    return "; ".join(f"{name} ({info['module']}, {info['numel']:,} weights): {info['reason']}"
                     for name, info in skipped.items())
