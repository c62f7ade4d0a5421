"""train_epoch / evaluate against hand-computed results, and the seed's Step 2-3 cells."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dst.core.models import SimpleNet
from dst.core.training import evaluate, train_epoch
from dst.engine.masked import MaskedNet


class FixedLogits(nn.Module):
    """Predicts class 0 for every input, with a known cross-entropy."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([2.0, 0.0, 0.0]))

    def forward(self, x):
        return self.bias.expand(len(x), 3)


def test_evaluate_matches_hand_computation():
    targets = torch.tensor([0, 0, 1, 2, 0])
    loader = DataLoader(TensorDataset(torch.zeros(5, 1), targets), batch_size=2)
    model = FixedLogits()
    expected_loss = F.cross_entropy(model(torch.zeros(5, 1)), targets).item()
    assert evaluate(model, loader, "cpu") == pytest.approx(60.0)
    accuracy, loss = evaluate(model, loader, "cpu", nn.CrossEntropyLoss())
    assert accuracy == pytest.approx(60.0) and loss == pytest.approx(expected_loss)


def test_train_epoch_reports_mean_loss_and_accuracy_before_each_update():
    targets = torch.tensor([0, 1, 0, 0])
    loader = DataLoader(TensorDataset(torch.zeros(4, 1), targets), batch_size=4)
    model = FixedLogits()
    expected_loss = F.cross_entropy(model(torch.zeros(4, 1)), targets).item()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, accuracy = train_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, "cpu", progress=False)
    assert loss == pytest.approx(expected_loss) and accuracy == pytest.approx(75.0)
    assert not torch.equal(model.bias.detach(), torch.tensor([2.0, 0.0, 0.0]))


def test_training_lowers_the_loss_of_dense_and_masked_nets(tiny_loader):
    torch.manual_seed(0)
    for model in (SimpleNet(), MaskedNet(SimpleNet(), 0.9, allocation="erk")):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        first, _ = train_epoch(model, tiny_loader, nn.CrossEntropyLoss(), optimizer, "cpu", progress=False)
        for _ in range(4):
            last, _ = train_epoch(model, tiny_loader, nn.CrossEntropyLoss(), optimizer, "cpu", progress=False)
        assert last < first


def test_empty_loader_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        evaluate(FixedLogits(), [], "cpu")


# The seed notebook's Step 2 and Step 3 cells, verbatim apart from the data and the epoch count.
SEED_STEP_2 = '''
base_net = SimpleNet(num_classes=10)
dense_net = copy.deepcopy(base_net).to(device)
masked_net = MaskedNet(base_net, sparsity=GLOBAL_SPARSITY).to(device)
stats = masked_net.get_sparsity_stats()
for name, stat in stats.items():
    line = f"  {name}: {stat['sparsity']*100:.2f}% sparse ({stat['zeros']}/{stat['total']} zeros)"
criterion = nn.CrossEntropyLoss()
dense_optimizer = optim.Adam(dense_net.parameters(), lr=learning_rate)
masked_optimizer = optim.Adam(masked_net.parameters(), lr=learning_rate)
'''

SEED_STEP_3 = '''
dense_train_losses, dense_train_accs, dense_test_losses, dense_test_accs = [], [], [], []
masked_train_losses, masked_train_accs, masked_test_losses, masked_test_accs = [], [], [], []
sparsity_per_epoch = []
masks_per_epoch = []
for epoch in range(num_epochs):
    dense_train_loss, dense_train_acc = train_epoch(dense_net, train_loader, criterion, dense_optimizer, device)
    dense_train_losses.append(dense_train_loss)
    dense_train_accs.append(dense_train_acc)
    dense_test_acc, dense_test_loss = evaluate(dense_net, test_loader, device, criterion)
    dense_test_accs.append(dense_test_acc)
    dense_test_losses.append(dense_test_loss)
    masked_train_loss, masked_train_acc = train_epoch(masked_net, train_loader, criterion, masked_optimizer, device)
    masked_train_losses.append(masked_train_loss)
    masked_train_accs.append(masked_train_acc)
    masked_test_acc, masked_test_loss = evaluate(masked_net, test_loader, device, criterion)
    masked_test_accs.append(masked_test_acc)
    masked_test_losses.append(masked_test_loss)
    stats = masked_net.get_sparsity_stats()
    sparsity_dict = {name: stat['sparsity'] for name, stat in stats.items()}
    sparsity_per_epoch.append(sparsity_dict)
    masks_2d = masked_net.get_masks_as_2d()
    masks_per_epoch.append(masks_2d)
    if (epoch + 1) % dst_frequency == 0:
        apply_dst_step(masked_net, prune_ratio=0.1)
        stats = masked_net.get_sparsity_stats()
        avg_sparsity = np.mean([s['sparsity'] for s in stats.values()])
'''


def test_seed_steps_2_and_3_run_against_utils(tiny_loader):
    import utils

    namespace = {
        "copy": copy, "np": np, "nn": nn, "optim": torch.optim, "torch": torch,
        "device": torch.device("cpu"), "GLOBAL_SPARSITY": 0.95, "learning_rate": 0.001,
        "num_epochs": 2, "dst_frequency": 2, "train_loader": tiny_loader, "test_loader": tiny_loader,
        "SimpleNet": utils.SimpleNet, "MaskedNet": utils.MaskedNet, "train_epoch": utils.train_epoch,
        "evaluate": utils.evaluate, "apply_dst_step": utils.apply_dst_step,
    }
    exec(SEED_STEP_2, namespace)
    before = {name: mask.copy() for name, mask in namespace["masked_net"].get_masks_as_2d().items()}
    exec(SEED_STEP_3, namespace)
    masked_net = namespace["masked_net"]
    assert len(namespace["masked_test_accs"]) == 2 and len(namespace["masks_per_epoch"]) == 2
    assert namespace["avg_sparsity"] == pytest.approx(0.95, abs=0.01)
    after = masked_net.get_masks_as_2d()
    assert any((before[name] != after[name]).any() for name in after)  # the DST step moved connections
    for layer in masked_net.masked_layers().values():
        assert torch.all(layer.weight[~layer.mask] == 0)
        state = namespace["masked_optimizer"].state[layer.weight]
        assert torch.all(state["exp_avg"][~layer.mask] == 0) and torch.all(state["exp_avg_sq"][~layer.mask] == 0)


@pytest.mark.parametrize("targets, match", [
    (torch.tensor([[0], [0], [1], [2], [0]]), r"shape \(5,\).*got shape \(5, 1\)"),  # a column: broadcast to 5x5
    (F.one_hot(torch.tensor([0, 0, 1, 2, 0]), 3).float(), r"targets\.argmax\(1\)"),  # one-hot rows
    (torch.tensor([0, 0, 1, 2, 7]), r"in \[0, 3\).*\[0, 7\]"),  # a label past the last class
    (torch.tensor([0.0, 0.0, 1.0, 2.0, 0.0]), "integer class indices"),
])
def test_evaluate_refuses_targets_that_are_not_class_indices(targets, match):
    loader = DataLoader(TensorDataset(torch.zeros(5, 1), targets), batch_size=5)
    with pytest.raises(ValueError, match=match):
        evaluate(FixedLogits(), loader, "cpu")
    with pytest.raises(ValueError, match=match):
        evaluate(FixedLogits(), loader, "cpu", nn.CrossEntropyLoss())


def test_train_epoch_refuses_one_hot_targets_and_dict_batches():
    model = FixedLogits()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    one_hot = DataLoader(TensorDataset(torch.zeros(4, 1), F.one_hot(torch.tensor([0, 1, 0, 0]), 3).float()),
                         batch_size=4)
    with pytest.raises(ValueError, match="one-hot"):  # the loss would train, the accuracy would be wrong
        train_epoch(model, one_hot, nn.CrossEntropyLoss(), optimizer, "cpu", progress=False)
    dicts = [{"image": torch.zeros(4, 1), "label": torch.tensor([0, 1, 0, 0])}]
    with pytest.raises(TypeError, match=r"dict with keys \['image', 'label'\]"):
        train_epoch(model, dicts, nn.CrossEntropyLoss(), optimizer, "cpu", progress=False)
    with pytest.raises(TypeError, match="dict with keys"):
        evaluate(model, dicts, "cpu")
