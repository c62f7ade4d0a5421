"""Per-run results as JSON, the table across runs, and claims computed from measurements."""

import hashlib
import json
import math
import os
import re
import stat
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from dst.core.checks import load_json
from dst.tutorial import benchmark_rows

# Two medians closer than this are reported as "about the same": these machines are noisy.
SAME_SPEED_TOLERANCE = 0.10


# Settings shown in a run's label; every other setting is folded into the label's hash.
LABEL_KEYS = ("GLOBAL_SPARSITY", "allocation", "regrow", "num_epochs")
# A label is a plain file name: it names files inside the results and plots folders, never a path.
PLAIN_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
# What load_runs needs of a record, so a foreign JSON file is skipped instead of breaking the table.
RECORD_KEYS = {"label": (), "config": ("GLOBAL_SPARSITY",), "final": ("dense_test_acc", "masked_test_acc"),
               "masked": (), "dense": ()}


def run_label(config: dict) -> str:
    """File-name-safe label of a run, unique to every setting in ``config``.

    Readable for what people compare (sparsity, allocation, regrow, epochs, and the batch
    cap of a quick run), then a 6-digit hash of the whole config, so two runs differing
    in anything (learning rate, seed, DST frequency, ...) never share files:
    ``s95_erk_random_e10_3f9c2a``, or ``s95_erk_random_e2_b20_81d07e`` for a quick run.
    """
    if not isinstance(config, dict):
        raise TypeError(f"run_label takes the run's config dict, got {type(config).__name__}")
    missing = [key for key in LABEL_KEYS if key not in config]
    if missing:
        raise ValueError(f"config is missing {missing}; a label needs {list(LABEL_KEYS)}")
    sparsity = config["GLOBAL_SPARSITY"]
    if isinstance(sparsity, np.generic) or (isinstance(sparsity, torch.Tensor) and sparsity.numel() == 1):
        sparsity = sparsity.item()  # a numpy or one-element torch scalar is read as its number
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"config['GLOBAL_SPARSITY'] must be a number in [0, 1), got "
                         f"{type(config['GLOBAL_SPARSITY']).__name__} {config['GLOBAL_SPARSITY']!r:.40}")
    config = {**config, "GLOBAL_SPARSITY": sparsity}
    # .10g: 0.8000001 reads s80.00001 and 0.9999999 s99.99999, never a rounded s80 or s100.
    label = (f"s{config['GLOBAL_SPARSITY'] * 100:.10g}_{config['allocation']}_{config['regrow']}"
             f"_e{config['num_epochs']}")
    if config.get("max_batches_per_epoch") is not None:
        label += f"_b{config['max_batches_per_epoch']}"
    digest = hashlib.sha256(json.dumps(_plain(config), sort_keys=True).encode()).hexdigest()[:6]
    label = f"{label}_{digest}"
    check_label(label)
    return label


def check_label(label) -> None:
    """Raise unless ``label`` is a plain file name (letters, digits, '.', '_', '-'; no path)."""
    if not isinstance(label, str) or not PLAIN_LABEL.fullmatch(label) or ".." in label:
        raise ValueError(f"run label {label!r} is not a plain file name: use letters, digits, '.', '_' and '-' "
                         "(at most 200, no '..', no '/'), e.g. what run_label(config) returns")


def run_path(label: str, folder: str | Path = "results") -> Path:
    """Where ``save_run`` writes the run called ``label``."""
    check_label(label)
    return Path(folder) / f"{label}.json"


def _plain(value):
    """JSON-ready copy of ``value`` (numpy/torch scalars, dataclasses-as-dicts, tuples)."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def save_run(record: dict, folder: str | Path = "results") -> Path:
    """Write one run's record to ``folder/<record['label']>.json`` atomically and return the path.

    The file is written next to its final name and then renamed over it, so an interrupted
    save never leaves a truncated record behind. A rerun with identical settings has the
    same label and replaces its own file (check ``run_path(label).exists()`` first to say so).
    The file gets the permissions a plain ``open`` would give it (the umask's, like the plots),
    not the owner-only mode of a temporary file, so others on a shared server can read it.
    """
    if "label" not in record:
        raise ValueError("a run record needs a 'label' (see run_label) to name its file")
    path = run_path(record["label"], folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False) as handle:
        handle.write(json.dumps(_plain(record), indent=2))
    os.chmod(handle.name, 0o666 & ~_umask())
    os.replace(handle.name, path)
    return path


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (setting it, even briefly, races threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def load_runs(folder: str | Path = "results") -> list[dict]:
    """Every run record in ``folder``, sorted by sparsity then label.

    A file that is not a regular file, not readable JSON (or nested deeper than
    ``dst.core.checks.MAX_JSON_DEPTH``), or not a run record of this notebook (every field the
    table reads is checked: its type and range) is skipped with a warning that names it,
    so one stray or crafted file cannot break the table of all runs.
    """
    runs = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            record = load_json(_read_regular_file(path).decode())
        except (OSError, UnicodeDecodeError, ValueError) as error:  # ValueError: invalid or too deep JSON
            warnings.warn(f"skipping {path}: not readable JSON ({error})", stacklevel=2)
            continue
        problem = _record_problem(record)
        if problem:
            warnings.warn(f"skipping {path}: not a run record of this tutorial ({problem})", stacklevel=2)
            continue
        runs.append(record)
    return sorted(runs, key=lambda run: (run["config"]["GLOBAL_SPARSITY"], run["label"]))


def _read_regular_file(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file; OSError otherwise (a FIFO would block a plain open)."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(f"{path.name} is not a regular file")
        return file.read()


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _record_problem(record) -> str:
    """What makes ``record`` unusable as a run record, or '' if nothing does."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    for key, inner in RECORD_KEYS.items():
        if key not in record:
            return f"no {key!r}"
        missing = [name for name in inner if not isinstance(record[key], dict) or name not in record[key]]
        if missing:
            return f"{key!r} has no {missing}"
    sparsity = record["config"]["GLOBAL_SPARSITY"]
    if not (_is_number(sparsity) and 0 <= sparsity < 1):
        return f"GLOBAL_SPARSITY is {sparsity!r:.40}, not a number in [0, 1)"
    benchmark, memory = record.get("benchmark", {}), record.get("memory", {})
    checks = [
        ("label", isinstance(record["label"], str) and record["label"] != "", "a non-empty string"),
        ("final.dense_test_acc", _is_number(record["final"]["dense_test_acc"]), "a number"),
        ("final.masked_test_acc", _is_number(record["final"]["masked_test_acc"]), "a number"),
        ("masked", isinstance(record["masked"], list), "a list of epochs"),
        ("dense", isinstance(record["dense"], list), "a list of epochs"),
        ("train_batches_per_epoch", record.get("train_batches_per_epoch") is None
         or _is_count(record["train_batches_per_epoch"]), "a count or null"),
        ("train_seconds", "train_seconds" not in record or _is_number(record["train_seconds"]), "a number"),
        ("benchmark", isinstance(benchmark, dict) and all(
            isinstance(timing, dict) and (timing.get("median") is None or _is_number(timing["median"]))
            for timing in benchmark.values()), "an object of timings with numeric medians"),
        ("memory", isinstance(memory, dict) and (memory.get("ratio") is None or _is_number(memory["ratio"])),
         "an object with a numeric ratio"),
    ]
    for field, valid, expected in checks:
        if not valid:
            value = record
            for part in field.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            return f"{field} is {str(value)[:40]}, not {expected}"
    return ""


def runs_table(runs: list[dict]) -> list[dict]:
    """One row per run: budget, accuracies, their gap, CPU speedup and memory ratio of the CSR model."""
    rows = []
    for run in runs:
        timings = run.get("benchmark", {})
        dense = timings.get(benchmark_rows.MASKED_CPU, {}).get("median")
        sparse = timings.get(benchmark_rows.CSR_CPU, {}).get("median")
        rows.append({
            "label": run["label"],
            "sparsity": run["config"]["GLOBAL_SPARSITY"],
            "epochs": len(run["masked"]),
            "batches_per_epoch": run.get("train_batches_per_epoch"),
            "dense_test_acc": run["final"]["dense_test_acc"],
            "masked_test_acc": run["final"]["masked_test_acc"],
            "gap": run["final"]["masked_test_acc"] - run["final"]["dense_test_acc"],
            "speedup": dense / sparse if dense and sparse else None,
            "memory_ratio": run.get("memory", {}).get("ratio"),
            "minutes": run.get("train_seconds", math.nan) / 60,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    """The runs table as Markdown text; the budget column tells a quick run from a full one."""
    header = ("| run | sparsity | epochs x batches | dense acc % | masked acc % | gap (points) "
              "| CSR speedup (CPU) | memory ratio | training min |")
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        speedup = "n/a" if row["speedup"] is None else f"{row['speedup']:.2f}x"
        memory = "n/a" if row["memory_ratio"] is None else f"{row['memory_ratio']:.1f}x smaller"
        batches = "?" if row.get("batches_per_epoch") is None else f"{row['batches_per_epoch']:,}"
        lines.append(f"| {row['label']} | {row['sparsity']:.1%} | {row['epochs']} x {batches} "
                     f"| {row['dense_test_acc']:.2f} | {row['masked_test_acc']:.2f} | {row['gap']:+.2f} "
                     f"| {speedup} | {memory} | {row['minutes']:.1f} |")
    return "\n".join(lines)


def speed_phrase(candidate_ms: float, baseline_ms: float) -> str:
    """How ``candidate`` compares with ``baseline``: '2.5x faster', '1.3x slower' or 'about the same speed'.

    The one place that words a timing comparison: the printed sentences and the figures'
    labels both use it, so they agree on the threshold (``SAME_SPEED_TOLERANCE``).
    """
    if not (candidate_ms > 0 and baseline_ms > 0):
        raise ValueError(f"times must be positive, got {candidate_ms} and {baseline_ms} ms")
    ratio = baseline_ms / candidate_ms
    if 1 / (1 + SAME_SPEED_TOLERANCE) <= ratio <= 1 + SAME_SPEED_TOLERANCE:
        return "about the same speed"
    factor, word = (ratio, "faster") if ratio > 1 else (1 / ratio, "slower")
    return f"{factor:.3g}x {word}"


def speed_sentence(candidate: str, candidate_ms: float, baseline: str, baseline_ms: float, detail: str = "") -> str:
    """A sentence comparing two measured times, worded by ``speed_phrase``."""
    numbers = f"({candidate_ms:.2f} ms vs {baseline_ms:.2f} ms{', ' + detail if detail else ''})"
    phrase = speed_phrase(candidate_ms, baseline_ms)
    if phrase == "about the same speed":
        return (f"{candidate} and {baseline} run at about the same speed "
                f"(within {SAME_SPEED_TOLERANCE:.0%}) {numbers}")
    return f"{candidate} is {phrase} than {baseline} {numbers}"


def describe_speedup(timings: dict[str, dict], baseline: str, candidate: str) -> str:
    """``speed_sentence`` for two rows of ``benchmark_inference``'s timings (their medians)."""
    return speed_sentence(candidate, timings[candidate]["median"], baseline, timings[baseline]["median"],
                          f"medians of {timings[candidate]['runs']} runs")


def describe_benchmark(timings: dict[str, dict]) -> list[str]:
    """One sentence per row of ``benchmark_inference``'s timings, none left out, then the cross-device pairs.

    Each row is compared with its device's masked net (the baseline), the masked net with the
    plain dense net of its device, and ``COMPARISONS``'s pairs across devices follow, where both ran.
    """
    sentences = []
    for row in timings:
        device = benchmark_rows.device_of(row)
        if benchmark_rows.is_baseline(row):
            baseline = benchmark_rows.row(benchmark_rows.DENSE, device)
            if baseline in timings:
                sentences.append(describe_speedup(timings, baseline, row)
                                 + ": simulated sparsity at inference, all weights through the same dense kernels")
            continue
        baseline = benchmark_rows.row(benchmark_rows.MASKED, device)
        if baseline in timings and not row.startswith(benchmark_rows.DENSE):
            sentences.append(describe_speedup(timings, baseline, row))
    for baseline, candidate in benchmark_rows.COMPARISONS:
        if (baseline in timings and candidate in timings
                and benchmark_rows.device_of(baseline) != benchmark_rows.device_of(candidate)):
            sentences.append(describe_speedup(timings, baseline, candidate))
    return sentences


def describe_memory(memory: dict) -> str:
    """A sentence comparing the CSR model's bytes with the masked dense model's (and the plain dense model's)."""
    dense, sparse = memory["dense_bytes"], memory["sparse_bytes"]
    numbers = f"({sparse / 2**20:.2f} MiB vs {dense / 2**20:.2f} MiB for weights + masks"
    plain = memory.get("plain_dense_bytes")
    if plain:
        numbers += f"; the plain dense model, without masks, holds {plain / 2**20:.2f} MiB"
    numbers += ")"
    if sparse < dense:
        return f"The CSR model is {dense / sparse:.1f}x smaller than the masked dense model {numbers}"
    return f"The CSR model is {sparse / dense:.1f}x LARGER than the masked dense model {numbers}"


def describe_mask_overhead(memory: dict) -> str:
    """A sentence on what simulated sparsity holds against the plain dense model: weights, plus a mask."""
    masked, plain = memory["dense_bytes"], memory["plain_dense_bytes"]
    return (f"Simulated sparsity holds every weight plus a 1-byte mask per weight: {masked / 2**20:.2f} MiB, "
            f"{masked / plain:.2f}x the plain dense model's {plain / 2**20:.2f} MiB")


def sweep_row_allocation(row: dict) -> str:
    """A sparsity-sweep row's allocation: its own field, else read from its backend label ("numba (erk)")."""
    return row.get("allocation") or ("erk" if row["backend"].endswith(" (erk)") else "uniform")


def sweep_row_engine(row: dict) -> str:
    """A sparsity-sweep row's CSR engine: its backend label without the " (erk)" suffix."""
    return row["backend"].removesuffix(" (erk)")


def describe_crossovers(rows: list[dict], allocation: str = "uniform") -> list[str]:
    """Per CSR engine and batch size, from which measured sparsity on it beats dense+mask: one sentence each.

    ``rows``: ``{'sparsity', 'batch_size', 'backend', 'speedup'}`` (speedup = dense+mask time / CSR
    time), as ``benchmarks/sparse_inference.py`` writes them (its ERK rows' backends end in
    " (erk)"; only ``allocation``'s rows are read). "From" means at that sparsity and every higher
    one measured; a run of wins that a higher sparsity breaks is reported as no crossover.
    """
    rows = [row for row in rows if sweep_row_allocation(row) == allocation]
    if not rows:
        raise ValueError(f"no rows with {allocation!r} allocation")
    sentences = []
    for engine, batch_size in sorted({(sweep_row_engine(row), row["batch_size"]) for row in rows}):
        line = sorted((row["sparsity"], row["speedup"]) for row in rows
                      if (sweep_row_engine(row), row["batch_size"]) == (engine, batch_size))
        winning = [index for index in range(len(line)) if all(speedup > 1 for _, speedup in line[index:])]
        where = f"{engine}, batch {batch_size}"
        measured = ", ".join(f"{100 * sparsity:g} %" for sparsity, _ in line)
        if not winning:
            best = max(line, key=lambda point: point[1])
            sentences.append(f"{where}: slower than dense+mask at the highest sparsity measured "
                             f"({100 * line[-1][0]:g} %: {line[-1][1]:.2f}x; best {best[1]:.2f}x at "
                             f"{100 * best[0]:g} %); measured at {measured}")
            continue
        sparsity, speedup = line[winning[0]]
        if winning[0] == 0:
            sentences.append(f"{where}: faster than dense+mask at every sparsity measured, from "
                             f"{100 * sparsity:g} % ({speedup:.2f}x) to {100 * line[-1][0]:g} % ({line[-1][1]:.2f}x)")
        else:
            below, below_speedup = line[winning[0] - 1]
            sentences.append(f"{where}: faster than dense+mask from {100 * sparsity:g} % on ({speedup:.2f}x; "
                             f"{below_speedup:.2f}x at {100 * below:g} %), {line[-1][1]:.2f}x at "
                             f"{100 * line[-1][0]:g} %")
    return sentences
