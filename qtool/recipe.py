"""Recipe: the typed, validated description of one run.

Schema = omegaconf structured configs built from the dataclasses below. `load_recipe` merges YAML
files in order, then `key=value` overrides, into the schema (struct mode: an unknown key is a
`ConfigError` naming the nearest valid key), converts to plain dataclasses and runs `check`, which
reports every cross-field problem at once. Passes run in a fixed order chosen by qtool; the recipe
only switches them on (a section set to `{}` or with fields) and tunes them.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from qtool.errors import ConfigError

FORMAT_VERSION = 1


@dataclass
class ModelCfg:
    path: str = "smollm2-135m"  # local HF dir, .gguf file, hub id, or built-in name
    dtype: str = "auto"  # auto (fp32 on CPU, fp16 on GPU) | float32 | float16 | bfloat16
    adapter: Optional[str] = None  # force an adapter; default: from config.json "architectures"
    trust_remote_code: bool = False
    revision: Optional[str] = None


@dataclass
class CalibCfg:
    data: str = "bundled"  # bundled | path to .txt/.jsonl/.parquet (file or dir) | hf:NAME[:CONFIG]
    split: str = "train"  # for hub datasets
    text_key: str = "text"  # for jsonl/parquet/hub datasets
    n_samples: int = 128  # number of blocks
    seqlen: int = 512  # tokens per block
    seed: int = 42
    batch_size: int = 16  # micro-batch for block forwards (bounds memory)
    offload: bool = True  # keep cached block activations on CPU between blocks
    propagate: str = "fp"  # fp: next block sees FP outputs (AWQ); quantized: sees quantized outputs
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class GPTQCfg:
    damp: float = 0.01
    block_size: int = 128


@dataclass
class QuantCfg:
    w_bits: int = 4
    group_size: int = 128  # -1 = per output channel
    symmetric: bool = False
    pad: bool = False  # pad K up to a multiple of group_size instead of refusing such shapes
    scheme: str = "rtn"  # rtn | progressive (QoQ two-level)
    a_bits: int = 16  # 16 = weight-only; 8 = int8 activations
    a_granularity: str = "per_token"  # per_token (dynamic) | per_tensor
    a_static: bool = False  # per-tensor static activation scales from calibration
    kv_bits: int = 16  # 16 = off; 4 = KV4
    gptq: Optional[GPTQCfg] = None
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])


@dataclass
class RotationCfg:
    kind: str = "hadamard"
    per_head_vo: bool = True


@dataclass
class ReorderCfg:
    metric: str = "inputs_absmax"


@dataclass
class SmoothAttentionCfg:
    alpha: float = 0.5
    beta: float = 0.0


@dataclass
class SmoothQuantCfg:
    alpha: Optional[float] = None  # None: the model family's default (Llama 0.85, Mistral 0.8, ...)
    search: bool = False  # grid search α on block output error
    grid: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9])


@dataclass
class SmoothProjCfg:
    alpha: float = 0.3
    beta: float = 0.7


@dataclass
class AWQCfg:
    grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    n_sample_token: int = 512
    gqa_vo: str = "skip"  # skip | average (head-averaged v→o scales under GQA)


@dataclass
class PassesCfg:
    rotation: Optional[RotationCfg] = None
    reorder: Optional[ReorderCfg] = None
    smooth_attention: Optional[SmoothAttentionCfg] = None
    smoothquant: Optional[SmoothQuantCfg] = None
    smooth_proj: Optional[SmoothProjCfg] = None
    awq: Optional[AWQCfg] = None


@dataclass
class ArtifactsCfg:
    save: Optional[str] = None  # write search results (scales, clip values) to this file
    load: Optional[str] = None  # replay search results instead of searching


@dataclass
class OutputCfg:
    dir: Optional[str] = None
    shard_size: str = "2GB"
    overwrite: bool = False
    fp_dtype: str = "auto"  # dtype of the tensors kept in floating point (embeddings, norms): auto = model dtype


@dataclass
class EvalCfg:
    ppl: list[str] = field(default_factory=lambda: ["bundled"])
    seqlen: int = 2048
    max_windows: Optional[int] = None


@dataclass
class Recipe:
    format_version: int = FORMAT_VERSION
    name: str = "unnamed"
    seed: int = 0
    model: ModelCfg = field(default_factory=ModelCfg)
    calib: CalibCfg = field(default_factory=CalibCfg)
    quant: QuantCfg = field(default_factory=QuantCfg)
    passes: PassesCfg = field(default_factory=PassesCfg)
    artifacts: ArtifactsCfg = field(default_factory=ArtifactsCfg)
    layout: str = "unpacked"  # unpacked | quick-w4a16 | w8a8 | w4a8kv4
    output: OutputCfg = field(default_factory=OutputCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)


def _all_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key path of the schema (for 'did you mean' suggestions)."""
    import typing

    keys = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        path = f"{prefix}{f.name}"
        keys.append(path)
        t = hints[f.name]
        inner = [a for a in getattr(t, "__args__", ()) if is_dataclass(a)]
        target = t if is_dataclass(t) else (inner[0] if inner else None)
        if target is not None:
            keys.extend(_all_keys(target, path + "."))
    return keys


def _suggest(key: str) -> str:
    keys = _all_keys(Recipe)
    leaf = key.split(".")[-1]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:
        close = [k for k in keys if k.split(".")[-1] in difflib.get_close_matches(leaf, [x.split(".")[-1] for x in keys], n=1, cutoff=0.6)][:1]
    return f"did you mean {close[0]!r}?" if close else "see `qtool quantize --print-config` for valid keys"


def _config_error(e: Exception, source: str) -> ConfigError:
    from omegaconf.errors import ConfigKeyError, ValidationError

    key = getattr(e, "full_key", None) or ""
    if isinstance(e, (ConfigKeyError, AttributeError)) or "not in struct" in str(e):
        return ConfigError(f"unknown recipe key {key!r} in {source}", _suggest(key))
    if isinstance(e, ValidationError):
        msg = str(e).splitlines()[0]
        return ConfigError(f"invalid value for {key!r} in {source}: {msg}")
    return ConfigError(f"invalid recipe in {source}: {str(e).splitlines()[0]}")


def load_recipe(files: list[str | Path] = (), overrides: list[str] = ()) -> Recipe:
    """Merge YAML files in order, then dotlist overrides, into the schema; validate; return a Recipe."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = OmegaConf.structured(Recipe)
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise ConfigError(f"recipe file not found: {p}", "check the path given to -c/--config")
        try:
            loaded = OmegaConf.load(p)
        except Exception as e:
            raise ConfigError(f"cannot parse recipe {p}: {str(e).splitlines()[0]}") from e
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as e:
            raise _config_error(e, str(p)) from e
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([ov]))
        except OmegaConfBaseException as e:
            raise _config_error(e, f"override {ov!r}") from e
    try:
        recipe = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _config_error(e, "recipe") from e
    problems = check(recipe)
    if problems:
        raise ConfigError("invalid recipe: " + "; ".join(problems))
    return recipe


_CHOICES = {
    "model.dtype": ("auto", "float32", "float16", "bfloat16"),
    "calib.propagate": ("fp", "quantized"),
    "quant.scheme": ("rtn", "progressive"),
    "quant.a_granularity": ("per_token", "per_tensor"),
    "output.fp_dtype": ("auto", "float32", "float16", "bfloat16"),
}


def check(r: Recipe) -> list[str]:
    """Every cross-field rule; returns all violations (never rewrites the recipe)."""
    p: list[str] = []
    if r.format_version != FORMAT_VERSION:
        p.append(f"format_version {r.format_version} is not supported (this qtool reads {FORMAT_VERSION})")
    for key, choices in _CHOICES.items():
        sec, name = key.split(".")
        val = getattr(getattr(r, sec), name)
        if val not in choices:
            p.append(f"{key}={val!r} must be one of {', '.join(choices)}")
    q = r.quant
    if q.w_bits not in range(2, 9):
        p.append(f"quant.w_bits={q.w_bits} must be between 2 and 8")
    if q.group_size != -1 and q.group_size not in (32, 64, 128, 256):
        p.append(f"quant.group_size={q.group_size} must be 32, 64, 128, 256 or -1 (per-channel)")
    if q.a_bits not in (8, 16):
        p.append(f"quant.a_bits={q.a_bits} must be 8 or 16")
    if q.kv_bits not in (4, 8, 16):
        p.append(f"quant.kv_bits={q.kv_bits} must be 4, 8 or 16")
    if q.a_static and q.a_granularity != "per_tensor":
        p.append("quant.a_static=true needs quant.a_granularity=per_tensor")
    if r.calib.n_samples < 1 or r.calib.seqlen < 8:
        p.append("calib.n_samples must be ≥ 1 and calib.seqlen ≥ 8")
    ps = r.passes
    if ps.smoothquant is not None and q.a_bits == 16:
        p.append("passes.smoothquant needs quant.a_bits=8 (smoothing only helps quantized activations)")
    if ps.smooth_attention is not None and q.kv_bits == 16:
        p.append("passes.smooth_attention needs quant.kv_bits < 16")
    if ps.awq is not None and ps.awq.gqa_vo not in ("skip", "average"):
        p.append(f"passes.awq.gqa_vo={ps.awq.gqa_vo!r} must be skip or average")
    if ps.awq is not None and q.a_bits != 16:
        p.append("passes.awq targets weight-only quantization (quant.a_bits=16)")
    if q.scheme == "progressive" and q.w_bits != 4:
        p.append("quant.scheme=progressive needs quant.w_bits=4")
    p.extend(_layout_rules(r))
    return p


def _layout_rules(r: Recipe) -> list[str]:
    q, lay, p = r.quant, r.layout, []
    if lay == "quick-w4a16":
        if q.w_bits != 4 or q.a_bits != 16 or q.symmetric or q.group_size not in (32, 64, 128):
            p.append("layout quick-w4a16 needs quant.w_bits=4, a_bits=16, symmetric=false, group_size 32/64/128")
    elif lay == "w8a8":
        if q.w_bits != 8 or q.a_bits != 8 or not q.symmetric or q.group_size != -1:
            p.append("layout w8a8 needs quant.w_bits=8, a_bits=8, symmetric=true, group_size=-1")
    elif lay == "w4a8kv4":
        if q.w_bits != 4 or q.a_bits != 8 or q.kv_bits != 4:
            p.append("layout w4a8kv4 needs quant.w_bits=4, a_bits=8, kv_bits=4")
        if q.group_size != -1 and q.scheme != "progressive":
            p.append("layout w4a8kv4 with groups needs quant.scheme=progressive")
    elif lay != "unpacked":
        from qtool.layouts.base import available_layouts

        if lay not in available_layouts():
            p.append(f"layout {lay!r} is unknown (known: {', '.join(sorted(available_layouts()))})")
    return p


def to_dict(r: Recipe) -> dict[str, Any]:
    return asdict(r)


def to_yaml(r: Recipe) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(r))


def fingerprint(r: Recipe) -> str:
    """sha256 of the canonical JSON of the recipe (output dir and overwrite flag excluded)."""
    d = to_dict(r)
    d["output"] = {k: v for k, v in d["output"].items() if k not in ("dir", "overwrite")}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
