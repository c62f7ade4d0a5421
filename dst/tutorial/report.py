"""The notebook's bookkeeping in one place: run labels and files, tables, and sentences computed from measurements.

A doorway like ``utils.py``: it holds no logic of its own and re-exports, so a
notebook cell reads ``report.save_run(record)`` without a long import list.
"""

from dst.csr.model import memory_report
from dst.methods.sweep import describe_settings, describe_sweep
from dst.tutorial.benchmark import benchmark_environment
from dst.tutorial.benchmark_rows import (
    COMPARISONS,
    CPU,
    CSR_CPU,
    CSR_GPU,
    CSR_SCIPY_CPU,
    DENSE_CPU,
    GPU,
    MASKED_CPU,
    MASKED_GPU,
    TORCH_SPARSE_CPU,
    TORCH_SPARSE_GPU,
    device_of,
)
from dst.tutorial.results import (
    describe_benchmark,
    describe_crossovers,
    describe_mask_overhead,
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
from dst.tutorial.topology import mask_changes

__all__ = [
    # benchmark_inference's row names (dst.tutorial.benchmark_rows) and the pairs the notebook compares
    "COMPARISONS", "CPU", "CSR_CPU", "CSR_GPU", "CSR_SCIPY_CPU", "DENSE_CPU", "GPU", "MASKED_CPU", "MASKED_GPU",
    "TORCH_SPARSE_CPU", "TORCH_SPARSE_GPU", "device_of",
    # what a run measured beside its timings
    "benchmark_environment", "mask_changes", "memory_report",
    # a run's label, its file, and every saved run (dst.tutorial.results)
    "run_label", "run_path", "save_run", "load_runs",
    # the table across runs and the sentences computed from measurements (dst.tutorial.results)
    "runs_table", "format_table", "describe_speedup", "describe_benchmark", "describe_crossovers", "describe_memory",
    "describe_mask_overhead", "speed_sentence",
    # the sweep of methods, in sentences (dst.methods.sweep)
    "describe_settings", "describe_sweep",
]
