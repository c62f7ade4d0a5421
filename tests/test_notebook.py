"""Executes dst_tutorial.ipynb in quick mode on real MNIST and reads what a user would see.

One kernel runs the notebook twice, as an attendee would: Restart and Run All (a fresh kernel), then a
rerun from the parameters cell at another sparsity and budget without restarting. Every cell that shows a
figure must show each of its figures as an image, both times; no figure may be left open.
"""

import ast
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dst
from dst.core.models import SimpleNet
from dst.engine.masked import MaskedNet
from dst.tutorial import report

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
papermill_parameterize = pytest.importorskip("papermill.parameterize")
papermill_iorw = pytest.importorskip("papermill.iorw")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "dst_tutorial.ipynb"
SEED_NAMES = {"SimpleNet", "MaskedNet", "train_epoch", "evaluate", "apply_dst_step", "benchmark_inference",
              "plot_mask_evolution_per_epoch", "plot_mask_2d_evolution", "plot_dense_vs_masked_comparison",
              "CUPY_GPU_AVAILABLE"}


def notebook() -> dict:
    return json.loads(NOTEBOOK.read_text())


def code_cells(nb: dict) -> list[dict]:
    return [cell for cell in nb["cells"] if cell["cell_type"] == "code"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def test_committed_notebook_has_no_outputs_and_a_parameters_cell():
    cells = code_cells(notebook())
    assert all(not cell["outputs"] and cell["execution_count"] is None for cell in cells)
    assert sum("parameters" in cell["metadata"].get("tags", []) for cell in cells) == 1


def test_the_notebook_reaches_the_package_through_one_door_and_imports_nothing_unused():
    cells = code_cells(notebook())
    code = "\n".join(source(cell) for cell in cells)
    (import_cell,) = [cell for cell in cells if "from utils import" in source(cell)]
    tree = ast.parse(source(import_cell))
    from_utils = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "utils"
                  for alias in node.names}
    assert from_utils == SEED_NAMES  # the seed's import list, as the seed wrote it
    imported = {(alias.asname or alias.name).split(".")[0] for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    others = "\n".join(source(cell) for cell in cells if cell is not import_cell)
    unused = [name for name in imported - SEED_NAMES if not re.search(rf"\b{re.escape(name)}\b", others)]
    assert not unused, f"imported but never used: {unused}"
    # everything else through `dst.`: each name exists in dst.API (dst.report's in report.__all__)
    used = set(re.findall(r"\bdst\.(\w+)", code))
    assert used - {"report"} <= set(dst.API), sorted(used - set(dst.API))
    assert set(re.findall(r"\bdst\.report\.(\w+)", code)) <= set(report.__all__)
    assert not re.search(r"^\s*(from dst[\w.]* import|import dst\.)", code, re.MULTILINE)


def test_markdown_points_only_at_things_that_exist_and_states_no_timing_a_run_could_contradict():
    readme_headings = {line.lstrip("#").strip() for line in (ROOT / "README.md").read_text().splitlines()
                       if line.startswith("#")}
    for cell in notebook()["cells"]:
        text = source(cell)
        for section in re.findall(r"README's \"([^\"]+)\"", text):
            assert " ".join(section.split()) in readme_headings, f"the README has no section {section!r}"
        for path in re.findall(r"`((?:dst|tests|benchmarks)/[\w/]+\.(?:py|json|png))`", text):
            assert (ROOT / path).exists(), path
        if cell["cell_type"] == "markdown":
            # Measured times belong in printed output; the exercises' planned budgets are the one exception.
            stripped = re.sub(r"\(time budget: \d+ minutes; compute: under a minute\)", "", text)
            assert not re.search(r"\b\d+(\.\d+)? ?(ms|s|min|minutes|seconds)\b", stripped), stripped[:200]


def test_each_exercise_has_a_todo_and_a_collapsed_solution_that_runs_when_the_todo_is_left():
    cells = notebook()["cells"]
    exercises = [index for index, cell in enumerate(cells) if cell["cell_type"] == "markdown"
                 and source(cell).startswith("### ✏️ Exercise")]
    assert len(exercises) == 3
    for index in exercises:
        todo, solution = cells[index + 1], cells[index + 2]
        assert "# TODO" in source(todo)
        assert "solution" in solution["metadata"]["tags"] and solution["metadata"]["jupyter"]["source_hidden"]


def parameterized(**overrides) -> nbformat.NotebookNode:
    """The notebook with papermill's injected-parameters cell, in quick mode."""
    nb = papermill_iorw.load_notebook_node(str(NOTEBOOK))  # as papermill reads it (every cell gets its tags)
    return papermill_parameterize.parameterize_notebook(nb, overrides)


def quick_parameters(tmp_path, **overrides) -> dict:
    return {"GLOBAL_SPARSITY": 0.9, "num_epochs": 2, "dst_frequency": 1, "max_batches_per_epoch": 5,
            "sparse_mlp_hidden": 256, "sparse_mlp_batches": 5, "results_dir": str(tmp_path / "results"),
            "plots_dir": str(tmp_path / "plots"), "decade_steps": 30, "pixel_steps": 60,
            "crossover_sparsities": [0.9, 0.99], "pattern_runs": 3, **overrides}


def outputs_text(cells) -> str:
    return "".join("".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/markdown", ""))
                   + "".join(output.get("data", {}).get("text/plain", ""))
                   for cell in cells if cell["cell_type"] == "code" for output in cell.get("outputs", []))


def images(cell) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


def assert_every_figure_is_shown(cells, when: str):
    figure_cells = [cell for cell in cells if cell["cell_type"] == "code" and "dst.show(" in source(cell)]
    # Step 5, pixels, decade (committed and small), Step 6, benchmarks, the two hardware-aware figures, runs
    assert len(figure_cells) == 9, when
    for cell in figure_cells:
        # the committed sweeps' cell draws one figure per file (LeNet-300-100's, SimpleNet's) from one dst.show
        expected = 2 if cell["id"] == "ea40a1d9" else source(cell).count("dst.show(")
        assert images(cell) == expected, f"{when}: cell {cell['id']} shows {images(cell)}"
    for cell in cells:
        errors = [output for output in cell.get("outputs", []) if output.get("output_type") == "error"]
        assert not errors, f"{when}: cell {cell.get('id')} raised {errors[0]['ename']}: {errors[0]['evalue']}"
        stderr = "".join("".join(output.get("text", "")) for output in cell.get("outputs", [])
                         if output.get("name") == "stderr")
        assert "More than 20 figures" not in stderr and "\r" not in stderr, f"{when}: {stderr[:300]}"


@pytest.mark.notebook
def test_notebook_shows_every_figure_in_a_fresh_kernel_and_on_a_rerun_and_writes_its_results(tmp_path):
    parameters = quick_parameters(tmp_path)
    nb = parameterized(**parameters)
    client = nbclient.NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}},
                                     timeout=600)
    injected = next(index for index, cell in enumerate(nb.cells)
                    if "injected-parameters" in cell.metadata.get("tags", []))
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):  # Restart Kernel and Run All
            client.execute_cell(cell, index)
        first = copy.deepcopy(nb.cells)
        # then, without restarting, a rerun from the parameters cell at 99 % with another budget and the
        # settings the parameters cell suggests there (RigL's step-based schedule, the first conv dense)
        nb.cells[injected].source += ("\nGLOBAL_SPARSITY = 0.99\nmax_batches_per_epoch = 3\nregrow = 'gradient'\n"
                                      "prune_ratio = 0.3\ndst_unit = 'step'\ndst_frequency = 1\n"
                                      "dst_schedule = 'cosine'\nkeep_dense = ('first',)\n")
        for index in range(injected, len(nb.cells)):
            client.execute_cell(nb.cells[index], index)
        probe = nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\nprint('open figures:', plt.get_fignums())")
        nb.cells.append(probe)
        client.execute_cell(probe, len(nb.cells) - 1)
    second = nb.cells[:-1]

    assert_every_figure_is_shown(first, "fresh kernel")
    assert_every_figure_is_shown(second, "rerun in the same kernel")
    assert "open figures: []" in "".join(output.get("text", "") for output in probe.outputs)

    text = outputs_text(first)
    records = {path.stem: json.loads(path.read_text()) for path in (tmp_path / "results").glob("*.json")}
    assert len(records) == 2
    record = next(record for record in records.values() if record["config"]["GLOBAL_SPARSITY"] == 0.9)
    assert record["label"].startswith("s90_erk_random_e2_b5_")
    run_plots = tmp_path / "plots" / record["label"]
    for name in ("mask_evolution.png", "mask_2d_evolution.png", "dense_vs_masked.png", "benchmark.png",
                 "input_connections.png", "decade_small.png", "runs_comparison.png"):
        assert (run_plots / name).stat().st_size > 10_000, name
    assert not list((tmp_path / "plots").glob("*.png"))  # nothing outside a run's own folder
    assert (tmp_path / "results" / f"{record['label']}.json").stat().st_mode & 0o044  # readable by others

    sparsity = parameters["GLOBAL_SPARSITY"]
    assert record["train_batches_per_epoch"] == 5
    assert record["final"]["masked_sparsity"] == pytest.approx(sparsity, abs=1e-3)
    layers = record["final"]["layers"]
    total = sum(layer["total"] for layer in layers.values())
    assert sum(layer["zeros"] for layer in layers.values()) / total == pytest.approx(sparsity, abs=1e-3)
    assert len(record["masked"]) == len(record["dense"]) == 2
    assert {"Dense+Mask (CPU)", "Truly Sparse CSR (CPU)"} <= set(record["benchmark"])
    assert record["memory"]["sparse_bytes"] < record["memory"]["dense_bytes"]

    # The masks are recorded before training (epoch 0) and after each epoch and its DST step: the one DST
    # step, after epoch 1, shows between snapshots 0 and 1, and the figures and the log name epoch 1.
    (event,) = record["dst_events"]
    assert event["epoch"] == 1 and record["mask_snapshot_epochs"] == [0, 1, 2]
    first_change, second_change = record["mask_changes"]
    assert sum(event["moved"].values()) > 0
    for name, moved in event["moved"].items():
        assert first_change[name]["pruned"] == first_change[name]["regrown"] == moved
        assert second_change[name]["pruned"] == second_change[name]["regrown"] == 0
    moved = sum(event["moved"].values())
    assert f"DST after epoch 1: moved {moved:,} connections" in text
    assert f"by the epoch whose DST step moved them (as drawn): epoch 1: {moved:,}" in text

    assert "MNIST:" in text and "same prediction for 100.0%" in text
    assert "training runs: 19/19, done in" in text  # "A decade in one figure": 6 sparse methods x 3 + dense
    assert "against Dettmers & Zettlemoyer 2019" in text and "| lenet300-100 | snfs | 99 % |" in text
    assert "| method | test accuracy % | fc1 weights | fc2 weights | fc3 weights |" in text
    assert "against the static mask" in text  # the committed sweep, in sentences computed from its rows
    # every benchmark row has its sentence, and the mask's bytes are shown next to the plain dense model's
    for row in record["benchmark"]:
        assert re.search(rf"• .*{re.escape(row)}", text), row
    assert "the plain dense model's" in text
    # the exercises ran their solutions, and their results are there to read
    assert text.count("Using the solution") == 2
    assert "| rigl+noisy_gradient |" in text
    assert "**uniform** allocation at 99 %" in text and "**erk** allocation at 99 %" in text
    assert "Truly Sparse CSR (CPU), batch 100: faster than dense+mask" in text
    assert "centre" in text and "connections per pixel" in text
    # the hardware-aware section: every pattern timed at both batch sizes, each against dense and unstructured CSR,
    # the committed accuracy as a table and sentences, and the trade-off's points
    for pattern, kind in (("fan_in", "fan_in"), ("2:4", "fan_in"), ("block4x4", "bsr")):
        for batch in (1, 100):
            assert re.search(rf"• batch {batch}, [0-9.]+ % sparse: {re.escape(pattern)} \(as {kind}\) runs .* dense "
                             r"and .* unstructured CSR at the same density", text), (pattern, batch)
    assert "| model | family | sparsity | unstructured (%) |" in text
    assert "lenet300-100, rigl: against unstructured at the same density the patterns changed" in text
    assert re.search(r"• fan_in \(90 %\): [0-9.]+x dense speed at batch 1, -0.14 points against unstructured RigL",
                     text)

    rerun = outputs_text(second)
    assert "| 2 x 5 |" in rerun and "| 2 x 3 |" in rerun  # both runs in the table, each with its budget
    # 6 steps, the cosine at 0 from step 4 (75 % of training): updates after steps 1 to 3, all in epoch 1
    rigl = next(record for record in records.values() if record["config"]["GLOBAL_SPARSITY"] == 0.99)
    assert rigl["config"]["dst_unit"] == "step" and rigl["config"]["keep_dense"] == ["first"]
    assert rigl["final"]["layers"]["conv1"]["zeros"] == 0
    assert rigl["final"]["masked_sparsity"] == pytest.approx(0.99, abs=1e-3)
    assert "3 DST steps will run, after optimizer steps 1 to 3 (3 steps per epoch)" in rerun
    assert "DST in epoch 1 (3 updates): moved" in rerun and "DST in epoch 2" not in rerun


def test_the_first_cell_says_what_to_install_when_the_notebook_is_opened_on_its_own(tmp_path):
    (cell,) = [cell for cell in code_cells(notebook()) if cell["id"] == "first-run"]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    alone = subprocess.run([sys.executable, "-c", source(cell)], cwd=tmp_path, capture_output=True, text=True,
                           env=env, timeout=60)
    assert alone.returncode != 0
    assert "ModuleNotFoundError: This notebook needs its package" in alone.stderr
    assert "git clone" in alone.stderr and "REPOSITORY_URL" in alone.stderr
    here = subprocess.run([sys.executable, "-c", source(cell)], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=60)
    assert here.returncode == 0 and "package (dst/ and utils.py) is importable" in here.stdout


def test_the_99_percent_advice_states_what_the_committed_runs_measured():
    """Step 4 and the parameters cell quote benchmarks/results/notebook_sparsity.json: the numbers must be its."""
    rows = json.loads((ROOT / "benchmarks" / "results" / "notebook_sparsity.json").read_text())["rows"]
    dense = {row["seed"]: row["test_acc"] for row in rows if row["variant"] == "dense"}

    def gap(variant, sparsity, seeds=None):
        gaps = [row["test_acc"] - dense[row["seed"]] for row in rows if row["variant"] == variant
                and row["sparsity"] == sparsity and (seeds is None or row["seed"] in seeds)]
        assert seeds is not None or len(gaps) == 3, (variant, sparsity)
        return sum(gaps) / len(gaps)

    cells = {cell["id"]: source(cell) for cell in notebook()["cells"]}
    step4, parameters = cells["70c6cf46"], cells["b2551264"]
    seed99, best99 = -gap("seed", 0.99), -gap("rigl_first_dense", 0.99)
    assert f"about {seed99:.1f} points below dense at 99 %" in step4
    assert f"the gap to about {best99:.1f} points" in step4
    assert f"end about {seed99:.1f} points below dense" in parameters and f"about {best99:.1f} in these" in parameters
    assert abs(gap("seed", 0.95)) < 0.15 and abs(gap("rigl_first_dense", 0.95)) < 0.15  # "within 0.1 ... at 95 %"
    one_seed = {variant: gap(variant, 0.99, {42}) for variant in ("seed", "first_dense", "rigl_steps",
                                                                  "rigl_first_dense")}
    assert ("seed 42: the seed's settings {seed:.2f} points, the first conv\ndense {first_dense:.2f}, RigL's schedule "
            "{rigl_steps:.2f}, both {rigl_first_dense:.2f}").format(**one_seed) in step4
    erk = MaskedNet(SimpleNet(), 0.99, "erk").masked_layers()["conv1"]
    assert f"ERK at 99 % leaves it {erk.active_count} of them" in step4 and erk.mask.numel() == 144
