"""GPTQ: error-compensating weight quantization (Frantar et al. 2022; `algorithms.md` §3.1).

`gptq_quantize(weight [N, K], H [K, K], recipe)` with H = 2/n Σ xᵀx (fp32) of the linear's
calibration inputs returns the canonical `QuantizedWeight` of the recipe's scheme whose
`dequantize()` is exactly the GPTQ result. The standard algorithm (reference `gptq.py`):

1. dead inputs (H_jj = 0) get H_jj = 1 and W[:, j] = 0 (they never see a non-zero input);
2. damping λ = `quant.gptq.damp` · mean(diag H) on the diagonal; U = upper Cholesky factor of H⁻¹
   (retried with 10× the damping when H is not positive definite; after that, and for non-finite H,
   the weight falls back to the plain quantizer with a warning);
3. columns are quantized left to right in blocks of `quant.gptq.block_size`; each column's error
   e = (w − q(w)) / U_jj is spread over the remaining columns of the block (``W -= e·U_j,j:``), and
   a block's accumulated errors over all later columns when the block ends (lazy batch update).

Group parameters are computed **when a group is first reached**, from the *current* weights, i.e.
with the error feedback of every earlier column applied. That includes columns of the group that
lie beyond the current block: their pending update ``−Err·U[block, cols]`` is applied to the copy
used for the statistics (the reference implementation reads stale values there when
group_size < block_size is not aligned; here the statistics are always exact).

Quantizers (per column, with the parameters of its group), identical to the plain ones:

- RTN asymmetric / symmetric (`qtool.quant.qweight.quantize_rtn`); per-channel (group_size −1) is one
  group spanning the row, parameters taken at column 0.
- QoQ progressive (`quantize_progressive`): the per-channel INT8 scale s1 (protective range P) comes
  from the plain quantizer applied to the **full original weight** and stays fixed; each column
  becomes w8 = clamp(round(w / s1), −P, P) and, per group (parameters from the current weights'
  w8 when the group starts), q4 = clamp(round((w8 + zs) / s2), 0, 15); the GPTQ error is measured on
  the dequantized float value s1·(q4·s2 − zs). Clamping w8 to ±P keeps the W4A8 kernel's int8
  bounds valid even when error feedback pushes a weight past the original row maximum.
- QoQ per-channel (`quantize_qoq_per_channel`, group_size −1): s1 and sz from the current weights at
  column 0 (the plain quantizer's own code computes them).

K padding (`quant.pad`): padded input channels never see a non-zero activation, i.e. their rows and
columns of H are the identity and uncoupled from the real channels; GPTQ then leaves them alone and
only the real K columns are processed. As in `quantize_rtn`, group statistics use the real
columns only, and the padded codes repeat the last real column's code.

With H = I (no correlations) the error feedback is exactly zero and GPTQ returns the plain
quantizer's codes bit for bit (tested).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

from qtool.errors import LayoutError
from qtool.quant.qweight import QuantizedWeight, QuantSpec, check_spec, padded_size, quantize_rtn
from qtool.quant.weights import spec_from_recipe

log = logging.getLogger("qtool.quant.gptq")

_DAMP_RETRIES = 6


# ------------------------------------------------------------------------------- quantizers
class _RTN:
    """Asymmetric / symmetric RTN with per-group parameters (formulas of `quantize_rtn`)."""

    def __init__(self, spec: QuantSpec, n: int, n_groups: int, device):
        self.spec = spec
        self.sym = spec.symmetric
        self.qmax = 2 ** (spec.bits - 1) - 1 if self.sym else 2**spec.bits - 1
        self.scale = torch.zeros(n, n_groups, dtype=torch.float32, device=device)
        self.zero = None if self.sym else torch.zeros(n, n_groups, dtype=torch.float32, device=device)

    def start_group(self, gi: int, cur: Tensor) -> None:
        p = quantize_rtn(cur, QuantSpec(self.spec.bits, -1, self.sym))  # the plain quantizer's parameters
        self.scale[:, gi] = p.scale[:, 0]
        if not self.sym:
            self.zero[:, gi] = p.zero[:, 0].float()
        self.gi = gi

    def quantize(self, w: Tensor) -> tuple[Tensor, Tensor]:
        s = self.scale[:, self.gi]
        if self.sym:
            q = torch.clamp(torch.round(w / s), -self.qmax - 1, self.qmax)
            return q, q * s
        z = self.zero[:, self.gi]
        q = torch.clamp(torch.round(w / s) + z, 0, self.qmax)
        return q, (q - z) * s

    def result(self, codes: Tensor, k: int) -> QuantizedWeight:
        return QuantizedWeight(
            codes=codes.to(torch.int8 if self.sym else torch.uint8),
            scale=self.scale,
            zero=None if self.sym else self.zero.to(torch.uint8),
            bits=self.spec.bits,
            group_size=self.spec.group_size,
            in_features=k,
            meta={"gptq": True},
        )


class _Progressive:
    """QoQ progressive: fixed per-channel s1 (from the full weight), per-group integer s2 / zs."""

    def __init__(self, weight: Tensor, spec: QuantSpec, n_groups: int):
        from qtool.quant import progressive

        ref = progressive.quantize_progressive(weight, group_size=spec.group_size, pad=spec.pad)
        self.p = int(ref.meta.get("protective", progressive.PROTECTIVE_RANGE))
        self.ref_meta = dict(ref.meta)
        self.s1 = ref.scale.to(torch.float32).reshape(-1)
        self.spec = spec
        n = weight.shape[0]
        self.s2 = torch.zeros(n, n_groups, dtype=torch.float32, device=weight.device)
        self.zs = torch.zeros(n, n_groups, dtype=torch.float32, device=weight.device)

    def _w8(self, w: Tensor) -> Tensor:
        s1 = self.s1 if w.dim() == 1 else self.s1[:, None]
        return torch.clamp(torch.round(w / s1), -self.p, self.p)

    def start_group(self, gi: int, cur: Tensor) -> None:
        w8 = self._w8(cur)
        gmax, gmin = w8.amax(dim=1), w8.amin(dim=1)
        self.s2[:, gi] = torch.clamp(torch.round((gmax - gmin) / 15), min=1)
        self.zs[:, gi] = -gmin
        self.gi = gi

    def quantize(self, w: Tensor) -> tuple[Tensor, Tensor]:
        s2, zs = self.s2[:, self.gi], self.zs[:, self.gi]
        q4 = torch.clamp(torch.round((self._w8(w) + zs) / s2), 0, 15)
        return q4, self.s1 * (q4 * s2 - zs)

    def result(self, codes: Tensor, k: int) -> QuantizedWeight:
        r = codes * self.s2.repeat_interleave(self.spec.group_size, dim=1)[:, : codes.shape[1]] \
            - self.zs.repeat_interleave(self.spec.group_size, dim=1)[:, : codes.shape[1]]
        if int(self.s2.max()) > 17 or int(r.min()) < -127 or int(r.max()) > 127 or int(self.zs.abs().max()) > 127:
            raise LayoutError(
                f"GPTQ progressive quantization left the W4A8 int8 bounds (s2 ≤ {int(self.s2.max())}, "
                f"reconstruction in [{int(r.min())}, {int(r.max())}])",
                f"use a protective range ≤ 120 (got {self.p})")
        return QuantizedWeight(
            codes=codes.to(torch.uint8),
            scale=self.s1[:, None].clone(),
            zero=self.zs.to(torch.int8),
            bits=4,
            group_size=self.spec.group_size,
            in_features=k,
            zero_mode="post",
            scale2=self.s2.to(torch.int8),
            meta={**self.ref_meta, "gptq": True},
        )


class _QoQPerChannel:
    """QoQ per-channel UINT4 with fp16 scale and post-scale zero (`quantize_qoq_per_channel`)."""

    def start_group(self, gi: int, cur: Tensor) -> None:
        from qtool.quant.progressive import quantize_qoq_per_channel

        ref = quantize_qoq_per_channel(cur)
        self.s1, self.sz, self.ref_meta = ref.scale.reshape(-1), ref.zero.reshape(-1), dict(ref.meta)

    def quantize(self, w: Tensor) -> tuple[Tensor, Tensor]:
        q4 = torch.clamp(torch.round((w + self.sz) / self.s1), 0, 15)
        return q4, q4 * self.s1 - self.sz

    def result(self, codes: Tensor, k: int) -> QuantizedWeight:
        return QuantizedWeight(
            codes=codes.to(torch.uint8),
            scale=self.s1[:, None].clone(),
            zero=self.sz[:, None].clone(),
            bits=4,
            group_size=-1,
            in_features=k,
            zero_mode="post",
            meta={**self.ref_meta, "gptq": True},
        )


def _quantizer(weight: Tensor, recipe, spec: QuantSpec, n_groups: int):
    if recipe.quant.scheme == "progressive":
        return _QoQPerChannel() if spec.group_size == -1 else _Progressive(weight, spec, n_groups)
    return _RTN(spec, weight.shape[0], n_groups, weight.device)


# ------------------------------------------------------------------------------- GPTQ core
def _hinv_upper(h: Tensor, damp_ratio: float) -> Optional[Tensor]:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp·mean(diag H); None if H stays indefinite."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    damp = damp_ratio * torch.mean(torch.diag(h)).item()
    if damp <= 0:
        damp = 1e-6
    for attempt in range(_DAMP_RETRIES):
        l, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(l), upper=True)
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                if attempt:
                    log.warning("GPTQ: Hessian needed damping %.3g (×%d the configured value)", damp, 10**attempt)
                return u
        damp *= 10
    return None


def _plain(weight: Tensor, recipe) -> QuantizedWeight:
    from qtool.quant.weights import quantize_weight

    return quantize_weight(weight, recipe)


@torch.no_grad()
def gptq_quantize(weight: Tensor, H: Tensor, recipe) -> QuantizedWeight:
    """GPTQ-quantize one [N, K] weight given its input Hessian H [K, K] (module docstring)."""
    from qtool.recipe import GPTQCfg

    gcfg = recipe.quant.gptq or GPTQCfg()
    spec = spec_from_recipe(recipe)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    problems = check_spec((n, k), spec)
    if problems:
        raise LayoutError("; ".join(problems))
    if H.shape != (k, k):
        raise ValueError(f"Hessian has shape {tuple(H.shape)}, expected {(k, k)} for a {n}×{k} weight")
    if gcfg.block_size < 1 or gcfg.damp < 0:
        raise ValueError(f"quant.gptq needs block_size ≥ 1 and damp ≥ 0, got {gcfg.block_size}, {gcfg.damp}")
    device = weight.device
    h = H.detach().to(device=device, dtype=torch.float32).clone()
    if not bool(torch.isfinite(h).all()):
        log.warning("GPTQ: non-finite Hessian for a %d×%d weight; using the plain quantizer", n, k)
        return _plain(weight, recipe)
    g = k if spec.group_size == -1 else spec.group_size
    n_groups = padded_size(k, g) // g
    quant = _quantizer(weight.detach(), recipe, spec, n_groups)

    w = weight.detach().to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    u = _hinv_upper(h, gcfg.damp)
    if u is None:
        log.warning("GPTQ: Hessian of a %d×%d weight is not positive definite even with extra damping; "
                    "using the plain quantizer", n, k)
        return _plain(weight, recipe)

    codes = torch.zeros(n, k, dtype=torch.float32, device=device)
    bs = gcfg.block_size
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                end = min(col + g, k)
                cur = w1[:, i : min(end, i2) - i1]
                if end > i2:  # the group reaches past this block: apply the pending block update
                    rest = w[:, i2:end] - err1[:, :i] @ u[i1 : i1 + i, i2:end]
                    cur = torch.cat([cur, rest], dim=1)
                quant.start_group(col // g, cur)
            wc = w1[:, i]
            q, dq = quant.quantize(wc)
            codes[:, col] = q
            e = (wc - dq) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    kp = padded_size(k, g)
    if kp != k:
        codes = torch.cat([codes, codes[:, -1:].expand(n, kp - k)], dim=1)
    return quant.result(codes, k)
