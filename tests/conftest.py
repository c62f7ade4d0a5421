"""Shared fixtures: tiny synthetic MNIST-shaped data, no downloads."""

import os

import pytest
import torch
from hypothesis import settings
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("MPLBACKEND", "Agg")

# CI (CI=true) draws the same examples on every run, so a red CI always means a real regression;
# local runs keep exploring new examples. Either way a failure prints the @reproduce_failure blob,
# and `pytest --hypothesis-seed=N` replays a seed.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "explore")


def synthetic_mnist(samples: int = 64, seed: int = 0) -> TensorDataset:
    """MNIST-shaped random images whose label is learnable from the mean brightness of a band."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(samples, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (samples,), generator=generator)
    images[:, 0, :, :3] += labels.view(-1, 1, 1).float()
    return TensorDataset(images, labels)


@pytest.fixture
def tiny_loader() -> DataLoader:
    return DataLoader(synthetic_mnist(), batch_size=16, shuffle=False)
