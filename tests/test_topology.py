"""The data behind the mask figures: snapshots are independent copies and their differences are the DST steps."""

import matplotlib

matplotlib.use("Agg")  # headless; must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from dst.core.models import MLP, SimpleNet  # noqa: E402
from dst.engine.masked import MaskedNet  # noqa: E402
from dst.engine.prune_regrow import apply_dst_step  # noqa: E402
from dst.tutorial import mask_plots  # noqa: E402
from dst.tutorial.topology import mask_changes, turnover_percent  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def masked_net(net=None, sparsity=0.9, seed=0):
    torch.manual_seed(seed)
    return MaskedNet(net or MLP(784, (64, 32)), sparsity, generator=torch.Generator().manual_seed(seed))


def test_a_snapshot_does_not_follow_later_dst_steps():
    net = masked_net()
    before = net.get_masks_as_2d()
    frozen = {name: mask.copy() for name, mask in before.items()}
    apply_dst_step(net, prune_ratio=0.3, generator=torch.Generator().manual_seed(1))
    for name, mask in before.items():
        np.testing.assert_array_equal(mask, frozen[name])
        assert not np.shares_memory(mask, net.masked_layers()[name].mask.numpy())


def test_snapshots_around_one_step_differ_in_exactly_the_pruned_and_regrown_positions():
    net = masked_net(SimpleNet(), sparsity=0.95)
    layers = net.masked_layers()
    before = net.get_masks_as_2d()
    weights = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    report = apply_dst_step(net, prune_ratio=0.2, generator=torch.Generator().manual_seed(3))
    after = net.get_masks_as_2d()
    (changes,) = mask_changes([before, after])
    for name, layer in layers.items():
        old, new = before[name].reshape(-1), after[name].reshape(-1)
        pruned, regrown = np.flatnonzero(old & ~new), np.flatnonzero(~old & new)
        assert len(pruned) == len(regrown) == report[name].pruned == report[name].regrown
        assert changes[name] == {"pruned": len(pruned), "regrown": len(regrown), "active_before": int(old.sum())}
        # The pruned ones are the smallest active magnitudes, the regrown ones start at zero.
        magnitudes = weights[name].reshape(-1).abs().numpy()
        kept = np.flatnonzero(old & new)
        if len(pruned) and len(kept):
            assert magnitudes[pruned].max() <= magnitudes[kept].min()
        assert not layer.weight.detach().reshape(-1).numpy()[regrown].any()
    assert sum(change["pruned"] for change in changes.values()) > 0


def test_turnover_figure_draws_the_mask_changes():
    net = masked_net()
    snapshots, sparsity = [], []
    for epoch in range(1, 5):
        snapshots.append(net.get_masks_as_2d())
        sparsity.append({name: stats["sparsity"] for name, stats in net.get_sparsity_stats().items()})
        if epoch in (1, 3):
            apply_dst_step(net, prune_ratio=0.25 if epoch == 1 else 0.1, generator=torch.Generator().manual_seed(epoch))
    changes = mask_changes(snapshots)
    fig = mask_plots.plot_mask_evolution_per_epoch(sparsity, snapshots)
    # a bar per DST step (between snapshots 1-2 and 3-4), none where nothing moved; coinciding layers share bars
    drawn = {name: {round(bar.get_x() + bar.get_width() / 2): bar.get_height() for bar in container}
             for container in fig.axes[1].containers for name in container.get_label().split(", ")}
    for name in snapshots[0]:
        expected = [turnover_percent(change[name]) for change in changes]
        assert expected[0] == pytest.approx(25, abs=1) and expected[1] == 0 and expected[2] == pytest.approx(10, abs=1)
        assert sorted(drawn[name]) == [2, 4]
        assert [drawn[name][2], drawn[name][4]] == pytest.approx([expected[0], expected[2]], abs=0.05)


def test_mask_figure_labels_each_changed_epoch_with_its_counts_and_skips_unchanged_ones():
    net = masked_net()
    snapshots = []
    for epoch in range(1, 5):
        snapshots.append(net.get_masks_as_2d())
        if epoch == 2:
            apply_dst_step(net, prune_ratio=0.2, generator=torch.Generator().manual_seed(0))
    (changed,) = [change for change in mask_changes(snapshots) if change["fc1"]["pruned"]]
    fig = mask_plots.plot_mask_2d_evolution(snapshots)
    columns = len(fig.axes) // len(snapshots[0])
    assert columns == 2  # epoch 1 and epoch 3, the only epoch whose masks changed
    first_row_labels = [ax.get_xlabel() for ax in fig.axes[:columns]]
    assert first_row_labels == ["", f"-{changed['fc1']['pruned']:,} / +{changed['fc1']['regrown']:,}"]
    assert "epochs 2, 4 unchanged" in fig._suptitle.get_text()


def test_mask_figure_says_when_no_dst_step_happened():
    net = masked_net()
    fig = mask_plots.plot_mask_2d_evolution([net.get_masks_as_2d(), net.get_masks_as_2d()])
    assert "no DST step happened" in fig._suptitle.get_text()


def test_mask_changes_rejects_layers_that_change_between_epochs():
    snapshots = [{"a": np.ones((2, 2), bool)}, {"b": np.ones((2, 2), bool)}]
    with pytest.raises(ValueError, match="epoch 2"):
        mask_changes(snapshots)
