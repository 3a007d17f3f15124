"""Runtime modules built from packed checkpoints; they call kernel ops through a chosen backend.

Each layout registers one module class with `register_runtime(layout_name)`. A class provides
`from_packed(tensors, meta, bias, backend) -> nn.Module`, where `tensors` are the layout's packed
tensors (suffix → tensor), `meta` the per-linear facts the layout recorded, and `backend` the
`qtool.kernels.Backend` whose ops the module calls in `forward`.
"""

from __future__ import annotations

import importlib
import importlib.util

RUNTIME_MODULES: dict[str, type] = {}

_BUILTIN = ("qtool.nn.unpacked", "qtool.nn.quick", "qtool.nn.w8a8", "qtool.nn.w4a8")


def register_runtime(layout_name: str):
    def deco(cls):
        RUNTIME_MODULES[layout_name] = cls
        return cls

    return deco


def runtime_module_for(layout_name: str) -> type:
    """The layout's own runtime module, or a generic dequantize-then-matmul module for layouts
    that have none (e.g. export formats such as awq-gemm)."""
    if layout_name in RUNTIME_MODULES:
        return RUNTIME_MODULES[layout_name]
    from qtool.layouts.base import get_layout
    from qtool.nn.unpacked import generic_runtime

    return generic_runtime(get_layout(layout_name))


for _mod in _BUILTIN:
    if importlib.util.find_spec(_mod) is not None:
        importlib.import_module(_mod)
