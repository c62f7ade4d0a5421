"""Sweep: truly sparse (CSR) inference against the masked dense SimpleNet on this machine's CPU.

For each allocation (uniform, and ERK unless --quick), sparsity and batch size, one
process times the masked dense net, the scipy CSR engine and the torch.sparse engine,
with their runs interleaved so a busy machine slows them alike; speedups are dense
median / sparse median. It does so twice: with torch's own thread count, and with
``torch.set_num_threads(1)``, where dense and torch.sparse run on one core like scipy
(the like-for-like comparison). Memory is ``memory_report``'s (weights + masks
against CSR arrays in memory) and the size of the saved ``.npz``; MMAC counts the
multiply-adds of the active weights (millions per forward of the batch).

Masks and inputs are random: a forward's time depends on how many weights are active
and where, not on their trained values, so no training or data is needed.

Writes benchmarks/results/sparse_inference.json and sparse_inference.png.
Run from the repository root:  python -m benchmarks.sparse_inference [--quick] [--threads N]
On a machine shared with other jobs, set OMP_WAIT_POLICY=PASSIVE: by default torch's idle
OpenMP threads spin, and when another process holds a core a multi-threaded dense forward
can stall for ~90 ms and the spinning steals the core the single-threaded rows run on.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from dst.benchmark import benchmark_environment, inference_forwards, time_interleaved
from dst.masked import MaskedNet
from dst.models import SimpleNet
from dst.plots import plot_sparsity_sweep
from dst.truly_sparse import SparseNet, memory_report

RESULTS = Path(__file__).resolve().parent / "results"
BACKEND_ROWS = {"scipy": "Truly Sparse CSR (CPU)", "torch.sparse": "Truly Sparse torch.sparse (CPU)"}


def multiply_adds(masked: MaskedNet, batch: torch.Tensor) -> tuple[int, int]:
    """(dense, sparse) multiply-adds of one forward: every weight, or only the active ones, per output position."""
    counts = []

    def count(layer, _inputs, output):
        positions = output[0, 0].numel() if output.dim() == 4 else 1  # output pixels per sample for a conv
        counts.append((layer.mask.numel() * positions, layer.active_count * positions))

    hooks = [layer.register_forward_hook(count) for layer in masked.masked_layers().values()]
    try:
        with torch.no_grad():
            masked(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return tuple(batch.shape[0] * sum(column) for column in zip(*counts, strict=True))


def time_with_threads(forwards: dict, threads: int | None, runs: int, warmup: int) -> dict:
    """``time_interleaved`` with torch limited to ``threads`` (None: as it is), restored after.

    The thread count is set once per block, not per call: switching it between calls
    makes torch's OpenMP pool stall for tens of milliseconds on a busy machine.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        with torch.no_grad():
            return time_interleaved(forwards, runs, warmup)
    finally:
        torch.set_num_threads(previous)


def sweep(sparsities, batch_sizes, allocations, runs: int, warmup: int) -> dict:
    """Time and measure every (allocation, sparsity, batch size); returns the JSON-able results."""
    generator = torch.Generator().manual_seed(0)
    base = SimpleNet()
    inputs = {batch: torch.randn(batch, 1, 28, 28, generator=generator) for batch in batch_sizes}
    rows = []
    for allocation in allocations:
        for sparsity in sparsities:
            masked = MaskedNet(base, sparsity, allocation, generator=generator).eval()
            sparse = SparseNet.from_masked(masked, "scipy")
            memory = memory_report(masked, sparse)
            with tempfile.TemporaryDirectory() as folder:
                file_bytes = sparse.save(Path(folder) / "model.npz")
            for batch in batch_sizes:
                dense_macs, sparse_macs = multiply_adds(masked, inputs[batch])
                forwards = inference_forwards(masked, inputs[batch], "cpu")
                timings = time_with_threads(forwards, None, runs, warmup)
                single = time_with_threads(forwards, 1, runs, warmup)
                dense_ms, single_dense_ms = (t["Dense+Mask (CPU)"]["median"] for t in (timings, single))
                for backend, row_name in BACKEND_ROWS.items():
                    sparse_ms, single_sparse_ms = (t[row_name]["median"] for t in (timings, single))
                    rows.append({
                        "allocation": allocation, "sparsity": sparsity, "batch_size": batch,
                        "backend": backend if allocation == "uniform" else f"{backend} ({allocation})",
                        "sparse_ms": sparse_ms, "dense_ms": dense_ms, "speedup": dense_ms / sparse_ms,
                        "sparse_single_thread_ms": single_sparse_ms, "dense_single_thread_ms": single_dense_ms,
                        "speedup_single_thread": single_dense_ms / single_sparse_ms,
                        "dense_bytes": memory["dense_bytes"], "sparse_bytes": memory["sparse_bytes"],
                        "file_bytes": file_bytes, "memory_ratio": memory["ratio"],
                        "file_ratio": memory["dense_bytes"] / file_bytes,
                        "dense_macs": dense_macs, "sparse_macs": sparse_macs})
    return {"environment": benchmark_environment("cpu"),
            "settings": {"runs": runs, "warmup": warmup, "statistic": "median ms per forward of the batch"},
            "rows": rows}


def format_table(results: dict) -> str:
    """The sweep as a text table: medians in ms and speedups (x) over the masked dense net."""
    environment = results["environment"]
    threads = environment["torch_threads"]
    lines = [f"torch {environment['torch']}, scipy {environment['scipy']}, {environment['cpu_count']} CPUs; "
             f"medians of {results['settings']['runs']} interleaved runs; x = dense median / sparse median; "
             f"scipy is single-threaded in both blocks",
             f"{'':23}| {'torch with ' + str(threads) + ' threads':^42} | {'torch with 1 thread':^42} |",
             f"{'alloc':8} {'sparsity':>8} {'batch':>5} |" + f"{'dense':>8} {'scipy':>8} {'x':>5} {'torch':>8} "
             f"{'x':>5}   |" * 2 + f" {'memory x':>8} {'file x':>6} {'MMAC':>6}"]
    by_key = {}
    for row in results["rows"]:
        by_key.setdefault((row["allocation"], row["sparsity"], row["batch_size"]), []).append(row)
    for (allocation, sparsity, batch), (scipy_row, torch_row) in by_key.items():
        cells = [f"{allocation:8} {sparsity:8.2f} {batch:5d} |"]
        for suffix in ("_ms", "_single_thread_ms"):
            dense = scipy_row["dense" + suffix]
            scipy_ms, torch_ms = scipy_row["sparse" + suffix], torch_row["sparse" + suffix]
            cells.append(f"{dense:8.2f} {scipy_ms:8.2f} {dense / scipy_ms:5.1f} {torch_ms:8.2f} "
                         f"{dense / torch_ms:5.1f}   |")
        cells.append(f" {scipy_row['memory_ratio']:8.1f} {scipy_row['file_ratio']:6.1f} "
                     f"{scipy_row['sparse_macs'] / 1e6:6.1f}")
        lines.append("".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sparsities and runs, uniform allocation only")
    parser.add_argument("--threads", type=int, help="torch threads for the dense and torch.sparse rows "
                        "(default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.quick:
        results = sweep([0.9, 0.99], [1, 100], ["uniform"], runs=3, warmup=1)
    else:
        results = sweep([0.5, 0.8, 0.9, 0.95, 0.98, 0.99], [1, 100], ["uniform", "erk"], runs=10, warmup=3)
    results["settings"]["seconds"] = time.perf_counter() - started
    print(format_table(results))
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / "sparse_inference.json"
    json_path.write_text(json.dumps(results, indent=1))
    plot_sparsity_sweep(results["rows"], save_path=RESULTS / "sparse_inference.png")
    print(f"wrote {json_path} and sparse_inference.png in {results['settings']['seconds']:.0f} s")


if __name__ == "__main__":
    main()
