"""Truly sparse training of an MLP on the CPU: no dense weight, gradient or optimizer state, ever.

The masked layers of ``dst.engine.masked`` simulate sparsity and save nothing. Here,
as in SET (Mocanu et al. 2018) and "Truly Sparse Neural Networks at Scale"
(Curci, Mocanu and Pechenizkiy 2021), every weight matrix is a CSR structure
(``dst.csr.linear.SparseLinear``) holding only its active weights and their
optimizer state, so the cost of a step and the memory both scale with the
number of active weights instead of with the width squared. The DST topology
update is the simulated engine's rule (``dst.engine.update_rule``), run on those
structures directly, and ``dst.engine.schedule.DSTScheduler`` decides when it runs
(``SparseMLPStep`` is this engine's step).

``SparseMLP.from_masked`` and ``SparseMLP.to_masked`` convert to and from a
``MaskedNet(MLP(...))``, which is how the tests check that one step here
equals one step of the masked torch network with a torch optimizer.
``dst.csr.comparison`` runs both on the same data and reports comparable metrics.
"""

import time
from itertools import pairwise

import numpy as np
import torch

from dst.core.checks import check_data, check_hidden, check_positive_int, class_labels, is_positive_int
from dst.core.models import MLP
from dst.core.progress import Progress
from dst.csr.backends import get_backend, require_training
from dst.csr.linear import SparseLinear, trainable_regrow
from dst.csr.memory import check_fits, training_bytes
from dst.csr.optimizers import OPTIMIZERS, OptimizerConfig
from dst.engine.allocation import active_count, check_sparsity, layer_densities
from dst.engine.masked import MaskedNet
from dst.engine.masked_layers import MaskedLinear
from dst.engine.schedule import DSTConfig, DSTScheduler
from dst.engine.update_rule import LayerUpdate, RandomSource, RegrowCriterion, check_prune_ratio

DEFAULT_OPTIMIZER = OptimizerConfig()

# SET-style topology updates for one-epoch MNIST runs (~470 steps of 128): 4 updates, each
# moving 20% of every layer's connections. Regrown weights start at zero (see dst.engine.prune_regrow).
SET_DST = DSTConfig(prune_ratio=0.2, regrow="random", every=100, unit="step")


class SparseMLP:
    """An MLP (ReLU between layers, softmax cross-entropy) whose weights are ``SparseLinear`` layers.

    Layers are named ``fc1``, ``fc2``, ... like ``dst.core.models.MLP``'s. ``rng`` (a
    numpy Generator from ``seed``, an int or a Generator) drives the initial topology
    and values, the batch order in ``fit`` and the random regrowth, so a seed
    reproduces a run.
    """

    def __init__(self, layers: list[SparseLinear], optimizer: OptimizerConfig = DEFAULT_OPTIMIZER,
                 seed: int | np.random.Generator = 0):
        if not layers:
            raise ValueError("a SparseMLP needs at least one layer")
        for previous, layer in pairwise(layers):
            if previous.shape[0] != layer.shape[1]:
                raise ValueError(f"layer shapes do not chain: {previous.shape} then {layer.shape}")
        self.layers = {f"fc{index}": layer for index, layer in enumerate(layers, start=1)}
        self.ops = layers[0].ops
        self.optimizer = optimizer
        self.rng = np.random.default_rng(seed)
        self.steps = 0
        for layer in layers:
            for name in optimizer.state_names:
                layer.state.setdefault(name, self.ops.xp.zeros_like(layer.weight))
                layer.bias_state.setdefault(name, self.ops.xp.zeros_like(layer.bias))

    @classmethod
    def random(cls, in_features: int = 784, hidden: tuple[int, ...] = (1000, 1000), num_classes: int = 10,
               sparsity: float = 0.99, allocation: str = "erk", optimizer: OptimizerConfig = DEFAULT_OPTIMIZER,
               seed: int = 0, backend: str | None = None) -> "SparseMLP":
        """A freshly initialised sparse MLP; its densities come from ``layer_densities``.

        A ``MemoryError`` before anything is allocated if training it would not fit in the
        memory available (``dst.csr.memory``), stating what it needs and what there is.
        """
        check_sparsity(sparsity)
        widths = (in_features, *check_hidden(hidden), num_classes)
        if not all(is_positive_int(width) for width in widths):
            raise ValueError(f"layer widths must be positive ints, got {widths}")
        shapes = {f"fc{i}": (fan_out, fan_in) for i, (fan_in, fan_out)
                  in enumerate(pairwise(widths), start=1)}
        densities = layer_densities(shapes, sparsity, allocation)
        ops = get_backend(backend)
        counts = [(shape, active_count(shape[0] * shape[1], densities[name])) for name, shape in shapes.items()]
        products = require_training(ops)
        needed = training_bytes(counts, len(optimizer.state_names), products.keeps_rows,
                                getattr(products.matrix, "most_bytes", None))
        check_fits(needed, f"a SparseMLP {'-'.join(map(str, widths))} at {sparsity:.4g} sparsity "
                           f"({sum(count for _, count in counts):,} active weights)")
        rng = np.random.default_rng(seed)
        layers = [SparseLinear.random(*shape, densities[name], rng, ops)
                  for name, shape in shapes.items()]
        return cls(layers, optimizer, rng)  # the same stream goes on into training

    @classmethod
    def from_masked(cls, masked_net: MaskedNet, optimizer: OptimizerConfig = DEFAULT_OPTIMIZER,
                    seed: int = 0, backend: str | None = None) -> "SparseMLP":
        """The same network (weights, masks, biases) as a ``MaskedNet(MLP(...))``; fresh optimizer state."""
        if not isinstance(masked_net, MaskedNet) or not isinstance(masked_net.net, MLP):
            raise TypeError(f"from_masked needs a MaskedNet(MLP(...)), got {type(masked_net).__name__}")
        ops = get_backend(backend)
        layers = []
        for layer in masked_net.masked_layers().values():
            if not isinstance(layer, MaskedLinear) or layer.bias is None:
                raise TypeError("from_masked supports MaskedLinear layers with a bias only")
            mask = layer.mask.detach().cpu().reshape(-1)
            positions = mask.nonzero().squeeze(1).numpy().astype(np.int64)
            weight = layer.weight.detach().cpu().reshape(-1)[mask].numpy()
            layers.append(SparseLinear(tuple(layer.weight.shape), positions, weight,
                                       layer.bias.detach().cpu().numpy(), ops))
        return cls(layers, optimizer, seed)

    def to_masked(self) -> MaskedNet:
        """The equivalent ``MaskedNet(MLP(...))`` (dense tensors: for small nets only)."""
        shapes = [layer.shape for layer in self.layers.values()]
        mlp = MLP(shapes[0][1], tuple(shape[0] for shape in shapes[:-1]), shapes[-1][0])
        total = sum(shape[0] * shape[1] for shape in shapes)
        sparsity = 1.0 - sum(self.active_counts().values()) / total
        masked_net = MaskedNet(mlp, sparsity=sparsity, scale_init=False)  # masks replaced below
        with torch.no_grad():
            for name, masked in masked_net.masked_layers().items():
                dense = torch.from_numpy(self.layers[name].to_dense())
                masked.weight.copy_(dense)
                masked.mask.zero_().view(-1)[torch.from_numpy(self.layers[name].positions())] = True
                masked.bias.copy_(torch.from_numpy(self.ops.to_numpy(self.layers[name].bias)))
        return masked_net

    def _forward(self, inputs) -> list:
        """Activations of every layer, feature-major (features, batch); the last is the logits."""
        activations = [inputs]
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers.values()):
            activations.append(layer.forward(activations[-1], relu=index < last))
        return activations

    def _features(self, x):
        """(batch, ...) images or features as a feature-major float32 array on the backend."""
        features = host_array(x, np.float32).reshape(len(x), -1)
        in_features = next(iter(self.layers.values())).shape[1]
        if features.shape[1] != in_features:
            raise ValueError(f"inputs have {features.shape[1]} features per sample, "
                             f"the net takes {in_features}")
        return self.ops.asarray(np.ascontiguousarray(features.T))

    def predict(self, x):
        """Logits (batch, classes) as a host numpy array."""
        return self.ops.to_numpy(self._forward(self._features(x))[-1]).T.copy()  # not the layer's buffer

    def train_step(self, x, y) -> float:
        """One optimizer step on the batch (x, y); returns its mean cross-entropy loss."""
        xp = self.ops.xp
        targets = class_labels(y, len(x), self._num_classes())
        activations = self._forward(self._features(x))
        logits = activations[-1]  # (classes, batch)
        shifted = logits - logits.max(axis=0, keepdims=True)
        log_normaliser = xp.log(xp.exp(shifted).sum(axis=0, keepdims=True))
        columns = xp.arange(len(targets))
        targets_device = self.ops.asarray(targets)
        loss = float((log_normaliser[0] - shifted[targets_device, columns]).mean())
        grad = xp.exp(shifted - log_normaliser)
        grad[targets_device, columns] -= 1.0
        grad /= len(targets)
        self.steps += 1
        update = OPTIMIZERS[self.optimizer.name].update
        layers = list(self.layers.values())
        for index in range(len(layers) - 1, -1, -1):
            layer = layers[index]
            # every input but the data came out of a ReLU: its gradient comes back through it
            grad_inputs = layer.backward(grad, activations[index], need_input_grad=index > 0, relu_input=index > 0)
            update(self.optimizer, layer.weight, layer.weight_grad, layer.state, self.steps)
            update(self.optimizer, layer.bias, layer.bias_grad, layer.bias_state, self.steps)
            grad = grad_inputs
        return loss

    def update_topology(self, prune_ratio: float, regrow: str = "random",
                        random: RandomSource = None) -> dict[str, LayerUpdate]:
        """One DST step on every layer (``SparseLinear.prune_and_regrow``), drawing from ``random`` or ``self.rng``."""
        check_prune_ratio(prune_ratio)
        random = self.rng if random is None else random
        return {name: layer.prune_and_regrow(prune_ratio, random, regrow) for name, layer in self.layers.items()}

    def fit(self, x, y, epochs: int = 1, batch_size: int = 128, dst: DSTConfig | None = SET_DST,
            max_batches: int | None = None, progress: bool = False) -> dict:
        """Shuffled mini-batch training with DST updates; returns the loss history and timings.

        ``dst=None`` keeps the topology fixed; ``max_batches`` caps each epoch (quick runs),
        like ``dst.core.data.TensorLoader``'s. The updates come from a ``DSTScheduler``, as for
        the masked net; its step count continues this model's. ``progress``: a line counting steps.
        """
        check_positive_int(epochs=epochs, batch_size=batch_size)
        if max_batches is not None:
            check_positive_int(max_batches=max_batches)
        if dst is not None:
            trainable_regrow(dst.regrow)  # refused before training, not at the first update
        labels = check_data(x, y, "training", self._num_classes())
        features = host_array(x, np.float32).reshape(len(x), -1)
        history = {"epoch_losses": [], "dst_updates": 0, "update_time_s": 0.0}
        scheduler = None if dst is None else DSTScheduler(dst, SparseMLPStep(self, dst.regrow), steps=self.steps)

        def timed(update, *args) -> None:
            started = time.perf_counter()
            if update(*args) is not None:
                history["update_time_s"] += time.perf_counter() - started
                history["dst_updates"] += 1

        start, steps_before = time.perf_counter(), self.steps
        per_epoch = len(range(0, len(features), batch_size)[:max_batches])
        bar = Progress(epochs * per_epoch, "truly sparse training steps", enabled=progress)
        for _ in range(epochs):
            order = self.rng.permutation(len(features))
            losses = []
            for begin in range(0, len(order), batch_size)[:max_batches]:
                batch = order[begin:begin + batch_size]
                losses.append(self.train_step(features[batch], labels[batch]))
                bar.update()
                if scheduler is not None:
                    timed(scheduler.after_step)
            if losses:
                history["epoch_losses"].append(float(np.mean(losses)))
            if scheduler is not None:
                timed(scheduler.after_epoch)
        history["train_time_s"] = time.perf_counter() - start
        bar.close()
        history["steps"] = self.steps - steps_before
        return history

    def warm_up(self, x, y) -> float:
        """Compile (or load) every kernel a step, a SET update and a prediction use; returns seconds.

        It trains a small twin (same depth, backend and optimizer; width 8) on (x, y), so this
        model and its random stream are unchanged. Call it before timing: numba compiles on
        first call, and a timing that includes it can read "2x slower" where the warm engine
        is many times faster.
        """
        started = time.perf_counter()
        twin = SparseMLP.random(self.layers["fc1"].shape[1], (8,) * (len(self.layers) - 1),
                                next(reversed(self.layers.values())).shape[0], sparsity=0.5,
                                allocation="uniform", optimizer=self.optimizer, backend=self.ops.name)
        features = host_array(x, np.float32).reshape(len(x), -1)
        twin.train_step(features, host_array(y, np.int64).reshape(-1))
        twin.update_topology(0.1)
        twin.predict(features)
        warm_up_parallel = getattr(self.ops.training.matrix, "warm_up", None)  # numba's wide-layer kernels
        if warm_up_parallel is not None:
            warm_up_parallel()
        return time.perf_counter() - started

    def evaluate(self, x, y, batch_size: int = 1000) -> float:
        """Accuracy in % on (x, y)."""
        labels = check_data(x, y, "evaluation", self._num_classes())
        correct = sum(int((self.predict(x[begin:begin + batch_size]).argmax(axis=1)
                           == labels[begin:begin + batch_size]).sum())
                      for begin in range(0, len(labels), batch_size))
        return 100.0 * correct / len(labels)

    def _num_classes(self) -> int:
        return next(reversed(self.layers.values())).shape[0]

    def nbytes(self) -> int:
        """Bytes held between steps by weights, indices, gradients and optimizer state."""
        return sum(layer.nbytes() for layer in self.layers.values())

    def active_counts(self) -> dict[str, int]:
        """Number of active weights of each layer."""
        return {name: layer.active_count for name, layer in self.layers.items()}


class SparseMLPStep:
    """A ``SparseMLP``'s DST step as a ``TopologyUpdate`` for ``DSTScheduler`` (``SparseMLP.fit`` builds one).

    The optimizer state lives in the layers and is remapped by the step itself, so no optimizer or
    loss is given, and no batch is ever asked for: criteria that need the dense gradient (RigL) are
    refused here, when the step is built. ``random`` defaults to ``model.rng``.
    """

    needs_batch = False

    def __init__(self, model: SparseMLP, regrow: str | RegrowCriterion = "random", random: RandomSource = None):
        if not isinstance(model, SparseMLP):
            raise TypeError(f"SparseMLPStep needs a SparseMLP, got {type(model).__name__}")
        trainable_regrow(regrow)
        self.model, self.regrow, self.random = model, regrow, random

    def __call__(self, prune_ratio: float, batch=None) -> dict[str, LayerUpdate]:
        return self.model.update_topology(prune_ratio, self.regrow, self.random)

    def close(self) -> None:
        """Nothing to release."""


def host_array(values, dtype) -> np.ndarray:
    """``values`` (a torch tensor or anything array-like) as a host numpy array of ``dtype``."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)
