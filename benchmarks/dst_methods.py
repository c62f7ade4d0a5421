"""A decade of DST in one figure: every method at every sparsity, trained the same way, on MNIST.

Methods (``dst.methods.catalog``): dense, static, set, rigl, snfs, gmp. Models: LeNet-300-100
(784-300-100-10, the MLP of the DST papers' MNIST tables) and the tutorial's SimpleNet.
Writes benchmarks/results/dst_methods_<mode>.json (every run's row, the summary over
seeds, the recipes, the published numbers) and .png (the figure), and prints the
accuracy tables. Rows are saved as they finish; ``--resume`` skips those already saved (with nothing left to
run it only redraws the figure and prints the tables). ``--merge`` adds the rows of other results files, so that
parallel invocations (one per core) end in one file; both refuse rows trained with other settings. One invocation
at a time writes a given file (a second one with the same --name is refused), and every save replaces it whole.

Modes (any setting can be overridden on the command line):
- ``quick`` (about 7 minutes on one core): both models, 7 sparsities, 1 seed, 3 epochs of 100
  batches for LeNet, 2 for SimpleNet; RigL and GMP update every 25 steps instead of 100 so
  that such short runs still see several updates. A smoke test: SimpleNet is far from trained.
- ``medium`` (what the development machine could afford): the paper's recipe cut to 20 epochs
  for LeNet and 2 for SimpleNet (the lr decays at the same fractions of training), 2 seeds. SimpleNet's
  committed panel is a run of its own (10 epochs, lr 0.02, the sparse methods' init scaled; README).
- ``full``: the paper's recipe (sparse_learning's MNIST recipe: SGD momentum 0.9 Nesterov,
  lr 0.1 decayed x0.1 twice, weight decay 5e-4, batch 100, 100 epochs), 3 seeds, both models.
  3.6 minutes per LeNet run on one core of the development machine (two runs at a time); SimpleNet's
  epochs are about 12 times longer.

Data: MNIST in ./data (``make data``). Run from the repository root:
    nice -n 10 python -m benchmarks.dst_methods --mode quick
    python -m benchmarks.dst_methods --mode full --models lenet300-100 --sparsities 0.95 0.99 --epochs 20
SET with sparse_learning's schedule (prune 50 %, cosine-decayed), and with this project's rules:
    python -m benchmarks.dst_methods --mode full --methods set --set set.prune_ratio=0.5 set.schedule=cosine \
        --name dst_methods_set_cosine
    python -m benchmarks.dst_methods --mode full --methods set --set set.sign_split=false set.scale_init=true \
        --name dst_methods_set_improved
Methods run as their reference code (``dst.methods.catalog``); ``--set`` changes any setting, ``--recipe`` the
recipe (e.g. ``--recipe lr=0.02``).
Two cores, two processes, one file (the final call runs what is missing and draws the figure):
    python -m benchmarks.dst_methods --mode full --sparsities 0.95 --name part95 &
    python -m benchmarks.dst_methods --mode full --sparsities 0.99 --methods static set rigl snfs gmp --name part99
    python -m benchmarks.dst_methods --mode full --sparsities 0.95 0.99 \
        --merge benchmarks/results/part95.json benchmarks/results/part99.json
"""

import argparse
import datetime
import fcntl
import hashlib
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from benchmarks.row_file import write_atomically
from dst.core.data import TensorLoader, load_mnist_tensors
from dst.engine.allocation import check_sparsity
from dst.methods.catalog import METHODS, Method, improved
from dst.methods.sweep import MODELS, Recipe, accuracy_table, comparison_table, run_sweep, summarize
from dst.tutorial.sweep_figure import plot_method_sweep

RESULTS = Path(__file__).resolve().parent / "results"
# Files written before the methods followed their reference code (no "rules" key) ran this project's rules: a setting
# they do not name ran as ``improved(method)`` has it, not as today's default.
RULES = "reference"
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)
# Dettmers & Zettlemoyer 2019, sparse_learning's results/MNIST_sparse_summary.csv: LeNet-300-100,
# 100 epochs, uniform density per layer, mean of several seeds. DSR is not among our methods.
PUBLISHED = [{"model": "lenet300-100", "method": "dense", "sparsity": 0.0, "test_acc": 98.69, "allocation": "uniform",
              "epochs": 100}] + [
    {"model": "lenet300-100", "method": method, "sparsity": sparsity, "test_acc": accuracy, "allocation": "uniform",
     "epochs": 100}
    for method, numbers in {"snfs": {0.9: 98.67, 0.95: 98.53, 0.98: 98.20, 0.99: 97.53},
                            "set": {0.9: 98.39, 0.95: 98.14, 0.98: 97.74, 0.99: 95.80}}.items()
    for sparsity, accuracy in numbers.items()]
PUBLISHED_LABEL = "published: Dettmers & Zettlemoyer 2019 (uniform, 100 epochs)"
MODES = {
    "quick": {"recipes": {"lenet300-100": Recipe(epochs=3, max_batches_per_epoch=100),
                          "simplenet": Recipe(epochs=2, max_batches_per_epoch=100)},
              "seeds": [0], "every": 25},
    "medium": {"recipes": {"lenet300-100": Recipe(epochs=20), "simplenet": Recipe(epochs=2)},
               "seeds": [0, 1], "every": None},
    "full": {"recipes": {"lenet300-100": Recipe(), "simplenet": Recipe()}, "seeds": [0, 1, 2], "every": None},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=list(MODES), default="quick")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    parser.add_argument("--seeds", nargs="+", type=int, help="default: the mode's")
    parser.add_argument("--epochs", type=int, help="override the mode's epochs (lr decays at the same fractions)")
    parser.add_argument("--max-batches", type=int, help="cap on batches per epoch")
    parser.add_argument("--every", type=int, help="steps between RigL updates and GMP prunings (default 100)")
    parser.add_argument("--set", nargs="+", default=[], metavar="METHOD.FIELD=VALUE", dest="settings",
                        help="change a method's setting, e.g. set.prune_ratio=0.5 set.schedule=cosine")
    parser.add_argument("--recipe", nargs="+", default=[], metavar="FIELD=VALUE", dest="recipe_settings",
                        help="change the recipe of every model, e.g. lr=0.02 nesterov=false")
    parser.add_argument("--allocation", choices=["erk", "uniform"], default="erk")
    parser.add_argument("--keep-dense", nargs="*", default=[], help="'first', 'last' or layer names")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves the other core free)")
    parser.add_argument("--name", help="results file stem (default dst_methods_<mode>[_<allocation>])")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in the results file")
    parser.add_argument("--merge", nargs="+", default=[], type=Path, metavar="JSON",
                        help="add the rows of these results files (parallel invocations of the same settings)")
    return parser.parse_args()


def check_args(args: argparse.Namespace) -> None:
    """Refuse repeated values (the same run twice is not two seeds) and numbers that are not counts."""
    for option in ("models", "methods", "sparsities", "seeds"):
        values = getattr(args, option) or []
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            raise SystemExit(f"--{option} repeats {repeated}: each run would be trained twice and counted as two")
    for sparsity in args.sparsities:
        try:
            check_sparsity(sparsity)
        except ValueError as error:
            raise SystemExit(f"--sparsities: {error}") from None
    for option in ("epochs", "max_batches", "every", "threads"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise SystemExit(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    if any(seed < 0 for seed in args.seeds or []):
        raise SystemExit(f"--seeds must be >= 0, got {args.seeds}")


def with_settings(methods: list[Method], settings: list[str]) -> list[Method]:
    """``methods`` with ``METHOD.FIELD=VALUE`` settings applied, each value read as that field's type."""
    methods = {method.name: method for method in methods}
    for text in settings:
        target, equals, value = text.partition("=")
        name, dot, field = target.partition(".")
        if not (equals and dot):
            raise SystemExit(f"--set {text!r}: write METHOD.FIELD=VALUE, e.g. set.prune_ratio=0.5")
        if name not in methods:
            raise SystemExit(f"--set {text!r}: {name!r} is not among this run's methods {list(methods)}")
        names = [known.name for known in fields(methods[name])]
        if field not in names:
            raise SystemExit(f"--set {text!r}: {name} has no setting {field!r}; its settings are {names}")
        kind = type(getattr(methods[name], field))
        try:
            typed = _boolean(value) if kind is bool else kind(value)
        except ValueError as error:
            raise SystemExit(f"--set {text!r}: {field} takes a {kind.__name__}: {error}") from None
        try:  # the method checks its settings when it is built, before any run starts
            methods[name] = replace(methods[name], **{field: typed})
        except (TypeError, ValueError) as error:
            raise SystemExit(f"--set {text!r}: {error}") from None
    return list(methods.values())


def with_recipe_settings(recipe: Recipe, settings: list[str]) -> Recipe:
    """``recipe`` with ``FIELD=VALUE`` settings applied, each value read as that field's type."""
    names = [field.name for field in fields(recipe)]
    for text in settings:
        field, equals, value = text.partition("=")
        if not equals or field not in names:
            raise SystemExit(f"--recipe {text!r}: write FIELD=VALUE with FIELD one of {names}")
        current = getattr(recipe, field)
        if isinstance(current, tuple) or field == "max_batches_per_epoch":
            raise SystemExit(f"--recipe {text!r}: {field} has its own option or cannot be set here")
        try:
            typed = _boolean(value) if isinstance(current, bool) else type(current)(value)
            recipe = replace(recipe, **{field: typed})
        except (TypeError, ValueError) as error:
            raise SystemExit(f"--recipe {text!r}: {error}") from None
    return recipe


def _boolean(text: str) -> bool:
    """'true'/'false' (any case, or 1/0) as a bool: ``bool("False")`` would be True."""
    if text.lower() in ("true", "1"):
        return True
    if text.lower() in ("false", "0"):
        return False
    raise ValueError(f"write true or false, got {text!r}")


def row_key(row: dict) -> tuple:
    """What identifies a run in a results file."""
    return row["model"], row["method"], row["sparsity"], row["seed"]


def new_record(mode: str, allocation: str, keep_dense: list[str], recipes: dict[str, Recipe],
               methods: list) -> dict:
    """A results file's settings, as JSON will read them back (tuples as lists), and no rows yet."""
    return json.loads(json.dumps({
        "mode": mode, "allocation": allocation, "keep_dense": keep_dense,
        "recipes": {model: asdict(recipe) for model, recipe in recipes.items()},
        "methods": {method.name: settings_of(method) for method in methods},
        "published": PUBLISHED, "wall_seconds": 0.0, "rules": RULES}))


def settings_of(method: Method | None) -> dict:
    """A method's settings and summary as a results file holds them (tuples as lists); {} for None."""
    if method is None:
        return {}
    return json.loads(json.dumps({**asdict(method), "summary": method.summary}))


def _settings(settings: dict) -> dict:
    return {key: value for key, value in settings.items() if key != "summary"}  # the summary is prose


def read_results(path: Path) -> dict:
    """A results file as JSON; SystemExit naming the file if it is unreadable (``combine_rows`` checks the rest)."""
    try:
        if not Path(path).is_file():  # before opening: a FIFO would block the open forever
            raise OSError("not a regular file")
        return json.loads(Path(path).read_bytes().decode())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise SystemExit(f"{path}: not a readable results file ({type(error).__name__}: {error})") from None


ROW_FIELDS = {"model": str, "method": str, "sparsity": (int, float), "seed": int, "test_acc": (int, float)}


def _check_source(path, source) -> None:
    """SystemExit unless ``source`` has a results file's settings and rows that say they were trained with them."""
    if not isinstance(source, dict):
        raise SystemExit(f"{path}: not a results file (a JSON {type(source).__name__}, not an object)")
    for key, kind in (("mode", str), ("allocation", str), ("keep_dense", list), ("recipes", dict),
                      ("methods", dict), ("rows", list)):
        if not isinstance(source.get(key), kind):
            raise SystemExit(f"{path}: not a results file of this benchmark: {key!r} should be a JSON "
                             f"{ {str: 'string', list: 'list', dict: 'object'}[kind]}, got {source.get(key)!r:.80}")
    if not isinstance(source.get("wall_seconds", 0.0), (int, float)) or isinstance(source.get("wall_seconds"), bool):
        raise SystemExit(f"{path}: 'wall_seconds' should be a number, got {source['wall_seconds']!r:.80}")
    for key in ("recipes", "methods"):
        if not all(isinstance(settings, dict) for settings in source[key].values()):
            raise SystemExit(f"{path}: every entry of {key!r} should be an object of settings")
    for index, row in enumerate(source["rows"]):
        where = f"{path}: row {index}"
        if not isinstance(row, dict):
            raise SystemExit(f"{where} is not an object")
        for field, kind in ROW_FIELDS.items():
            if not isinstance(row.get(field), kind) or isinstance(row.get(field), bool):
                raise SystemExit(f"{where}: {field!r} is {row.get(field)!r:.80}, not a {kind}")
        if row["model"] not in source["recipes"] or row["method"] not in source["methods"]:
            raise SystemExit(f"{where}: {row['model']} {row['method']} has no recipe or method settings in the file")
        for field, expected in (("recipe", source["recipes"][row["model"]]), ("allocation", source["allocation"]),
                                ("keep_dense", source["keep_dense"])):
            if field in row and row[field] != expected:
                raise SystemExit(f"{where} ({row_key(row)}) was trained with {field} {row[field]!r}, but the "
                                 f"file's settings say {expected!r}")


def combine_rows(record: dict, sources: list[tuple[Path, dict]]) -> list[dict]:
    """The rows of earlier results files (resumed or merged), folding their settings into ``record``.

    Refuses (naming the file and the setting) a file whose mode, allocation, recipe or method settings differ from
    ``record``'s, a row whose own settings differ from its file's, a file that is not a results file, and a run
    present twice: a table must not average runs trained differently.
    """
    rows, seen = [], {}
    for path, source in sources:
        _check_source(path, source)
        for field in ("mode", "allocation", "keep_dense"):
            if source.get(field) != record[field]:
                raise SystemExit(f"{path}: {field} is {source.get(field)!r}, this invocation's is {record[field]!r}; "
                                 "rerun with the same settings or write to another --name")
        for key, kind in (("recipes", "recipe"), ("methods", "method settings")):
            for name, settings in source.get(key, {}).items():
                if key == "methods":  # a setting added since the file was written ran as it did then
                    settings = {**settings_of(_as_then(name, source)), **settings}
                if _settings(record[key].setdefault(name, settings)) != _settings(settings):
                    raise SystemExit(f"{path}: {name}'s {kind} {_settings(settings)} differ from this invocation's "
                                     f"{_settings(record[key][name])}; rerun with the same settings or write to "
                                     "another --name")
        for row in source.get("rows", []):
            if row_key(row) in seen:
                raise SystemExit(f"{path}: the run {row_key(row)} is also in {seen[row_key(row)]}")
            seen[row_key(row)] = path
            rows.append(row)
        # Seconds of every invocation that added rows (parallel ones add up).
        record["wall_seconds"] += source.get("wall_seconds", 0.0)
    return rows


def _as_then(name: str, source: dict) -> Method | None:
    """The method ``name`` with the defaults it had when ``source`` was written."""
    method = METHODS.get(name)
    if method is not None and source.get("rules") != RULES:
        return improved(method)  # this project's rules, the only ones before
    return method


def hold_lock(json_path: Path):
    """An exclusive lock for ``json_path``, held while the returned file stays open (until the process ends).

    SystemExit if another invocation holds it: two writers of one file would each save only their own rows.
    The lock file lives in the temporary folder (named by a hash of the path), not beside the results.
    """
    digest = hashlib.sha256(str(json_path.resolve()).encode()).hexdigest()[:16]
    lock = open(Path(tempfile.gettempdir()) / f"dst_methods_{digest}.lock", "w")  # noqa: SIM115 (returned, held)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise SystemExit(f"another invocation is writing {json_path}: wait for it to finish (then --resume), or "
                         "write to another --name and --merge the files afterwards") from None
    return lock


def main() -> None:
    args = parse_args()
    check_args(args)
    torch.set_num_threads(args.threads)
    mode = MODES[args.mode]
    seeds = args.seeds if args.seeds is not None else mode["seeds"]
    every = args.every if args.every is not None else mode["every"]
    try:  # every setting is checked here, before the first run trains
        methods = [replace(METHODS[name], every=every) if every is not None and name in ("rigl", "gmp")
                   else METHODS[name] for name in args.methods]
        recipes = {model: replace(mode["recipes"][model],
                                  **({"epochs": args.epochs} if args.epochs is not None else {}),
                                  **({"max_batches_per_epoch": args.max_batches} if args.max_batches is not None
                                     else {}))
                   for model in args.models}
        recipes = {model: with_recipe_settings(recipe, args.recipe_settings) for model, recipe in recipes.items()}
    except ValueError as error:
        raise SystemExit(f"invalid setting: {error}") from None
    methods = with_settings(methods, args.settings)
    stem = args.name or f"dst_methods_{args.mode}" + ("" if args.allocation == "erk" else f"_{args.allocation}")
    json_path = RESULTS / f"{stem}.json"
    _lock = hold_lock(json_path)  # held (open) until main returns
    sources = [(path, read_results(path)) for path in
               ([json_path] if args.resume and json_path.exists() else []) + args.merge]
    train_x, train_y = load_mnist_tensors("./data", train=True)
    test_loader = TensorLoader(*load_mnist_tensors("./data", train=False), batch_size=1000)
    started = time.perf_counter()
    # Not dst.tutorial.benchmark.benchmark_environment: asking numba for its thread count starts an OpenMP pool that
    # then ran beside torch's single thread (a second busy core) and changed the floats of every run.
    environment = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                   "torch_threads": torch.get_num_threads(), "processor": platform.processor()}
    record = new_record(args.mode, args.allocation, args.keep_dense, recipes, methods)
    record.update(date=datetime.date.today().isoformat(), environment=environment)
    rows = combine_rows(record, sources)
    done = {row_key(row) for row in rows}
    earlier_seconds = record["wall_seconds"]

    def save(row: dict) -> None:
        rows.append(row)
        print(f"{row['model']:13} {row['method']:6} {row['sparsity']:6.3f} seed {row['seed']}: "
              f"{row['test_acc']:6.2f} %  {row['updates']:4d} updates  FLOPs {row['train_flops_vs_dense']:.3f} "
              f"x dense  {row['train_seconds']:6.1f} s", flush=True)
        record.update(rows=rows, seeds=sorted({row["seed"] for row in rows}),
                      wall_seconds=earlier_seconds + time.perf_counter() - started)
        write_atomically(json_path, json.dumps(record, indent=1) + "\n")

    for model in args.models:
        for seed in seeds:
            for method in methods:
                for sparsity in [0.0] if method.name == "dense" else args.sparsities:
                    if (model, method.name, sparsity, seed) in done:
                        continue
                    run_sweep([model], [method], [sparsity], [seed], recipes[model], (train_x, train_y), test_loader,
                              allocation=args.allocation, keep_dense=tuple(args.keep_dense), on_row=save)
    summary = summarize(rows)
    record.update(rows=rows, summary=summary, seeds=sorted({row["seed"] for row in rows}))
    write_atomically(json_path, json.dumps(record, indent=1) + "\n")
    budget = {}
    for model, recipe in record["recipes"].items():
        batches = recipe["max_batches_per_epoch"] or math.ceil(len(train_x) / recipe["batch_size"])
        budget[model] = f"{recipe['epochs']} epochs of {batches} batches of {recipe['batch_size']}"
    plot_method_sweep(rows, references=PUBLISHED, reference_label=PUBLISHED_LABEL,
                      save_path=json_path.with_suffix(".png"),
                      title=f"{record['date']}, {args.mode} mode, {args.allocation} allocation, "
                      f"seeds {record['seeds']}: "
                      + "; ".join(f"{model} {text}" for model, text in budget.items()))
    for model in dict.fromkeys(row["model"] for row in rows):
        print(f"\n{model} ({budget[model]}), test accuracy %:\n" + accuracy_table(summary, model))
    # Only where this run was trained as the published numbers were: another allocation or budget is not comparable.
    lenet = record["recipes"].get("lenet300-100", {})
    comparable = args.allocation == "uniform" and lenet.get("epochs") == 100
    if comparable and any(row["model"] == "lenet300-100" for row in rows):
        print("\nAgainst the published numbers (uniform allocation, 100 epochs):\n"
              + comparison_table(summary, PUBLISHED))
    print(f"\nwrote {json_path} and {json_path.with_suffix('.png').name} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
