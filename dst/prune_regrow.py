"""The DST topology update: prune the weakest active weights, regrow as many elsewhere.

Regrowth criteria (``REGROW``):
- ``"random"`` (SET, Mocanu et al. 2018): new connections at uniformly random
  inactive positions.
- ``"gradient"`` (RigL, Evci et al. 2020): the inactive positions whose dense
  loss gradient is largest in magnitude, from a batch the caller provides.

Both start regrown weights at exactly zero. RigL does so by design; the
original SET drew them from the init distribution, but a random value injected
into a trained net changes its function at once (the loss jumps after every
update), while a zero leaves the function unchanged and lets the next gradient
steps decide what the connection is worth.

Candidates for regrowth are the positions inactive *before* the step, so a
weight pruned now is not regrown in the same step and the update really moves
``pruned`` connections.
"""

import numbers
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from dst.masked import MaskedLayer, MaskedNet

Batch = tuple[torch.Tensor, torch.Tensor]

# Every optimizer that has stepped a parameter, so apply_dst_step can reset the
# optimizer state of changed connections even when the caller does not pass the
# optimizer (the seed notebook calls apply_dst_step(masked_net, prune_ratio=0.1)).
# Filled by a public torch hook that runs after every optimizer.step().
_OPTIMIZERS_BY_PARAM: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _remember_optimizer(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            seen = _OPTIMIZERS_BY_PARAM.get(param)
            if seen is None:
                seen = _OPTIMIZERS_BY_PARAM[param] = weakref.WeakSet()
            seen.add(optimizer)


register_optimizer_step_post_hook(_remember_optimizer)


@dataclass(frozen=True)
class LayerUpdate:
    """What one DST step did to one layer (counts of weights)."""

    active: int
    pruned: int
    regrown: int


def regrow_random(candidates: torch.Tensor, count: int, gradient: torch.Tensor | None,
                  generator: torch.Generator | None) -> torch.Tensor:
    """``count`` flat indices drawn uniformly from the True entries of ``candidates``."""
    pool = candidates.nonzero().squeeze(1)
    order = torch.randperm(pool.numel(), generator=generator).to(pool.device)
    return pool[order[:count]]


def regrow_gradient(candidates: torch.Tensor, count: int, gradient: torch.Tensor | None,
                    generator: torch.Generator | None) -> torch.Tensor:
    """Flat indices of the ``count`` candidates with the largest gradient magnitude."""
    scores = gradient.abs().masked_fill(~candidates, -1.0)
    return torch.topk(scores, count, sorted=False).indices


REGROW = {"random": regrow_random, "gradient": regrow_gradient}


def dense_gradients(masked_net: MaskedNet, batch: Batch,
                    loss_fn: Callable = F.cross_entropy) -> dict[str, torch.Tensor]:
    """Loss gradient for every weight position, active or not, on one batch.

    The forward skips the mask multiply (same outputs: inactive weights are
    zero), so the gradient is dense. ``.grad`` attributes are left untouched.
    """
    inputs, targets = batch
    device = next(masked_net.parameters()).device
    layers = masked_net.masked_layers()
    with torch.enable_grad(), masked_net.masks_bypassed():
        loss = loss_fn(masked_net(inputs.to(device)), targets.to(device))
        grads = torch.autograd.grad(loss, [layer.weight for layer in layers.values()])
    return dict(zip(layers, grads))


def reset_optimizer_state(optimizers: Iterable[torch.optim.Optimizer], param: torch.Tensor,
                          flat_indices: torch.Tensor) -> None:
    """Zero every per-weight state tensor (momentum, Adam moments) at ``flat_indices``."""
    for optimizer in optimizers:
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.view(-1)[flat_indices] = 0


def _update_layer(layer: MaskedLayer, prune_ratio: float, regrow: str, gradient: torch.Tensor | None,
                  optimizers: set, generator: torch.Generator | None) -> LayerUpdate:
    mask = layer.mask.view(-1)
    active = int(mask.sum())
    inactive = mask.numel() - active
    count = min(round(prune_ratio * active), inactive)
    if count == 0:
        return LayerUpdate(active=active, pruned=0, regrown=0)
    weight = layer.weight.detach().view(-1)
    magnitudes = weight.abs().masked_fill(~mask, float("inf"))
    pruned = torch.topk(magnitudes, count, largest=False, sorted=False).indices
    flat_gradient = None if gradient is None else gradient.reshape(-1)
    regrown = REGROW[regrow](~mask, count, flat_gradient, generator)
    with torch.no_grad():
        mask[pruned] = False
        mask[regrown] = True
        changed = torch.cat([pruned, regrown])
        weight[changed] = 0.0
    reset_optimizer_state(optimizers, layer.weight, changed)
    return LayerUpdate(active=int(mask.sum()), pruned=count, regrown=count)


def apply_dst_step(masked_net: MaskedNet, prune_ratio: float = 0.1, regrow: str = "random",
                   batch: Batch | None = None, loss_fn: Callable = F.cross_entropy,
                   optimizer: torch.optim.Optimizer | None = None,
                   generator: torch.Generator | None = None,
                   gradients: dict[str, torch.Tensor] | None = None) -> dict[str, LayerUpdate]:
    """One prune-and-regrow step on every masked layer; returns a report per layer.

    Each layer prunes ``round(prune_ratio * active)`` of its active weights with
    the smallest magnitude and regrows the same number (fewer only if the layer
    has fewer inactive positions), so its active count stays exactly constant.
    Pruned and regrown weights are set to zero and their optimizer state
    (momentum, Adam moments) is reset in ``optimizer`` and in every optimizer
    that has stepped the layer, so no optimizer revives a pruned weight.

    Args:
        prune_ratio: fraction of each layer's active weights to move, in [0, 1].
        regrow: "random" (SET) or "gradient" (RigL; needs ``batch``).
        batch: (inputs, targets) for the gradient criterion.
        generator: random source for "random" regrowth (default: torch's global one).
        gradients: precomputed dense gradients by layer name (as in ``masked_layers()``)
            for "gradient" regrowth, used instead of computing them from ``batch``;
            ``dst.distributed`` passes the gradient all-reduced over every rank's batch.
    """
    if not isinstance(masked_net, MaskedNet):
        raise TypeError(f"apply_dst_step needs a MaskedNet, got {type(masked_net).__name__}; "
                        "wrap the model first: MaskedNet(model, sparsity=...)")
    check_prune_ratio(prune_ratio)
    if regrow not in REGROW:
        raise ValueError(f"unknown regrow method {regrow!r}; choose one of {sorted(REGROW)}")
    if regrow == "gradient" and gradients is None:
        if batch is None:
            raise ValueError("regrow='gradient' (RigL) needs batch=(inputs, targets) to compute gradients")
        gradients = dense_gradients(masked_net, batch, loss_fn)
    elif regrow == "gradient":
        _check_gradients(masked_net, gradients)
    else:
        gradients = {}
    report = {}
    for name, layer in masked_net.masked_layers().items():
        optimizers = set(_OPTIMIZERS_BY_PARAM.get(layer.weight, ()))
        if optimizer is not None:
            optimizers.add(optimizer)
        report[name] = _update_layer(layer, prune_ratio, regrow, gradients.get(name), optimizers, generator)
    return report


def _check_gradients(masked_net: MaskedNet, gradients: dict[str, torch.Tensor]) -> None:
    for name, layer in masked_net.masked_layers().items():
        if name not in gradients:
            raise ValueError(f"gradients has no entry for masked layer {name!r}; it needs one per layer: "
                             f"{list(masked_net.masked_layers())}")
        if gradients[name].shape != layer.weight.shape:
            raise ValueError(f"gradients[{name!r}] has shape {tuple(gradients[name].shape)}, "
                             f"the layer's weight {tuple(layer.weight.shape)}")


def check_prune_ratio(prune_ratio: float) -> None:
    """Raise unless ``prune_ratio`` is a number in [0, 1]."""
    if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, numbers.Real):
        raise TypeError(f"prune_ratio must be a float in [0, 1], got {type(prune_ratio).__name__}")
    if not 0.0 <= prune_ratio <= 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1] (fraction of active weights moved), got {prune_ratio}")
