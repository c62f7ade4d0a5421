"""DST under DDP: 2 CPU ranks (gloo) spawned by the tests, compared with each other and with one process.

One 2-rank training run (a module fixture) takes SET and RigL steps and saves a
checkpoint from rank 0 halfway; the tests compare it across ranks, with one
process on the ranks' batches put together, and with runs resumed from the
checkpoint on 2 ranks and on 1 process.
"""

import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dst.engine.distributed import (
    RankMismatchError,
    broadcast_from_rank0,
    check_ranks_agree,
    distributed_dst_step,
    load_checkpoint,
    mean_dense_gradients,
    save_checkpoint,
    shared_generator,
    unwrap,
    wrap_ddp,
)
from dst.engine.masked import MaskedNet
from dst.engine.prune_regrow import apply_dst_step, dense_gradients, local_dst_step, masked_scheduler
from dst.engine.schedule import DSTConfig, DSTScheduler
from dst.methods.sparse_momentum import MomentumTracker, sparse_momentum_step

BATCH = 8  # per rank; one process gets 2 * BATCH
STEPS = 8
CHECKPOINT_STEP = 4
DST_STEPS = {2: "random", 4: "gradient", 6: "random", 8: "gradient"}


def _spawn_unavailable() -> str | None:
    if not dist.is_available():
        return "torch was built without torch.distributed"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend on this platform"
    if "spawn" not in mp.get_all_start_methods() or sys.platform in ("emscripten", "wasi"):
        return "this platform cannot spawn processes"
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
    except OSError as error:
        return f"cannot bind a loopback socket for the process group: {error}"
    return None


UNAVAILABLE = _spawn_unavailable()
needs_ranks = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, scenario, out_dir: str, args: tuple) -> None:
    # Gloo binds to the interface its hostname resolves to unless told; keep every socket on loopback.
    loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if loopback:
        os.environ["GLOO_SOCKET_IFNAME"] = loopback[0]
    torch.set_num_threads(1)  # two ranks on a small shared machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        torch.save(scenario(rank, world_size, *args), Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears down while the other still communicates
    finally:
        dist.destroy_process_group()
    # Building a DistributedDataParallel leaves references to the process group inside torch's C++ objects,
    # so destroy_process_group cannot free it: gloo's threads (pt_gloo_runloop, gloo_tcp_loop) and, on rank 0,
    # the TCPStore server's (pt_tcpstore_uv) outlive it and are torn down at interpreter exit, racing the other
    # rank's exit. Now and then that destroys a thread still running: "terminate called without an active
    # exception", SIGABRT, and every test of the module errors. The results are on disk: leave without that
    # teardown (exit code 0, all mp.spawn checks).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(scenario, out_dir: Path, *args, world_size: int = 2) -> list:
    """Run ``scenario(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; their return values."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank_main, args=(world_size, _free_port(), scenario, str(out_dir), args), nprocs=world_size)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def build(seed: int) -> MaskedNet:
    """A tiny conv + linear MaskedNet on 8x8 images; ``seed`` fixes its weights and masks."""
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))
    return MaskedNet(base, sparsity=0.7, generator=torch.Generator().manual_seed(seed))


def local_batch(step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the step's global batch of 2 * BATCH samples (all of it on one process)."""
    generator = torch.Generator().manual_seed(1000 + step)
    inputs, targets = torch.randn(2 * BATCH, 1, 8, 8, generator=generator), torch.randint(0, 3, (2 * BATCH,),
                                                                                          generator=generator)
    share = 2 * BATCH // world_size
    return inputs[rank * share:(rank + 1) * share], targets[rank * share:(rank + 1) * share]


def train(model: nn.Module, optimizer, generator, first: int, rank: int = 0, world_size: int = 1,
          checkpoint: Path | None = None) -> dict:
    """Steps ``first``..STEPS with DST_STEPS; the losses over all ranks and the final state."""
    masked_net = unwrap(model)
    losses = []
    for step in range(first, STEPS + 1):
        inputs, targets = local_batch(step, rank, world_size)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        mean_loss = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(mean_loss)
        losses.append(float(mean_loss) / world_size)
        if step in DST_STEPS:
            before = {name: layer.mask.clone() for name, layer in masked_net.masked_layers().items()}
            # No optimizer= here, as in the seed's call: the step must find it through the parameters.
            distributed_dst_step(model, prune_ratio=0.3, regrow=DST_STEPS[step], batch=(inputs, targets),
                                 generator=generator)
        if step == CHECKPOINT_STEP and checkpoint is not None:
            save_checkpoint(checkpoint, model, optimizer, generator, step=step)
    layers = masked_net.masked_layers()
    return {"losses": losses, "state": {k: v.clone() for k, v in masked_net.state_dict().items()},
            "moved": {name: before[name] ^ layer.mask for name, layer in layers.items()},
            "momentum": {name: optimizer.state[layer.weight]["momentum_buffer"].clone()
                         for name, layer in layers.items()}}


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    # SGD, not Adam: Adam's first steps move every regrown weight by the same lr, and the resulting
    # near-ties in magnitude would let float rounding decide which of them the next step prunes.
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def train_on_ranks(rank: int, world_size: int, checkpoint: str) -> dict:
    model = wrap_ddp(build(seed=100 + rank))  # different on purpose: wrap_ddp must start all ranks from rank 0's
    return train(model, sgd(model), shared_generator(7), 1, rank, world_size, Path(checkpoint))


def resume_on_ranks(rank: int, world_size: int, checkpoint: str) -> dict:
    model = wrap_ddp(build(seed=200 + rank))
    optimizer, generator = sgd(model), shared_generator(8)
    first = load_checkpoint(checkpoint, model, optimizer, generator)["step"] + 1
    return train(model, optimizer, generator, first, rank, world_size)


def train_in_plain_ddp(rank: int, world_size: int) -> dict:
    """DDP as users write it: its defaults re-send rank 0's buffers (the masks) before every forward."""
    model = DistributedDataParallel(build(seed=100 + rank))
    return train(model, sgd(model), shared_generator(5), STEPS - 2, rank, world_size)


def on_two_ranks(rank: int, world_size: int, out_dir: str) -> dict:
    """Everything the 2-rank tests need, in one spawn: starting the processes costs seconds, the work does not."""
    checkpoint = str(Path(out_dir) / "checkpoint.pt")
    trained = train_on_ranks(rank, world_size, checkpoint)
    trained["gradients"] = mean_dense_gradients(build(seed=0), local_batch(STEPS + 1, rank, world_size))
    return {"trained": trained, "resumed": resume_on_ranks(rank, world_size, checkpoint),
            "plain DDP": train_in_plain_ddp(rank, world_size), "disagreements": disagree(rank, world_size)}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    """Each rank's results from ``on_two_ranks``, and the checkpoint rank 0 saved."""
    if UNAVAILABLE:
        pytest.skip(UNAVAILABLE)
    out_dir = tmp_path_factory.mktemp("two_ranks")
    return run_ranks(on_two_ranks, out_dir, str(out_dir)), out_dir / "checkpoint.pt"


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal to float32 rounding, relative to the tensor's largest magnitude (summation order differs)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()), msg=name)


def assert_states_close(actual: dict, expected: dict) -> None:
    """Masks exactly equal; every float tensor equal to float tolerance scaled by its magnitude."""
    for key, value in expected["state"].items():
        if value.dtype == torch.bool:
            assert torch.equal(actual["state"][key], value), key
        else:
            assert_close_scaled(actual["state"][key], value, key)
    torch.testing.assert_close(torch.tensor(actual["losses"]), torch.tensor(expected["losses"]), rtol=1e-5, atol=0)


@needs_ranks
@pytest.mark.parametrize("run", ["trained", "plain DDP"])
def test_masks_weights_and_optimizer_resets_are_identical_across_ranks(two_ranks, run):
    first, second = (result[run] for result in two_ranks[0])
    assert first["losses"] == second["losses"]
    for key, value in first["state"].items():
        assert torch.equal(value, second["state"][key]), key
    for result in (first, second):
        for name, moved in result["moved"].items():
            mask, weight = result["state"][f"net.{name}.mask"], result["state"][f"net.{name}.weight"]
            assert moved.any(), f"the last step moved nothing in {name}"
            assert torch.all(weight[~mask] == 0) and torch.all(result["momentum"][name][~mask] == 0)
            assert torch.all(result["momentum"][name][moved] == 0), f"optimizer state not reset in {name}"


@needs_ranks
def test_two_ranks_match_one_process_with_both_batches(two_ranks):
    first = two_ranks[0][0]["trained"]
    model = build(seed=100)
    assert_states_close(first, train(model, sgd(model), torch.Generator().manual_seed(7), 1))
    for name, gradient in dense_gradients(build(seed=0), local_batch(STEPS + 1, 0, 1)).items():
        assert_close_scaled(first["gradients"][name], gradient, name)


@needs_ranks
def test_checkpoint_from_rank0_resumes_on_two_ranks_and_on_one_process(two_ranks):
    results, checkpoint = two_ranks
    first = results[0]["trained"]
    for result in (rank["resumed"] for rank in results):
        assert result["losses"] == first["losses"][CHECKPOINT_STEP:]
        assert all(torch.equal(value, first["state"][key]) for key, value in result["state"].items())
    model = build(seed=300)
    optimizer, generator = sgd(model), torch.Generator()
    assert load_checkpoint(checkpoint, model, optimizer, generator) == {"step": CHECKPOINT_STEP}
    alone = train(model, optimizer, generator, CHECKPOINT_STEP + 1)
    assert_states_close(alone, {"state": first["state"], "losses": first["losses"][CHECKPOINT_STEP:]})


def disagree(rank: int, world_size: int) -> dict:
    """Four ways ranks go apart; the error each raised on this rank (None if none did)."""
    model = wrap_ddp(build(seed=1))
    masked_net = unwrap(model)
    fc = masked_net.masked_layers()["4"]
    first_active = int(fc.mask.view(-1).nonzero()[0])

    def flip_mask():  # rank 1 drops a connection rank 0 keeps, leaving its weight in place
        fc.mask.view(-1)[first_active] = rank == 0

    def nudge_weight():
        with torch.no_grad():
            fc.weight.view(-1)[first_active] = 0.5 + rank * 2**-20

    cases = {
        "per-rank seed": lambda: distributed_dst_step(model, 0.3, generator=torch.Generator().manual_seed(rank)),
        # local_dst_step: apply_dst_step itself refuses to run on several ranks
        "local RigL": lambda: local_dst_step(masked_net, 0.3, "gradient", batch=local_batch(1, rank, world_size)),
        "flipped mask": flip_mask,
        "nudged weight": nudge_weight,
    }
    messages = {}
    for case, make_ranks_differ in cases.items():
        broadcast_from_rank0(model)
        check_ranks_agree(model)  # they agree before
        try:
            make_ranks_differ()
            check_ranks_agree(model)
            messages[case] = None
        except RankMismatchError as error:
            messages[case] = str(error)
    return messages


@needs_ranks
def test_ranks_forced_to_disagree_are_caught_with_a_clear_error(two_ranks):
    first, second = (result["disagreements"] for result in two_ranks[0])
    assert first == second  # every rank raises the same error, so none is left waiting
    assert first["per-rank seed"].startswith("ranks disagree after the DST step (2 ranks): masks differ in")
    assert "random regrowth generator was in different states" in first["per-rank seed"]
    assert "masks differ" in first["local RigL"]
    assert "masks differ in ['4']" in first["flipped mask"]
    assert "masked-out weights are nonzero on some rank in ['4']" in first["flipped mask"]
    assert first["nudged weight"].startswith("ranks disagree (2 ranks): active weights differ in ['4']")


def test_without_a_process_group_the_step_is_apply_dst_step():
    batch = local_batch(1, 0, 1)
    for regrow in ("random", "gradient"):
        ours, reference = build(seed=3), build(seed=3)
        distributed_dst_step(ours, 0.3, regrow, batch, generator=torch.Generator().manual_seed(1))
        apply_dst_step(reference, 0.3, regrow, batch, generator=torch.Generator().manual_seed(1))
        assert all(torch.equal(value, reference.state_dict()[key]) for key, value in ours.state_dict().items())
    gradients, expected = mean_dense_gradients(ours, batch), dense_gradients(ours, batch)
    assert all(torch.equal(gradients[name], expected[name]) for name in expected)


def test_precomputed_gradients_give_the_same_rigl_step_and_are_validated():
    batch = local_batch(1, 0, 1)
    ours, reference = build(seed=4), build(seed=4)
    apply_dst_step(ours, 0.3, "gradient", signals=dense_gradients(ours, batch))
    apply_dst_step(reference, 0.3, "gradient", batch=batch)
    assert all(torch.equal(value, reference.state_dict()[key]) for key, value in ours.state_dict().items())
    gradients = dense_gradients(ours, batch)
    with pytest.raises(ValueError, match="no entry for masked layer '0'"):
        apply_dst_step(ours, 0.3, "gradient", signals={k: v for k, v in gradients.items() if k != "0"})
    with pytest.raises(ValueError, match=r"signals\['0'\] has shape \(36,\)"):
        apply_dst_step(ours, 0.3, "gradient", signals={**gradients, "0": gradients["0"].view(-1)})


def test_scheduler_takes_its_updates_through_the_given_step():
    calls = []

    class Recording:  # a TopologyUpdate that records what the scheduler hands it
        needs_batch = True

        def __call__(self, prune_ratio, batch=None):
            calls.append({"prune_ratio": prune_ratio, "batch": batch})
            return {}

        def close(self):
            pass

    scheduler = DSTScheduler(DSTConfig(every=1, unit="step"), Recording())
    batch = local_batch(1, 0, 1)
    scheduler.after_step(batch)
    assert len(calls) == 1 and calls[0]["prune_ratio"] == 0.1 and scheduler.history[0].layers == {}
    assert calls[0]["batch"] is batch


def test_checkpoint_round_trip_and_bad_input_on_one_process(tmp_path):
    net = build(seed=6)
    optimizer = sgd(net)
    train(net, optimizer, torch.Generator().manual_seed(2), STEPS - 1)
    generator = torch.Generator().manual_seed(11)
    save_checkpoint(tmp_path / "sub" / "net.pt", net, optimizer, generator, epoch=3)
    restored, restored_generator = build(seed=7), torch.Generator()
    restored_optimizer = sgd(restored)
    extra = load_checkpoint(tmp_path / "sub" / "net.pt", restored, restored_optimizer, restored_generator)
    assert extra == {"epoch": 3}
    assert all(torch.equal(value, restored.state_dict()[key]) for key, value in net.state_dict().items())
    assert torch.equal(restored_generator.get_state(), generator.get_state())
    for param, restored_param in zip(net.parameters(), restored.parameters()):
        assert torch.equal(optimizer.state[param]["momentum_buffer"],
                           restored_optimizer.state[restored_param]["momentum_buffer"])
    save_checkpoint(tmp_path / "bare.pt", net)
    with pytest.raises(ValueError, match="optimizer= was given but checkpoint .* holds no optimizer state"):
        load_checkpoint(tmp_path / "bare.pt", restored, restored_optimizer)
    with pytest.raises(TypeError, match="MaskedNet or a DistributedDataParallel"):
        save_checkpoint(tmp_path / "x.pt", nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="init_process_group"):
        wrap_ddp(net)


def momentum_and_local_steps(rank: int, world_size: int) -> dict:
    """Sparse momentum trained under DDP, then the local steps a DDP job must refuse; what each rank saw."""
    model = wrap_ddp(build(seed=1))
    masked_net = unwrap(model)
    tracker = MomentumTracker(masked_net)
    optimizer = sgd(model)
    for step in range(1, 4):
        inputs, targets = local_batch(step, rank, world_size)
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    try:
        sparse_momentum_step(masked_net, tracker, 0.3, optimizer)
        mismatch = None
    except RankMismatchError as error:
        mismatch = str(error)
    tracker.close()
    refusals = {}
    scheduler = masked_scheduler(masked_net, DSTConfig(regrow="gradient", every=1, unit="step"), optimizer=optimizer)
    for case, step in (("apply_dst_step", lambda: apply_dst_step(masked_net, 0.3, "random")),
                       ("masked_scheduler's step", lambda: scheduler.after_step(local_batch(5, rank, world_size)))):
        try:
            step()
            refusals[case] = None
        except RuntimeError as error:
            refusals[case] = str(error)
    return {"mismatch": mismatch, "momentum": {name: value.clone() for name, value in tracker.momentum.items()},
            "masks": {name: layer.mask.clone() for name, layer in masked_net.masked_layers().items()},
            "refusals": refusals}


@needs_ranks
def test_sparse_momentum_under_ddp_uses_every_ranks_gradients_and_local_steps_are_refused(tmp_path):
    first, second = run_ranks(momentum_and_local_steps, tmp_path)
    assert first["mismatch"] is None and second["mismatch"] is None
    for name, mask in first["masks"].items():
        assert torch.equal(mask, second["masks"][name]), name
        assert torch.equal(first["momentum"][name], second["momentum"][name]), name
    # The momentum one process computes from the ranks' batches put together.
    alone = build(seed=1)
    tracker = MomentumTracker(alone)
    optimizer = sgd(alone)
    for step in range(1, 4):
        inputs, targets = local_batch(step, 0, 1)
        optimizer.zero_grad()
        F.cross_entropy(alone(inputs), targets).backward()
        optimizer.step()
    for name, momentum in tracker.momentum.items():
        assert_close_scaled(first["momentum"][name], momentum, name)
    tracker.close()
    for case, message in first["refusals"].items():
        assert message is not None and "distributed_dst_step" in message, case
