"""`unpacked`: qtool's own layout holding the canonical integer codes as they are.

Any bit width (2..8), any group size, symmetric or asymmetric; used for RTN at settings no packed
runtime layout holds (e.g. 3-bit) and as the reference every other layout can be converted from.
Tensors per linear: `codes` (uint8/int8 [N, Kp]), `scales` (fp32 [N, G]), `zeros` (optional [N, G]),
`scales2` (optional, QoQ progressive).
"""

from __future__ import annotations

from torch import Tensor

from qtool.layouts.base import register_layout
from qtool.quant.qweight import QuantizedWeight, QuantSpec, check_spec


@register_layout
class UnpackedLayout:
    name = "unpacked"
    version = 1

    def check(self, shape: tuple[int, int], spec: QuantSpec) -> list[str]:
        return check_spec(shape, spec)

    def pack(self, qw: QuantizedWeight) -> dict[str, Tensor]:
        out = {"codes": qw.codes.contiguous(), "scales": qw.scale.float().contiguous()}
        if qw.zero is not None:
            out["zeros"] = qw.zero.contiguous()
        if qw.scale2 is not None:
            out["scales2"] = qw.scale2.contiguous()
        if "input_scale" in qw.meta:  # static per-tensor activation scale (fp32 [1])
            out["input_scale"] = qw.meta["input_scale"].float().reshape(1).contiguous()
        return out

    def pack_meta(self, qw: QuantizedWeight) -> dict:
        return {
            "bits": qw.bits,
            "group_size": qw.group_size,
            "in_features": qw.in_features,
            "out_features": qw.codes.shape[0],
            "zero_mode": qw.zero_mode,
            "static_input": "input_scale" in qw.meta,
        }

    def unpack(self, tensors: dict[str, Tensor], meta: dict) -> QuantizedWeight:
        return QuantizedWeight(
            codes=tensors["codes"],
            scale=tensors["scales"],
            zero=tensors.get("zeros"),
            bits=meta["bits"],
            group_size=meta["group_size"],
            in_features=meta["in_features"],
            zero_mode=meta.get("zero_mode", "pre"),
            scale2=tensors.get("scales2"),
            meta={"input_scale": tensors["input_scale"]} if "input_scale" in tensors else {},
        )
