"""Training several networks at once, one CPU core each: how the tutorial trains its dense and masked nets.

A small CNN's training step does not keep two CPU cores busy: PyTorch splits each
operation over its threads, and many of SimpleNet's operations are too small to split
well (a batch of 64, one input channel). Two nets trained at the same time, each in
its own Python thread with one intra-op thread (PyTorch releases Python's lock while
it computes), keep both cores busy; on this project's 2-core machine that trained an
epoch of both nets about 1.5x faster than one after the other on two threads each
(benchmarks/training_step.py). Each net's arithmetic is the same as when it trains
alone on one thread, so results do not depend on the timing of the threads.

Each run needs its own loader: loaders made with the same seed (``dst.core.data.load_mnist``)
give the same batches in the same order, so both nets still see the same data.
"""

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import RandomSampler, SubsetRandomSampler, WeightedRandomSampler

from dst.core.progress import Progress
from dst.core.training import train_and_evaluate

_RANDOM_SAMPLERS = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


@dataclass
class Run:
    """One network trained side by side with others: its model, optimizer and own training loader; ``dst``, a
    scheduler whose step-based updates run after each of its optimizer steps (``DSTScheduler.after_step``)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: object
    dst: object = None


def train_side_by_side(runs: Sequence[Run], test_loader, criterion, device: torch.device | str,
                       progress: bool = True) -> list[dict[str, float]]:
    """One epoch of training then a test pass for every run; returns ``train_and_evaluate``'s dict per run.

    On a CPU with at least one PyTorch thread per run, the runs train (and are
    evaluated) concurrently, one thread each; elsewhere (a GPU, or fewer threads) one
    after the other. ``train_seconds`` is each run's own training time, and
    ``wall_seconds`` (the same in every dict) the time of the whole call, test passes
    included. One progress bar counts the batches of all runs.
    """
    _check_runs(runs)
    concurrent = torch.device(device).type == "cpu" and len(runs) > 1 and torch.get_num_threads() >= len(runs)
    total = sum(len(run.train_loader) for run in runs)
    done = [0] * len(runs)
    results: list[dict | None] = [None] * len(runs)
    errors: list[BaseException] = []

    def work(index: int, run: Run) -> None:
        try:
            if concurrent:
                torch.set_num_threads(1)  # OpenMP's thread count is per calling thread: set it in this one too
            results[index] = train_and_evaluate(run.model, _Counting(run.train_loader, done, index), test_loader,
                                                criterion, run.optimizer, device, dst=run.dst, progress=False)
        except Exception as error:  # re-raised in the caller's thread below
            errors.append(error)

    started = time.perf_counter()
    with Progress(total, "training batches, all nets", enabled=progress) as bar:
        if not concurrent:
            for index, run in enumerate(runs):
                work(index, run)
                bar.update(sum(done) - bar.done)
                if errors:
                    raise errors[0]
            return _with_wall_time(results, started)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            workers = [threading.Thread(target=work, args=(index, run), daemon=True) for index, run in enumerate(runs)]
            for worker in workers:
                worker.start()
            for worker in workers:
                while worker.is_alive():
                    worker.join(timeout=0.5)
                    bar.update(sum(done) - bar.done)
        finally:
            torch.set_num_threads(threads)
    if errors:
        raise errors[0]
    return _with_wall_time(results, started)


def _check_runs(runs: Sequence[Run]) -> None:
    """Refuse what would make the runs interfere: shared models, optimizers, parameters, loaders or random sources.

    Two threads stepping one parameter at once corrupt memory (the process aborts), and two
    loaders shuffling from one random source get whichever shuffle their thread draws first.
    """
    if isinstance(runs, Run) or not all(isinstance(run, Run) for run in runs):
        raise TypeError("runs must be a list of dst.tutorial.side_by_side.Run(model, optimizer, train_loader)")
    owners: dict[int, int] = {}
    for index, run in enumerate(runs):
        optimizer_params = [param for group in run.optimizer.param_groups for param in group["params"]]
        model_params = {id(param) for param in run.model.parameters()}
        for what, key in (("model", id(run.model)), ("optimizer", id(run.optimizer)),
                          *(("parameter", id(param)) for param in [*run.model.parameters(), *optimizer_params])):
            other = owners.setdefault(key, index)
            if other != index:
                raise ValueError(f"runs {other} and {index} share one {what}: runs trained side by side in threads "
                                 "must not share models, optimizers or parameters (copy.deepcopy one, and build "
                                 "an optimizer for each)")
        if optimizer_params and not any(id(param) in model_params for param in optimizer_params):
            raise ValueError(f"run {index}'s optimizer steps none of its model's parameters: build the optimizer "
                             "on the model you train (for a MaskedNet, on MaskedNet(...).parameters(), not on the "
                             "base net it copied)")
    if len({id(run.train_loader) for run in runs}) != len(runs):
        raise ValueError("each run needs its own train_loader: a shared loader's shuffling would depend on "
                         "which thread asks first (make one per run with the same seed for the same batches)")
    sources: dict[int, int] = {}
    for index, run in enumerate(runs):
        loader = run.train_loader
        # Not iter(loader): that would start a DataLoader's worker processes.
        if not (hasattr(loader, "__iter__") and hasattr(loader, "__len__")) or isinstance(loader, Iterator):
            raise TypeError(f"run {index}'s train_loader must be re-iterable with a length (a DataLoader or "
                            f"dst.core.data.TensorLoader), got a {type(loader).__name__}")
        for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None),
                                                                  "sampler", None)):
            if not isinstance(sampler, _RANDOM_SAMPLERS):
                continue
            if sampler.generator is None and len(runs) > 1:
                raise ValueError(f"run {index}'s train_loader shuffles with torch's global random generator, so "
                                 "which run gets which shuffle depends on thread timing: give each loader its own "
                                 "DataLoader(..., generator=torch.Generator().manual_seed(seed)), the same seed "
                                 "for the same batches")
            other = sources.setdefault(id(sampler.generator), index)
            if sampler.generator is not None and other != index:
                raise ValueError(f"runs {other} and {index} shuffle with one torch.Generator: give each loader its "
                                 "own, seeded alike for the same batches")


def _with_wall_time(results: list[dict], started: float) -> list[dict]:
    seconds = time.perf_counter() - started
    return [{**result, "wall_seconds": seconds} for result in results]


class _Counting:
    """``loader`` whose batches are counted into ``counts[index]`` as they are handed out."""

    def __init__(self, loader, counts: list[int], index: int):
        self.loader, self.counts, self.index = loader, counts, index

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.counts[self.index] += 1
            yield batch
