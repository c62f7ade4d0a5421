"""The hardware-aware section's numbers: timed rows per pattern, accuracy against unstructured, sentences."""

import pytest

from dst.tutorial.hardware import (
    describe_pattern_accuracy,
    describe_pattern_speed,
    pattern_density,
    pattern_table,
    summarize_patterns,
    time_patterns,
    tradeoff_points,
)


def row(method, pattern, seed, accuracy, sparsity=0.9, model="lenet300-100", reached=0.9):
    return {"model": model, "method": method, "pattern": pattern, "sparsity": sparsity, "seed": seed,
            "test_acc": accuracy, "final_sparsity": reached}


ROWS = [row("rigl", "unstructured", 0, 98.0), row("rigl", "unstructured", 1, 98.4),
        row("srigl", "fan_in", 0, 97.9), row("srigl", "fan_in", 1, 98.1, reached=0.9006),
        row("set/block4x4", "block4x4", 0, 97.0), row("set", "unstructured", 0, 97.5),
        row("set/2:4", "2:4", 0, 98.6, sparsity=0.5, reached=0.498)]


def test_accuracy_is_averaged_per_family_and_set_against_unstructured_at_the_same_density():
    summary = {(entry["family"], entry["pattern"], entry["sparsity"]): entry for entry in summarize_patterns(ROWS)}
    assert summary["rigl", "fan_in", 0.9]["test_acc"] == pytest.approx(98.0)
    assert summary["rigl", "fan_in", 0.9]["change"] == pytest.approx(98.0 - 98.2)
    assert summary["rigl", "fan_in", 0.9]["final_sparsity"] == pytest.approx(0.9003)
    assert summary["set", "block4x4", 0.9]["change"] == pytest.approx(-0.5)
    assert summary["set", "2:4", 0.5]["change"] is None  # no unstructured run at 50 %: nothing to compare
    assert summary["rigl", "unstructured", 0.9]["change"] is None and summary["rigl", "unstructured", 0.9]["seeds"] == 2
    table = pattern_table(summarize_patterns(ROWS))
    assert "| model | family | sparsity | unstructured (%) | fan_in | 2:4 | block4x4 | seeds |" in table
    assert "| lenet300-100 | rigl | 90 % | 98.20 ± 0.28 | -0.20 |  |  | 2 |" in table
    assert "| lenet300-100 | set | 90 % | 97.50 ± 0.00 |  |  | -0.50 | 1 |" in table
    assert "| lenet300-100 | set | 50 % |  |  |  |  | 1 |" in table  # 2:4 without an unstructured run: no change
    sentences = describe_pattern_accuracy(summarize_patterns(ROWS))
    assert sentences == [
        "lenet300-100, rigl: against unstructured at the same density the patterns changed test accuracy by -0.20 "
        "(fan_in, 90 %) to -0.20 points (fan_in, 90 %), median -0.20 over 1 settings",
        "lenet300-100, set: against unstructured at the same density the patterns changed test accuracy by -0.50 "
        "(block4x4, 90 %) to -0.50 points (block4x4, 90 %), median -0.50 over 1 settings"]


def test_patterns_are_timed_against_dense_and_unstructured_at_their_own_density():
    rows = time_patterns(32, 16, 0.75, ["unstructured", "2:4"], batches=(1, 3), runs=2, backend="scipy")
    assert [(entry["pattern"], entry["batch"]) for entry in rows] == [
        ("unstructured", 1), ("2:4", 1), ("unstructured", 3), ("2:4", 3)]
    assert [entry["density"] for entry in rows[:2]] == [0.25, 0.5]  # 2:4 holds half, whatever the sparsity
    assert all(entry["pattern_ms"] > 0 and entry["dense_ms"] > 0 and entry["runs"] == 2 for entry in rows)
    assert rows[0]["pattern_ms"] == rows[0]["unstructured_ms"]
    assert pattern_density("2:4", 0.9) == 0.5 and pattern_density("fan_in", 0.9) == pytest.approx(0.1)
    sentences = describe_pattern_speed(rows)
    assert len(sentences) == 4 and " unstructured CSR at the same density" in sentences[1]
    assert sentences[1].startswith("batch 1, 50 % sparse: 2:4 (as ") and " runs " in sentences[1]
    assert f"{rows[1]['pattern_ms']:.3f} ms" in sentences[1]


def test_tradeoff_points_pair_a_patterns_speed_with_its_accuracy_change():
    speed = [{"pattern": "unstructured", "kind": "unstructured", "density": 0.1, "batch": 1, "pattern_ms": 2.0,
              "dense_ms": 4.0},
             {"pattern": "fan_in", "kind": "fan_in", "density": 0.1, "batch": 1, "pattern_ms": 1.0, "dense_ms": 4.0},
             {"pattern": "fan_in", "kind": "fan_in", "density": 0.1, "batch": 100, "pattern_ms": 9.0,
              "dense_ms": 4.0},
             {"pattern": "block4x4", "kind": "block", "density": 0.05, "batch": 1, "pattern_ms": 1.0,
              "dense_ms": 4.0}]
    points = tradeoff_points(speed, summarize_patterns(ROWS), "lenet300-100", "rigl", batch=1)
    assert points == [{"label": "unstructured (90 %)", "kind": "unstructured", "speedup": 2.0, "accuracy_change": 0.0},
                      {"label": "fan_in (90 %)", "kind": "fan_in", "speedup": 4.0,
                       "accuracy_change": pytest.approx(-0.2)}]


def test_speed_is_worded_by_the_one_threshold_both_ways():
    from dst.tutorial.hardware import _against

    assert _against(1.0, 3.0) == "3x faster than" and _against(3.0, 1.0) == "3x slower than"
    assert _against(1.0, 1.01) == "at about the same speed as"


def test_a_difference_decided_by_an_unstable_run_is_called_that_and_not_the_patterns_cost():
    rows = [row("rigl", "unstructured", 0, 98.0), row("rigl", "unstructured", 1, 98.2),
            row("rigl/block1x8", "block1x8", 0, 98.1), row("rigl/block1x8", "block1x8", 1, 11.35)]
    (sentence,) = describe_pattern_accuracy(summarize_patterns(rows))  # nothing stable is left to sum up
    assert "block1x8 at 90 %: left out, its seeds disagree (± 61.34 points, unstructured ± 0.14)" in sentence
    assert "training instability, not the pattern's cost" in sentence
    assert "-43.38 (unstable)" in pattern_table(summarize_patterns(rows))


@pytest.mark.parametrize("arguments, message", [
    ({"batches": (1, 0)}, r"batches\[1\]"), ({"runs": 0}, "runs"), ({"sparsity": 1.0}, "sparsity"),
    ({"patterns": ["2:5:1"]}, "unknown sparsity pattern")])
def test_bad_settings_are_refused_before_anything_is_built_or_timed(arguments, message):
    settings = {"sparsity": 0.9, "patterns": ["fan_in"], "batches": (1,), "runs": 2} | arguments
    with pytest.raises((TypeError, ValueError), match=message):
        time_patterns(16, 8, settings.pop("sparsity"), settings.pop("patterns"), **settings)
