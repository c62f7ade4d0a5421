"""What a sparsity pattern buys on this machine, and what it costs: the hardware-aware section's numbers.

``time_patterns`` times one linear layer per pattern, converted by ``SparseNet.from_masked`` (the pattern
picks the truly sparse kind: CSR, condensed fan-in, BSR), against the dense layer in torch and against
the same density unstructured in CSR, all interleaved in one run. ``summarize_patterns`` averages the
committed accuracy rows (``benchmarks/structured_accuracy.py``) and sets each against unstructured at the
same density. The ``describe_*`` functions word both as sentences computed from the numbers.
"""

import statistics

import numpy as np
import torch
from torch import nn

from dst.core.checks import check_positive_int
from dst.csr.backends import default_cpu_backend
from dst.csr.model import SparseNet
from dst.engine.allocation import check_sparsity
from dst.engine.masked import MaskedNet
from dst.engine.patterns import get_pattern
from dst.tutorial.benchmark import time_interleaved
from dst.tutorial.results import speed_phrase

UNSTRUCTURED = "unstructured"


def pattern_density(pattern: str, sparsity: float) -> float:
    """The density a pattern is timed and trained at: N:M holds exactly n/m, the others ``1 - sparsity``."""
    chosen = get_pattern(pattern)
    return chosen.n / chosen.m if chosen.kind == "n_m" else 1.0 - sparsity


def time_patterns(in_features: int, out_features: int, sparsity: float, patterns, batches=(1, 100),
                  runs: int = 30, backend: str | None = None, seed: int = 0) -> list[dict]:
    """One row per (pattern, batch): medians (ms) of the pattern's layer, the dense layer and unstructured CSR.

    Every pattern's ``Linear(in_features, out_features)`` is masked at ``pattern_density`` (so 2:4 at 50 %
    whatever ``sparsity`` says) and compared with the unstructured layer at that same density on the
    same ``backend`` (default: the fastest CPU one), so a row says what the pattern itself buys.
    Returns rows ``{"pattern", "kind", "sparse_kind", "density", "batch", "pattern_ms", "unstructured_ms",
    "dense_ms", "runs"}``; ``kind`` is the pattern's kind, ``sparse_kind`` the truly sparse layer kind it ran as.
    """
    check_positive_int(in_features=in_features, out_features=out_features, runs=runs,
                       **{f"batches[{index}]": batch for index, batch in enumerate(batches)})
    check_sparsity(sparsity)
    backend = backend or default_cpu_backend()
    generator = torch.Generator().manual_seed(seed)
    dense = nn.Linear(in_features, out_features).eval()
    names = [UNSTRUCTURED] + [name for name in patterns if get_pattern(name).label != UNSTRUCTURED]
    converted = {}  # (pattern label, density) -> SparseNet
    for name in names:
        for density in {pattern_density(name, sparsity)} | ({pattern_density(other, sparsity) for other in names}
                                                             if name == UNSTRUCTURED else set()):
            masked = MaskedNet(nn.Sequential(dense), 1.0 - density, pattern=name, generator=generator,
                               scale_init=False)
            converted[get_pattern(name).label, density] = SparseNet.from_masked(masked, backend)
    rows = []
    for batch in batches:
        inputs = torch.randn(batch, in_features, generator=generator)
        host = inputs.numpy()
        forwards = {"dense": (_no_grad(dense, inputs), None)}
        forwards |= {key: (_call(model, host), None) for key, model in converted.items()}
        timings = time_interleaved(forwards, runs=runs, warmup=5)
        for name in names:
            label, density = get_pattern(name).label, pattern_density(name, sparsity)
            model = converted[label, density]
            rows.append({"pattern": label, "kind": get_pattern(name).kind,
                         "sparse_kind": next(iter(model.layers.values())).kind, "density": density,
                         "batch": batch, "pattern_ms": timings[label, density]["median"],
                         "unstructured_ms": timings[UNSTRUCTURED, density]["median"],
                         "dense_ms": timings["dense"]["median"], "runs": runs})
    return rows


def _no_grad(layer: nn.Module, inputs: torch.Tensor):
    def forward():
        with torch.no_grad():
            return layer(inputs)
    return forward


def _call(model: SparseNet, inputs: np.ndarray):
    return lambda: model(inputs)


def describe_pattern_speed(rows: list[dict]) -> list[str]:
    """One sentence per timed row: the pattern's layer against dense and against unstructured CSR, same density."""
    sentences = []
    for row in rows:
        what = (f"batch {row['batch']}, {100 * (1 - row['density']):g} % sparse: {row['pattern']} "
                f"(as {row['sparse_kind']}) runs {_against(row['pattern_ms'], row['dense_ms'])} dense")
        times = f"{row['pattern_ms']:.3f} ms; dense {row['dense_ms']:.3f} ms"
        if row["pattern"] == UNSTRUCTURED:
            sentences.append(f"{what} ({times})")
            continue
        sentences.append(f"{what} and {_against(row['pattern_ms'], row['unstructured_ms'])} unstructured CSR at the "
                         f"same density ({times}; unstructured {row['unstructured_ms']:.3f} ms)")
    return sentences


def _against(candidate_ms: float, baseline_ms: float) -> str:
    """'2.5x faster than', '1.3x slower than' or 'at about the same speed as' (``speed_phrase``'s threshold)."""
    phrase = speed_phrase(candidate_ms, baseline_ms)
    return "at about the same speed as" if phrase == "about the same speed" else f"{phrase} than"


def summarize_patterns(rows: list[dict]) -> list[dict]:
    """Accuracy rows averaged over seeds per (model, method family, sparsity, pattern), each against unstructured.

    The method family is SET or RigL (SRigL is RigL under fan_in). Returns rows ``{"model", "method",
    "family", "sparsity", "pattern", "test_acc", "final_sparsity", "std", "seeds", "change"}``: ``change`` is
    the mean minus the unstructured mean of the same model, family and sparsity (None where that is missing),
    ``reference_std`` that reference's spread over seeds; ``final_sparsity`` is what the nets reached (a pattern
    rounds each layer's count to what it can hold).
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        family = "rigl" if row["method"].split("+")[0].split("/")[0] in ("rigl", "srigl") else "set"
        groups.setdefault((row["model"], family, row["sparsity"], row["pattern"]), []).append(row)
    summary = []
    for (model, family, sparsity, pattern), members in sorted(groups.items()):
        accuracies = [member["test_acc"] for member in members]
        reference = groups.get((model, family, sparsity, UNSTRUCTURED))
        mean = statistics.fmean(accuracies)
        summary.append({"model": model, "method": members[0]["method"], "family": family, "sparsity": sparsity,
                        "pattern": pattern, "test_acc": mean,
                        "final_sparsity": statistics.fmean(member["final_sparsity"] for member in members),
                        "std": _std(accuracies),
                        "seeds": len(accuracies),
                        "change": None if pattern == UNSTRUCTURED or not reference else
                        mean - statistics.fmean(member["test_acc"] for member in reference),
                        "reference_std": None if not reference else _std([member["test_acc"] for member in reference])})
    return summary


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def pattern_table(summary: list[dict]) -> str:
    """A markdown table of ``summarize_patterns``: per model, method family and sparsity, unstructured's accuracy and
    each pattern's change against it (points; "unstable" where the seeds disagree, see ``UNSTABLE_STD``)."""
    patterns = list(dict.fromkeys(row["pattern"] for row in summary if row["pattern"] != UNSTRUCTURED))
    lines = ["| model | family | sparsity | unstructured (%) | " + " | ".join(patterns) + " | seeds |",
             "|---|---|---|---|" + "---|" * len(patterns) + "---|"]
    settings = list(dict.fromkeys((row["model"], row["family"], row["sparsity"]) for row in summary))
    for model, family, sparsity in settings:
        rows = {row["pattern"]: row for row in summary
                if (row["model"], row["family"], row["sparsity"]) == (model, family, sparsity)}
        reference = rows.get(UNSTRUCTURED)
        cells = [_change_cell(rows.get(pattern)) for pattern in patterns]
        seeds = "/".join(str(count) for count in sorted({row["seeds"] for row in rows.values()}))
        accuracy = "" if reference is None else f"{reference['test_acc']:.2f} ± {reference['std']:.2f}"
        lines.append(f"| {model} | {family} | {100 * sparsity:g} % | {accuracy} | " + " | ".join(cells)
                     + f" | {seeds} |")
    return "\n".join(lines)


def _change_cell(row: dict | None) -> str:
    if row is None or row["change"] is None:
        return ""
    return f"{row['change']:+.2f}" + (" (unstable)" if _unstable(row) else "")


def _unstable(row: dict) -> bool:
    return max(row["std"], row["reference_std"] or 0.0) > UNSTABLE_STD


# Seeds of one setting that differ by more than this (points, sample std) mean a run trained badly: the difference
# against unstructured then says more about training stability than about the pattern.
UNSTABLE_STD = 1.0


def describe_pattern_accuracy(summary: list[dict]) -> list[str]:
    """What the patterns cost against unstructured at the same density: one sentence per model and method family
    (the range over its stable rows), then one per unstable row, named as such and left out of the range."""
    sentences = []
    for model, family in dict.fromkeys((row["model"], row["family"]) for row in summary):
        rows = [row for row in summary
                if (row["model"], row["family"]) == (model, family) and row["change"] is not None]
        stable = [row for row in rows if not _unstable(row)]
        if stable:
            cheapest, dearest = max(stable, key=lambda row: row["change"]), min(stable, key=lambda row: row["change"])
            sentences.append(
                f"{model}, {family}: against unstructured at the same density the patterns changed test accuracy by "
                f"{dearest['change']:+.2f} ({dearest['pattern']}, {100 * dearest['sparsity']:g} %) to "
                f"{cheapest['change']:+.2f} points ({cheapest['pattern']}, {100 * cheapest['sparsity']:g} %), "
                f"median {statistics.median(row['change'] for row in stable):+.2f} over {len(stable)} settings")
        for row in rows:
            if _unstable(row):
                sentences.append(
                    f"{model}, {family}, {row['pattern']} at {100 * row['sparsity']:g} %: left out, its seeds disagree "
                    f"(± {row['std']:.2f} points, unstructured ± {row['reference_std']:.2f}): a run trained badly, "
                    "which is training instability, not the pattern's cost")
    return sentences


def tradeoff_points(speed_rows: list[dict], summary: list[dict], model: str, family: str, batch: int) -> list[dict]:
    """Points for ``plot_pattern_tradeoff``: each timed pattern's speed-up over dense at ``batch`` and its accuracy
    change against unstructured on ``model`` for ``family`` at the same sparsity (patterns without rows left out)."""
    changes = {(row["pattern"], round(row["sparsity"], 6)): row["change"] for row in summary
               if row["model"] == model and row["family"] == family}
    points = []
    for row in speed_rows:
        sparsity = round(1.0 - row["density"], 6)
        change = 0.0 if row["pattern"] == UNSTRUCTURED else changes.get((row["pattern"], sparsity))
        if row["batch"] != batch or change is None:
            continue
        points.append({"label": f"{row['pattern']} ({100 * sparsity:g} %)", "kind": row["kind"],
                       "speedup": row["dense_ms"] / row["pattern_ms"], "accuracy_change": change})
    return points
