"""What the numba backend adds to the engine: 16-bit indices, wide layers, reused buffers, a clear error without numba.

Its outputs are checked against the masked net with every other CPU backend in test_truly_sparse.py.
"""

import numpy as np
import pytest
import torch
from torch import nn

from dst.core.models import SimpleNet
from dst.csr import backends as sparse_backends
from dst.csr.backends import default_cpu_backend, numba_available
from dst.csr.model import SparseNet, memory_report
from dst.engine.masked import MaskedNet

pytestmark = pytest.mark.skipif(not numba_available(), reason="numba is not installed")


def masked(net: nn.Module, sparsity: float, allocation: str = "uniform", seed: int = 0) -> MaskedNet:
    return MaskedNet(net, sparsity, allocation, generator=torch.Generator().manual_seed(seed)).eval()


def assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: float = 1e-4):
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())
    np.testing.assert_array_equal(actual.argmax(axis=1), expected.argmax(axis=1))


def test_sixteen_bit_indices_make_simplenet_15x_smaller_at_95_percent():
    model = masked(SimpleNet(), 0.95)
    sparse = SparseNet.from_masked(model, "numba")
    for name in sparse.layers:
        _, col_indices, _ = sparse.ops.csr_arrays(sparse.layers[name].weight)
        assert col_indices.dtype == np.uint16, name
    report = memory_report(model, sparse)
    assert report["backend"] == "numba"
    numba_ratio = report["ratio"]
    scipy_ratio = memory_report(model, SparseNet.from_masked(model, "scipy"))["ratio"]
    # 6 bytes per active weight against 5 per weight: the ceiling is 5 / (0.05 * 6) = 16.7x
    assert 15 <= numba_ratio < 5 / (0.05 * 6)
    assert numba_ratio > scipy_ratio * 1.25  # 8 -> 6 bytes per active weight, less the shared overheads


def test_a_layer_wider_than_16_bits_keeps_int32_indices_and_matches():
    wide = 70_000  # more columns than a uint16 can number
    model = masked(nn.Sequential(nn.Linear(wide, 3), nn.ReLU(), nn.Linear(3, 2)), 0.99)
    sparse = SparseNet.from_masked(model, "numba")
    dtypes = [sparse.ops.csr_arrays(layer.weight)[1].dtype for layer in sparse.layers.values()]
    assert dtypes == [np.int32, np.uint16]
    inputs = torch.randn(4, wide, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(inputs).numpy()
    assert_close(sparse(inputs), expected)


@pytest.mark.parametrize("batch", [1, 5])  # at batch 1 the batch-first transpose alone is a view
def test_outputs_survive_the_next_call(batch):
    model = masked(SimpleNet(), 0.9)
    sparse = SparseNet.from_masked(model, "numba")
    first_inputs, second_inputs = torch.randn(batch, 1, 28, 28), torch.randn(batch, 1, 28, 28)
    first = sparse(first_inputs)
    kept = first.copy()
    second = sparse(second_inputs)  # same shape: the same work buffers are reused
    np.testing.assert_array_equal(first, kept)
    with torch.no_grad():
        assert_close(second, model(second_inputs).numpy())


def test_an_output_channel_without_weights_is_its_relu_bias():
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    model = masked(net, 0.5)
    with torch.no_grad():
        conv = model.masked_layers()["0"]
        conv.mask[1] = False  # channel 1 keeps no weight
        conv.weight.mul_(conv.mask)
        conv.bias.copy_(torch.tensor([0.5, 0.25, -1.0]))
    inputs = torch.randn(3, 2, 6, 6)
    outputs = SparseNet.from_masked(model, "numba")(inputs)  # (N, C, H, W): no flatten at the end
    assert outputs.shape == (3, 3, 3, 3)
    np.testing.assert_array_equal(outputs[:, 1], np.float32(0.25))
    with torch.no_grad():
        expected = model(inputs).numpy()
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_save_and_load_between_numba_and_scipy(tmp_path):
    model = masked(SimpleNet(), 0.95)
    inputs = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expected = model(inputs).numpy()
    for saved_by, loaded_by in (("numba", "scipy"), ("scipy", "numba")):
        path = tmp_path / f"{saved_by}.npz"
        SparseNet.from_masked(model, saved_by).save(path)
        loaded = SparseNet.load(path, loaded_by)
        for name, layer in model.masked_layers().items():
            assert loaded.nnz(name) == layer.active_count
        assert_close(loaded.to_numpy(loaded(inputs)), expected)
    assert memory_report(model, SparseNet.load(tmp_path / "scipy.npz", "numba"))["ratio"] >= 15


def test_numba_is_the_default_cpu_backend():
    assert default_cpu_backend() == "numba"


def test_missing_numba_is_a_clear_import_error(monkeypatch):
    monkeypatch.setattr(sparse_backends, "numba_available", lambda: False)
    assert sparse_backends.default_cpu_backend() == "scipy"
    with pytest.raises(ImportError, match=r"backend='numba' needs the numba package.*'scipy'"):
        SparseNet.from_masked(masked(SimpleNet(), 0.9), "numba")


def test_numba_refuses_a_gpu_device():
    with pytest.raises(ValueError, match="numba backend runs on the CPU"):
        SparseNet.from_masked(masked(SimpleNet(), 0.9), "numba", "cuda")


@pytest.mark.parametrize("make_net", [
    lambda: nn.Sequential(nn.Conv2d(3, 4, (2, 3), padding=(2, 0), bias=False), nn.Flatten(), nn.Linear(4 * 11 * 6, 3)),
    lambda: nn.Sequential(nn.Conv2d(3, 5, 1, padding=2), nn.MaxPool2d((3, 2)), nn.Flatten(), nn.Linear(5 * 4 * 6, 2)),
    lambda: nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4, 2)),
], ids=["no-relu-no-pool-rectangular", "pool-without-relu-wide-padding", "pool-before-conv"])
@pytest.mark.parametrize("batch", [1, 3])
def test_convs_without_relu_or_pool_match(make_net, batch):
    model = masked(make_net(), 0.5)
    inputs = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected = model(inputs).numpy()
    assert_close(SparseNet.from_masked(model, "numba")(inputs), expected)


@pytest.mark.parametrize("batch", [1, 5])
def test_small_calls_run_on_one_thread_with_the_same_outputs_and_leave_the_thread_count_alone(batch, monkeypatch):
    import numba

    from dst.csr import numba_backend

    torch.manual_seed(0)
    masked = MaskedNet(SimpleNet(), 0.9).eval()
    inputs = torch.randn(batch, 1, 28, 28)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    before = numba.get_num_threads()
    outputs, set_to = {}, []
    original = numba.set_num_threads
    monkeypatch.setattr(numba, "set_num_threads", lambda threads: set_to.append(threads) or original(threads))
    for serial_work in (0, 1 << 60):  # every call on all threads, then every call on one
        monkeypatch.setattr(numba_backend, "SERIAL_WORK", serial_work)
        set_to.clear()
        outputs[serial_work] = SparseNet.from_masked(masked, "numba")(inputs)
        assert numba.get_num_threads() == before
        # one thread for each conv and linear call, then back (twice: the probe check and the call)
        assert set_to == ([] if serial_work == 0 or before == 1 else [1, before] * 2 * len(masked.masked_layers()))
    np.testing.assert_array_equal(outputs[0], outputs[1 << 60])  # each output sums in one fixed order


def test_only_a_sleeping_thread_pool_sends_small_calls_to_one_thread():
    import os
    import subprocess
    import sys

    def serial_work(policy: str | None) -> int:
        environment = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
        if policy is not None:
            environment["OMP_WAIT_POLICY"] = policy
        script = "from dst.csr.numba_kernels import SERIAL_WORK; print(SERIAL_WORK)"
        return int(subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                                  check=True).stdout)

    assert serial_work("PASSIVE") == serial_work("passive") == 1 << 18
    assert serial_work(None) == serial_work("ACTIVE") == 0  # spinning threads wake for free
