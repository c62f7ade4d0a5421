"""Dynamic Sparse Training, simulated and truly sparse: the tutorial's package.

Modules, one concept each:
    models         the tutorial's SimpleNet CNN, a plain MLP and LeNet-300-100
    allocation     how a global sparsity is split across layers (uniform, ERK, dense ends); cut-off inputs and outputs
    masked         masked layers and MaskedNet (simulated sparsity)
    optimizer_state  optimizer state that follows the masks (reset at DST steps, checked before every step)
    prune_regrow   one DST update: magnitude prune, random (SET) or gradient (RigL) regrow
    schedule       DSTConfig and the scheduler that decides when updates happen
    methods        dense, static, SET, RigL, sparse momentum and gradual pruning by name
    sparse_momentum  sparse momentum's dense-gradient momentum and cross-layer redistribution
    gradual_pruning  gradual magnitude pruning on Zhu & Gupta's cubic schedule
    sweep          methods x sparsities trained alike: rows, summary over seeds, training FLOPs
    sweep_figure   the decade in one figure: accuracy and training FLOPs vs sparsity per method
    training       train_epoch / evaluate for dense and masked nets alike
    data           MNIST download (with a verified fallback) and fast in-memory loaders
    truly_sparse   the CSR inference model: conversion, save/load, memory report
    sparse_file    its .npz file: writing, and reading untrusted files with every field validated
    sparse_layers  its layers (im2col conv, linear, ReLU, max-pool) on one array API
    sparse_backends  that array API for scipy and cupy (one code path) and torch.sparse
    benchmark      honest timing of simulated vs truly sparse inference
    sparse_training  truly sparse MLP training on the CPU
    sparse_kernels   its CSR layer: sparse products, sampled gradients, SET and sparse optimizers
    plots          the tutorial's figures
    results        per-run JSON results and the table across runs
    gpu            whether cupy and a CUDA device are usable
    distributed    DST under DistributedDataParallel: the same step on every rank, checked; rank-0 checkpoints
"""
