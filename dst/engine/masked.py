"""Simulated sparsity for a whole model: ``MaskedNet`` masks every trainable Conv1d/2d/3d and Linear.

The masked layers themselves (a layer owning a boolean mask buffer) are in
``dst.engine.masked_layers``; this module puts them into any model and sizes their masks.

``MaskedNet`` masks every trainable Conv1d/2d/3d and Linear, subclasses included
when they keep the base class's forward. A masked layer takes over the original
layer's weight and bias objects, so ``requires_grad``, weight tying and a module
used at several places all survive: a shared module is wrapped once and stays
shared, and a weight tied to another module (an embedding and an output layer
sharing one matrix) keeps one weight and one mask. Weights nothing masks (an
embedding, attention's input projection, recurrent layers, frozen layers) stay
dense: ``MaskedNet`` warns with the list (``skipped_weights()``), and its
sparsity figures cover the masked layers only.
"""

import contextlib
import copy
import math
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from dst.engine.allocation import check_sparsity, layer_densities, warn_if_disconnected
from dst.engine.masked_layers import MASKED_TYPES, MaskedLayer, masked_type, matrix_shape
from dst.engine.optimizer_state import optimizers_of
from dst.engine.patterns import Pattern, get_pattern
from dst.engine.patterns.unstructured import Unstructured

# MultiheadAttention passes out_proj.weight to its functional form instead of calling
# out_proj: the mask then acts on that weight's gradient only (see MaskedLayer.mask_gradient).
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention,)


# How a MaskedNet keeps inactive weights out of the function and out of training.
MASKING = {
    # The forward uses the stored weights, whose inactive entries are exactly zero (set when masked, after
    # every DST step and every load_state_dict; an optimizer cannot move them since their gradient and
    # optimizer state are zero); a hook zeroes the gradient at inactive positions. The same outputs and
    # updates as "forward", about 10% faster per training step on a CPU (benchmarks/training_step.py).
    "gradient": "mask the gradient, compute with the stored (zero-filled) weights",
    # torch.where(mask, weight, 0) in every forward: the function stays masked even if something writes
    # values into inactive positions behind the library's back. The classic simulated-sparsity layer.
    "forward": "multiply the mask into the weight in every forward",
}


# Training forwards after which a MaskedNet whose masked weights no optimizer has stepped warns.
UNTRAINED_AFTER = 100


class UntrainedWarning(UserWarning):
    """A MaskedNet runs training passes but no optimizer steps its weights (one built on the base net?)."""


def random_mask(shape: torch.Size, density: float, generator: torch.Generator | None = None,
                pattern: str | Pattern = "unstructured") -> torch.Tensor:
    """A random boolean mask of ``shape`` at ``density`` that follows ``pattern`` (read on the (out, in) matrix).

    Unstructured: exactly ``active_count(numel, density)`` True entries at random places.
    """
    pattern = get_pattern(pattern)
    return torch.from_numpy(pattern.random_mask(matrix_shape(shape), density, generator)).reshape(shape)


class MaskedNet(nn.Module):
    """A copy of ``base_net`` with every trainable Conv1d/2d/3d and Linear replaced by a masked layer.

    Build the optimizer after wrapping, on ``MaskedNet(...).parameters()``: the masked net trains
    its own copy of the weights, so an optimizer built on ``base_net`` steps the original and the
    masked net never changes (``train_side_by_side`` refuses such a pair).

    Args:
        base_net: any module; it is deep-copied, never changed.
        sparsity: global fraction of the masked layers' weights (biases excluded) that are zero, in [0, 1).
        allocation: how the sparsity is split across layers: "uniform" or "erk".
        scale_init: multiply each layer's copied weights by ``1/sqrt(density)``.
            A layer that keeps 5% of its inputs otherwise starts with activations
            ~4.5x too small (the init was scaled for the dense fan-in), and deep
            sparse nets then train slowly; this is the sparse fan-in init.
        generator: random source for the masks (default: torch's global one).
        masking: "gradient" (default) or "forward", see ``MASKING``; both compute the same network.
        keep_dense: "first" and/or "last" masked layer, or layer names, kept dense; the others share the
            rest of the budget (see ``dst.engine.allocation.layer_densities``).
        pattern: the sparsity pattern of every sparse layer (``dst.engine.patterns``): "unstructured"
            (default), "fan_in" (every neuron the same number of inputs), "N:M" such as "2:4", or
            "blockRxC" such as "block4x4". Each layer's density is rounded to what the pattern can
            hold (``layer.pattern.active_count``); a layer it cannot hold at all (a shape the blocks
            do not tile, 2:4 at another density than 50 %) is refused here, by name. Layers left
            dense (``keep_dense``, or ERK's overflow) are dense, whatever the pattern.

    Layers that are frozen (``requires_grad=False`` weight) stay dense and out of
    DST; any other weight left unmasked is listed in a warning and by ``skipped_weights()``.
    A ``DisconnectedWarning`` says when the masks leave an output unit of the last masked
    layer, or an input feature of the first, without any connection; an ``UntrainedWarning``
    when ``UNTRAINED_AFTER`` training forwards have run and no optimizer has stepped a masked weight.

    Optimizer hooks: the first masked layer built in a process installs torch's two global
    optimizer step hooks (``register_optimizer_step_pre_hook`` and ``..._post_hook``; see
    ``dst.engine.optimizer_state``). Around every ``optimizer.step()`` they remember which
    optimizer stepped a masked weight (so a DST step resets state in optimizers nobody passed it)
    and zero state that disagrees with a mask (a freshly loaded checkpoint). They act on masked
    weights only, and cost an optimizer holding none one cached lookup per step. There is no
    switch to turn them off while a masked net is alive, since the zero-state guarantee rests on
    them; they are removed when the last masked layer is garbage-collected (``del`` every masked
    net, and copies of it), after which torch's optimizers run exactly as without this package.
    """

    _training_forwards = 0  # counted up to UNTRAINED_AFTER (a class default: older pickles lack it)

    def __init__(self, base_net: nn.Module, sparsity: float = 0.95, allocation: str = "uniform",
                 scale_init: bool = True, generator: torch.Generator | None = None, masking: str = "gradient",
                 keep_dense: str | tuple[str, ...] = (), pattern: str | Pattern = "unstructured"):
        super().__init__()
        check_sparsity(sparsity)
        pattern = get_pattern(pattern)
        if masking not in MASKING:
            raise ValueError(f"unknown masking {masking!r}; choose one of {list(MASKING)}")
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
        patterns = {name: pattern if densities[name] < 1.0 else Unstructured() for name in targets}
        for name, module in targets.items():  # every layer checked before any mask is drawn
            try:
                patterns[name].active_count(matrix_shape(module.weight.shape), densities[name])
            except ValueError as error:
                raise ValueError(f"layer {name!r} ({tuple(module.weight.shape)}) cannot follow the pattern: {error}; "
                                 "keep it dense (keep_dense=...) or choose another pattern") from None
        read_elsewhere = _weights_read_outside_forward(net, targets)
        replacements = {}
        for name, module in targets.items():
            mask = random_mask(module.weight.shape, densities[name], generator, patterns[name])
            if scale_init:  # by the density the pattern really holds
                with torch.no_grad():
                    module.weight.mul_(1.0 / math.sqrt(float(mask.float().mean())))
            layer = masked_type(module).from_dense(
                module, mask, mask_gradient=masking == "gradient" or id(module.weight) in read_elsewhere)
            layer.mask_in_forward = masking == "forward"
            layer.pattern = patterns[name]
            replacements[id(module)] = layer
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
        if self.training and torch.is_grad_enabled() and self._training_forwards < UNTRAINED_AFTER:
            self._count_training_forward()
        return self.net(*args, **kwargs)

    def _count_training_forward(self) -> None:
        """After UNTRAINED_AFTER training forwards, warn (once) if no optimizer has stepped a masked weight."""
        if any(layer.bypassed for layer in self.masked_layers().values()):
            return  # a dense gradient pass (RigL's), not training
        self._training_forwards += 1
        if self._training_forwards == UNTRAINED_AFTER and not any(
                optimizers_of(layer.weight) for layer in self.masked_layers().values()):
            warnings.warn(f"{UNTRAINED_AFTER} training forward passes of this MaskedNet, and no torch optimizer "
                          "has stepped any of its masked weights: was the optimizer built on the base net before "
                          "wrapping it? MaskedNet trains its own copy; build the optimizer on "
                          "MaskedNet(...).parameters()", UntrainedWarning, stacklevel=3)

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
        """Within this block neither the forward nor the gradient is masked (same outputs, dense gradients)."""
        # Restored to what each layer had, not to True: a MomentumTracker keeps its layers unmasked
        # while it is open, and a RigL gradient pass in between must not switch its masks back on.
        layers = {layer: (layer.apply_mask, layer.bypassed) for layer in self.masked_layers().values()}
        for layer in layers:
            layer.apply_mask, layer.bypassed = False, True
        try:
            yield self
        finally:
            for layer, (apply_mask, bypassed) in layers.items():
                layer.apply_mask, layer.bypassed = apply_mask, bypassed


def _after_load(net: nn.Module, incompatible_keys) -> None:
    """load_state_dict's post hook: it runs once every layer has loaded, so that a checkpoint of dense weights
    (strict=False), or a tied module loaded after its masked owner, cannot leave values where the mask says
    no weight exists. ``assign=True`` brings new weight objects: they are registered again."""
    with torch.no_grad():
        for name, layer in net.named_modules():
            if isinstance(layer, MaskedLayer):
                if layer.mask.dtype != torch.bool:  # assign=True puts the checkpoint's own tensor in place
                    if not bool(((layer.mask == 0) | (layer.mask == 1)).all()):
                        raise ValueError(f"the mask loaded for layer {name!r} holds values other than 0 and 1 "
                                         f"({layer.mask.dtype}); a mask is boolean: True where a weight exists")
                    layer.mask = layer.mask.to(torch.bool)
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
            elif isinstance(module, tuple(MASKED_TYPES)):
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
