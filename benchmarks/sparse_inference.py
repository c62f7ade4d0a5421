"""Sweep: truly sparse (CSR) inference against the masked dense SimpleNet on this machine's CPU.

For each allocation (uniform, and ERK unless --quick), sparsity and batch size, one
process times the masked dense net, the numba engine (where numba is installed), the
scipy CSR engine and the torch.sparse engine, with their runs interleaved so a busy
machine slows them alike; speedups are dense median / sparse median. Every sparse
model runs once before timing (numba compiles then); the first numba call of the
process, compilation or loading its disk cache, is reported on its own. It does so
twice: with torch's and numba's own thread counts, and with both set to 1, where every
row runs on one core like scipy (the like-for-like comparison). Memory is
``memory_report``'s for each backend (weights + masks against what that backend holds
in memory: numba keeps 16-bit column indices) and the size of the saved ``.npz``;
MMAC counts the multiply-adds of the active weights (millions per forward of the batch).

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
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.peers import (
    MKL,
    ONNXRUNTIME,
    TORCH_CHANNELS_LAST,
    mkl_forwards,
    onnxruntime_forwards,
    torch_channels_last_forwards,
)
from dst.core.models import SimpleNet
from dst.csr.backends import default_cpu_backend, numba_available
from dst.csr.model import SparseNet, memory_report
from dst.engine.masked import MaskedNet
from dst.tutorial import benchmark_rows
from dst.tutorial.benchmark import benchmark_environment, inference_forwards, time_interleaved
from dst.tutorial.plots import plot_sparsity_sweep

# The optional peers, each timed beside this package's engines where it runs here.
PEERS = {ONNXRUNTIME: onnxruntime_forwards, TORCH_CHANNELS_LAST: torch_channels_last_forwards, MKL: mkl_forwards}

RESULTS = Path(__file__).resolve().parent / "results"
# backend (as named in dst.csr.backends.BACKENDS and in the JSON) -> benchmark_inference's row; the
# default CPU engine holds the seed's row name 'Truly Sparse CSR (CPU)'.
BACKEND_ROWS = {"numba": benchmark_rows.CSR_CPU, "scipy": benchmark_rows.CSR_SCIPY_CPU,
                "torch": benchmark_rows.TORCH_SPARSE_CPU}
if default_cpu_backend() == "scipy":
    BACKEND_ROWS = {"scipy": benchmark_rows.CSR_CPU, "torch": benchmark_rows.TORCH_SPARSE_CPU}
PROTOCOL = ("each (allocation, sparsity, batch): every engine warmed up, then timed interleaved (one call of each per "
            "round) for `runs` rounds, median per engine; once with torch's, numba's, onnxruntime's and MKL's own "
            "thread counts, once with one thread each; onnxruntime's thread spinning off, MKL's KMP_BLOCKTIME=0; "
            "run it with OMP_WAIT_POLICY=PASSIVE so no engine's idle threads spin on the cores the next one needs")
# The goals: SimpleNet, uniform, batch 100, against the masked net with torch's own threads.
GOALS = {0.95: 5.0, 0.99: 10.0}
# The convolution work's goal: the whole net at 95 %, batch 100, in at most this many ms (own threads).
CONV_GOAL_MS = 0.9
# The memory goal at 95 %: the numba model this many times smaller than weights plus masks.
MEMORY_GOAL = 15.0
# The engines every peer row also times, as the README's summary names them.
ENGINE_NAMES = {"numba": "numba", "scipy": "scipy", "torch": "torch.sparse", "masked": "masked dense (torch)"}


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
    """``time_interleaved`` with torch and numba limited to ``threads`` (None: as they are), restored after.

    The thread count is set once per block, not per call: switching it between calls
    makes torch's OpenMP pool stall for tens of milliseconds on a busy machine.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    numba_threads = _set_numba_threads(threads)
    try:
        with torch.no_grad():
            return time_interleaved(forwards, runs, warmup)
    finally:
        torch.set_num_threads(previous)
        _set_numba_threads(numba_threads)


def _set_numba_threads(threads: int | None) -> int | None:
    """Set numba's thread count (None: leave it); returns the previous one (None without numba)."""
    if not numba_available():
        return None
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(threads or previous)
    return previous


def numba_first_call_seconds() -> float | None:
    """Seconds of this process's first numba conversion and forward (compiling, or loading numba's disk cache).

    The conversion is inside: ``SparseNet.from_masked`` already runs the model once, on its probe batch.
    """
    if not numba_available():
        return None
    model = MaskedNet(SimpleNet(), 0.9, generator=torch.Generator().manual_seed(0)).eval()
    started = time.perf_counter()
    SparseNet.from_masked(model, "numba")(torch.zeros(2, 1, 28, 28))
    return time.perf_counter() - started


def sweep(sparsities, batch_sizes, allocations, runs: int, warmup: int) -> dict:
    """Time and measure every (allocation, sparsity, batch size); returns the JSON-able results."""
    generator = torch.Generator().manual_seed(0)
    base = SimpleNet()
    inputs = {batch: torch.randn(batch, 1, 28, 28, generator=generator) for batch in batch_sizes}
    rows, peers, skipped = [], [], {}
    for allocation in allocations:
        for sparsity in sparsities:
            masked = MaskedNet(base, sparsity, allocation, generator=generator).eval()
            memory = {backend: memory_report(masked, SparseNet.from_masked(masked, backend))
                      for backend in BACKEND_ROWS}
            with tempfile.TemporaryDirectory() as folder:
                file_bytes = SparseNet.from_masked(masked, "scipy").save(Path(folder) / "model.npz")
            for batch in batch_sizes:
                dense_macs, sparse_macs = multiply_adds(masked, inputs[batch])
                forwards = inference_forwards(masked, inputs[batch], "cpu")
                available = {}
                for name, make in PEERS.items():
                    peer = make(masked, inputs[batch])
                    if isinstance(peer, str):
                        skipped[name] = peer
                    else:
                        available[name] = peer
                timings = time_with_threads(forwards | {name: peer["own threads"] for name, peer in available.items()},
                                            None, runs, warmup)
                single = time_with_threads(forwards | {name: peer["1 thread"] for name, peer in available.items()},
                                           1, runs, warmup)
                for name in available:
                    peers.append({"peer": name, "allocation": allocation, "sparsity": sparsity,
                                  "batch_size": batch, "ms": timings[name]["median"],
                                  "single_thread_ms": single[name]["median"],
                                  **{f"{backend}_ms": timings[name]["median"]
                                     for backend, name in BACKEND_ROWS.items()},
                                  **{f"{backend}_single_thread_ms": single[name]["median"]
                                     for backend, name in BACKEND_ROWS.items()},
                                  "masked_ms": timings[benchmark_rows.MASKED_CPU]["median"],
                                  "masked_single_thread_ms": single[benchmark_rows.MASKED_CPU]["median"]})
                dense_ms, single_dense_ms = (t[benchmark_rows.MASKED_CPU]["median"] for t in (timings, single))
                for backend, row_name in BACKEND_ROWS.items():
                    sparse_ms, single_sparse_ms = (t[row_name]["median"] for t in (timings, single))
                    rows.append({
                        "allocation": allocation, "sparsity": sparsity, "batch_size": batch,
                        "backend": backend if allocation == "uniform" else f"{backend} ({allocation})",
                        "sparse_ms": sparse_ms, "dense_ms": dense_ms, "speedup": dense_ms / sparse_ms,
                        "sparse_single_thread_ms": single_sparse_ms, "dense_single_thread_ms": single_dense_ms,
                        "speedup_single_thread": single_dense_ms / single_sparse_ms,
                        "dense_bytes": memory[backend]["dense_bytes"],
                        "sparse_bytes": memory[backend]["sparse_bytes"],
                        "file_bytes": file_bytes, "memory_ratio": memory[backend]["ratio"],
                        "file_ratio": memory[backend]["dense_bytes"] / file_bytes,
                        "dense_macs": dense_macs, "sparse_macs": sparse_macs})
    return {"environment": benchmark_environment("cpu") | {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
            "settings": {"runs": runs, "warmup": warmup, "statistic": "median ms per forward of the batch",
                         "protocol": PROTOCOL},
            "rows": rows, "peers": peers, "skipped": skipped}


def format_table(results: dict) -> str:
    """The sweep as a text table: medians in ms and speedups (x) over the masked dense net, memory ratios."""
    environment, by_key = results["environment"], {}
    for row in results["rows"]:  # (allocation, sparsity, batch) -> {backend: row}
        backend = row["backend"].split(" (")[0]
        by_key.setdefault((row["allocation"], row["sparsity"], row["batch_size"]), {})[backend] = row
    backends = list(next(iter(by_key.values())))
    labels = backends
    block = f"{'dense':>8}" + "".join(f" {label:>7} {'x':>5}" for label in labels) + " |"
    own = f"torch {environment['torch_threads']} threads, numba {environment['numba_threads']}"
    lines = [f"torch {environment['torch']}, scipy {environment['scipy']}, numba {environment['numba']}, "
             f"{environment['cpu_count']} CPUs; medians of {results['settings']['runs']} interleaved runs; "
             f"x = dense median / sparse median; scipy is single-threaded in both blocks",
             f"{'':23}|{own:^{len(block)}}|{'torch and numba with 1 thread':^{len(block)}}|",
             f"{'alloc':8} {'sparsity':>8} {'batch':>5} |{block}{block}"
             + "".join(f" {'mem x ' + label:>11}" for label in labels) + f" {'file x':>6} {'MMAC':>6}"]
    for (allocation, sparsity, batch), rows in by_key.items():
        cells = [f"{allocation:8} {sparsity:8.2f} {batch:5d} |"]
        for suffix in ("_ms", "_single_thread_ms"):
            dense, times = rows[backends[0]]["dense" + suffix], [row["sparse" + suffix] for row in rows.values()]
            cells.append(f"{dense:8.2f}" + "".join(f" {ms:7.2f} {dense / ms:5.1f}" for ms in times) + " |")
        cells += [f" {row['memory_ratio']:11.1f}" for row in rows.values()]
        first = rows[backends[0]]
        cells.append(f" {first['file_ratio']:6.1f} {first['sparse_macs'] / 1e6:6.1f}")
        lines.append("".join(cells))
    return "\n".join(lines)


def format_peers(results: dict) -> str:
    """The peers against this package's engines (uniform allocation), or the reason each was skipped."""
    lines = [f"skipped {name}: {reason}" for name, reason in results.get("skipped", {}).items()]
    peers = [row for row in results.get("peers", []) if row["allocation"] == "uniform"]
    if not peers:
        return "\n".join(lines)
    backends = [key[:-3] for key in peers[0] if key.endswith("_ms") and key not in ("masked_ms",)
                and not key.endswith("single_thread_ms") and key != "ms"]
    lines.append(f"{'peer':28} {'sparsity':>8} {'batch':>5} | {'peer ms':>8} " + " ".join(
        f"{backend + ' ms':>10}" for backend in backends) + f" | {'1 thread: peer':>14} "
        + " ".join(f"{backend:>10}" for backend in backends))
    for row in peers:
        lines.append(f"{row['peer']:28} {row['sparsity']:8.2f} {row['batch_size']:5d} | {row['ms']:8.3f} "
                     + " ".join(f"{row[backend + '_ms']:10.3f}" for backend in backends)
                     + f" | {row['single_thread_ms']:14.3f} "
                     + " ".join(f"{row[backend + '_single_thread_ms']:10.3f}" for backend in backends))
    return "\n".join(lines)


def goal_lines(results: dict) -> list[str]:
    """The default CPU engine's speedups at batch 100 against the issue's goals (uniform), and what ERK gives."""
    lines = []
    engine = default_cpu_backend()
    for row in results["rows"]:
        if row["batch_size"] == 100 and row["sparsity"] in GOALS and row["backend"].split(" (")[0] == engine:
            goal = GOALS[row["sparsity"]]
            verdict = (f"goal {goal:.0f}x {'met' if row['speedup'] >= goal else 'MISSED'}"
                       if row["allocation"] == "uniform" else "no goal")
            lines.append(f"{engine} {row['allocation']} {row['sparsity']:.0%} batch 100: {row['speedup']:.1f}x "
                         f"against the masked net ({verdict}); memory {row['memory_ratio']:.1f}x smaller")
    return lines


# The README's rows of the sweep: (allocation, sparsity, batch).
README_ROWS = [("uniform", sparsity, 100) for sparsity in (0.5, 0.8, 0.9)] + [
    ("uniform", 0.95, 1), ("uniform", 0.95, 100), ("uniform", 0.98, 100), ("uniform", 0.99, 1), ("uniform", 0.99, 100),
    ("erk", 0.95, 100), ("erk", 0.99, 100)]


def readme_tables(results: dict) -> str:
    """The README's two markdown tables from ``results``: the engines against the masked net on ``README_ROWS``,
    and, per uniform cell, the peers beside numba and the masked net, the fastest of every engine timed in that
    block (peers, numba, scipy, torch.sparse, masked dense) in bold."""
    rows = {(row["allocation"], row["sparsity"], row["batch_size"], row["backend"].split(" (")[0]): row
            for row in results["rows"]}
    lines = ["| allocation | sparsity | batch | masked dense, 2 threads | numba | speedup | scipy | speedup | "
             "torch.sparse | speedup | memory (numba) | memory (scipy, torch) | file |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for allocation, sparsity, batch in README_ROWS:
        numba, scipy, torch_sparse = (rows[(allocation, sparsity, batch, backend)]
                                      for backend in ("numba", "scipy", "torch"))
        lines.append(f"| {allocation} | {sparsity:.2f} | {batch} | {numba['dense_ms']:.2f} | "
                     + " | ".join(f"{row['sparse_ms']:.2f} | {row['speedup']:.1f}x"
                                  for row in (numba, scipy, torch_sparse))
                     + f" | {numba['memory_ratio']:.1f}x | {scipy['memory_ratio']:.1f}x | {numba['file_ratio']:.1f}x |")
    peers: dict[tuple, dict] = {}  # (sparsity, batch) -> {peer: row}
    for row in results.get("peers", []):
        if row["allocation"] == "uniform":
            peers.setdefault((row["sparsity"], row["batch_size"]), {})[row["peer"]] = row
    if not peers:
        return "\n".join(lines)
    names = list(next(iter(peers.values())))
    lines += ["", "| sparsity | batch | " + " | ".join(names) + " | numba | masked dense (torch) | 1 thread: "
              + " | ".join(names) + " | numba | masked dense |",
              "|---|---|" + "---|" * (2 * len(names) + 4)]
    for (sparsity, batch), by_peer in sorted(peers.items()):
        first, cells = next(iter(by_peer.values())), []
        for suffix in ("_ms", "_single_thread_ms"):
            shown = [by_peer[name]["ms" if suffix == "_ms" else "single_thread_ms"] for name in names]
            shown += [first["numba" + suffix], first["masked" + suffix]]
            fastest = min(shown + [first["scipy" + suffix], first["torch" + suffix]])
            cells += [f"**{ms:.3f}**" if ms == fastest else f"{ms:.3f}" for ms in shown]
        lines.append(f"| {sparsity:.2f} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_text(results: dict) -> str:
    """What the README shows of ``results``: its tables, then the paragraphs on the goals and the peers."""
    return "\n\n".join([readme_tables(results), *readme_summary(results)])


def block_times(results: dict, suffix: str) -> dict[tuple, dict[str, float]]:
    """Every engine's median (``suffix``: "_ms" own threads, "_single_thread_ms" one thread) per uniform
    (sparsity, batch): the peers and the engines their rows carry, by name."""
    blocks: dict[tuple, dict[str, float]] = {}
    for row in results.get("peers", []):
        if row["allocation"] != "uniform":
            continue
        times = blocks.setdefault((row["sparsity"], row["batch_size"]), {})
        times[row["peer"]] = row["ms" if suffix == "_ms" else "single_thread_ms"]
        times.update({name: row[key + suffix] for key, name in ENGINE_NAMES.items() if key + suffix in row})
    return blocks


def fastest_from(blocks: dict[tuple, dict[str, float]], batch: int) -> float | None:
    """The lowest sparsity from which numba is the fastest engine at every sparsity up, at ``batch``; None if
    it is not the fastest at the highest one."""
    lowest = None
    for sparsity in sorted((sparsity for sparsity, size in blocks if size == batch), reverse=True):
        times = blocks[(sparsity, batch)]
        if min(times, key=times.get) != "numba":
            break
        lowest = sparsity
    return lowest


def percent(fraction: float) -> str:
    """0.95 -> "95 %", as the README writes a sparsity."""
    return f"{fraction * 100:g} %"


def readme_summary(results: dict) -> list[str]:
    """The README's paragraphs on the goals and the peers, every number from ``results``."""
    rows = {(row["allocation"], row["sparsity"], row["batch_size"], row["backend"]): row for row in results["rows"]}
    uniform = {sparsity: rows[("uniform", sparsity, 100, "numba")] for sparsity in GOALS}
    erk = rows.get(("erk", 0.99, 100, "numba (erk)"))
    verdicts = [f"{row['speedup']:.1f}x at {percent(sparsity)} (goal {GOALS[sparsity]:.0f}x, "
                f"{'met' if row['speedup'] >= GOALS[sparsity] else 'missed'})" for sparsity, row in uniform.items()]
    conv_ms, memory = uniform[0.95]["sparse_ms"], uniform[0.95]["memory_ratio"]
    scipy_memory = rows[("uniform", 0.95, 100, "scipy")]["memory_ratio"]
    paragraphs = [
        "Goals, numba against the 2-thread masked net (uniform, batch 100): " + ", ".join(verdicts)
        + (f"; with ERK at 99 %, {erk['speedup']:.1f}x" if erk else "") + ". The convolution work's goal, 95 % at "
        f"batch 100 in at most {CONV_GOAL_MS} ms: {conv_ms:.3f} ms, {'met' if conv_ms <= CONV_GOAL_MS else 'missed'}"
        f". Memory at 95 %: the numba model is {memory:.1f}x smaller than weights plus masks (goal "
        f"{MEMORY_GOAL:.0f}x, {'met' if memory >= MEMORY_GOAL else 'missed'}); scipy, cupy and torch, with int32 "
        f"indices, {scipy_memory:.1f}x. This run took {results['settings']['seconds']:.0f} s"
        + (f"; numba's first call in it (loading its kernels from numba's disk cache, or compiling them) "
           f"{results['settings']['numba_first_call_seconds']:.2f} s, untimed"
           if results["settings"].get("numba_first_call_seconds") is not None else "") + "."]
    own, single = block_times(results, "_ms"), block_times(results, "_single_thread_ms")
    if not own:
        return paragraphs
    sentences = []
    for label, blocks in (("with each library's own threads", own), ("on one thread", single)):
        starts = {batch: fastest_from(blocks, batch) for batch in sorted({batch for _, batch in blocks})}
        shown = [f"from {percent(start)} at batch {batch}" if start is not None else f"nowhere at batch {batch}"
                 for batch, start in starts.items()]
        losses = [f"{min(times, key=times.get)} at {percent(sparsity)}, batch {batch} ({min(times.values()):.3f} ms "
                  f"against numba's {times['numba']:.3f})"
                  for (sparsity, batch), times in sorted(blocks.items()) if min(times, key=times.get) != "numba"]
        sentences.append(f"{label}, numba is the fastest of the {len(next(iter(blocks.values())))} engines "
                         f"{' and '.join(shown)}" + (f"; faster elsewhere: {'; '.join(losses)}" if losses else ""))
    mkl = [times for times in own.values() if MKL in times]
    if mkl:
        slower = sum(times[MKL] > times["scipy"] for times in mkl)
        sentences.append(f"MKL's sparse products under the scipy engine are slower than scipy's own in {slower} of "
                         f"{len(mkl)} cells with their own threads")
    paragraphs.append(". ".join(sentence[0].upper() + sentence[1:] for sentence in sentences) + ".")
    return paragraphs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sparsities and runs, uniform allocation only; "
                        "prints the tables and writes nothing")
    parser.add_argument("--threads", type=int, help="torch and numba threads for the dense, torch.sparse "
                        "and numba rows (default: their own choice)")
    parser.add_argument("--replot", action="store_true", help="redraw sparse_inference.png from the committed "
                        "JSON without timing anything")
    parser.add_argument("--readme", action="store_true", help="print the README's tables and summary from the "
                        "committed JSON without timing anything")
    args = parser.parse_args()
    if args.readme:
        print(readme_text(json.loads((RESULTS / "sparse_inference.json").read_text())))
        return
    if args.replot:
        plot_sparsity_sweep(json.loads((RESULTS / "sparse_inference.json").read_text())["rows"],
                            save_path=RESULTS / "sparse_inference.png")
        print(f"redrew {RESULTS / 'sparse_inference.png'} from sparse_inference.json")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
        _set_numba_threads(args.threads)
    first_call = numba_first_call_seconds()  # before the sweep, so no timed call ever compiles
    started = time.perf_counter()
    if args.quick:
        results = sweep([0.9, 0.99], [1, 100], ["uniform"], runs=3, warmup=1)
    else:
        results = sweep([0.5, 0.8, 0.9, 0.95, 0.98, 0.99], [1, 100], ["uniform", "erk"], runs=30, warmup=3)
    results["settings"]["seconds"] = time.perf_counter() - started
    results["settings"]["numba_first_call_seconds"] = first_call
    print(format_table(results))
    print(format_peers(results))
    print("\n".join(goal_lines(results)))
    if first_call is not None:
        print(f"numba's first call in this process (compiling or loading its cache): {first_call:.2f} s, untimed")
    if args.quick:  # a smoke run: the committed results stay as they are
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / "sparse_inference.json"
    json_path.write_text(json.dumps(results, indent=1))
    plot_sparsity_sweep(results["rows"], save_path=RESULTS / "sparse_inference.png")
    print(f"wrote {json_path} and sparse_inference.png in {results['settings']['seconds']:.0f} s")


if __name__ == "__main__":
    main()
