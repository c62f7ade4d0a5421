"""The doorways: dst's public API, utils' re-exports, and the notebook's DST step by hand against the library."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dst
import utils
from dst.core.data import TensorLoader
from dst.core.models import SimpleNet
from dst.engine.masked import MaskedNet
from dst.engine.prune_regrow import update_layer

NOTEBOOK = Path(__file__).resolve().parents[1] / "dst_tutorial.ipynb"
SEED_NAMES = ["SimpleNet", "MaskedNet", "train_epoch", "evaluate", "apply_dst_step", "benchmark_inference",
              "plot_mask_evolution_per_epoch", "plot_mask_2d_evolution", "plot_dense_vs_masked_comparison",
              "CUPY_GPU_AVAILABLE"]


def test_every_public_name_is_described_and_importable():
    assert sorted(dst.__all__) == sorted(dst.API)
    for name, (module, what) in dst.API.items():
        assert what and f"{name} " in dst.__doc__, name
        assert getattr(dst, name) is not None, f"{name} from dst.{module}"
    with pytest.raises(AttributeError, match="no attribute 'SparseLinear'"):
        dst.SparseLinear  # noqa: B018 - a training detail, not the public API


def test_utils_keeps_the_seed_notebooks_names():
    assert set(SEED_NAMES) <= set(utils.__all__)
    assert all(hasattr(utils, name) for name in utils.__all__)


def test_importing_utils_probes_no_gpu_until_cupy_gpu_available_is_read():
    code = ("import utils\nfrom dst.core import gpu\nassert gpu.cupy_gpu_available.cache_info().misses == 0\n"
            "from utils import CUPY_GPU_AVAILABLE\nassert isinstance(CUPY_GPU_AVAILABLE, bool)\n"
            "assert gpu.cupy_gpu_available.cache_info().misses == 1\n"
            "assert utils.CUPY_GPU_AVAILABLE is gpu.CUPY_GPU_AVAILABLE is CUPY_GPU_AVAILABLE\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=NOTEBOOK.parent)


def heart_cell() -> str:
    notebook = json.loads(NOTEBOOK.read_text())
    (cell,) = [cell for cell in notebook["cells"] if "dst-heart" in cell["metadata"].get("tags", [])]
    return "".join(cell["source"])


@pytest.mark.parametrize("sparsity, prune_ratio, seed", [(0.95, 0.1, 42), (0.8, 0.3, 7)])
def test_the_notebooks_dst_step_by_hand_makes_the_librarys_choices(sparsity, prune_ratio, seed):
    torch.manual_seed(seed)
    masked_net = MaskedNet(SimpleNet(), sparsity=sparsity, allocation="erk")
    generator = torch.Generator().manual_seed(seed)
    loader = TensorLoader(torch.randn(16, 1, 28, 28, generator=generator), torch.randint(0, 10, (16,)), 8)
    names = dict(copy=copy, torch=torch, optim=torch.optim, masked_net=masked_net, train_loader=loader,
                 criterion=nn.CrossEntropyLoss(), device="cpu", batch_size=8, prune_ratio=prune_ratio, seed=seed,
                 learning_rate=1e-3)
    exec(heart_cell(), names)  # the cell, as the notebook runs it
    by_hand, by_hand_optimizer = names["layer"], names["demo_optimizer"]

    library_net = copy.deepcopy(masked_net)  # the same training step, then the library's DST step
    optimizer = torch.optim.Adam(library_net.parameters(), lr=1e-3)
    nn.CrossEntropyLoss()(library_net(loader.images[:8]), loader.labels[:8]).backward()
    optimizer.step()
    layer = library_net.masked_layers()["fc2"]
    before = layer.mask.clone()
    update = update_layer(layer, prune_ratio, "random", optimizers={optimizer},
                          generator=torch.Generator().manual_seed(seed))

    assert update.pruned == update.regrown == names["count"] > 0
    assert (before & ~layer.mask).sum() == names["count"]
    assert torch.equal(layer.mask, by_hand.mask)
    assert torch.equal(layer.weight, by_hand.weight)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(optimizer.state[layer.weight][key], by_hand_optimizer.state[by_hand.weight][key])
