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


def test_the_readme_holds_the_inference_tables_of_the_committed_results():
    import json
    from pathlib import Path

    from benchmarks.sparse_inference import RESULTS, readme_tables

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for table in readme_tables(json.loads((RESULTS / "sparse_inference.json").read_text())).split("\n\n"):
        assert table in readme, "README.md's inference tables differ from sparse_inference.json: paste the output " \
                                "of `python -m benchmarks.sparse_inference --readme`"


def test_the_peer_table_bolds_the_fastest_engine_of_each_block_even_one_it_does_not_show(monkeypatch):
    import benchmarks.sparse_inference as sparse_inference

    def row(backend, sparse_ms):
        return {"allocation": "uniform", "sparsity": 0.95, "batch_size": 1, "backend": backend,
                "sparse_ms": sparse_ms, "dense_ms": 1.0, "speedup": 1.0 / sparse_ms, "memory_ratio": 2.0,
                "file_ratio": 3.0}

    times = {"masked_ms": 1.0, "numba_ms": 0.3, "scipy_ms": 0.2, "torch_ms": 0.9,  # own threads: scipy fastest
             "masked_single_thread_ms": 1.0, "numba_single_thread_ms": 0.15, "scipy_single_thread_ms": 0.2,
             "torch_single_thread_ms": 0.9}
    results = {"rows": [row(backend, 0.5) for backend in ("numba", "scipy", "torch")],
               "peers": [{"peer": "ort", "allocation": "uniform", "sparsity": 0.95, "batch_size": 1, "ms": 0.25,
                          "single_thread_ms": 0.4, **times}]}
    monkeypatch.setattr(sparse_inference, "README_ROWS", [("uniform", 0.95, 1)])
    peers = sparse_inference.readme_tables(results).split("\n\n")[1].splitlines()
    # own threads: scipy (not shown) is fastest, so nothing is bold; one thread: numba
    assert peers[-1] == "| 0.95 | 1 | 0.250 | 0.300 | 1.000 | 0.400 | **0.150** | 1.000 |"
