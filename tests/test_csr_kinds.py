"""The layer kind registry and the structured kinds: condensed constant fan-in and block-sparse rows.

Every kind on every CPU backend computes what the masked dense net computes; the new kinds
round-trip through the file, a crafted file of them is refused, memory_report counts them,
and describe / check_model / _compile know kinds only through the registry.
"""

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dst.core.models import MLP
from dst.csr.backends import numba_available
from dst.csr.convert import describe
from dst.csr.kinds import KINDS, Kind
from dst.csr.kinds.base import register
from dst.csr.kinds.bsr import BSRStep
from dst.csr.model import SparseNet, memory_report
from dst.csr.npz import FILE_FORMAT, check_model
from dst.engine.masked import MaskedNet
from dst.engine.patterns import get_pattern
from dst.engine.patterns.block import Block

needs_numba = pytest.mark.skipif(not numba_available(), reason="numba is not installed")
CPU_BACKENDS = ["scipy", "torch", pytest.param("numba", marks=needs_numba)]
# One shape for every numba test: each kernel compiles once per argument types, not per shape, but the
# small net keeps the whole file fast.
IN, HIDDEN, OUT = 32, 16, 8


def structured_net(layout: str, seed: int = 0, k: int = 5, block_shape=(4, 4), density: float = 0.25,
                   sizes=(IN, HIDDEN, OUT)) -> MaskedNet:
    """An MLP whose masks are set by hand: ``k`` active inputs per row (fan_in) or whole aligned blocks (bsr);
    off-mask weights zeroed, as a masked layer keeps them."""
    torch.manual_seed(seed)
    generator = np.random.default_rng(seed)
    net = MaskedNet(MLP(sizes[0], sizes[1:-1], sizes[-1]), 0.5, "uniform").eval()
    for layer in net.masked_layers().values():
        out_features, in_features = layer.weight.shape
        if layer is list(net.masked_layers().values())[-1] or layout == "fan_in":
            fan_in = min(k, in_features)
            mask = np.zeros((out_features, in_features), dtype=bool)
            for row in range(out_features):
                mask[row, generator.choice(in_features, fan_in, replace=False)] = True
            layer.pattern = get_pattern("fan_in")
        else:
            r, c = block_shape
            blocks = generator.random((out_features // r, in_features // c)) < density
            mask = np.kron(blocks, np.ones((r, c), dtype=bool))
            layer.pattern = Block(*block_shape)
        with torch.no_grad():
            layer.mask.copy_(torch.from_numpy(mask))
            layer.weight.mul_(layer.mask)
    return net


def assert_matches(net: MaskedNet, sparse: SparseNet, inputs: torch.Tensor):
    with torch.no_grad():
        expected = net(inputs).numpy()
    actual = sparse.to_numpy(sparse(inputs))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(expected).max()))


def kinds_of(sparse: SparseNet) -> list[str]:
    return [step["kind"] for step in sparse.architecture]


# ----------------------------------------------------------------------------- the same function

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["fan_in", "bsr"])
@pytest.mark.parametrize("batch", [1, 7])
def test_structured_kinds_compute_the_masked_forward(layout, backend, batch):
    net = structured_net(layout)
    sparse = SparseNet.from_masked(net, backend)  # "auto": each layer's pattern picks its kind
    assert kinds_of(sparse) == ["flatten", layout, "relu", "fan_in"]
    assert_matches(net, sparse, torch.randn(batch, IN))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layout_forces_a_kind_or_csr(backend):
    net = structured_net("bsr")
    csr = SparseNet.from_masked(net, backend, layout="csr")
    assert kinds_of(csr) == ["flatten", "linear", "relu", "linear"]
    mixed = SparseNet.from_masked(net, backend, layout={"fc1": ("bsr", {"block_shape": (2, 4)}),
                                                        "fc2": "csr"})
    assert kinds_of(mixed) == ["flatten", "bsr", "relu", "linear"] and mixed.architecture[1]["block_shape"] == [2, 4]
    for sparse in (csr, mixed):
        assert_matches(net, sparse, torch.randn(3, IN))


def test_the_gather_path_of_bsr_matches_the_library_one():
    net = structured_net("bsr")
    architecture, weights = describe(net)
    sparse = SparseNet(architecture, weights, "scipy")
    inputs = np.random.default_rng(0).standard_normal((IN, 6)).astype(np.float32)
    name = architecture[1]["name"]
    library, gather = (BSRStep(sparse.ops, name, weights[name], relu=True, library=use) for use in (True, False))
    assert library.matrix is not None and gather.matrix is None
    np.testing.assert_allclose(gather(inputs, None), library(inputs, None), rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 6), columns=st.integers(1, 6), r=st.sampled_from([1, 2, 4]), c=st.sampled_from([1, 2, 8]),
       k=st.integers(0, 40), density=st.floats(0.0, 1.0), batch=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_both_kinds_match_for_any_shape(rows, columns, r, c, k, density, batch, seed):
    """Block rows x block columns of any count, fan-in from 0 to every input, on every installed backend."""
    sizes = (columns * c, rows * r, 3)
    backends = ["scipy", "torch", *(["numba"] if numba_available() else [])]
    for layout in ("fan_in", "bsr"):
        net = structured_net(layout, seed, k=min(k, sizes[0]), block_shape=(r, c), density=density, sizes=sizes)
        inputs = torch.randn(batch, sizes[0])
        for backend in backends:
            assert_matches(net, SparseNet.from_masked(net, backend), inputs)


# ----------------------------------------------------------------------------- masks that do not fit

def test_a_mask_that_does_not_fit_the_kind_asked_for_is_refused_naming_the_layer():
    net = structured_net("bsr")
    first = net.masked_layers()["fc1"]
    with torch.no_grad():
        first.mask[0, 0] = not bool(first.mask[0, 0])  # one weight on or off: a partial block, uneven rows
    with pytest.raises(ValueError, match=r"layer 'fc1' \(MaskedLinear\): kind 'bsr' needs a mask made of "
                                         r"whole aligned 4x4 blocks, but 1 of its \d+ active blocks"):
        SparseNet.from_masked(net, "scipy")
    with pytest.raises(ValueError, match=r"layer 'fc1' .*kind 'fan_in' needs the same number of active inputs"):
        SparseNet.from_masked(net, "scipy", layout="fan_in")
    with pytest.raises(ValueError, match=r"layer 'fc1' .*needs a shape divisible by the block, got 16x32"):
        SparseNet.from_masked(net, "scipy", layout={"fc1": ("bsr", {"block_shape": (3, 4)})})
    with pytest.raises(ValueError, match=r"unknown layout 'diagonal': choose 'auto', 'csr' or one of \['bsr', "
                                         r"'fan_in'\]"):
        SparseNet.from_masked(net, "scipy", layout="diagonal")
    with pytest.raises(ValueError, match=r"layout names \['fc9'\], which are not masked layers"):
        SparseNet.from_masked(net, "scipy", layout={"fc9": "csr"})
    plain = MaskedNet(MLP(IN, (HIDDEN,), OUT), 0.5, "uniform")  # no pattern: auto is CSR, bsr needs a block
    assert kinds_of(SparseNet.from_masked(plain, "scipy")) == ["flatten", "linear", "relu", "linear"]
    with pytest.raises(ValueError, match="kind 'bsr' needs a block shape"):
        SparseNet.from_masked(plain, "scipy", layout="bsr")


# ----------------------------------------------------------------------------- file and memory

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["fan_in", "bsr"])
def test_structured_kinds_round_trip_through_the_file(tmp_path, layout, backend):
    net = structured_net(layout)
    sparse = SparseNet.from_masked(net, backend)
    sparse.save(tmp_path / "model.npz")
    loaded = SparseNet.load(tmp_path / "model.npz", backend)
    assert loaded.architecture == sparse.architecture
    for name, host in sparse.host_weights().items():
        for field, array in host.items():
            np.testing.assert_array_equal(loaded.host_weights_of(name)[field], array)
    assert_matches(net, loaded, torch.randn(4, IN))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["fan_in", "bsr"])
def test_memory_report_counts_the_structured_kinds(layout, backend):
    net = structured_net(layout)
    sparse = SparseNet.from_masked(net, backend)
    report = memory_report(net, sparse)
    for name, layer in net.masked_layers().items():
        active = int(layer.mask.sum())
        assert report["layers"][name]["nnz"] == active
        host = sparse.host_weights_of(name)
        step = sparse.layers[name]
        held = sum(int(array.nbytes) for array in sparse.kinds[name].held_arrays(sparse.ops, step))
        assert report["layers"][name]["sparse_bytes"] == held
        # values (4 bytes each) and bias at least; the indices in whatever type this backend keeps
        assert held >= 4 * active + 4 * layer.weight.shape[0]
        if sparse.kinds[name].name == "bsr":  # one index per block, not per weight
            r, c = host["values"].shape[1:]
            assert held <= 4 * active + 4 * layer.weight.shape[0] + 8 * (active // (r * c) + host["shape"][0] + 1)
        else:  # one index per weight, no row pointers
            assert held <= (4 + 8) * active + 4 * layer.weight.shape[0]


def saved(tmp_path, layout: str) -> tuple[dict, dict]:
    SparseNet.from_masked(structured_net(layout), "scipy").save(tmp_path / "model.npz")
    with np.load(tmp_path / "model.npz") as data:
        arrays = {key: data[key].copy() for key in data.files}
    return json.loads(arrays.pop("header").tobytes()), arrays


def write(path, header: dict, arrays: dict):
    np.savez(path, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
    return path


def entry(header: dict, name: str = "fc1") -> dict:
    return next(layer for layer in header["weights"] if layer["name"] == name)


def wrong_fan_in(header, arrays):  # k one more than the arrays hold
    entry(header)["fan_in"] += 1


def fan_in_past_the_width(header, arrays):
    arrays["col_indices_uint8"][0] = 200


def fan_in_repeated_index(header, arrays):
    arrays["col_indices_uint8"][1] = arrays["col_indices_uint8"][0]


def fan_in_larger_than_the_width(header, arrays):
    entry(header)["fan_in"] = 33


def block_not_dividing(header, arrays):
    entry(header)["block_shape"] = [3, 4]


def block_column_past_the_width(header, arrays):
    arrays["col_indices_uint8"][0] = 8


def more_blocks_than_fit(header, arrays):
    entry(header)["blocks"] = 10**6


def block_shape_off_the_architecture(header, arrays):  # the file's entry and the step disagree
    header["architecture"][1]["block_shape"] = [2, 8]


HOSTILE = {
    "fan_in": {wrong_fan_in: r"array 'col_indices_uint8' must be a 1-D uint8 \.npy of \d+ entries",
               fan_in_past_the_width: r"layer 'fc1': column indices must lie in \[0, 32\), got \[\d+, 200\]",
               fan_in_repeated_index: r"layer 'fc1': column indices must rise strictly within each row",
               fan_in_larger_than_the_width: r"fan_in of layer 'fc1' must be 1 int\(s\) in \[0, 32\], got 33"},
    "bsr": {block_not_dividing: r"layer 'fc1'.*its 3x4 blocks do not divide its shape 16x32",
            block_column_past_the_width: r"layer 'fc1': block column indices must lie in \[0, 8\), got \[\d+, 8\]",
            more_blocks_than_fit: r"layer 'fc1'.*blocks must be 1 int\(s\) in \[0, 32\], got 1000000",
            block_shape_off_the_architecture: r"values \(\d+, 4, 4\).* do not make a block-sparse matrix"},
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout,corrupt", [(layout, corrupt) for layout, cases in HOSTILE.items()
                                            for corrupt in cases], ids=lambda value: getattr(value, "__name__", value))
def test_a_crafted_file_of_a_structured_kind_is_refused(tmp_path, layout, corrupt, backend):
    header, arrays = saved(tmp_path, layout)
    SparseNet.load(write(tmp_path / "intact.npz", header, arrays), backend)  # the rewrite itself is faithful
    corrupt(header, arrays)
    with pytest.raises(ValueError, match=HOSTILE[layout][corrupt]):
        SparseNet.load(write(tmp_path / "crafted.npz", header, arrays), backend)


def test_a_format_1_file_is_refused_saying_what_to_do(tmp_path):
    header, arrays = saved(tmp_path, "fan_in")
    header["format"] = "dst-truly-sparse-csr-1"
    with pytest.raises(ValueError, match=f"an earlier format this version does not read: convert the masked net "
                                         f"again \\(SparseNet.from_masked\\) and save it as {FILE_FORMAT}"):
        SparseNet.load(write(tmp_path / "old.npz", header, arrays))
    architecture, weights = describe(structured_net("fan_in"))
    architecture[2] = {"type": "relu", "name": "relu1"}
    with pytest.raises(ValueError, match="names its kind under 'type', as format 1 files did"):
        check_model(architecture, weights)


# ----------------------------------------------------------------------------- the registry

class Doubling(nn.Module):
    def forward(self, x):
        return 2 * x


class DoublingStep:
    def __init__(self, ops, factor: float):
        self.ops, self.factor = ops, factor

    def prepare(self, shape):
        return shape, None

    def __call__(self, x, buffers):
        return x * self.factor


@pytest.fixture
def doubling_kind():
    @register
    class DoublingKind(Kind):
        name = "doubling"
        modules = (Doubling,)

        def describe(self, module, name, label, **options):
            return {"kind": self.name, "name": name, "factor": 2}, None

        def check(self, step, host, where):
            if step.get("factor") != 2:
                raise ValueError(f"{where}: factor must be 2")

        def build(self, ops, group, host):
            return DoublingStep(ops, group["factor"])

    yield KINDS["doubling"]
    del KINDS["doubling"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_kind_registered_elsewhere_works_end_to_end(tmp_path, doubling_kind, backend):
    """describe, check_model, _compile and the file know a kind only through the registry."""
    torch.manual_seed(0)
    net = MaskedNet(nn.Sequential(nn.Linear(IN, HIDDEN), Doubling(), nn.ReLU(), nn.Linear(HIDDEN, OUT)), 0.5,
                    "uniform").eval()
    sparse = SparseNet.from_masked(net, backend)  # checked against the masked net on a probe batch
    assert kinds_of(sparse) == ["linear", "doubling", "relu", "linear"]
    sparse.save(tmp_path / "model.npz")
    assert_matches(net, SparseNet.load(tmp_path / "model.npz", backend), torch.randn(3, IN))
    architecture, weights = describe(net)
    architecture[1]["factor"] = 3
    with pytest.raises(ValueError, match="step 1 of the architecture: factor must be 2"):
        SparseNet(architecture, weights, backend)


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="a layer kind named 'linear' is already registered"):
        register(type("Again", (Kind,), {"name": "linear"}))


# ----------------------------------------------------------------------------- what "auto" and a layout pick

def test_auto_takes_the_kind_each_pattern_names():
    net = structured_net("fan_in")
    first, last = net.masked_layers().values()
    for name, expected in (("2:4", "fan_in"), ("fan_in", "fan_in"), ("unstructured", "linear")):
        first.pattern = get_pattern(name)  # the kind is the one the pattern names (its sparse_kind)
        assert kinds_of(SparseNet.from_masked(net, "scipy"))[1] == expected, name
    del first.pattern
    assert kinds_of(SparseNet.from_masked(net, "scipy"))[1] == "linear"  # no pattern at all: CSR


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_cnn_keeps_csr_convs_when_its_linears_take_a_structured_kind(backend):
    torch.manual_seed(0)
    net = MaskedNet(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3)), 0.5, "uniform").eval()
    conv, *linears = net.masked_layers().values()
    conv.pattern = get_pattern("fan_in")  # no fan_in kind for convs: CSR under "auto"
    for layer in linears:
        k = 3
        mask = torch.zeros_like(layer.mask)
        for row in range(mask.shape[0]):
            mask[row, torch.randperm(mask.shape[1])[:k]] = True
        with torch.no_grad():
            layer.mask.copy_(mask)
            layer.weight.mul_(mask)
        layer.pattern = get_pattern("1:3")
    inputs = torch.randn(2, 1, 8, 8)
    for layout in ("auto", "fan_in"):  # a kind name for the whole net leaves the layers it cannot take CSR
        sparse = SparseNet.from_masked(net, backend, layout=layout)
        assert kinds_of(sparse) == ["conv", "relu", "maxpool", "flatten", "fan_in", "relu", "fan_in"]
        assert_matches(net, sparse, inputs)
    with pytest.raises(ValueError, match=r"layer '0' \(MaskedConv2d\): kind 'fan_in' converts \['MaskedLinear'\]"):
        SparseNet.from_masked(net, backend, layout={"0": "fan_in"})


@pytest.mark.skipif(not numba_available(), reason="numba is not installed")
@pytest.mark.parametrize("layout", ["fan_in", "bsr"])
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("serial_work", [0, 1 << 40])  # every call parallel, then every call on one thread
def test_the_numba_kernels_agree_on_one_thread_and_on_several(layout, batch, serial_work, monkeypatch):
    from dst.csr import numba_kernels

    monkeypatch.setattr(numba_kernels, "SERIAL_WORK", serial_work)
    net = structured_net(layout, seed=3)
    assert_matches(net, SparseNet.from_masked(net, "numba"),  # "auto": each layer its pattern's kind
                   torch.randn(batch, IN, generator=torch.Generator().manual_seed(1)))
