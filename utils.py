"""The tutorial's doorway: the seed notebook's import list, re-exported from ``dst`` (no logic here).

The notebook imports these ten names as the seed did and reaches everything else through
one door, ``import dst`` (``dst.API`` lists it); the rest of ``__all__`` stays for code
written against earlier versions of this module.
"""

from dst.core import gpu
from dst.core.data import ensure_mnist, load_mnist, load_mnist_tensors
from dst.core.models import SimpleNet
from dst.core.training import evaluate, seed_everything, train_and_evaluate, train_epoch
from dst.csr import SparseNet, default_cpu_backend, train_masked_mlp, train_sparse_mlp
from dst.engine.masked import MaskedNet
from dst.engine.prune_regrow import apply_dst_step
from dst.engine.schedule import DSTConfig, DSTScheduler
from dst.tutorial.benchmark import benchmark_inference
from dst.tutorial.mask_plots import plot_mask_2d_evolution, plot_mask_evolution_per_epoch
from dst.tutorial.plots import plot_benchmark, plot_dense_vs_masked_comparison, plot_runs_comparison
from dst.tutorial.side_by_side import Run, train_side_by_side

__all__ = [
    # the seed tutorial's import list
    "SimpleNet", "MaskedNet", "train_epoch", "evaluate", "apply_dst_step", "benchmark_inference",
    "plot_mask_evolution_per_epoch", "plot_mask_2d_evolution", "plot_dense_vs_masked_comparison",
    "CUPY_GPU_AVAILABLE",  # noqa: F822 - probed on first read, by __getattr__ below
    # the DST concepts this tutorial adds
    "DSTConfig", "DSTScheduler", "train_and_evaluate", "seed_everything", "Run", "train_side_by_side",
    "ensure_mnist", "load_mnist", "load_mnist_tensors", "SparseNet", "default_cpu_backend", "train_sparse_mlp",
    "train_masked_mlp", "plot_benchmark", "plot_runs_comparison",
]


def __getattr__(name: str):
    if name == "CUPY_GPU_AVAILABLE":  # read from dst.core.gpu on first use: importing utils probes no CUDA driver
        return gpu.cupy_gpu_available()
    raise AttributeError(f"module 'utils' has no attribute {name!r}")
