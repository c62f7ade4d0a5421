"""The truly sparse MLP at the scale of its anchor: 784-W-W-10 on MNIST, W up to 524288 (1.05 M hidden neurons).

"Truly Sparse Neural Networks at Scale" (Curci, Mocanu, Pechenizkiy 2021) trains such MLPs on a
laptop CPU. Here ``SparseMLP`` on the numba backend (batch 128, SGD momentum, SET every 100
steps, ``dst.csr.mlp.SET_DST``) trains one MNIST epoch per width, each width in its own
process so its peak resident set is its own, with a progress bar (step time and RSS), a
checkpoint every ``--checkpoint-every`` steps, and ``--resume PATH`` to go on from one
(a checkpoint holds the model, its optimizer state and random stream, and where the epoch
was: the resumed run takes the same steps as one never stopped).

``--density eps20`` is SET's epsilon: 20 x (n_in + n_out) active weights per layer, spread
by ERK (the 10-unit output layer, which that would overfill, is dense); a number is a
sparsity (``--density 0.99``: 99 % of weights zero, uniform over layers unless
``--allocation`` says otherwise). A net that would not fit in memory fails before
allocating (``dst.csr.memory``) and its row says so.

Results: benchmarks/results/sparse_training_scale.json (rows merged by width and density,
so widths can be run one at a time) and .png (step time and peak RSS against width).

Run from the repository root, e.g.:
    python -m benchmarks.sparse_training --scale 16384,65536 --density eps20
    python -m benchmarks.sparse_training --scale 524288 --density eps20 --checkpoint-every 100
    python -m benchmarks.sparse_training --scale 524288 --density eps20 --resume results/checkpoints/...npz
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from dst.core.progress import Progress
from dst.csr.linear import SparseLinear
from dst.csr.mlp import DEFAULT_OPTIMIZER, SET_DST, SparseMLP, SparseMLPStep
from dst.csr.optimizers import OptimizerConfig
from dst.engine.schedule import DSTScheduler

RESULTS = Path(__file__).resolve().parent / "results"
CHECKPOINTS = Path(__file__).resolve().parents[1] / "results" / "checkpoints"  # git-ignored


def _shown(path: Path) -> str:
    """``path`` as the results file records it: relative to the repository where it lies inside it (no machine's
    folders in a committed file)."""
    root = Path(__file__).resolve().parents[1]
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)
IN_FEATURES, CLASSES = 784, 10
# The width the scaling goal measures the widest against: its activations (8 MiB a layer at batch 128) stay in cache.
SCALING_REFERENCE = 16384
# Steps that are not timed: the first (buffers, the kernels' index layouts) and each one right after an update.
UNTIMED_AFTER_UPDATE = 1


def parse_widths(text: str) -> list[int]:
    """``"16384,65536"`` -> [16384, 65536]; every width a positive int."""
    try:
        widths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scale takes comma-separated positive widths, got {text!r}") from None
    if not widths or any(width < 1 for width in widths):
        raise argparse.ArgumentTypeError(f"--scale takes comma-separated positive widths, got {text!r}")
    return widths


def parse_density(text: str) -> str:
    """``epsN`` (SET's epsilon, N > 0) or a sparsity in [0, 1); returned as given, checked."""
    if text.startswith("eps"):
        try:
            valid = float(text[3:]) > 0
        except ValueError:
            valid = False
    else:
        try:
            valid = 0.0 <= float(text) < 1.0
        except ValueError:
            valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"--density takes epsN (SET's epsilon, e.g. eps20) or a sparsity in "
                                         f"[0, 1) (e.g. 0.99 = 99% of weights zero), got {text!r}")
    return text


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def sparsity_and_allocation(width: int, density: str, allocation: str | None) -> tuple[float, str]:
    """The global sparsity and allocation that ``density`` means for 784-width-width-10."""
    widths = (IN_FEATURES, width, width, CLASSES)
    sizes = [(n_in, n_out) for n_in, n_out in zip(widths[:-1], widths[1:], strict=True)]
    total = sum(n_in * n_out for n_in, n_out in sizes)
    if density.startswith("eps"):
        epsilon = float(density[3:])
        active = sum(min(epsilon * (n_in + n_out), n_in * n_out) for n_in, n_out in sizes)
        return 1.0 - active / total, allocation or "erk"
    return float(density), allocation or "uniform"


def load_data(synthetic: bool, data_dir: str):
    """(train_x, train_y, test_x, test_y) as numpy arrays: MNIST, or MNIST-shaped noise for quick runs."""
    if synthetic:
        rng = np.random.default_rng(0)
        return (rng.standard_normal((2048, IN_FEATURES), dtype=np.float32), rng.integers(0, CLASSES, 2048),
                rng.standard_normal((512, IN_FEATURES), dtype=np.float32), rng.integers(0, CLASSES, 512))
    from dst.core.data import load_mnist_tensors

    train_x, train_y = load_mnist_tensors(data_dir, train=True)
    test_x, test_y = load_mnist_tensors(data_dir, train=False)
    return (train_x.reshape(len(train_x), -1).numpy(), train_y.numpy(),
            test_x.reshape(len(test_x), -1).numpy(), test_y.numpy())


def rss_bytes() -> int:
    """This process's resident set now (Linux /proc), else its peak."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, model: SparseMLP, run: dict) -> None:
    """The model (CSR arrays, biases, optimizer state, step count, random stream) and ``run`` (where the
    epoch is, its order, the timings so far), written to a temporary file and renamed, so a run killed
    while writing leaves the previous checkpoint whole."""
    arrays = {"order": run.pop("order")}
    for name, layer in model.layers.items():
        arrays |= {f"{name}.indptr": layer.indptr, f"{name}.columns": layer.columns, f"{name}.weight": layer.weight,
                   f"{name}.bias": layer.bias}
        arrays |= {f"{name}.state.{key}": values for key, values in layer.state.items()}
        arrays |= {f"{name}.bias_state.{key}": values for key, values in layer.bias_state.items()}
    meta = run | {"shapes": {name: layer.shape for name, layer in model.layers.items()},
                  "steps": model.steps, "rng": model.rng.bit_generator.state,
                  "optimizer": vars(model.optimizer) | {"betas": list(model.optimizer.betas)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        np.savez(file, meta=np.array(json.dumps(meta)), **arrays)
    os.replace(partial, path)
    run["order"] = arrays["order"]


def load_checkpoint(path: Path) -> tuple[SparseMLP, dict]:
    """The model and the run state ``save_checkpoint`` wrote."""
    with np.load(path) as saved:
        meta = json.loads(str(saved["meta"]))
        layers = []
        for name, shape in meta["shapes"].items():
            layer = SparseLinear.from_csr(tuple(shape), saved[f"{name}.indptr"], saved[f"{name}.columns"],
                                          saved[f"{name}.weight"], saved[f"{name}.bias"], _backend())
            for key in saved.files:
                if key.startswith(f"{name}.state."):
                    layer.state[key.split(".", 2)[2]] = saved[key].copy()
                elif key.startswith(f"{name}.bias_state."):
                    layer.bias_state[key.split(".", 2)[2]] = saved[key].copy()
            layers.append(layer)
        optimizer = meta.pop("optimizer")
        model = SparseMLP(layers, OptimizerConfig(**optimizer | {"betas": tuple(optimizer["betas"])}))
        model.steps = meta.pop("steps")
        model.rng.bit_generator.state = meta.pop("rng")
        run = meta | {"order": saved["order"].copy()}
    return model, run


def _backend():
    from dst.csr.backends import get_backend

    return get_backend("numba")


# ----------------------------------------------------------------------------- one width

def train_width(spec: dict) -> dict:
    """Train one width for ``spec["epochs"]`` epochs (or ``max_steps`` steps in all); the result row."""
    width, density = spec["width"], spec["density"]
    sparsity, allocation = sparsity_and_allocation(width, density, spec["allocation"])
    row = {"width": width, "density": density, "sparsity": sparsity, "allocation": allocation,
           "batch_size": spec["batch_size"], "epochs": spec["epochs"], "max_steps": spec["max_steps"]}
    train_x, train_y, test_x, test_y = load_data(spec["synthetic"], spec["data_dir"])
    row["data"] = "synthetic" if spec["synthetic"] else "mnist"
    SparseMLP.random(IN_FEATURES, (8, 8), CLASSES, 0.5, backend="numba").warm_up(train_x[:4], train_y[:4])
    row["rss_before_model_bytes"] = rss_bytes()
    started = time.perf_counter()
    if spec["resume"]:
        model, run = load_checkpoint(Path(spec["resume"]))
        if (run["width"], run["density"], run["batch_size"]) != (width, density, spec["batch_size"]):
            raise ValueError(f"{spec['resume']} is a checkpoint of width {run['width']}, density {run['density']}, "
                             f"batch {run['batch_size']}; this run asks for {width}, {density}, {spec['batch_size']}")
        row["resumed_from"] = {"path": spec["resume"], "steps": model.steps}
    else:
        try:
            model = SparseMLP.random(IN_FEATURES, (width, width), CLASSES, sparsity, allocation,
                                     DEFAULT_OPTIMIZER, seed=spec["seed"], backend="numba")
        except MemoryError as error:
            return row | {"skipped": str(error)}
        run = {"width": width, "density": density, "batch_size": spec["batch_size"], "epoch": 0, "next_batch": 0,
               "order": model.rng.permutation(len(train_x)), "step_s": [], "update_s": [], "losses": [],
               "train_s": 0.0}
    row["init_s"] = time.perf_counter() - started
    row["active_weights"] = model.active_counts()
    row["model_bytes"] = model.nbytes()
    row |= train_epochs(model, run, spec, train_x, train_y)
    row["model_bytes_after"] = model.nbytes()  # with the index layouts the parallel products built
    row["peak_rss_bytes"] = peak_rss_bytes()
    if row["finished_epochs"] == spec["epochs"]:
        row["test_accuracy"] = model.evaluate(test_x, test_y, batch_size=spec["batch_size"])
    return row


def train_epochs(model: SparseMLP, run: dict, spec: dict, train_x, train_y) -> dict:
    """The step loop of ``SparseMLP.fit``, resumable: ``run`` says where it is and is checkpointed as it goes."""
    batch_size, per_epoch = spec["batch_size"], -(-len(train_x) // spec["batch_size"])
    total = spec["epochs"] * per_epoch if spec["max_steps"] is None else min(spec["max_steps"],
                                                                              spec["epochs"] * per_epoch)
    scheduler = DSTScheduler(SET_DST, SparseMLPStep(model, SET_DST.regrow), steps=model.steps)
    checkpoint = Path(spec["checkpoint"] or CHECKPOINTS / f"sparse_training_scale_{run['width']}_{run['density']}.npz")
    bar = Progress(total, f"width {run['width']} {run['density']}", enabled=spec["progress"])
    bar.update(model.steps)
    untimed = 1  # the first step of a process: buffers and the kernels' index layouts are made there
    started = time.perf_counter()
    while run["epoch"] < spec["epochs"] and model.steps < total:
        order = run["order"]
        for begin in range(run["next_batch"] * batch_size, len(order), batch_size):
            if model.steps >= total:
                break
            batch = order[begin:begin + batch_size]
            step_started = time.perf_counter()
            run["losses"].append(model.train_step(train_x[batch], train_y[batch]))
            if not untimed:
                run["step_s"].append(time.perf_counter() - step_started)
            untimed = max(0, untimed - 1)
            update_started = time.perf_counter()
            if scheduler.after_step() is not None:
                run["update_s"].append(time.perf_counter() - update_started)
                untimed = UNTIMED_AFTER_UPDATE
            run["next_batch"] += 1
            median = 1e3 * float(np.median(run["step_s"])) if run["step_s"] else float("nan")
            bar.update(1, f"{median:.0f} ms/step, RSS {rss_bytes() / 2**30:.2f} GiB")
            if spec["checkpoint_every"] and model.steps % spec["checkpoint_every"] == 0:
                run["train_s"] += time.perf_counter() - started
                started = time.perf_counter()
                save_checkpoint(checkpoint, model, run)
        else:
            scheduler.after_epoch()
            run["epoch"], run["next_batch"] = run["epoch"] + 1, 0
            run["order"] = model.rng.permutation(len(train_x))
    run["train_s"] += time.perf_counter() - started
    bar.close()
    if spec["checkpoint_every"]:
        save_checkpoint(checkpoint, model, run)
    step_s, update_s = np.array(run["step_s"]), np.array(run["update_s"])
    median_ms = 1e3 * float(np.median(step_s)) if len(step_s) else None
    active = sum(model.active_counts().values())
    return {"steps": model.steps, "finished_epochs": run["epoch"], "steps_per_epoch": per_epoch,
            "step_ms_median": median_ms, "step_ms_p90": 1e3 * float(np.quantile(step_s, 0.9)) if len(step_s) else None,
            "timed_steps": len(step_s), "update_s_mean": float(update_s.mean()) if len(update_s) else None,
            "updates": len(update_s), "train_s": run["train_s"],
            # the epoch a step time implies, with its 4-5 SET updates: comparable across capped runs
            "epoch_s_estimate": (None if median_ms is None else median_ms / 1e3 * per_epoch
                                 + (float(update_s.mean()) if len(update_s) else 0.0) * (per_epoch // SET_DST.every)),
            "ns_per_active_weight_sample": (None if median_ms is None
                                            else median_ms * 1e6 / (active * batch_size)),
            "last_loss": run["losses"][-1] if run["losses"] else None,
            "checkpoint": _shown(checkpoint) if spec["checkpoint_every"] else None}


# ----------------------------------------------------------------------------- the sweep

def run_in_child(spec: dict) -> dict:
    """``train_width`` in a fresh interpreter, its progress bar on this terminal, its row back as JSON."""
    command = [sys.executable, "-m", "benchmarks.sparse_training_scale", "--child", json.dumps(spec)]
    output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=child_environment(),
                            cwd=Path(__file__).resolve().parents[1]).stdout
    return json.loads(output.strip().splitlines()[-1])


def child_environment() -> dict:
    """This environment, with OpenMP's idle threads sleeping unless the caller chose otherwise.

    Spinning (OpenMP's default) keeps the kernels' second thread busy between the parallel products,
    and on a shared 2-core machine that steals the core the serial parts of a step run on.
    """
    return os.environ | {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def merge_rows(path: Path, rows: list[dict]) -> list[dict]:
    """The rows already in ``path``, those of the same width and density replaced by ``rows``."""
    new = {(row["width"], row["density"]) for row in rows}
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    merged = [row for row in old if (row["width"], row["density"]) not in new] + rows
    return sorted(merged, key=lambda row: (row["density"], row["width"]))


def plot(rows: list[dict]) -> Figure:
    """Step time and peak RSS (with the model's own bytes) against width, one line per density; the widths
    refused as too big for memory are named under the plots."""
    figure = Figure(figsize=(11, 4.5))
    time_axis, memory_axis = figure.subplots(1, 2)
    trained = [row for row in rows if row.get("step_ms_median")]
    for density in sorted({row["density"] for row in trained}):
        own = sorted((row for row in trained if row["density"] == density), key=lambda row: row["width"])
        widths = [row["width"] for row in own]
        time_axis.plot(widths, [row["step_ms_median"] for row in own], "-o", label=f"{density}")
        line, = memory_axis.plot(widths, [row["peak_rss_bytes"] / 2**30 for row in own], "-o",
                                 label=f"{density}: peak RSS")
        memory_axis.plot(widths, [(row["peak_rss_bytes"] - row["rss_before_model_bytes"]) / 2**30 for row in own],
                         ":o", color=line.get_color(), label=f"{density}: peak RSS beyond the bare process")
        memory_axis.plot(widths, [row["model_bytes_after"] / 2**30 for row in own], "--", color=line.get_color(),
                         label=f"{density}: model (weights, grads, state, indices)")
    for axis, label in ((time_axis, "ms per training step (batch 128)"), (memory_axis, "GiB")):
        axis.set_xlabel("hidden width (784 -> w -> w -> 10)")
        axis.set_ylabel(label)
        if not trained:  # nothing to put on a log scale
            axis.text(0.5, 0.5, "no width trained", ha="center", va="center", transform=axis.transAxes)
            continue
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    time_axis.set_title("Truly sparse training step (numba)")
    memory_axis.set_title("Memory")
    refused = [f"width {row['width']} at {row['density']}" for row in rows if "skipped" in row]
    if refused:
        figure.text(0.5, 0.01, "does not fit in memory, refused before allocating: " + "; ".join(refused),
                    ha="center", fontsize=8)
    figure.tight_layout(rect=(0, 0.04 if refused else 0, 1, 1))
    return figure


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sparse_training --scale",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=parse_widths, metavar="WIDTH[,WIDTH...]",
                        help="hidden widths to train, each in its own process")
    parser.add_argument("--density", "--sparsity", type=parse_density, default="eps20",
                        help="epsN (SET's epsilon: N x (n_in + n_out) weights a layer) or a sparsity in [0, 1)")
    parser.add_argument("--allocation", choices=("erk", "uniform"),
                        help="how the weights spread over layers (default: erk for epsN, uniform for a sparsity)")
    parser.add_argument("--epochs", type=positive_int, default=1)
    parser.add_argument("--max-steps", type=positive_int, help="stop after this many steps in all (quick runs)")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=positive_int, help="save a checkpoint every N steps")
    parser.add_argument("--checkpoint", help="checkpoint file (default: results/checkpoints/, one per width)")
    parser.add_argument("--resume", help="go on from this checkpoint (one width only)")
    parser.add_argument("--synthetic", action="store_true", help="MNIST-shaped noise instead of MNIST (smoke tests)")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--replot", action="store_true", help="redraw the figure from the JSON, train nothing "
                        "(python -m benchmarks.sparse_training_scale --replot)")
    parser.add_argument("--readme", action="store_true", help="print the README's table from the JSON, train nothing")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The CLI values, checked together (argparse checks each one)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.replot or args.readme:
        return args
    if args.scale is None:
        parser.error("--scale WIDTH[,WIDTH...] is required (or --replot)")
    if args.resume is not None:
        if len(args.scale) != 1:
            parser.error(f"--resume continues one width's run; --scale gave {len(args.scale)}")
        if not Path(args.resume).is_file():
            parser.error(f"--resume: no checkpoint at {args.resume}")
    if args.checkpoint is not None and len(args.scale) != 1:
        parser.error("--checkpoint names one file: give one width, or leave it out (one file per width)")
    if args.checkpoint is not None and not args.checkpoint_every:
        parser.error("--checkpoint needs --checkpoint-every N")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(train_width(json.loads(argv[1]))))
        return
    args = parse_args(argv)
    path = args.results_dir / "sparse_training_scale.json"
    if args.replot:
        plot(json.loads(path.read_text())["rows"]).savefig(path.with_suffix(".png"), dpi=120, bbox_inches="tight")
        print(f"redrew {path.with_suffix('.png')}")
        return
    if args.readme:
        print(readme_table(json.loads(path.read_text())["rows"]))
        return
    rows = []
    for width in args.scale:
        spec = {"width": width, "density": args.density, "allocation": args.allocation, "epochs": args.epochs,
                "max_steps": args.max_steps, "batch_size": args.batch_size, "seed": args.seed,
                "checkpoint_every": args.checkpoint_every, "checkpoint": args.checkpoint, "resume": args.resume,
                "synthetic": args.synthetic, "data_dir": args.data_dir, "progress": args.progress}
        row = run_in_child(spec)
        rows.append(row)
        print(format_row(row), flush=True)
    from dst.tutorial.benchmark import benchmark_environment

    args.results_dir.mkdir(parents=True, exist_ok=True)
    merged = merge_rows(path, rows)
    report = {"network": "784-W-W-10 MLP, ReLU, softmax cross-entropy", "backend": "numba",
              "optimizer": "sgd lr 0.01 momentum 0.9" if DEFAULT_OPTIMIZER.momentum else DEFAULT_OPTIMIZER.name,
              "dst": f"SET: prune_ratio {SET_DST.prune_ratio}, every {SET_DST.every} steps",
              "environment": benchmark_environment(device="cpu")
              | {"omp_wait_policy": child_environment()["OMP_WAIT_POLICY"]},
              "rows": merged}
    path.write_text(json.dumps(report, indent=1))
    plot(merged).savefig(path.with_suffix(".png"), dpi=120, bbox_inches="tight")
    print(f"wrote {path} and {path.with_suffix('.png')}")


def readme_table(rows: list[dict]) -> str:
    """The README's table of the eps20 widths in ``rows``, and how much more the widest costs per active weight
    than ``SCALING_REFERENCE`` (the scaling goal's yardstick)."""
    shown = sorted((row for row in rows if row["density"] == "eps20" and "skipped" not in row),
                   key=lambda row: row["width"])
    lines = ["| width | active weights | ms/step (median) | epoch | ns per active weight and sample | test acc. | "
             "peak RSS beyond the bare process | model at the start / after the epoch |",
             "|---|---|---|---|---|---|---|---|"]
    for row in shown:
        width = row["width"]
        label = f"2 × {width} ({2 * width / 1e6:.2f} M neurons)" if 2 * width >= 10**6 else str(width)
        lines.append(f"| {label} | {sum(row['active_weights'].values()) / 1e6:.2f} M | {row['step_ms_median']:,.1f} | "
                     f"{row['train_s']:,.0f} s | {row['ns_per_active_weight_sample']:.3f} | "
                     f"{row['test_accuracy']:.2f} % | "
                     f"{(row['peak_rss_bytes'] - row['rss_before_model_bytes']) / 2**30:.2f} GiB | "
                     f"{row['model_bytes'] / 2**30:.3f} / {row['model_bytes_after'] / 2**30:.3f} GiB |")
    by_width = {row["width"]: row for row in shown}
    if SCALING_REFERENCE in by_width and shown[-1]["width"] > SCALING_REFERENCE:
        ratio = shown[-1]["ns_per_active_weight_sample"] / by_width[SCALING_REFERENCE]["ns_per_active_weight_sample"]
        lines += ["", f"Per active weight and sample, width {shown[-1]['width']} costs {ratio:.2f}x what width "
                      f"{SCALING_REFERENCE} does in this run (the goal: within 2x)."]
    return "\n".join(lines)


def format_row(row: dict) -> str:
    if "skipped" in row:
        return f"width {row['width']} {row['density']}: skipped: {row['skipped']}"
    accuracy = f", test accuracy {row['test_accuracy']:.2f}%" if "test_accuracy" in row else ""
    return (f"width {row['width']} {row['density']}: {sum(row['active_weights'].values()):,} active weights, "
            f"{row['step_ms_median']:.1f} ms/step ({row['timed_steps']} timed), {row['steps']} steps, "
            f"epoch ~{row['epoch_s_estimate']:.0f} s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB, "
            f"model {row['model_bytes_after'] / 2**30:.3f} GiB{accuracy}")


if __name__ == "__main__":
    main()
