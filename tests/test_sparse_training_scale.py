"""The scale benchmark's entry point: its CLI checks, its density rule, and resuming from a checkpoint."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import sparse_training_scale as scale
from dst.csr.mlp import SparseMLP
from dst.engine.schedule import DSTConfig

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                reason="numba is not installed (the benchmark's backend)")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, match", [
    (["--scale", "0"], "positive widths"),
    (["--scale", "4096,x"], "positive widths"),
    (["--scale", "64", "--epochs", "0"], "positive integer"),  # 0 is refused, not taken for "not given"
    (["--scale", "64", "--max-steps", "-3"], "positive integer"),
    (["--scale", "64", "--checkpoint-every", "0"], "positive integer"),
    (["--scale", "64", "--density", "eps0"], "epsN"),
    (["--scale", "64", "--density", "1.5"], "sparsity in"),
    (["--scale", "64", "--allocation", "random"], "invalid choice"),
    (["--scale", "64,128", "--resume", "x.npz"], "one width"),
    (["--scale", "64", "--resume", "missing.npz"], "no checkpoint"),
    (["--scale", "64", "--checkpoint", "a.npz"], "--checkpoint-every"),
    (["--density", "eps20"], "--scale WIDTH"),
])
def test_bad_cli_values_are_refused_with_a_clear_message(argv, match, capsys):
    with pytest.raises(SystemExit):
        scale.parse_args(argv)
    assert match in capsys.readouterr().err


def test_eps20_gives_each_layer_twenty_times_its_fan_in_plus_fan_out():
    sparsity, allocation = scale.sparsity_and_allocation(64, "eps20", None)
    assert allocation == "erk"
    model = SparseMLP.random(784, (64, 64), 10, sparsity, allocation)
    counts = model.active_counts()
    assert counts["fc1"] == pytest.approx(20 * (784 + 64), abs=1)
    assert counts["fc2"] == pytest.approx(20 * (64 + 64), abs=1)
    assert counts["fc3"] == 640  # 20 x 74 would overfill it: dense
    assert scale.sparsity_and_allocation(64, "0.99", None) == (0.99, "uniform")


def spec(tmp_path, **overrides):
    return {"width": 24, "density": "eps4", "allocation": None, "epochs": 2, "max_steps": 20, "batch_size": 128,
            "seed": 0, "checkpoint_every": None, "checkpoint": str(tmp_path / "run.npz"), "resume": None,
            "synthetic": True, "data_dir": "data", "progress": False} | overrides


def test_a_resumed_run_takes_the_same_steps_as_one_never_stopped(tmp_path, monkeypatch):
    # SET every 3 steps, so updates fall before and after the break; 16 steps an epoch, so it crosses one.
    monkeypatch.setattr(scale, "SET_DST", DSTConfig(prune_ratio=0.2, regrow="random", every=3, unit="step"))
    whole = scale.train_width(spec(tmp_path, checkpoint_every=20, checkpoint=str(tmp_path / "whole.npz")))
    first = scale.train_width(spec(tmp_path, max_steps=10, checkpoint_every=5))
    assert first["steps"] == 10 and "test_accuracy" not in first
    resumed = scale.train_width(spec(tmp_path, checkpoint_every=5, resume=str(tmp_path / "run.npz")))
    assert resumed["resumed_from"]["steps"] == 10 and resumed["steps"] == whole["steps"] == 20
    assert resumed["last_loss"] == whole["last_loss"]
    with np.load(tmp_path / "whole.npz") as a, np.load(tmp_path / "run.npz") as b:
        for key in a.files:
            if key != "meta":
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert json.loads(str(a["meta"]))["rng"] == json.loads(str(b["meta"]))["rng"]


def test_a_full_epoch_reports_accuracy_and_a_net_too_big_is_skipped_with_the_reason(tmp_path, monkeypatch):
    row = scale.train_width(spec(tmp_path, epochs=1, max_steps=None))
    assert row["finished_epochs"] == 1 and row["steps"] == 16 and 0 <= row["test_accuracy"] <= 100
    assert row["step_ms_median"] > 0 and row["peak_rss_bytes"] > row["model_bytes"] > 0
    from dst.csr import memory

    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 2**20)  # room for the warm-up's twin only
    assert "needs" in scale.train_width(spec(tmp_path, width=512, density="0.5"))["skipped"]


def test_the_entry_point_writes_json_and_figure(tmp_path):
    command = [sys.executable, "-m", "benchmarks.sparse_training", "--scale", "16,32", "--density", "eps4",
               "--max-steps", "3", "--synthetic", "--no-progress", "--results-dir", str(tmp_path)]
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    assert "width 16 eps4" in output and "width 32 eps4" in output
    rows = json.loads((tmp_path / "sparse_training_scale.json").read_text())["rows"]
    assert [row["width"] for row in rows] == [16, 32] and all(row["steps"] == 3 for row in rows)
    assert (tmp_path / "sparse_training_scale.png").stat().st_size > 0


def test_the_readme_holds_the_scale_table_of_the_committed_results():
    rows = json.loads((scale.RESULTS / "sparse_training_scale.json").read_text())["rows"]
    table = scale.readme_table(rows)
    assert table.count("\n| ") >= 3 and "costs" in table  # the widths, and the widest against the reference
    assert table in (ROOT / "README.md").read_text(), "README.md's scale table differs from " \
        "sparse_training_scale.json: paste the output of `python -m benchmarks.sparse_training_scale --readme`"


def test_the_scale_table_compares_the_widest_width_with_the_reference_per_active_weight():
    def row(width, ns):
        return {"width": width, "density": "eps20", "active_weights": {"fc1": 10**6}, "step_ms_median": 1.0,
                "train_s": 1.0, "ns_per_active_weight_sample": ns, "test_accuracy": 90.0, "peak_rss_bytes": 2**30,
                "rss_before_model_bytes": 0, "model_bytes": 0, "model_bytes_after": 0}

    table = scale.readme_table([row(2**19, 0.5), row(scale.SCALING_REFERENCE, 0.2), {"width": 64, "density": "0.99"}])
    assert table.splitlines()[2].startswith(f"| {scale.SCALING_REFERENCE} |")  # width order; other densities out
    assert "| 2 × 524288 (1.05 M neurons) |" in table
    assert table.endswith(f"width 524288 costs 2.50x what width {scale.SCALING_REFERENCE} does in this run "
                          "(the goal: within 2x).")
    assert "costs" not in scale.readme_table([row(2**19, 0.5)])  # no reference width run: no ratio


def test_the_figure_names_a_width_refused_for_memory_even_when_nothing_trained():
    refused = {"width": 262144, "density": "0.99", "skipped": "needs 44.87 GiB"}
    trained = {"width": 4096, "density": "eps20", "step_ms_median": 6.0, "peak_rss_bytes": 2**30,
               "rss_before_model_bytes": 2**29, "model_bytes_after": 2**22}
    for rows in ([refused], [trained, refused]):
        figure = scale.plot(rows)
        figure.canvas.draw()  # the layout and the log scales must work, not only the calls
        notes = [text.get_text() for text in figure.texts]
        assert notes == ["does not fit in memory, refused before allocating: width 262144 at 0.99"]
        axis_texts = [text.get_text() for axis in figure.axes for text in axis.texts]
        assert axis_texts == (["no width trained"] * 2 if rows == [refused] else [])
