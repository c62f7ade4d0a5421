"""The ``linear`` kind: a masked Linear as one CSR matrix ``(out, in)``, any mask; the default for linears."""

from dst.csr.kinds.base import register
from dst.csr.kinds.csr import CSRKind
from dst.engine.masked_layers import MaskedLinear


@register
class Linear(CSRKind):
    name = "linear"
    modules = (MaskedLinear,)

    def describe(self, module, name: str, label: str, **options) -> tuple[dict, dict]:
        return {"kind": self.name, "name": name}, self.host_from_layer(module)

    def build(self, ops, group: dict, host: dict):
        if ops.name == "numba":
            from dst.csr.numba_backend import NumbaLinearStep as step_class
        else:
            from dst.csr.steps import LinearStep as step_class
        return step_class(ops, group["name"], host, group.get("relu", False))
