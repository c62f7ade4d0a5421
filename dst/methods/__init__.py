"""The decade of DST methods, built on the simulated engine, and the sweep that trains them alike.

``catalog`` names the methods (``METHODS``: dense, static, SET, RigL, SRigL, SNFS, GMP, each with its paper's
settings) and the ``Target`` they are compared at; ``sparse_momentum`` and ``gradual_pruning`` are the two
methods whose step is not the engine's prune-and-regrow; ``sweep`` trains methods x sparsities and summarises
them in tables. It may import ``dst.core`` and ``dst.engine``; it never imports the truly sparse engine
(``dst.csr``, its sibling) nor the tutorial's bookkeeping (``dst.tutorial``, above it).
"""
