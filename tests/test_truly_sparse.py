"""The truly sparse (CSR) engine computes exactly what the masked dense network computes."""

import contextlib
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from dst.core.gpu import CUPY_GPU_AVAILABLE
from dst.core.models import MLP, SimpleNet
from dst.csr.backends import BACKENDS, numba_available
from dst.csr.model import SparseNet, memory_report
from dst.engine.masked import MaskedNet

needs_numba = pytest.mark.skipif(not numba_available(), reason="numba is not installed")
CPU_BACKENDS = ["scipy", "torch", pytest.param("numba", marks=needs_numba)]
INSTALLED_CPU_BACKENDS = ["scipy", "torch", *(["numba"] if numba_available() else [])]  # for loops in a test
needs_cupy = pytest.mark.skipif(not CUPY_GPU_AVAILABLE, reason="cupy/CUDA not available")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def masked(net: nn.Module, sparsity: float, allocation: str = "uniform", seed: int = 0) -> MaskedNet:
    return MaskedNet(net, sparsity, allocation, generator=torch.Generator().manual_seed(seed)).eval()


def mnist_batch(count: int = 8, seed: int = 0) -> torch.Tensor:
    """MNIST-shaped inputs, normalised like the tutorial's loader."""
    pixels = torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    return (pixels - 0.1307) / 0.3081


def assert_close_to_scale(actual: np.ndarray, expected: np.ndarray, tolerance: float = 1e-5):
    """Equal within ``tolerance`` times the largest magnitude compared (at least 1).

    float32 sums of different order differ by a few ulps of the partial sums, so the error
    grows with the size of the values: logits of 330 may differ by 3e-5 and be exact.
    """
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance * scale)


def assert_matches_dense(model: MaskedNet, sparse: SparseNet, inputs: torch.Tensor, tolerance: float = 1e-5):
    with torch.no_grad():
        expected = model(inputs).numpy()
    actual = sparse.to_numpy(sparse(sparse.as_input(inputs)))
    assert actual.shape == expected.shape
    assert actual.dtype == np.float32
    assert_close_to_scale(actual, expected, tolerance)
    np.testing.assert_array_equal(actual.argmax(axis=1), expected.argmax(axis=1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("net_class", [SimpleNet, MLP])
def test_forward_matches_masked_dense(net_class, sparsity, backend):
    torch.manual_seed(0)
    model = masked(net_class(), sparsity)
    assert_matches_dense(model, SparseNet.from_masked(model, backend), mnist_batch())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_erk_allocation_with_a_dense_first_conv_matches(backend):
    model = masked(SimpleNet(), 0.95, "erk")
    assert model.masked_layers()["conv1"].mask.all()  # ERK keeps the 144-weight conv dense
    assert_matches_dense(model, SparseNet.from_masked(model, backend), mnist_batch())


@needs_cupy
def test_cupy_backend_matches():
    model = masked(SimpleNet(), 0.9)
    assert_matches_dense(model, SparseNet.from_masked(model, "cupy"), mnist_batch())


@needs_cuda
def test_torch_cuda_backend_matches():
    model = masked(SimpleNet(), 0.9)
    assert_matches_dense(model, SparseNet.from_masked(model, "torch", "cuda"), mnist_batch())


@st.composite
def small_conv_nets(draw):
    """A random [pool] -> conv -> (relu, pool in either order) -> conv -> flatten -> linear chain, and its input.

    The first pool takes the strided path (no conv before it), the second the blocked one.
    """
    channels = draw(st.integers(1, 3))
    input_size = draw(st.integers(4, 12)), draw(st.integers(4, 12))
    input_pool = draw(st.sampled_from([None, 2, (2, 1), 3]))
    input_window = (input_pool, input_pool) if isinstance(input_pool, int) else input_pool or (1, 1)
    size = [input_size[d] // input_window[d] for d in range(2)]
    hidden = draw(st.integers(1, 6))
    kernel = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    padding = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    pool = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    conv_out = [size[d] + 2 * padding[d] - kernel[d] + 1 for d in range(2)]
    assume(all(conv_out[d] >= pool[d] for d in range(2)))
    pooled = [conv_out[d] // pool[d] for d in range(2)]
    activation_then_pool = [nn.ReLU(), nn.MaxPool2d(pool)]
    if draw(st.booleans()):
        activation_then_pool.reverse()
    layers = [*([nn.MaxPool2d(input_pool)] if input_pool else []),
              nn.Conv2d(channels, hidden, kernel, padding=padding, bias=draw(st.booleans())),
              *activation_then_pool,
              nn.Conv2d(hidden, 2, 1), nn.ReLU(),  # a conv with no pool after it
              nn.Flatten(), nn.Linear(2 * pooled[0] * pooled[1], draw(st.integers(1, 5)))]
    sparsity = draw(st.sampled_from([0.0, 0.3, 0.7, 0.9, 0.99]))
    batch = draw(st.integers(1, 4))
    return nn.Sequential(*layers), sparsity, torch.randn(batch, channels, *input_size)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=small_conv_nets(), seed=st.integers(0, 2**16))
def test_random_small_conv_nets_match(case, seed):
    net, sparsity, inputs = case
    torch.manual_seed(seed)
    model = masked(net, sparsity, seed=seed)
    for backend in INSTALLED_CPU_BACKENDS:
        assert_matches_dense(model, SparseNet.from_masked(model, backend), inputs)


def test_explicit_zeros_of_active_weights_are_kept():
    model = masked(SimpleNet(), 0.9)
    with torch.no_grad():
        for layer in model.masked_layers().values():
            active = layer.mask.flatten().nonzero().flatten()
            layer.weight.view(-1)[active[::3]] = 0.0  # a third of the active weights are exactly zero
    for backend in INSTALLED_CPU_BACKENDS:
        sparse = SparseNet.from_masked(model, backend)
        for name, layer in model.masked_layers().items():
            assert sparse.nnz(name) == layer.active_count
        assert_matches_dense(model, sparse, mnist_batch())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batch_sizes_layouts_and_input_types(backend):
    model = masked(SimpleNet(), 0.9)
    sparse = SparseNet.from_masked(model, backend)
    for count in (5, 1, 5, 3):  # new shapes and reused work buffers
        assert_matches_dense(model, sparse, mnist_batch(count, seed=count))
    from_numpy = sparse.to_numpy(sparse(mnist_batch(2).numpy()))
    with torch.no_grad():
        assert_close_to_scale(from_numpy, model(mnist_batch(2)).numpy())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_an_output_survives_the_next_call_at_batch_1(backend):
    # The net ends in a conv with an empty output channel: scipy and torch return from a kept buffer
    # there, numba always does, and at batch 1 the batch-first transpose alone would be a view of it.
    model = masked(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), 0.5)
    with torch.no_grad():
        model.masked_layers()["0"].mask[0] = False
    sparse = SparseNet.from_masked(model, backend)
    first = sparse.to_numpy(sparse(torch.randn(1, 1, 6, 6)))
    kept = first.copy()
    sparse(torch.randn(1, 1, 6, 6))
    np.testing.assert_array_equal(first, kept)


def test_nested_sequential_dropout_and_identity_are_walked():
    net = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Dropout(0.5)),
                        nn.Identity(), nn.Linear(32, 10))
    model = masked(net, 0.8)
    sparse = SparseNet.from_masked(model, "scipy")
    assert set(sparse.layers) == {"1.0", "3"} == set(model.masked_layers())
    assert_matches_dense(model, sparse, mnist_batch())


def test_conversion_leaves_the_masked_net_unchanged():
    model = masked(SimpleNet(), 0.9).train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    SparseNet.from_masked(model, "scipy")
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def tiny_net_with_known_masks() -> MaskedNet:
    """conv 1->2 (3x3, bias) -> flatten -> linear 8->3 (no bias), with hand-set masks."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 2 * 2, 3, bias=False))
    model = masked(net, 0.5)
    conv_mask = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    conv_mask[0, 0, 0, 0] = conv_mask[1, 0, 0, 0] = conv_mask[1, 0, 2, 2] = True  # 3 active, columns {0, 8}
    linear_mask = torch.zeros(3, 8, dtype=torch.bool)
    linear_mask[0, :5] = linear_mask[2, 7] = True  # 6 active, row 1 empty
    with torch.no_grad():
        for layer, mask in zip(model.masked_layers().values(), (conv_mask, linear_mask), strict=True):
            layer.mask.copy_(mask)
            layer.weight.mul_(mask)
    return model


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_memory_report_matches_a_hand_count(backend):
    model = tiny_net_with_known_masks()
    report = memory_report(model, SparseNet.from_masked(model, backend))
    # dense: float32 weights + bool mask (1 byte each) + float32 bias
    conv_dense, linear_dense = 18 * 4 + 18 * 1 + 2 * 4, 24 * 4 + 24 * 1
    # sparse: values and column indices per active weight (int32, or 16-bit for numba), int32 row
    # pointers (rows + 1) and the bias; a one-channel conv with every output channel active keeps no
    # index tables
    index_bytes = 2 if backend == "numba" else 4
    conv_sparse = 3 * (4 + index_bytes) + 3 * 4 + 2 * 4
    linear_sparse = 6 * (4 + index_bytes) + 4 * 4
    assert report["layers"] == {
        "0": {"shape": [2, 9], "nnz": 3, "dense_bytes": conv_dense, "sparse_bytes": conv_sparse},
        "2": {"shape": [3, 8], "nnz": 6, "dense_bytes": linear_dense, "sparse_bytes": linear_sparse},
    }
    assert report["dense_bytes"] == conv_dense + linear_dense
    assert report["sparse_bytes"] == conv_sparse + linear_sparse
    assert report["ratio"] == pytest.approx((conv_dense + linear_dense) / (conv_sparse + linear_sparse))
    assert_matches_dense(model, SparseNet.from_masked(model, backend), torch.randn(3, 1, 4, 4))


def test_memory_report_at_95_percent():
    model = masked(SimpleNet(), 0.95)
    report = memory_report(model, SparseNet.from_masked(model, "scipy"))
    # 8 bytes per active weight against 5 per weight: 12.5x is the ceiling for int32-indexed CSR
    assert 11.5 < report["ratio"] < 12.5
    assert sum(layer["nnz"] for layer in report["layers"].values()) == sum(
        layer.active_count for layer in model.masked_layers().values())


@pytest.mark.parametrize("load_backend", CPU_BACKENDS)
def test_save_and_load_round_trip(tmp_path, load_backend):
    model = masked(SimpleNet(), 0.9)
    with torch.no_grad():
        layer = model.masked_layers()["fc3"]
        layer.weight.view(-1)[layer.mask.flatten().nonzero()[:10].flatten()] = 0.0  # explicit zeros
    sparse = SparseNet.from_masked(model, "scipy")
    path = tmp_path / "model.npz"
    size = sparse.save(path)
    assert size == path.stat().st_size
    loaded = SparseNet.load(path, load_backend)
    for name, layer in model.masked_layers().items():
        assert loaded.nnz(name) == layer.active_count
    inputs = mnist_batch()
    assert_close_to_scale(loaded.to_numpy(loaded(inputs)), sparse.to_numpy(sparse(inputs)), 1e-6)
    assert_matches_dense(model, loaded, inputs)
    report = memory_report(model, sparse)
    assert size < report["sparse_bytes"] < report["dense_bytes"]
    plain = tmp_path / "plain.npz"
    assert size < sparse.save(plain, compress=False) < report["sparse_bytes"]  # 2-byte indices even unzipped
    reloaded = SparseNet.load(plain)
    np.testing.assert_array_equal(reloaded.to_numpy(reloaded(inputs)), sparse.to_numpy(sparse(inputs)))
    with np.load(path) as data:  # narrowest index types: 9 and <= 1568 columns, <= 65535 per layer
        assert {key for key in data.files if key.startswith("col_indices")} == {
            "col_indices_uint8", "col_indices_uint16"}


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match="scipy") as error:
        SparseNet.from_masked(masked(MLP(), 0.9), "numpy")
    for name in BACKENDS:
        assert name in str(error.value)


@pytest.mark.skipif(CUPY_GPU_AVAILABLE, reason="cupy and a GPU are present")
def test_cupy_backend_without_cupy_or_gpu_says_what_is_missing():
    with pytest.raises(RuntimeError, match="cupy"):
        SparseNet.from_masked(masked(MLP(), 0.9), "cupy")


def test_wrong_devices_are_refused():
    model = masked(MLP(), 0.9)
    with pytest.raises(ValueError, match="CPU"):
        SparseNet.from_masked(model, "scipy", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            SparseNet.from_masked(model, "torch", "cuda")


def test_not_a_masked_net_is_refused():
    with pytest.raises(TypeError, match="MaskedNet"):
        SparseNet.from_masked(MLP(), "scipy")


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.inner(x)


@pytest.mark.parametrize(("layer", "error", "named"), [
    (nn.BatchNorm2d(4), TypeError, "BatchNorm2d"),
    (nn.AvgPool2d(2), TypeError, "AvgPool2d"),
    (nn.Sigmoid(), TypeError, "Sigmoid"),
    (nn.MaxPool2d(2, stride=1), ValueError, "MaxPool2d"),
])
def test_unsupported_layers_are_named(layer, error, named):
    net = nn.Sequential(nn.Conv2d(1, 4, 3), layer, nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(error, match=rf"'1' \({named}\)") as raised:
        SparseNet.from_masked(masked(net, 0.5), "scipy")
    if error is TypeError:
        assert "MaskedConv2d" in str(raised.value)  # and the supported layers are listed


@pytest.mark.parametrize("conv", [nn.Conv2d(1, 4, 3, stride=2), nn.Conv2d(2, 4, 3, groups=2),
                                  nn.Conv2d(1, 4, 3, dilation=2), nn.Conv2d(1, 4, 3, padding=1,
                                                                            padding_mode="reflect")])
def test_unsupported_conv_settings_are_named(conv):
    with pytest.raises(ValueError, match=r"'0' \(MaskedConv2d\)"):
        SparseNet.from_masked(masked(nn.Sequential(conv), 0.5), "scipy")


def test_unmasked_linear_and_custom_containers_are_named():
    model = masked(nn.Sequential(nn.Flatten(), nn.Linear(4, 4)), 0.5)
    model.net.add_module("head", nn.Linear(4, 2))  # added after masking: a dense layer
    with pytest.raises(TypeError, match=r"'head' \(Linear\)"):
        SparseNet.from_masked(model, "scipy")
    with pytest.raises(TypeError, match=r"'0' \(Residual\)"):
        SparseNet.from_masked(masked(nn.Sequential(Residual()), 0.5), "scipy")


def test_wrong_input_shape_names_the_layer():
    sparse = SparseNet.from_masked(masked(MLP(), 0.9), "scipy")
    with pytest.raises(ValueError, match="fc1"):
        sparse(torch.randn(2, 1, 20, 20))


# ----------------------------------------------------------------------------- refused inputs

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_raw_integer_pixels_are_refused_like_the_torch_model_does(backend):
    model = masked(SimpleNet(), 0.9)
    pixels = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"Input type \(unsigned char\)"):
        model(pixels)  # the reference: torch refuses them
    sparse = SparseNet.from_masked(model, backend)
    for raw in (pixels, pixels.numpy(), pixels.numpy().astype(np.int64)):
        with pytest.raises(TypeError, match="floating-point inputs"):
            sparse(raw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("net_class", [SimpleNet, MLP])
def test_an_empty_batch_gives_an_empty_output(net_class, backend):
    model = masked(net_class(), 0.9)
    sparse = SparseNet.from_masked(model, backend)
    with torch.no_grad():
        expected = model(mnist_batch(0))
    outputs = sparse.to_numpy(sparse(mnist_batch(0)))
    assert outputs.shape == tuple(expected.shape) == (0, 10)
    with pytest.raises(ValueError, match="fc1"):  # the shapes are still checked
        sparse(torch.zeros(0, 1, 20, 20))


def test_memory_report_refuses_a_sparse_model_of_another_net():
    model, other = masked(SimpleNet(), 0.9, seed=0), masked(SimpleNet(), 0.9, seed=1)
    with pytest.raises(ValueError, match="does not hold this net's active weights"):
        memory_report(model, SparseNet.from_masked(other, "scipy"))
    with pytest.raises(ValueError, match="from_masked"):
        memory_report(masked(MLP(), 0.9), SparseNet.from_masked(model, "scipy"))


# ----------------------------------------------------------------------------- untrusted files

def saved_model(tmp_path) -> tuple[dict, dict]:
    """A small conv+linear model saved with SparseNet.save: (header, arrays) as read back from the file."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(2 * 4 * 4, 3))  # for 8x8 images
    path = tmp_path / "model.npz"
    SparseNet.from_masked(masked(net, 0.5), "scipy").save(path)
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    return json.loads(arrays.pop("header").tobytes()), arrays


def write(path, header: dict, arrays: dict):
    np.savez(path, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
    return path


def linear_entry(header: dict) -> dict:
    return next(layer for layer in header["weights"] if layer["name"] == "4")


def conv_step(header: dict) -> dict:
    return next(step for step in header["architecture"] if step["kind"] == "conv")


def past_the_width(header, arrays):  # a column index past the layer's 32 columns
    arrays["col_indices_uint8"] = arrays["col_indices_uint8"].copy()
    arrays["col_indices_uint8"][-1] = 200


def huge_index(header, arrays):  # far outside: once a segfault on scipy
    linear_entry(header)["index_type"] = "uint32"
    layer_nnz = linear_entry(header)["nnz"]
    conv_nnz = arrays["col_indices_uint8"].size - layer_nnz
    columns = arrays["col_indices_uint8"][conv_nnz:].astype(np.uint32)
    columns[0] = 2**31
    arrays["col_indices_uint8"] = arrays["col_indices_uint8"][:conv_nnz]
    arrays["col_indices_uint32"] = columns


def giant_shape(header, arrays):  # (3, 10**12): a header shape no kernel can index
    linear_entry(header)["shape"] = [3, 10**12]


def falling_row_pointers(header, arrays):
    key = next(key for key in arrays if key.startswith("row_pointers"))
    arrays[key] = arrays[key].copy()
    arrays[key][1], arrays[key][2] = arrays[key][2], arrays[key][1] + 100


def nnz_beyond_the_arrays(header, arrays):
    linear_entry(header)["nnz"] += 5


def conv_shape_off_its_kernel(header, arrays):  # 2 channels x 3x3 would be 18 columns, the weight has 9
    conv_step(header)["in_channels"] = 2


def unsorted_columns(header, arrays):
    arrays["col_indices_uint8"] = arrays["col_indices_uint8"].copy()
    first_row_end = 3
    arrays["col_indices_uint8"][:first_row_end] = arrays["col_indices_uint8"][:first_row_end][::-1]


def unknown_step(header, arrays):
    header["architecture"].append({"kind": "softmax"})


def extra_array(header, arrays):
    arrays["payload"] = np.zeros(10)


def truncated_values(header, arrays):
    arrays["values"] = arrays["values"][:-1]


def wrong_value_type(header, arrays):
    arrays["values"] = arrays["values"].astype(np.float64)


# Each crafted file and the reason it must be refused for: another check refusing it would hide a missing one.
CORRUPTIONS = {
    past_the_width: r"layer '4': column indices must lie in \[0, 32\), got \[0, 200\]",
    huge_index: r"layer '4': column indices must lie in \[0, 32\), got \[0, 2147483648\]",
    giant_shape: r"shape .*layer '4'.* \[3, 1000000000000\]",
    falling_row_pointers: r"layer '0': row pointers must rise",
    # row pointers are read and checked first, against the entries the header declares
    nnz_beyond_the_arrays: r"layer '4': row pointers must rise from 0 to its \d+ entries",
    conv_shape_off_its_kernel: r"conv '0' has a weight of shape \(2, 9\), but 2 input channels and a 3x3 kernel "
                               r"make 18 columns",
    unsorted_columns: r"layer '0': column indices must rise strictly within each row",
    unknown_step: r"unknown kind 'softmax'",
    extra_array: r"the arrays \[.*'payload\.npy'.*\] are not the ones its header describes",
    truncated_values: r"array 'values' must be a 1-D float32 \.npy of 57 entries, got float32 of shape \(56,\)",
    wrong_value_type: r"array 'values' must be a 1-D float32 \.npy of 57 entries, got float64",
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda corrupt: corrupt.__name__)
def test_a_crafted_file_is_refused_before_any_matrix_is_built(tmp_path, corrupt, backend):
    header, arrays = saved_model(tmp_path)
    write(tmp_path / "intact.npz", header, arrays)
    SparseNet.load(tmp_path / "intact.npz", backend)  # the rewrite itself is faithful
    corrupt(header, arrays)
    with pytest.raises(ValueError, match=CORRUPTIONS[corrupt]):
        SparseNet.load(write(tmp_path / "crafted.npz", header, arrays), backend)


def test_files_that_are_not_sparse_models_are_named(tmp_path):
    np.save(tmp_path / "array.npy", np.arange(4))
    (tmp_path / "notes.txt").write_text("not a model\n")
    np.savez(tmp_path / "other.npz", weights=np.ones(3))
    np.savez(tmp_path / "other_format.npz", header=np.frombuffer(b'{"format": "something-else"}', dtype=np.uint8))
    np.savez(tmp_path / "bad_json.npz", header=np.frombuffer(b'{"format": ', dtype=np.uint8))
    cases = {"array.npy": r"not a \.npz archive \(it is a single \.npy array\)", "notes.txt": r"not a \.npz",
             "other.npz": r"no 'header' array \(its arrays: \['weights'\]\)",
             "other_format.npz": r"not a dst-truly-sparse-csr-2 file \(format 'something-else'\)",
             "bad_json.npz": "not valid JSON"}
    for name, match in cases.items():
        with pytest.raises(ValueError, match=match):
            SparseNet.load(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no such file: .*missing.npz"):
        SparseNet.load(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------- modules used twice

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_reused_relu_or_max_pool_is_run_at_every_place_it_is_used(backend):
    torch.manual_seed(0)
    relu, pool = nn.ReLU(), nn.MaxPool2d(2)
    mlp = masked(nn.Sequential(nn.Linear(12, 16), relu, nn.Linear(16, 16), relu, nn.Linear(16, 4)), 0.5)
    cnn = masked(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), relu, pool, nn.Conv2d(4, 4, 3, padding=1), relu, pool,
                               nn.Flatten(), nn.Linear(4 * 2 * 2, 3)), 0.5)
    for model, inputs in ((mlp, torch.randn(5, 12)), (cnn, torch.randn(5, 1, 8, 8))):
        sparse = SparseNet.from_masked(model, backend)
        assert [step["kind"] for step in sparse.architecture].count("relu") == 2
        assert_matches_dense(model, sparse, inputs)


def test_a_weighted_layer_used_twice_is_refused_naming_both_places():
    shared = nn.Linear(8, 8)
    model = masked(nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(8, 2)), 0.5)
    with pytest.raises(ValueError, match=r"'2' \(MaskedLinear\) is the module already used at '0'"):
        SparseNet.from_masked(model, "scipy")


class Doubling(nn.ReLU):
    """A ReLU subclass whose forward is something else: the converter cannot tell from the type."""

    def forward(self, x):
        return 2 * x


def test_conversion_checks_the_converted_model_against_the_masked_net():
    model = masked(nn.Sequential(nn.Linear(6, 8), Doubling(), nn.Linear(8, 3)), 0.5)
    with pytest.raises(ValueError, match="does not compute the masked net's function"):
        SparseNet.from_masked(model, "scipy")
    with pytest.raises(ValueError, match="does not compute the masked net's function"):
        SparseNet.from_masked(model, "scipy", example=torch.randn(3, 6))
    fine = masked(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), 0.5).train()
    SparseNet.from_masked(fine, "scipy")
    assert fine.training  # put back in its mode after the probe


# ----------------------------------------------------------------------------- memory a crafted file can take

def crafted_npz(path, header: dict, members: dict) -> str:
    """An .npz whose members declare ``shape`` in their .npy header but hold only ``data`` bytes."""
    import io
    import zipfile

    raw = json.dumps(header).encode()
    members = {"header": ((len(raw),), np.uint8, raw), **members}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, (shape, dtype, data) in members.items():
            buffer = io.BytesIO()
            np.lib.format.write_array_header_1_0(buffer, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                          "shape": shape})
            archive.writestr(f"{name}.npy", buffer.getvalue() + data)
    return path


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith(field + ":"))


def peak_mib(action) -> float:
    """How far this process's resident memory rose above where it was while ``action`` ran (or raised)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets the peak (VmHWM) to the current resident size
    except OSError as error:
        pytest.skip(f"cannot reset this process's peak memory on this platform: {error}")
    start = _status_mib("VmRSS")
    with contextlib.suppress(ValueError):  # a refused file still counts: what it took before the error
        action()
    return _status_mib("VmHWM") - start


LARGE_LAYER = {"format": "dst-truly-sparse-csr-2", "architecture": [{"kind": "linear", "name": "fc"}],
               "weights": [{"name": "fc", "shape": [16384, 16384], "nnz": 2**28, "index_type": "uint16",
                            "pointer_type": "uint32", "bias": False}]}


def valid_row_pointers(rows: int, nnz: int) -> bytes:
    return (np.arange(rows + 1, dtype=np.uint32) * (nnz // rows)).tobytes()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sizes_a_file_declares_are_not_allocated_before_its_data_is_there(tmp_path, backend):
    def members(declared):
        return {"values": (declared, np.float32, bytes(64)), "bias": ((0,), np.float32, b""),
                "col_indices_uint16": (declared, np.uint16, bytes(32)),
                "row_pointers_uint32": ((16385,), np.uint32, valid_row_pointers(16384, 2**28))}

    # .npy members declaring 4 PiB: numpy would try to allocate that before reading a byte.
    path = crafted_npz(tmp_path / "declares_4pib.npz", LARGE_LAYER, members((2**50,)))
    with pytest.raises(ValueError, match=r"must be a 1-D \w+ .npy of 268435456 entries, got \w+ of shape "
                                         r"\(1125899906842624,\)"):
        SparseNet.load(path, backend)
    # Declared as the header says (1 GiB of values), holding a few bytes: refused having allocated nothing.
    path = crafted_npz(tmp_path / "declares_1gib.npz", LARGE_LAYER, members((2**28,)))
    assert path.stat().st_size < 100_000
    assert peak_mib(lambda: SparseNet.load(path, backend)) < 32
    with pytest.raises(ValueError, match="holds 32 bytes, not 536870912"):
        SparseNet.load(path, backend)


def test_a_small_file_of_consistent_but_invalid_arrays_is_refused_before_its_values_are_read(tmp_path):
    nnz = 2**24  # 64 MiB of values and 32 MiB of column indices, all zero: they compress to 0.1 MiB
    header = {**LARGE_LAYER, "weights": [{**LARGE_LAYER["weights"][0], "nnz": nnz}]}
    path = crafted_npz(tmp_path / "zeros.npz", header, {
        "values": ((nnz,), np.float32, bytes(4 * nnz)), "bias": ((0,), np.float32, b""),
        "col_indices_uint16": ((nnz,), np.uint16, bytes(2 * nnz)),
        "row_pointers_uint32": ((16385,), np.uint32, valid_row_pointers(16384, nnz))})
    assert path.stat().st_size < 2**20
    with pytest.raises(ValueError, match="column indices must rise strictly within each row"):
        SparseNet.load(path)
    assert peak_mib(lambda: SparseNet.load(path)) < 120  # the column indices and a few masks over them


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_huge_declared_kernel_without_weights_takes_little_memory(tmp_path, backend):
    columns = 16 * 1024 * 1024
    header = {"format": "dst-truly-sparse-csr-2",
              "architecture": [{"kind": "conv", "name": "conv", "in_channels": 16, "kernel_size": [1024, 1024],
                                "padding": [0, 0]}],
              "weights": [{"name": "conv", "shape": [1, columns], "nnz": 0, "index_type": "uint32",
                           "pointer_type": "uint8", "bias": False}]}
    path = crafted_npz(tmp_path / "kernel.npz", header, {
        "values": ((0,), np.float32, b""), "bias": ((0,), np.float32, b""),
        "col_indices_uint32": ((0,), np.uint32, b""), "row_pointers_uint8": ((2,), np.uint8, bytes(2))})
    assert path.stat().st_size < 2_000
    SparseNet.load(path, backend)  # a valid (if useless) model
    assert peak_mib(lambda: SparseNet.load(path, backend)) < 64


def test_a_deeply_nested_header_is_refused_with_a_value_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    np.savez(tmp_path / "deep.npz", header=np.frombuffer(
        b'{"format": "dst-truly-sparse-csr-2", "architecture": ' + deep.encode() + b"}", dtype=np.uint8))
    with pytest.raises(ValueError, match="nested 100001 levels deep, more than the 32 allowed"):
        SparseNet.load(tmp_path / "deep.npz")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_converted_to_float32(backend, dtype):
    model = masked(MLP(12, (8,), 3), 0.5)
    sparse = SparseNet.from_masked(model, backend)
    inputs = torch.randn(4, 12).to(dtype)
    assert_matches_dense(model, sparse, inputs.float())
    np.testing.assert_array_equal(sparse.to_numpy(sparse(inputs)), sparse.to_numpy(sparse(inputs.float())))
