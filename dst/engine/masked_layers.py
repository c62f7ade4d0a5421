"""Masked layers: a Conv1d/2d/3d or Linear that owns a boolean mask over its weight.

This is how nearly every DST paper is implemented: the weights stay a dense
tensor, a boolean mask says which of them exist, the gradient of every inactive
weight is made exactly zero, and the stored weight is kept exactly zero wherever
the mask is off, so the network really is the sparse network it claims to be.
It saves nothing: the dense weight, the mask and dense products are all still
there, plus the masking itself on every training step. ``dst.engine.masked.MASKING``
names the two ways to apply the mask (``where(mask, weight, 0)`` in every
forward, or on the gradient only); both compute the same network.

Each layer registers its weight with ``dst.engine.optimizer_state`` when it is built,
copied or loaded (``MaskedLayer.watch``), so that optimizers keep their state of
inactive weights at zero. ``dst.engine.masked.MaskedNet`` puts these layers into a model.

Why subclasses and not ``torch.nn.utils.parametrize``: a training step costs the
same with either (``python -m benchmarks.training_step``), while a parametrization
renames every weight in the ``state_dict`` (``parametrizations.weight.original``),
cannot be pickled as a whole model, and makes ``layer.weight`` a computed tensor
instead of the Parameter that optimizers and DST index their state by.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from dst.engine.optimizer_state import register_masked_weight
from dst.engine.patterns.unstructured import Unstructured

# Weight objects whose gradient hook is registered. Hooks are not copied with a weight (deepcopy,
# pickle), and a copy is a new object, absent from this weak index, so watch() hooks it again.
_GRADIENT_HOOKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


class MaskedLayer(nn.Module):
    """Mix-in for a layer that owns ``mask``: a boolean buffer shaped like its weight.

    ``mask[i]`` True means weight ``i`` is an active connection; False means it
    does not exist (its stored value and its gradient are exactly zero).
    """

    mask: torch.Tensor
    # While False neither the forward nor the gradient is masked: identical outputs (inactive
    # weights are zero) but gradients for every position, which RigL's regrowth needs.
    apply_mask: bool = True
    # True inside MaskedNet.masks_bypassed(): a gradient pass that is not training (RigL's dense gradient,
    # a user's probe), which a MomentumTracker neither records nor masks.
    bypassed: bool = False
    # Whether a hook masks the weight's gradient: always in MaskedNet's "gradient" masking, and in
    # "forward" masking when something besides this layer's forward reads the weight (an embedding
    # tied to it, MultiheadAttention reading out_proj.weight).
    mask_gradient: bool = False
    # Whether the forward computes with torch.where(mask, weight, 0) ("forward" masking) or with the
    # weight as stored ("gradient" masking), whose inactive entries every code path holds at zero.
    mask_in_forward: bool = True
    # The sparsity pattern its mask follows (dst.engine.patterns); MaskedNet sets it, DST steps keep it.
    pattern = Unstructured()

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
        """Register the weight with ``dst.engine.optimizer_state`` (the first registration installs its optimizer
        step hooks), and hook the gradient if ``mask_gradient``; idempotent."""
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
        return torch.where(self.mask, self.weight, 0.0) if self.apply_mask and self.mask_in_forward else self.weight

    @property
    def active_count(self) -> int:
        return int(self.mask.sum())

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """The (out, in) matrix the mask is read as: (out, in*kh*kw) for a conv (``mask_2d``'s shape, no copy)."""
        return matrix_shape(self.mask.shape)

    def mask_2d(self) -> np.ndarray:
        """A copy of the mask as a 2-D boolean array: (out, in) for linear, (out, in*kh*kw) for conv.

        A copy, not a view: on the CPU ``.numpy()`` shares memory with the live buffer, so a
        snapshot kept for later (one per epoch, say) would silently follow every DST step.
        """
        return self.mask.reshape(self.mask.shape[0], -1).cpu().numpy().copy()


def matrix_shape(shape) -> tuple[int, int]:
    """A weight's shape as the 2-D matrix masks and patterns read: (out, in), a conv's (out, in*kh*kw)."""
    return int(shape[0]), math.prod(shape[1:])


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


MASKED_TYPES = {nn.Linear: MaskedLinear, nn.Conv1d: MaskedConv1d, nn.Conv2d: MaskedConv2d,
                 nn.Conv3d: MaskedConv3d}


def masked_type(module: nn.Module) -> type | None:
    """The masked class for ``module``: one of its base types whose forward it keeps, else None."""
    for base, masked in MASKED_TYPES.items():
        if isinstance(module, base) and not isinstance(module, MaskedLayer):
            keeps = type(module).forward is base.forward and getattr(type(module), "_conv_forward", None) is \
                getattr(base, "_conv_forward", None)
            return masked if keeps else None
    return None


