"""Export to QServe's checkpoint conventions (`qtool convert CKPT --to qserve`).

QServe reads per-linear tensors with its own names (W4A8: `qweight`, `s1_scales`, `s1_szeros` or
`s2_scales`/`s2_zeros`; W8A8: `weight`, `dequant_scale`) and **ignores every norm weight**
(algorithms.md §4c, §6 pitfall 13), so an export is refused unless the norms were folded into the
linears before quantization (rotation does this). Precision and group size are QServe command-line
flags, not config keys: they are written to `qserve_config.json` beside the weights.
"""

from __future__ import annotations

import json

import torch

from qtool.errors import LayoutError


def export(ckpt, qcfg: dict):
    layout = qcfg["layout"]
    if layout not in ("w4a8kv4", "w8a8"):
        raise LayoutError(
            f"a {layout} checkpoint cannot be exported to QServe",
            "QServe serves w4a8kv4 and w8a8 checkpoints; quantize with one of those layouts",
        )
    tensors = ckpt.load_tensors()
    not_ones = [k for k, v in tensors.items() if "norm" in k and k.endswith(".weight")
                and not torch.all(v == 1)]
    if not_ones:
        raise LayoutError(
            f"QServe ignores norm weights, but {len(not_ones)} are not folded (e.g. {not_ones[0]})",
            "quantize with passes.rotation (which folds every RMSNorm into the following linears)",
        )
    out = {}
    modules = qcfg["modules"]
    for fqn, meta in modules.items():
        own = {k[len(fqn) + 1:]: tensors.pop(k) for k in list(tensors)
               if k.startswith(fqn + ".") and "." not in k[len(fqn) + 1:]}
        bias = own.pop("bias", None)
        if layout == "w8a8":
            from qtool.layouts.w8a8 import to_qserve_w8a8

            own = to_qserve_w8a8(own, meta)
        else:
            from qtool.layouts.w4a8kv4 import to_qserve_checkpoint_names

            own = to_qserve_checkpoint_names(own)
        out.update({f"{fqn}.{k}": v for k, v in own.items()})
        if bias is not None:
            out[f"{fqn}.bias"] = bias.half()
    for k, v in tensors.items():  # embeddings, lm_head, (all-ones) norms
        out[k] = v.half() if v.is_floating_point() else v
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    config["torch_dtype"] = "float16"
    groups = {m.get("group_size", -1) for m in modules.values()}
    precision = "w8a8" if layout == "w8a8" else f"w4a8kv{qcfg.get('kv_bits', 4)}"
    flags = {"precision": precision, "group_size": groups.pop() if len(groups) == 1 else sorted(groups)}
    return out, config, f"qserve-{precision}@1", {"qserve_config.json": json.dumps(flags, indent=2)}
