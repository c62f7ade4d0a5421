"""What a hardware-friendly pattern costs in accuracy: SET and RigL under each pattern against unstructured.

At equal density and the same recipe, each pattern (``dst.engine.patterns``) is trained with SET and
RigL (RigL under constant fan-in is SRigL, ``METHODS["srigl"]``) next to the same method unstructured:
2:4 at 50 %, constant fan-in and blocks at 90 % and 95 %. Uniform allocation (2:4 holds exactly half of
every layer), and the layers no pattern tiles are kept dense in every run of a model, unstructured ones
included, so the runs compared have the same weights: LeNet-300-100's 10 x 100 output layer, and
SimpleNet's first conv (16 x 9) and 10-way output layer. LeNet-300-100's 300 hidden inputs take
blocks of 1x4 at most in a row (300 is no multiple of 8), SimpleNet's take 1x8.

Writes benchmarks/results/structured_accuracy.json (every run's row, the settings, the machine) as rows
finish, resuming from it (``--resume``), and prints the table of differences against unstructured.
    nice -n 10 python -m benchmarks.structured_accuracy --models lenet300-100 --resume
"""

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from dst.core.data import TensorLoader, load_mnist_tensors
from dst.methods.catalog import METHODS, Target, improved
from dst.methods.sweep import Recipe, train_run
from dst.tutorial.benchmark import cpu_model
from dst.tutorial.hardware import pattern_table, summarize_patterns

RESULTS = Path(__file__).resolve().parent / "results" / "structured_accuracy.json"
# The medium budget of benchmarks/dst_methods.py: the paper's recipe cut to 20 epochs (LeNet), 2 (SimpleNet).
RECIPES = {"lenet300-100": Recipe(epochs=20), "simplenet": Recipe(epochs=2)}
KEEP_DENSE = {"lenet300-100": ("last",), "simplenet": ("first", "last")}
# (sparsity, patterns) per model; "unstructured" is the reference of each sparsity.
PLAN = {
    "lenet300-100": [(0.5, ("unstructured", "2:4")),
                     (0.9, ("unstructured", "fan_in", "block4x4", "block1x4")),
                     (0.95, ("unstructured", "fan_in", "block4x4", "block1x4"))],
    "simplenet": [(0.5, ("unstructured", "2:4")),
                  (0.9, ("unstructured", "fan_in", "block4x4", "block1x8")),
                  (0.95, ("unstructured", "fan_in", "block4x4", "block1x8"))],
}


def method_for(name: str, pattern: str):
    """SET or RigL in ``pattern``; RigL under constant fan-in is SRigL.

    With this project's step (``improved``: scaled init, no regrowth of just-pruned weights, rounded
    counts, the optimizer stepping on update steps, SET pruning by |w|), which every pattern can keep
    (SET's reference sign split cannot), so the patterns are compared under one rule; the committed
    results were measured with it.
    """
    if name == "rigl" and pattern == "fan_in":
        return improved(METHODS["srigl"])
    return replace(improved(METHODS[name]), pattern=pattern)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(PLAN), default=list(PLAN))
    parser.add_argument("--methods", nargs="+", choices=["set", "rigl"], default=["set", "rigl"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, help="override each model's epochs")
    parser.add_argument("--max-batches", type=int, help="cap on batches per epoch (a smoke run)")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in the results file")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                        help="only write --output as the union of these results files (one per process), then "
                             "print the table")
    args = parser.parse_args()
    for option in ("epochs", "max_batches"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    if any(seed < 0 for seed in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct numbers >= 0, got {args.seeds}")
    return args


def key(row: dict) -> tuple:
    return row["model"], row["method"], row["pattern"], row["sparsity"], row["seed"]


def combine(paths: list[Path], output: Path) -> dict:
    """One results file holding every row of ``paths`` (written by parallel processes); a run twice is refused."""
    record, seen = None, {}
    for path in paths:
        try:
            source = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise SystemExit(f"--combine {path}: not a readable results file ({error})") from None
        if not isinstance(source, dict) or not isinstance(source.get("rows"), list):
            raise SystemExit(f"--combine {path}: not a results file of this benchmark (no list of rows)")
        record = record or {key: value for key, value in source.items() if key != "rows"} | {"rows": []}
        record.setdefault("recipes", {}).update(source.get("recipes", {}))
        for row in source["rows"]:
            if key(row) in seen:
                raise SystemExit(f"{path}: the run {key(row)} is also in {seen[key(row)]}")
            seen[key(row)] = path
            record["rows"].append(row)
    output.write_text(json.dumps(record, indent=1) + "\n")
    return record


def main() -> None:
    args = parse_args()
    if args.combine:
        print(pattern_table(summarize_patterns(combine(args.combine, args.output)["rows"])))
        return
    torch.set_num_threads(1)
    record = json.loads(args.output.read_text()) if args.resume and args.output.exists() else {"rows": []}
    done = {key(row) for row in record["rows"]}
    train = load_mnist_tensors("./data", train=True)
    test_loader = TensorLoader(*load_mnist_tensors("./data", train=False), batch_size=1000)
    record.update(environment={"torch": torch.__version__, "python": platform.python_version(),
                               "cpu_count": os.cpu_count(), "processor": cpu_model() or platform.processor()},
                  keep_dense={model: list(KEEP_DENSE[model]) for model in PLAN}, allocation="uniform")
    for model in args.models:
        recipe = replace(RECIPES[model], **({"epochs": args.epochs} if args.epochs else {}),
                         **({"max_batches_per_epoch": args.max_batches} if args.max_batches else {}))
        record.setdefault("recipes", {})[model] = json.loads(json.dumps(asdict(recipe)))
        for sparsity, patterns in PLAN[model]:
            for seed in args.seeds:
                for name in args.methods:
                    for pattern in patterns:
                        method = method_for(name, pattern)
                        if (model, method.label, pattern, sparsity, seed) in done:
                            continue
                        started = time.perf_counter()
                        row = train_run(model, method, Target(sparsity, "uniform", KEEP_DENSE[model]), recipe,
                                        train, test_loader, seed=seed)
                        record["rows"].append(row)
                        print(f"{model:13} {method.label:14} {100 * sparsity:4g} % seed {seed}: {row['test_acc']:.2f} %"
                              f" (sparsity reached {row['final_sparsity']:.4f}, {time.perf_counter() - started:.0f} s)",
                              flush=True)
                        args.output.parent.mkdir(parents=True, exist_ok=True)
                        temporary = args.output.with_suffix(".tmp")
                        temporary.write_text(json.dumps(record, indent=1) + "\n")
                        os.replace(temporary, args.output)
    print(pattern_table(summarize_patterns(record["rows"])))


if __name__ == "__main__":
    main()
