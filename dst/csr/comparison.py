"""Truly sparse against simulated: the same MLP run trained both ways, with comparable metrics.

``train_sparse_mlp`` trains a ``SparseMLP`` (CSR weights, ``dst.csr.mlp``) and
``train_masked_mlp`` a ``MaskedNet(MLP)`` with the torch optimizer and
``DSTScheduler``, from the same ``MLPRun`` settings, and both return the same keys.
"""

import copy
import time
from dataclasses import dataclass, replace
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F

from dst.core.checks import check_data, check_hidden, check_positive_int
from dst.core.data import TensorLoader
from dst.core.models import MLP
from dst.core.training import evaluate, train_epoch
from dst.csr.mlp import DEFAULT_OPTIMIZER, SET_DST, SparseMLP, host_array
from dst.csr.optimizers import OptimizerConfig, torch_optimizer
from dst.engine.allocation import check_allocation, check_sparsity
from dst.engine.masked import MaskedNet
from dst.engine.prune_regrow import apply_dst_step, masked_scheduler
from dst.engine.schedule import DSTConfig

NUM_CLASSES = 10  # MNIST; the trainers below are for the tutorial's data


@dataclass(frozen=True)
class MLPRun:
    """The settings both trainers take, checked once on construction."""

    # Two hidden layers of 1024: wide enough that truly sparse wins at 99 % on a laptop CPU.
    hidden: tuple[int, ...] = (1024, 1024)
    # 99 %: where truly sparse training pays off (the crossover is near 90 %, README).
    sparsity: float = 0.99
    allocation: str = "erk"
    epochs: int = 1
    batch_size: int = 128
    optimizer: OptimizerConfig = DEFAULT_OPTIMIZER
    # SET updates every 100 steps (see dst.csr.mlp.SET_DST); None keeps the topology fixed.
    dst: DSTConfig | None = SET_DST
    seed: int = 0
    # Batches per epoch for a quick run; None for all.
    max_batches: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "hidden", check_hidden(self.hidden))
        check_sparsity(self.sparsity)
        check_allocation(self.allocation)
        check_positive_int(epochs=self.epochs, batch_size=self.batch_size)
        if self.max_batches is not None:
            check_positive_int(max_batches=self.max_batches)
        object.__setattr__(self, "epochs", int(self.epochs))  # plain ints for the results JSON
        object.__setattr__(self, "batch_size", int(self.batch_size))


def masked_dense_nbytes(widths: tuple[int, ...], optimizer: OptimizerConfig = DEFAULT_OPTIMIZER) -> int:
    """Analytic bytes of the masked dense MLP's weight, mask, gradient and optimizer state.

    Per weight position: float32 weight and gradient (4 + 4), bool mask (1) and a
    float32 per optimizer state tensor; biases alike without a mask. The forward's
    transient ``weight * mask`` (4 more per position) is not counted.
    """
    states = len(optimizer.state_names)
    weights = sum(fan_in * fan_out for fan_in, fan_out in pairwise(widths))
    return weights * (4 + 1 + 4 + 4 * states) + sum(widths[1:]) * (4 + 4 + 4 * states)


def train_sparse_mlp(train_x, train_y, test_x, test_y, run: MLPRun | None = None, backend: str | None = None,
                     progress: bool = False, **settings) -> dict:
    """Train a truly sparse MLP with SET on (train_x, train_y), test it, and return its metrics.

    ``run`` holds the settings (default ``MLPRun()``); keyword ``settings`` replace any of
    its fields (``hidden=(256, 256), epochs=2``). Inputs are torch tensors or numpy arrays:
    images (N, 1, 28, 28) or features (N, F), and int labels in [0, 10). The keys match
    ``train_masked_mlp``'s:
    test_accuracy (%), epoch_losses, train_time_s (DST updates included), step_time_ms
    (its mean per step, timed after ``SparseMLP.warm_up`` so no compilation is in it),
    warmup_s (that first-call cost, on its own), weight_optimizer_bytes (weights, indices, gradient and optimizer
    state as held), dense_weight_optimizer_bytes (what the masked dense net would hold),
    active_weights, total_weights, steps, dst_updates. ``progress``: a line counting the steps (``dst.core.progress``).
    """
    run = replace(run or MLPRun(), **settings)
    train_y = check_data(train_x, train_y, "training", NUM_CLASSES)
    check_data(test_x, test_y, "test", NUM_CLASSES)
    features = host_array(train_x, np.float32).reshape(len(train_x), -1)
    model = SparseMLP.random(features.shape[1], run.hidden, NUM_CLASSES, run.sparsity, run.allocation,
                             run.optimizer, run.seed, backend)
    warmup_seconds = model.warm_up(features[:run.batch_size], train_y[:run.batch_size])
    history = model.fit(features, train_y, run.epochs, run.batch_size, run.dst, run.max_batches, progress=progress)
    history["warmup_s"] = warmup_seconds
    started = time.perf_counter()
    accuracy = model.evaluate(test_x, test_y)
    widths = (features.shape[1], *run.hidden, NUM_CLASSES)
    return _metrics(f"truly sparse ({model.ops.name})", widths, run.sparsity, history, accuracy,
                    time.perf_counter() - started, model.nbytes(), masked_dense_nbytes(widths, run.optimizer),
                    sum(model.active_counts().values()))


def train_masked_mlp(train_x, train_y, test_x, test_y, run: MLPRun | None = None,
                     device: torch.device | str = "cpu", progress: bool = False, **settings) -> dict:
    """The same run, simulated: ``MaskedNet(MLP)``, the torch optimizer, ``DSTScheduler``.

    Takes ``train_sparse_mlp``'s ``run``, ``progress`` and ``settings`` and returns its keys; both
    byte counts are the analytic dense footprint.
    """
    run = replace(run or MLPRun(), **settings)
    hidden, sparsity, optimizer, seed = run.hidden, run.sparsity, run.optimizer, run.seed
    train_y = check_data(train_x, train_y, "training", NUM_CLASSES)
    test_y = check_data(test_x, test_y, "test", NUM_CLASSES)
    images, labels = _to_torch(train_x, torch.float32), _to_torch(train_y, torch.int64)
    loader = TensorLoader(images.reshape(len(images), -1), labels, run.batch_size, shuffle=True, seed=seed,
                          max_batches=run.max_batches, device=device)
    test_loader = TensorLoader(_to_torch(test_x, torch.float32).reshape(len(test_x), -1),
                               _to_torch(test_y, torch.int64), 1000, device=device)
    widths = (loader.images.shape[1], *hidden, NUM_CLASSES)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's global RNG
        torch.manual_seed(seed)
        net = MaskedNet(MLP(widths[0], hidden, NUM_CLASSES), sparsity, run.allocation,
                        generator=torch.Generator().manual_seed(seed)).to(device)
    torch_opt = torch_optimizer(optimizer, net.parameters())
    scheduler = None if run.dst is None else masked_scheduler(net, run.dst, torch_opt,
                                                              generator=torch.Generator().manual_seed(seed))
    history = {"epoch_losses": [], "warmup_s": _warm_up_torch(net, torch_opt, loader)}
    start = time.perf_counter()
    for _ in range(run.epochs):
        loss, _ = train_epoch(net, loader, F.cross_entropy, torch_opt, device, dst=scheduler, progress=progress)
        history["epoch_losses"].append(loss)
        if scheduler is not None:
            scheduler.after_epoch(loader)
    history["train_time_s"] = time.perf_counter() - start
    history["steps"] = run.epochs * len(loader)
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


def _to_torch(values, dtype) -> torch.Tensor:
    return (values if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values))).to(dtype)
