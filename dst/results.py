"""Per-run results as JSON, the table across runs, and claims computed from measurements."""

import json
import math
from pathlib import Path

import numpy as np
import torch

# Two medians closer than this are reported as "about the same": these machines are noisy.
SAME_SPEED_TOLERANCE = 0.10


def run_label(sparsity: float, allocation: str, regrow: str) -> str:
    """File-name-safe label of a run, e.g. ``s95_erk_random`` for 95 % sparsity."""
    return f"s{sparsity * 100:g}_{allocation}_{regrow}"


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
    """Write one run's record to ``folder/<record['label']>.json`` and return the path."""
    if "label" not in record:
        raise ValueError("a run record needs a 'label' (see run_label) to name its file")
    path = Path(folder) / f"{record['label']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(record), indent=2))
    return path


def load_runs(folder: str | Path = "results") -> list[dict]:
    """Every saved run record in ``folder``, sorted by sparsity then label."""
    runs = [json.loads(path.read_text()) for path in sorted(Path(folder).glob("*.json"))]
    return sorted(runs, key=lambda run: (run["config"]["GLOBAL_SPARSITY"], run["label"]))


def runs_table(runs: list[dict]) -> list[dict]:
    """One row per run: accuracies, their gap, CPU speedup and memory ratio of the CSR model."""
    rows = []
    for run in runs:
        timings = run.get("benchmark", {})
        dense = timings.get("Dense+Mask (CPU)", {}).get("median")
        sparse = timings.get("Truly Sparse CSR (CPU)", {}).get("median")
        rows.append({
            "label": run["label"],
            "sparsity": run["config"]["GLOBAL_SPARSITY"],
            "epochs": len(run["masked"]),
            "dense_test_acc": run["final"]["dense_test_acc"],
            "masked_test_acc": run["final"]["masked_test_acc"],
            "gap": run["final"]["masked_test_acc"] - run["final"]["dense_test_acc"],
            "speedup": dense / sparse if dense and sparse else None,
            "memory_ratio": run.get("memory", {}).get("ratio"),
            "minutes": run.get("train_seconds", math.nan) / 60,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    """The runs table as Markdown text."""
    header = ("| run | sparsity | epochs | dense acc % | masked acc % | gap (points) | CSR speedup (CPU) "
              "| memory ratio | training min |")
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        speedup = "n/a" if row["speedup"] is None else f"{row['speedup']:.2f}x"
        memory = "n/a" if row["memory_ratio"] is None else f"{row['memory_ratio']:.1f}x smaller"
        lines.append(f"| {row['label']} | {row['sparsity']:.1%} | {row['epochs']} | {row['dense_test_acc']:.2f} "
                     f"| {row['masked_test_acc']:.2f} | {row['gap']:+.2f} | {speedup} | {memory} "
                     f"| {row['minutes']:.1f} |")
    return "\n".join(lines)


def speed_sentence(candidate: str, candidate_ms: float, baseline: str, baseline_ms: float, detail: str = "") -> str:
    """A sentence comparing two measured times, worded by what the numbers say."""
    numbers = f"({candidate_ms:.2f} ms vs {baseline_ms:.2f} ms{', ' + detail if detail else ''})"
    ratio = baseline_ms / candidate_ms
    if ratio > 1 + SAME_SPEED_TOLERANCE:
        return f"{candidate} is {ratio:.2f}x faster than {baseline} {numbers}"
    if ratio < 1 / (1 + SAME_SPEED_TOLERANCE):
        return f"{candidate} is {1 / ratio:.2f}x slower than {baseline} {numbers}"
    return f"{candidate} and {baseline} run at about the same speed (within {SAME_SPEED_TOLERANCE:.0%}) {numbers}"


def describe_speedup(timings: dict[str, dict], baseline: str, candidate: str) -> str:
    """``speed_sentence`` for two rows of ``benchmark_inference``'s timings (their medians)."""
    return speed_sentence(candidate, timings[candidate]["median"], baseline, timings[baseline]["median"],
                          f"medians of {timings[candidate]['runs']} runs")


def describe_memory(memory: dict) -> str:
    """A sentence comparing the CSR model's bytes with the masked dense model's."""
    dense, sparse = memory["dense_bytes"], memory["sparse_bytes"]
    numbers = f"({sparse / 2**20:.2f} MiB vs {dense / 2**20:.2f} MiB for weights + masks)"
    if sparse < dense:
        return f"The CSR model is {dense / sparse:.1f}x smaller than the masked dense model {numbers}"
    return f"The CSR model is {sparse / dense:.1f}x LARGER than the masked dense model {numbers}"
