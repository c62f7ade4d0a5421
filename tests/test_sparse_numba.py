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


@pytest.mark.parametrize("make_net, padded_inputs", [
    # 9x9 -> 9x9 -> 11x10, pooled 5x5 -> 5x5
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, (3, 2), padding=(2, 1)),
                           nn.MaxPool2d(2), nn.Conv2d(6, 3, 1), nn.Flatten(), nn.Linear(3 * 5 * 5, 2)),
     [False, True, False]),
    # 9x9 -> 7x7, pooled 3x7 -> 1x9 -> 1x9
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.MaxPool2d((2, 1)), nn.Conv2d(8, 4, 5, padding=(1, 3)), nn.ReLU(),
                           nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 1 * 9, 2)),
     [False, True, True]),
], ids=["padded-after-unpadded-chain", "unpadded-then-wide-padding"])
@pytest.mark.parametrize("sparsity", [0.5, 0.95])  # at 95 % most output channels have no weight
@pytest.mark.parametrize("batch", [1, 3])
def test_a_conv_writing_into_the_next_convs_padded_input_matches(make_net, padded_inputs, sparsity, batch):
    model = masked(make_net(), sparsity)
    inputs = torch.randn(batch, 3, 9, 9, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected = model(inputs).numpy()
    sparse = SparseNet.from_masked(model, "numba")
    convs = [step for step in sparse.steps if getattr(step, "kind", None) == "conv"]
    # every conv followed by a padded conv writes its output into that conv's padded input
    assert [step.input_padded for step in convs] == padded_inputs
    assert [step.out_pad for step in convs] == [next_conv.padding if padded else (0, 0)
                                                for next_conv, padded in zip(convs[1:], padded_inputs[1:])] + [(0, 0)]
    for _ in range(2):  # the second call reuses the buffers, their zero borders untouched by the first
        assert_close(sparse(inputs), expected)


@pytest.mark.parametrize("batch", [1, 5])
def test_small_calls_run_the_one_thread_kernels_with_the_same_outputs_and_leave_the_thread_count_alone(
        batch, monkeypatch):
    import numba

    from dst.csr import numba_backend, numba_kernels

    torch.manual_seed(0)
    masked = MaskedNet(SimpleNet(), 0.9).eval()
    inputs = torch.randn(batch, 1, 28, 28)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    before = numba.get_num_threads()
    kernels = ("conv_pool", "conv_pool_serial", "linear", "linear_serial")
    calls, set_to = [], []
    for name in kernels:
        kernel = getattr(numba_backend, name)
        monkeypatch.setattr(numba_backend, name,
                            lambda *args, name=name, kernel=kernel: calls.append(name) or kernel(*args))
    original = numba.set_num_threads
    monkeypatch.setattr(numba, "set_num_threads", lambda threads: set_to.append(threads) or original(threads))
    outputs = {}
    for serial_work, expected in ((0, {"conv_pool", "linear"}), (1 << 60, {"conv_pool_serial", "linear_serial"})):
        monkeypatch.setattr(numba_kernels, "SERIAL_WORK", serial_work)
        calls.clear()
        outputs[serial_work] = SparseNet.from_masked(masked, "numba")(inputs)
        # every conv and linear, twice (the probe check and the call), on the kernels the threshold picks
        assert set(calls) == expected and len(calls) == 2 * len(masked.masked_layers())
    assert numba.get_num_threads() == before and set_to == []
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

    assert serial_work("PASSIVE") == serial_work("passive") == 1 << 21
    assert serial_work(None) == serial_work("ACTIVE") == 0  # spinning threads wake for free


def test_small_batches_count_each_gathered_multiply_add_as_several(monkeypatch):
    from dst.csr import numba_kernels

    monkeypatch.setattr(numba_kernels, "SERIAL_WORK", 1000)
    # from batch GATHERED_BATCH (8) on, a multiply-add counts once; below, GATHERED_BATCH // batch times
    assert numba_kernels.runs_serially(999, 100) and not numba_kernels.runs_serially(1000, 8)
    assert numba_kernels.runs_serially(124, 1) and not numba_kernels.runs_serially(125, 1)
    assert numba_kernels.runs_serially(499, 4) and not numba_kernels.runs_serially(500, 4)
    assert numba_kernels.runs_serially(0, 0)  # an empty batch never wakes a thread
    monkeypatch.setattr(numba_kernels, "SERIAL_WORK", 0)  # spinning threads: every call parallel
    assert not numba_kernels.runs_serially(1, 1)
