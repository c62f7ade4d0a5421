"""Truly sparse training of an MLP on the CPU: no dense weight, gradient or optimizer state, ever.

The masked layers of ``dst.masked`` simulate sparsity and save nothing. Here,
as in SET (Mocanu et al. 2018) and "Truly Sparse Neural Networks at Scale"
(Curci, Mocanu and Pechenizkiy 2021), every weight matrix is a CSR structure
(``dst.csr.linear.SparseLinear``) holding only its active weights and their
optimizer state, so the cost of a step and the memory both scale with the
number of active weights instead of with the width squared. The DST topology
update (magnitude prune, random regrow) runs on those structures directly.

``SparseMLP.from_masked`` and ``SparseMLP.to_masked`` convert to and from a
``MaskedNet(MLP(...))``, which is how the tests check that one step here
equals one step of the masked torch network with a torch optimizer.
``train_sparse_mlp`` and ``train_masked_mlp`` run both on the same data and
report comparable metrics.
"""

import copy
import numbers
import time
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F

from dst.allocation import check_sparsity, layer_densities
from dst.csr.linear import OPTIMIZERS, OptimizerConfig, SparseLinear, get_backend
from dst.data import TensorLoader
from dst.masked import MaskedNet
from dst.masked_layers import MaskedLinear
from dst.models import MLP
from dst.prune_regrow import LayerUpdate, apply_dst_step, check_prune_ratio
from dst.schedule import DSTConfig, DSTScheduler
from dst.training import evaluate, train_epoch

DEFAULT_OPTIMIZER = OptimizerConfig()
NUM_CLASSES = 10  # MNIST; the trainers below are for the tutorial's data

# SET-style topology updates for one-epoch MNIST runs (~470 steps of 128): 4 updates, each
# moving 20% of every layer's connections. Regrown weights start at zero (see dst.prune_regrow).
SET_DST = DSTConfig(prune_ratio=0.2, regrow="random", every=100, unit="step")


class SparseMLP:
    """An MLP (ReLU between layers, softmax cross-entropy) whose weights are ``SparseLinear`` layers.

    Layers are named ``fc1``, ``fc2``, ... like ``dst.models.MLP``'s. ``rng`` (a
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
        self.backend = layers[0].backend
        self.optimizer = optimizer
        self.rng = np.random.default_rng(seed)
        self.steps = 0
        for layer in layers:
            for name in optimizer.state_names:
                layer.state.setdefault(name, self.backend.xp.zeros_like(layer.weight))
                layer.bias_state.setdefault(name, self.backend.xp.zeros_like(layer.bias))

    @classmethod
    def random(cls, in_features: int = 784, hidden: tuple[int, ...] = (1000, 1000), num_classes: int = 10,
               sparsity: float = 0.99, allocation: str = "erk", optimizer: OptimizerConfig = DEFAULT_OPTIMIZER,
               seed: int = 0, backend: str | None = None) -> "SparseMLP":
        """A freshly initialised sparse MLP; its densities come from ``layer_densities``."""
        check_sparsity(sparsity)
        widths = (in_features, *_check_hidden(hidden), num_classes)
        if not all(_is_positive_int(width) for width in widths):
            raise ValueError(f"layer widths must be positive ints, got {widths}")
        shapes = {f"fc{i}": (fan_out, fan_in) for i, (fan_in, fan_out)
                  in enumerate(pairwise(widths), start=1)}
        densities = layer_densities(shapes, sparsity, allocation)
        array_backend = get_backend(backend)
        rng = np.random.default_rng(seed)
        layers = [SparseLinear.random(*shape, densities[name], rng, array_backend)
                  for name, shape in shapes.items()]
        return cls(layers, optimizer, rng)  # the same stream goes on into training

    @classmethod
    def from_masked(cls, masked_net: MaskedNet, optimizer: OptimizerConfig = DEFAULT_OPTIMIZER,
                    seed: int = 0, backend: str | None = None) -> "SparseMLP":
        """The same network (weights, masks, biases) as a ``MaskedNet(MLP(...))``; fresh optimizer state."""
        if not isinstance(masked_net, MaskedNet) or not isinstance(masked_net.net, MLP):
            raise TypeError(f"from_masked needs a MaskedNet(MLP(...)), got {type(masked_net).__name__}")
        array_backend = get_backend(backend)
        layers = []
        for layer in masked_net.masked_layers().values():
            if not isinstance(layer, MaskedLinear) or layer.bias is None:
                raise TypeError("from_masked supports MaskedLinear layers with a bias only")
            mask = layer.mask.detach().cpu().reshape(-1)
            positions = mask.nonzero().squeeze(1).numpy().astype(np.int64)
            weight = layer.weight.detach().cpu().reshape(-1)[mask].numpy()
            layers.append(SparseLinear(tuple(layer.weight.shape), positions, weight,
                                       layer.bias.detach().cpu().numpy(), array_backend))
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
                masked.bias.copy_(torch.from_numpy(self.backend.to_host(self.layers[name].bias)))
        return masked_net

    def _forward(self, inputs) -> list:
        """Activations of every layer, feature-major (features, batch); the last is the logits."""
        activations = [inputs]
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers.values()):
            outputs = layer.forward(activations[-1])
            if index < last:
                self.backend.xp.maximum(outputs, 0, out=outputs)
            activations.append(outputs)
        return activations

    def _features(self, x):
        """(batch, ...) images or features as a feature-major float32 array on the backend."""
        features = _to_numpy(x, np.float32).reshape(len(x), -1)
        in_features = next(iter(self.layers.values())).shape[1]
        if features.shape[1] != in_features:
            raise ValueError(f"inputs have {features.shape[1]} features per sample, "
                             f"the net takes {in_features}")
        return self.backend.from_host(np.ascontiguousarray(features.T))

    def predict(self, x):
        """Logits (batch, classes) as a host numpy array."""
        return self.backend.to_host(self._forward(self._features(x))[-1]).T

    def train_step(self, x, y) -> float:
        """One optimizer step on the batch (x, y); returns its mean cross-entropy loss."""
        xp = self.backend.xp
        targets = _labels(y, len(x), self._num_classes())
        activations = self._forward(self._features(x))
        logits = activations[-1]  # (classes, batch)
        shifted = logits - logits.max(axis=0, keepdims=True)
        log_normaliser = xp.log(xp.exp(shifted).sum(axis=0, keepdims=True))
        columns = xp.arange(len(targets))
        targets_device = self.backend.from_host(targets)
        loss = float((log_normaliser[0] - shifted[targets_device, columns]).mean())
        grad = xp.exp(shifted - log_normaliser)
        grad[targets_device, columns] -= 1.0
        grad /= len(targets)
        self.steps += 1
        update = OPTIMIZERS[self.optimizer.name].update
        layers = list(self.layers.values())
        for index in range(len(layers) - 1, -1, -1):
            layer = layers[index]
            grad_inputs = layer.backward(grad, activations[index], need_input_grad=index > 0)
            update(self.optimizer, layer.weight, layer.weight_grad, layer.state, self.steps)
            update(self.optimizer, layer.bias, layer.bias_grad, layer.bias_state, self.steps)
            if index > 0:
                grad = grad_inputs
                grad *= activations[index] > 0
        return loss

    def update_topology(self, prune_ratio: float) -> dict[str, LayerUpdate]:
        """One SET update on every layer (see ``SparseLinear.prune_and_regrow``)."""
        check_prune_ratio(prune_ratio)
        return {name: layer.prune_and_regrow(prune_ratio, self.rng) for name, layer in self.layers.items()}

    def fit(self, x, y, epochs: int = 1, batch_size: int = 128, dst: DSTConfig | None = SET_DST,
            max_batches: int | None = None) -> dict:
        """Shuffled mini-batch training with DST updates; returns the loss history and timings.

        ``dst=None`` keeps the topology fixed; ``max_batches`` caps each epoch (quick runs),
        like ``dst.data.TensorLoader``'s.
        """
        _check_positive_int(epochs=epochs, batch_size=batch_size)
        if max_batches is not None:
            _check_positive_int(max_batches=max_batches)
        if dst is not None and dst.regrow != "random":
            raise ValueError(f"the truly sparse trainer regrows at random (SET) only, got "
                             f"regrow={dst.regrow!r}: gradient regrowth (RigL) needs the dense "
                             "gradient this trainer never forms")
        labels = _check_data(x, y, "training", self._num_classes())
        features = _to_numpy(x, np.float32).reshape(len(x), -1)
        history = {"epoch_losses": [], "dst_updates": 0, "update_time_s": 0.0}

        def maybe_update(unit: str, t: int) -> None:
            if dst is not None and dst.unit == unit and dst.is_update(t):
                started = time.perf_counter()
                self.update_topology(dst.prune_ratio_at(t))
                history["update_time_s"] += time.perf_counter() - started
                history["dst_updates"] += 1

        start, steps_before = time.perf_counter(), self.steps
        for epoch in range(1, epochs + 1):
            order = self.rng.permutation(len(features))
            losses = []
            for begin in range(0, len(order), batch_size)[:max_batches]:
                batch = order[begin:begin + batch_size]
                losses.append(self.train_step(features[batch], labels[batch]))
                maybe_update("step", self.steps)
            if losses:
                history["epoch_losses"].append(float(np.mean(losses)))
            maybe_update("epoch", epoch)
        history["steps"] = self.steps - steps_before
        history["train_time_s"] = time.perf_counter() - start
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
                                allocation="uniform", optimizer=self.optimizer, backend=self.backend.name)
        features = _to_numpy(x, np.float32).reshape(len(x), -1)
        twin.train_step(features, _to_numpy(y, np.int64).reshape(-1))
        twin.update_topology(0.1)
        twin.predict(features)
        return time.perf_counter() - started

    def evaluate(self, x, y, batch_size: int = 1000) -> float:
        """Accuracy in % on (x, y)."""
        labels = _check_data(x, y, "evaluation", self._num_classes())
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


def masked_dense_nbytes(widths: tuple[int, ...], optimizer: OptimizerConfig = DEFAULT_OPTIMIZER) -> int:
    """Analytic bytes of the masked dense MLP's weight, mask, gradient and optimizer state.

    Per weight position: float32 weight and gradient (4 + 4), bool mask (1) and a
    float32 per optimizer state tensor; biases alike without a mask. The forward's
    transient ``weight * mask`` (4 more per position) is not counted.
    """
    states = len(optimizer.state_names)
    weights = sum(fan_in * fan_out for fan_in, fan_out in pairwise(widths))
    return weights * (4 + 1 + 4 + 4 * states) + sum(widths[1:]) * (4 + 4 + 4 * states)


def torch_optimizer(config: OptimizerConfig, params) -> torch.optim.Optimizer:
    """The torch optimizer that ``config`` describes, for the masked dense net."""
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=config.betas, eps=config.eps,
                                weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def train_sparse_mlp(train_x, train_y, test_x, test_y, hidden: tuple[int, ...] = (1024, 1024),
                     sparsity: float = 0.99, allocation: str = "erk", epochs: int = 1, batch_size: int = 128,
                     optimizer: OptimizerConfig = DEFAULT_OPTIMIZER, dst: DSTConfig | None = SET_DST,
                     seed: int = 0, max_batches: int | None = None, backend: str | None = None) -> dict:
    """Train a truly sparse MLP with SET on (train_x, train_y), test it, and return its metrics.

    Inputs are torch tensors or numpy arrays: images (N, 1, 28, 28) or features
    (N, F), and int labels in [0, 10). The keys match ``train_masked_mlp``'s:
    test_accuracy (%), epoch_losses, train_time_s (DST updates included), step_time_ms
    (its mean per step, timed after ``SparseMLP.warm_up`` so no compilation is in it),
    warmup_s (that first-call cost, on its own), weight_optimizer_bytes (weights, indices, gradient and optimizer
    state as held), dense_weight_optimizer_bytes (what the masked dense net would hold),
    active_weights, total_weights, steps, dst_updates.
    """
    hidden = _check_hidden(hidden)
    train_y = _check_data(train_x, train_y, "training", NUM_CLASSES)
    _check_data(test_x, test_y, "test", NUM_CLASSES)
    features = _to_numpy(train_x, np.float32).reshape(len(train_x), -1)
    model = SparseMLP.random(features.shape[1], hidden, NUM_CLASSES, sparsity, allocation, optimizer,
                             seed, backend)
    warmup_seconds = model.warm_up(features[:batch_size], train_y[:batch_size])
    history = model.fit(features, train_y, epochs, batch_size, dst, max_batches)
    history["warmup_s"] = warmup_seconds
    started = time.perf_counter()
    accuracy = model.evaluate(test_x, test_y)
    widths = (features.shape[1], *hidden, NUM_CLASSES)
    return _metrics(f"truly sparse ({model.backend.name})", widths, sparsity, history, accuracy,
                    time.perf_counter() - started, model.nbytes(), masked_dense_nbytes(widths, optimizer),
                    sum(model.active_counts().values()))


def train_masked_mlp(train_x, train_y, test_x, test_y, hidden: tuple[int, ...] = (1024, 1024),
                     sparsity: float = 0.99, allocation: str = "erk", epochs: int = 1, batch_size: int = 128,
                     optimizer: OptimizerConfig = DEFAULT_OPTIMIZER, dst: DSTConfig | None = SET_DST,
                     seed: int = 0, max_batches: int | None = None, device: torch.device | str = "cpu") -> dict:
    """The same run, simulated: ``MaskedNet(MLP)``, the torch optimizer, ``DSTScheduler``.

    Returns ``train_sparse_mlp``'s keys; both byte counts are the analytic dense footprint.
    """
    check_sparsity(sparsity)
    _check_positive_int(epochs=epochs)
    hidden = _check_hidden(hidden)
    train_y = _check_data(train_x, train_y, "training", NUM_CLASSES)
    test_y = _check_data(test_x, test_y, "test", NUM_CLASSES)
    images, labels = _to_torch(train_x, torch.float32), _to_torch(train_y, torch.int64)
    loader = TensorLoader(images.reshape(len(images), -1), labels, batch_size, shuffle=True, seed=seed,
                          max_batches=max_batches, device=device)
    test_loader = TensorLoader(_to_torch(test_x, torch.float32).reshape(len(test_x), -1),
                               _to_torch(test_y, torch.int64), 1000, device=device)
    widths = (loader.images.shape[1], *hidden, NUM_CLASSES)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's global RNG
        torch.manual_seed(seed)
        net = MaskedNet(MLP(widths[0], tuple(hidden), NUM_CLASSES), sparsity, allocation,
                        generator=torch.Generator().manual_seed(seed)).to(device)
    torch_opt = torch_optimizer(optimizer, net.parameters())
    scheduler = None if dst is None else DSTScheduler(net, dst, torch_opt,
                                                      generator=torch.Generator().manual_seed(seed))
    history = {"epoch_losses": [], "warmup_s": _warm_up_torch(net, torch_opt, loader)}
    start = time.perf_counter()
    for _ in range(epochs):
        loss, _ = train_epoch(net, loader, F.cross_entropy, torch_opt, device, dst=scheduler, progress=False)
        history["epoch_losses"].append(loss)
        if scheduler is not None:
            scheduler.after_epoch(loader)
    history["train_time_s"] = time.perf_counter() - start
    history["steps"] = epochs * len(loader)
    history["dst_updates"] = 0 if scheduler is None else len(scheduler.history)
    started = time.perf_counter()
    accuracy = evaluate(net, test_loader, device)
    nbytes = masked_dense_nbytes(widths, optimizer)
    active = sum(layer.active_count for layer in net.masked_layers().values())
    return _metrics("masked dense (torch)", widths, sparsity, history, accuracy,
                    time.perf_counter() - started, nbytes, nbytes, active)


def _warm_up_torch(net: MaskedNet, optimizer: torch.optim.Optimizer, loader: TensorLoader) -> float:
    """One step and one DST update on throwaway copies, so first-call costs stay out of the timing."""
    started = time.perf_counter()
    scratch_net, scratch_optimizer = copy.deepcopy((net, optimizer))
    inputs, targets = loader.images[:loader.batch_size], loader.labels[:loader.batch_size]
    scratch_optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(scratch_net(inputs), targets).backward()
    scratch_optimizer.step()
    apply_dst_step(scratch_net, prune_ratio=0.1, optimizer=scratch_optimizer,
                   generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - started


def _metrics(trainer: str, widths: tuple[int, ...], sparsity: float, history: dict, accuracy: float,
             eval_seconds: float, nbytes: int, dense_nbytes: int, active: int) -> dict:
    return {"trainer": trainer, "widths": list(widths), "sparsity": sparsity, "test_accuracy": accuracy,
            "epoch_losses": history["epoch_losses"], "steps": history["steps"],
            "dst_updates": history["dst_updates"], "train_time_s": history["train_time_s"],
            "step_time_ms": 1e3 * history["train_time_s"] / max(history["steps"], 1),
            "warmup_s": history["warmup_s"],
            "eval_time_s": eval_seconds, "weight_optimizer_bytes": int(nbytes),
            "dense_weight_optimizer_bytes": int(dense_nbytes), "active_weights": int(active),
            "total_weights": sum(fan_in * fan_out for fan_in, fan_out in pairwise(widths))}


def _to_numpy(values, dtype) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def _to_torch(values, dtype) -> torch.Tensor:
    return (values if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values))).to(dtype)


def _labels(y, count: int, num_classes: int) -> np.ndarray:
    labels = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype} (a float label "
                        "such as 3.7 would be truncated to 3); convert whole-number labels with .astype(int)")
    labels = labels.astype(np.int64).reshape(-1)
    if len(labels) != count:
        raise ValueError(f"x and y differ in length: {count} vs {len(labels)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return labels


def _is_positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _check_positive_int(**values) -> None:
    for name, value in values.items():
        if not _is_positive_int(value):
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_hidden(hidden) -> tuple[int, ...]:
    """``hidden`` as a tuple of widths, or a clear error for a bare width or anything else."""
    if isinstance(hidden, (numbers.Number, str)) or not hasattr(hidden, "__iter__"):
        raise ValueError(f"hidden must be a tuple of widths, e.g. ({hidden!r}, {hidden!r}), got {hidden!r}")
    hidden = tuple(hidden)
    if not all(_is_positive_int(width) for width in hidden):
        raise ValueError(f"hidden widths must be positive ints, got {hidden}")
    return tuple(int(width) for width in hidden)


def _check_data(x, y, split: str, num_classes: int) -> np.ndarray:
    """The labels of (x, y) as int64, after checking both hold the same, non-zero number of samples."""
    if len(x) == 0:
        raise ValueError(f"the {split} data is empty (0 samples)")
    if len(x) != len(y):
        raise ValueError(f"x and y of the {split} data differ in length: {len(x)} vs {len(y)}")
    return _labels(y, len(x), num_classes)
