"""The truly sparse engine: whole CNNs at inference, MLPs in training, on one set of array backends.

It may import ``dst.core`` and ``dst.engine`` (the masked model it converts, the update rule and schedule it shares
with the simulated engine); it never imports the methods (``dst.methods``, its sibling) nor the tutorial's
bookkeeping (``dst.tutorial``, above it).

Modules, one concept each:
    array_ops      what a backend is: the Ops Protocol callers use, ArrayOps (scipy, cupy), the training products
    backends       the one backend registry (scipy, numba, cupy, torch): a backend is a name, its ``ops`` an object
    kinds          the one registry of layer kinds, one module each: conv and linear (CSR), fan_in (condensed
                   constant fan-in), bsr (block-sparse rows), relu, maxpool, flatten
    numba_backend  the numba backend: its CSR conv and linear steps
    numba_kernels  the compiled kernels behind them
    numba_training the numba backend's training products and the index layouts they read
    numba_training_kernels  their compiled kernels: serial, cache-blocked and tiled
    torch_backend  the torch.sparse backend (inference only)
    steps          CSR inference steps on any backend: im2col conv with max-pool folded in, linear, ReLU, ...
    convert        a MaskedNet's layer chain as plain data (architecture + each layer's arrays), kinds by layout
    model          SparseNet: that chain run step by step; save/load; memory report
    npz            its .npz file, read as untrusted input
    linear         SparseLinear: a CSR weight trained without ever being dense
    csr_build      its CSR index arrays: from positions, at random in row chunks, merged after an update
    memory         whether a SparseMLP fits in this machine's memory, checked before allocating
    optimizers     SGD and Adam on arrays of active weights; their torch twins
    mlp            SparseMLP: the truly sparse trainer, and SparseMLPStep for DSTScheduler
    comparison     the same MLP run trained truly sparse and masked, with comparable metrics
"""

from dst.csr.backends import BACKENDS, default_cpu_backend, get_backend
from dst.csr.comparison import MLPRun, train_masked_mlp, train_sparse_mlp
from dst.csr.mlp import SparseMLP, SparseMLPStep
from dst.csr.model import SparseNet, memory_report
from dst.csr.optimizers import OptimizerConfig

__all__ = ["BACKENDS", "MLPRun", "OptimizerConfig", "SparseMLP", "SparseMLPStep", "SparseNet", "default_cpu_backend",
           "get_backend", "memory_report", "train_masked_mlp", "train_sparse_mlp"]
