"""DSTConfig's schedule and validation, and the scheduler's triggering."""

import math

import numpy as np
import pytest
import torch

from dst.core.models import MLP
from dst.engine.masked import MaskedNet
from dst.engine.schedule import DSTConfig, DSTScheduler


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
    by_epoch = DSTScheduler(net, DSTConfig(every=2, unit="epoch"))
    assert by_epoch.after_step(batch) is None
    assert by_epoch.after_epoch([batch]) is None
    event = by_epoch.after_epoch([batch])
    assert event is not None and event.t == 2 and event.unit == "epoch"
    assert by_epoch.history == [event]
    by_step = DSTScheduler(net, DSTConfig(every=3, unit="step", regrow="gradient"))
    events = [by_step.after_step(batch) for _ in range(6)]
    assert [e is not None for e in events] == [False, False, True, False, False, True]


def test_numpy_integers_are_accepted_and_stored_as_ints():
    config = DSTConfig(every=np.int64(2), end=np.int32(6), schedule="cosine")
    assert type(config.every) is int and type(config.end) is int
    assert [t for t in range(1, 9) if config.is_update(t)] == [2, 4]
