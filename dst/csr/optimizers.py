"""The sparse trainer's optimizers: torch's SGD and Adam, applied to arrays of active weights.

``OptimizerConfig`` describes the optimizer once for both trainers (``dst.csr.mlp``
updates CSR arrays with ``OPTIMIZERS[config.name]``; the masked dense twin gets the
torch optimizer ``torch_optimizer(config, params)``), so their runs compare. Each
update rule keeps per-connection state arrays aligned with the weight values; a DST
step keeps a surviving connection's state and starts a new connection's at zero.
"""

import math
import numbers
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer, shared by the truly sparse and the masked trainer so their runs compare.

    ``torch_optimizer`` builds the torch twin of this config.
    """

    # "sgd" (torch.optim.SGD, momentum without dampening) or "adam" (torch.optim.Adam, L2 decay).
    name: str = "sgd"
    # A 99%-sparse MLP wants a large step: on MNIST, one epoch at batch 128 reached 90.7% at
    # lr 0.05 and 94.3% at 0.2 (hidden 1024x2, ERK). Use ~0.05 for a dense net or for Adam ~1e-3.
    lr: float = 0.2
    momentum: float = 0.9
    # SET's order of magnitude (2e-4): small weights drift towards the pruning cut.
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; choose one of {sorted(OPTIMIZERS)}")
        for field_name in ("lr", "momentum", "weight_decay", "eps"):
            value = getattr(self, field_name)
            # not (value >= 0) also refuses NaN, which would train every weight to NaN
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 <= value < math.inf):
                raise ValueError(f"{field_name} must be a finite non-negative number, got {value!r}")
        betas_ok = len(self.betas) == 2 and all(isinstance(beta, numbers.Real) and 0 <= beta < 1
                                                for beta in self.betas)
        if not (self.momentum < 1 and betas_ok):
            raise ValueError(f"momentum and betas must be in [0, 1), got {self.momentum}, {self.betas}")

    @property
    def state_names(self) -> tuple[str, ...]:
        """The per-weight state arrays this optimizer keeps."""
        return OPTIMIZERS[self.name].state_names(self)


class SparseSGD:
    """torch.optim.SGD's update on an array of active weights (or a dense bias)."""

    @staticmethod
    def state_names(config: OptimizerConfig) -> tuple[str, ...]:
        return ("momentum",) if config.momentum else ()

    @staticmethod
    def update(config: OptimizerConfig, values, grad, state: dict, step: int) -> None:
        """Update ``values`` in place (it is CSR data: never rebind it); ``grad`` is scratch."""
        if config.weight_decay:
            grad += config.weight_decay * values
        if config.momentum:
            buffer = state["momentum"]
            buffer *= config.momentum
            buffer += grad
            grad = buffer
        values -= config.lr * grad


class SparseAdam:
    """torch.optim.Adam's update (step counted from 1) on an array of active weights."""

    @staticmethod
    def state_names(config: OptimizerConfig) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    @staticmethod
    def update(config: OptimizerConfig, values, grad, state: dict, step: int) -> None:
        """Update ``values`` in place; a regrown weight's zeroed moments start it like a new one."""
        beta1, beta2 = config.betas
        if config.weight_decay:
            grad += config.weight_decay * values
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg *= beta1
        exp_avg += (1 - beta1) * grad
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * grad * grad
        denom = exp_avg_sq ** 0.5 / math.sqrt(1 - beta2 ** step)
        denom += config.eps
        values -= config.lr / (1 - beta1 ** step) * exp_avg / denom


OPTIMIZERS = {"sgd": SparseSGD, "adam": SparseAdam}


# name -> the torch twin of each sparse optimizer, built from the same config.
TORCH_OPTIMIZERS = {
    "sgd": lambda config, params: torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                                  weight_decay=config.weight_decay),
    "adam": lambda config, params: torch.optim.Adam(params, lr=config.lr, betas=config.betas, eps=config.eps,
                                                    weight_decay=config.weight_decay),
}


def torch_optimizer(config: OptimizerConfig, params) -> torch.optim.Optimizer:
    """The torch optimizer that ``config`` describes, for the masked dense net; a ``ValueError`` if it has none."""
    if config.name not in TORCH_OPTIMIZERS:
        raise ValueError(f"optimizer {config.name!r} has no torch twin; those with one are {sorted(TORCH_OPTIMIZERS)}")
    return TORCH_OPTIMIZERS[config.name](config, params)
