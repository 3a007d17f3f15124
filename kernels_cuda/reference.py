"""Test-side QUICK packer and fp32 reference, written straight from algorithms.md §4b.

Independent of `qtool.layouts.quick_w4a16` (the production packer) so the kernel can be checked
against the formulas themselves; the tests also compare the two when the packer exists.
Pure torch, runs on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _to_int32(words: Tensor) -> Tensor:
    """int64 tensor holding unsigned 32-bit patterns → int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def column_coords(N: int, device=None):
    n = torch.arange(N, device=device, dtype=torch.int64)
    bx, y, tile, j = n // 128, (n % 128) // 64, (n % 64) // 8, n % 8
    h, jm, c = j // 4, j % 4, tile // 2
    return n, bx, y, tile, j, h, jm, c


def pack_quick(q: Tensor, z: Tensor, s: Tensor) -> dict[str, Tensor]:
    """q [N, K] ints 0..15, z [N, G] ints 0..15, s [N, G] → {"qweight", "scales", "qzeros"}.

    qweight int32 [K/4, N/2], scales fp16 [G, 2N], qzeros int32 [G, N/4] (§4b formulas).
    """
    N, K = q.shape
    G = z.shape[1]
    assert N % 128 == 0 and K % 32 == 0 and K % G == 0
    dev = q.device
    n, bx, y, tile, j, h, jm, c = column_coords(N, dev)
    k = torch.arange(K, device=dev, dtype=torch.int64)
    kb, khalf, kr = k // 32, (k % 32) // 16, k % 16
    k8, t, lohi = kr // 8, (kr % 8) // 2, kr % 2
    word = (kb * 4 * N + 4 * khalf)[None, :] + ((2 * y + h) * N + 128 * bx + 8 * (4 * jm) + c)[:, None] + (8 * t)[None, :]
    shift = (16 * lohi + 4 * k8)[None, :] + (8 * (tile % 2))[:, None]
    vals = q.to(torch.int64) << shift
    words = torch.zeros(K * N // 8, dtype=torch.int64, device=dev)
    words.index_add_(0, word.reshape(-1), vals.reshape(-1))  # distinct nibbles: add == or
    qweight = _to_int32(words).reshape(K // 4, N // 2)

    Q = y * (N // 16) + h * (N // 32) + 4 * bx + jm
    x = 8 * Q + tile
    scales = torch.empty(G, 2 * N, dtype=torch.float16, device=dev)
    sT = s.to(torch.float16).t()  # [G, N]
    scales[:, 2 * x] = sT
    scales[:, 2 * x + 1] = sT
    zT = z.to(torch.int64).t()  # [G, N]
    zw = torch.zeros(G, N // 4, dtype=torch.int64, device=dev)
    zv = (zT << (4 * (x % 4))[None, :]) | (zT << (4 * (x % 4) + 16)[None, :])
    zw.index_add_(1, x // 4, zv)
    return {"qweight": qweight, "scales": scales, "qzeros": _to_int32(zw)}


def random_problem(M: int, N: int, K: int, group: int, dtype=torch.float16, device="cuda", gen=None):
    """Fresh random x, q, z, s (scales fp16-representable) and the packed tensors."""
    G = K // group
    q = torch.randint(0, 16, (N, K), device=device, generator=gen, dtype=torch.int64)
    z = torch.randint(0, 16, (N, G), device=device, generator=gen, dtype=torch.int64)
    s = (torch.rand(N, G, device=device, generator=gen) * 0.02 + 0.002).to(torch.float16)
    x = torch.randn(M, K, device=device, generator=gen).to(dtype)
    return x, q, z, s, pack_quick(q, z, s)


def reference(x: Tensor, q: Tensor, z: Tensor, s: Tensor, group: int) -> Tensor:
    """fp32 x · ((q − z)·s)ᵀ (fp64 accumulation on CPU-sized problems is unnecessary: fp32 is
    far below the 1e-3 tolerance for these K)."""
    w = (q.float() - z.float().repeat_interleave(group, dim=1)) * s.float().repeat_interleave(group, dim=1)
    return x.float() @ w.t()


def rel_err(out: Tensor, ref: Tensor) -> float:
    out = out.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
