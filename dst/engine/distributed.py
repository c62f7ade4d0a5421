"""DST under data parallelism (``torch.distributed``, ``DistributedDataParallel``, ``torchrun``).

The known failure: each rank takes its own DST step, random regrowth draws from a
per-rank seed and gradient regrowth from the rank's own batch, so the ranks drift
to different masks. DDP then silently averages the gradients of different networks.
Here every rank takes the same step, by construction, and checks that it did:

- random regrowth (SET) draws from a generator in the same state on every rank
  (``shared_generator``: rank 0's seed, broadcast);
- gradient regrowth (RigL) scores with the dense gradient all-reduced over every
  rank's batch, the gradient one process would compute on their union;
- pruning is by magnitude of weights that DDP keeps identical, and every rank
  resets its own optimizer state at the changed positions (``apply_dst_step``
  finds the optimizers through the parameters, which DDP shares with the MaskedNet);
- ``check_ranks_agree`` then all-reduces one small fingerprint per layer (mask,
  active weights, and a count of nonzero inactive weights) and raises
  ``RankMismatchError`` on every rank if any rank differs. That is one all-reduce
  of four integers per layer.

Masks are buffers. DDP broadcasts buffers from rank 0 when it is built and, by
default, again before every forward. Nothing here relies on the per-forward
broadcast: it would only paper over a disagreement (rank 0's masks over another
rank's weights) and re-sends every mask each step (1.3 MB for SimpleNet).
``wrap_ddp`` broadcasts the whole MaskedNet from rank 0 once and turns the
per-forward broadcast off unless the net holds other buffers (BatchNorm statistics).
Masked weights stay exactly zero on every rank because their gradient is exactly
zero on every rank, so its all-reduced mean is too, and each DST step zeroes the
weights it moves on every rank alike; the check verifies it after each step.

Without an initialised process group every function here acts as on one process.
"""

import hashlib
import inspect
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dst.engine.masked import MaskedNet
from dst.engine.masked_layers import MaskedLayer
from dst.engine.process_group import collective_device, is_distributed
from dst.engine.prune_regrow import Batch, apply_dst_step, dense_gradients, local_dst_step
from dst.engine.update_rule import LayerUpdate, RegrowCriterion, get_regrow

# Position hashes are ((index + 1) * multiplier) mod a prime: for layers below 2**31 weights
# they are distinct and nonzero (so every weight counts), and sums of 2**31 of them fit in int64.
_MODULUS = 2**31 - 1
_MULTIPLIER = 48271
_BITS_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_FIELDS = 4  # per layer: active count, mask hash, active-weight hash, nonzero inactive weights


class RankMismatchError(RuntimeError):
    """The ranks of a distributed job hold different masks or weights."""


def unwrap(model: nn.Module) -> MaskedNet:
    """The MaskedNet itself, whether ``model`` is one or a DistributedDataParallel around one."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    if not isinstance(inner, MaskedNet):
        raise TypeError(f"expected a MaskedNet or a DistributedDataParallel around one, got {type(inner).__name__}")
    return inner


def broadcast_from_rank0(model: nn.Module) -> None:
    """Overwrite every parameter and buffer (masks included) with rank 0's, in place."""
    if not is_distributed():
        return
    for tensor in unwrap(model).state_dict().values():
        dist.broadcast(tensor, src=0)


def wrap_ddp(masked_net: MaskedNet, forward_sync_buffers: bool | None = None,
             **ddp_kwargs) -> DistributedDataParallel:
    """``DistributedDataParallel(masked_net)`` starting from rank 0's state on every rank.

    ``forward_sync_buffers`` (default: only if the net has buffers besides its
    masks) is DDP's broadcast of buffers before each forward; the masks do not
    need it (see the module docstring). Other keyword arguments go to DDP
    (``device_ids=[local_rank]`` on GPUs).
    """
    if not is_distributed():
        raise RuntimeError("wrap_ddp needs an initialised process group: run under torchrun or call "
                           "torch.distributed.init_process_group first")
    masked_net = unwrap(masked_net)
    broadcast_from_rank0(masked_net)
    if forward_sync_buffers is None:
        masks = {id(layer.mask) for layer in masked_net.masked_layers().values()}
        forward_sync_buffers = any(id(buffer) not in masks for buffer in masked_net.buffers())
    # torch 2.13 renamed broadcast_buffers (now deprecated) to forward_sync_buffers; requirements allow torch 2.4.
    flag = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    ddp_kwargs.setdefault(flag, forward_sync_buffers)
    return DistributedDataParallel(masked_net, **ddp_kwargs)


def shared_generator(seed: int | None = None) -> torch.Generator:
    """A CPU generator in the same state on every rank, seeded with rank 0's ``seed`` (drawn if None)."""
    if seed is None:
        seed = int(torch.randint(2**62, ()).item())
    if is_distributed():
        value = torch.tensor([seed], dtype=torch.int64, device=collective_device())
        dist.broadcast(value, src=0)
        seed = int(value.item())
    return torch.Generator().manual_seed(seed)


def mean_dense_gradients(model: nn.Module, batch: Batch,
                         loss_fn=F.cross_entropy) -> dict[str, torch.Tensor]:
    """Dense weight gradients of the mean loss over every rank's batch (RigL's distributed form).

    Each rank's gradient is weighted by its batch size, so ranks holding a short
    last batch count for what they hold; this assumes ``loss_fn`` averages over
    its batch, as ``F.cross_entropy`` does. One all-reduce for all layers together.
    """
    local = dense_gradients(unwrap(model), batch, loss_fn)
    if not is_distributed():
        return local
    samples = len(batch[1])
    flat = torch.cat([gradient.reshape(-1) for gradient in local.values()]) * samples
    flat = torch.cat([flat, flat.new_tensor([samples])])
    dist.all_reduce(flat)
    flat = flat[:-1] / flat[-1]
    chunks = flat.split([gradient.numel() for gradient in local.values()])
    return {name: chunk.view_as(gradient) for (name, gradient), chunk in zip(local.items(), chunks)}


def distributed_dst_step(model: nn.Module, prune_ratio: float = 0.1, regrow: str = "random",
                         batch: Batch | None = None, loss_fn=F.cross_entropy,
                         optimizer: torch.optim.Optimizer | None = None,
                         generator: torch.Generator | None = None, check: bool = True) -> dict[str, LayerUpdate]:
    """``apply_dst_step`` taken identically on every rank, then checked; same arguments and report.

    ``model`` is the MaskedNet or its DDP wrapper. Random regrowth needs ``generator``
    in the same state on every rank (``shared_generator``); without one, rank 0
    draws a seed for this step. Gradient regrowth uses ``batch``, each rank its
    own, through ``mean_dense_gradients``. ``check=False`` skips ``check_ranks_agree``.
    Without a process group this is ``apply_dst_step``.
    """
    masked_net = unwrap(model)
    if not is_distributed():
        return apply_dst_step(masked_net, prune_ratio=prune_ratio, regrow=regrow, batch=batch, loss_fn=loss_fn,
                              optimizer=optimizer, generator=generator)
    criterion, gradients = get_regrow(regrow), None
    if criterion.uses_random and generator is None:
        generator = shared_generator()
    if criterion.needs_gradient and batch is not None:
        gradients = mean_dense_gradients(masked_net, batch, loss_fn)
    # Fingerprint the generator before it is used, so a mismatch can be blamed on it.
    generator_hash = _generator_fingerprint(generator) if criterion.uses_random else 0
    report = local_dst_step(masked_net, prune_ratio=prune_ratio, regrow=regrow, batch=batch, loss_fn=loss_fn,
                            optimizer=optimizer, generator=generator, signals=gradients)
    if check:
        _verify(masked_net, generator_hash, when="after the DST step")
    return report


class DistributedDSTStep:
    """``distributed_dst_step`` as a ``TopologyUpdate`` for ``DSTScheduler``: every rank takes the same update.

    ``model`` is the MaskedNet or its DDP wrapper; ``generator`` should be a ``shared_generator``.
    A batch (each rank its own) is asked for only when the criterion needs the dense gradient.
    """

    def __init__(self, model: nn.Module, regrow: str | RegrowCriterion = "random",
                 optimizer: torch.optim.Optimizer | None = None, loss_fn=F.cross_entropy,
                 generator: torch.Generator | None = None, check: bool = True):
        unwrap(model)  # a MaskedNet, or a DDP model around one: refused now, not at the first update
        criterion = get_regrow(regrow)
        if criterion.needs not in (None, "gradient"):
            raise ValueError(f"DistributedDSTStep supplies the dense gradient (all-reduced) or nothing; regrow="
                             f"{criterion.name!r} needs the {criterion.needs}: under DDP use sparse momentum's own "
                             "step (dst.methods.sparse_momentum.SparseMomentumStep averages it over the ranks)")
        self.model, self.regrow, self.optimizer, self.loss_fn = model, regrow, optimizer, loss_fn
        self.generator, self.check = generator, check
        self.needs_batch = criterion.needs_gradient

    def __call__(self, prune_ratio: float, batch: Batch | None = None) -> dict[str, LayerUpdate]:
        return distributed_dst_step(self.model, prune_ratio, self.regrow, batch, self.loss_fn, self.optimizer,
                                    self.generator, self.check)

    def close(self) -> None:
        """Nothing to release: the step holds no hooks."""


def check_ranks_agree(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Raise ``RankMismatchError`` on every rank unless all ranks hold the same masks and masked weights.

    Also checks that masked-out weights are exactly zero everywhere and, if given,
    that ``generator`` is in the same state on every rank. One small all-reduce.
    """
    if is_distributed():
        _verify(unwrap(model), _generator_fingerprint(generator), when="")


def _generator_fingerprint(generator: torch.Generator | None) -> int:
    if generator is None:
        return 0
    digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=7).digest()
    return int.from_bytes(digest, "little")


def _layer_fingerprint(layer: MaskedLayer) -> torch.Tensor:
    mask = layer.mask.reshape(-1)  # reshape: a channels-last layer has no flat view
    weight = layer.weight.detach().reshape(-1)
    active = mask.nonzero().squeeze(1)
    position = (active + 1) * _MULTIPLIER % _MODULUS
    # The weights' bit patterns, so equal fingerprints mean bitwise-equal weights (up to hash collisions).
    bits = weight.index_select(0, active).view(_BITS_OF_SIZE[weight.element_size()]).to(torch.int64) % _MODULUS
    stray = torch.count_nonzero(torch.where(mask, 0.0, weight))
    return torch.stack([active.new_tensor(active.numel()), position.sum(), (bits * position % _MODULUS).sum(),
                        stray])


def _verify(masked_net: MaskedNet, generator_hash: int, when: str) -> None:
    layers = masked_net.masked_layers()
    local = torch.stack([_layer_fingerprint(layer) for layer in layers.values()]).view(-1)
    local = torch.cat([local.to(collective_device()), local.new_tensor([generator_hash]).to(collective_device())])
    # One MAX all-reduce of (x, -x) yields the largest and the smallest value over the ranks.
    extremes = torch.cat([local, -local])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    highest, lowest = extremes[:local.numel()].cpu(), -extremes[local.numel():].cpu()
    differs = (highest != lowest)[:-1].view(len(layers), _FIELDS)
    stray = highest[:-1].view(len(layers), _FIELDS)[:, 3] > 0
    names = list(layers)
    problems = []
    if bad := [name for name, row in zip(names, differs) if row[:2].any()]:
        problems.append(f"masks differ in {bad}")
    if bad := [name for name, row in zip(names, differs) if row[2] and not row[:2].any()]:
        problems.append(f"active weights differ in {bad}")
    if bad := [name for name, is_stray in zip(names, stray) if is_stray]:
        problems.append(f"masked-out weights are nonzero on some rank in {bad}")
    if highest[-1] != lowest[-1]:
        problems.append("the random regrowth generator was in different states "
                        "(build it with dst.distributed.shared_generator)")
    if problems:
        raise RankMismatchError(
            f"ranks disagree{' ' + when if when else ''} ({dist.get_world_size()} ranks): {'; '.join(problems)}. "
            "Every rank must take the same DST step: use distributed_dst_step (not apply_dst_step), one "
            "shared_generator for random regrowth, and start from rank 0's state (wrap_ddp or load_checkpoint).")


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    generator: torch.Generator | None = None, **extra) -> None:
    """Write the MaskedNet (masks included), optimizer and generator state from rank 0; all ranks wait for it.

    The net is saved unwrapped, so the file loads on any number of ranks, or none.
    ``extra`` keyword values (epoch, step, ...) are saved as given: plain numbers,
    strings, lists and dicts, which ``torch.load(weights_only=True)`` accepts.
    """
    masked_net = unwrap(model)
    if not is_distributed() or dist.get_rank() == 0:
        state = {"model": masked_net.state_dict(),
                 "optimizer": None if optimizer is None else optimizer.state_dict(),
                 "generator": None if generator is None else generator.get_state(),
                 "extra": extra}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a crash mid-write never leaves a truncated checkpoint in place.
        partial = path.with_name(path.name + ".partial")
        torch.save(state, partial)
        os.replace(partial, path)
    if is_distributed():
        dist.barrier()


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    generator: torch.Generator | None = None) -> dict:
    """Restore a ``save_checkpoint`` file on every rank; returns its ``extra`` values.

    Only rank 0 reads the file and the others receive its contents, so they need
    not share its filesystem. The ranks are checked to agree afterwards.
    """
    masked_net = unwrap(model)
    payload: list = [None]
    if not is_distributed() or dist.get_rank() == 0:
        try:
            payload = [torch.load(path, map_location="cpu", weights_only=True)]
        except (OSError, RuntimeError) as error:
            if not is_distributed():
                raise
            payload = [f"rank 0 could not read checkpoint {str(path)!r}: {error}"]  # every rank raises below
    if is_distributed():
        dist.broadcast_object_list(payload, src=0, device=collective_device())
    state = payload[0]
    if isinstance(state, str):
        raise RuntimeError(state)
    masked_net.load_state_dict(state["model"])
    for name, target in (("optimizer", optimizer), ("generator", generator)):
        if target is not None and state[name] is None:
            raise ValueError(f"{name}= was given but checkpoint {str(path)!r} holds no {name} state")
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if generator is not None:
        generator.set_state(state["generator"])
    check_ranks_agree(masked_net, generator)
    return state["extra"]
