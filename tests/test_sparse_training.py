"""Truly sparse training: agreement with the masked torch net, DST invariants, memory, bad input."""

import copy
import importlib.util
import time
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dst.core.models import MLP
from dst.csr import backends, comparison, optimizers
from dst.csr.backends import TRAINING_BACKENDS, get_backend, numba_available
from dst.csr.comparison import masked_dense_nbytes, train_masked_mlp, train_sparse_mlp
from dst.csr.mlp import SparseMLP
from dst.csr.optimizers import OptimizerConfig, torch_optimizer
from dst.engine import update_rule
from dst.engine.masked import MaskedNet
from dst.engine.prune_regrow import apply_dst_step
from dst.engine.schedule import DSTConfig
from dst.engine.update_rule import sample_inactive

BACKENDS = ["scipy", pytest.param("numba", marks=pytest.mark.skipif(
    importlib.util.find_spec("numba") is None, reason="numba is not installed (optional backend)"))]
OPTIMIZER_CONFIGS = {
    "sgd": OptimizerConfig(lr=0.1, momentum=0.9, weight_decay=1e-3),
    "sgd_plain": OptimizerConfig(lr=0.1, momentum=0.0, weight_decay=0.0),
    # eps 1e-4, not 1e-8: Adam divides by sqrt(v) + eps, so where a gradient is ~1e-7 (float32 rounding of a
    # cancelling sum) a tiny eps turns a rounding difference into a full-size lr step. (Example: sparsity 0,
    # hidden [6], in 6, classes 4, batch 8, seed 30 differed by 1.6e-5 with eps 1e-8.)
    "adam": OptimizerConfig(name="adam", lr=1e-2, weight_decay=1e-3, eps=1e-4),
}


def masked_mlp(in_features, hidden, classes, sparsity, seed=0, allocation="uniform"):
    torch.manual_seed(seed)
    return MaskedNet(MLP(in_features, hidden, classes), sparsity=sparsity, allocation=allocation,
                     generator=torch.Generator().manual_seed(seed))


def torch_step(net, optimizer, inputs, targets) -> float:
    optimizer.zero_grad()
    loss = F.cross_entropy(net(inputs), targets)
    loss.backward()
    optimizer.step()
    return loss.item()


def assert_same_network(sparse: SparseMLP, net: MaskedNet):
    """Same active positions, same weights there (float tolerance), same biases."""
    for name, layer in net.masked_layers().items():
        sparse_layer = sparse.layers[name]
        mask = layer.mask.reshape(-1).numpy()
        np.testing.assert_array_equal(sparse_layer.positions(), np.flatnonzero(mask))
        dense = sparse_layer.to_dense()
        np.testing.assert_allclose(dense, layer.weight.detach().numpy(), rtol=1e-4, atol=1e-6)
        assert np.all(dense.reshape(-1)[~mask] == 0) and torch.all(layer.weight.reshape(-1)[~mask] == 0)
        np.testing.assert_allclose(sparse_layer.bias, layer.bias.detach().numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZER_CONFIGS))
@settings(max_examples=12, deadline=None)
@given(sparsity=st.sampled_from([0.0, 0.5, 0.8, 0.95]), hidden=st.lists(st.integers(1, 12), min_size=1,
       max_size=2), in_features=st.integers(1, 10), classes=st.integers(2, 5), batch=st.integers(1, 9),
       seed=st.integers(0, 100))
def test_training_steps_match_the_masked_torch_net(backend, optimizer_name, sparsity, hidden, in_features,
                                                   classes, batch, seed):
    config = OPTIMIZER_CONFIGS[optimizer_name]
    net = masked_mlp(in_features, tuple(hidden), classes, sparsity, seed)
    sparse = SparseMLP.from_masked(net, config, backend=backend)
    optimizer = torch_optimizer(config, net.parameters())
    generator = torch.Generator().manual_seed(seed)
    for _ in range(3):  # several steps, so momentum and Adam's moments take part
        inputs = torch.randn(batch, in_features, generator=generator)
        targets = torch.randint(0, classes, (batch,), generator=generator)
        expected_loss = torch_step(net, optimizer, inputs, targets)
        assert sparse.train_step(inputs, targets) == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)
        assert_same_network(sparse, net)
    np.testing.assert_allclose(sparse.predict(inputs), net(inputs).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_through_a_masked_net(backend):
    sparse = SparseMLP.random(30, (20, 15), 4, sparsity=0.7, allocation="erk", seed=3, backend=backend)
    back = SparseMLP.from_masked(sparse.to_masked(), backend=backend)
    for name, layer in sparse.layers.items():
        np.testing.assert_array_equal(layer.to_dense(), back.layers[name].to_dense())
        np.testing.assert_array_equal(layer.bias, back.layers[name].bias)


def train_a_little(sparse: SparseMLP, steps=4, seed=0):
    rng = np.random.default_rng(seed)
    in_features = sparse.layers["fc1"].shape[1]
    classes = list(sparse.layers.values())[-1].shape[0]
    for _ in range(steps):
        sparse.train_step(rng.standard_normal((16, in_features)), rng.integers(0, classes, 16))


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
@settings(max_examples=30, deadline=None)
@given(sparsity=st.floats(0.0, 0.97), prune_ratio=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_topology_update_keeps_counts_moves_only_inactive_positions_and_resets_state(
        optimizer_name, sparsity, prune_ratio, seed):
    sparse = SparseMLP.random(20, (30,), 5, sparsity=sparsity, optimizer=OPTIMIZER_CONFIGS[optimizer_name],
                              seed=seed)
    train_a_little(sparse, seed=seed)
    before = {name: (layer.positions(), layer.weight.copy(), {k: v.copy() for k, v in layer.state.items()})
              for name, layer in sparse.layers.items()}
    report = sparse.update_topology(prune_ratio)
    for name, layer in sparse.layers.items():
        old_positions, old_weight, old_state = before[name]
        new_positions = layer.positions()
        numel = layer.shape[0] * layer.shape[1]
        expected = min(round(prune_ratio * len(old_positions)), numel - len(old_positions))
        regrown = np.setdiff1d(new_positions, old_positions)
        pruned = np.setdiff1d(old_positions, new_positions)
        assert len(new_positions) == len(old_positions) == layer.active_count == report[name].active
        assert len(regrown) == len(pruned) == expected == report[name].pruned == report[name].regrown
        assert np.all(np.diff(new_positions) > 0)  # still a valid, sorted CSR pattern
        if expected:
            assert np.abs(old_weight[np.isin(old_positions, pruned)]).max() <= \
                np.abs(old_weight[~np.isin(old_positions, pruned)]).min(initial=np.inf)
        new_of_regrown = np.isin(new_positions, regrown)
        assert np.all(layer.weight[new_of_regrown] == 0)
        survivors_old = np.isin(old_positions, new_positions)
        np.testing.assert_array_equal(layer.weight[~new_of_regrown], old_weight[survivors_old])
        for key, values in layer.state.items():
            assert np.all(values[new_of_regrown] == 0)
            np.testing.assert_array_equal(values[~new_of_regrown], old_state[key][survivors_old])
        assert len(layer.weight_grad) == len(layer.columns) == layer.active_count


def test_prunes_the_same_weights_as_the_masked_dst_step():
    net = masked_mlp(40, (30,), 6, sparsity=0.6, seed=4)
    sparse = SparseMLP.from_masked(net)
    before = {name: layer.mask.clone() for name, layer in net.masked_layers().items()}
    apply_dst_step(net, prune_ratio=0.25, generator=torch.Generator().manual_seed(0))
    sparse_report = sparse.update_topology(0.25)
    for name, layer in net.masked_layers().items():
        torch_pruned = np.flatnonzero((before[name] & ~layer.mask).reshape(-1).numpy())
        old = np.flatnonzero(before[name].reshape(-1).numpy())
        sparse_pruned = np.setdiff1d(old, sparse.layers[name].positions())
        np.testing.assert_array_equal(sparse_pruned, torch_pruned)
        assert sparse_report[name].pruned == len(torch_pruned)


def test_dense_layer_has_nothing_to_regrow():
    sparse = SparseMLP.random(8, (6,), 3, sparsity=0.0)
    assert all(update.pruned == 0 for update in sparse.update_topology(0.5).values())


def test_sample_inactive_is_uniform_over_free_positions_and_avoids_active():
    rng = np.random.default_rng(0)
    active = np.array([0, 3, 4, 9], dtype=np.int64)
    counts = np.zeros(12)
    for _ in range(3000):
        drawn = sample_inactive(active, 12, 3, rng)
        assert len(np.unique(drawn)) == 3 and not np.isin(drawn, active).any()
        counts[drawn] += 1
    free = np.setdiff1d(np.arange(12), active)
    assert np.all(counts[active] == 0)
    np.testing.assert_allclose(counts[free] / 3000, 3 / 8, atol=0.04)
    assert len(sample_inactive(np.arange(0, 100, 2), 100, 50, rng)) == 50  # listing path, full
    with pytest.raises(ValueError, match="inactive"):
        sample_inactive(np.arange(0, 100, 2), 100, 51, rng)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_dense_sized_array_is_ever_allocated(backend):
    # fc2 is 20000 x 20000: its dense float32 weight would be 1.6 GB and a bool mask 400 MB.
    tracemalloc.start()
    try:
        sparse = SparseMLP.random(784, (20000, 20000), 10, sparsity=0.9999, allocation="uniform",
                                  backend=backend)
        train_a_little(sparse, steps=2)
        sparse.update_topology(0.3)
        train_a_little(sparse, steps=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40e6, f"peak {peak / 1e6:.0f} MB"
    for layer in sparse.layers.values():
        for name, values in layer.arrays().items():
            assert values.size <= max(layer.active_count, layer.shape[0] + 1), name
    nnz = sum(sparse.active_counts().values())
    assert sparse.nbytes() <= 20 * nnz + 4 * 4 * (20000 + 20000 + 10 + 3)


def test_dense_footprint_formula_matches_the_torch_tensors():
    net = masked_mlp(12, (9, 7), 3, sparsity=0.5)
    config = OPTIMIZER_CONFIGS["adam"]
    optimizer = torch_optimizer(config, net.parameters())
    torch_step(net, optimizer, torch.randn(4, 12), torch.tensor([0, 1, 2, 0]))
    held = [tensor for tensor in net.state_dict().values()]
    held += [p.grad for p in net.parameters()]
    held += [v for state in optimizer.state.values() for v in state.values() if v.dim() > 0]
    actual = sum(t.numel() * t.element_size() for t in held)
    assert masked_dense_nbytes((12, 9, 7, 3), config) == actual


def test_same_seed_same_run_and_other_seed_other_run():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((96, 20)), rng.integers(0, 4, 96)
    dst = DSTConfig(prune_ratio=0.3, every=2, unit="step")
    runs = []
    for seed in (7, 7, 8):
        sparse = SparseMLP.random(20, (16,), 4, sparsity=0.8, seed=seed)
        history = sparse.fit(x, y, epochs=2, batch_size=16, dst=dst)
        runs.append((history["epoch_losses"], {name: layer.to_dense() for name, layer in sparse.layers.items()}))
        assert history["dst_updates"] == 6
    assert runs[0][0] == runs[1][0]
    assert all(np.array_equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])
    assert not np.array_equal(runs[0][1]["fc1"], runs[2][1]["fc1"])


def test_sparse_fan_in_init_scales_like_the_masked_net():
    sparse = SparseMLP.random(400, (300,), 10, sparsity=0.96, allocation="uniform")
    net = masked_mlp(400, (300,), 10, sparsity=0.96)
    sparse_std = sparse.layers["fc1"].weight.std()
    masked_std = net.masked_layers()["fc1"].weight[net.masked_layers()["fc1"].mask].std().item()
    assert sparse_std == pytest.approx(masked_std, rel=0.1)
    assert sparse_std == pytest.approx(1 / np.sqrt(3 * 400 * 0.04), rel=0.1)


def test_both_trainers_report_the_same_metrics_on_synthetic_data(tiny_loader, monkeypatch):
    images, labels = tiny_loader.dataset.tensors
    trained = {}  # each trainer's net as it is evaluated, for the accuracy oracle below
    sparse_evaluate, masked_evaluate = SparseMLP.evaluate, comparison.evaluate

    def keep_sparse(model, *args, **kwargs):
        trained["sparse"] = model.to_masked()
        return sparse_evaluate(model, *args, **kwargs)

    def keep_masked(net, *args, **kwargs):
        trained["masked"] = copy.deepcopy(net)
        return masked_evaluate(net, *args, **kwargs)

    monkeypatch.setattr(SparseMLP, "evaluate", keep_sparse)
    monkeypatch.setattr(comparison, "evaluate", keep_masked)
    kwargs = dict(hidden=(32, 32), sparsity=0.5, epochs=3, batch_size=16,
                  optimizer=OptimizerConfig(lr=0.05), dst=DSTConfig(prune_ratio=0.2, every=2, unit="step"))
    sparse = train_sparse_mlp(images, labels, images, labels, **kwargs)
    masked = train_masked_mlp(images.numpy(), labels.numpy(), images, labels, **kwargs)
    assert sparse.keys() == masked.keys()
    for name, metrics in (("sparse", sparse), ("masked", masked)):
        assert metrics["steps"] == 12 and metrics["dst_updates"] == 6 and len(metrics["epoch_losses"]) == 3
        assert metrics["active_weights"] < metrics["total_weights"]
        # Oracle: the trained net's share of right answers on the test set, in percent.
        with torch.no_grad():
            right = int((trained[name](images.reshape(len(images), -1)).argmax(1) == labels).sum())
        assert metrics["test_accuracy"] == 100.0 * right / len(labels), name
    assert sparse["active_weights"] == masked["active_weights"]
    assert sparse["weight_optimizer_bytes"] < masked["weight_optimizer_bytes"]
    assert sparse["dense_weight_optimizer_bytes"] == masked["weight_optimizer_bytes"]


def test_warm_up_leaves_the_model_as_it_was():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((64, 20)).astype(np.float32), rng.integers(0, 4, 64)
    dst = DSTConfig(prune_ratio=0.3, every=2, unit="step")
    warmed, cold = (SparseMLP.random(20, (16,), 4, sparsity=0.8, seed=3) for _ in range(2))
    assert warmed.warm_up(x[:16], y[:16]) > 0
    warm_losses = warmed.fit(x, y, epochs=2, batch_size=16, dst=dst)["epoch_losses"]
    assert warm_losses == cold.fit(x, y, epochs=2, batch_size=16, dst=dst)["epoch_losses"]
    for name, layer in warmed.layers.items():
        np.testing.assert_array_equal(layer.to_dense(), cold.layers[name].to_dense())


@pytest.mark.parametrize("trainer", [train_sparse_mlp, train_masked_mlp])
def test_first_call_costs_are_reported_apart_from_the_step_time(trainer, tiny_loader, monkeypatch):
    """A slow first call (numba compiling) lands in warmup_s, never in step_time_ms."""
    images, labels = tiny_loader.dataset.tensors
    first_call_seconds, calls = 0.4, []
    original = SparseMLP.train_step if trainer is train_sparse_mlp else torch.optim.Optimizer.zero_grad

    def slow_first_call(self, *args, **kwargs):
        if not calls:
            time.sleep(first_call_seconds)
        calls.append(1)
        return original(self, *args, **kwargs)

    owner = SparseMLP if trainer is train_sparse_mlp else torch.optim.Optimizer
    monkeypatch.setattr(owner, "train_step" if trainer is train_sparse_mlp else "zero_grad", slow_first_call)
    metrics = trainer(images, labels, images, labels, hidden=(16,), sparsity=0.5, epochs=1, batch_size=16)
    assert metrics["warmup_s"] >= first_call_seconds
    assert metrics["step_time_ms"] * metrics["steps"] < 1e3 * first_call_seconds


@pytest.mark.parametrize("call, error, match", [
    (lambda: SparseMLP.random(sparsity=1.0), ValueError, "sparsity"),
    (lambda: SparseMLP.random(sparsity="0.9"), TypeError, "sparsity"),
    (lambda: SparseMLP.random(hidden=(10, 0)), ValueError, "positive ints"),
    (lambda: SparseMLP.random(hidden=1000), ValueError, "tuple of widths"),
    (lambda: SparseMLP.random(10, (5,), 3).update_topology(1.5), ValueError, "prune_ratio"),
    (lambda: SparseMLP.random(allocation="dense"), ValueError, "erk"),
    (lambda: SparseMLP.random(10, (5,), backend="jax"), ValueError, r"\['cupy', 'numba', 'scipy', 'torch'\]"),
    (lambda: OptimizerConfig(name="rmsprop"), ValueError, r"\['adam', 'sgd'\]"),
    (lambda: OptimizerConfig(lr=-1.0), ValueError, "lr"),
    (lambda: OptimizerConfig(momentum=1.0), ValueError, "momentum"),
    (lambda: SparseMLP.from_masked(MLP(10, (5,))), TypeError, "MaskedNet"),
    (lambda: SparseMLP.random(10, (5,), 3).train_step(np.zeros((4, 9)), [0, 1, 2, 0]), ValueError, "features"),
    (lambda: SparseMLP.random(10, (5,), 3).train_step(np.zeros((4, 10)), [0, 1, 3, 0]), ValueError, "labels"),
    (lambda: SparseMLP.random(10, (5,), 3).train_step(np.zeros((4, 10)), [0, 1]), ValueError, "length"),
    (lambda: SparseMLP.random(10, (5,), 3).fit(np.zeros((4, 10)), [0] * 4, batch_size=0), ValueError,
     "batch_size"),
    (lambda: SparseMLP.random(10, (5,), 3).fit(np.zeros((4, 10)), [0] * 4,
                                                dst=DSTConfig(regrow="gradient")), ValueError, "RigL"),
])
def test_bad_arguments_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_sparse_optimizer_without_a_torch_twin_is_refused_by_name(monkeypatch):
    monkeypatch.setitem(optimizers.OPTIMIZERS, "rmsprop", optimizers.SparseSGD)  # added, its twin forgotten
    with pytest.raises(ValueError, match=r"'rmsprop' has no torch twin; those with one are \['adam', 'sgd'\]"):
        torch_optimizer(OptimizerConfig(name="rmsprop"), [torch.zeros(1, requires_grad=True)])


TINY = (np.zeros((6, 10), np.float32), np.array([0, 1, 2, 0, 1, 2]))
TRAINERS = {"sparse": train_sparse_mlp, "masked": train_masked_mlp}


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
@pytest.mark.parametrize("data, error, match", [
    ((TINY[0], TINY[1] + 0.7), TypeError, "integer class indices"),  # 3.7 would have trained as class 3
    ((TINY[0], torch.tensor(TINY[1], dtype=torch.float32)), TypeError, "float32"),
    ((TINY[0][:0], TINY[1][:0]), ValueError, "training data is empty"),
    ((TINY[0], TINY[1][:4]), ValueError, "differ in length: 6 vs 4"),
])
def test_trainers_refuse_bad_training_data_before_training(trainer, data, error, match):
    with pytest.raises(error, match=match):
        TRAINERS[trainer](*data, *TINY, hidden=(4,), max_batches=1)
    with pytest.raises(error, match=match.replace("training", "test")):
        TRAINERS[trainer](*TINY, *data, hidden=(4,), max_batches=1)


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_a_bare_width_for_hidden_is_named(trainer):
    with pytest.raises(ValueError, match=r"hidden must be a tuple of widths, e.g. \(16, 16\)"):
        TRAINERS[trainer](*TINY, *TINY, hidden=16, max_batches=1)
    result = TRAINERS[trainer](*TINY, *TINY, hidden=(np.int64(4),), max_batches=1, epochs=np.int64(1))
    assert result["widths"] == [10, 4, 10] and all(type(width) is int for width in result["widths"])


@pytest.mark.parametrize("field", ["lr", "momentum", "weight_decay", "eps"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_optimizer_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        OptimizerConfig(**{field: value})
    assert OptimizerConfig(lr=np.float32(0.1)).lr == pytest.approx(0.1)  # numpy floats are numbers too


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="cupy is installed")
def test_cupy_backend_without_cupy_says_what_is_missing():
    with pytest.raises(RuntimeError, match="cupy"):
        SparseMLP.random(10, (5,), 3, backend="cupy")


def test_torch_backend_is_inference_only_and_names_the_backends_that_train():
    with pytest.raises(ValueError, match=r"'torch' runs inference only.*\['cupy', 'numba', 'scipy'\]"):
        SparseMLP.random(10, (5,), 3, backend="torch")
    installed = ["scipy", *(["numba"] if numba_available() else [])]
    assert all(get_backend(name).training is not None for name in installed)
    assert set(installed) <= set(TRAINING_BACKENDS) and set(TRAINING_BACKENDS) < set(backends.BACKENDS)


def test_random_regrowth_by_rejection_is_uniform_over_free_positions(monkeypatch):
    monkeypatch.setattr(update_rule, "LIST_INACTIVE_UP_TO", 0)  # the path of layers too large to list
    rng = np.random.default_rng(1)
    active = np.array([1, 5, 6], dtype=np.int64)
    counts = np.zeros(16)
    for _ in range(3000):
        drawn = sample_inactive(active, 16, 2, rng)
        assert len(np.unique(drawn)) == 2 and not np.isin(drawn, active).any() and np.all(np.diff(drawn) > 0)
        counts[drawn] += 1
    np.testing.assert_allclose(counts[np.setdiff1d(np.arange(16), active)] / 3000, 2 / 13, rtol=0.15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_engines_make_the_same_dst_step_from_the_same_generator(backend):
    net = masked_mlp(40, (30, 20), 6, sparsity=0.7, seed=2)
    sparse = SparseMLP.from_masked(net, backend=backend)
    masked_report = apply_dst_step(net, prune_ratio=0.3, generator=torch.Generator().manual_seed(3))
    sparse_report = sparse.update_topology(0.3, random=torch.Generator().manual_seed(3))
    assert sparse_report == masked_report
    assert_same_network(sparse, net)


def test_the_truly_sparse_trainer_refuses_a_criterion_whose_dense_signal_it_never_forms():
    from dst.csr.linear import trainable_regrow

    for name in ("gradient", "momentum"):
        with pytest.raises(ValueError, match=f"cannot regrow by '{name}'.*the dense {name}.*\\['random'\\]"):
            trainable_regrow(name)
