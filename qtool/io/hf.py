"""Floating-point model sources: resolve a `model.path`, read its config, load model and tokenizer.

Sources (`resolve_source`):
  builtin  a built-in name from `qtool.assets.BUILTIN_MODELS` (fetched by `qtool assets fetch`)
  hf-dir   a local directory with `config.json` and safetensors weights
  gguf     a local `*.gguf` file; dequantized once into a cached safetensors directory
           `<QTOOL_HOME>/converted/<sha256 prefix>/`, which every later load uses
  hub      an `org/name` id, loaded through transformers (needs network access)

Weights are only ever read from safetensors (`use_safetensors=True`): qtool never unpickles.
Already-quantized checkpoints are not handled here.
"""

from __future__ import annotations

import json
import logging
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from qtool.assets import BUILTIN_MODELS, builtin_model_dir, convert_gguf_to_hf, qtool_home, sha256_file
from qtool.errors import CheckpointError, ConfigError, IncompatibleModelError

if TYPE_CHECKING:  # keep `import qtool.io.hf` free of torch/transformers
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

log = logging.getLogger("qtool.io.hf")

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_DTYPES = ("float32", "float16", "bfloat16")
_CONVERTED_MARKER = "qtool-asset.json"


@dataclass(frozen=True)
class ModelSource:
    """Where a floating-point model comes from.

    For kind "gguf", `path` is the directory holding the file and `gguf_file` its name (the form
    transformers' `from_pretrained(path, gguf_file=...)` takes); otherwise `gguf_file` is None and
    `path` is the HF directory (builtin, hf-dir) or the hub id (hub).
    """

    kind: str  # "builtin" | "hf-dir" | "gguf" | "hub"
    path: str
    gguf_file: Optional[str] = None

    @property
    def file(self) -> Path:
        """Full path of the GGUF file (kind "gguf" only)."""
        if self.gguf_file is None:
            raise ValueError(f"source of kind {self.kind!r} has no GGUF file")
        return Path(self.path) / self.gguf_file


def resolve_source(path: str) -> ModelSource:
    """Classify `model.path`: built-in name, HF directory, GGUF file or hub id.

    Raises AssetError for a built-in model that was not fetched, CheckpointError for a local path
    that does not exist or is not a model.
    """
    if not isinstance(path, str) or not path.strip():
        raise ConfigError("model.path is empty", "give a built-in name (smollm2-135m), a directory, a .gguf file or org/name")
    if path in BUILTIN_MODELS:
        return ModelSource("builtin", str(builtin_model_dir(path)))
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return ModelSource("hf-dir", str(p.resolve()))
        ggufs = sorted(p.glob("*.gguf"))
        hint = f"it holds {ggufs[0].name}: pass that file instead" if len(ggufs) == 1 else "expected a Hugging Face model directory"
        raise CheckpointError(f"model directory {p} has no config.json", hint)
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            rp = p.resolve()
            return ModelSource("gguf", str(rp.parent), rp.name)
        raise CheckpointError(
            f"model path {p} is a file but not a .gguf file", "pass the model directory (with config.json) instead"
        )
    if _HUB_ID.match(path) and not path.lower().endswith(".gguf"):
        return ModelSource("hub", path)
    raise CheckpointError(
        f"model path not found: {path}",
        f"give a built-in name ({', '.join(BUILTIN_MODELS)}), an existing directory, a .gguf file or a hub id org/name",
    )


def _as_source(source: ModelSource | str) -> ModelSource:
    return source if isinstance(source, ModelSource) else resolve_source(source)


# --- GGUF conversion cache ------------------------------------------------------------------
def converted_dir(source: ModelSource) -> Path:
    """Cache directory a GGUF source converts to (`<QTOOL_HOME>/converted/<sha256[:16]>`)."""
    digest = sha256_file(source.file)
    return qtool_home() / "converted" / digest[:16]


def _converted_ok(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / _CONVERTED_MARKER).is_file() and any(d.glob("*.safetensors"))


def ensure_converted(source: ModelSource) -> Path:
    """Dequantize a GGUF source into its cached safetensors directory (once); return the directory."""
    d = converted_dir(source)
    if _converted_ok(d):
        return d
    log.info("converting %s to %s (first use of this GGUF file)", source.file, d)
    try:
        convert_gguf_to_hf(source.file, d, "float32")
    except ImportError as e:
        raise IncompatibleModelError(f"reading {source.file} needs the `gguf` package: {e}", "pip install gguf") from e
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise IncompatibleModelError(f"cannot convert {source.file}: {type(e).__name__}: {e}") from e
    return d


def _local_dir(source: ModelSource) -> Optional[Path]:
    """The safetensors directory to load from, or None for hub sources. Converts GGUF on first use."""
    if source.kind in ("builtin", "hf-dir"):
        return Path(source.path)
    if source.kind == "gguf":
        return ensure_converted(source)
    return None


def _hub_error(source: ModelSource, what: str, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"cannot load {what} of hub model {source.path!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
        "hub access needs network; offline, download the model elsewhere and pass its local directory",
    )


# --- GGUF metadata (cheap: no tensor data, tokenizer arrays skipped) ------------------------
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_KEEP_ARRAY = 64  # longer arrays (vocabulary, merges, scores) are skipped, only their length kept
# architectures whose config is rebuilt here from metadata; others use transformers' own reader
_FAST_GGUF_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class SkippedArray:
    """Placeholder for a long GGUF metadata array that was not decoded."""

    length: int
    elem_type: int


def read_gguf_metadata(path: Path | str) -> tuple[dict[str, Any], list[str]]:
    """(metadata key/values, tensor names) of a GGUF v2/v3 file, reading no tensor data.

    Arrays longer than 64 elements come back as `SkippedArray(length, elem_type)`.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise IncompatibleModelError(f"{path} is not a GGUF file (bad magic bytes)")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        if version not in (2, 3):
            raise IncompatibleModelError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        pos = 24

        def read_str(pos: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", mm, pos)
            return mm[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"), pos + 8 + n

        def read_val(vtype: int, pos: int) -> tuple[Any, int]:
            if vtype in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[vtype]
                return struct.unpack_from(fmt, mm, pos)[0], pos + struct.calcsize(fmt)
            if vtype == _GGUF_STRING:
                return read_str(pos)
            if vtype == _GGUF_ARRAY:
                etype, count = struct.unpack_from("<IQ", mm, pos)
                pos += 12
                if count > _GGUF_KEEP_ARRAY:
                    if etype in _GGUF_SCALARS:
                        return SkippedArray(count, etype), pos + count * struct.calcsize(_GGUF_SCALARS[etype])
                    for _ in range(count):  # strings / nested arrays: walk them without decoding
                        _, pos = skip_val(etype, pos)
                    return SkippedArray(count, etype), pos
                out = []
                for _ in range(count):
                    v, pos = read_val(etype, pos)
                    out.append(v)
                return out, pos
            raise IncompatibleModelError(f"{path}: unknown GGUF metadata value type {vtype}")

        def skip_val(vtype: int, pos: int) -> tuple[None, int]:
            if vtype == _GGUF_STRING:
                (n,) = struct.unpack_from("<Q", mm, pos)
                return None, pos + 8 + n
            _, pos = read_val(vtype, pos)
            return None, pos

        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = read_str(pos)
            (vtype,) = struct.unpack_from("<I", mm, pos)
            meta[key], pos = read_val(vtype, pos + 4)
        names: list[str] = []
        for _ in range(n_tensors):
            name, pos = read_str(pos)
            (ndim,) = struct.unpack_from("<I", mm, pos)
            pos += 4 + 8 * ndim + 4 + 8  # dims, ggml type, data offset
            names.append(name)
    return meta, names


def gguf_config_dict(meta: dict[str, Any], tensor_names: list[str]) -> Optional[dict[str, Any]]:
    """transformers config dict rebuilt from GGUF metadata, following transformers' own GGUF
    loader (`load_gguf_checkpoint`) with its key mapping; None for architectures not covered here."""
    from transformers import modeling_gguf_pytorch_utils as mg

    arch = meta.get("general.architecture")
    if arch not in _FAST_GGUF_ARCHS:
        return None
    # transformers: llama.cpp stores Mistral as "llama"; its test is list membership of general.name
    updated = "mistral" if "llama" in arch and meta.get("general.name") == "mistral" else arch
    mapping = mg.GGUF_TO_TRANSFORMERS_MAPPING["config"]
    cfg: dict[str, Any] = {"tie_word_embeddings": all(n != "output.weight" for n in tensor_names)}
    for key, value in getattr(mg, "GGUF_CONFIG_DEFAULTS_MAPPING", {}).get(updated, {}).items():
        cfg.setdefault(key, value)
    for key, value in meta.items():
        key = key.replace(arch, updated)
        prefix, _, rest = key.partition(".")
        if isinstance(value, SkippedArray):
            continue
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str) and arch in value:
            value = value.replace(arch, updated)
        table = mapping.get(prefix, {})
        if rest not in table or table[rest] is None or table[rest] == -1:
            continue
        cfg[table[rest]] = value
    if "vocab_size" not in cfg:
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is not None:
            cfg["vocab_size"] = tokens.length if isinstance(tokens, SkippedArray) else len(tokens)
    return cfg


def _gguf_config(src: ModelSource) -> "PretrainedConfig":
    from transformers import AutoConfig, CONFIG_MAPPING

    meta, names = read_gguf_metadata(src.file)
    cfg = gguf_config_dict(meta, names)
    if cfg is None:  # other architectures: transformers' reader (parses the whole header; slower)
        return AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file)
    config = CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)
    config._name_or_path = src.path  # as transformers' from_pretrained(path, gguf_file=...) records it
    return config


# --- config ---------------------------------------------------------------------------------
def load_config(
    source: ModelSource | str, trust_remote_code: bool = False, revision: Optional[str] = None
) -> "PretrainedConfig":
    """The model's transformers config, without reading weights.

    A GGUF source whose converted directory already exists uses that directory; otherwise the
    config is built from the GGUF metadata only (no dequantization).
    """
    from transformers import AutoConfig

    src = _as_source(source)
    try:
        if src.kind in ("builtin", "hf-dir"):
            return AutoConfig.from_pretrained(src.path, trust_remote_code=trust_remote_code)
        if src.kind == "gguf":
            d = converted_dir(src)
            if _converted_ok(d):
                return AutoConfig.from_pretrained(str(d))
            return _gguf_config(src)
    except ImportError as e:
        raise IncompatibleModelError(f"reading {src.path} needs a missing package: {e}") from e
    except (OSError, ValueError, KeyError) as e:
        raise IncompatibleModelError(f"cannot read the config of {src.path}: {type(e).__name__}: {e}") from e
    try:
        return AutoConfig.from_pretrained(src.path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(src, "the config", e) from e


# --- tokenizer and model --------------------------------------------------------------------
def load_tokenizer(source: ModelSource | str, trust_remote_code: bool = False, revision: Optional[str] = None):
    """The model's tokenizer (from the HF dir, the converted GGUF dir, or the hub)."""
    from transformers import AutoTokenizer

    src = _as_source(source)
    d = _local_dir(src)
    if d is not None:
        try:
            return AutoTokenizer.from_pretrained(str(d), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot load a tokenizer from {d}: {type(e).__name__}: {e}",
                                  "the model directory needs tokenizer.json / tokenizer_config.json") from e
    try:
        return AutoTokenizer.from_pretrained(src.path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(src, "the tokenizer", e) from e


def resolve_dtype(dtype: str, device: "str | torch.device") -> "torch.dtype":
    """`auto` = float32 on CPU, float16 on CUDA; otherwise the named floating-point dtype."""
    import torch

    if dtype == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.float16
    if dtype not in _DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} must be one of auto, {', '.join(_DTYPES)}")
    return getattr(torch, dtype)


def _check_local_weights(d: Path) -> None:
    if not (any(d.glob("*.safetensors")) or (d / "model.safetensors.index.json").is_file()):
        pickled = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        extra = f" (found {', '.join(pickled)}; qtool never unpickles)" if pickled else ""
        raise CheckpointError(f"no safetensors weights in {d}{extra}",
                              "convert the checkpoint to safetensors, e.g. save_pretrained(safe_serialization=True)")
    cfg = json.loads((d / "config.json").read_text())
    qc = cfg.get("quantization_config")
    if qc:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise IncompatibleModelError(
            f"{d} is an already-quantized checkpoint (quantization_config.quant_method={method})",
            "qtool quantizes floating-point models; load qtool checkpoints with the checkpoint loader",
        )


def load_model(
    source: ModelSource | str,
    dtype: str = "auto",
    device: "str | torch.device" = "cpu",
    trust_remote_code: bool = False,
    revision: Optional[str] = None,
) -> tuple["PreTrainedModel", Any]:
    """Load a floating-point causal LM and its tokenizer.

    `dtype`: auto (float32 on CPU, float16 on CUDA) | float32 | float16 | bfloat16. The model is
    returned on `device`, in eval mode, with `config.use_cache = False`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    src = _as_source(source)
    torch_dtype = resolve_dtype(dtype, device)
    d = _local_dir(src)
    kwargs = dict(dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    if d is not None:
        _check_local_weights(d)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(d), **kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise IncompatibleModelError(f"cannot load {d} as a causal LM: {type(e).__name__}: {e}") from e
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(src.path, revision=revision, **kwargs)
        except (OSError, ValueError) as e:
            raise _hub_error(src, "the weights", e) from e
    model.to(torch.device(device))
    model.eval()
    model.config.use_cache = False
    tok = load_tokenizer(src, trust_remote_code=trust_remote_code, revision=revision)
    log.info("loaded %s (%s) as %s on %s", src.path, src.kind, torch_dtype, device)
    return model, tok


def load_from_cfg(cfg: Any, device: "str | torch.device" = "cpu") -> tuple["PreTrainedModel", Any]:
    """Convenience: `load_model` driven by a `qtool.recipe.ModelCfg`."""
    return load_model(cfg.path, dtype=cfg.dtype, device=device,
                      trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
