"""The ``conv`` kind: a masked Conv2d (stride 1, zero padding, groups 1) as the CSR matrix of its im2col product.

Its matrix is ``(out, in*kh*kw)``, column ``c*kh*kw + i*kw + j``; a max-pool right after it
and the ReLUs after it fold into its step (``dst.csr.steps.ConvStep``, numba's ``NumbaConvStep``).
"""

from dst.csr.kinds.base import MAX_INDEX, MAX_WINDOW, check_ints, register
from dst.csr.kinds.csr import CSRKind
from dst.engine.masked_layers import MaskedConv2d

# A conv's index tables are built per column of its (out, in*kh*kw) matrix: 2**24 columns
# (a 128 MiB table) is far above any real conv and keeps a crafted header from asking for more.
MAX_CONV_COLUMNS = 2**24


@register
class Conv(CSRKind):
    name = "conv"
    modules = (MaskedConv2d,)
    takes_images = True

    def describe(self, module, name: str, label: str, **options) -> tuple[dict, dict]:
        if (module.groups != 1 or tuple(module.stride) != (1, 1) or tuple(module.dilation) != (1, 1)
                or module.padding_mode != "zeros" or isinstance(module.padding, str)):
            raise ValueError(f"{label}: the sparse conv supports groups=1, stride 1, dilation 1 and "
                             f"numeric zero padding, got groups={module.groups}, stride={module.stride}, "
                             f"dilation={module.dilation}, padding={module.padding!r} ({module.padding_mode})")
        step = {"kind": self.name, "name": name, "in_channels": module.in_channels,
                "kernel_size": list(module.kernel_size), "padding": list(module.padding)}
        return step, self.host_from_layer(module)

    def check(self, step: dict, host: dict, where: str) -> None:
        super().check(step, host, where)
        name = step["name"]
        check_ints(step.get("in_channels"), 1, MAX_INDEX, f"{where}: in_channels", 1)
        kh, kw = check_ints(step.get("kernel_size"), 1, MAX_WINDOW, f"{where}: kernel_size", 2)
        check_ints(step.get("padding"), 0, MAX_WINDOW, f"{where}: padding", 2)
        columns = step["in_channels"] * kh * kw
        if host["shape"][1] != columns or columns > MAX_CONV_COLUMNS:
            raise ValueError(f"conv {name!r} has a weight of shape {tuple(host['shape'])}, but "
                             f"{step['in_channels']} input channels and a {kh}x{kw} kernel make {columns} "
                             f"columns (at most {MAX_CONV_COLUMNS:,})")

    def absorb(self, group: dict, step: dict) -> bool:
        if step["kind"] == "maxpool" and "pool_kernel" not in group:
            group["pool_kernel"] = step["kernel_size"]
            return True
        return super().absorb(group, step)

    def build(self, ops, group: dict, host: dict):
        if ops.name == "numba":
            from dst.csr.numba_backend import NumbaConvStep as step_class
        else:
            from dst.csr.steps import ConvStep as step_class
        return step_class(ops, group["name"], host, group["in_channels"], group["kernel_size"], group["padding"],
                          group.get("pool_kernel", (1, 1)), group.get("relu", False))
