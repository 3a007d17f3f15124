"""`w4a8kv4`: QServe's W4A8 checkpoint tensors (`algorithms.md` §4c), per-group and per-channel.

Tensors per linear (names are QServe's, see `QSERVE_TENSOR_NAMES`):

| name         | dtype | shape  | holds                                                      |
|--------------|-------|--------|------------------------------------------------------------|
| `qweight`    | int8  | [N, K/2] | uint4 codes in the compute-aware byte order below          |
| `s1_scales`  | fp16  | [N]    | per-channel scale s1 (natural order)                       |
| `s1_szeros`  | fp16  | [N]    | per-channel only: post-scale zero sz, W = q4*s1 - sz       |
| `s2_scales`  | int8  | [G, N] | per-group only: integer group scale s2, columns permuted   |
| `s2_zeros`   | int8  | [G, N] | per-group only: -zs (W8 = q4*s2 + s2_zeros), permuted      |

`qweight` byte order (QServe `from_linear` and deepcompressor agree): tiles of 32 output x 32 input
channels in (n_tile, k_tile) row-major order, 512 bytes each; inside a tile, lane L = 4*nl + kl
(nl 0..7, kl 0..3) owns 16 consecutive bytes and byte b = 8*kps + 4*nps + rk (kps, nps 0..1, rk 0..3)
of that lane holds q4[n, k] in its low nibble and q4[n + 16, k] in its high nibble, with
n = 32*n_tile + 8*nps + nl and k = 32*k_tile + 16*kps + 4*kl + rk. The flat byte stream is viewed as
[N, K/2] (the shape is only a view).

`s2_scales` / `s2_zeros` column order — the order QServe's per-group kernel reads (verified on GPU;
deepcompressor HEAD writes a different, wrong one, `algorithms.md` §6 pitfall 11): within each
block of 32 columns, position p = 4*(n % 8) + (n % 32) // 8 holds column n (0, 8, 16, 24, 1, 9, ...).

Both permutations are pure tile geometry: a `reshape` into the tile axes, one `permute`, a
`reshape` back — no index tensor, so nothing has to be built or cached per shape and nothing is
tied to a device; `unpack` applies the inverse permutation the same way, exactly.

Shapes and groups: the packer needs N % 32 == 0 and K % 32 == 0 (K after group padding: with
`quant.pad`, K is padded up to a multiple of the group by replicating the last column, and the
runtime pads activations with zeros). QServe's kernels only take group size 128 (per-group) or -1
(per-channel). Group size 64 is accepted for qtool's own reference runtime — SmolLM2's K = 576 is a
multiple of 64 but not of 128 — and recorded in the per-linear meta as `qserve_compatible: false`
with a note (`notes()` reports it at plan time as a warning, not a problem). Other group sizes are
refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtool.errors import CheckpointError, LayoutError
from qtool.layouts.base import register_layout
from qtool.quant.qweight import QuantizedWeight, QuantSpec, check_spec, padded_size

TILE = 32
QSERVE_GROUP_SIZES = (-1, 128)
REFERENCE_ONLY_GROUP_SIZES = (64,)

# qtool tensor name -> QServe checkpoint tensor name (identical by design).
QSERVE_TENSOR_NAMES = {
    "qweight": "qweight",
    "s1_scales": "s1_scales",
    "s1_szeros": "s1_szeros",
    "s2_scales": "s2_scales",
    "s2_zeros": "s2_zeros",
}


def to_qserve_checkpoint_names(tensors: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Packed tensors of one linear keyed as QServe's `quant_model.pt` names them (`<prefix>.qweight`, ...)."""
    out = {}
    for name, t in tensors.items():
        if name not in QSERVE_TENSOR_NAMES:
            raise LayoutError(f"{name!r} is not a w4a8kv4 tensor", f"known: {sorted(QSERVE_TENSOR_NAMES)}")
        key = QSERVE_TENSOR_NAMES[name]
        out[f"{prefix}.{key}" if prefix else key] = t
    return out


# ----------------------------------------------------------------------------------------------
# Permutations (tile geometry + one permute each; the inverse permute for unpacking)
# ----------------------------------------------------------------------------------------------

# source axes of q4 [N, K] reshaped: (n_tile, half, nps, nl, k_tile, kps, kl, rk)
# packed axes: (n_tile, k_tile, nl, kl, kps, nps, rk, half)  [half 0 -> low nibble, 1 -> high]
_QW_PERM = (0, 4, 3, 6, 5, 2, 7, 1)
_QW_INV = tuple(_QW_PERM.index(i) for i in range(8))


def pack_qweight(codes: Tensor) -> Tensor:
    """uint4 codes [N, K] (uint8, values 0..15) -> QServe `qweight` int8 [N, K/2]."""
    n, k = codes.shape
    if n % TILE or k % TILE:
        raise LayoutError(f"qweight packing needs N and K multiples of 32, got [{n}, {k}]")
    c = codes.to(torch.uint8).reshape(n // TILE, 2, 2, 8, k // TILE, 2, 4, 4).permute(_QW_PERM)
    b = c[..., 0] | (c[..., 1] << 4)
    return b.contiguous().reshape(n, k // 2).view(torch.int8)


def unpack_qweight(qweight: Tensor) -> Tensor:
    """QServe `qweight` int8 [N, K/2] -> uint4 codes uint8 [N, K]; exact inverse of `pack_qweight`."""
    n, kh = qweight.shape
    k = 2 * kh
    if n % TILE or k % TILE:
        raise CheckpointError(f"qweight of shape [{n}, {kh}] is not made of 32x32 tiles")
    b = qweight.contiguous().view(torch.uint8).reshape(n // TILE, k // TILE, 8, 4, 2, 2, 4)
    c = torch.stack([b & 0x0F, b >> 4], dim=-1).permute(_QW_INV)
    return c.contiguous().reshape(n, k)


def pack_s2(t: Tensor) -> Tensor:
    """Per-group tensor [N, G] -> [G, N] with columns in the kernel's order (p = 4*(n%8) + (n%32)//8)."""
    n, g = t.shape
    if n % TILE:
        raise LayoutError(f"s2 packing needs N a multiple of 32, got {n}")
    return t.t().reshape(g, n // TILE, 4, 8).transpose(-1, -2).contiguous().reshape(g, n)


def unpack_s2(t: Tensor) -> Tensor:
    """[G, N] in the kernel's column order -> natural [N, G]; exact inverse of `pack_s2`."""
    g, n = t.shape
    if n % TILE:
        raise CheckpointError(f"s2 tensor of shape [{g}, {n}]: N is not a multiple of 32")
    return t.reshape(g, n // TILE, 8, 4).transpose(-1, -2).reshape(g, n).t().contiguous()


def _fp16_exact(t: Tensor, what: str) -> Tensor:
    h = t.to(torch.float16)
    if not torch.equal(h.to(torch.float32), t.to(torch.float32)):
        raise LayoutError(
            f"w4a8kv4 stores {what} as fp16 but the given values are not fp16-representable",
            "quantize with qtool.quant.progressive (it rounds s1 / sz to fp16 before computing codes)",
        )
    return h


def _verify_kernel_bounds(codes: Tensor, s2: Tensor, zs: Tensor, group_size: int) -> None:
    """The per-group kernel's integer constraints (wrap-around byte arithmetic, no saturation)."""
    n, kp = codes.shape
    q = codes.to(torch.int32).reshape(n, kp // group_size, group_size)
    s = s2.to(torch.int32).unsqueeze(2)
    z = zs.to(torch.int32).unsqueeze(2)
    if bool((s < 1).any()):
        raise LayoutError("w4a8kv4: s2 must be >= 1")
    if int((q * s).max()) > 255:
        raise LayoutError("w4a8kv4: q4*s2 exceeds 255 (the kernel's 32-bit multiply would carry)")
    if int(z.max()) > 127 or int(z.min()) < -127:
        raise LayoutError("w4a8kv4: zero zs outside [-127, 127] (s2_zeros = -zs must be int8)")
    r = q * s - z
    if int(r.max()) > 127 or int(r.min()) < -128:
        raise LayoutError("w4a8kv4: reconstructed int8 weight q4*s2 - zs leaves [-128, 127]")


def _mode(qw: QuantizedWeight) -> str:
    if qw.bits != 4:
        raise LayoutError(f"w4a8kv4 holds 4-bit codes, got bits={qw.bits}")
    if qw.scale2 is not None:
        if qw.zero is None or qw.group_size == -1:
            raise LayoutError("w4a8kv4 per-group weights need integer zeros and a group size")
        return "per_group"
    if qw.zero is not None and qw.zero_mode == "post" and qw.group_size == -1:
        return "per_channel"
    raise LayoutError(
        "w4a8kv4 holds QoQ weights only: progressive (scale2 set) or per-channel post-scale (g = -1)",
        "quantize with quant.scheme=progressive",
    )


def _notes(group_size: int) -> list[str]:
    notes = []
    if group_size in REFERENCE_ONLY_GROUP_SIZES:
        notes.append(
            f"group_size {group_size}: QServe's W4A8 kernels take only 128 (per-group) or -1 "
            "(per-channel); this checkpoint runs on qtool's reference runtime, not on QServe"
        )
    return notes


@register_layout
class W4A8KV4Layout:
    name = "w4a8kv4"
    version = 1

    def check(self, shape: tuple[int, int], spec: QuantSpec) -> list[str]:
        n, k = shape
        problems = []
        if spec.bits != 4:
            problems.append(f"w4a8kv4 needs 4-bit weights, got bits={spec.bits}")
        if spec.symmetric:
            problems.append("w4a8kv4 needs asymmetric weights (uint4 with zero points)")
        g = spec.group_size
        if g not in QSERVE_GROUP_SIZES + REFERENCE_ONLY_GROUP_SIZES:
            problems.append(
                f"w4a8kv4 supports group_size 128 or -1 (QServe), or 64 (qtool reference runtime only); got {g}"
            )
            return problems
        spec_problems = check_spec(shape, spec)
        problems += spec_problems
        if n % TILE:
            problems.append(f"out_features {n} is not a multiple of 32 (QServe tiles of 32 output channels)")
        kp = padded_size(k, g) if (g != -1 and spec.pad) else k
        if not spec_problems and kp % TILE:
            problems.append(f"in_features {k} is not a multiple of 32 (QServe tiles of 32 input channels)")
        return problems

    def notes(self, shape: tuple[int, int], spec: QuantSpec) -> list[str]:
        """Warning-level facts for the plan (not problems): e.g. group 64 is not loadable by QServe."""
        return _notes(spec.group_size)

    def tensors(self, shape: tuple[int, int], spec: QuantSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Declared output of `pack` for a [N, K] weight: name -> (shape, dtype)."""
        n, k = shape
        g = spec.group_size
        kp = padded_size(k, g) if (g != -1 and spec.pad) else k
        out = {"qweight": ((n, kp // 2), torch.int8), "s1_scales": ((n,), torch.float16)}
        if g == -1:
            out["s1_szeros"] = ((n,), torch.float16)
        else:
            out["s2_scales"] = ((kp // g, n), torch.int8)
            out["s2_zeros"] = ((kp // g, n), torch.int8)
        return out

    def pack(self, qw: QuantizedWeight) -> dict[str, Tensor]:
        mode = _mode(qw)
        codes = qw.codes
        n, kp = codes.shape
        if n % TILE or kp % TILE:
            raise LayoutError(f"w4a8kv4 needs N and (padded) K multiples of 32, got [{n}, {kp}]")
        c = codes.to(torch.int16)
        if int(c.min()) < 0 or int(c.max()) > 15:
            raise LayoutError("w4a8kv4 codes must lie in [0, 15]")
        out = {
            "qweight": pack_qweight(codes),
            "s1_scales": _fp16_exact(qw.scale.reshape(n), "s1").contiguous(),
        }
        if mode == "per_channel":
            out["s1_szeros"] = _fp16_exact(qw.zero.reshape(n), "the post-scale zero sz").contiguous()
            return out
        s2, zs = qw.scale2, qw.zero
        if s2.is_floating_point() or zs.is_floating_point():
            raise LayoutError("w4a8kv4 per-group s2 and zeros must be integer tensors")
        _verify_kernel_bounds(codes, s2, zs, kp // s2.shape[1])
        out["s2_scales"] = pack_s2(s2.to(torch.int8))
        out["s2_zeros"] = pack_s2((-zs.to(torch.int16)).to(torch.int8))
        return out

    def pack_meta(self, qw: QuantizedWeight) -> dict:
        mode = _mode(qw)
        n, kp = qw.codes.shape
        return {
            "bits": 4,
            "group_size": qw.group_size,
            "in_features": qw.in_features,
            "out_features": n,
            "padded_in_features": kp,
            "mode": mode,
            "zero_mode": "post",
            "qserve_compatible": qw.group_size in QSERVE_GROUP_SIZES,
            "notes": _notes(qw.group_size),
        }

    def unpack(self, tensors: dict[str, Tensor], meta: dict) -> QuantizedWeight:
        g = meta["group_size"]
        per_group = g != -1
        expected = {"qweight", "s1_scales"} | ({"s2_scales", "s2_zeros"} if per_group else {"s1_szeros"})
        got = set(tensors) - {"bias"}
        if got != expected:
            raise CheckpointError(
                f"w4a8kv4 tensors do not match group_size {g}: missing {sorted(expected - got)}, "
                f"unexpected {sorted(got - expected)}"
            )
        codes = unpack_qweight(tensors["qweight"])
        n, kp = codes.shape
        if n != meta.get("out_features", n) or kp != meta.get("padded_in_features", kp):
            raise CheckpointError(
                f"w4a8kv4 qweight unpacks to [{n}, {kp}] but the meta says "
                f"[{meta.get('out_features')}, {meta.get('padded_in_features')}]"
            )
        scale = tensors["s1_scales"].to(torch.float32).reshape(n, 1)
        if not per_group:
            return QuantizedWeight(
                codes=codes,
                scale=scale,
                zero=tensors["s1_szeros"].to(torch.float32).reshape(n, 1),
                bits=4,
                group_size=-1,
                in_features=meta["in_features"],
                zero_mode="post",
            )
        s2 = unpack_s2(tensors["s2_scales"])
        zs = -unpack_s2(tensors["s2_zeros"]).to(torch.int16)
        if s2.shape != (n, kp // g):
            raise CheckpointError(f"s2_scales holds {s2.shape[1]} groups, expected {kp // g} (K={kp}, g={g})")
        if int(zs.max()) > 127:
            raise CheckpointError("s2_zeros holds -128, which no qtool quantizer writes")
        return QuantizedWeight(
            codes=codes,
            scale=scale,
            zero=zs.to(torch.int8),
            bits=4,
            group_size=g,
            in_features=meta["in_features"],
            zero_mode="post",
            scale2=s2.to(torch.int8),
        )
