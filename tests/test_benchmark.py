"""benchmark_inference keeps the notebook's contract and leaves the model alone."""

import numpy as np
import pytest
import torch
from torch import nn

from dst.csr.backends import numba_available
from dst.engine.masked import MaskedNet
from dst.tutorial import benchmark, benchmark_rows
from dst.tutorial.benchmark import (
    benchmark_environment,
    benchmark_inference,
    first_samples,
    time_forward,
    time_interleaved,
)
from dst.tutorial.benchmark_rows import CSR_SCIPY_CPU as SCIPY_ROW

SEED_ROWS = {"Dense, no mask (CPU)", "Dense+Mask (CPU)", "Truly Sparse CSR (CPU)", "Truly Sparse torch.sparse (CPU)"}
# With numba, 'Truly Sparse CSR (CPU)' is numba's engine and scipy's reference gets a row of its own.
CPU_ROWS = SEED_ROWS | ({SCIPY_ROW} if numba_available() else set())
TIMING_FIELDS = {"mean", "std", "median", "min", "runs"}


def tiny_model() -> MaskedNet:
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(4 * 14 * 14, 10))
    return MaskedNet(net, 0.9, generator=torch.Generator().manual_seed(0))


def list_loader(batches: int = 3, batch_size: int = 4):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(batch_size, 1, 28, 28, generator=generator), torch.zeros(batch_size, dtype=torch.long))
            for _ in range(batches)]


def test_cpu_rows_with_sane_timings(capsys, tiny_loader):
    timings = benchmark_inference(tiny_model(), tiny_loader, "cpu", num_samples=20, runs=2, warmup=1)
    assert set(timings) == CPU_ROWS
    for timing in timings.values():
        assert set(timing) == TIMING_FIELDS
        assert timing["runs"] == 2
        assert 0 < timing["min"] <= timing["median"]
        assert timing["min"] <= timing["mean"] and timing["std"] >= 0
    assert capsys.readouterr().out == ""


def test_without_numba_the_csr_row_is_scipy_and_no_row_is_added(monkeypatch):
    monkeypatch.setattr(benchmark, "default_cpu_backend", lambda: "scipy")
    timings = benchmark_inference(tiny_model(), list_loader(), "cpu", num_samples=4, runs=1, warmup=0)
    assert set(timings) == SEED_ROWS
    assert benchmark_environment("cpu")["cpu_sparse_backend"] == "scipy"


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
def test_numba_is_the_default_cpu_engine_and_runs_once_before_timing(monkeypatch):
    calls = []
    original = benchmark.SparseNet.__call__
    monkeypatch.setattr(benchmark.SparseNet, "__call__",
                        lambda self, x: calls.append(self.backend) or original(self, x))
    environment = benchmark_environment("cpu")
    assert environment["cpu_sparse_backend"] == "numba" and environment["numba_threads"] >= 1
    benchmark_inference(tiny_model(), list_loader(), "cpu", num_samples=4, runs=1, warmup=0)
    # one untimed call each when built (numba compiles there), then the single timed round
    assert calls == ["numba", "scipy", "torch"] * 2


def test_model_device_mode_and_weights_are_untouched():
    model = tiny_model().train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    benchmark_inference(model, list_loader(), torch.device("cpu"), num_samples=4, runs=1, warmup=0)
    assert model.training and all(module.training for module in model.modules())
    for key, value in model.state_dict().items():
        assert value.device.type == "cpu"
        assert torch.equal(value, before[key])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_gpu_rows_run_on_a_cuda_device():
    timings = benchmark_inference(tiny_model(), list_loader(), "cuda", num_samples=8, runs=2, warmup=1)
    assert {"Dense+Mask (GPU)", "Truly Sparse torch.sparse (GPU)"} <= set(timings)


def test_first_samples_concatenates_batches_and_accepts_bare_tensors():
    loader = list_loader(batches=3, batch_size=4)
    assert first_samples(loader, 10).shape == (10, 1, 28, 28)
    assert torch.equal(first_samples([inputs for inputs, _ in loader], 6), torch.cat([loader[0][0], loader[1][0]])[:6])
    with pytest.raises(ValueError, match="no batches"):
        first_samples([], 5)


def test_time_forward_counts_calls_and_reports_milliseconds():
    calls = []
    timing = time_forward(lambda: calls.append(1), runs=4, warmup=2)
    assert len(calls) == 6 and timing["runs"] == 4
    assert 0 <= timing["min"] <= timing["median"] < 1000


def test_interleaved_timing_takes_turns():
    order = []
    timings = time_interleaved({"a": (lambda: order.append("a"), None), "b": (lambda: order.append("b"), None)},
                               runs=3, warmup=1)
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert set(timings) == {"a", "b"} and timings["a"]["runs"] == 3


def test_non_masked_model_is_refused():
    with pytest.raises(TypeError, match="MaskedNet"):
        benchmark_inference(nn.Linear(2, 2), list_loader(), "cpu")


def test_environment_says_why_gpu_rows_did_not_run():
    environment = benchmark_environment("cpu")
    assert environment["torch_threads"] == torch.get_num_threads()
    assert environment["gpu_rows"] is False and "CUDA" in environment["gpu_skipped_reason"]
    assert {"numpy", "scipy", "torch", "cpu_count"} <= set(environment)
    if not torch.cuda.is_available():  # the notebook's call: no device given
        assert "CUDA" in benchmark_environment()["gpu_skipped_reason"]


def test_more_samples_than_the_loader_holds_is_refused_not_shrunk():
    with pytest.raises(ValueError, match=r"num_samples=1000 but the loader holds only 12 samples"):
        benchmark_inference(tiny_model(), list_loader(), "cpu", num_samples=1000, runs=1, warmup=0)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        first_samples(list_loader(), 0)
    assert first_samples(list_loader(), np.int64(12)).shape[0] == 12


def test_row_names_keep_the_seed_schema_and_name_their_device():
    assert {benchmark_rows.DENSE_CPU, benchmark_rows.MASKED_CPU, benchmark_rows.CSR_CPU,
            benchmark_rows.TORCH_SPARSE_CPU} == SEED_ROWS  # the keys of every saved results file
    assert [benchmark_rows.device_of(name) for name in (benchmark_rows.MASKED_GPU, "Dense+Mask", "x (y) (CPU)")] == [
        "GPU", "", "CPU"]
    for baseline, candidate in benchmark_rows.COMPARISONS:
        assert benchmark_rows.is_baseline(baseline) or baseline == benchmark_rows.DENSE_CPU
        assert not benchmark_rows.is_baseline(candidate) or candidate == benchmark_rows.MASKED_CPU


def test_a_loader_of_dicts_is_named():
    loader = [{"image": torch.zeros(4, 1, 28, 28), "label": torch.zeros(4, dtype=torch.long)}]
    with pytest.raises(TypeError, match=r"got a dict with keys \['image', 'label'\].*\(inputs, targets\) tuples"):
        benchmark_inference(tiny_model(), loader, "cpu", num_samples=4, runs=1, warmup=0)
