"""Dynamic Sparse Training, simulated and truly sparse: the tutorial's package.

One module per concept, in five parts, lowest first: ``core`` (plain PyTorch: models, data,
training loops), ``engine`` (the simulated engine), ``csr`` (the truly sparse engine) and
``methods`` (the decade of methods) side by side, ``tutorial`` (the notebook's bookkeeping).
A part imports only the parts below it. ``API`` below lists the public names with one line
each (``help(dst)`` shows it too). Each name is imported from its module on first use, so
``import dst.engine.masked`` stays as light as that module. Where to add a regrow criterion,
a sparsity pattern, a sparse backend, a CSR layer kind or a sparse optimizer: CONTRIBUTING.md.
"""

import importlib

# name -> (module under dst, what it is): the public API. Modules (report, distributed) map to themselves.
API = {
    "SimpleNet": ("core.models", "the tutorial's CNN for 28x28 images (1,345,642 parameters)"),
    "MLP": ("core.models", "a plain multi-layer perceptron on flattened images"),
    "lenet_300_100": ("core.models", "LeNet-300-100 (784-300-100-10), the MLP of the DST papers' MNIST tables"),
    "ALLOCATIONS": ("engine.allocation", "how a global sparsity is split over layers: 'uniform' or 'erk'"),
    "layer_densities": ("engine.allocation", "per-layer densities for a global sparsity"),
    "MaskedNet": ("engine.masked", "any model with every trainable Conv/Linear masked (simulated sparsity)"),
    "MaskedLayer": ("engine.masked_layers",
                    "what a masked layer is: a layer owning a boolean mask buffer over its weight"),
    "REGROW": ("engine.update_rule",
               "the regrow criteria as scores ('random' = SET, 'gradient' = RigL, 'momentum' = SNFS)"),
    "RegrowCriterion": ("engine.update_rule", "one regrow criterion: a score per position, and the signal it needs"),
    "get_pattern": ("engine.patterns", "a sparsity pattern by name: 'unstructured', 'fan_in', '2:4', 'block4x4'"),
    "Pattern": ("engine.patterns", "what a sparsity pattern is: how positions group, how many per group are active"),
    "PATTERN_KINDS": ("engine.patterns", "the pattern kinds, one module each: unstructured, fan_in, n_m, block"),
    "LayerUpdate": ("engine.update_rule", "what one DST step did to one layer (active, pruned, regrown)"),
    "choose_moves": ("engine.update_rule", "the one prune-and-regrow rule both engines call: which positions move"),
    "sample_inactive": ("engine.update_rule", "uniform draws of inactive positions, never listing them in huge layers"),
    "apply_dst_step": ("engine.prune_regrow", "one DST step on every layer of a MaskedNet, optimizer state reset"),
    "update_layer": ("engine.prune_regrow", "the same on one masked layer"),
    "dense_gradients": ("engine.prune_regrow", "the dense loss gradient of every masked weight, for RigL"),
    "DSTConfig": ("engine.schedule", "when updates happen and how much they move (constant or cosine)"),
    "DSTScheduler": ("engine.schedule", "calls a TopologyUpdate when DSTConfig says one is due, on either engine"),
    "TopologyUpdate": ("engine.topology_update", "what a DST step is to the scheduler: needs_batch, a call, close()"),
    "MaskedDSTStep": ("engine.prune_regrow", "apply_dst_step as a TopologyUpdate, fixed to one MaskedNet"),
    "masked_scheduler": ("engine.prune_regrow", "DSTScheduler(config, MaskedDSTStep(masked_net, ...)) in one call"),
    "METHODS": ("methods.catalog", "a decade of DST by name: dense, static, set, rigl, srigl, snfs, gmp"),
    "get_method": ("methods.catalog", "the method called by a name, or a ValueError listing the names"),
    "improved": ("methods.catalog", "a method with this project's improvements instead of its reference's behaviour"),
    "IMPROVEMENTS": ("methods.catalog", "this project's departures from the reference codes, each a method option"),
    "MoveRule": ("engine.update_rule", "a DST step's details where references differ: rounding, regrowth, sign split"),
    "update_layer_counts": ("engine.prune_regrow",
                            "prune and regrow one unstructured layer with counts that may differ (SNFS)"),
    "prune_layer_to": ("engine.prune_regrow", "prune one layer, within its pattern's groups, to a count (GMP)"),
    "Target": ("methods.catalog",
               "the sparse net every method is compared at: sparsity, allocation, layers kept dense"),
    "run_sweep": ("methods.sweep", "methods x sparsities trained alike: one row of metrics each"),
    "train_model": ("methods.sweep", "one method at one target, trained: (model, row of metrics)"),
    "Recipe": ("methods.sweep", "how every method of a sweep is trained (epochs, batch, SGD, lr schedule)"),
    "summarize": ("methods.sweep", "sweep rows averaged over seeds (mean and std of the accuracy)"),
    "accuracy_table": ("methods.sweep", "a markdown table of a summary: methods x sparsities"),
    "comparison_table": ("methods.sweep", "a markdown table of a summary against published numbers"),
    "layer_table": ("methods.sweep", "a markdown table of where each method's weights end up, and cut-off classes"),
    "plot_method_sweep": ("tutorial.sweep_figure", "the decade in one figure: accuracy and training FLOPs vs sparsity"),
    "time_patterns": ("tutorial.hardware", "one layer per sparsity pattern timed against dense and unstructured CSR"),
    "describe_pattern_speed": ("tutorial.hardware", "those timings as sentences, each against dense and unstructured"),
    "summarize_patterns": ("tutorial.hardware", "accuracy per pattern averaged over seeds, against unstructured"),
    "pattern_table": ("tutorial.hardware", "a markdown table of summarize_patterns"),
    "describe_pattern_accuracy": ("tutorial.hardware", "what each pattern cost in accuracy, as sentences"),
    "tradeoff_points": ("tutorial.hardware", "each pattern's speed-up paired with its accuracy change, to plot"),
    "random_mask": ("engine.masked", "a random boolean mask at a density, in any sparsity pattern"),
    "plot_pattern_masks": ("tutorial.pattern_figure", "one layer's mask under each sparsity pattern, side by side"),
    "plot_pattern_tradeoff": ("tutorial.pattern_figure",
                              "accuracy given up against inference speed bought, one mark per pattern"),
    "train_epoch": ("core.training", "one training pass; returns (mean loss, accuracy %)"),
    "evaluate": ("core.training", "accuracy %; with a criterion, (accuracy %, mean loss)"),
    "train_and_evaluate": ("core.training", "one epoch then a test pass, as a dict of metrics"),
    "Run": ("tutorial.side_by_side", "one net of a side-by-side training: model, optimizer, its own loader"),
    "train_side_by_side": ("tutorial.side_by_side", "an epoch of several nets at once, one CPU core each"),
    "seed_everything": ("core.training", "seed Python's, numpy's and torch's global generators"),
    "ensure_mnist": ("core.data", "fetch and verify the four MNIST files"),
    "load_mnist": ("core.data", "train and test loaders of in-memory tensors"),
    "load_mnist_tensors": ("core.data", "MNIST as normalised tensors"),
    "TensorLoader": ("core.data", "fast, reproducible batches of in-memory tensors"),
    "SparseNet": ("csr", "a MaskedNet run entirely in CSR, on scipy, numba, cupy or torch; save/load"),
    "default_cpu_backend": ("csr", "the fastest CSR backend installed for the CPU: numba, else scipy"),
    "memory_report": ("csr", "bytes of the masked model against its CSR version, per layer"),
    "BACKENDS": ("csr", "the one registry of array backends: scipy, numba, cupy, torch"),
    "SparseMLP": ("csr", "an MLP trained with CSR weights only, DST included"),
    "MLPRun": ("csr", "the settings of an MLP run, shared by the two trainers"),
    "train_sparse_mlp": ("csr", "train and test a truly sparse MLP; returns its metrics"),
    "train_masked_mlp": ("csr", "the same run as a masked dense net, with the same metrics"),
    "OptimizerConfig": ("csr", "SGD or Adam for both MLP trainers, so their runs compare"),
    "benchmark_inference": ("tutorial.benchmark",
                            "time the masked net against its CSR versions (medians, interleaved)"),
    "benchmark_environment": ("tutorial.benchmark", "what the timings depend on (versions, threads, devices)"),
    "plot_benchmark": ("tutorial.plots", "inference times and memory, each against the masked net on its device"),
    "plot_dense_vs_masked_comparison": ("tutorial.plots", "dense vs masked training curves"),
    "plot_runs_comparison": ("tutorial.plots", "accuracy, speedup and memory across saved runs"),
    "plot_sparsity_sweep": ("tutorial.plots", "CSR speedup and memory against sparsity, per backend and batch size"),
    "show": ("tutorial.plots", "display a figure once, as a PNG, and close it (every figure of the notebook)"),
    "plot_mask_evolution_per_epoch": ("tutorial.mask_plots", "per-layer sparsity and topology turnover per epoch"),
    "plot_mask_2d_evolution": ("tutorial.mask_plots", "the masks themselves, coloured by what each DST step changed"),
    "plot_input_connections": ("tutorial.mask_plots", "each input pixel's active connections, one image per net"),
    "centre_and_border": ("tutorial.mask_plots", "mean of an image's central 12x12 pixels and of its 4-pixel frame"),
    "mask_changes": ("tutorial.topology", "connections pruned and regrown between mask snapshots"),
    "input_connections": ("tutorial.topology", "active connections leaving each input of a first layer, as an image"),
    "Progress": ("core.progress", "one progress line for a long loop, updated in place in Jupyter and papermill"),
    "CUPY_GPU_AVAILABLE": ("core.gpu", "whether cupy and a CUDA device can be used"),
    "report": ("tutorial.report", "the notebook's bookkeeping: run labels, saved runs, tables, measured sentences"),
    "distributed": ("engine.distributed", "DST under DistributedDataParallel: the same step on every rank, checked"),
}
__all__ = sorted(API)
__doc__ += "\nThe public API:\n\n" + "\n".join(f"    {name:33s} {what} ({module})"
                                               for name, (module, what) in API.items())


def __getattr__(name: str):
    if name not in API:
        raise AttributeError(f"module 'dst' has no attribute {name!r}")
    module = importlib.import_module(f"dst.{API[name][0]}")
    value = module if API[name][0].rpartition(".")[2] == name else getattr(module, name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))
