"""Executes dst_tutorial.ipynb in quick mode on real MNIST, as a user's `make tutorial` would."""

import json
from pathlib import Path

import pytest

papermill = pytest.importorskip("papermill")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "dst_tutorial.ipynb"


def test_committed_notebook_has_no_outputs_and_a_parameters_cell():
    notebook = json.loads(NOTEBOOK.read_text())
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert all(not cell["outputs"] and cell["execution_count"] is None for cell in code_cells)
    assert sum("parameters" in cell["metadata"].get("tags", []) for cell in code_cells) == 1


def execute(tmp_path, **overrides) -> tuple[dict, str]:
    """Run the notebook in quick mode into ``tmp_path``; returns its parameters and the printed text."""
    parameters = {"GLOBAL_SPARSITY": 0.9, "num_epochs": 2, "dst_frequency": 1, "max_batches_per_epoch": 5,
                  "sparse_mlp_hidden": 256, "sparse_mlp_batches": 5, "results_dir": str(tmp_path / "results"),
                  "plots_dir": str(tmp_path / "plots"), "decade_steps": 30, **overrides}
    executed = tmp_path / f"executed_{len(list(tmp_path.glob('executed_*')))}.ipynb"
    papermill.execute_notebook(str(NOTEBOOK), str(executed), parameters=parameters,
                               cwd=str(ROOT), kernel_name="python3", progress_bar=False)
    notebook = json.loads(executed.read_text())
    text = "".join("".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/markdown", ""))
                   for cell in notebook["cells"] if cell["cell_type"] == "code" for output in cell.get("outputs", []))
    return parameters, text


@pytest.mark.notebook
def test_notebook_runs_in_quick_mode_and_writes_plots_and_results(tmp_path):
    parameters, text = execute(tmp_path)
    sparsity = parameters["GLOBAL_SPARSITY"]
    (results,) = (tmp_path / "results").glob("*.json")
    record = json.loads(results.read_text())
    assert record["label"].startswith("s90_erk_random_e2_b5_") and results.name == f"{record['label']}.json"
    run_plots = tmp_path / "plots" / record["label"]
    for name in ("mask_evolution.png", "mask_2d_evolution.png", "dense_vs_masked.png", "benchmark.png"):
        assert (run_plots / name).stat().st_size > 10_000, name
    assert (tmp_path / "plots" / "runs_comparison.png").exists()

    assert record["config"]["GLOBAL_SPARSITY"] == sparsity
    assert record["train_batches_per_epoch"] == 5
    assert record["final"]["masked_sparsity"] == pytest.approx(sparsity, abs=1e-3)
    layers = record["final"]["layers"]
    total = sum(layer["total"] for layer in layers.values())
    assert sum(layer["zeros"] for layer in layers.values()) / total == pytest.approx(sparsity, abs=1e-3)
    assert len(record["masked"]) == len(record["dense"]) == 2
    assert {"Dense+Mask (CPU)", "Truly Sparse CSR (CPU)"} <= set(record["benchmark"])
    assert record["memory"]["sparse_bytes"] < record["memory"]["dense_bytes"]

    # The mask figures draw record["mask_changes"]: one DST step after epoch 1, so the masks of
    # epochs 1 and 2 differ in exactly the connections that step reports moving.
    (event,) = record["dst_events"]
    assert event["epoch"] == 1
    (change,) = record["mask_changes"]
    assert sum(event["moved"].values()) > 0
    for name, moved in event["moved"].items():
        assert change[name]["pruned"] == change[name]["regrown"] == moved

    assert "MNIST:" in text and "same prediction for 100.0%" in text
    assert "16 runs of 30 steps in" in text  # "A decade in one figure": 5 sparse methods x 3 sparsities + dense
    # The committed full-recipe sweep: next to the published numbers, and where each method's weights went.
    assert "against Dettmers & Zettlemoyer 2019" in text and "| lenet300-100 | snfs | 99 % |" in text
    assert "| method | test accuracy % | fc1 weights | fc2 weights | fc3 weights |" in text
    assert "DST steps will run after epoch(s) 1" in text
    assert f"Connections moved between consecutive epochs (as drawn): {sum(event['moved'].values()):,}" in text

    # A second quick run with another budget keeps the first one's files; the table tells them apart.
    _, text = execute(tmp_path, num_epochs=2, dst_frequency=2, max_batches_per_epoch=3)
    labels = sorted(path.stem for path in (tmp_path / "results").glob("*.json"))
    assert len(labels) == 2 and record["label"] in labels
    assert "NO DST step will run" in text  # 2 epochs, DST every 2: the step after the last epoch is skipped
    assert "| 2 x 5 |" in text and "| 2 x 3 |" in text
