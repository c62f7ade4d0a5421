"""Run records: labels unique to their settings, safe atomic files, a table that survives stray files."""

import json

import pytest

from dst.tutorial import plots
from dst.tutorial.results import (
    SAME_SPEED_TOLERANCE,
    check_label,
    format_table,
    load_runs,
    run_label,
    run_path,
    runs_table,
    save_run,
    speed_phrase,
    speed_sentence,
)

CONFIG = {"GLOBAL_SPARSITY": 0.95, "batch_size": 64, "num_epochs": 10, "learning_rate": 0.001,
          "dst_frequency": 2, "prune_ratio": 0.1, "regrow": "random", "allocation": "erk", "seed": 42,
          "max_batches_per_epoch": None, "benchmark_samples": 100, "device": "cpu"}


def record(label, sparsity=0.95, epochs=2, batches=5):
    config = {**CONFIG, "GLOBAL_SPARSITY": sparsity, "num_epochs": epochs}
    epoch = {"train_loss": 0.1, "train_acc": 97.0, "test_loss": 0.1, "test_acc": 97.0, "train_seconds": 1.0}
    return {"label": label, "config": config, "train_batches_per_epoch": batches,
            "dense": [epoch] * epochs, "masked": [epoch] * epochs, "train_seconds": 60.0,
            "final": {"dense_test_acc": 98.0, "masked_test_acc": 97.5}}


def test_label_reads_the_common_settings_and_is_stable():
    label = run_label(CONFIG)
    assert label.startswith("s95_erk_random_e10_") and len(label) == len("s95_erk_random_e10_") + 6
    assert run_label(dict(reversed(list(CONFIG.items())))) == label  # key order does not matter
    assert run_label({**CONFIG, "max_batches_per_epoch": 20}).startswith("s95_erk_random_e10_b20_")


@pytest.mark.parametrize("change", [{"num_epochs": 2}, {"max_batches_per_epoch": 20}, {"learning_rate": 0.01},
                                    {"batch_size": 128}, {"dst_frequency": 1}, {"prune_ratio": 0.3},
                                    {"seed": 0}, {"GLOBAL_SPARSITY": 0.9500001}, {"device": "cuda"}])
def test_every_setting_that_changes_the_numbers_changes_the_label(change):
    assert run_label({**CONFIG, **change}) != run_label(CONFIG)


def test_near_sparsities_neither_collide_nor_round_up_to_100():
    assert run_label({**CONFIG, "GLOBAL_SPARSITY": 0.8000001}).startswith("s80.00001_")
    assert run_label({**CONFIG, "GLOBAL_SPARSITY": 0.9999999}).startswith("s99.99999_")
    assert run_label({**CONFIG, "GLOBAL_SPARSITY": 0.8}).startswith("s80_")


def test_label_needs_its_readable_keys():
    with pytest.raises(ValueError, match="num_epochs"):
        run_label({key: value for key, value in CONFIG.items() if key != "num_epochs"})
    with pytest.raises(TypeError, match="config dict"):
        run_label(0.95)


@pytest.mark.parametrize("label", ["../escaped", "/tmp/abs", "a/b", "", ".hidden", "a..b", "x" * 201, 7, "a b"])
def test_non_plain_labels_are_refused(label, tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        check_label(label)
    with pytest.raises(ValueError, match="plain file name"):
        save_run({"label": label}, tmp_path / "results")
    assert not (tmp_path / "escaped.json").exists()


def test_save_is_atomic_and_an_identical_rerun_replaces_its_own_file(tmp_path):
    path = save_run(record("run_a"), tmp_path)
    assert path == run_path("run_a", tmp_path) and json.loads(path.read_text())["label"] == "run_a"
    changed = record("run_a")
    changed["final"]["masked_test_acc"] = 91.0
    save_run(changed, tmp_path)
    assert json.loads(path.read_text())["final"]["masked_test_acc"] == 91.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_a.json"]  # no temporary file left behind


def test_two_budgets_give_two_rows_that_show_their_budget(tmp_path):
    for epochs, batches in ((10, 938), (2, 5)):
        config = {**CONFIG, "num_epochs": epochs, "max_batches_per_epoch": None if batches == 938 else batches}
        save_run({**record(run_label(config), epochs=epochs, batches=batches), "config": config}, tmp_path)
    table = format_table(runs_table(load_runs(tmp_path)))
    assert "| 10 x 938 |" in table and "| 2 x 5 |" in table


def test_load_runs_skips_unreadable_and_foreign_files_naming_them(tmp_path):
    save_run(record("good"), tmp_path)
    (tmp_path / "truncated.json").write_text('{"label": "trunc')
    (tmp_path / "foreign.json").write_text(json.dumps({"name": "something else"}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    with pytest.warns(UserWarning) as caught:
        runs = load_runs(tmp_path)
    assert [run["label"] for run in runs] == ["good"]
    messages = " ".join(str(warning.message) for warning in caught)
    for name in ("truncated.json", "foreign.json", "list.json", "binary.json"):
        assert name in messages


@pytest.mark.parametrize("ratio", [1.0, 1.05, 1.09, 1 / 1.09, 1.11, 1 / 1.11, 1.15, 2.5, 0.4, 13.12])
def test_sentences_and_figure_labels_word_a_comparison_the_same_way(ratio):
    baseline_ms, candidate_ms = 10.0 * ratio, 10.0
    phrase = speed_phrase(candidate_ms, baseline_ms)
    sentence = speed_sentence("sparse", candidate_ms, "dense", baseline_ms)
    timings = {"Dense+Mask (CPU)": {"median": baseline_ms, "std": 0.0}, "Sparse (CPU)": {"median": candidate_ms}}
    label = plots._bar_annotation(timings, "Sparse (CPU)")
    assert label.endswith(phrase)
    assert phrase in sentence
    if 1 / (1 + SAME_SPEED_TOLERANCE) < ratio < 1 + SAME_SPEED_TOLERANCE:
        assert phrase == "about the same speed"
    else:
        assert phrase.endswith("faster" if ratio > 1 else "slower")


def test_speed_phrase_refuses_non_positive_times():
    with pytest.raises(ValueError, match="positive"):
        speed_phrase(0.0, 1.0)


CRAFTED_RECORDS = {
    "count_as_bool": lambda good: {**good, "train_batches_per_epoch": True},
    "accuracy_as_text": lambda good: {**good, "final": {"dense_test_acc": "98", "masked_test_acc": 97.5}},
    "accuracy_null": lambda good: {**good, "final": {"dense_test_acc": 98.0, "masked_test_acc": None}},
    "epochs_as_dict": lambda good: {**good, "masked": {"0": 1}},
    "benchmark_as_list": lambda good: {**good, "benchmark": [1, 2]},
    "median_as_text": lambda good: {**good, "benchmark": {"masked": {"median": "fast"}}},
    "memory_as_number": lambda good: {**good, "memory": 3},
    "sparsity_as_bool": lambda good: {**good, "config": {**good["config"], "GLOBAL_SPARSITY": True}},
    "label_as_number": lambda good: {**good, "label": 7},
    "infinite_seconds": lambda good: {**good, "train_seconds": float("inf")},
}


def test_crafted_records_are_skipped_at_load_and_never_reach_the_table(tmp_path):
    good = record("good")
    save_run(good, tmp_path)
    for name, craft in CRAFTED_RECORDS.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(craft(good)))
    (tmp_path / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    (tmp_path / "long_number.json").write_text(json.dumps({**good, "train_seconds": 0}).replace(
        '"train_seconds": 0', '"train_seconds": ' + "9" * 5000))
    with pytest.warns(UserWarning) as caught:
        runs = load_runs(tmp_path)
    assert [run["label"] for run in runs] == ["good"]
    format_table(runs_table(runs))
    messages = {str(warning.message).split(":")[0].rsplit("/", 1)[-1] for warning in caught}
    assert messages == {f"{name}.json" for name in [*CRAFTED_RECORDS, "deep", "long_number"]}


def test_a_fifo_named_like_a_record_is_skipped_instead_of_blocking(tmp_path):
    import os
    import threading
    import warnings

    save_run(record("good"), tmp_path)
    os.mkfifo(tmp_path / "x.json")
    result = {}

    def load():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result["runs"], result["warnings"] = load_runs(tmp_path), [str(w.message) for w in caught]

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():  # release the blocked open before failing
        os.close(os.open(tmp_path / "x.json", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("load_runs blocked on a FIFO")
    assert [run["label"] for run in result["runs"]] == ["good"]
    assert any("x.json: not readable JSON" in message and "not a regular file" in message
               for message in result["warnings"])


def test_run_label_reads_numeric_scalars_and_refuses_other_sparsities():
    import numpy as np
    import torch

    label = run_label(CONFIG)
    assert run_label({**CONFIG, "GLOBAL_SPARSITY": torch.tensor(0.95, dtype=torch.float64)}) == label
    assert run_label({**CONFIG, "GLOBAL_SPARSITY": np.float64(0.95)}) == label
    for sparsity in ("0.95", torch.tensor([0.9, 0.95]), True, 1.0, None):
        with pytest.raises(ValueError, match=r"GLOBAL_SPARSITY'\] must be a number in \[0, 1\)"):
            run_label({**CONFIG, "GLOBAL_SPARSITY": sparsity})
