"""`w8a8` (version 1): int8 per-channel weights + int8 activations, compressed-tensors naming.

The tensors of one linear are those of compressed-tensors' `int-quantized` format
(`algorithms.md` §4d), so a checkpoint of this layout loads in vLLM (`CompressedTensorsW8A8Int8`)
and in transformers:

| tensor         | dtype / shape           | meaning                                                  |
|----------------|-------------------------|----------------------------------------------------------|
| `weight`       | int8 `[N, K]`           | codes q, W ≈ q · s_w (not transposed)                    |
| `weight_scale` | scale dtype `[N, 1]`    | per-output-channel s_w                                   |
| `input_scale`  | fp32 `[1]`              | only for static per-tensor activations: x ≈ q_x · s_x    |

No `weight_zero_point` (symmetric). Activations are per-token dynamic unless `input_scale` is
present. The scale dtype is fp16 by default; a bf16 model can use `W8A8Layout(torch.bfloat16)`.
Scales are stored rounded to that dtype, and `unpack` returns them as fp32 tensors holding exactly
the rounded values: `canonical(qw)` gives the same `QuantizedWeight` without a pack, so references
and runtime modules compute with the numbers that are on disk.

Static activation scale. It travels in one place only: `qw.meta["input_scale"]` (a float or a
one-element tensor, the scale s_x of `qtool.quant.activations.quantize_per_tensor`, e.g.
`AbsMaxObserver.scale()`). `pack` writes it as `input_scale`, `pack_meta` records
`"static_input": true`, and `unpack` puts it back into `meta["input_scale"]` as an fp32 `[1]`
tensor. It is stored in fp32, not rounded: it is one number per linear, vLLM and
compressed-tensors read any float dtype, and rounding it would move every activation code (a
relative change of 5e-4 in s_x flips the rounding of many int8 activations, so a fake-quant model
evaluated with the unrounded scale would no longer match the checkpoint).

`compressed_tensors_config()` builds the checkpoint's `quantization_config` (§4e), and
`W8A8Layout.hf_quantization_config()` is the hook the pipeline calls to write it into config.json;
`to_qserve_w8a8()` renames one linear's tensors to QServe's W8A8 names (§4c, last paragraph).
"""

from __future__ import annotations

import fnmatch
from typing import Optional

import torch
from torch import Tensor

from qtool.errors import LayoutError
from qtool.layouts.base import register_layout
from qtool.quant.qweight import QuantizedWeight, QuantSpec, check_spec

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_NAMED_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}

# compressed-tensors version written when the library is not installed
_FALLBACK_CT_VERSION = "0.12.0"


def _round_to(t: Tensor, dtype: torch.dtype) -> Tensor:
    """The fp32 tensor holding exactly the values of `t` rounded to `dtype`."""
    return t.detach().to(dtype).to(torch.float32)


@register_layout
class W8A8Layout:
    name = "w8a8"
    version = 1

    def __init__(self, scale_dtype: torch.dtype = torch.float16):
        if scale_dtype not in _DTYPE_NAMES:
            raise LayoutError(
                f"w8a8 scale dtype {scale_dtype} is not supported", "use float16, bfloat16 or float32"
            )
        self.scale_dtype = scale_dtype

    # ---- plan time -------------------------------------------------------------------------------

    def check(self, shape: tuple[int, int], spec: QuantSpec) -> list[str]:
        problems = check_spec(shape, spec)
        if spec.bits != 8:
            problems.append(f"w8a8 holds 8-bit weights, got bits={spec.bits} (set quant.bits=8)")
        if not spec.symmetric:
            problems.append("w8a8 weights are symmetric (set quant.symmetric=true)")
        if spec.group_size != -1:
            problems.append(
                f"w8a8 weights are per output channel, got group_size={spec.group_size} "
                "(set quant.group_size=-1)"
            )
        return problems

    def tensors(
        self, shape: tuple[int, int], spec: QuantSpec, static: bool = False
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The tensors `pack` emits for a [N, K] weight (static: with `input_scale`)."""
        n, k = shape
        out = {"weight": ((n, k), torch.int8), "weight_scale": ((n, 1), self.scale_dtype)}
        if static:
            out["input_scale"] = ((1,), torch.float32)
        return out

    # ---- pack / unpack ---------------------------------------------------------------------------

    def _validate(self, qw: QuantizedWeight) -> None:
        n = qw.codes.shape[0]
        problems = []
        if qw.bits != 8:
            problems.append(f"bits={qw.bits}, need 8")
        if qw.zero is not None or qw.scale2 is not None:
            problems.append("weight is not plain symmetric (has zeros or a second-level scale)")
        if qw.group_size != -1:
            problems.append(f"group_size={qw.group_size}, need -1 (per-channel)")
        if qw.codes.dtype != torch.int8:
            problems.append(f"codes are {qw.codes.dtype}, need int8")
        if qw.codes.shape[1] != qw.in_features:
            problems.append(f"codes are padded ({qw.codes.shape[1]} > K={qw.in_features})")
        if qw.scale.numel() != n:
            problems.append(f"scale has shape {tuple(qw.scale.shape)}, need [{n}, 1]")
        if problems:
            raise LayoutError("cannot pack into w8a8: " + "; ".join(problems))

    def _scale_tensor(self, s: Tensor, shape: tuple[int, ...], what: str, dtype: torch.dtype) -> Tensor:
        out = s.detach().to(dtype).reshape(shape).contiguous()
        f = out.to(torch.float32)
        if not bool(torch.isfinite(f).all()) or bool((f <= 0).any()):
            raise LayoutError(
                f"w8a8 {what} is zero, negative or not finite in {_DTYPE_NAMES[dtype]}",
                "use a wider scale dtype (W8A8Layout(torch.float32 or torch.bfloat16))",
            )
        return out

    def pack(self, qw: QuantizedWeight) -> dict[str, Tensor]:
        self._validate(qw)
        n, k = qw.codes.shape
        out = {
            "weight": qw.codes.contiguous(),
            "weight_scale": self._scale_tensor(qw.scale, (n, 1), "weight_scale", self.scale_dtype),
        }
        s_in = qw.meta.get("input_scale")
        if s_in is not None:
            s_in = torch.as_tensor(s_in, dtype=torch.float32)
            if s_in.numel() != 1:
                raise LayoutError(f"input_scale must have one element, got shape {tuple(s_in.shape)}")
            out["input_scale"] = self._scale_tensor(s_in, (1,), "input_scale", torch.float32)
        return out

    def pack_meta(self, qw: QuantizedWeight) -> dict:
        return {
            "bits": 8,
            "group_size": -1,
            "in_features": qw.in_features,
            "out_features": qw.codes.shape[0],
            "scale_dtype": _DTYPE_NAMES[self.scale_dtype],
            "static_input": qw.meta.get("input_scale") is not None,
        }

    def unpack(self, tensors: dict[str, Tensor], meta: Optional[dict] = None) -> QuantizedWeight:
        unknown = set(tensors) - {"weight", "weight_scale", "input_scale"}
        missing = {"weight", "weight_scale"} - set(tensors)
        if unknown or missing:
            raise LayoutError(
                f"w8a8 tensors: missing {sorted(missing)}, unexpected {sorted(unknown)}",
                "a w8a8 linear has weight, weight_scale and optionally input_scale",
            )
        w = tensors["weight"]
        if w.dtype != torch.int8 or w.dim() != 2:
            raise LayoutError(f"w8a8 weight must be int8 [N, K], got {w.dtype} {tuple(w.shape)}")
        n, k = w.shape
        if tensors["weight_scale"].numel() != n:
            raise LayoutError(
                f"w8a8 weight_scale has shape {tuple(tensors['weight_scale'].shape)}, need [{n}, 1]"
            )
        if meta:
            if (meta.get("out_features", n), meta.get("in_features", k)) != (n, k):
                raise LayoutError(
                    f"w8a8 weight is {n}x{k} but the checkpoint meta says "
                    f"{meta.get('out_features')}x{meta.get('in_features')}"
                )
            if "static_input" in meta and bool(meta["static_input"]) != ("input_scale" in tensors):
                raise LayoutError(
                    f"w8a8 meta says static_input={meta['static_input']} but input_scale is "
                    + ("present" if "input_scale" in tensors else "missing")
                )
        extra = {}
        if "input_scale" in tensors:
            extra["input_scale"] = tensors["input_scale"].detach().to(torch.float32).reshape(1)
        return QuantizedWeight(
            codes=w,
            scale=tensors["weight_scale"].detach().to(torch.float32).reshape(n, 1),
            zero=None,
            bits=8,
            group_size=-1,
            in_features=k,
            meta=extra,
        )

    def hf_quantization_config(
        self, recipe=None, metas: Optional[dict] = None, qcfg: Optional[dict] = None
    ) -> dict:
        """config.json `quantization_config` for a qtool w8a8 checkpoint (the pipeline's and
        `qtool convert`'s export hook): compressed-tensors, so vLLM and transformers load it.

        Static or dynamic activations: what the packed linears are (`metas[fqn]["static_input"]`,
        all alike, else a LayoutError), falling back to `recipe.quant.a_static`, then
        `qcfg["a_static"]`. The ignore list is "lm_head" plus the recipe's `quant.ignore` (else
        `qcfg["modules_to_not_convert"]`), glob patterns written as compressed-tensors "re:" regexes.
        """
        qcfg = qcfg or {}
        flags = {bool(m["static_input"]) for m in (metas or {}).values() if "static_input" in m}
        if len(flags) > 1:
            raise LayoutError(
                "some w8a8 linears have a static input_scale and others do not",
                "compressed-tensors describes one activation scheme for all of them: calibrate all or none",
            )
        if flags:
            static = flags.pop()
        elif recipe is not None:
            static = bool(recipe.quant.a_static)
        else:
            static = bool(qcfg.get("a_static", False))
        if recipe is not None:
            patterns = list(recipe.quant.ignore)
        else:
            patterns = list(qcfg.get("modules_to_not_convert") or [])
        return compressed_tensors_config(static=static, ignore=ignore_list(patterns))

    def canonical(self, qw: QuantizedWeight) -> QuantizedWeight:
        """`qw` with its weight scales rounded to the scale dtype (and input_scale as fp32 [1]):
        what `unpack(pack(qw))` returns."""
        self._validate(qw)
        meta = dict(qw.meta)
        if meta.get("input_scale") is not None:
            s_in = torch.as_tensor(meta["input_scale"], dtype=torch.float32)
            meta["input_scale"] = s_in.detach().reshape(1).clone()
        return QuantizedWeight(
            codes=qw.codes,
            scale=_round_to(qw.scale, self.scale_dtype).reshape(-1, 1),
            zero=None,
            bits=8,
            group_size=-1,
            in_features=qw.in_features,
            meta=meta,
        )


def compressed_tensors_version() -> str:
    """Version of the installed compressed-tensors (without importing it), else a fallback."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("compressed-tensors")
    except PackageNotFoundError:
        return _FALLBACK_CT_VERSION


def ignore_list(patterns: list[str]) -> list[str]:
    """compressed-tensors `ignore` entries for qtool's ignore globs: "lm_head" first, plain names as
    they are, globs (*, ?, [) as "re:" regexes (compressed-tensors and vLLM match those with
    `re.match`)."""
    out = ["lm_head"]
    for p in patterns:
        entry = "re:" + fnmatch.translate(p) if any(c in p for c in "*?[") else p
        if entry not in out:
            out.append(entry)
    return out


def compressed_tensors_config(static: bool = False, ignore: Optional[list[str]] = None) -> dict:
    """`quantization_config` of a w8a8 checkpoint for compressed-tensors / vLLM / transformers.

    Weights: int8 symmetric per-channel static. Input activations: int8 symmetric per-token
    dynamic, or (static=True) per-tensor static with an `input_scale` per linear. `ignore` lists
    the modules left unquantized (default ["lm_head"]).
    """
    weights = {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "group_size": None,
        "strategy": "channel",
        "dynamic": False,
    }
    if static:
        input_activations = {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "group_size": None,
            "strategy": "tensor",
            "dynamic": False,
        }
    else:
        input_activations = {
            "num_bits": 8,
            "type": "int",
            "symmetric": True,
            "group_size": None,
            "strategy": "token",
            "dynamic": True,
            "observer": None,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": input_activations,
                "output_activations": None,
            }
        },
        "ignore": list(ignore) if ignore is not None else ["lm_head"],
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": compressed_tensors_version(),
    }


def to_qserve_w8a8(tensors: dict[str, Tensor], meta: Optional[dict] = None) -> dict[str, Tensor]:
    """One w8a8 linear's tensors under QServe's W8A8 names.

    QServe: `weight` int8 [N, K] row-major with values in [-127, 127], `dequant_scale` fp16 [N];
    activations per-token dynamic. A static `input_scale` has no place there and is refused, and
    so is a code of -128 (QServe's `from_linear` asserts the symmetric range). A bf16 or fp32
    `weight_scale` is rounded to fp16.
    """
    qw = W8A8Layout().unpack(tensors, meta)
    if "input_scale" in qw.meta:
        raise LayoutError(
            "QServe W8A8 runs per-token dynamic activations; this linear has a static input_scale",
            "quantize with per-token activations for a QServe export",
        )
    if bool((qw.codes == -128).any()):
        raise LayoutError("QServe W8A8 weights must lie in [-127, 127]; found -128")
    scale = qw.scale.reshape(-1).to(torch.float16)
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise LayoutError("a weight_scale is zero or not finite in fp16; QServe needs fp16 scales")
    return {"weight": qw.codes.contiguous(), "dequant_scale": scale.contiguous()}
