"""KV4 fake quantization inside Hugging Face attention, for evaluating W4A8KV4 recipes.

`enable_kv4(model)` makes every attention layer see keys and values fake-quantized the way QServe
stores its KV4 cache (`qtool.nn.w4a8.fake_quant_kv4`: per token, per KV head, asymmetric uint4,
fp16 scale and zero), *after* RoPE — exactly where QServe's fused RoPE/KV-cache kernel quantizes.
Queries are not quantized. `disable_kv4(model)` restores the model's own attention bit for bit.

How: transformers (4.53+, 5.x) looks the attention function up by name,
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``, and calls it with the post-RoPE
(and post-cache-update) key/value states of shape [batch, kv_heads, seq, head_dim], before GQA heads
are repeated. qtool registers one wrapper per base implementation, named ``qtool_kv4_<base>``
(``qtool_kv4_sdpa``, ``qtool_kv4_eager``, ...), that fake-quantizes key and value and calls the base
function; the same name is registered in ``ALL_MASK_ATTENTION_FUNCTIONS`` with the base's mask
builder so masks are built exactly as for the base. Enabling sets ``config._attn_implementation``
to the wrapper's name; disabling sets it back. Only ``AttentionInterface.register``,
``AttentionMaskInterface.register``, ``ALL_ATTENTION_FUNCTIONS`` and the config attribute are used —
all present in transformers 5.17 and 5.23. ("eager" is not in the registry: the wrapper then calls the
model module's own ``eager_attention_forward``.)

With a KV cache, the cache holds un-quantized states and the wrapper quantizes all of them at every
step; because the quantization is per token, this equals quantizing each token once when it is
written (QServe's behaviour).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from torch import nn

from qtool.nn.w4a8 import fake_quant_kv

PREFIX = "qtool_kv4_"
_ATTR = "_qtool_kv"  # per attention module: {"bits": 4, "keys": True, "values": True}
_MODEL_ATTR = "_qtool_kv4_base"


def _bits_from_spec(spec: Any) -> int:
    if spec is None:
        return 4
    if isinstance(spec, int):
        bits = spec
    else:
        quant = getattr(spec, "quant", spec)  # a Recipe or its QuantCfg
        bits = getattr(quant, "kv_bits", None)
        if bits is None:
            raise ValueError(f"cannot read kv_bits from {type(spec).__name__}")
    if bits not in (4, 8):
        raise ValueError(f"KV cache fake quantization supports kv_bits 4 or 8, got {bits}")
    return bits


def _base_function(module: nn.Module, base: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__}: no eager_attention_forward in its modeling module")
        return fn
    return ALL_ATTENTION_FUNCTIONS[base]


def _make_wrapper(base: str) -> Callable:
    def qtool_kv4_attention(module, query, key, value, attention_mask, **kwargs):
        cfg = getattr(module, _ATTR, None) or {"bits": 4, "keys": True, "values": True}
        if cfg["keys"]:
            key = fake_quant_kv(key, cfg["bits"])
        if cfg["values"]:
            value = fake_quant_kv(value, cfg["bits"])
        return _base_function(module, base)(module, query, key, value, attention_mask, **kwargs)

    qtool_kv4_attention.__name__ = f"{PREFIX}{base}"
    return qtool_kv4_attention


def register_kv4_attention(base: str) -> str:
    """Register the KV-quantizing wrapper of attention implementation `base`; returns its name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"attention implementation {base!r} is not registered in transformers")
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_wrapper(base))
    masks = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    if base in masks and name not in masks:
        AttentionMaskInterface.register(name, masks[base])
    return name


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    mods = [
        m
        for m in model.modules()
        if hasattr(m, "k_proj") and hasattr(m, "v_proj") and hasattr(m, "layer_idx")
    ]
    if not mods:
        raise ValueError(f"{type(model).__name__}: no attention modules (with k_proj, v_proj, layer_idx) found")
    return mods


def enable_kv4(model: nn.Module, spec: Any = None, *, keys: bool = True, values: bool = True) -> str:
    """Fake-quantize post-RoPE keys/values of every attention layer (QServe KV4); returns the impl name.

    `spec`: None (4 bits), an int, or an object with `kv_bits` (a `QuantCfg`, or a `Recipe` via
    `.quant`); 4 and 8 bits are supported. Calling it again updates the settings.
    """
    bits = _bits_from_spec(spec)
    config = model.config
    current = config._attn_implementation or "sdpa"
    base = current[len(PREFIX):] if current.startswith(PREFIX) else current
    name = register_kv4_attention(base)
    for m in _attention_modules(model):
        setattr(m, _ATTR, {"bits": bits, "keys": keys, "values": values})
    if not current.startswith(PREFIX):
        setattr(model, _MODEL_ATTR, current)
    config._attn_implementation = name
    return name


def disable_kv4(model: nn.Module) -> None:
    """Undo `enable_kv4`: restore the original attention implementation and drop the module flags."""
    config = model.config
    current = config._attn_implementation or ""
    if not current.startswith(PREFIX):
        return
    base = getattr(model, _MODEL_ATTR, None) or current[len(PREFIX):]
    config._attn_implementation = base
    for m in model.modules():
        if hasattr(m, _ATTR):
            delattr(m, _ATTR)
    if hasattr(model, _MODEL_ATTR):
        delattr(model, _MODEL_ATTR)


def kv4_enabled(model: nn.Module) -> bool:
    return (model.config._attn_implementation or "").startswith(PREFIX)
