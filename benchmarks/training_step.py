"""Where a CPU training step of the tutorial's nets goes: ms per step for each speed-up, against the floor.

One training step (zero_grad, forward, backward, fused Adam) of the dense SimpleNet and of
its masked copy (95 % sparsity, ERK), batch 64, for each layout, cumulatively:

- seed:           NCHW batches, conv -> ReLU -> pool (the seed's order), mask by torch.where in the forward;
- channels-last:  batches in channels-last memory order (dst.core.data.channels_last), so every activation is NHWC;
- pool first:     conv -> pool -> ReLU, the same function with the ReLU on 4x fewer values (dst.core.models.SimpleNet);
- gradient mask:  the masked net computes with its stored (zero-filled) weights and masks the gradient
                  (MaskedNet's default masking; "forward" is the torch.where variant);
- parametrize:    for the record, the where() mask as a torch.nn.utils.parametrize parametrization on the
                  shipped layout (the alternative to MaskedNet's layer subclasses, which keep state_dict keys);

and then the dense and the masked step of the shipped layout side by side, each in its own thread with
one intra-op thread (dst.tutorial.side_by_side), against the two one after the other on torch's threads.

Variants take turns, one step each per round, so a busy machine slows them alike; times are medians over
rounds, after warm-up steps. The floor is the step's multiply-adds (forward, and twice that for the
backward) at the sgemm rate measured here on a 1024x1024 product with torch's threads.

Writes benchmarks/results/training_step.json. Run from the repository root:
python -m benchmarks.training_step [--rounds N]
"""

import argparse
import json
import statistics
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from dst.core.data import channels_last
from dst.core.models import SimpleNet
from dst.engine.masked import MaskedNet
from dst.tutorial.benchmark import benchmark_environment

RESULTS = Path(__file__).resolve().parent / "results"
SEED_ORDER = ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten", "fc1", "relu3", "fc2", "relu4",
              "fc3", "relu5", "fc4"]


class WhereMask(nn.Module):
    """The parametrization: the weight with its inactive entries replaced by zero."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, weight, 0.0)


def seed_order(net: nn.Module) -> nn.Module:
    """SimpleNet's modules in the seed's order (ReLU before pool)."""
    return nn.Sequential(OrderedDict((name, net.get_submodule(name)) for name in SEED_ORDER))


def nets(sparsity: float) -> dict[str, tuple[nn.Module, bool]]:
    """{variant: (net, channels-last batches)}, all with the same weights and masks."""
    torch.manual_seed(0)
    base = SimpleNet()

    def masked(net, masking):
        return MaskedNet(net, sparsity, "erk", generator=torch.Generator().manual_seed(0), masking=masking)

    parametrized = masked(base, "forward")
    for layer in parametrized.masked_layers().values():
        layer.apply_mask = False  # the parametrization masks instead
        parametrize.register_parametrization(layer, "weight", WhereMask(layer.mask.clone()))
    return {
        "dense, seed": (seed_order(base), False),
        "dense, channels-last": (seed_order(base), True),
        "dense, pool first (shipped)": (base, True),
        "masked, seed": (masked(seed_order(base), "forward"), False),
        "masked, channels-last": (masked(seed_order(base), "forward"), True),
        "masked, pool first": (masked(base, "forward"), True),
        "masked, gradient mask (shipped)": (masked(base, "gradient"), True),
        "masked, parametrize": (parametrized, True),
    }


def step_of(net: nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    """A closure doing one training step of ``net`` on one batch."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(inputs), targets).backward()
        optimizer.step()
    return step


def floor_ms(batch: int) -> tuple[float, float]:
    """(ms, GFLOP/s): SimpleNet's training-step FLOPs at this machine's sgemm rate."""
    counts = []
    net = SimpleNet()
    hooks = [module.register_forward_hook(
        lambda module, _inputs, output: counts.append(module.weight.numel() * output[0, 0].numel()
                                                      if output.dim() == 4 else module.weight.numel()))
             for module in net.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        net(torch.zeros(1, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    flop = 3 * 2 * sum(counts) * batch  # forward, plus two products of the same size in the backward
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    start, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        a @ b
    gflops = 2 * 1024**3 * repeats / (time.perf_counter() - start) / 1e9
    return flop / gflops / 1e6, gflops


def measure_steps(rounds: int, batch: int, sparsity: float) -> dict[str, dict]:
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(batch, 1, 28, 28, generator=generator), torch.randint(0, 10, (batch,))
    steps = {name: step_of(net, channels_last(inputs) if layout else inputs, targets)
             for name, (net, layout) in nets(sparsity).items()}
    for step in steps.values():
        for _ in range(5):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": statistics.median(values), "min_ms": min(values)} for name, values in times.items()}


def measure_pair(rounds: int, batch: int, sparsity: float, steps_per_round: int = 20) -> dict[str, float]:
    """ms per pair of steps (one dense, one masked): one after the other, and side by side in two threads."""
    shipped = nets(sparsity)
    generator = torch.Generator().manual_seed(1)
    inputs = channels_last(torch.randn(batch, 1, 28, 28, generator=generator))
    targets = torch.randint(0, 10, (batch,), generator=generator)
    dense = step_of(shipped["dense, pool first (shipped)"][0], inputs, targets)
    masked = step_of(shipped["masked, gradient mask (shipped)"][0], inputs, targets)
    threads = torch.get_num_threads()

    def one_after_the_other():
        for _ in range(steps_per_round):
            dense()
            masked()

    def side_by_side():
        def worker(step):
            torch.set_num_threads(1)
            for _ in range(steps_per_round):
                step()
        torch.set_num_threads(1)
        workers = [threading.Thread(target=worker, args=(step,)) for step in (dense, masked)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        torch.set_num_threads(threads)

    runs = {"one after the other": one_after_the_other, "side by side": side_by_side}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1e3 / steps_per_round)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.95)
    args = parser.parse_args()
    floor, gflops = floor_ms(args.batch)
    steps = measure_steps(args.rounds, args.batch, args.sparsity)
    pair = measure_pair(max(5, args.rounds // 4), args.batch, args.sparsity)
    print(f"SimpleNet training step, batch {args.batch}, masked at {args.sparsity:.0%} (ERK), "
          f"torch {torch.__version__} on {torch.get_num_threads()} threads")
    print(f"floor: {floor:.1f} ms per step ({gflops:.0f} GFLOP/s sgemm)\n")
    print(f"{'variant':34s} {'median ms':>10s} {'x floor':>8s} {'vs seed':>8s}")
    for name, row in steps.items():
        seed = steps["dense, seed" if name.startswith("dense") else "masked, seed"]["median_ms"]
        print(f"{name:34s} {row['median_ms']:10.2f} {row['median_ms'] / floor:7.1f}x "
              f"{seed / row['median_ms']:7.2f}x")
    print(f"\nA dense and a masked step (shipped layout), ms per pair: one after the other "
          f"{pair['one after the other']:.2f}, side by side {pair['side by side']:.2f} "
          f"({pair['one after the other'] / pair['side by side']:.2f}x)")
    RESULTS.mkdir(exist_ok=True)
    report = {"settings": vars(args), "environment": benchmark_environment("cpu"), "floor_ms": floor,
              "sgemm_gflops": gflops, "steps": steps, "pair_ms": pair}
    (RESULTS / "training_step.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
