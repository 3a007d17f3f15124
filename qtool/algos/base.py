"""Pass protocol and registry.

A pass turns a block's statistics into named artifacts (`search`, which must not leave the block
modified) and folds them into the block's weights (`apply`). Search and apply are separate so that
artifacts can be saved and replayed without repeating a search. Passes run in the fixed `ORDER`;
a recipe only switches them on (`passes.<name>`) and tunes them.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, ClassVar, Protocol

from torch import Tensor

from qtool.calib.runner import BlockContext

# Fixed order (deepcompressor's): reorder → smoothing (attention, activations, projections) → AWQ.
# Rotation is a model-level transform applied before block-wise calibration (see pipeline).
ORDER = ("reorder", "smooth_attention", "smoothquant", "smooth_proj", "awq")


class Pass(Protocol):
    name: ClassVar[str]

    def check(self, recipe, adapter, cfg) -> list[str]:
        """Plan-time problems (no weights read)."""

    def search(self, ctx: BlockContext, pcfg: Any, recipe) -> dict[str, Tensor]:
        """Artifacts keyed by fqn relative to the model (e.g. 'model.layers.3.input_layernorm.smooth_scale')."""

    def apply(self, ctx: BlockContext, artifacts: dict[str, Tensor], pcfg: Any, recipe) -> None:
        """Fold the artifacts into the block in place."""


PASSES: dict[str, Pass] = {}

_MODULES = {
    "reorder": "qtool.algos.reorder",
    "smooth_attention": "qtool.algos.smooth_attention",
    "smoothquant": "qtool.algos.smoothquant",
    "smooth_proj": "qtool.algos.smooth_proj",
    "awq": "qtool.algos.awq",
}


def register_pass(cls):
    PASSES[cls.name] = cls()
    return cls


def get_pass(name: str) -> Pass | None:
    if name not in PASSES and name in _MODULES and importlib.util.find_spec(_MODULES[name]):
        importlib.import_module(_MODULES[name])
    return PASSES.get(name)


def enabled_passes(recipe) -> list[tuple[str, Any]]:
    """(name, pass config) of every switched-on pass, in ORDER."""
    out = []
    for name in ORDER:
        pcfg = getattr(recipe.passes, name, None)
        if pcfg is not None:
            out.append((name, pcfg))
    return out
