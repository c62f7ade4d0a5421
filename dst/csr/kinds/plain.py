"""The weightless kinds: ``relu``, ``maxpool`` (stride == kernel) and ``flatten`` (from dim 1)."""

from torch import nn

from dst.csr.kinds.base import MAX_WINDOW, Kind, check_ints, register
from dst.csr.steps import Flatten as FlattenStep
from dst.csr.steps import MaxPool as MaxPoolStep
from dst.csr.steps import ReLU as ReLUStep


@register
class ReLU(Kind):
    name = "relu"
    modules = (nn.ReLU,)

    def build(self, ops, group: dict, host: None):
        return ReLUStep(ops)


@register
class MaxPool(Kind):
    name = "maxpool"
    modules = (nn.MaxPool2d,)
    takes_images = True

    def describe(self, module, name: str, label: str, **options) -> tuple[dict, None]:
        kernel, stride = _pair(module.kernel_size), _pair(module.stride)
        if kernel != stride or _pair(module.padding) != (0, 0) or _pair(module.dilation) != (1, 1) \
                or module.ceil_mode:
            raise ValueError(f"{label}: the sparse max-pool supports stride == kernel_size, no padding, "
                             f"dilation 1, floor mode; got kernel_size={module.kernel_size}, "
                             f"stride={module.stride}, padding={module.padding}")
        return {"kind": self.name, "name": name, "kernel_size": list(kernel)}, None

    def check(self, step: dict, host: None, where: str) -> None:
        check_ints(step.get("kernel_size"), 1, MAX_WINDOW, f"{where}: kernel_size", 2)

    def build(self, ops, group: dict, host: None):
        return MaxPoolStep(ops, group.get("name", ""), group["kernel_size"])


@register
class Flatten(Kind):
    name = "flatten"
    modules = (nn.Flatten,)

    def describe(self, module, name: str, label: str, **options) -> tuple[dict, None]:
        if module.start_dim != 1 or module.end_dim != -1:
            raise ValueError(f"{label}: only Flatten(start_dim=1, end_dim=-1) is supported")
        return {"kind": self.name, "name": name}, None

    def build(self, ops, group: dict, host: None):
        return FlattenStep()


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)
