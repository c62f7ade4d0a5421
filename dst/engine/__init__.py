"""The simulated engine: dense weights under boolean masks, and the one DST step on them.

What a masked layer is (``masked_layers``) and a masked model (``masked``), how a global sparsity is split over
layers (``allocation``), which sets of weights a layer may hold (``patterns``: unstructured, constant fan-in, N:M,
blocks; one module each), optimizer state held at zero for inactive weights (``optimizer_state``), the one
prune-and-regrow rule both engines call (``update_rule``), that rule applied to a masked model
(``prune_regrow``: ``MaskedDSTStep``), what a topology update is (``topology_update``: the ``TopologyUpdate``
protocol every engine's step implements), when updates happen (``schedule``: ``DSTConfig``, ``DSTScheduler``, for
either engine), the dense-gradient momentum of every weight (``momentum``, what sparse momentum regrows by)
and the same step under DistributedDataParallel (``distributed``; ``process_group`` holds the two facts about a
process group the lower modules ask). It may import ``dst.core``
only; the truly sparse engine, the methods and the tutorial's bookkeeping build on it and are never imported here.
"""
