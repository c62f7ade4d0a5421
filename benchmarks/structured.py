"""Benchmark: structured sparsity (condensed constant fan-in, block-sparse rows) against dense, masked and CSR.

For the tutorial's linear layers (1568->128, 1000->1000) and a 4096->4096 one, and for
SimpleNet whole (its convs stay CSR; its linears take the pattern where their shape allows,
else CSR), at each sparsity, batch size and thread count, it times: the dense torch layer,
the masked layer (``MaskedNet``'s forward), the unstructured CSR numba engine, the condensed
fan-in numba engine (``fan_in`` kind: every row keeps ``round(density * in)`` inputs), the
BSR numba engine at 4x4, 8x8 and 1x8 blocks, and scipy's ``bsr_array`` and torch's
``to_sparse_bsr`` at 4x4 where they run (torch on the CPU takes square blocks only). A 2:4
row (``torch.sparse.to_sparse_semi_structured``, half precision, 50 % only) runs where a
CUDA GPU of compute capability >= 8.0 exists; elsewhere it is skipped with its reason.

Protocol: each engine is built once per (layer, sparsity), run a few times untimed (numba
compiles or loads its cache then), then timed in blocks: all repeats of one engine, then the
next; the median of the repeats is reported, and speedups are dense median / engine median
(and CSR median / engine median). Thread counts are set once per block of rows
(``numba.set_num_threads`` and ``torch.set_num_threads``). Masks and inputs are random: a
forward's time depends on how many weights are active and where, not on their values.

Writes benchmarks/results/structured.json and structured.png.
Run from the repository root:  python -m benchmarks.structured [--quick --output DIR] [--repeats N] [--replot]
On a machine shared with other jobs the numbers say little: run it on an idle one, with
OMP_WAIT_POLICY=PASSIVE (see benchmarks/sparse_inference.py).
"""

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import matplotlib
import torch
from torch import nn

from dst.core.models import SimpleNet
from dst.csr.backends import numba_available
from dst.csr.model import SparseNet
from dst.engine.masked import MaskedNet
from dst.engine.patterns import Pattern, get_pattern
from dst.engine.patterns.block import Block
from dst.tutorial.benchmark import benchmark_environment

RESULTS = Path(__file__).resolve().parent / "results"
LAYERS = {"linear 1568->128": (1568, 128), "linear 1000->1000": (1000, 1000), "linear 4096->4096": (4096, 4096),
          "SimpleNet": None}
SPARSITIES = (0.5, 0.75, 0.9, 0.95)
BATCHES = (1, 100)
THREADS = (1, 2)
BLOCKS = ((4, 4), (8, 8), (1, 8))
DENSE, MASKED, CSR, FAN_IN = "dense torch", "masked", "CSR numba", "fan-in numba"
# The goals (issue 20): SRigL's CPU figure for condensed fan-in, and BSR paying from 75 % at batch 100.
FAN_IN_GOAL = 3.4


def pattern_of(pattern: str, block_shape=None) -> Pattern:
    """The engine's pattern for a row of this benchmark: "unstructured", "fan_in", or "block" of ``block_shape``."""
    return Block(*block_shape) if pattern == "block" else get_pattern(pattern)


def masked_model(layer: str, sparsity: float, pattern: str, block_shape=None, seed: int = 0) -> tuple:
    """(the layer or SimpleNet masked at ``sparsity``, the ``SparseNet`` layout for it): its linears in
    ``pattern`` where their shape allows (and of that kind in the layout), the rest unstructured (CSR)."""
    torch.manual_seed(seed)
    base = SimpleNet() if LAYERS[layer] is None else nn.Sequential(nn.Linear(*LAYERS[layer]))
    with warnings.catch_warnings():  # inputs a random mask leaves unread: irrelevant to a timing
        warnings.simplefilter("ignore")
        net = MaskedNet(base, sparsity, "uniform").eval()
    generator = torch.Generator().manual_seed(seed)
    kind = {"fan_in": "fan_in", "block": ("bsr", {"block_shape": block_shape})}.get(pattern, "csr")
    layout = {}
    for name, module in net.masked_layers().items():
        shape = tuple(module.mask_2d().shape)
        chosen = pattern_of(pattern, block_shape)
        try:
            fits = module.weight.dim() == 2 and chosen.active_count(shape, 1.0 - sparsity) > 0
        except ValueError:  # a shape the blocks do not tile
            fits = False
        chosen = chosen if fits else get_pattern("unstructured")
        mask = chosen.random_mask(shape, 1.0 - sparsity, generator)
        layout[name] = kind if fits else "csr"
        with torch.no_grad():
            module.mask.copy_(torch.from_numpy(mask).reshape(module.mask.shape))
            module.weight.mul_(module.mask)
        module.pattern = chosen
    return net, layout


def dense_model(layer: str) -> nn.Module:
    torch.manual_seed(0)
    return (SimpleNet() if LAYERS[layer] is None else nn.Linear(*LAYERS[layer])).eval()


def engines(layer: str, sparsity: float, quick: bool) -> dict:
    """{engine name: (forward callable, pattern, block shape)} for one layer at one sparsity."""
    built = {DENSE: (dense_model(layer), "dense", None)}
    unstructured, csr = masked_model(layer, sparsity, "unstructured")
    built[MASKED] = (unstructured, "unstructured", None)
    if numba_available():
        built[CSR] = (SparseNet.from_masked(unstructured, "numba", layout=csr), "unstructured", None)
        fan_in, layout = masked_model(layer, sparsity, "fan_in")
        built[FAN_IN] = (SparseNet.from_masked(fan_in, "numba", layout=layout), "fan_in", None)
    for block_shape in BLOCKS[:1] if quick else BLOCKS:
        blocked, layout = masked_model(layer, sparsity, "block", block_shape)
        label = "x".join(map(str, block_shape))
        backends = (["numba"] if numba_available() else []) + (["scipy", "torch"] if block_shape == (4, 4) else [])
        for backend in backends:
            built[f"BSR {backend} {label}"] = (SparseNet.from_masked(blocked, backend, layout=layout), "block",
                                               block_shape)
    return built


def time_blocked(forward, inputs, repeats: int, warmup: int) -> float:
    """Median seconds of ``repeats`` calls of ``forward(inputs)`` after ``warmup`` untimed ones."""
    with torch.no_grad():
        for _ in range(warmup):
            forward(inputs)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            forward(inputs)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    if numba_available():
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def semi_structured_skip_reason() -> str | None:
    """Why the 2:4 GPU row cannot run here (None where it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device: 2:4 semi-structured sparsity needs an NVIDIA GPU of compute capability >= 8.0"
    if torch.cuda.get_device_capability() < (8, 0):
        return f"CUDA device of compute capability {torch.cuda.get_device_capability()} < (8, 0)"
    return None


def semi_structured_row(layer: str, batch: int, repeats: int, warmup: int) -> tuple[dict | None, str | None]:
    """A 2:4 linear on the GPU (half precision) against its dense twin: (row, None), or (None, why skipped)."""
    if LAYERS[layer] is None:
        return None, "2:4 row timed on the single linear layers only"
    from torch.sparse import to_sparse_semi_structured

    linear = nn.Linear(*LAYERS[layer]).half().cuda().eval()
    mask = torch.tensor([True, True, False, False], device="cuda").repeat(linear.weight.numel() // 4)
    with torch.no_grad():
        linear.weight.mul_(mask.reshape(linear.weight.shape))
    inputs = torch.randn(max(batch, 32), linear.in_features, device="cuda", dtype=torch.half)  # a kernel minimum

    def timed(module):
        def forward(x):
            module(x)
            torch.cuda.synchronize()
        return time_blocked(forward, inputs, repeats, warmup)

    try:
        dense = timed(linear)
        linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight))
        sparse = timed(linear)
    except (RuntimeError, ValueError) as error:  # a shape or dtype this torch build's kernels refuse
        return None, f"to_sparse_semi_structured failed: {str(error).splitlines()[0]}"
    return {"engine": "2:4 semi-structured (CUDA)", "dense_median_s": dense, "median_s": sparse,
            "speedup_vs_dense": dense / sparse, "gpu": torch.cuda.get_device_name(), "batch_timed": len(inputs)}, None


def sweep(layers, sparsities, batches, threads_list, repeats: int, warmup: int, quick: bool) -> dict:
    """Time every engine at every (layer, sparsity, batch, threads); returns the JSON-able results."""
    rows, skipped = [], {}
    gpu_reason = semi_structured_skip_reason()
    if gpu_reason is not None:
        skipped["2:4 semi-structured (CUDA)"] = gpu_reason
    for layer in layers:
        for sparsity in sparsities:
            built = engines(layer, sparsity, quick)
            for batch in batches:
                shape = (batch, 1, 28, 28) if LAYERS[layer] is None else (batch, LAYERS[layer][0])
                inputs = torch.randn(shape, generator=torch.Generator().manual_seed(1))
                for threads in threads_list:
                    set_threads(threads)
                    medians = {name: time_blocked(model, inputs, repeats, warmup)
                               for name, (model, _, _) in built.items()}
                    for name, (_, pattern, block_shape) in built.items():
                        rows.append({"layer": layer, "sparsity": sparsity, "batch": batch, "threads": threads,
                                     "engine": name, "pattern": pattern,
                                     "block_shape": None if block_shape is None else list(block_shape),
                                     "median_s": medians[name], "speedup_vs_dense": medians[DENSE] / medians[name],
                                     "speedup_vs_csr": medians[CSR] / medians[name] if CSR in medians else None})
                if sparsity == 0.5 and gpu_reason is None:
                    row, reason = semi_structured_row(layer, batch, repeats, warmup)
                    if row is not None:
                        rows.append({"layer": layer, "sparsity": 0.5, "batch": batch, "threads": None,
                                     "pattern": "2:4", "block_shape": None, **row})
                    else:
                        skipped["2:4 semi-structured (CUDA)"] = reason
    environment = benchmark_environment("cpu")
    return {"environment": environment,
            "protocol": f"per (layer, sparsity): every engine built once; per (batch, threads): each engine run "
                        f"{warmup}x untimed, then {repeats} timed calls in a block (all of one engine, then the "
                        "next); medians; speedup = dense torch median / engine median",
            "settings": {"layers": list(layers), "sparsities": list(sparsities), "batches": list(batches),
                         "threads": list(threads_list), "repeats": repeats, "warmup": warmup, "quick": quick},
            "skipped": skipped, "rows": rows}


def format_table(results: dict) -> str:
    """Speedup vs dense (and vs CSR) per engine and sparsity, one block per (layer, batch, threads)."""
    settings = results["settings"]
    lines = [f"{results['environment']['cpu_model']}; torch {results['environment']['torch']}, numba "
             f"{results['environment']['numba']}; medians of {settings['repeats']} blocked repeats"]
    header = f"{'engine':<18}" + "".join(f"{round(100 * s):>14d}%" for s in settings["sparsities"])
    for layer in settings["layers"]:
        for batch in settings["batches"]:
            for threads in settings["threads"]:
                block = [row for row in results["rows"] if (row["layer"], row["batch"], row["threads"])
                         == (layer, batch, threads)]
                lines += ["", f"{layer}, batch {batch}, {threads} thread(s): x vs dense (x vs CSR)", header]
                for engine in dict.fromkeys(row["engine"] for row in block):
                    cells = []
                    for sparsity in settings["sparsities"]:
                        row = next((r for r in block if r["engine"] == engine and r["sparsity"] == sparsity), None)
                        vs_csr = "" if row is None or row["speedup_vs_csr"] is None else \
                            f" ({row['speedup_vs_csr']:.2f})"
                        cell = "-" if row is None else f"{row['speedup_vs_dense']:.2f}{vs_csr}"
                        cells.append(f"{cell:>15}")
                    lines.append(f"{engine:<18}" + "".join(cells))
    lines += [f"skipped {engine}: {reason}" for engine, reason in results["skipped"].items()]
    return "\n".join(lines)


def goal_lines(results: dict) -> list[str]:
    """The issue's goals, each with what this run measured."""
    lines = []
    for row in results["rows"]:
        if row["engine"] == FAN_IN and row["sparsity"] == 0.9 and row["batch"] == 1:
            met = row["speedup_vs_dense"] >= FAN_IN_GOAL
            lines.append(f"fan-in {row['layer']}, 90 %, batch 1, {row['threads']} thread(s): "
                         f"{row['speedup_vs_dense']:.2f}x dense (goal {FAN_IN_GOAL}x: {'met' if met else 'not met'})")
    slower = [row for row in results["rows"] if row["engine"] == FAN_IN and row["sparsity"] <= 0.9
              and row["speedup_vs_csr"] is not None and row["speedup_vs_csr"] < 1]
    lines.append("fan-in faster than CSR at every sparsity <= 90 %: " + (
        "yes" if not slower else "no, slower at " + ", ".join(
            f"{row['layer']} {round(100 * row['sparsity'])} % batch {row['batch']} {row['threads']}t"
            for row in slower)))
    bsr_slow = [row for row in results["rows"] if row["engine"].startswith("BSR numba") and row["batch"] == 100
                and row["sparsity"] >= 0.75 and row["speedup_vs_dense"] < 1]
    lines.append("BSR numba faster than dense from 75 % at batch 100: " + (
        "yes" if not bsr_slow else "no, slower at " + ", ".join(
            f"{row['engine']} {row['layer']} {round(100 * row['sparsity'])} % {row['threads']}t" for row in bsr_slow)))
    return lines


def plot_structured(results: dict, save_path=None):
    """Speedup over dense torch against sparsity: one panel per (batch, layer), a line per engine
    (solid: 1 thread, dashed: 2); returns the Figure."""
    import matplotlib.pyplot as plt

    settings = results["settings"]
    layers, batches = settings["layers"], settings["batches"]
    figure, axes = plt.subplots(len(batches), len(layers), figsize=(4.2 * len(layers), 3.4 * len(batches)),
                                squeeze=False, sharey=True)
    engines_seen = list(dict.fromkeys(row["engine"] for row in results["rows"]
                                      if row["engine"] != DENSE and row["threads"] is not None))
    colors = {engine: matplotlib.colormaps["tab10"](index % 10) for index, engine in enumerate(engines_seen)}
    for (i, batch), (j, layer) in ((b, entry) for b in enumerate(batches) for entry in enumerate(layers)):
        axis = axes[i][j]
        for engine in engines_seen:
            for threads, style in zip(settings["threads"], ("-", "--", ":"), strict=False):
                points = sorted((row["sparsity"], row["speedup_vs_dense"]) for row in results["rows"]
                                if (row["layer"], row["batch"], row["threads"], row["engine"])
                                == (layer, batch, threads, engine))
                if points:
                    axis.plot([100 * s for s, _ in points], [v for _, v in points], style, marker="o",
                              color=colors[engine], label=engine if threads == settings["threads"][0] else None)
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_title(f"{layer}, batch {batch}", fontsize=9)
        axis.set_xlabel("sparsity (%)")
        if j == 0:
            axis.set_ylabel("speedup over dense torch")
    axes[0][0].legend(fontsize=7, loc="upper left")
    figure.suptitle("Structured sparsity on this CPU (solid: 1 thread, dashed: 2)", fontsize=10)
    figure.tight_layout()
    if save_path is not None:
        figure.savefig(save_path, dpi=110)
    return figure


def at_least_30(text: str) -> int:
    value = int(text)
    if value < 30:
        raise argparse.ArgumentTypeError(f"the protocol takes medians of at least 30 repeats, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: one layer and SimpleNet, 90 %%, "
                        "one thread, one block shape, 3 repeats (numbers meaningless)")
    parser.add_argument("--repeats", type=at_least_30, default=30, help="timed calls per engine (default 30, "
                        "the least the protocol takes)")
    parser.add_argument("--warmup", type=positive_int, default=3, help="untimed calls first (default 3)")
    parser.add_argument("--replot", action="store_true", help="redraw structured.png from structured.json")
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for structured.json and .png "
                        "(default benchmarks/results; give another for a --quick run, whose numbers mean nothing)")
    args = parser.parse_args()
    json_path, png_path = args.output / "structured.json", args.output / "structured.png"
    if args.replot:
        plot_structured(json.loads(json_path.read_text()), save_path=png_path)
        print(f"redrew {png_path} from {json_path.name}")
        return
    started = time.perf_counter()
    if args.quick:
        results = sweep(["linear 1568->128", "SimpleNet"], [0.9], BATCHES, [1], repeats=3, warmup=1, quick=True)
    else:
        results = sweep(list(LAYERS), SPARSITIES, BATCHES, THREADS, args.repeats, args.warmup, quick=False)
    results["settings"]["seconds"] = time.perf_counter() - started
    print(format_table(results))
    print("\n".join(goal_lines(results)))
    args.output.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1))
    plot_structured(results, save_path=png_path)
    print(f"wrote {json_path} and {png_path.name} in {results['settings']['seconds']:.0f} s"
          + (" (a --quick smoke run: not results)" if args.quick else ""))


if __name__ == "__main__":
    main()
