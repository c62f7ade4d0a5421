"""The fast CPU training path computes exactly what the plain one does: layouts, masking modes, two nets at once."""

import copy
import threading
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dst.core.data import TensorLoader, channels_last
from dst.core.models import SimpleNet
from dst.core.training import train_and_evaluate
from dst.engine.masked import MaskedNet
from dst.engine.prune_regrow import masked_scheduler
from dst.engine.schedule import DSTConfig
from dst.tutorial.side_by_side import Run, train_side_by_side

SEED_ORDER = ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten", "fc1", "relu3", "fc2", "relu4",
              "fc3", "relu5", "fc4"]


def images(count=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 1, 28, 28, generator=generator), torch.randint(0, 10, (count,), generator=generator)


def test_pooling_before_relu_is_the_seed_function_bitwise():
    net = SimpleNet()
    seed = nn.Sequential(OrderedDict((name, net.get_submodule(name)) for name in SEED_ORDER))
    x, _ = images()
    assert torch.equal(net(x), seed(x))


def test_channels_last_batches_hold_the_same_values_and_make_the_convs_channels_last():
    x, _ = images(4)
    converted = channels_last(x)
    assert torch.equal(converted, x)
    assert converted.stride() == (784, 1, 28, 1)
    assert SimpleNet().conv1(converted).is_contiguous(memory_format=torch.channels_last)
    loader = TensorLoader(*images(10), batch_size=4, shuffle=True, seed=3, channels_last=True)
    plain = TensorLoader(*images(10), batch_size=4, shuffle=True, seed=3)
    for (a, y_a), (b, y_b) in zip(loader, plain, strict=True):
        assert torch.equal(a, b) and torch.equal(y_a, y_b) and a.stride()[1] == 1


def test_a_clone_yields_the_batches_of_a_fresh_loader_and_shuffles_on_its_own():
    loader = TensorLoader(*images(20), batch_size=6, shuffle=True, seed=5)
    twin = loader.clone()
    first = [y for _, y in loader]
    assert [y.tolist() for _, y in twin] == [y.tolist() for y in first]
    assert [y.tolist() for _, y in twin] == [y.tolist() for _, y in loader]  # both on their second epoch
    assert twin.images is loader.images  # no copy of the data


def train_steps(net, steps=4, seed=0):
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = images(16, seed)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(net(channels_last(x)), y).backward()
        optimizer.step()
    return optimizer


def test_gradient_masking_trains_exactly_like_masking_in_the_forward():
    torch.manual_seed(0)
    base = SimpleNet()
    nets = {masking: MaskedNet(base, 0.9, "erk", generator=torch.Generator().manual_seed(1), masking=masking)
            for masking in ("gradient", "forward")}
    optimizers = {masking: train_steps(net) for masking, net in nets.items()}
    for name, layer in nets["gradient"].masked_layers().items():
        other = nets["forward"].masked_layers()[name]
        assert torch.equal(layer.weight, other.weight)
        assert not layer.weight[~layer.mask].any()
        for key, value in optimizers["gradient"].state[layer.weight].items():
            assert torch.equal(value, optimizers["forward"].state[other.weight][key])


def test_unknown_masking_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown masking 'weights'.*\['gradient', 'forward'\]"):
        MaskedNet(SimpleNet(), 0.9, masking="weights")


def runs_and_loaders(seed=0):
    torch.manual_seed(seed)
    dense = SimpleNet()
    masked = MaskedNet(dense, 0.9, "erk", generator=torch.Generator().manual_seed(seed))
    loader = TensorLoader(*images(48, seed), batch_size=16, shuffle=True, seed=seed, channels_last=True)
    test = TensorLoader(*images(20, seed + 1), batch_size=10, channels_last=True)
    return [Run(net, torch.optim.Adam(net.parameters(), lr=1e-3), loader.clone()) for net in (dense, masked)], test


def test_side_by_side_equals_each_net_trained_alone_on_one_thread():
    runs, test = runs_and_loaders()
    alone = [copy.deepcopy(run) for run in runs]
    results = [train_side_by_side(runs, test, F.cross_entropy, "cpu", progress=False) for _ in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = [[train_and_evaluate(run.model, run.train_loader, test, F.cross_entropy, run.optimizer, "cpu",
                                        progress=False) for run in alone] for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads  # restored
    for got_epoch, expected_epoch in zip(results, expected, strict=True):
        for got, want in zip(got_epoch, expected_epoch, strict=True):
            assert {key: got[key] for key in ("train_loss", "train_acc", "test_loss", "test_acc")} == \
                   {key: want[key] for key in ("train_loss", "train_acc", "test_loss", "test_acc")}
            assert got["wall_seconds"] >= got["train_seconds"] > 0
    for run, reference in zip(runs, alone, strict=True):
        for (name, value), (_, other) in zip(run.model.state_dict().items(), reference.model.state_dict().items()):
            assert torch.equal(value, other), name


def test_one_thread_runs_them_one_after_the_other_with_the_same_results(monkeypatch):
    runs, test = runs_and_loaders(seed=2)
    reference, _ = runs_and_loaders(seed=2)
    expected = train_side_by_side(reference, test, F.cross_entropy, "cpu", progress=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    got = train_side_by_side(runs, test, F.cross_entropy, "cpu", progress=False)
    assert [r["train_loss"] for r in got] == [r["train_loss"] for r in expected]


def test_a_shared_loader_is_refused_and_errors_in_a_thread_reach_the_caller():
    runs, test = runs_and_loaders()
    with pytest.raises(ValueError, match="its own train_loader"):
        train_side_by_side([runs[0], Run(runs[1].model, runs[1].optimizer, runs[0].train_loader)], test,
                           F.cross_entropy, "cpu")
    bad = TensorLoader(torch.randn(8, 1, 28, 28), torch.full((8,), 12), batch_size=4)  # label 12 of 10 classes
    with pytest.raises(IndexError, match="Target 12 is out of bounds"):  # cross_entropy's own error, as raised
        train_side_by_side([runs[0], Run(runs[1].model, runs[1].optimizer, bad)], test, F.cross_entropy, "cpu",
                           progress=False)


def test_shared_models_optimizers_and_parameters_are_refused_before_any_thread_starts():
    runs, test = runs_and_loaders()
    dense, masked = runs
    other_loader = dense.train_loader.clone()
    with pytest.raises(ValueError, match="runs 0 and 1 share one model"):
        train_side_by_side([dense, Run(dense.model, torch.optim.Adam(dense.model.parameters()), other_loader)],
                           test, F.cross_entropy, "cpu", progress=False)
    with pytest.raises(ValueError, match="runs 0 and 1 share one optimizer"):
        train_side_by_side([dense, Run(copy.deepcopy(dense.model), dense.optimizer, other_loader)], test,
                           F.cross_entropy, "cpu", progress=False)
    twin = nn.Sequential(*dense.model)  # new container, the same layers
    with pytest.raises(ValueError, match="share one parameter"):
        train_side_by_side([dense, Run(twin, torch.optim.Adam(twin.parameters()), other_loader)], test,
                           F.cross_entropy, "cpu", progress=False)
    with pytest.raises(ValueError, match="steps none of its model's parameters"):
        # the optimizer built on the base net before wrapping it: the masked copy would never train
        train_side_by_side([dense, Run(masked.model, torch.optim.Adam(SimpleNet().parameters()), other_loader)],
                           test, F.cross_entropy, "cpu", progress=False)


def test_loaders_shuffling_from_the_global_generator_are_refused_and_own_generators_accepted():
    runs, test = runs_and_loaders()
    dataset = torch.utils.data.TensorDataset(*images(32))
    unseeded = [torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True) for _ in runs]
    with pytest.raises(ValueError, match="global random generator"):
        train_side_by_side([Run(run.model, run.optimizer, loader) for run, loader in zip(runs, unseeded)], test,
                           F.cross_entropy, "cpu", progress=False)
    shared = torch.Generator().manual_seed(0)
    one_source = [torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True, generator=shared) for _ in runs]
    with pytest.raises(ValueError, match="one torch.Generator"):
        train_side_by_side([Run(run.model, run.optimizer, loader) for run, loader in zip(runs, one_source)], test,
                           F.cross_entropy, "cpu", progress=False)
    seeded = [torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True,
                                          generator=torch.Generator().manual_seed(0)) for _ in runs]
    results = train_side_by_side([Run(run.model, run.optimizer, loader) for run, loader in zip(runs, seeded)], test,
                                 F.cross_entropy, "cpu", progress=False)
    assert len(results) == 2
    batches = (batch for batch in [(torch.randn(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))])
    with pytest.raises(TypeError, match="re-iterable with a length .* got a generator"):
        train_side_by_side([runs[0], Run(runs[1].model, runs[1].optimizer, batches)], test, F.cross_entropy, "cpu",
                           progress=False)


class FailingLoader:
    """Yields one batch of ``loader``, then raises an error that names the thread it was raised in."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        yield next(iter(self.loader))
        raise OSError(f"disk gone while reading batch 2 in {threading.current_thread().name}")


def test_an_error_in_a_worker_thread_reaches_the_caller_as_raised(monkeypatch):
    runs, test = runs_and_loaders()
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the concurrent path, whatever this machine has
    try:
        with pytest.raises(OSError, match="disk gone while reading batch 2 in ") as caught:
            train_side_by_side([runs[0], Run(runs[1].model, runs[1].optimizer, FailingLoader(runs[1].train_loader))],
                               test, F.cross_entropy, "cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert not str(caught.value).endswith(threading.main_thread().name)  # raised in a worker, re-raised here


def test_a_runs_step_based_dst_updates_side_by_side_as_it_does_alone():
    def with_rigl(seed):
        runs, test = runs_and_loaders(seed)
        masked = runs[1]
        config = DSTConfig(prune_ratio=0.3, regrow="gradient", schedule="cosine", every=2, unit="step", end=5)
        runs[1] = Run(masked.model, masked.optimizer, masked.train_loader,
                      masked_scheduler(masked.model, config, optimizer=masked.optimizer))
        return runs, test

    runs, test = with_rigl(3)
    train_side_by_side(runs, test, F.cross_entropy, "cpu", progress=False)
    alone, _ = with_rigl(3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_and_evaluate(alone[1].model, alone[1].train_loader, test, F.cross_entropy, alone[1].optimizer, "cpu",
                           dst=alone[1].dst, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert [event.t for event in runs[1].dst.history] == [2] == [event.t for event in alone[1].dst.history]
    assert runs[1].dst.steps == 3  # 48 images in batches of 16
    for (name, value), (_, other) in zip(runs[1].model.state_dict().items(), alone[1].model.state_dict().items()):
        assert torch.equal(value, other), name
