"""Simulated sparsity: Conv2d and Linear layers whose weights are multiplied by a mask.

This is how nearly every DST paper is implemented: the weights stay a dense
tensor, a boolean mask says which of them exist, and the forward pass uses
``weight * mask``. The mask makes the gradient of every inactive weight exactly
zero, and the stored weight is kept exactly zero wherever the mask is off, so
the network really is the sparse network it claims to be. It saves nothing:
the dense weight, the mask and a dense product are all still there, plus the
masking itself on every forward and backward pass.
"""

import contextlib
import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dst.allocation import active_count, check_sparsity, layer_densities


class MaskedLayer(nn.Module):
    """Mix-in for a layer that owns ``mask``: a boolean buffer shaped like its weight.

    ``mask[i]`` True means weight ``i`` is an active connection; False means it
    does not exist (its stored value and its gradient are exactly zero).
    """

    mask: torch.Tensor
    # While False the forward uses the raw weight: identical outputs (inactive
    # weights are zero) but gradients for every position, which RigL's regrowth needs.
    apply_mask: bool = True

    def init_mask(self, mask: torch.Tensor) -> None:
        self.register_buffer("mask", mask.to(device=self.weight.device, dtype=torch.bool))
        with torch.no_grad():
            self.weight.mul_(self.mask)

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
    def from_dense(cls, layer: nn.Linear, mask: torch.Tensor) -> "MaskedLinear":
        masked = cls(layer.in_features, layer.out_features, bias=layer.bias is not None,
                     device=layer.weight.device, dtype=layer.weight.dtype)
        masked.load_state_dict(layer.state_dict())
        masked.init_mask(mask)
        return masked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


class MaskedConv2d(nn.Conv2d, MaskedLayer):
    """``nn.Conv2d`` with a weight mask."""

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, mask: torch.Tensor) -> "MaskedConv2d":
        masked = cls(layer.in_channels, layer.out_channels, layer.kernel_size,
                     stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                     groups=layer.groups, bias=layer.bias is not None,
                     padding_mode=layer.padding_mode,
                     device=layer.weight.device, dtype=layer.weight.dtype)
        masked.load_state_dict(layer.state_dict())
        masked.init_mask(mask)
        return masked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


_MASKED_TYPES = {nn.Linear: MaskedLinear, nn.Conv2d: MaskedConv2d}


def random_mask(shape: torch.Size, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean mask with exactly ``active_count(numel, density)`` True entries at random places."""
    numel = math.prod(shape)
    order = torch.randperm(numel, generator=generator)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[order[:active_count(numel, density)]] = True
    return mask.reshape(shape)


class MaskedNet(nn.Module):
    """A copy of ``base_net`` with every Conv2d and Linear replaced by a masked layer.

    Args:
        base_net: any module; it is deep-copied, never changed.
        sparsity: global fraction of weights (biases excluded) that are zero, in [0, 1).
        allocation: how the sparsity is split across layers: "uniform" or "erk".
        scale_init: multiply each layer's copied weights by ``1/sqrt(density)``.
            A layer that keeps 5% of its inputs otherwise starts with activations
            ~4.5x too small (the init was scaled for the dense fan-in), and deep
            sparse nets then train slowly; this is the sparse fan-in init.
        generator: random source for the masks (default: torch's global one).
    """

    def __init__(self, base_net: nn.Module, sparsity: float = 0.95, allocation: str = "uniform",
                 scale_init: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        check_sparsity(sparsity)
        if not isinstance(base_net, nn.Module):
            raise TypeError(f"base_net must be a torch.nn.Module, got {type(base_net).__name__}")
        self.net = copy.deepcopy(base_net)
        targets = {name: module for name, module in self.net.named_modules()
                   if type(module) in _MASKED_TYPES}
        if not targets:
            raise ValueError(f"{type(base_net).__name__} has no nn.Conv2d or nn.Linear layer to mask")
        densities = layer_densities({name: tuple(m.weight.shape) for name, m in targets.items()},
                                    sparsity, allocation)
        for name, module in targets.items():
            mask = random_mask(module.weight.shape, densities[name], generator)
            masked = _MASKED_TYPES[type(module)].from_dense(module, mask)
            if scale_init:
                with torch.no_grad():
                    masked.weight.mul_(1.0 / math.sqrt(densities[name]))
            parent_name, _, child_name = name.rpartition(".")
            setattr(self.net.get_submodule(parent_name), child_name, masked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def masked_layers(self) -> dict[str, MaskedLayer]:
        """The masked layers by name (relative to the wrapped net), in forward order."""
        return {name: module for name, module in self.net.named_modules()
                if isinstance(module, MaskedLayer)}

    def get_sparsity_stats(self) -> dict[str, dict]:
        """Per layer: ``{'sparsity': fraction zero, 'zeros': count, 'total': count}``."""
        stats = {}
        for name, layer in self.masked_layers().items():
            total = layer.mask.numel()
            zeros = total - layer.active_count
            stats[name] = {"sparsity": zeros / total, "zeros": zeros, "total": total}
        return stats

    def global_sparsity(self) -> float:
        """Fraction of all masked weights that are inactive."""
        stats = self.get_sparsity_stats().values()
        return sum(s["zeros"] for s in stats) / sum(s["total"] for s in stats)

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
