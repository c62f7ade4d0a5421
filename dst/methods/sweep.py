"""Methods x sparsities, trained the same way: the data behind "a decade of DST in one figure".

``train_run`` trains one method at one target with one recipe and returns a row of
measurements; ``run_sweep`` runs the grid; ``summarize`` averages rows over seeds.

Training FLOPs are what a sparse implementation would spend (the convention of the
DST papers): a step costs a forward, a backward to the inputs and a backward to the
weights, each ``2 x active weights x output positions`` per example, with the weight
gradient dense for sparse momentum (it ranks every position by momentum) and one
extra dense gradient per RigL update. This tutorial's masked nets compute densely
whatever the mask, so these are not this machine's FLOPs: they are what the method
needs. They are reported as a fraction of dense training on the same samples.
"""

import json
import math
import numbers
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dst.core.checks import check_fraction, check_steps
from dst.core.data import TensorLoader
from dst.core.models import SimpleNet, lenet_300_100
from dst.core.progress import Progress
from dst.core.training import evaluate, seed_everything
from dst.engine.allocation import DisconnectedWarning, connectivity
from dst.engine.masked import MaskedLayer, MaskedNet
from dst.engine.patterns import get_pattern
from dst.methods.catalog import METHODS, SNFS, Method, Target, get_method

MODELS: dict[str, Callable[[], nn.Module]] = {"lenet300-100": lenet_300_100, "simplenet": SimpleNet}


@dataclass(frozen=True)
class Recipe:
    """How every method is trained; the defaults are sparse_learning's MNIST recipe (Dettmers & Zettlemoyer 2019)."""

    epochs: int = 100
    batch_size: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True  # sparse_learning's SGD is Nesterov's
    weight_decay: float = 5e-4
    # x lr_decay at these fractions of training: sparse_learning's StepLR every 25,000 of its 54,000 steps.
    lr_decay_at: tuple[float, ...] = (0.463, 0.926)
    lr_decay: float = 0.1
    # Cap on batches per epoch (quick runs); None = the whole training set every epoch.
    max_batches_per_epoch: int | None = None

    def __post_init__(self):
        check_steps("epochs", self.epochs)
        check_steps("batch_size", self.batch_size)
        if self.max_batches_per_epoch is not None:
            check_steps("max_batches_per_epoch", self.max_batches_per_epoch)
        for name in ("lr", "lr_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
                    math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number above 0, got {value!r}")
        check_fraction("momentum", self.momentum)
        if self.momentum == 1.0:
            raise ValueError("momentum must be below 1, got 1.0")
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, numbers.Real) or not (
                math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov must be True or False, got {self.nesterov!r}")
        if isinstance(self.lr_decay_at, (str, numbers.Number)) or not hasattr(self.lr_decay_at, "__iter__"):
            raise ValueError(f"lr_decay_at must be a tuple of fractions of training, got {self.lr_decay_at!r}")
        object.__setattr__(self, "lr_decay_at", tuple(self.lr_decay_at))
        for fraction in self.lr_decay_at:
            check_fraction("each of lr_decay_at (fractions of training)", fraction, include_low=False)


class FlopCounter:
    """Multiply-adds of one forward pass per example, at the model's current masks and dense."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        positions: dict[nn.Module, int] = {}

        def record(module, inputs, output):
            positions[module] = output[0].numel() // module.weight.shape[0]  # 1 for linear, H*W for conv

        weighted = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        handles = [module.register_forward_hook(record) for module in weighted]
        was_training = model.training
        try:
            with torch.no_grad():
                model.eval()(example[:1])
        finally:
            model.train(was_training)
            for handle in handles:
                handle.remove()
        self.positions = positions
        self.dense = sum(module.weight.numel() * count for module, count in positions.items())

    def current(self) -> int:
        """Forward multiply-adds per example with only the active weights."""
        return sum((module.active_count if isinstance(module, MaskedLayer) else module.weight.numel()) * count
                   for module, count in self.positions.items())


def train_run(model_name: str, method: str | Method, target: Target, recipe: Recipe,
              train_data: tuple[torch.Tensor, torch.Tensor], test_loader: Iterable, seed: int = 0,
              device: torch.device | str = "cpu") -> dict:
    """Train one method at one target; returns the row of what was measured (accuracy in %)."""
    return train_model(model_name, method, target, recipe, train_data, test_loader, seed, device)[1]


def train_model(model_name: str, method: str | Method, target: Target, recipe: Recipe,
                train_data: tuple[torch.Tensor, torch.Tensor], test_loader: Iterable, seed: int = 0,
                device: torch.device | str = "cpu", threads: int | None = None) -> tuple[nn.Module, dict]:
    """``train_run``, returning the trained net too: ``(model, row)``; ``threads`` as in ``run_sweep``."""
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train_model(model_name, method, target, recipe, train_data, test_loader, seed, device)
    finally:
        torch.set_num_threads(previous_threads)


def _train_model(model_name: str, method: str | Method, target: Target, recipe: Recipe,
                 train_data: tuple[torch.Tensor, torch.Tensor], test_loader: Iterable, seed: int,
                 device: torch.device | str) -> tuple[nn.Module, dict]:
    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; choose one of {list(MODELS)}")
    method = get_method(method)
    seed_everything(seed)
    base_net = MODELS[model_name]()
    generator = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DisconnectedWarning)  # recorded in the row instead
        model = method.build(base_net, target, generator).to(device)
    loader = TensorLoader(*train_data, recipe.batch_size, shuffle=True, seed=seed,
                          max_batches=recipe.max_batches_per_epoch, device=device)
    total_steps = recipe.epochs * len(loader)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay, nesterov=recipe.nesterov)
    milestones = sorted({max(1, int(fraction * total_steps)) for fraction in recipe.lr_decay_at})
    lr_schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=recipe.lr_decay)
    scheduler = method.scheduler(model, target, optimizer, total_steps, len(loader), generator)
    counter = FlopCounter(model, train_data[0][:1].to(device))
    start_connectivity = connectivity(model.masked_layers()) if isinstance(model, MaskedNet) else None
    start = time.perf_counter()
    try:
        macs, examples, events = _train(model, method, scheduler, loader, optimizer, lr_schedule, recipe.epochs,
                                        counter)
    finally:
        if scheduler is not None:
            method.close(scheduler)
    seconds = time.perf_counter() - start
    row = {"model": model_name, "method": method.label, "sparsity": target.sparsity if method.name != "dense" else 0.0,
           "allocation": target.allocation, "keep_dense": list(target.keep_dense), "seed": seed,
           "pattern": get_pattern(getattr(method, "pattern", "unstructured")).label,
           "recipe": asdict(recipe), "steps": total_steps, "test_acc": evaluate(model, test_loader, device),
           "train_seconds": seconds, "updates": events, "dense_training": method.dense_training,
           "train_flops": 2 * macs, "train_flops_vs_dense": macs / (3 * counter.dense * examples),
           "inference_flops_vs_dense": counter.current() / counter.dense}
    if isinstance(model, MaskedNet):
        check_reached_target(model, method, target)
        end_connectivity = connectivity(model.masked_layers())
        row.update(final_sparsity=model.global_sparsity(),
                   layer_active={name: layer.active_count for name, layer in model.masked_layers().items()},
                   unconnected_outputs_start=start_connectivity["unconnected_outputs"],
                   unconnected_outputs_end=end_connectivity["unconnected_outputs"],
                   unconnected_inputs_start=start_connectivity["unconnected_inputs"],
                   unconnected_inputs_end=end_connectivity["unconnected_inputs"])
    return model, row


def check_reached_target(model: MaskedNet, method: Method, target: Target) -> None:
    """Raise unless the trained net holds the target's active counts: per layer (sparse momentum: in total).

    A row is labelled with its target sparsity; this is what makes the label true.
    """
    densities = target.densities(model)
    layers = model.masked_layers()
    expected = {name: layer.pattern.active_count(layer.matrix_shape, densities[name])
                for name, layer in layers.items()}
    reached = {name: layer.active_count for name, layer in layers.items()}
    for name, layer in layers.items():
        try:
            layer.pattern.check_mask(layer.mask_2d())
        except ValueError as error:
            raise RuntimeError(f"{method.name}: layer {name!r} no longer follows pattern {layer.pattern.label!r} "
                               f"({error}); its row would claim a pattern the net does not have") from None
    matches = (sum(reached.values()) == sum(expected.values()) if isinstance(method, SNFS)
               else reached == expected)
    if not matches:
        raise RuntimeError(f"{method.name} ended with active counts {reached}, not the {target.sparsity:g} "
                           f"target's {expected} (sparsity {model.global_sparsity():.4f}): its row would claim a "
                           "sparsity the net does not have")


def _train(model, method: Method, scheduler, loader, optimizer, lr_schedule, epochs: int,
           counter: FlopCounter) -> tuple[int, int, int]:
    """The training loop; returns (multiply-adds a sparse implementation needs, examples seen, topology updates)."""
    macs, examples, events = 0, 0, 0
    forward = counter.current()
    # rigl updates the mask *instead of* the weights on a mask-update step (step_on_update=False).
    skips = scheduler is not None and getattr(method, "step_on_update", True) is False
    for _ in range(epochs):
        model.train()
        for inputs, labels in loader:
            examples += len(labels)
            if skips and scheduler.update_after_next_step():
                # The update takes its dense gradient on this batch at the weights as they are: that pass is
                # the step's whole cost (a forward and a dense weight gradient), and no weight moves.
                lr_schedule.step()
                scheduler.after_step((inputs, labels))
                events = len(scheduler.history)
                macs += len(labels) * (2 * forward + counter.dense)
                forward = counter.current()
                continue
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
            lr_schedule.step()
            weight_gradient = counter.dense if method.dense_weight_gradient else forward
            macs += len(labels) * (2 * forward + weight_gradient)
            if scheduler is not None:
                scheduler.after_step((inputs, labels))
                if len(scheduler.history) > events:
                    events = len(scheduler.history)
                    if method.gradient_per_update:  # the update's dense gradient, on this batch
                        macs += len(labels) * (2 * forward + counter.dense)
                    forward = counter.current()
    return macs, examples, events


def run_sweep(models: Iterable[str], methods: Iterable[str | Method], sparsities: Iterable[float],
              seeds: Iterable[int], recipe: Recipe, train_data: tuple[torch.Tensor, torch.Tensor],
              test_loader: Iterable, allocation: str = "erk", keep_dense: tuple[str, ...] = (),
              device: torch.device | str = "cpu", on_row: Callable[[dict], None] | None = None,
              threads: int | None = None, progress: bool = False) -> list[dict]:
    """Every model x method x sparsity x seed (dense once per model and seed); ``on_row`` sees each row as it lands.

    ``threads``: torch's CPU threads during the sweep (restored after). One is as fast for these
    small nets and, on a machine shared with other jobs, avoids threads waiting for each other.
    ``progress``: one line counting the runs (``dst.core.progress``).
    """
    methods = [get_method(method) for method in methods]
    sparsities = list(sparsities)
    models, seeds = list(models), list(seeds)
    grid = [(model_name, seed, method, sparsity) for model_name in models for seed in seeds for method in methods
            for sparsity in ([0.0] if method.name == "dense" else sparsities)]
    rows = []
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with Progress(len(grid), "training runs", enabled=progress) as bar:
            for model_name, seed, method, sparsity in grid:
                bar.update(0, f"{model_name} {method.label} {100 * sparsity:g} % seed {seed}")
                target = Target(sparsity, allocation, keep_dense)
                rows.append(train_run(model_name, method, target, recipe, train_data, test_loader, seed, device))
                bar.update(1)
                if on_row is not None:
                    on_row(rows[-1])
    finally:
        torch.set_num_threads(previous_threads)
    return rows


def summarize(rows: Iterable[dict]) -> list[dict]:
    """One row per (model, method, sparsity): test accuracy mean and standard deviation over seeds, FLOPs."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["method"], row["sparsity"]), []).append(row)
    summary = []
    for (model, method, sparsity), group in groups.items():
        accuracies = [row["test_acc"] for row in group]
        summary.append({
            "model": model, "method": method, "sparsity": sparsity, "seeds": len(group),
            "test_acc": statistics.fmean(accuracies),
            "test_acc_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "train_flops_vs_dense": statistics.fmean(row["train_flops_vs_dense"] for row in group),
            "dense_training": group[0]["dense_training"],
            "unconnected_outputs_end": max(row.get("unconnected_outputs_end", 0) for row in group)})
    return summary


def accuracy_table(summary: list[dict], model: str) -> str:
    """Markdown: test accuracy (%) of each method (rows) at each sparsity (columns), one model."""
    rows = [row for row in summary if row["model"] == model]
    sparsities = sorted({row["sparsity"] for row in rows if row["method"] != "dense"})
    # METHODS' order (dense first, gradual pruning last), whatever order the rows came in; variants after their method.
    order = {name: index for index, name in enumerate(METHODS)}
    methods = sorted(dict.fromkeys(row["method"] for row in rows),
                     key=lambda label: order.get(label.split("+")[0].split("/")[0], len(order)))
    cell = {(row["method"], row["sparsity"]): row for row in rows}
    lines = ["| method | " + " | ".join(f"{100 * s:g} %" for s in sparsities) + " | training FLOPs vs dense |",
             "|---|" + "---|" * (len(sparsities) + 1)]
    for method in methods:
        if method == "dense":
            row = cell[("dense", 0.0)]
            lines.append("| dense | " + " | ".join([_accuracy(row)] * len(sparsities)) + " | 1 |")
            continue
        flops = [cell[(method, s)]["train_flops_vs_dense"] for s in sparsities if (method, s) in cell]
        name = method + (" (dense memory while training)" if rows and cell.get(
            (method, sparsities[0]), {}).get("dense_training") else "")
        lines.append(f"| {name} | " + " | ".join(
            _accuracy(cell[(method, s)]) if (method, s) in cell else "–" for s in sparsities)
            + f" | {_span(flops)} |")
    return "\n".join(lines)


def comparison_table(summary: list[dict], published: list[dict]) -> str:
    """Markdown: measured test accuracy (%) next to the published number for each (model, method, sparsity)."""
    measured = {(row["model"], row["method"], row["sparsity"]): row for row in summary}
    lines = ["| model | method | sparsity | measured | published | difference (points) |", "|---|---|---|---|---|---|"]
    for reference in published:
        row = measured.get((reference["model"], reference["method"], reference["sparsity"]))
        if row is None:
            continue
        lines.append(f"| {row['model']} | {row['method']} | {100 * row['sparsity']:g} % | {_accuracy(row)} | "
                     f"{reference['test_acc']:.2f} | {_difference(row['test_acc'], reference['test_acc'])} |")
    return "\n".join(lines)


def layer_table(rows: Iterable[dict], model: str, sparsity: float) -> str:
    """Markdown: where each method's weights are at the end of training, and the classes left without a connection.

    Active weights per layer and test accuracy are means over seeds; classes cut off are "at the start -> at the
    end" of training, the largest over seeds. Dense rows have no mask and are left out.
    """
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["model"] == model and row["sparsity"] == sparsity and "layer_active" in row:
            groups.setdefault(row["method"], []).append(row)
    if not groups:
        raise ValueError(f"no masked {model} rows at sparsity {sparsity}")
    layers = list(next(iter(groups.values()))[0]["layer_active"])
    lines = ["| method | test accuracy % | " + " | ".join(f"{layer} weights" for layer in layers)
             + " | classes cut off (start -> end) |", "|---|---|" + "---|" * (len(layers) + 1)]
    for method, group in groups.items():
        counts = [statistics.fmean(row["layer_active"][layer] for row in group) for layer in layers]
        start, end = (max(row[f"unconnected_outputs_{when}"] for row in group) for when in ("start", "end"))
        lines.append(f"| {method} | {statistics.fmean(row['test_acc'] for row in group):.2f} | "
                     + " | ".join(f"{count:,.0f}" for count in counts) + f" | {start} -> {end} |")
    return "\n".join(lines)


def _difference(measured: float, published: float) -> str:
    return f"{round(measured - published, 2) + 0.0:+.2f}"  # + 0.0: -0.003 reads +0.00, not -0.00


def _span(values: list[float]) -> str:
    low, high = f"{min(values):.2f}", f"{max(values):.2f}"
    return low if low == high else f"{low}–{high}"


def _accuracy(row: dict) -> str:
    text = f"{row['test_acc']:.2f}"
    if row["seeds"] > 1:
        text += f" ± {row['test_acc_std']:.2f}"
    if row.get("unconnected_outputs_end"):
        cut_off = row["unconnected_outputs_end"]
        text += f" ({cut_off} {'class' if cut_off == 1 else 'classes'} cut off)"
    return text


def density_ticks(sparsities: Iterable[float]) -> list[tuple[float, str]]:
    """(density, label) ticks for a log density axis labelled by sparsity ("99 %")."""
    return [(1.0 - s, f"{100 * s:g} %") for s in sorted(set(sparsities)) if not math.isclose(s, 0.0)]


def describe_sweep(summary: list[dict]) -> list[str]:
    """Per model and sparsity, the sentence a reader needs before the figure: the best sparse method,
    dense, and each method's difference to the static mask (the control), all from ``summarize``'s rows."""
    sentences = []
    for model in dict.fromkeys(row["model"] for row in summary):
        dense = next((row for row in summary if row["model"] == model and row["method"] == "dense"), None)
        sparsities = sorted({row["sparsity"] for row in summary if row["model"] == model and row["method"] != "dense"})
        for sparsity in sparsities:
            rows = [row for row in summary if row["model"] == model and row["sparsity"] == sparsity
                    and row["method"] != "dense"]
            best = max(rows, key=lambda row: row["test_acc"])
            static = next((row for row in rows if row["method"] == "static"), None)
            text = f"{model} at {100 * sparsity:g} %: best {best['method']} {best['test_acc']:.2f} %"
            if dense is not None:
                text += f" (dense {dense['test_acc']:.2f} %)"
            if static is not None:
                gains = ", ".join(f"{row['method']} {_difference(row['test_acc'], static['test_acc'])}"
                                  for row in rows if row is not static)
                text += f"; against the static mask ({static['test_acc']:.2f} %): {gains} points"
            seeds = sorted({row["seeds"] for row in rows})
            text += f" [{'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''}]"
            sentences.append(text)
    return sentences


def describe_settings(record: dict) -> str:
    """One sentence: how a results file's methods differ from ``METHODS``' defaults (their reference code).

    ``record`` is a results file of ``benchmarks/dst_methods.py`` (its ``methods`` settings and ``rules``).
    """
    if record.get("rules") != "reference":
        return ("Methods with this project's rules, before they followed their reference code "
                "(as dst.improved(method) runs them).")
    changes: dict[str, list[str]] = {}
    for name, settings in record.get("methods", {}).items():
        if name not in METHODS:
            continue
        default = json.loads(json.dumps(asdict(METHODS[name])))
        for key, value in settings.items():
            if key in default and default[key] != value:
                changes.setdefault(f"{key}={json.dumps(value)}", []).append(name)
    if not changes:
        return "Every method as its reference code (dst.METHODS' defaults)."
    return ("Every method as its reference code (dst.METHODS' defaults) except "
            + "; ".join(f"{', '.join(names)} with {setting}" for setting, names in changes.items()) + ".")
