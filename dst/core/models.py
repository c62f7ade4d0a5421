"""The tutorial's networks: the seed's CNN and a plain MLP.

Both are written as chains of layers (``nn.Sequential``) so the truly sparse
engine can convert them by walking their layers in order.
"""

from collections import OrderedDict

from torch import nn


class SimpleNet(nn.Sequential):
    """The seed's CNN for 28x28 grey images: two conv blocks, then four linears.

    conv 1->16 and 16->32 (3x3, padding 1), each followed by 2x2 max-pool and ReLU,
    then linear 1568->128->1000->1000->num_classes with ReLU between. With
    ``num_classes=10`` it has 1,345,642 parameters.

    The seed applies ReLU before the pool; pooling first computes exactly the same
    function (both are monotone, so max(relu(a), relu(b)) = relu(max(a, b))) with the
    ReLU on 4x fewer values, which made a CPU training step about 8% faster
    (benchmarks/training_step.py).
    """

    def __init__(self, num_classes: int = 10):
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(1, 16, kernel_size=3, padding=1)),
            ("pool1", nn.MaxPool2d(2)),
            ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(16, 32, kernel_size=3, padding=1)),
            ("pool2", nn.MaxPool2d(2)),
            ("relu2", nn.ReLU()),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(32 * 7 * 7, 128)),
            ("relu3", nn.ReLU()),
            ("fc2", nn.Linear(128, 1000)),
            ("relu4", nn.ReLU()),
            ("fc3", nn.Linear(1000, 1000)),
            ("relu5", nn.ReLU()),
            ("fc4", nn.Linear(1000, num_classes)),
        ]))


class MLP(nn.Sequential):
    """A plain multi-layer perceptron on flattened images, ReLU between layers."""

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (1000, 1000),
                 num_classes: int = 10):
        widths = (in_features, *hidden, num_classes)
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            if index > 1:
                layers.append((f"relu{index - 1}", nn.ReLU()))
            layers.append((f"fc{index}", nn.Linear(fan_in, fan_out)))
        super().__init__(OrderedDict(layers))


def lenet_300_100(num_classes: int = 10) -> MLP:
    """LeNet-300-100 (LeCun et al. 1998): 784-300-100-10, the MLP of the DST papers' MNIST tables.

    266,200 weights (266,610 parameters with biases), as in sparse_learning's ``LeNet_300_100``.
    """
    return MLP(784, (300, 100), num_classes)
