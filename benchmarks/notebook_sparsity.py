"""The notebook's run at high sparsity: which DST settings close the gap to dense within its 10 epochs?

Trains what the tutorial's first part trains (SimpleNet on MNIST, ERK, Adam lr 1e-3, batch 64, 10 epochs,
``MaskedNet``'s scaled init, the seed's data order; PyTorch's default Adam where the notebook's is fused, which
rounds differently, so a seed's run is not the notebook's to the last digit) with one DST setting at a time and
the dense net on the same seeds, and writes each run's test accuracy to
``benchmarks/results/notebook_sparsity.json`` as it finishes. Settings (``variants``):

- ``seed``: the notebook's defaults, SET's random regrowth, 10 % moved every 2 epochs (4 updates);
- ``set_steps``: random regrowth every 100 steps, 30 % decayed by a cosine to 0 at 75 % of training;
- ``rigl_steps``: the same schedule with RigL's gradient regrowth;
- ``first_dense``: the defaults with the first conv kept dense (rigl's README does so at 99 %);
- ``rigl_first_dense``: ``rigl_steps`` with the first conv dense.

    nice python -m benchmarks.notebook_sparsity --sparsities 0.99 --seeds 42 --variants seed rigl_steps
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.row_file import append_row
from dst.core.data import load_mnist
from dst.core.models import SimpleNet
from dst.core.training import evaluate, seed_everything, train_epoch
from dst.engine.masked import MaskedNet
from dst.engine.prune_regrow import masked_scheduler
from dst.engine.schedule import DSTConfig
from dst.tutorial.benchmark import cpu_model

RESULTS = Path(__file__).resolve().parent / "results" / "notebook_sparsity.json"
EPOCHS, BATCH, LR = 10, 64, 1e-3


def variants(steps_per_epoch: int) -> dict[str, tuple[DSTConfig | None, tuple[str, ...]]]:
    """name -> (DST config, layers kept dense); None is the dense net."""
    total = EPOCHS * steps_per_epoch
    every_epochs = DSTConfig(prune_ratio=0.1, regrow="random", every=2, unit="epoch", end=EPOCHS - 1)

    def steps(regrow):
        return DSTConfig(prune_ratio=0.3, regrow=regrow, schedule="cosine", every=100, unit="step",
                         end=int(0.75 * total))

    return {"dense": (None, ()), "seed": (every_epochs, ()), "set_steps": (steps("random"), ()),
            "rigl_steps": (steps("gradient"), ()), "first_dense": (every_epochs, ("first",)),
            "rigl_first_dense": (steps("gradient"), ("first",))}


def run(variant: str, sparsity: float, seed: int, data_root: str = "./data", max_batches: int | None = None) -> dict:
    """One run of the notebook's training with ``variant``; its row."""
    seed_everything(seed)
    train_loader, test_loader = load_mnist(data_root, batch_size=BATCH, seed=seed, max_batches=max_batches)
    config, keep_dense = variants(len(train_loader))[variant]
    base = SimpleNet(num_classes=10)
    model = base if config is None else MaskedNet(base, sparsity=sparsity, allocation="erk", keep_dense=keep_dense)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    criterion = nn.CrossEntropyLoss()
    scheduler = None if config is None else masked_scheduler(model, config, optimizer=optimizer)
    start = time.perf_counter()
    try:
        for _ in range(EPOCHS):
            train_epoch(model, train_loader, criterion, optimizer, "cpu", dst=scheduler, progress=False)
            if scheduler is not None:
                scheduler.after_epoch(train_loader)
    finally:
        if scheduler is not None:
            scheduler.close()
    row = {"variant": variant, "sparsity": 0.0 if config is None else sparsity, "seed": seed,
           "test_acc": evaluate(model, test_loader, "cpu"), "train_seconds": time.perf_counter() - start,
           "updates": 0 if scheduler is None else len(scheduler.history), "cpu": cpu_model()}
    if config is not None:
        row["final_sparsity"] = model.global_sparsity()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["seed"], choices=list(variants(1)))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.99])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--max-batches", type=int, help="batches per epoch (a quick check; nothing is saved)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if any(not 0 < s < 1 for s in args.sparsities):
        parser.error(f"--sparsities must be in (0, 1), got {args.sparsities}")
    torch.set_num_threads(1)
    for seed in args.seeds:
        for sparsity in args.sparsities:
            for variant in args.variants:
                if variant == "dense" and sparsity != args.sparsities[0]:
                    continue  # one dense run per seed
                row = run(variant, sparsity, seed, max_batches=args.max_batches)
                print(json.dumps(row), flush=True)
                if args.max_batches is None:
                    append_row(args.output, row)


if __name__ == "__main__":
    main()
