"""Data-parallel DST: train the tutorial's SimpleNet on several processes, or time what keeping DST in step costs.

Run from the repository root, unchanged on CPUs (gloo) and GPUs (nccl, one process per GPU):

    torchrun --nproc_per_node=2 -m benchmarks.ddp_dst              # 2 processes
    python -m benchmarks.ddp_dst                                    # 1 process, same code
    torchrun --nproc_per_node=2 -m benchmarks.ddp_dst --overhead    # time the DST synchronisation

``--batch-size`` is per process: every step the processes take consecutive shares of
one global batch drawn from a permutation shared by all of them, so 2 processes
with batch b see the same samples, in the same steps, as 1 process with batch 2b.
The DST updates go through ``DSTScheduler(config, DistributedDSTStep(...))``: every
process takes the same step and checks that it did. ``--checkpoint`` is written
from rank 0 after every epoch; ``--resume`` restarts from it on any number of
processes. ``--data synthetic`` trains on random MNIST-shaped tensors (no download).

``--overhead`` trains nothing: it times, interleaved, a training step, the DST step
taken locally (``apply_dst_step``) and synchronised (``distributed_dst_step``),
for SET and RigL, the consistency check alone, and a broadcast of every mask
(what DDP's per-forward buffer sync would send); rank 0 writes
benchmarks/results/ddp_dst_overhead_<N>proc.json.
"""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dst.core.data import TensorLoader, ensure_mnist, load_mnist_tensors
from dst.core.models import SimpleNet
from dst.core.training import evaluate, seed_everything, train_epoch
from dst.engine.distributed import (
    DistributedDSTStep,
    check_ranks_agree,
    distributed_dst_step,
    load_checkpoint,
    save_checkpoint,
    shared_generator,
    wrap_ddp,
)
from dst.engine.masked import MaskedNet
from dst.engine.prune_regrow import apply_dst_step
from dst.engine.schedule import DSTConfig, DSTScheduler
from dst.tutorial.benchmark import benchmark_environment, time_interleaved

RESULTS = Path(__file__).resolve().parent / "results"


class GlobalBatchShards:
    """One epoch of this rank's shares of global batches, from a permutation every rank draws alike."""

    def __init__(self, images, labels, batch_size: int, epoch: int, seed: int, rank: int, world_size: int,
                 max_batches: int | None = None):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.rank, self.world_size = rank, world_size
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        self.order = order.to(labels.device)
        # Whole global batches only, so every rank takes the same number of steps (DDP needs that).
        batches = len(labels) // (batch_size * world_size)
        self.batches = batches if max_batches is None else min(batches, max_batches)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        for start in range(0, self.batches * global_batch, global_batch):
            index = self.order[start + self.rank * self.batch_size:start + (self.rank + 1) * self.batch_size]
            yield self.images[index], self.labels[index]


def start(args) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (if any); this process's rank, the world size and its device."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def load_data(args, rank: int, device: torch.device):
    """(train images, train labels, test images, test labels) on ``device``."""
    if args.data == "synthetic":
        generator = torch.Generator().manual_seed(args.seed)
        labels = torch.randint(0, 10, (args.samples + 1000,), generator=generator)
        images = torch.randn(len(labels), 1, 28, 28, generator=generator)
        images[:, 0, :, :3] += labels.view(-1, 1, 1).float()  # learnable from one band's brightness
        split = [images[:args.samples], labels[:args.samples], images[args.samples:], labels[args.samples:]]
    else:
        if rank == 0:
            ensure_mnist(args.root)
        if dist.is_initialized():
            dist.barrier()  # the others read the files rank 0 has checked
        split = [*load_mnist_tensors(args.root, train=True), *load_mnist_tensors(args.root, train=False)]
    return [tensor.to(device) for tensor in split]


def global_sum(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over the ranks (as they are on one process)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def train(args, rank: int, world_size: int, device: torch.device) -> None:
    """Train and evaluate every epoch; rank 0 prints one line per epoch."""
    train_images, train_labels, test_images, test_labels = load_data(args, rank, device)
    seed_everything(args.seed)
    masked_net = MaskedNet(SimpleNet(), sparsity=args.sparsity, allocation=args.allocation).to(device)
    model = wrap_ddp(masked_net) if dist.is_initialized() else masked_net
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = shared_generator(args.seed)
    first_epoch = 1
    if args.resume:
        first_epoch = load_checkpoint(args.resume, model, optimizer, generator)["epoch"] + 1
    config = DSTConfig(prune_ratio=args.prune_ratio, regrow=args.regrow, every=args.dst_every, unit="epoch")
    scheduler = DSTScheduler(config, DistributedDSTStep(masked_net, config.regrow, optimizer, generator=generator),
                             epochs=first_epoch - 1)
    for epoch in range(first_epoch, args.epochs + 1):
        loader = GlobalBatchShards(train_images, train_labels, args.batch_size, epoch, args.seed, rank, world_size,
                                   args.max_batches)
        loss, accuracy = train_epoch(model, loader, F.cross_entropy, optimizer, device, progress=False)
        event = scheduler.after_epoch(loader)
        shard = slice(rank, None, world_size)  # each rank tests its share; the accuracies are combined below
        test_loader = TensorLoader(test_images[shard], test_labels[shard], batch_size=1000)
        test_accuracy = evaluate(masked_net, test_loader, device)
        seen = len(loader) * args.batch_size
        totals = global_sum([loss * seen, accuracy * seen, seen, test_accuracy * test_loader.num_samples], device)
        if args.checkpoint:
            save_checkpoint(args.checkpoint, model, optimizer, generator, epoch=epoch)
        if rank == 0:
            moved = sum(update.pruned for update in event.layers.values()) if event else 0
            print(f"epoch {epoch}: train loss {totals[0] / totals[2]:.4f}, train acc {totals[1] / totals[2]:.2f} %, "
                  f"test acc {totals[3] / len(test_labels):.2f} %, DST moved {moved} weights "
                  f"({world_size} process{'es' if world_size > 1 else ''}, global batch "
                  f"{args.batch_size * world_size})", flush=True)


def measure_overhead(args, rank: int, world_size: int, device: torch.device) -> None:
    """Time the DST step with and without synchronisation; rank 0 prints and writes JSON."""
    seed_everything(args.seed)
    masked_net = MaskedNet(SimpleNet(), sparsity=args.sparsity, allocation=args.allocation).to(device)
    model = wrap_ddp(masked_net) if dist.is_initialized() else masked_net
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = shared_generator(args.seed)
    # The same batch on every rank, so even the unsynchronised RigL step keeps the ranks identical.
    batch_generator = torch.Generator().manual_seed(args.seed)
    batch = (torch.randn(args.batch_size, 1, 28, 28, generator=batch_generator).to(device),
             torch.randint(0, 10, (args.batch_size,), generator=batch_generator).to(device))
    masks = [layer.mask for layer in masked_net.masked_layers().values()]

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        optimizer.step()

    def broadcast_masks():
        for mask in masks:
            dist.broadcast(mask, src=0)

    synchronize = torch.cuda.synchronize if device.type == "cuda" else None
    steps = {
        "train step (DDP)": train_step,
        "SET step, local": lambda: apply_dst_step(masked_net, args.prune_ratio, generator=generator),
        "SET step, synchronised": lambda: distributed_dst_step(model, args.prune_ratio, generator=generator),
        "RigL step, local": lambda: apply_dst_step(masked_net, args.prune_ratio, "gradient", batch),
        "RigL step, synchronised": lambda: distributed_dst_step(model, args.prune_ratio, "gradient", batch),
    }
    if dist.is_initialized():
        steps["consistency check alone"] = lambda: check_ranks_agree(model)
        steps["broadcast of every mask"] = broadcast_masks
    timings = time_interleaved({name: (step, synchronize) for name, step in steps.items()},
                               runs=args.runs, warmup=3)
    check_ranks_agree(model)  # the local steps above must not have let the ranks drift
    if rank != 0:
        return
    medians = {name: timing["median"] for name, timing in timings.items()}
    for kind in ("SET", "RigL"):
        local, synced = medians[f"{kind} step, local"], medians[f"{kind} step, synchronised"]
        medians[f"{kind} sync overhead"] = synced - local
        print(f"{kind}: local {local:.2f} ms, synchronised {synced:.2f} ms, overhead {synced - local:.2f} ms "
              f"({synced / local:.2f}x the local step, {(synced - local) / medians['train step (DDP)']:.3f} of a "
              f"training step)")
    for name in ("train step (DDP)", "consistency check alone", "broadcast of every mask"):
        if name in medians:
            print(f"{name}: {medians[name]:.2f} ms")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"ddp_dst_overhead_{world_size}proc.json"  # a 1-process run must not overwrite a 2-process one
    path.write_text(json.dumps({"world_size": world_size, "backend": dist.get_backend() if dist.is_initialized()
                                else None, "batch_size": args.batch_size, "sparsity": args.sparsity,
                                "prune_ratio": args.prune_ratio, "median_ms": medians, "timings_ms": timings,
                                "environment": benchmark_environment(device)}, indent=2))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--allocation", default="erk")
    parser.add_argument("--regrow", default="random", help="random (SET) or gradient (RigL)")
    parser.add_argument("--prune-ratio", type=float, default=0.1)
    parser.add_argument("--dst-every", type=int, default=2, help="epochs between DST updates")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data", choices=("mnist", "synthetic"), default="mnist")
    parser.add_argument("--root", default="./data", help="MNIST folder")
    parser.add_argument("--samples", type=int, default=6000, help="training samples with --data synthetic")
    parser.add_argument("--max-batches", type=int, default=None, help="global batches per epoch (quick runs)")
    parser.add_argument("--checkpoint", default=None, help="file rank 0 writes after every epoch")
    parser.add_argument("--resume", default=None, help="checkpoint to start from")
    parser.add_argument("--overhead", action="store_true", help="time the DST synchronisation instead of training")
    parser.add_argument("--runs", type=int, default=30, help="timed runs of each entry with --overhead")
    args = parser.parse_args()
    rank, world_size, device = start(args)
    try:
        (measure_overhead if args.overhead else train)(args, rank, world_size, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
