"""benchmarks/peers.py: a missing peer is skipped with its reason; a present one computes the masked net's function."""

import sys

import numpy as np
import pytest
import torch

from benchmarks.peers import MKL, ONNXRUNTIME, mkl_forwards, onnxruntime_forwards, torch_channels_last_forwards
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


def test_the_channels_last_dense_model_runs_the_masked_nets_function_in_that_layout():
    net, inputs = masked_net(), torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    forwards = torch_channels_last_forwards(net, inputs)
    assert set(forwards) == {"own threads", "1 thread"}
    with torch.no_grad():
        expected = net(inputs).numpy()
    conv = next(module for module in net.modules() if isinstance(module, torch.nn.Conv2d))
    for forward, synchronize in forwards.values():
        assert synchronize is None
        np.testing.assert_allclose(forward().numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert conv.weight.is_contiguous()  # the caller's net is left as it was (the peer converts a copy)


def test_a_peer_that_computes_another_function_is_refused(monkeypatch):
    import benchmarks.peers as peers

    logits = np.array([[10.0, -3.0], [0.5, 2.0]], dtype=np.float32)
    assert peers.computes_the_same(logits + 1e-3, logits)  # float32 noise at this scale
    assert not peers.computes_the_same(logits + np.array([[0.0, 0.5], [0.0, 0.0]], np.float32), logits)
    monkeypatch.setattr(peers, "computes_the_same", lambda got, expected: False)
    with pytest.raises(ValueError, match="does not compute the masked net's function"):
        torch_channels_last_forwards(masked_net(), torch.randn(2, 1, 28, 28))


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


def test_the_readme_holds_the_inference_tables_and_summary_of_the_committed_results():
    import json
    from pathlib import Path

    from benchmarks.sparse_inference import RESULTS, readme_text

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    chunks = readme_text(json.loads((RESULTS / "sparse_inference.json").read_text())).split("\n\n")
    assert len(chunks) == 4  # two tables, the goals, the peers
    for chunk in chunks:
        assert chunk in readme, "README.md's inference tables or summary differ from sparse_inference.json: paste " \
                                "the output of `python -m benchmarks.sparse_inference --readme`"


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


def test_the_summary_says_from_which_sparsity_numba_is_fastest_and_who_wins_below():
    from benchmarks.sparse_inference import block_times, fastest_from, readme_summary

    def peer(sparsity, batch, ort, numba):
        return {"peer": "ort", "allocation": "uniform", "sparsity": sparsity, "batch_size": batch, "ms": ort,
                "single_thread_ms": ort, "numba_ms": numba, "numba_single_thread_ms": numba, "scipy_ms": 9.0,
                "scipy_single_thread_ms": 9.0, "torch_ms": 9.0, "torch_single_thread_ms": 9.0, "masked_ms": 9.0,
                "masked_single_thread_ms": 9.0}

    def row(sparsity, backend, speedup):
        return {"allocation": "uniform", "sparsity": sparsity, "batch_size": 100, "backend": backend,
                "speedup": speedup, "sparse_ms": 0.8, "memory_ratio": 16.0}

    # batch 1: numba fastest at 0.9 and 0.99 but not 0.8; batch 100: ort fastest at 0.99, so nowhere
    peers = [peer(0.8, 1, 0.1, 0.2), peer(0.9, 1, 0.3, 0.2), peer(0.99, 1, 0.3, 0.1),
             peer(0.9, 100, 0.5, 0.4), peer(0.99, 100, 0.1, 0.4)]
    blocks = block_times({"peers": peers}, "_ms")
    assert blocks[(0.9, 1)] == {"ort": 0.3, "numba": 0.2, "scipy": 9.0, "torch.sparse": 9.0,
                                "masked dense (torch)": 9.0}
    assert fastest_from(blocks, 1) == 0.9 and fastest_from(blocks, 100) is None
    results = {"rows": [row(0.95, "numba", 7.5), row(0.99, "numba", 9.0), row(0.95, "scipy", 3.0)],
               "peers": peers, "settings": {"seconds": 40.0}}
    goals, fastest = readme_summary(results)
    assert goals.startswith("Goals, numba against the 2-thread masked net (uniform, batch 100): 7.5x at 95 % "
                            "(goal 5x, met), 9.0x at 99 % (goal 10x, missed). The convolution work's goal, 95 % at "
                            "batch 100 in at most 0.9 ms: 0.800 ms, met.")
    assert "numba is the fastest of the 5 engines from 90 % at batch 1 and nowhere at batch 100" in fastest
    assert "ort at 80 %, batch 1 (0.100 ms against numba's 0.200)" in fastest
    assert "ort at 99 %, batch 100 (0.100 ms against numba's 0.400)" in fastest
