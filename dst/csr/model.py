"""Truly sparse inference: a MaskedNet converted to sparse layers and run entirely in their formats.

Each masked layer becomes a layer of one kind (``dst.csr.kinds``): CSR by default, condensed
constant fan-in or block-sparse rows where its mask has that structure and ``layout`` asks
for it (or, under "auto", its pattern says so). What follows says CSR; the other kinds
run the same way with their own arrays.

``SparseNet`` is built from the plain-data description of ``dst.csr.convert`` (or
read from a file, ``dst.csr.npz``) and compiles the layer chain into steps
(``dst.csr.steps``) that keep activations batch-last and fold a max-pool right after
a conv, and the ReLUs after a conv or linear, into that layer. It runs on one of four
backends (``dst.csr.backends``): ``scipy`` (numpy + scipy.sparse, CPU) and ``cupy``
(cupy + cupyx.scipy.sparse, GPU) are the same code written against an array module,
so the CPU tests run the code the GPU runs; ``torch`` (torch.sparse_csr, CPU or CUDA)
is a thin adapter with the same methods; ``numba`` (CPU, the fastest there) swaps in
its own conv and linear steps (``dst.csr.numba_backend``): compiled loops straight on
the CSR weights, with 16-bit column indices. The engine keeps per-input-shape work
buffers, so a ``SparseNet`` must not be called from two threads at once.
"""

import math

import numpy as np
import torch

from dst.csr.backends import get_backend
from dst.csr.convert import describe
from dst.csr.kinds import KINDS, WeightedKind
from dst.csr.npz import check_model, read_npz, write_npz
from dst.engine.masked import MaskedNet
from dst.engine.masked_layers import MaskedLayer

# ----------------------------------------------------------------------------- the model

class SparseNet:
    """A MaskedNet's layer chain, run with every weight held in its layer kind's sparse format (CSR by default).

    Build one with ``SparseNet.from_masked(masked_net, backend, device)`` or
    ``SparseNet.load(path, backend, device)``. Calling it takes a batch shaped like
    the torch model's input, ``(N, C, H, W)`` or ``(N, F)`` (numpy, torch or the
    backend's own array of floats, normalised like the training data; it is
    converted to float32 on the backend's device), and returns the ``(N, classes)``
    output as the backend's array. The architecture and weights are checked
    (``dst.csr.npz.check_model``) before any matrix is built.
    """

    def __init__(self, architecture: list[dict], weights: dict[str, dict], backend: str = "scipy",
                 device=None):
        check_model(architecture, weights)
        self.backend, self.architecture = backend, architecture
        self.ops = get_backend(backend, device)
        self.layers: dict[str, object] = {}  # each weighted layer's step
        self.kinds: dict[str, WeightedKind] = {}  # and its kind
        self.steps = self._compile(architecture, weights)
        self._buffers: dict[tuple, list] = {}

    @classmethod
    def from_masked(cls, masked_net: MaskedNet, backend: str = "scipy", device=None,
                    example=None, layout="auto") -> "SparseNet":
        """Convert ``masked_net`` (left unchanged) to sparse steps on ``backend`` ("scipy", "numba", "cupy" or
        "torch"), each masked layer of the kind ``layout`` picks (``dst.csr.convert.describe``: "auto" follows
        each layer's pattern, CSR where it has none).

        The converted model is checked against ``masked_net`` (in eval mode) on a probe batch
        before it is returned: ``example`` (a few inputs), or random inputs shaped for its first
        layer; ValueError if they compute different functions (a forward that is not the chain
        of its nn.Sequential layers) or if no input shape can be inferred (pass ``example``).
        """
        architecture, weights = describe(masked_net, layout)
        model = cls(architecture, weights, backend, device)
        model._check_computes(masked_net, model._probe_input() if example is None else example)
        return model

    def _probe_input(self) -> torch.Tensor:
        """Two random inputs the layer chain accepts: (2, features), or (2, C, H, W) for the first size that fits
        (squares up to 256, then rectangles up to 64 x 64)."""
        generator = torch.Generator().manual_seed(0)
        kinds = [KINDS[step["kind"]] for step in self.architecture]
        first = next((index for index, kind in enumerate(kinds) if kind.weighted), None)
        weighted = None if first is None else self.architecture[first]
        if weighted is not None and not any(kind.takes_images for kind in kinds[:first + 1]):
            return torch.randn(2, self.layers[weighted["name"]].in_features, generator=generator)
        if weighted is not None and kinds[first].takes_images:
            channels = weighted["in_channels"]
            sizes = [(size, size) for size in range(1, 257)] + [(height, width) for height in range(1, 65)
                                                                for width in range(1, 65) if height != width]
            for height, width in sizes:
                try:
                    self._output_shape((channels, height, width, 0))
                except ValueError:
                    continue
                return torch.randn(2, channels, height, width, generator=generator)
        raise ValueError("cannot infer an input shape to check the converted model against the masked net: "
                         "pass example= a few inputs it takes")

    def _output_shape(self, shape: tuple) -> tuple:
        """The batch-last output shape for input ``shape``; ValueError where a step refuses it or leaves nothing."""
        for step in self.steps:
            shape, _ = step.prepare(shape)
            if 0 in shape[:-1]:
                raise ValueError(f"an activation of shape {shape[:-1]} is empty")
        return shape

    def _check_computes(self, masked_net: MaskedNet, example) -> None:
        """Raise ValueError unless this model's outputs on ``example`` equal ``masked_net``'s (eval mode)."""
        parameter = next(masked_net.parameters())
        inputs = torch.as_tensor(example)
        modes = {module: module.training for module in masked_net.modules()}
        # The function its masks describe (what the CSR holds): where(mask, weight, 0) in the forward.
        masking = {layer: (layer.apply_mask, layer.mask_in_forward) for layer in masked_net.masked_layers().values()}
        try:
            masked_net.eval()
            for layer in masking:
                layer.apply_mask = layer.mask_in_forward = True
            with torch.no_grad():
                expected = masked_net(inputs.to(device=parameter.device, dtype=parameter.dtype))
        finally:
            for module, training in modes.items():
                module.training = training
            for layer, (apply_mask, mask_in_forward) in masking.items():
                layer.apply_mask, layer.mask_in_forward = apply_mask, mask_in_forward
        expected = expected.detach().float().cpu().numpy()
        got = self.to_numpy(self._forward(inputs.float()))  # not __call__: a check, not a use
        scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-3, atol=1e-3 * scale):
            difference = float(np.abs(got - expected).max()) if got.shape == expected.shape else math.inf
            raise ValueError(
                f"the converted model does not compute the masked net's function (outputs {got.shape} vs "
                f"{expected.shape}, max |difference| {difference:.3g} on a probe batch of {len(inputs)}): "
                "SparseNet runs the net's layers in the order nn.Sequential lists them, so a net whose "
                "forward does something else (a custom forward, a residual, a functional call) cannot be "
                "converted")

    def _compile(self, architecture: list[dict], weights: dict[str, dict]) -> list:
        """Steps to run: what folds into a layer (its ReLUs; a max-pool right after a conv) is its kind's call."""
        groups: list[tuple] = []  # (kind, its entry with what folded into it)
        for layer in architecture:
            if not (groups and groups[-1][0].absorb(groups[-1][1], layer)):
                groups.append((KINDS[layer["kind"]], dict(layer)))
        steps = []
        for kind, group in groups:
            name = group.get("name", "")
            step = kind.build(self.ops, group, weights.get(name) if kind.weighted else None)
            if kind.weighted:
                self.layers[name], self.kinds[name] = step, kind
            steps.append(step)
        self.ops.link(steps)
        return steps

    def __call__(self, x):
        """The forward pass: ``x`` (N, ...) -> (N, classes) as this backend's array."""
        return self._forward(x)

    forward = __call__

    def _forward(self, x):
        x = self.as_input(x)
        with self.ops.context():
            x = self.ops.batch_last(x)  # (..., N): the one transpose of the forward
            if x.shape[-1] == 0:  # an empty batch: the shapes are still checked, nothing is computed
                shape = tuple(x.shape)
                for step in self.steps:
                    shape, _ = step.prepare(shape)
                return self.ops.batch_first(self.ops.zeros(shape))
            buffers = self._buffers.get(x.shape) or self._prepare_for(x.shape)
            for step, step_buffers in zip(self.steps, buffers, strict=True):
                x = step(x, step_buffers)
            return self.ops.batch_first(x)

    def __repr__(self) -> str:
        layers = ", ".join(f"{name} {step.kind} {step.out_features}x{step.in_features} "
                           f"nnz={self.nnz(name)}"
                           for name, step in self.layers.items())
        return f"SparseNet(backend={self.backend!r}, {len(self.steps)} steps; {layers})"

    def _prepare_for(self, shape: tuple) -> list:
        if len(self._buffers) >= 4:  # a few batch sizes (e.g. a last partial batch) at most
            self._buffers.clear()
        buffers, current = [], tuple(shape)
        for step in self.steps:
            current, step_buffers = step.prepare(current)
            buffers.append(step_buffers)
        self._buffers[tuple(shape)] = buffers
        return buffers

    def as_input(self, x):
        """``x`` as this backend's float32 array on its device (what the forward consumes)."""
        dtype = getattr(x, "dtype", None)
        dtype = np.asarray(x).dtype if dtype is None else dtype
        floating = dtype.is_floating_point if isinstance(dtype, torch.dtype) else np.dtype(dtype).kind == "f"
        if not floating:
            raise TypeError(f"SparseNet takes floating-point inputs normalised like the training data, got "
                            f"{dtype}: convert and normalise raw pixels first (for MNIST, (x / 255 - 0.1307) "
                            "/ 0.3081); the torch model refuses them too")
        if isinstance(x, torch.Tensor) and x.dtype != torch.float32:
            x = x.float()  # bfloat16 and float16 too, which numpy (scipy, numba) cannot take
        return self.ops.as_input(x)

    def to_numpy(self, y) -> np.ndarray:
        return self.ops.to_numpy(y)

    def synchronize(self) -> None:
        """Wait for queued GPU work (no-op on the CPU)."""
        self.ops.synchronize()

    def nnz(self, name: str) -> int:
        """Number of stored (active) weights of layer ``name``."""
        return self.kinds[name].count(self.host_weights_of(name))

    def layer_bytes(self, name: str) -> int:
        """Bytes the engine holds for layer ``name``: its values and indices as its kind stores them (CSR
        values, column indices, row pointers; fan-in values and indices; blocks...), bias, and the small
        index tables of a conv."""
        return sum(int(array.nbytes) for array in self.kinds[name].held_arrays(self.ops, self.layers[name]))

    # ------------------------------------------------------------------------- file

    def host_weights(self) -> dict[str, dict]:
        """Each weighted layer's host arrays (its kind's, in the mask's column numbering): the file's content."""
        return {name: self.host_weights_of(name) for name in self.layers}

    def host_weights_of(self, name: str) -> dict:
        """Layer ``name``'s host arrays (``host_weights`` for one layer)."""
        return self.kinds[name].host_of(self.ops, self.layers[name])

    def save(self, path, compress: bool = True) -> int:
        """Write the model to one ``.npz`` file (zip-deflated unless ``compress=False``); returns its size in bytes.

        See ``dst.csr.npz``: flat arrays shared by all layers and a JSON header; column
        indices and row pointers in the narrowest unsigned type that holds them.
        """
        return write_npz(path, self.architecture, self.host_weights(), compress)

    @classmethod
    def load(cls, path, backend: str = "scipy", device=None) -> "SparseNet":
        """Read a model written by ``save`` onto ``backend``, validating everything in the file first.

        Raises ValueError for a file that is not such a model (another archive, a
        ``.npy``, text) or that is inconsistent (indices outside a layer, sizes that
        disagree with the header or the architecture): no matrix is built from it.
        """
        architecture, weights = read_npz(path)
        return cls(architecture, weights, backend, device)


# ----------------------------------------------------------------------------- memory

def memory_report(masked_net: MaskedNet, sparse_model: SparseNet) -> dict:
    """Bytes of the masked dense model against the truly sparse one, in total and per layer.

    Dense counts what the masked model holds: weights, the bool mask (1 byte per
    weight) and biases. Sparse counts what ``sparse_model``'s backend really holds for
    each layer's kind: CSR values, column indices and row pointers (fan_in: its (out, k)
    values and indices; bsr: its blocks, block columns and block row pointers) in that
    backend's types (int32 or int64 for scipy, cupy and torch, whose kernels need it;
    16-bit column indices for numba where a layer has at most 65,536 columns), biases,
    and the small index tables of the im2col convs (gathered channels, active output
    channels). Activations and work buffers are
    left out of both. ``ratio`` is dense / sparse; ``plain_dense_bytes`` is the same layers
    without masks (a plain dense model). Returns ``{'backend', 'dense_bytes', 'sparse_bytes',
    'plain_dense_bytes', 'ratio', 'layers': {name: {'shape': [out, in], 'nnz', 'dense_bytes',
    'sparse_bytes'}}}``.
    """
    _check_converted_from(masked_net, sparse_model)
    layers = {}
    for name, layer in masked_net.masked_layers().items():
        dense = layer.weight.nbytes + layer.mask.nbytes + (0 if layer.bias is None else layer.bias.nbytes)
        layers[name] = {"shape": [int(layer.weight.shape[0]), int(layer.weight[0].numel())],
                        "nnz": sparse_model.nnz(name), "dense_bytes": dense,
                        "sparse_bytes": sparse_model.layer_bytes(name)}
    dense_bytes = sum(layer["dense_bytes"] for layer in layers.values())
    sparse_bytes = sum(layer["sparse_bytes"] for layer in layers.values())
    # The same net without its masks: what a plain dense model of these layers holds.
    plain = sum(layer.weight.nbytes + (0 if layer.bias is None else layer.bias.nbytes)
                for layer in masked_net.masked_layers().values())
    return {"backend": sparse_model.backend, "dense_bytes": dense_bytes, "sparse_bytes": sparse_bytes,
            "plain_dense_bytes": plain, "ratio": dense_bytes / sparse_bytes, "layers": layers}


def _check_converted_from(masked_net: MaskedNet, sparse_model: SparseNet) -> None:
    """Raise unless ``sparse_model`` holds exactly ``masked_net``'s layers, shapes and masks."""
    hint = "; convert it again with SparseNet.from_masked(masked_net)"
    modules = dict(masked_net.net.named_modules(remove_duplicate=False))
    for name in sparse_model.layers:
        if not isinstance(modules.get(name), MaskedLayer):
            raise ValueError(f"the sparse model's layer {name!r} is not a masked layer of this net{hint}")
    for name, layer in masked_net.masked_layers().items():
        if name not in sparse_model.layers:
            raise ValueError(f"the sparse model has no layer {name!r}: was it converted from this net?{hint}")
        mask = layer.mask_2d()
        stored = sparse_model.kinds[name].active_mask(sparse_model.host_weights_of(name))
        if stored.shape != mask.shape or not np.array_equal(stored, mask):
            raise ValueError(f"layer {name!r} of the sparse model does not hold this net's active weights "
                             f"({int(stored.sum())} of a {stored.shape} matrix vs {int(mask.sum())} of "
                             f"{mask.shape}){hint}")
