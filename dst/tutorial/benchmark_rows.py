"""The row names of ``benchmark_inference``: one table for the benchmark, the results, the plots and the notebook.

A row name is ``"<model> (<device>)"``. The names are keys of the results JSON
files, so they stay as the seed tutorial wrote them; every module reads them from
here instead of spelling them again.
"""

import re

CPU, GPU = "CPU", "GPU"
# What each row runs. The baseline of a device is its MASKED row.
DENSE = "Dense, no mask"  # the same weights without the mask step: a plain dense net
MASKED = "Dense+Mask"  # the simulated sparse net as trained
CSR = "Truly Sparse CSR"  # the default CSR engine of the device (numba or scipy on the CPU, cupy on a GPU)
CSR_SCIPY = "Truly Sparse CSR scipy"  # scipy, the readable reference, where it is not the default
TORCH_SPARSE = "Truly Sparse torch.sparse"  # PyTorch's own CSR tensors


def row(model: str, device: str) -> str:
    """The row name of ``model`` (one of the constants above) on ``device`` ("CPU" or "GPU")."""
    return f"{model} ({device})"


DENSE_CPU, MASKED_CPU, CSR_CPU = row(DENSE, CPU), row(MASKED, CPU), row(CSR, CPU)
CSR_SCIPY_CPU, TORCH_SPARSE_CPU = row(CSR_SCIPY, CPU), row(TORCH_SPARSE, CPU)
MASKED_GPU, CSR_GPU, TORCH_SPARSE_GPU = row(MASKED, GPU), row(CSR, GPU), row(TORCH_SPARSE, GPU)

# (baseline, candidate) pairs the notebook words as speed sentences, where both rows ran.
COMPARISONS = (
    (DENSE_CPU, MASKED_CPU),  # what the mask itself costs
    (MASKED_GPU, CSR_GPU),
    (MASKED_GPU, TORCH_SPARSE_GPU),
    (MASKED_GPU, CSR_CPU),
    (MASKED_CPU, CSR_CPU),
    (MASKED_CPU, TORCH_SPARSE_CPU),
)


def device_of(name: str) -> str:
    """The device in a row name's trailing parentheses ("CPU" in "Dense+Mask (CPU)"), or "" if it has none."""
    match = re.search(r"\(([^()]*)\)\s*$", name)
    return match[1] if match else ""


def is_baseline(name: str) -> bool:
    """Whether ``name`` is a device's baseline row, the masked dense net (with or without a device)."""
    return name.startswith(MASKED)
