"""Sweep: one training step of the truly sparse MLP against the masked dense torch MLP, by width.

The net is 784 -> width -> width -> 10 (uniform sparsity, batch 128, SGD with momentum).
Each width runs in its own process: the masked dense net is built first, so the
growth of that process's peak resident set is its measured memory; then the truly
sparse nets (one per sparsity, on the "numba" backend and on the pure numpy/"scipy"
one) are built under tracemalloc, and all steps are timed in turns (``time_interleaved``)
so a busy shared machine slows them alike. Where torch's default thread count is
beaten by one thread, the faster dense time is the baseline.

Memory columns: ``dense_bytes`` is the analytic weight + mask + gradient + momentum of
the masked net (``masked_dense_nbytes``); ``sparse_bytes`` is what the sparse layers
hold (``SparseMLP.nbytes``). A dense net that would not fit in this machine's memory
is not built, and one whose step would take too long is not timed; the JSON says why.

``--mnist`` also trains on MNIST (files in ./data, see ``dst.core.data``): the truly sparse
and the masked MLP side by side for one epoch, and a truly sparse MLP wider than any
masked one that fits in memory. Results go to benchmarks/results/sparse_training.json,
.png and _mnist.json (``--quick``: sparse_training_quick.*).

Run from the repository root:  python -m benchmarks.sparse_training [--quick] [--mnist]

``--scale WIDTH[,WIDTH...]`` is the other benchmark here: one MNIST epoch per width at the
scale of "Truly Sparse Neural Networks at Scale" (``benchmarks.sparse_training_scale``).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from dst.core.models import MLP
from dst.csr.comparison import masked_dense_nbytes
from dst.csr.mlp import DEFAULT_OPTIMIZER, SET_DST, SparseMLP
from dst.csr.optimizers import torch_optimizer
from dst.engine.masked import MaskedNet
from dst.tutorial.benchmark import benchmark_environment, time_interleaved

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 128
SPARSE_BACKENDS = ("numba", "scipy")
# Rough cost of one active weight in one step (three products over a batch of 128), from
# runs on this machine: used only to skip what would take too long, never reported as a time.
SPARSE_NS_PER_WEIGHT = {"numba": 400, "scipy": 1200}
# No single timed entry (warm-up and runs) may take longer than this.
ENTRY_LIMIT_S = 60.0
# Peak bytes per weight of the masked dense net while it trains: weight, mask, grad and
# momentum (13) plus autograd's weight*mask product and its gradient (8). Measured here:
# ~19 at width 4096. (Building it takes ~17: the base net, its copy, a randperm, the mask.)
DENSE_PEAK_BYTES_PER_WEIGHT = 21
# A net is only built if its estimated peak stays under this share of the machine's memory.
MEMORY_SHARE = 0.8


def widths_and_sparsities(quick: bool) -> tuple[list[int], list[float]]:
    if quick:
        return [1024, 4096], [0.99, 0.999]
    return [1024, 4096, 16384, 65536], [0.9, 0.99, 0.999]


def total_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_width(width: int, sparsities: list[float], dense_estimate_s: float | None) -> dict:
    """Everything for one width, in this process (the parent runs it in a fresh one)."""
    widths = (784, width, width, 10)
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((BATCH, 784)).astype(np.float32)
    targets = rng.integers(0, 10, BATCH)
    dense_bytes = masked_dense_nbytes(widths, DEFAULT_OPTIMIZER)
    weights = sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=True))
    result = {"width": width, "weights": weights, "dense_bytes": dense_bytes, "dense": {}, "sparse": []}
    entries = {}
    peak_bytes = DENSE_PEAK_BYTES_PER_WEIGHT * weights
    # Every entry takes one untimed step before the timing (memory is measured on it), so
    # wide nets, whose steps take seconds, need no further warm-up.
    runs, warmup = (5, 2) if weights < 5e7 else (2, 0)
    _compile_kernels()  # before tracemalloc: numba's first load would be counted as the model's
    if peak_bytes > MEMORY_SHARE * total_memory_bytes():
        result["dense"]["skipped"] = (f"does not fit: {dense_bytes / 2**30:.1f} GiB of weight, mask, grad and "
                                      f"momentum, ~{peak_bytes / 2**30:.0f} GiB at its peak, in "
                                      f"{total_memory_bytes() / 2**30:.1f} GiB of memory")
    elif dense_estimate_s is not None and dense_estimate_s * (runs + warmup) > ENTRY_LIMIT_S:
        result["dense"]["skipped"] = f"too slow: estimated {dense_estimate_s:.0f} s per step"
    else:
        before = peak_rss_bytes()
        torch.manual_seed(0)
        net = MaskedNet(MLP(784, (width, width), 10), sparsity=sparsities[0],
                        generator=torch.Generator().manual_seed(0))
        optimizer = torch_optimizer(DEFAULT_OPTIMIZER, net.parameters())
        torch_inputs, torch_targets = torch.from_numpy(inputs), torch.from_numpy(targets)

        def dense_step():
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(torch_inputs), torch_targets).backward()
            optimizer.step()

        dense_step()
        result["dense"]["peak_rss_delta_bytes"] = peak_rss_bytes() - before
        entries["dense"] = dense_step
        if dense_estimate_s is None or dense_estimate_s < 2.0:
            entries["dense_1_thread"] = lambda: _one_thread(dense_step)
    models = {}
    for sparsity in sparsities:
        for backend in SPARSE_BACKENDS:
            nnz = round((1 - sparsity) * weights)
            estimate = nnz * SPARSE_NS_PER_WEIGHT[backend] * 1e-9
            row = {"sparsity": sparsity, "backend": backend, "active_weights": nnz}
            result["sparse"].append(row)
            if estimate * (runs + warmup) > ENTRY_LIMIT_S:
                row["skipped"] = f"too slow: estimated {estimate:.0f} s per step"
                continue
            tracemalloc.start()
            started = time.perf_counter()
            model = SparseMLP.random(784, (width, width), 10, sparsity, "uniform", seed=0, backend=backend)
            row["init_s"] = time.perf_counter() - started
            model.train_step(inputs, targets)
            row["traced_peak_bytes"] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            row["sparse_bytes"] = model.nbytes()
            row["active_weights"] = sum(model.active_counts().values())
            started = time.perf_counter()
            model.update_topology(SET_DST.prune_ratio)
            row["update_ms"] = 1e3 * (time.perf_counter() - started)
            models[(sparsity, backend)] = model
            entries[f"sparse {sparsity} {backend}"] = (
                lambda model=model: model.train_step(inputs, targets))
    timings = time_interleaved({name: (step, None) for name, step in entries.items()}, runs, warmup)
    if "dense" in timings:
        result["dense"]["step_ms"] = timings["dense"]["median"]
        result["dense"]["step_ms_default_threads"] = timings["dense"]["median"]
        if "dense_1_thread" in timings:
            result["dense"]["step_ms_1_thread"] = timings["dense_1_thread"]["median"]
            result["dense"]["step_ms"] = min(timings["dense"]["median"], timings["dense_1_thread"]["median"])
    for row in result["sparse"]:
        timing = timings.get(f"sparse {row['sparsity']} {row['backend']}")
        if timing is not None:
            row["step_ms"] = timing["median"]
            row["update_ms_per_step"] = row["update_ms"] / SET_DST.every
    result["runs"], result["warmup"] = runs, warmup
    return result


def _compile_kernels() -> None:
    for backend in SPARSE_BACKENDS:
        SparseMLP.random(4, (3,), 2, 0.5, backend=backend).train_step(np.ones((2, 4)), [0, 1])


def _one_thread(step):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step()
    finally:
        torch.set_num_threads(threads)


def run_in_child(width: int, sparsities: list[float], dense_estimate_s: float | None) -> dict:
    """``measure_width`` in a fresh interpreter, so its peak memory is its own."""
    command = [sys.executable, "-m", "benchmarks.sparse_training", "--child",
               json.dumps({"width": width, "sparsities": sparsities, "dense_estimate_s": dense_estimate_s})]
    output = subprocess.run(command, check=True, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout
    return json.loads(output.strip().splitlines()[-1])


def table(results: list[dict]) -> list[dict]:
    """One row per (width, sparsity): dense and sparse step times, memory and their ratios."""
    rows = []
    for result in results:
        dense = result["dense"]
        for sparse in result["sparse"]:
            if sparse["backend"] != "numba":
                continue
            scipy_row = next(r for r in result["sparse"]
                             if r["backend"] == "scipy" and r["sparsity"] == sparse["sparsity"])
            row = {"width": result["width"], "sparsity": sparse["sparsity"],
                   "dense_step_ms": dense.get("step_ms"), "sparse_step_ms": sparse.get("step_ms"),
                   "sparse_scipy_step_ms": scipy_row.get("step_ms"),
                   "dense_bytes": result["dense_bytes"], "sparse_bytes": sparse.get("sparse_bytes"),
                   "dense_peak_rss_delta_bytes": dense.get("peak_rss_delta_bytes"),
                   "sparse_traced_peak_bytes": sparse.get("traced_peak_bytes"),
                   "note": "; ".join(filter(None, [dense.get("skipped") and f"dense {dense['skipped']}",
                                                   sparse.get("skipped") and f"sparse {sparse['skipped']}"]))}
            if row["dense_step_ms"] and row["sparse_step_ms"]:
                row["speedup"] = row["dense_step_ms"] / row["sparse_step_ms"]
            if row["sparse_bytes"]:
                row["memory_ratio"] = row["dense_bytes"] / row["sparse_bytes"]
            rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    def number(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = [f"{'width':>6} {'sparsity':>8} {'dense ms':>9} {'sparse ms':>9} {'scipy ms':>9} {'speedup':>8} "
             f"{'dense MB':>9} {'sparse MB':>9} {'mem ratio':>9}  note"]
    for row in rows:
        lines.append(
            f"{row['width']:>6} {row['sparsity']:>8.3f} {number(row['dense_step_ms'], '9.1f')} "
            f"{number(row['sparse_step_ms'], '9.1f')} {number(row['sparse_scipy_step_ms'], '9.1f')} "
            f"{number(row.get('speedup'), '7.1f') + 'x' if row.get('speedup') else '-':>8} "
            f"{row['dense_bytes'] / 1e6:9.1f} {number(row['sparse_bytes'] and row['sparse_bytes'] / 1e6, '9.2f')} "
            f"{number(row.get('memory_ratio'), '8.0f') + 'x' if row.get('memory_ratio') else '-':>9}  "
            f"{row['note']}")
    return "\n".join(lines)


def plot(rows: list[dict], memory_limit: int):
    """Step time and weight-plus-optimizer memory against width: where sparse crosses dense."""
    figure = Figure(figsize=(12, 6))
    time_axis, memory_axis = figure.subplots(1, 2)
    widths = sorted({row["width"] for row in rows})
    dense = {row["width"]: row for row in rows}
    measured = [w for w in widths if dense[w]["dense_step_ms"]]
    time_axis.plot(measured, [dense[w]["dense_step_ms"] for w in measured], "k-o",
                   label="masked dense (torch, any sparsity)")
    memory_axis.plot(widths, [dense[w]["dense_bytes"] for w in widths], "k-o", label="masked dense (analytic)")
    for color, sparsity in zip(("tab:blue", "tab:orange", "tab:green"),
                               sorted({row["sparsity"] for row in rows}), strict=False):
        own = [row for row in rows if row["sparsity"] == sparsity]
        timed = [row for row in own if row["sparse_step_ms"]]
        time_axis.plot([r["width"] for r in timed], [r["sparse_step_ms"] for r in timed], "-o", color=color,
                       label=f"truly sparse {sparsity:.1%} (numba)")
        scipy_timed = [row for row in own if row["sparse_scipy_step_ms"]]
        time_axis.plot([r["width"] for r in scipy_timed], [r["sparse_scipy_step_ms"] for r in scipy_timed],
                       "--", color=color, alpha=0.6, label=f"truly sparse {sparsity:.1%} (scipy)")
        held = [row for row in own if row["sparse_bytes"]]
        memory_axis.plot([r["width"] for r in held], [r["sparse_bytes"] for r in held], "-o", color=color,
                         label=f"truly sparse {sparsity:.1%}")
    memory_axis.axhline(memory_limit, color="red", linestyle=":", label="this machine's memory")
    for width in widths:
        if "does not fit" in dense[width]["note"]:
            time_axis.axvline(width, color="red", linestyle=":", alpha=0.6)
            time_axis.annotate("dense does\nnot fit", (width, 0.5), xycoords=("data", "axes fraction"),
                               ha="right", fontsize=8, color="red")
    for axis, label in ((time_axis, "time per training step (ms, batch 128)"),
                        (memory_axis, "weights + optimizer state (bytes)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("hidden width (784 -> w -> w -> 10)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # under, never over data
    time_axis.set_title("Training step: truly sparse vs masked dense")
    memory_axis.set_title("Memory held for training")
    figure.tight_layout()
    return figure


def mnist_runs(quick: bool) -> dict:
    """Accuracy next to the masked net after one epoch, and a net too wide to be masked."""
    from dst.core.data import load_mnist_tensors
    from dst.csr.comparison import train_masked_mlp, train_sparse_mlp

    train_x, train_y = load_mnist_tensors("data", train=True)
    test_x, test_y = load_mnist_tensors("data", train=False)
    limit = 50 if quick else None
    side_by_side = dict(hidden=(1024, 1024), sparsity=0.99, allocation="erk", epochs=1, max_batches=limit)
    results = {"side_by_side": [train_sparse_mlp(train_x, train_y, test_x, test_y, **side_by_side),
                                train_masked_mlp(train_x, train_y, test_x, test_y, **side_by_side)]}
    wide = dict(hidden=(65536, 65536), sparsity=0.9997, allocation="erk", epochs=1,
                max_batches=20 if quick else None)
    results["wide"] = train_sparse_mlp(train_x, train_y, test_x, test_y, **wide)
    results["memory_bytes"] = total_memory_bytes()
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg == "--scale" or arg.startswith("--scale=") for arg in argv):  # the big run: its own module
        from benchmarks import sparse_training_scale

        sparse_training_scale.main(argv)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="--scale WIDTH[,WIDTH...] trains one MNIST epoch per width at scale "
                                            "(python -m benchmarks.sparse_training --scale 16384 --help)")
    parser.add_argument("--quick", action="store_true", help="two widths, two sparsities (~1 min)")
    parser.add_argument("--mnist", action="store_true", help="also train on MNIST (~6 min; data in ./data)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--replot", action="store_true", help="redraw sparse_training.png from the committed JSON")
    args = parser.parse_args(argv)
    if args.replot:
        rows = json.loads((RESULTS / "sparse_training.json").read_text())["rows"]
        for row in rows:  # files written while the scipy backend was called "numpy"
            row.setdefault("sparse_scipy_step_ms", row.get("sparse_numpy_step_ms"))
        plot(rows, total_memory_bytes()).savefig(RESULTS / "sparse_training.png", dpi=120, bbox_inches="tight")
        print(f"redrew {RESULTS / 'sparse_training.png'} from sparse_training.json")
        return
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure_width(spec["width"], spec["sparsities"], spec["dense_estimate_s"])))
        return
    widths, sparsities = widths_and_sparsities(args.quick)
    results, dense_rate = [], None  # seconds per weight of the last dense step measured
    started = time.perf_counter()
    for width in widths:
        weights = 784 * width + width * width + 10 * width
        result = run_in_child(width, sparsities, None if dense_rate is None else dense_rate * weights)
        if result["dense"].get("step_ms"):
            dense_rate = result["dense"]["step_ms"] * 1e-3 / weights
        results.append(result)
        print(f"width {width}: done after {time.perf_counter() - started:.0f} s", file=sys.stderr)
    rows = table(results)
    print(format_rows(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"batch_size": BATCH, "optimizer": "sgd momentum 0.9", "allocation": "uniform",
              "environment": benchmark_environment() | {"numba": _numba_version()},
              "rows": rows, "per_width": results, "seconds": time.perf_counter() - started}
    name = "sparse_training_quick" if args.quick else "sparse_training"  # quick runs keep the full results
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1))
    plot(rows, total_memory_bytes()).savefig(RESULTS / f"{name}.png", dpi=120, bbox_inches="tight")
    if args.mnist:
        mnist = mnist_runs(args.quick)
        (RESULTS / f"{name}_mnist.json").write_text(json.dumps(mnist, indent=1))
        for metrics in (*mnist["side_by_side"], mnist["wide"]):
            print(f"{metrics['trainer']:>28} {str(metrics['widths']):>24}: {metrics['test_accuracy']:.2f}% "
                  f"in {metrics['train_time_s']:.0f} s ({metrics['step_time_ms']:.0f} ms/step), "
                  f"{metrics['weight_optimizer_bytes'] / 1e6:.1f} MB "
                  f"(dense: {metrics['dense_weight_optimizer_bytes'] / 1e9:.2f} GB)")


def _numba_version() -> str | None:
    try:
        import numba
    except ImportError:
        return None
    return numba.__version__


if __name__ == "__main__":
    main()
