"""Dynamic Sparse Training, simulated and truly sparse: the tutorial's package.

Modules, one concept each:
    models         the tutorial's SimpleNet CNN and a plain MLP
    allocation     how a global sparsity is split across layers (uniform, ERK)
    masked         masked layers and MaskedNet (simulated sparsity)
    prune_regrow   one DST update: magnitude prune, random (SET) or gradient (RigL) regrow
    schedule       DSTConfig and the scheduler that decides when updates happen
    training       train_epoch / evaluate for dense and masked nets alike
    data           MNIST download (with a verified fallback) and fast in-memory loaders
    truly_sparse   the CSR inference engine (scipy, cupy, torch.sparse)
    benchmark      honest timing of simulated vs truly sparse inference
    sparse_training  truly sparse MLP training on the CPU
    plots          the tutorial's figures
    results        per-run JSON results and the table across runs
    gpu            whether cupy and a CUDA device are usable
"""
