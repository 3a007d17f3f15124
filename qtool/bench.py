"""Kernel benchmarks against in-run baselines (performance.md §4-§5).

    rows = run_bench()                       # prints a table, returns one dict per (op, shape, M)
    print(format_table(rows))

For op "w4a16" each row times, on the same random problem:
  * ours      — the selected backend's `w4a16_gemm` (QUICK layout, fp16 activations, g128);
  * fp16      — `F.linear` with an fp16 [N, K] weight (cuBLAS);
  * tinygemm  — `torch.ops.aten._weight_int4pack_mm` (bf16 activations, innerKTiles 8);
and reports µs, TFLOPS, the speed ratio to each baseline and the share of the roofline floor
max(bytes / BW, 2·M·K·N / peak), with bytes counted once (weights + group scales/zeros as this
layout stores them + activations + output) and BW / peak measured in-run (a device-to-device copy
counting read + write; an 8192³ bf16 matmul) unless given.

Method: weights are rotated over enough copies (> `rotate_bytes` per op) that repeated calls do not
hit L2; one CUDA graph holds one call per copy; each graph replay is timed with CUDA events and the
median over many replays, divided by the number of copies, is reported. Shapes are K×N
(in_features × out_features), as in performance.md.
"""

from __future__ import annotations

import json as _json
import math
import statistics
from typing import Callable, Iterable, Sequence

DEFAULT_SHAPES: tuple[tuple[int, int], ...] = (
    (4096, 4096),
    (4096, 12288),
    (4096, 22016),
    (11008, 4096),
    (14336, 4096),
)
DEFAULT_MS: tuple[int, ...] = (1, 4, 16, 64, 256, 1024, 4096)
# Fallback ceilings (H100 SXM, measured in this workplace; performance.md §1).
H100_BW = 3.0e12
H100_PEAK = 798e12


# --------------------------------------------------------------------------------------- timing


def time_rotating(calls: Sequence[Callable[[], object]], target_s: float = 0.15, min_reps: int = 5,
                  max_reps: int = 200, graph: bool = True) -> float:
    """Median µs per call; `calls` are the same op on different weight copies (L2 rotation)."""
    import torch

    for c in calls:  # warm-up: module load, autotuning, handle creation, cudaFuncSetAttribute
        c()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for c in calls:
                c()
        run = g.replay
    else:
        def run():
            for c in calls:
                c()
    run()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    run()
    e1.record()
    torch.cuda.synchronize()
    once = max(e0.elapsed_time(e1) / 1e3, 1e-6)
    reps = int(min(max_reps, max(min_reps, target_s / once)))
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in evs:
        a.record()
        run()
        b.record()
    torch.cuda.synchronize()
    ms = statistics.median(a.elapsed_time(b) for a, b in evs)
    if graph:
        del g
    return ms * 1e3 / len(calls)


def measure_ceilings() -> tuple[float, float]:
    """(bytes/s of a large device-to-device copy, read + write; bf16 FLOP/s of an 8192³ matmul)."""
    import torch

    n = 1 << 28  # 512 MiB of fp16
    a = torch.randn(n, device="cuda", dtype=torch.float16)
    b = torch.empty_like(a)
    t_copy = time_rotating([lambda: b.copy_(a)], target_s=0.2, graph=False)
    bw = 2 * a.numel() * 2 / (t_copy * 1e-6)
    del a, b
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_mm = time_rotating([lambda: x @ y], target_s=0.3, graph=False)
    peak = 2 * 8192**3 / (t_mm * 1e-6)
    del x, y
    torch.cuda.empty_cache()
    return bw, peak


def w4a16_bytes(M: int, K: int, N: int, group: int) -> int:
    G = K // group
    return K * N // 2 + G * (2 * N * 2 + (N // 4) * 4) + 2 * M * K + 2 * M * N


def floor_us(M: int, K: int, N: int, group: int, bw: float, peak: float) -> tuple[float, str]:
    tb = w4a16_bytes(M, K, N, group) / bw
    tc = 2 * M * K * N / peak
    return max(tb, tc) * 1e6, ("mem" if tb >= tc else "compute")


# --------------------------------------------------------------------------------------- problems


def _copies(bytes_per_copy: int, rotate_bytes: int, cap: int = 48) -> int:
    return int(min(cap, max(1, math.ceil(rotate_bytes / max(1, bytes_per_copy)))))


def make_w4a16_weights(K: int, N: int, group: int, copies: int, seed: int = 0):
    """`copies` random QUICK-packed weights (independent codes/scales/zeros) on the GPU."""
    import torch

    from kernels_cuda.reference import pack_quick

    gen = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(copies):
        q = torch.randint(0, 16, (N, K), device="cuda", generator=gen, dtype=torch.int64)
        z = torch.randint(0, 16, (N, K // group), device="cuda", generator=gen, dtype=torch.int64)
        s = (torch.rand(N, K // group, device="cuda", generator=gen) * 0.02 + 0.002).half()
        out.append(pack_quick(q, z, s))
        del q, z, s
    return out


def make_tinygemm_weights(K: int, N: int, group: int, copies: int, seed: int = 1):
    """`copies` random (packed int4, bf16 scale_and_zero [G, N, 2]) for _weight_int4pack_mm."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(copies):
        q = torch.randint(0, 16, (N, K), device="cuda", generator=gen, dtype=torch.int32)
        u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()  # even k in the high nibble
        packed = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
        G = K // group
        sz = torch.empty(G, N, 2, device="cuda", dtype=torch.bfloat16)
        sz[..., 0] = (torch.rand(G, N, device="cuda", generator=gen) * 0.02 + 0.002).bfloat16()
        sz[..., 1] = (torch.randn(G, N, device="cuda", generator=gen) * 0.01).bfloat16()
        out.append((packed, sz))
        del q, u8
    return out


# --------------------------------------------------------------------------------------- bench


def run_bench(
    ops: Iterable[str] = ("w4a16",),
    shapes: Iterable[tuple[int, int]] = DEFAULT_SHAPES,
    ms: Iterable[int] = DEFAULT_MS,
    backend: str = "auto",
    json: bool = False,
    *,
    group_size: int = 128,
    baselines: Iterable[str] = ("fp16", "tinygemm"),
    bw: float | None = None,
    peak: float | None = None,
    rotate_bytes: int = 256 << 20,
    target_s: float = 0.15,
    echo: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Time `ops` over `shapes` (K×N) × `ms`; return one row per (op, shape, M).

    `backend` goes to `qtool.kernels.select_backend` ("auto", "cuda", "reference"). `bw`/`peak`
    default to in-run measurements. With `echo`, prints `format_table(rows)` (or, with `json`,
    the rows as JSON) to stdout when done.
    """
    import torch
    import torch.nn.functional as F

    from qtool.kernels import select_backend

    ops = tuple(ops)
    for op in ops:
        if op != "w4a16":
            raise ValueError(f"unknown bench op {op!r}; known: w4a16")
    if not torch.cuda.is_available():
        raise RuntimeError("qtool bench needs a CUDA GPU")
    be = select_backend(backend)
    gemm = be.op("w4a16_gemm")
    choose = None
    if be.name == "cuda":
        from kernels_cuda import ops as kops

        choose = kops.choose
    baselines = tuple(baselines)
    if bw is None or peak is None:
        mbw, mpeak = measure_ceilings()
        bw = bw or mbw
        peak = peak or mpeak
    dev = torch.cuda.get_device_name()
    rows: list[dict] = []
    g = group_size
    for K, N in shapes:
        w4_bytes = w4a16_bytes(0, K, N, g)
        wq = make_w4a16_weights(K, N, g, _copies(w4_bytes, rotate_bytes))
        w16 = tg = None
        if "fp16" in baselines:
            gen = torch.Generator(device="cuda").manual_seed(2)
            w16 = [torch.randn(N, K, device="cuda", generator=gen, dtype=torch.float16) * 0.02
                   for _ in range(_copies(2 * K * N, rotate_bytes))]
        if "tinygemm" in baselines:
            try:
                tg = make_tinygemm_weights(K, N, g, _copies(w4_bytes, rotate_bytes))
            except Exception as e:  # noqa: BLE001  (a baseline that cannot run is reported, not fatal)
                tg = None
                if log is not None:
                    log(f"tinygemm baseline unavailable for {K}x{N}: {type(e).__name__}: {e}")
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            row = {"op": "w4a16", "K": K, "N": N, "M": M, "group": g, "backend": be.name, "device": dev}
            if choose is not None:
                c, s = choose(M, N, K, g)
                row["cfg"] = f"c{c}/s{s}"
            row["us"] = time_rotating(
                [lambda t=t: gemm(x, t["qweight"], t["scales"], t["qzeros"], g) for t in wq], target_s)
            if w16 is not None:
                row["us_fp16"] = time_rotating([lambda w=w: F.linear(x, w) for w in w16], target_s)
            if tg is not None:
                xb = x.bfloat16()
                row["us_tinygemm"] = time_rotating(
                    [lambda p=p: torch.ops.aten._weight_int4pack_mm(xb, p[0], g, p[1]) for p in tg], target_s)
            fl, bound = floor_us(M, K, N, g, bw, peak)
            row.update(
                tflops=2 * M * K * N / (row["us"] * 1e-6) / 1e12,
                floor_us=fl,
                bound=bound,
                pct_floor=100.0 * fl / row["us"],
                bw_tbs=bw / 1e12,
                peak_tflops=peak / 1e12,
            )
            if "us_fp16" in row:
                row["x_fp16"] = row["us_fp16"] / row["us"]
            if "us_tinygemm" in row:
                row["x_tinygemm"] = row["us_tinygemm"] / row["us"]
            rows.append(row)
            if log is not None:
                log(format_table([row], header=False))
            del x
        del wq, w16, tg
        torch.cuda.empty_cache()
    if echo:
        print(_json.dumps(rows, indent=1) if json else format_table(rows))
    return rows


def format_table(rows: list[dict], header: bool = True) -> str:
    cols = [
        ("K×N", lambda r: f"{r['K']}x{r['N']}", 11),
        ("M", lambda r: str(r["M"]), 5),
        ("ours µs", lambda r: f"{r['us']:.1f}", 8),
        ("fp16 µs", lambda r: f"{r['us_fp16']:.1f}" if "us_fp16" in r else "-", 8),
        ("tiny µs", lambda r: f"{r['us_tinygemm']:.1f}" if "us_tinygemm" in r else "-", 8),
        ("×fp16", lambda r: f"{r['x_fp16']:.2f}" if "x_fp16" in r else "-", 6),
        ("×tiny", lambda r: f"{r['x_tinygemm']:.2f}" if "x_tinygemm" in r else "-", 6),
        ("TFLOPS", lambda r: f"{r['tflops']:.1f}", 7),
        ("floor µs", lambda r: f"{r['floor_us']:.1f}{'c' if r['bound'] == 'compute' else ''}", 9),
        ("%floor", lambda r: f"{r['pct_floor']:.0f}", 6),
        ("cfg", lambda r: r.get("cfg", ""), 7),
    ]
    lines = []
    if header:
        lines.append(" ".join(f"{n:>{w}}" for n, _, w in cols))
    for r in rows:
        lines.append(" ".join(f"{f(r):>{w}}" for _, f, w in cols))
    return "\n".join(lines)


def summarize_targets(rows: list[dict]) -> str:
    """Median ratios per M bucket vs the issue's speed targets."""
    buckets = (("M<=16", lambda m: m <= 16, (("x_fp16", 2.5), ("x_tinygemm", 1.2))),
               ("M=64-256", lambda m: 64 <= m <= 256, (("x_tinygemm", 2.0), ("x_fp16", 1.0))),
               ("M>=1024", lambda m: m >= 1024, (("x_fp16", 0.5),)))
    out = []
    for name, sel, targets in buckets:
        rs = [r for r in rows if sel(r["M"])]
        if not rs:
            continue
        parts = []
        for key, tgt in targets:
            vals = [r[key] for r in rs if key in r]
            if vals:
                med = statistics.median(vals)
                parts.append(f"{key} median {med:.2f} (target >= {tgt}: {'MET' if med >= tgt else 'short'})")
        pf = statistics.median(r["pct_floor"] for r in rs)
        out.append(f"{name}: " + "; ".join(parts) + f"; median {pf:.0f}% of floor")
    return "\n".join(out)
