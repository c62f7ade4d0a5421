"""Training and evaluation loops shared by dense and masked networks."""

import random
import time
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch
from torch import nn

from dst.core.progress import Progress

Batch = tuple[torch.Tensor, torch.Tensor]


def split_batch(batch) -> Batch:
    """``(inputs, targets)`` of one batch, or a clear error for anything else (a dict, a bare tensor)."""
    if isinstance(batch, Mapping):
        raise TypeError(f"expected each batch as an (inputs, targets) pair, got a dict with keys "
                        f"{sorted(map(str, batch))}; make the loader yield (inputs, targets) tuples")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        items = f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else ""
        raise TypeError(f"expected each batch as an (inputs, targets) pair, got a {type(batch).__name__}{items}")
    return batch[0], batch[1]


class AfterStep(Protocol):
    """What ``train_epoch`` calls after each optimizer step: ``DSTScheduler`` is one."""

    def after_step(self, batch: Batch) -> object: ...


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global random generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_epoch(model: nn.Module, loader, criterion, optimizer: torch.optim.Optimizer,
                device: torch.device | str, dst: AfterStep | None = None,
                progress: bool = True) -> tuple[float, float]:
    """Train for one pass over ``loader``; returns ``(mean loss, accuracy in %)``, the seed's order.

    Batches are (inputs, targets) with class-index targets. With ``dst``, its
    step-based updates run after each optimizer step. ``progress=False`` turns the
    progress line off. It is ``dst.core.progress.Progress``: text, not a Jupyter widget (text
    survives a browser reload mid-training, where a widget whose state the kernel has
    not sent again shows "Error displaying widget: model not found").
    """
    model.train()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    bar = Progress(_length(loader), "train batches", enabled=progress)
    for batch in loader:
        bar.update()
        inputs, targets = (tensor.to(device) for tensor in split_batch(batch))
        optimizer.zero_grad(set_to_none=True)
        outputs = model(inputs)
        check_targets(outputs, targets, check_range=False)  # the criterion checks the range, without a sync
        loss = criterion(outputs, targets)
        loss.backward()
        optimizer.step()
        if dst is not None:
            dst.after_step((inputs, targets))
        # Accumulate on the device: a .item() per batch would synchronise a GPU every step.
        total_loss += loss.detach() * len(targets)
        correct += (outputs.argmax(1) == targets).sum()
        seen += len(targets)
    bar.close()
    if seen == 0:
        raise ValueError("train_epoch got an empty loader")
    return total_loss.item() / seen, 100.0 * correct.item() / seen


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str, criterion=None,
             progress: bool = False) -> float | tuple[float, float]:
    """Accuracy in % on ``loader``; with ``criterion``, the tuple ``(accuracy in %, mean loss)``.

    The seed returns the accuracy alone, so accuracy comes first here and the loss is the
    optional extra: the reverse of ``train_epoch``'s ``(loss, accuracy)``. ``train_and_evaluate``
    returns both by name and avoids the question.
    """
    model.eval()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    bar = Progress(_length(loader), "test batches", enabled=progress)
    for batch in loader:
        bar.update()
        inputs, targets = (tensor.to(device) for tensor in split_batch(batch))
        outputs = model(inputs)
        check_targets(outputs, targets)
        if criterion is not None:
            total_loss += criterion(outputs, targets) * len(targets)
        correct += (outputs.argmax(1) == targets).sum()
        seen += len(targets)
    bar.close()
    if seen == 0:
        raise ValueError("evaluate got an empty loader")
    accuracy = 100.0 * correct.item() / seen
    if criterion is None:
        return accuracy
    return accuracy, total_loss.item() / seen


def check_targets(outputs: torch.Tensor, targets: torch.Tensor, check_range: bool = True) -> None:
    """Raise unless ``targets`` are class indices for the ``(N, classes)`` ``outputs``: shape (N,), integers in range.

    Accuracy compares ``outputs.argmax(1)`` with the targets, so anything else (a
    (N, 1) column, one-hot rows) would broadcast into a wrong number instead of failing.
    ``check_range=False`` skips the range test, which waits for a GPU.
    """
    if outputs.ndim != 2:
        raise ValueError(f"the model's outputs must be (N, classes) logits, got shape {tuple(outputs.shape)}")
    if targets.ndim != 1 or len(targets) != len(outputs):
        hint = "; for one-hot targets pass targets.argmax(1)" if targets.shape == outputs.shape else ""
        raise ValueError(f"targets must be class indices of shape ({len(outputs)},) for outputs of shape "
                         f"{tuple(outputs.shape)}, got shape {tuple(targets.shape)}{hint}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if check_range and len(targets):
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= outputs.shape[1]:
            raise ValueError(f"targets must be class indices in [0, {outputs.shape[1]}) for {outputs.shape[1]} "
                             f"outputs, got values in [{low}, {high}]")


def train_and_evaluate(model: nn.Module, train_loader, test_loader, criterion,
                       optimizer: torch.optim.Optimizer, device: torch.device | str,
                       dst: AfterStep | None = None, progress: bool = True) -> dict[str, float]:
    """One epoch of training then a test pass: losses, accuracies (%) and training seconds."""
    start = time.perf_counter()
    train_loss, train_acc = train_epoch(model, train_loader, criterion, optimizer, device, dst, progress)
    seconds = time.perf_counter() - start
    test_acc, test_loss = evaluate(model, test_loader, device, criterion)
    return {"train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss, "test_acc": test_acc,
            "train_seconds": seconds}


def _length(loader) -> int | None:
    """How many batches ``loader`` yields, if it says."""
    return len(loader) if hasattr(loader, "__len__") else None
