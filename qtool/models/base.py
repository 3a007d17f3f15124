"""Adapters: what qtool knows about a model family, as data.

An adapter names the decoder blocks, each block's linears, the scale groups (which op's output is
the input of which linears) and the attention geometry. One adapter serves every architecture with
the same block structure; architectures are looked up by their HF `architectures` name before any
weight is loaded, so an unknown model is refused at planning time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

from qtool.errors import IncompatibleModelError


@dataclass(frozen=True)
class ScaleGroup:
    """The output of `prev` is the input of every linear in `linears`.

    `prev_kind` says how a per-channel scale is folded into `prev`: "norm" (divide its weight),
    "linear" (divide its output rows and bias). `inspect` is the sub-module whose output AWQ
    compares (None: the single linear itself).
    """

    name: str
    prev: str
    prev_kind: Literal["norm", "linear"]
    linears: tuple[str, ...]
    inspect: Optional[str] = None


@dataclass(frozen=True)
class AttentionSpec:
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: Optional[Literal["half", "interleaved"]]
    module: str = "self_attn"

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class BlockPlan:
    """The resolved description of one decoder block: groups that apply and notes on skipped ones."""

    linears: dict[str, tuple[int, int]]  # relative name → (out_features, in_features)
    groups: list[ScaleGroup]
    skipped: list[str] = field(default_factory=list)


class Adapter:
    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]
    model_types: ClassVar[tuple[str, ...]] = ()  # fallback when config.json lists no architectures

    def check_config(self, cfg: Any) -> list[str]:
        return []

    def block_plan(self, cfg: Any) -> BlockPlan:
        raise NotImplementedError

    def attention(self, cfg: Any) -> AttentionSpec:
        raise NotImplementedError

    def num_blocks(self, cfg: Any) -> int:
        raise NotImplementedError

    def blocks(self, model):
        raise NotImplementedError

    def block_prefix(self, i: int) -> str:
        raise NotImplementedError

    def tied_embeddings(self, cfg: Any) -> bool:
        return bool(getattr(cfg, "tie_word_embeddings", False))


ADAPTERS: dict[str, Adapter] = {}


def register_adapter(cls):
    ADAPTERS[cls.name] = cls()
    return cls


def _load_builtin() -> None:
    import qtool.models.llama  # noqa: F401  (registers itself)


def adapter_for(cfg: Any, forced: Optional[str] = None) -> Adapter:
    """Pick the adapter from `cfg.architectures` (or a forced adapter name); refuse unknown models."""
    _load_builtin()
    if forced is not None:
        if forced not in ADAPTERS:
            raise IncompatibleModelError(
                f"unknown adapter {forced!r}", f"known adapters: {', '.join(sorted(ADAPTERS))}"
            )
        adapter = ADAPTERS[forced]
    else:
        archs = list(getattr(cfg, "architectures", None) or [])
        adapter = next(
            (a for a in ADAPTERS.values() for arch in archs if arch in a.architectures), None
        )
        if adapter is None and not archs:
            mt = getattr(cfg, "model_type", None)
            adapter = next((a for a in ADAPTERS.values() if mt in a.model_types), None)
        if adapter is None:
            supported = sorted({arch for a in ADAPTERS.values() for arch in a.architectures})
            raise IncompatibleModelError(
                f"unsupported architecture {archs or '(none in config.json)'}",
                f"qtool supports {', '.join(supported)}; force an adapter with model.adapter=NAME",
            )
    problems = adapter.check_config(cfg)
    if problems:
        raise IncompatibleModelError(
            f"model is not compatible with adapter {adapter.name!r}: " + "; ".join(problems)
        )
    return adapter
