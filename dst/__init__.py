"""Dynamic Sparse Training, simulated and truly sparse: the tutorial's package.

One module per concept; ``API`` below lists the public names with one line each
(``help(dst)`` shows it too). Each name is imported from its module on first use,
so ``import dst.masked`` stays as light as that module. Where to add a regrow
criterion, a sparse backend, a CSR layer type or a sparse optimizer: CONTRIBUTING.md.
"""

import importlib

# name -> (module, what it is): the public API. Modules (report, distributed) map to themselves.
API = {
    "SimpleNet": ("models", "the tutorial's CNN for 28x28 images (1,345,642 parameters)"),
    "MLP": ("models", "a plain multi-layer perceptron on flattened images"),
    "lenet_300_100": ("models", "LeNet-300-100 (784-300-100-10), the MLP of the DST papers' MNIST tables"),
    "ALLOCATIONS": ("allocation", "how a global sparsity is split over layers: 'uniform' or 'erk'"),
    "layer_densities": ("allocation", "per-layer densities for a global sparsity"),
    "MaskedNet": ("masked", "any model with every trainable Conv/Linear masked (simulated sparsity)"),
    "MaskedLayer": ("masked_layers", "what a masked layer is: a layer owning a boolean mask buffer over its weight"),
    "REGROW": ("update_rule", "the regrow criteria ('random' = SET, 'gradient' = RigL), each saying what it needs"),
    "RegrowCriterion": ("update_rule", "one regrow criterion: its choice, and whether it needs a gradient"),
    "LayerUpdate": ("update_rule", "what one DST step did to one layer (active, pruned, regrown)"),
    "choose_moves": ("update_rule", "the one prune-and-regrow rule both engines call: which positions move"),
    "sample_inactive": ("update_rule", "uniform draws of inactive positions, never listing them in huge layers"),
    "apply_dst_step": ("prune_regrow", "one DST step on every layer of a MaskedNet, optimizer state reset"),
    "update_layer": ("prune_regrow", "the same on one masked layer"),
    "dense_gradients": ("prune_regrow", "the dense loss gradient of every masked weight, for RigL"),
    "DSTConfig": ("schedule", "when updates happen and how much they move (constant or cosine)"),
    "DSTScheduler": ("schedule", "applies DSTConfig's updates during training, on either engine"),
    "METHODS": ("methods", "a decade of DST by name: dense, static, set, rigl, snfs, gmp"),
    "get_method": ("methods", "the method called by a name, or a ValueError listing the names"),
    "update_layer_counts": ("prune_regrow", "prune and regrow one layer with counts that may differ (SNFS, GMP)"),
    "Target": ("methods", "the sparse net every method is compared at: sparsity, allocation, layers kept dense"),
    "run_sweep": ("sweep", "methods x sparsities trained alike: one row of metrics each"),
    "train_model": ("sweep", "one method at one target, trained: (model, row of metrics)"),
    "Recipe": ("sweep", "how every method of a sweep is trained (epochs, batch, SGD, lr schedule)"),
    "summarize": ("sweep", "sweep rows averaged over seeds (mean and std of the accuracy)"),
    "accuracy_table": ("sweep", "a markdown table of a summary: methods x sparsities"),
    "comparison_table": ("sweep", "a markdown table of a summary against published numbers"),
    "layer_table": ("sweep", "a markdown table of where each method's weights end up, and cut-off classes"),
    "plot_method_sweep": ("sweep_figure", "the decade in one figure: accuracy and training FLOPs vs sparsity"),
    "train_epoch": ("training", "one training pass; returns (mean loss, accuracy %)"),
    "evaluate": ("training", "accuracy %; with a criterion, (accuracy %, mean loss)"),
    "train_and_evaluate": ("training", "one epoch then a test pass, as a dict of metrics"),
    "Run": ("side_by_side", "one net of a side-by-side training: model, optimizer, its own loader"),
    "train_side_by_side": ("side_by_side", "an epoch of several nets at once, one CPU core each"),
    "seed_everything": ("training", "seed Python's, numpy's and torch's global generators"),
    "ensure_mnist": ("data", "fetch and verify the four MNIST files"),
    "load_mnist": ("data", "train and test loaders of in-memory tensors"),
    "load_mnist_tensors": ("data", "MNIST as normalised tensors"),
    "TensorLoader": ("data", "fast, reproducible batches of in-memory tensors"),
    "SparseNet": ("csr", "a MaskedNet run entirely in CSR, on scipy, numba, cupy or torch; save/load"),
    "default_cpu_backend": ("csr", "the fastest CSR backend installed for the CPU: numba, else scipy"),
    "memory_report": ("csr", "bytes of the masked model against its CSR version, per layer"),
    "BACKENDS": ("csr", "the one registry of array backends: scipy, numba, cupy, torch"),
    "SparseMLP": ("csr", "an MLP trained with CSR weights only, DST included"),
    "MLPRun": ("csr", "the settings of an MLP run, shared by the two trainers"),
    "train_sparse_mlp": ("csr", "train and test a truly sparse MLP; returns its metrics"),
    "train_masked_mlp": ("csr", "the same run as a masked dense net, with the same metrics"),
    "OptimizerConfig": ("csr", "SGD or Adam for both MLP trainers, so their runs compare"),
    "benchmark_inference": ("benchmark", "time the masked net against its CSR versions (medians, interleaved)"),
    "benchmark_environment": ("benchmark", "what the timings depend on (versions, threads, devices)"),
    "plot_benchmark": ("plots", "inference times and memory, each against the masked net on its device"),
    "plot_dense_vs_masked_comparison": ("plots", "dense vs masked training curves"),
    "plot_runs_comparison": ("plots", "accuracy, speedup and memory across saved runs"),
    "plot_sparsity_sweep": ("plots", "CSR speedup and memory against sparsity, per backend and batch size"),
    "show": ("plots", "display a figure once, as a PNG, and close it (every figure of the notebook)"),
    "plot_mask_evolution_per_epoch": ("mask_plots", "per-layer sparsity and topology turnover per epoch"),
    "plot_mask_2d_evolution": ("mask_plots", "the masks themselves, coloured by what each DST step changed"),
    "plot_input_connections": ("mask_plots", "each input pixel's active connections, one image per net"),
    "centre_and_border": ("mask_plots", "mean of an image's central 12x12 pixels and of its 4-pixel frame"),
    "mask_changes": ("topology", "connections pruned and regrown between mask snapshots"),
    "input_connections": ("topology", "active connections leaving each input of a first layer, as an image"),
    "Progress": ("progress", "one progress line for a long loop, updated in place in Jupyter and papermill"),
    "CUPY_GPU_AVAILABLE": ("gpu", "whether cupy and a CUDA device can be used"),
    "report": ("report", "the notebook's bookkeeping: run labels, saved runs, tables, measured sentences"),
    "distributed": ("distributed", "DST under DistributedDataParallel: the same step on every rank, checked"),
}
__all__ = sorted(API)
__doc__ += "\nThe public API:\n\n" + "\n".join(f"    {name:33s} {what} ({module})"
                                               for name, (module, what) in API.items())


def __getattr__(name: str):
    if name not in API:
        raise AttributeError(f"module 'dst' has no attribute {name!r}")
    module = importlib.import_module(f"dst.{API[name][0]}")
    value = module if API[name][0] == name else getattr(module, name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))
