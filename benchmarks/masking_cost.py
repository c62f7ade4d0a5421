"""How masking is built, and what it costs: MaskedNet's layer subclasses against torch.nn.utils.parametrize.

One training step (zero_grad, forward, backward, fused Adam step) of SimpleNet at 95%
sparsity (ERK), batch 64, for four nets with the same weights and masks:

- dense: the same weights without the mask step (what masking adds its cost to);
- subclass: MaskedNet as shipped (each layer replaced by a masked subclass whose forward
  reads ``where(mask, weight, 0)``);
- subclass + gradient hook: the same with the weight-gradient hook on every layer (MaskedNet
  turns it on only for weights something else reads: a tied embedding, attention's out_proj);
- parametrize: ``register_parametrization`` of ``where(mask, weight, 0)`` on each weight.

The four take turns, one step each per round, so a busy machine slows them alike; each
ratio is the median over rounds of (variant / subclass) in the same round.

Writes benchmarks/results/masking_cost.json. Run from the repository root:
python -m benchmarks.masking_cost [--rounds N] [--threads N]
"""

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from dst.benchmark import benchmark_environment
from dst.masked import MaskedNet
from dst.models import SimpleNet

RESULTS = Path(__file__).resolve().parent / "results"


class WhereMask(nn.Module):
    """The parametrization: the weight with its inactive entries replaced by zero."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, weight, 0.0)


def variants(sparsity: float) -> dict[str, nn.Module]:
    """The four nets, with the same weights and masks."""
    base = SimpleNet()
    masked = MaskedNet(base, sparsity, "erk", generator=torch.Generator().manual_seed(0))
    hooked = copy.deepcopy(masked)
    for layer in hooked.masked_layers().values():
        layer.mask_gradient = True
        layer.watch()
    parametrized = copy.deepcopy(base)
    for name, layer in masked.masked_layers().items():
        target = parametrized.get_submodule(name)
        with torch.no_grad():
            target.weight.copy_(layer.weight)
        parametrize.register_parametrization(target, "weight", WhereMask(layer.mask.clone()))
    dense = copy.deepcopy(masked)  # the same weights without the mask step, as dst.benchmark's dense row
    for layer in dense.masked_layers().values():
        layer.apply_mask = False
    return {"dense": dense, "subclass": masked, "subclass + gradient hook": hooked, "parametrize": parametrized}


def step_of(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(inputs), targets).backward()
        optimizer.step()
    return step


def measure(rounds: int, batch: int, sparsity: float) -> dict:
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(batch, 1, 28, 28, generator=generator), torch.randint(0, 10, (batch,))
    steps = {name: step_of(net, inputs, targets) for name, net in variants(sparsity).items()}
    for step in steps.values():  # warm-up: allocator, Adam state, parametrize caches
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": statistics.median(values), "min_ms": min(values),
                   "ratio_to_subclass": statistics.median(a / b for a, b in zip(values, times["subclass"]))}
            for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args.rounds, args.batch, args.sparsity)
    print(f"{'variant':26s} {'median ms':>10s} {'min ms':>8s} {'vs subclass':>12s}")
    for name, row in rows.items():
        print(f"{name:26s} {row['median_ms']:10.2f} {row['min_ms']:8.2f} {row['ratio_to_subclass']:11.3f}x")
    RESULTS.mkdir(exist_ok=True)
    report = {"settings": vars(args), "environment": benchmark_environment("cpu"), "rows": rows}
    (RESULTS / "masking_cost.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
