"""The two facts about a ``torch.distributed`` process group that the engine's lower modules need.

Here, apart from ``dst.engine.distributed`` (which builds on the DST step), so that the momentum
tracker, which the DST step may keep, can ask them without an import circle.
"""

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def collective_device() -> torch.device:
    """Where this process group's collectives take their tensors: the current CUDA device for nccl, else the CPU."""
    # NCCL only moves CUDA tensors; gloo (and the rest) take CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
