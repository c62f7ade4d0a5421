"""What a topology update is, for ``DSTScheduler``: one typed protocol that every engine's DST step implements.

The scheduler decides *when* an update happens and *how much* it moves (the prune ratio); a
``TopologyUpdate`` decides *what* moves. Everything fixed for a run (the model, the regrow
criterion, the optimizer whose state is reset, the loss, the random source) is given when the
update is built, so a call carries only what changes between updates.

The implementations: ``dst.engine.prune_regrow.MaskedDSTStep`` (the simulated engine),
``dst.engine.distributed.DistributedDSTStep`` (the same on every rank of a DDP job),
``dst.csr.mlp.SparseMLPStep`` (the truly sparse trainer) and
``dst.methods.sparse_momentum.SparseMomentumStep`` (SNFS).
"""

from typing import Protocol, runtime_checkable

from dst.core.training import Batch
from dst.engine.update_rule import LayerUpdate


@runtime_checkable
class TopologyUpdate(Protocol):
    """One prune-and-regrow update of a fixed model; ``DSTScheduler`` calls it when an update is due."""

    # Whether a call needs a batch (a criterion that reads the dense loss gradient, as RigL's does):
    # the scheduler draws one from the loader, or passes the step's batch, only then, and None otherwise.
    needs_batch: bool

    def __call__(self, prune_ratio: float, batch: Batch | None = None) -> dict[str, LayerUpdate]:
        """Move ``prune_ratio`` of each layer's active weights; a report per layer."""
        ...

    def close(self) -> None:
        """Release what the update holds (hooks, buffers) once training is over; nothing for most."""
        ...
