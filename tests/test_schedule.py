"""DSTConfig's schedule and validation, the scheduler's triggering, and the TopologyUpdate it drives."""

import math

import numpy as np
import pytest
import torch

from dst.core.models import MLP
from dst.csr.mlp import SparseMLP, SparseMLPStep
from dst.engine.distributed import DistributedDSTStep
from dst.engine.masked import MaskedNet
from dst.engine.prune_regrow import MaskedDSTStep, masked_scheduler
from dst.engine.schedule import DSTConfig, DSTScheduler
from dst.engine.topology_update import TopologyUpdate
from dst.engine.update_rule import LayerUpdate
from dst.methods.catalog import METHODS
from dst.methods.sparse_momentum import SparseMomentumStep


def test_constant_schedule_updates_every_n_units():
    config = DSTConfig(prune_ratio=0.1, every=2)
    assert [t for t in range(1, 11) if config.is_update(t)] == [2, 4, 6, 8, 10]
    assert config.prune_ratio_at(7) == 0.1


def test_updates_within_lists_the_units_with_a_step_and_is_empty_when_none_fits():
    assert DSTConfig(every=2, end=9).updates_within(10) == [2, 4, 6, 8]
    assert DSTConfig(every=2, end=1).updates_within(2) == []  # the notebook's 2-epoch quick run
    assert DSTConfig(every=1, end=1).updates_within(2) == [1]


def test_cosine_schedule_decays_to_zero_at_end():
    config = DSTConfig(prune_ratio=0.3, schedule="cosine", every=100, unit="step", end=1000)
    assert config.prune_ratio_at(0) == pytest.approx(0.3)
    assert config.prune_ratio_at(500) == pytest.approx(0.15)
    assert config.prune_ratio_at(250) == pytest.approx(0.3 * (1 + math.cos(math.pi / 4)) / 2)
    assert config.prune_ratio_at(1000) == pytest.approx(0.0, abs=1e-12)
    assert config.prune_ratio_at(1200) == 0.0
    assert not config.is_update(1100) and not config.is_update(1000)
    assert config.is_update(900)


@pytest.mark.parametrize("kwargs, match", [
    ({"prune_ratio": 2.0}, "prune_ratio"), ({"regrow": "magic"}, "regrow"),
    ({"schedule": "linear"}, "schedule"), ({"unit": "batch"}, "unit"), ({"every": 0}, "every"),
    ({"schedule": "cosine"}, "end"), ({"end": -3}, "end"), ({"end": True}, "end"), ({"every": True}, "every"),
    ({"every": 2.0}, "every"),
])
def test_bad_config_is_rejected(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DSTConfig(**kwargs)


def test_scheduler_counts_only_its_unit_and_keeps_history():
    net = MaskedNet(MLP(10, (8,)), 0.5)
    batch = (torch.randn(4, 10), torch.randint(0, 10, (4,)))
    by_epoch = masked_scheduler(net, DSTConfig(every=2, unit="epoch"))
    assert by_epoch.after_step(batch) is None
    assert by_epoch.after_epoch([batch]) is None
    event = by_epoch.after_epoch([batch])
    assert event is not None and event.t == 2 and event.unit == "epoch"
    assert by_epoch.history == [event]
    by_step = masked_scheduler(net, DSTConfig(every=3, unit="step", regrow="gradient"))
    events = [by_step.after_step(batch) for _ in range(6)]
    assert [e is not None for e in events] == [False, False, True, False, False, True]


def test_numpy_integers_are_accepted_and_stored_as_ints():
    config = DSTConfig(every=np.int64(2), end=np.int32(6), schedule="cosine")
    assert type(config.every) is int and type(config.end) is int
    assert [t for t in range(1, 9) if config.is_update(t)] == [2, 4]


class RecordingUpdate:
    """A TopologyUpdate of one's own: records each call and whether it was closed."""

    def __init__(self, needs_batch: bool):
        self.needs_batch = needs_batch
        self.calls: list[tuple[float, object]] = []
        self.closed = False

    def __call__(self, prune_ratio, batch=None):
        self.calls.append((prune_ratio, batch))
        return {"fc1": LayerUpdate(active=5, pruned=1, regrown=1)}

    def close(self):
        self.closed = True


@pytest.mark.parametrize("needs_batch", [False, True])
def test_a_custom_update_gets_the_scheduled_ratios_a_batch_only_if_it_needs_one_and_is_closed(needs_batch):
    config = DSTConfig(prune_ratio=0.4, schedule="cosine", every=2, unit="step", end=9)
    update = RecordingUpdate(needs_batch)
    scheduler = DSTScheduler(config, update)
    batches = [(torch.randn(2, 3), torch.tensor([0, 1])) for _ in range(10)]
    events = [scheduler.after_step(batch) for batch in batches]
    due = config.updates_within(10)
    assert [ratio for ratio, _ in update.calls] == [config.prune_ratio_at(t) for t in due]
    assert [batch for _, batch in update.calls] == [batches[t - 1] if needs_batch else None for t in due]
    assert [event.t for event in events if event is not None] == due == [event.t for event in scheduler.history]
    assert all(event.layers == {"fc1": LayerUpdate(5, 1, 1)} for event in scheduler.history)
    METHODS["snfs"].close(scheduler)  # a method closes its scheduler, which closes the update
    assert update.closed


def test_every_engines_step_is_a_topology_update_that_asks_for_a_batch_only_for_gradients():
    net = MaskedNet(MLP(10, (8,)), 0.5)
    steps = {MaskedDSTStep(net): False, MaskedDSTStep(net, "gradient"): True, DistributedDSTStep(net): False,
             DistributedDSTStep(net, "gradient"): True, SparseMLPStep(SparseMLP.random(10, (8,), 2)): False}
    momentum = SparseMomentumStep(net)
    steps[momentum] = False
    for step, needs_batch in steps.items():
        assert isinstance(step, TopologyUpdate) and step.needs_batch is needs_batch, type(step).__name__
        step.close()
    assert all(layer.apply_mask for layer in net.masked_layers().values())  # the momentum step's hooks are gone


def test_the_scheduler_refuses_what_is_not_a_config_and_an_update():
    net = MaskedNet(MLP(10, (8,)), 0.5)
    with pytest.raises(TypeError, match="masked_scheduler"):
        DSTScheduler(net, DSTConfig())  # the old call, model first
    with pytest.raises(TypeError, match="TopologyUpdate"):
        DSTScheduler(DSTConfig(), net)
    with pytest.raises(TypeError, match="MaskedNet"):
        MaskedDSTStep(MLP(10, (8,)))
    with pytest.raises(ValueError, match="cannot regrow by 'gradient'"):
        SparseMLPStep(SparseMLP.random(10, (8,), 2), "gradient")


def test_a_scheduler_refuses_an_update_whose_criterion_is_not_its_configs():
    net = MaskedNet(torch.nn.Sequential(torch.nn.Linear(8, 4)), 0.5)
    with pytest.raises(ValueError, match="regrows by 'gradient' but config.regrow is 'random'"):
        DSTScheduler(DSTConfig(regrow="random"), MaskedDSTStep(net, regrow="gradient"))
    assert DSTScheduler(DSTConfig(regrow="gradient"), MaskedDSTStep(net, regrow="gradient")).update.needs_batch
