"""Build an evaluable model from a qtool checkpoint: HF skeleton + runtime modules per layout."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from qtool.errors import CheckpointError
from qtool.io.checkpoint import Checkpoint

log = logging.getLogger("qtool.io")


def is_qtool_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def _skeleton(config: dict, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = cfg_dict.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **cfg_dict)
    cfg.use_cache = False
    try:
        from transformers.initialization import no_init_weights  # transformers ≥ 5
    except ImportError:  # pragma: no cover
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model


def load_quantized_model(ckpt: Checkpoint, backend, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Return (model, tokenizer) with every quantized linear replaced by its layout's runtime module."""
    from transformers import AutoTokenizer

    from qtool.nn import runtime_module_for

    qpath = ckpt.path / "qtool_quant.json"
    if not qpath.is_file():
        raise CheckpointError(f"{ckpt.path} has no qtool_quant.json")
    qcfg = json.loads(qpath.read_text())
    layout = qcfg["layout"]
    cls = runtime_module_for(layout)
    model = _skeleton(ckpt.config, dtype)
    modules: dict[str, dict] = qcfg["modules"]
    names = set(ckpt.tensor_names())
    tensors = ckpt.load_tensors()
    static_scales = {}
    for fqn, meta in modules.items():
        if f"{fqn}.input_scale" in tensors and layout == "unpacked":
            static_scales[fqn] = tensors[f"{fqn}.input_scale"]
        own = {k[len(fqn) + 1 :]: v for k, v in tensors.items() if k.startswith(fqn + ".") and "." not in k[len(fqn) + 1 :]}
        bias = own.pop("bias", None)
        if bias is not None:
            bias = bias.to(dtype)
        mod = cls.from_packed(own, meta, bias, backend)
        model.set_submodule(fqn, mod)
        for k in list(tensors):
            if k.startswith(fqn + "."):
                names.discard(k)
                del tensors[k]
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt.path}: tensors do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.eval().to(device)
    if qcfg.get("a_bits") == 8 and layout == "unpacked":
        from qtool.quant.fakequant import install_activation_fake_quant

        install_activation_fake_quant(model, list(modules), static_scales or None)
    if qcfg.get("kv_bits") == 4:
        from qtool.nn.kv4_attention import enable_kv4

        enable_kv4(model)
    tok = AutoTokenizer.from_pretrained(str(ckpt.path))
    return model, tok
