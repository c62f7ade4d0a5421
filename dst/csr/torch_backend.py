"""The ``torch`` backend: torch.sparse CSR matrices and torch tensors, on the CPU or a CUDA GPU; inference only."""

import contextlib
import warnings

import numpy as np
import torch


class TorchOps:
    """``ArrayOps`` for torch tensors on ``device``, with torch.sparse CSR matrices; inference only."""

    name = "torch"
    context = contextlib.nullcontext
    training = None  # torch.sparse has no SDDMM on CSR patterns; the trainer is written against numpy/cupy
    xp = None

    def __init__(self, device: torch.device):
        self.device = device

    def asarray(self, host: np.ndarray):
        return torch.as_tensor(host, device=self.device)

    def as_input(self, x):
        if isinstance(x, torch.Tensor):
            x = x.detach()
        return torch.as_tensor(x, dtype=torch.float32, device=self.device)

    def csr(self, values, col_indices, row_pointers, shape):
        with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and not actionable
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.asarray(row_pointers), self.asarray(col_indices),
                                           self.asarray(values), size=shape, check_invariants=True)

    def csr_arrays(self, matrix) -> tuple:
        return matrix.values(), matrix.col_indices(), matrix.crow_indices()

    def link(self, steps: list) -> None:
        """Nothing to agree between steps: each takes its input as the one before returns it (``ArrayOps.link``)."""

    def zeros(self, shape):
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def empty(self, shape):
        return torch.empty(shape, dtype=torch.float32, device=self.device)

    def matmul(self, matrix, dense):
        return matrix @ dense

    def maximum(self, a, b, out):
        return torch.maximum(a, b, out=out)

    def relu_(self, x):
        return x.relu_()

    def relu(self, x):
        return x.relu()

    def batch_last(self, x):
        return x.movedim(0, -1).contiguous()

    def batch_first(self, y):
        return y.movedim(-1, 0).clone(memory_format=torch.contiguous_format)  # a copy: see ArrayOps

    def to_numpy(self, array) -> np.ndarray:
        return array.cpu().numpy()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
