"""benchmarks/peers.py: a missing peer is skipped with its reason; a present one computes the masked net's function."""

import sys

import numpy as np
import pytest
import torch

from benchmarks.peers import MKL, ONNXRUNTIME, mkl_forwards, onnxruntime_forwards
from dst.core.models import SimpleNet
from dst.engine.masked import MaskedNet


def masked_net() -> MaskedNet:
    return MaskedNet(SimpleNet(), 0.9, generator=torch.Generator().manual_seed(0)).eval()


def test_a_missing_peer_is_a_one_line_reason_naming_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    reason = onnxruntime_forwards(masked_net(), torch.randn(2, 1, 28, 28))
    assert isinstance(reason, str) and "\n" not in reason
    assert reason.startswith(f"{ONNXRUNTIME}: not installed") and "requirements-benchmarks.txt" in reason


def test_onnxruntime_runs_the_masked_nets_function_on_its_own_threads_and_on_one():
    pytest.importorskip("onnx", reason="onnx is an optional benchmark peer (requirements-benchmarks.txt)")
    pytest.importorskip("onnxruntime", reason="onnxruntime is an optional benchmark peer")
    net, inputs = masked_net(), torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    forwards = onnxruntime_forwards(net, inputs)
    assert set(forwards) == {"own threads", "1 thread"}
    with torch.no_grad():
        expected = net(inputs).numpy()
    for forward, synchronize in forwards.values():
        assert synchronize is None
        np.testing.assert_allclose(forward()[0], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_a_missing_mkl_is_a_one_line_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "sparse_dot_mkl", None)
    reason = mkl_forwards(masked_net(), torch.randn(2, 1, 28, 28))
    assert isinstance(reason, str) and "\n" not in reason
    assert reason.startswith(f"{MKL}: ") and "requirements-benchmarks.txt" in reason


def test_mkl_runs_the_masked_nets_function_through_its_sparse_products_on_its_own_threads_and_on_one():
    net, inputs = masked_net(), torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    forwards = mkl_forwards(net, inputs)
    if isinstance(forwards, str):
        pytest.skip(f"an optional benchmark peer (requirements-benchmarks.txt): {forwards}")
    assert set(forwards) == {"own threads", "1 thread"}
    with torch.no_grad():
        expected = net(inputs).numpy()
    for forward, synchronize in forwards.values():
        assert synchronize is None
        np.testing.assert_allclose(np.asarray(forward()), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
