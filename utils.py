"""The tutorial's doorway: the names ``dst_tutorial.ipynb`` imports, re-exported from ``dst``."""

from dst.allocation import ALLOCATIONS, layer_densities
from dst.benchmark import benchmark_environment, benchmark_inference
from dst.csr.comparison import train_masked_mlp, train_sparse_mlp
from dst.csr.model import SparseNet, memory_report
from dst.data import ensure_mnist, load_mnist, load_mnist_tensors
from dst.gpu import CUPY_GPU_AVAILABLE
from dst.mask_plots import plot_mask_2d_evolution, plot_mask_evolution_per_epoch
from dst.masked import MaskedNet
from dst.models import MLP, SimpleNet
from dst.plots import plot_benchmark, plot_dense_vs_masked_comparison, plot_runs_comparison
from dst.prune_regrow import apply_dst_step
from dst.results import (
    describe_memory,
    describe_speedup,
    format_table,
    load_runs,
    run_label,
    run_path,
    runs_table,
    save_run,
    speed_sentence,
)
from dst.schedule import DSTConfig, DSTScheduler
from dst.topology import mask_changes
from dst.training import evaluate, seed_everything, train_and_evaluate, train_epoch
from dst.update_rule import REGROW

__all__ = [
    "ALLOCATIONS", "CUPY_GPU_AVAILABLE", "DSTConfig", "DSTScheduler", "MLP", "MaskedNet", "REGROW", "SimpleNet",
    "SparseNet", "apply_dst_step", "benchmark_environment", "benchmark_inference", "describe_memory",
    "describe_speedup", "ensure_mnist", "evaluate", "format_table", "layer_densities", "load_mnist",
    "load_mnist_tensors", "load_runs", "mask_changes", "memory_report", "plot_benchmark",
    "plot_dense_vs_masked_comparison", "plot_mask_2d_evolution", "plot_mask_evolution_per_epoch",
    "plot_runs_comparison", "run_label", "run_path", "runs_table", "save_run", "seed_everything", "speed_sentence",
    "train_and_evaluate", "train_epoch", "train_masked_mlp", "train_sparse_mlp",
]
