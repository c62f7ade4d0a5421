"""The momentum of every weight of a masked net, inactive ones included: what sparse momentum regrows by.

``MomentumTracker`` keeps ``m = beta * m + gradient`` of each trainable masked layer's
*dense* weight gradient (SGD's momentum buffer without the weight-decay term, which is
zero at inactive positions anyway). It gets the gradient at positions whose weight does
not exist the way sparse_learning does: the layers' forwards skip the mask (the same
outputs, since inactive weights are zero) so the dense gradient reaches the weights, and
a hook then zeroes it at inactive positions before the optimizer sees it, so inactive
weights and their optimizer state stay exactly zero. It costs a dense weight gradient
every step. Under DDP each rank's tracker sees its own batches (hooks run before DDP
averages); ``average_over_ranks`` makes them the momentum of the averaged gradients.
"""

import torch
import torch.distributed as dist

from dst.engine.masked import MaskedLayer, MaskedNet
from dst.engine.process_group import collective_device


class MomentumTracker:
    """Exponential average of each trainable masked layer's dense gradient, by layer name.

    While it is open the layers' forwards skip the mask multiply and a hook on each
    weight records the dense gradient, then masks it. ``close()`` restores both.
    """

    def __init__(self, masked_net: MaskedNet, beta: float = 0.9):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1) (the momentum's decay), got {beta}")
        self.beta = beta
        self.layers = {name: layer for name, layer in masked_net.masked_layers().items()
                       if layer.weight.requires_grad}
        self.momentum = {name: torch.zeros_like(layer.weight, memory_format=torch.contiguous_format)
                         for name, layer in self.layers.items()}
        self._handles = []
        for name, layer in self.layers.items():
            layer.apply_mask = False
            self._handles.append(layer.weight.register_hook(self._recorder(name, layer)))

    def _recorder(self, name: str, layer: MaskedLayer):
        def record(gradient: torch.Tensor) -> torch.Tensor:
            if layer.bypassed:  # a dense gradient pass (RigL's, a probe), not a training step
                return gradient
            self.momentum[name].mul_(self.beta).add_(gradient)
            return torch.where(layer.mask, gradient, 0.0)
        return record

    def close(self) -> None:
        """Remove the hooks and mask the forwards again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self.layers.values():
            layer.apply_mask = True


def average_over_ranks(tracker: MomentumTracker) -> None:
    """Replace every rank's momentum with the mean over the ranks (one all-reduce for all layers)."""
    momentum = list(tracker.momentum.values())
    flat = torch.cat([value.reshape(-1) for value in momentum]).to(collective_device())
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for value, chunk in zip(momentum, flat.split([value.numel() for value in momentum]), strict=True):
        value.copy_(chunk.view_as(value))
