"""`qtool convert`: move checkpoints between layouts and export formats other engines load.

Conversions go through the canonical QuantizedWeight (unpack with the source layout, pack with
the target), so they are lossless whenever the target can hold the source's codes and scales.
Streaming per tensor group; never builds a model.
"""

from __future__ import annotations

import json
from pathlib import Path

from qtool.errors import ConfigError, LayoutError

EXPORTS = {
    "qserve": "QServe tensor names (W4A8: qweight, s1_scales, s1_szeros / s2_scales, s2_zeros; W8A8: weight, dequant_scale)",
}


def list_targets() -> list[dict]:
    from qtool.layouts.base import available_layouts

    out = []
    for name, lay in sorted(available_layouts().items()):
        out.append({"name": name, "kind": "layout", "version": lay.version,
                    "description": (lay.__doc__ or type(lay).__doc__ or "").strip().splitlines()[0] if (lay.__doc__ or "").strip() else f"layout {name}@{lay.version}"})
    for name, desc in EXPORTS.items():
        out.append({"name": name, "kind": "export", "version": 1, "description": desc})
    return out


def convert(src: str | Path, to: str, out: str | Path, overwrite: bool = False, fp_dtype: str | None = None) -> dict:
    """Convert checkpoint `src` to layout/export `to` in `out`; `fp_dtype` recasts the tensors kept
    in floating point (embeddings, norms, lm_head), e.g. "float16" for a compact checkpoint."""
    from qtool.io.checkpoint import open_checkpoint, write_checkpoint
    from qtool.layouts.base import available_layouts, get_layout

    ckpt = open_checkpoint(src)
    qpath = ckpt.path / "qtool_quant.json"
    qcfg = json.loads(qpath.read_text())
    names = {t["name"] for t in list_targets()}
    if to not in names:
        raise ConfigError(f"unknown conversion target {to!r}", f"choose one of {', '.join(sorted(names))}")
    src_layout = get_layout(qcfg["layout"])
    if to == "qserve":
        from qtool.layouts import qserve_export

        tensors, config, layout_tag, extra_files = qserve_export.export(ckpt, qcfg)
        new_q = None
    else:
        dst = get_layout(to)
        tensors = ckpt.load_tensors()
        new_meta = {}
        for fqn, meta in qcfg["modules"].items():
            own = {k[len(fqn) + 1:]: tensors.pop(k) for k in list(tensors)
                   if k.startswith(fqn + ".") and "." not in k[len(fqn) + 1:] and k != f"{fqn}.bias"}
            qw = src_layout.unpack(own, meta)
            shape = (meta.get("out_features", qw.codes.shape[0]), qw.in_features)
            from qtool.quant.qweight import QuantSpec

            spec = QuantSpec(bits=qw.bits, group_size=qw.group_size, symmetric=qw.symmetric,
                             pad=qw.padded_in_features != qw.in_features)
            probs = dst.check(shape, spec)
            if probs:
                raise LayoutError(f"cannot convert {fqn} to {to}: {'; '.join(probs)}")
            packed = dst.pack(qw)
            new_meta[fqn] = dst.pack_meta(qw)
            tensors.update({f"{fqn}.{k}": v for k, v in packed.items()})
        new_q = dict(qcfg, layout=dst.name, layout_version=dst.version, modules=new_meta)
        config = dict(ckpt.config)
        export = getattr(dst, "hf_quantization_config", None)
        config["quantization_config"] = export(None, new_meta, qcfg=new_q) if export else new_q
        layout_tag = f"{dst.name}@{dst.version}"
        extra_files = {}
    if fp_dtype is not None:
        import torch

        if fp_dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"--fp-dtype {fp_dtype!r} must be float32, float16 or bfloat16")
        quantized = tuple(f"{fqn}." for fqn in qcfg["modules"])
        dt = getattr(torch, fp_dtype)
        tensors = {k: (v.to(dt) if v.is_floating_point() and not k.startswith(quantized) else v)
                   for k, v in tensors.items()}
        config = dict(config, torch_dtype=fp_dtype)
    extra = dict(extra_files)
    if new_q is not None:
        extra["qtool_quant.json"] = json.dumps(new_q, indent=2, sort_keys=True)
    copy = [p for p in ckpt.path.iterdir() if p.is_file() and (p.name.startswith("tokenizer") or p.name in (
        "special_tokens_map.json", "chat_template.jinja", "generation_config.json", "recipe.resolved.yaml"))]
    res = write_checkpoint(out, tensors, config, layout=layout_tag, overwrite=overwrite, extra_files=extra,
                           copy_files=copy, manifest_extra={"converted_from": str(ckpt.path),
                                                            "source_layout": ckpt.manifest["layout"]})
    return {"output_dir": str(res.path), "format": layout_tag, "files": res.files}
