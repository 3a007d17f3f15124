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
    if layout_name not in RUNTIME_MODULES:
        from qtool.errors import CheckpointError

        raise CheckpointError(
            f"no runtime module for layout {layout_name!r}",
            f"known: {', '.join(sorted(RUNTIME_MODULES))}",
        )
    return RUNTIME_MODULES[layout_name]


for _mod in _BUILTIN:
    if importlib.util.find_spec(_mod) is not None:
        importlib.import_module(_mod)
