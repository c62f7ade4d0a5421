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


@pytest.mark.notebook
def test_notebook_runs_in_quick_mode_and_writes_plots_and_results(tmp_path):
    sparsity = 0.9
    parameters = {"GLOBAL_SPARSITY": sparsity, "num_epochs": 2, "dst_frequency": 1, "max_batches_per_epoch": 5,
                  "sparse_mlp_hidden": 256, "sparse_mlp_batches": 5, "results_dir": str(tmp_path / "results"),
                  "plots_dir": str(tmp_path / "plots")}
    papermill.execute_notebook(str(NOTEBOOK), str(tmp_path / "executed.ipynb"), parameters=parameters,
                               cwd=str(ROOT), kernel_name="python3", progress_bar=False)

    run_plots = tmp_path / "plots" / "s90_erk_random"
    for name in ("mask_evolution.png", "mask_2d_evolution.png", "dense_vs_masked.png", "benchmark.png"):
        assert (run_plots / name).stat().st_size > 10_000, name
    assert (tmp_path / "plots" / "runs_comparison.png").exists()

    record = json.loads((tmp_path / "results" / "s90_erk_random.json").read_text())
    assert record["config"]["GLOBAL_SPARSITY"] == sparsity
    assert record["final"]["masked_sparsity"] == pytest.approx(sparsity, abs=1e-3)
    layers = record["final"]["layers"]
    total = sum(layer["total"] for layer in layers.values())
    assert sum(layer["zeros"] for layer in layers.values()) / total == pytest.approx(sparsity, abs=1e-3)
    assert len(record["masked"]) == len(record["dense"]) == 2
    assert record["dst_events"] and record["dst_events"][0]["epoch"] == 1
    assert {"Dense+Mask (CPU)", "Truly Sparse CSR (CPU)"} <= set(record["benchmark"])
    assert record["memory"]["sparse_bytes"] < record["memory"]["dense_bytes"]

    executed = json.loads((tmp_path / "executed.ipynb").read_text())
    text = "".join("".join(output.get("text", "")) for cell in executed["cells"] if cell["cell_type"] == "code"
                   for output in cell.get("outputs", []))
    assert "MNIST:" in text and "same prediction for 100.0%" in text
