"""benchmarks/structured.py: its masks have the structure they claim, and one tiny sweep runs end to end."""

import json

import pytest
import torch

from benchmarks import structured
from dst.csr.backends import numba_available


@pytest.mark.parametrize("pattern,block_shape", [("fan_in", None), ("block", (4, 4)), ("block", (1, 8)),
                                                 ("unstructured", None)])
def test_the_timed_nets_hold_the_pattern_they_claim_where_it_fits(pattern, block_shape, monkeypatch):
    monkeypatch.setitem(structured.LAYERS, "tiny", (96, 64))
    for layer in ("tiny", "SimpleNet"):
        net, layout = structured.masked_model(layer, 0.75, pattern, block_shape)
        for name, module in net.masked_layers().items():
            mask = module.mask_2d()
            if layout[name] == "csr":  # convs, and layers the blocks do not tile: unstructured
                assert module.pattern.kind == "unstructured", name
            else:
                assert module.pattern == structured.pattern_of(pattern, block_shape), name
                module.pattern.check_mask(mask)  # every group holds the same count
            assert mask.sum() == module.pattern.active_count(mask.shape, 0.25), name
    if pattern != "unstructured":
        assert any(kind != "csr" for kind in layout.values())


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
def test_a_tiny_sweep_writes_rows_a_table_and_a_figure(tmp_path, monkeypatch):
    monkeypatch.setitem(structured.LAYERS, "tiny", (64, 32))
    results = structured.sweep(["tiny"], [0.75], [1, 3], [1], repeats=2, warmup=1, quick=True)
    engines = {row["engine"] for row in results["rows"]}
    assert {structured.DENSE, structured.MASKED, structured.CSR, structured.FAN_IN, "BSR numba 4x4",
            "BSR scipy 4x4", "BSR torch 4x4"} <= engines
    assert all(row["median_s"] > 0 for row in results["rows"])
    assert results["environment"]["cpu_model"]
    if not torch.cuda.is_available():
        assert "no CUDA device" in results["skipped"]["2:4 semi-structured (CUDA)"]
    table = structured.format_table(json.loads(json.dumps(results)))
    assert "tiny, batch 3, 1 thread(s)" in table
    assert any(line.startswith("BSR numba faster than dense") for line in structured.goal_lines(results))
    figure = structured.plot_structured(results, save_path=tmp_path / "structured.png")
    assert (tmp_path / "structured.png").stat().st_size > 0 and figure.axes


def test_fewer_than_30_repeats_are_refused():
    with pytest.raises(Exception, match="at least 30"):
        structured.at_least_30("10")
