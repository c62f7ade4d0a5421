"""The methods sweep: FLOPs against their formulas, rows, the summary over seeds, the figure."""

import copy
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import matplotlib
import pytest
import torch

from benchmarks.dst_methods import (
    check_args,
    combine_rows,
    hold_lock,
    new_record,
    parse_args,
    read_results,
    row_key,
    with_settings,
    write_atomically,
)
from benchmarks.row_file import append_row
from dst.core.models import SimpleNet, lenet_300_100
from dst.engine.allocation import active_count
from dst.engine.masked import MaskedNet
from dst.methods import sweep
from dst.methods.catalog import METHODS, Target, improved
from dst.methods.sweep import (
    FlopCounter,
    Recipe,
    accuracy_table,
    comparison_table,
    describe_settings,
    layer_table,
    run_sweep,
    summarize,
    train_run,
)
from dst.tutorial.sweep_figure import plot_method_sweep
from tests.conftest import synthetic_mnist

RECIPE = Recipe(epochs=2, batch_size=16, lr=0.05, max_batches_per_epoch=4)


@pytest.fixture(scope="module")
def data():
    train, test = synthetic_mnist(64, seed=0), synthetic_mnist(32, seed=1)
    return train.tensors, [test.tensors]


def test_flop_counter_matches_the_layer_formulas():
    # Multiply-adds per example: conv = weights x output pixels, linear = weights.
    simplenet = 16 * 9 * 28 * 28 + 32 * 16 * 9 * 14 * 14 + 1568 * 128 + 128 * 1000 + 1000 * 1000 + 1000 * 10
    assert FlopCounter(SimpleNet(), torch.zeros(1, 1, 28, 28)).dense == simplenet
    masked = MaskedNet(SimpleNet(), 0.9, "erk", generator=torch.Generator().manual_seed(0))
    counter = FlopCounter(masked, torch.zeros(2, 1, 28, 28))
    pixels = {"conv1": 28 * 28, "conv2": 14 * 14}
    assert counter.current() == sum(layer.active_count * pixels.get(name, 1)
                                    for name, layer in masked.masked_layers().items())
    assert counter.dense == simplenet


def test_training_flops_follow_each_methods_formula(data, monkeypatch):
    train, test = data
    evaluated = []  # each run's trained model as it is tested, for the accuracy oracle below
    evaluate = sweep.evaluate

    def keep(model, *args):
        evaluated.append(copy.deepcopy(model))
        return evaluate(model, *args)

    monkeypatch.setattr(sweep, "evaluate", keep)
    rows = {name: train_run("lenet300-100", method, Target(0.9), RECIPE, train, test)
            for name, method in [("dense", "dense"), ("static", "static"), ("snfs", "snfs"),
                                 ("rigl", replace(METHODS["rigl"], every=2))]}
    dense = 266_200  # LeNet-300-100's weights: its forward multiply-adds per example
    sparse = sum(rows["static"]["layer_active"].values())
    assert rows["dense"]["train_flops_vs_dense"] == 1.0
    assert rows["dense"]["train_flops"] == 2 * 3 * dense * 8 * 16
    assert rows["static"]["train_flops_vs_dense"] == pytest.approx(sparse / dense, rel=1e-12)
    # Sparse momentum: a dense weight gradient every step (LeNet's counts may move between layers,
    # but every layer of an MLP costs one multiply-add per weight, so the total is what matters).
    assert rows["snfs"]["train_flops_vs_dense"] == pytest.approx((2 * sparse + dense) / (3 * dense), rel=1e-12)
    # RigL as rigl: an update step is a forward and a dense backward instead of the sparse step.
    updates = rows["rigl"]["updates"]
    assert updates == 2  # steps 2 and 4 of 8; the cosine reaches 0 at step 6
    expected = ((8 - updates) * 3 * sparse + updates * (2 * sparse + dense)) / (8 * 3 * dense)
    assert rows["rigl"]["train_flops_vs_dense"] == pytest.approx(expected, rel=1e-12)
    # With the optimizer stepping on update steps too: one extra forward + dense backward per update.
    stepping = train_run("lenet300-100", replace(METHODS["rigl"], every=2, step_on_update=True), Target(0.9), RECIPE,
                         train, test)
    evaluated.pop()
    expected = (8 * 3 * sparse + updates * (2 * sparse + dense)) / (8 * 3 * dense)
    assert stepping["train_flops_vs_dense"] == pytest.approx(expected, rel=1e-12)
    images, labels = test[0]
    for row, model in zip(rows.values(), evaluated, strict=True):
        with torch.no_grad():
            right = int((model.eval()(images).argmax(1) == labels).sum())
        assert row["test_acc"] == 100.0 * right / len(labels) and row["steps"] == 8


def test_gmp_row_reaches_the_target_and_counts_its_dense_phase(data):
    train, test = data
    method = replace(METHODS["gmp"], every=1, start_fraction=0.25, end_fraction=0.75)
    row = train_run("lenet300-100", method, Target(0.95, "erk"), RECIPE, train, test)
    expected = MaskedNet(lenet_300_100(), 0.95, "erk")
    assert row["layer_active"] == {name: layer.active_count for name, layer in expected.masked_layers().items()}
    assert row["final_sparsity"] == pytest.approx(expected.global_sparsity(), rel=1e-12)
    assert row["dense_training"] and row["inference_flops_vs_dense"] == pytest.approx(0.05, rel=1e-3)
    # Oracle: 8 steps (2 epochs x 4 batches); pruning after steps start=2 < t < end=6 and at t=6, each layer to
    # active_count(numel, d_t), d_t = final + (1 - final) (1 - (t - 2) / 4)^3. Step k computes (forward, backward
    # to the inputs and to the weights) with the counts left by the last pruning before it: dense for steps 1-3.
    final = Target(0.95, "erk").densities(expected)
    sizes = {name: layer.mask.numel() for name, layer in expected.masked_layers().items()}
    dense = sum(sizes.values())

    def active_after(t):
        return sum(active_count(size, final[name] + (1 - final[name]) * (1 - (t - 2) / 4) ** 3)
                   for name, size in sizes.items())

    per_step = [dense] * 3 + [active_after(t) for t in (3, 4, 5)] + [active_after(6)] * 2
    assert active_after(6) == sum(row["layer_active"].values())
    assert row["train_flops_vs_dense"] == pytest.approx(sum(per_step) / (8 * dense), rel=1e-12)
    assert row["train_flops"] == 2 * 3 * 16 * sum(per_step)


def test_run_sweep_trains_dense_once_per_model_and_seed_and_summarize_averages_seeds(data):
    train, test = data
    seen = []
    rows = run_sweep(["lenet300-100"], ["dense", "static", "set"], [0.8, 0.99], [0, 1], RECIPE, train, test,
                     on_row=seen.append)
    assert seen == rows
    assert sorted((row["method"], row["sparsity"], row["seed"]) for row in rows) == sorted(
        [("dense", 0.0, s) for s in (0, 1)] + [(m, p, s) for m in ("static", "set") for p in (0.8, 0.99)
                                             for s in (0, 1)])
    summary = {(row["method"], row["sparsity"]): row for row in summarize(rows)}
    static = [row["test_acc"] for row in rows if (row["method"], row["sparsity"]) == ("static", 0.8)]
    assert summary[("static", 0.8)]["seeds"] == 2
    assert summary[("static", 0.8)]["test_acc"] == pytest.approx(sum(static) / 2, rel=1e-12)
    assert summary[("static", 0.8)]["test_acc_std"] == pytest.approx(abs(static[0] - static[1]) / 2 ** 0.5,
                                                                     rel=1e-9)
    table = accuracy_table(summarize(rows), "lenet300-100")
    assert table.splitlines()[0] == "| method | 80 % | 99 % | training FLOPs vs dense |"
    # methods in METHODS' order whatever order the rows come in (a merged file lists older rows first)
    assert accuracy_table(summarize(list(reversed(rows))), "lenet300-100") == table
    assert f"{summary[('static', 0.8)]['test_acc']:.2f} ± " in table
    flops = [f"{summary[('static', sparsity)]['train_flops_vs_dense']:.2f}" for sparsity in (0.99, 0.8)]
    assert table.splitlines()[3].endswith(f" | {flops[0]}–{flops[1]} |")  # the static mask's row
    one_sparsity = accuracy_table(summarize(row for row in rows if row["sparsity"] in (0.0, 0.99)), "lenet300-100")
    assert one_sparsity.splitlines()[3].endswith(f" | {flops[0]} |")

    fig = plot_method_sweep(rows, references=[{"model": "lenet300-100", "method": "set", "sparsity": 0.99,
                                               "test_acc": 95.8}])
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == 2
    accuracy_ax = fig.axes[0]
    assert accuracy_ax.get_xscale() == "log" and accuracy_ax.xaxis_inverted()
    assert accuracy_ax.get_yscale() == "log" and accuracy_ax.yaxis_inverted()  # error, small at the top
    assert {text.get_text() for text in fig.legends[0].get_texts()} >= {"static mask", "SET"}
    # A published point measured at another allocation or budget is left off: it would read as this experiment.
    def drawn(reference):
        figure = plot_method_sweep(rows, references=[reference])
        return len(figure.axes[0].lines) + len(figure.axes[0].collections)

    point = {"model": "lenet300-100", "method": "set", "sparsity": 0.99, "test_acc": 95.8}
    alone = drawn({**point, "sparsity": 0.5})  # not a measured sparsity: never drawn
    assert drawn({**point, "allocation": "erk", "epochs": RECIPE.epochs}) == drawn(point) > alone
    assert drawn({**point, "allocation": "uniform", "epochs": RECIPE.epochs}) == alone
    assert drawn({**point, "allocation": "erk", "epochs": 100}) == alone
    # The accuracy axis is labelled in accuracy: a tick at 99 % sits at an error of 1 %.
    labels = {tick.get_text(): value for tick, value in zip(accuracy_ax.get_yticklabels(), accuracy_ax.get_yticks())}
    assert all(value == pytest.approx(100 - float(text), rel=1e-9) for text, value in labels.items() if text)


def test_unknown_model_is_named(data):
    train, test = data
    with pytest.raises(ValueError, match=r"'lenet5'.*\['lenet300-100', 'simplenet'\]"):
        train_run("lenet5", "dense", Target(0.9), RECIPE, train, test)


def test_comparison_table_puts_measured_next_to_published_and_run_sweep_restores_threads(data):
    train, test = data
    threads = torch.get_num_threads()
    rows = run_sweep(["lenet300-100"], ["static"], [0.95], [0], RECIPE, train, test, threads=1)
    assert torch.get_num_threads() == threads
    published = [{"model": "lenet300-100", "method": "static", "sparsity": 0.95, "test_acc": 50.0},
                 {"model": "lenet300-100", "method": "set", "sparsity": 0.95, "test_acc": 98.14}]  # not measured
    table = comparison_table(summarize(rows), published).splitlines()
    assert len(table) == 3
    assert table[2] == (f"| lenet300-100 | static | 95 % | {rows[0]['test_acc']:.2f} | 50.00 | "
                        f"{rows[0]['test_acc'] - 50:+.2f} |")


def _results_file(tmp_path, name, recipe, methods, runs, seconds):
    """A benchmark results file as the benchmark writes it: its settings, rows for ``runs``, read back from JSON."""
    record = new_record("full", "uniform", [], {"lenet300-100": recipe}, [METHODS[name] for name in methods])
    record.update(wall_seconds=seconds, rows=[{"model": "lenet300-100", "method": method, "sparsity": sparsity,
                                               "seed": seed, "test_acc": 90.0} for method, sparsity, seed in runs])
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(record))
    return path, json.loads(path.read_text())


def test_results_of_parallel_invocations_merge_only_when_trained_alike(tmp_path):
    recipe = Recipe(epochs=3)
    first = _results_file(tmp_path, "part95", recipe, ["dense", "set"], [("dense", 0.0, 0), ("set", 0.95, 0)], 60.0)
    second = _results_file(tmp_path, "part99", recipe, ["rigl"], [("rigl", 0.99, 0), ("rigl", 0.99, 1)], 40.0)
    # This invocation asks for SET only, with the same recipe; the files' other methods come along.
    record = new_record("full", "uniform", [], {"lenet300-100": recipe}, [METHODS["set"]])
    rows = combine_rows(record, [first, second])
    assert [row_key(row) for row in rows] == [("lenet300-100", "dense", 0.0, 0), ("lenet300-100", "set", 0.95, 0),
                                              ("lenet300-100", "rigl", 0.99, 0), ("lenet300-100", "rigl", 0.99, 1)]
    assert set(record["methods"]) == {"dense", "set", "rigl"} and record["wall_seconds"] == 100.0

    def refused(record, sources, *names):
        with pytest.raises(SystemExit) as stop:
            combine_rows(record, sources)
        assert all(name in str(stop.value) for name in names), stop.value

    other_epochs = new_record("full", "uniform", [], {"lenet300-100": replace(recipe, epochs=4)}, [])
    refused(other_epochs, [first], "part95.json", "lenet300-100", "'epochs': 3", "'epochs': 4")
    refused(new_record("full", "erk", [], {}, []), [second], "part99.json", "allocation", "'uniform'", "'erk'")
    refused(new_record("full", "uniform", [], {}, [replace(METHODS["rigl"], every=25)]), [second],
            "part99.json", "rigl", "'every': 25")
    # A file written before SET had a schedule setting ran with its default; reworded summaries do not matter.
    older = json.loads(json.dumps(second[1]))
    older["methods"]["set"] = {"prune_ratio": 0.3, "updates_per_epoch": 1, "summary": "older words"}
    assert len(combine_rows(new_record("full", "uniform", [], {}, [METHODS["set"]]), [("older.json", older)])) == 2
    cosine = replace(METHODS["set"], schedule="cosine")
    refused(new_record("full", "uniform", [], {}, [cosine]), [("older.json", older)], "older.json", "'constant'")
    # A file written before the methods followed their reference code ran this project's rules: its rows are not
    # today's defaults, and merge only with runs of improved(...) methods.
    legacy = json.loads(json.dumps(second[1]))
    del legacy["rules"]
    legacy["methods"]["rigl"] = {key: value for key, value in legacy["methods"]["rigl"].items()
                                 if key not in ("rounding", "regrow_pruned", "step_on_update", "scale_init")}
    refused(new_record("full", "uniform", [], {}, [METHODS["rigl"]]), [("legacy.json", legacy)], "legacy.json",
            "'step_on_update': True", "'step_on_update': False")
    assert len(combine_rows(new_record("full", "uniform", [], {}, [improved("rigl")]), [("legacy.json", legacy)])) == 2
    twice = _results_file(tmp_path, "again", recipe, ["set"], [("set", 0.95, 0)], 1.0)
    refused(new_record("full", "uniform", [], {}, []), [first, twice], "again.json", "part95.json", "'set', 0.95, 0")


def test_method_settings_from_the_command_line_are_typed_and_checked():
    set_method, rigl = with_settings([METHODS["set"], METHODS["rigl"]],
                                     ["set.prune_ratio=0.5", "set.schedule=cosine", "rigl.every=25"])
    assert set_method == replace(METHODS["set"], prune_ratio=0.5, schedule="cosine")
    assert rigl == replace(METHODS["rigl"], every=25) and isinstance(rigl.every, int)
    for text, names in [("set.prune=0.5", ["'prune'", "prune_ratio", "schedule"]),
                        ("gmp.every=3", ["'gmp'", "['set']"]), ("set.prune_ratio=half", ["float", "'half'"]),
                        ("set=0.5", ["METHOD.FIELD=VALUE"])]:
        with pytest.raises(SystemExit) as stop:
            with_settings([METHODS["set"]], [text])
        assert all(name in str(stop.value) for name in names), stop.value


def test_layer_table_averages_counts_over_seeds_and_reports_the_worst_cut_off():
    def masked_row(method, seed, fc3, accuracy, start, end, sparsity=0.99):
        return {"model": "lenet300-100", "method": method, "sparsity": sparsity, "seed": seed, "test_acc": accuracy,
                "layer_active": {"fc1": 2352, "fc2": 300, "fc3": fc3},
                "unconnected_outputs_start": start, "unconnected_outputs_end": end}

    rows = [{"model": "lenet300-100", "method": "dense", "sparsity": 0.0, "seed": 0, "test_acc": 98.7},
            masked_row("set", 0, 10, 76.0, 5, 1), masked_row("set", 1, 10, 80.0, 4, 0),
            masked_row("snfs", 0, 976, 97.5, 5, 0), masked_row("snfs", 1, 1001, 97.4, 4, 0),
            masked_row("set", 0, 50, 98.3, 0, 0, sparsity=0.95)]
    assert layer_table(rows, "lenet300-100", 0.99).splitlines() == [
        "| method | test accuracy % | fc1 weights | fc2 weights | fc3 weights | classes cut off (start -> end) |",
        "|---|---|---|---|---|---|",
        "| set | 78.00 | 2,352 | 300 | 10 | 5 -> 1 |",
        "| snfs | 97.45 | 2,352 | 300 | 988 | 5 -> 0 |"]
    with pytest.raises(ValueError, match="no masked lenet300-100 rows at sparsity 0.9"):
        layer_table(rows, "lenet300-100", 0.9)
    summary = summarize(row | {"train_flops_vs_dense": 0.01, "dense_training": False}
                        for row in [masked_row("set", 0, 10, 76.0, 5, 1), masked_row("rigl", 0, 10, 85.0, 5, 2)])
    published = [{"model": "lenet300-100", "method": method, "sparsity": 0.99, "test_acc": 95.8}
                 for method in ("set", "rigl")]
    assert [line.split(" | ")[3] for line in comparison_table(summary, published).splitlines()[2:]] == [
        "76.00 (1 class cut off)", "85.00 (2 classes cut off)"]


def test_comparison_table_never_prints_minus_zero():
    summary = [{"model": "lenet300-100", "method": "dense", "sparsity": 0.0, "seeds": 1, "test_acc": 98.687}]
    published = [{"model": "lenet300-100", "method": "dense", "sparsity": 0.0, "test_acc": 98.69}]
    assert comparison_table(summary, published).splitlines()[2].endswith("| 98.69 | 98.69 | +0.00 |")


# ----------------------------------------------------------------------------- settings checked when built

@pytest.mark.parametrize("method, change, named", [
    ("set", {"updates_per_epoch": 0}, "set.updates_per_epoch"), ("set", {"updates_per_epoch": -1}, "updates"),
    ("set", {"schedule": "linear"}, "set.schedule"), ("set", {"prune_ratio": float("nan")}, "set.prune_ratio"),
    ("set", {"prune_ratio": -3.0}, "set.prune_ratio"), ("rigl", {"prune_ratio": float("inf")}, "rigl.prune_ratio"),
    ("rigl", {"end_fraction": -1.0}, "rigl.end_fraction"), ("rigl", {"every": 0}, "rigl.every"),
    ("snfs", {"momentum": 1.0}, "snfs.momentum"), ("snfs", {"momentum": float("nan")}, "snfs.momentum"),
    ("gmp", {"start_fraction": 1.5}, "gmp.start_fraction"), ("gmp", {"end_fraction": 3.0}, "gmp.end_fraction"),
    ("gmp", {"start_fraction": 0.8, "end_fraction": 0.5}, "start_fraction < end_fraction"),
    ("gmp", {"start_fraction": float("nan")}, "gmp.start_fraction"), ("gmp", {"every": 0}, "gmp.every")])
def test_every_method_setting_is_checked_when_the_method_is_built(method, change, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        replace(METHODS[method], **change)


@pytest.mark.parametrize("change, named", [
    ({"epochs": 0}, "epochs"), ({"epochs": -1}, "epochs"), ({"batch_size": 0}, "batch_size"),
    ({"lr": float("nan")}, "lr"), ({"lr": 0.0}, "lr"), ({"momentum": 1.5}, "momentum"),
    ({"weight_decay": -1e-4}, "weight_decay"), ({"lr_decay_at": (0.5, 1.5)}, "lr_decay_at"),
    ({"max_batches_per_epoch": 0}, "max_batches_per_epoch"), ({"lr_decay": float("inf")}, "lr_decay")])
def test_every_recipe_value_is_checked_when_the_recipe_is_built(change, named):
    with pytest.raises(ValueError, match=named):
        Recipe(**change)


def test_a_trained_net_that_misses_its_target_is_not_reported_under_that_label(data):
    # What gmp end_fraction=3 did before it was refused: pruning stopped at 0.605 under a 0.9 label.
    late = METHODS["gmp"]
    object.__setattr__(late := replace(late), "end_fraction", 3.0)
    with pytest.raises(RuntimeError, match="not the 0.9 target's"):
        train_run("lenet300-100", late, Target(0.9), RECIPE, data[0], data[1])


def cli(monkeypatch, *argv):
    monkeypatch.setattr("sys.argv", ["dst_methods", *argv])
    args = parse_args()
    check_args(args)
    return args


@pytest.mark.parametrize("argv, named", [
    (["--sparsities", "0.9", "0.9"], "--sparsities repeats [0.9]"), (["--seeds", "0", "1", "0"], "--seeds repeats"),
    (["--methods", "set", "set"], "--methods repeats"), (["--epochs", "0"], "--epochs must be at least 1"),
    (["--epochs", "-1"], "--epochs"), (["--every", "0"], "--every"), (["--max-batches", "0"], "--max-batches"),
    (["--sparsities", "1.0"], "--sparsities"), (["--seeds", "-1"], "--seeds")])
def test_the_command_line_refuses_repeated_runs_and_zero_counts(monkeypatch, argv, named):
    with pytest.raises(SystemExit) as stop:
        cli(monkeypatch, *argv)
    assert named in str(stop.value)


@pytest.mark.parametrize("text, named", [
    ("set.updates_per_epoch=0", "set.updates_per_epoch must be a positive int"),
    ("gmp.start_fraction=nan", "gmp.start_fraction"), ("snfs.momentum=1", "snfs.momentum must be below 1"),
    ("set.schedule=linear", "set.schedule must be one of"), ("set.prune_ratio=inf", "set.prune_ratio"),
    ("rigl.end_fraction=-1", "rigl.end_fraction")])
def test_set_values_are_checked_before_any_run_trains(text, named):
    with pytest.raises(SystemExit) as stop:
        with_settings([METHODS[name] for name in ("set", "rigl", "snfs", "gmp")], [text])
    assert named in str(stop.value)


def test_one_results_file_has_one_writer_at_a_time_and_is_replaced_whole(tmp_path):
    path = tmp_path / "sweep.json"
    first = hold_lock(path)
    with pytest.raises(SystemExit, match="another invocation is writing"):
        hold_lock(path)
    first.close()
    hold_lock(path).close()
    write_atomically(path, '{"rows": []}\n')
    write_atomically(path, '{"rows": [1]}\n')
    assert json.loads(path.read_text()) == {"rows": [1]}
    assert [entry.name for entry in tmp_path.iterdir()] == ["sweep.json"]  # no temporary file left


def test_merged_rows_must_match_their_own_files_settings_and_malformed_files_are_named(tmp_path):
    recipe = Recipe(epochs=3)
    path, source = _results_file(tmp_path, "part", recipe, ["set"], [("set", 0.95, 0)], 1.0)
    record = new_record("full", "uniform", [], {"lenet300-100": recipe}, [METHODS["set"]])
    assert len(combine_rows(json.loads(json.dumps(record)), [(path, source)])) == 1

    def refused(source, *names):
        with pytest.raises(SystemExit) as stop:
            combine_rows(json.loads(json.dumps(record)), [(path, source)])
        assert all(name in str(stop.value) for name in names), stop.value

    for field, value in (("recipe", {**source["recipes"]["lenet300-100"], "epochs": 100}),
                         ("allocation", "erk"), ("keep_dense", ["last"])):
        row = {**source["rows"][0], field: value}
        refused({**source, "rows": [row]}, "part.json", "row 0", field)
    for missing in ("methods", "recipes", "rows"):
        refused({key: value for key, value in source.items() if key != missing}, "part.json", repr(missing))
    refused([1, 2], "part.json", "JSON list")
    refused({**source, "rows": [[1]]}, "row 0 is not an object")
    refused({**source, "rows": [{**source["rows"][0], "seed": "0"}]}, "'seed'")
    refused({**source, "methods": {"set": 3}}, "'methods'")
    refused({**source, "wall_seconds": "1 minute"}, "'wall_seconds'")
    refused({**source, "rows": [{**source["rows"][0], "method": "rigl"}]}, "no recipe or method settings")
    for text in ("{not json", "[" * 100_000, "1" * 5000, '\udcff'):
        bad = tmp_path / "bad.json"
        bad.write_bytes(text.encode("utf-8", "surrogateescape"))
        with pytest.raises(SystemExit, match="bad.json: not a readable results file"):
            read_results(bad)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(SystemExit, match="not a regular file"):
        read_results(fifo)


def test_method_sweep_figure_draws_each_methods_mean_error_spread_and_flops():
    def row(method, sparsity, seed, accuracy, flops):
        return {"model": "lenet300-100", "method": method, "sparsity": sparsity, "seed": seed, "test_acc": accuracy,
                "train_flops_vs_dense": flops, "dense_training": method == "gmp"}

    rows = [row("dense", 0.0, 0, 98.2, 1.0), row("dense", 0.0, 1, 98.4, 1.0),
            row("set", 0.99, 0, 96.0, 0.011), row("set", 0.9, 0, 97.5, 0.101), row("set", 0.9, 1, 97.9, 0.103),
            row("set", 0.99, 1, 96.6, 0.013), row("gmp", 0.9, 0, 98.0, 0.4), row("gmp", 0.99, 0, 97.0, 0.3)]
    fig = plot_method_sweep(rows)
    lines = [(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for ax in fig.axes for line in ax.lines]

    def drawn(x, y):
        return [label for label, xdata, ydata in lines if xdata == pytest.approx(x, rel=1e-12)
                and ydata == pytest.approx(y, rel=1e-12)]

    densities = [0.1, 0.01]  # the x axis is the density, 1 - sparsity, in order of sparsity
    bars = {container.get_label(): container for container in fig.axes[0].containers}
    for label, errors, spreads in [("SET", [100 - 97.7, 100 - 96.3], [0.4, 0.6]), ("GMP (dense memory)",
                                                                                 [100 - 98.0, 100 - 97.0], [0, 0])]:
        # Accuracy axis: the error 100 - mean accuracy over the seeds, with one standard deviation as error bars.
        data_line, _, (bar_segments,) = bars[label].lines
        assert list(data_line.get_xdata()) == pytest.approx(densities, rel=1e-12), label
        assert list(data_line.get_ydata()) == pytest.approx(errors, rel=1e-12), label
        assert [abs(segment[1][1] - segment[0][1]) / 2 for segment in bar_segments.get_segments()] == pytest.approx(
            [spread / 2 ** 0.5 for spread in spreads], rel=1e-9), label
    # FLOPs axis: the mean over seeds, as a fraction of dense.
    assert "SET" in drawn(densities, [0.102, 0.012])
    assert "GMP (dense memory)" in drawn(densities, [0.4, 0.3])
    # Dense: a line at its mean error (98.3 %), with the seeds' spread (one standard deviation) as a band.
    assert [label for label, _, y in lines if y == pytest.approx([100 - 98.3] * 2, rel=1e-12)] == [
        "dense (band: ±1 std over seeds)"]
    spread = abs(98.2 - 98.4) / 2 ** 0.5
    [band] = fig.axes[0].patches
    # A Rectangle (matplotlib >= 3.9) or a Polygon (before), spanning the axes' width.
    low, high = ((band.get_y(), band.get_y() + band.get_height()) if hasattr(band, "get_height")
                 else sorted({y for _, y in band.get_xy()}))
    assert (low, high) == pytest.approx(((1.7 - spread) * 0.99, (1.7 + spread) * 1.01), rel=1e-9)


def test_describe_settings_names_what_differs_from_the_reference_defaults():
    record = new_record("medium", "erk", [], {}, [METHODS["static"], replace(METHODS["rigl"], scale_init=True),
                                                  replace(METHODS["set"], scale_init=True)])
    assert describe_settings(record) == ("Every method as its reference code (dst.METHODS' defaults) except rigl, set "
                                         "with scale_init=true.")
    assert describe_settings(new_record("medium", "erk", [], {}, [METHODS["set"]])) == (
        "Every method as its reference code (dst.METHODS' defaults).")
    legacy = {key: value for key, value in record.items() if key != "rules"}
    assert "before they followed their reference code" in describe_settings(legacy)


def test_append_row_keeps_every_row_of_processes_appending_at_once(tmp_path):
    path = tmp_path / "rows.json"
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda index: append_row(path, {"seed": index}), range(20)))
    assert sorted(row["seed"] for row in json.loads(path.read_text())["rows"]) == list(range(20))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]  # no lock or temporary file beside it
