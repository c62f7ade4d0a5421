"""The plain PyTorch pieces, nothing sparse: the models, MNIST, the training loops, and small shared helpers.

The bottom of the package: every other part may import it, and it imports nothing from ``dst`` outside
itself (the order, lowest first: ``core`` < ``engine`` < ``csr`` and ``methods`` < ``tutorial``; checked by
``tests/test_layers.py``). Modules: ``models`` (SimpleNet, MLP, LeNet-300-100), ``data`` (MNIST as tensors,
``python -m dst.core.data DIR`` fetches it), ``training`` (train_epoch, evaluate, the batch format),
``checks`` (argument checks), ``progress`` (one progress line per loop), ``gpu`` (whether cupy can be used).
"""
