"""The tutorial's doorway: the names ``dst_tutorial.ipynb`` imports, re-exported from ``dst``."""

from dst.benchmark import benchmark_environment, benchmark_inference

from dst.allocation import ALLOCATIONS, layer_densities
from dst.data import ensure_mnist, load_mnist, load_mnist_tensors
from dst.gpu import CUPY_GPU_AVAILABLE
from dst.masked import MaskedNet
from dst.models import MLP, SimpleNet
from dst.plots import (
    plot_benchmark,
    plot_dense_vs_masked_comparison,
    plot_mask_2d_evolution,
    plot_mask_evolution_per_epoch,
    plot_runs_comparison,
)
from dst.prune_regrow import REGROW, apply_dst_step
from dst.schedule import DSTConfig, DSTScheduler
from dst.training import evaluate, seed_everything, train_epoch

__all__ = [
    "ALLOCATIONS", "CUPY_GPU_AVAILABLE", "DSTConfig", "DSTScheduler", "MLP", "MaskedNet", "REGROW",
    "SimpleNet", "apply_dst_step", "benchmark_environment", "benchmark_inference", "ensure_mnist",
    "evaluate", "layer_densities", "load_mnist", "load_mnist_tensors", "plot_benchmark",
    "plot_dense_vs_masked_comparison", "plot_mask_2d_evolution", "plot_mask_evolution_per_epoch",
    "plot_runs_comparison", "seed_everything", "train_epoch",
]
