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

Ops "w8a8" and "w4a8" (issue 7) time, per (K×N, M), on the same random int8 activations:
  * w8a8      — the backend's `w8a8_gemm` (int8 W [N, K], per-token × per-channel scales fused,
                fp16 out) against `torch._int_mm` (int8 → int32, no epilogue, B = w.t(); M ≤ 16 is
                padded to 32 rows since _int_mm needs M > 16) and `F.linear` fp16;
  * w4a8      — the backend's `w4a8_gemm` on the QServe layout, per-group g128 ("w4a8-g128") and
                per-channel ("w4a8-chn"), fp16 out, against our own W8A8 (block-timed as every op,
                and paired: see below) and `F.linear` fp16.
Op "kv4attn" times `kv4_decode_attention` (B 64, 32 query / 8 KV heads, d 128, context 1024–4096)
against `F.scaled_dot_product_attention` decode on an fp16 cache (enable_gqa, and with K/V expanded
to the query heads; the faster is the baseline). Op "act_quant" times the per-token quantizers.
Int8 floors use the datasheet dense INT8 rate (1979 TOP/s) and the in-run copy bandwidth.

Method: weights are rotated over enough copies (> `rotate_bytes` per op) that repeated calls do not
hit L2; one CUDA graph holds one call per copy; each graph replay is timed with CUDA events and the
median over many replays, divided by the number of copies, is reported. The issue-7 ratios
(W4A8 / W8A8, W8A8 / _int_mm, W8A8 / fp16) are also taken with `time_paired` (the ops' graphs replayed
in alternating rounds; columns "pr"), which keeps the GPU's clock / power drift between timing blocks
out of them; the issue-7 summary judges its targets on those. Shapes are K×N
(in_features × out_features), as in performance.md.
"""

from __future__ import annotations

import json as _json
import math
import os
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


def _graph_of(calls: Sequence[Callable[[], object]]):
    """`calls` warmed up (module load, autotuning, handle creation, cudaFuncSetAttribute), then captured in one
    CUDA graph."""
    import torch

    for c in calls:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    return g


def _time_rounds(runs: Sequence[Callable[[], object]], target_s: float, min_reps: int, max_reps: int) -> list[float]:
    """Median ms of each run, timed with CUDA events over rounds in which every run goes once, the order reversed
    every other round; the number of rounds is sized from one untimed and one timed pass to ~target_s."""
    import torch

    for run in runs:
        run()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for run in runs:
        run()
    e1.record()
    torch.cuda.synchronize()
    once = max(e0.elapsed_time(e1) / 1e3, 1e-6)
    reps = int(min(max_reps, max(min_reps, target_s / once)))
    evs = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
           for _ in runs]
    order = list(range(len(runs)))
    for r in range(reps):
        for i in (order if r % 2 == 0 else order[::-1]):
            a, b = evs[i][r]
            a.record()
            runs[i]()
            b.record()
    torch.cuda.synchronize()
    return [statistics.median(a.elapsed_time(b) for a, b in ev) for ev in evs]


def time_rotating(calls: Sequence[Callable[[], object]], target_s: float = 0.15, min_reps: int = 5,
                  max_reps: int = 200, graph: bool = True) -> float:
    """Median µs per call; `calls` are the same op on different weight copies (L2 rotation)."""
    if graph:
        run = _graph_of(calls).replay
    else:
        for c in calls:  # warm-up, as for a graph
            c()

        def run():
            for c in calls:
                c()
    return _time_rounds([run], target_s, min_reps, max_reps)[0] * 1e3 / len(calls)


def time_paired(call_sets: Sequence[Sequence[Callable[[], object]]], target_s: float = 0.15, min_rounds: int = 15,
                max_rounds: int = 200) -> list[float]:
    """Median µs per call of each op (each entry as for `time_rotating`), with the ops' graph replays
    alternating round by round (the order reversed every other round), so that drift in clocks and power
    over the measurement weighs on every op alike. A ratio of two ops timed in separate blocks carries that
    drift: one kernel timed twice in consecutive blocks differed by up to 9 % on an H100 (nineteenth session,
    docs/benchmarks.md)."""
    runs = [_graph_of(calls).replay for calls in call_sets]
    ms = _time_rounds(runs, target_s, min_rounds, max_rounds)
    return [t * 1e3 / len(calls) for t, calls in zip(ms, call_sets)]


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


INT8_PEAK = 1979e12  # H100/H200 dense INT8 (datasheet); mma.sync tops out near 75 % of it


def w8a8_bytes(M: int, K: int, N: int) -> int:
    return K * N + 4 * N + M * K + 4 * M + 2 * M * N


def w4a8_bytes(M: int, K: int, N: int, group: int, out_bytes: int = 2) -> int:
    """Bytes a W4A8 GEMM moves: the QServe weights and scales, int8 activations + per-token scale (and sum,
    per-channel), the output (fp16 by default, as the bench times it)."""
    w = K * N // 2 + (2 * (K // group) * N + 2 * N if group > 0 else 4 * N)
    return w + M * K + 4 * M + out_bytes * M * N + (4 * M if group <= 0 else 0)


def int8_floor_us(bytes_: int, M: int, K: int, N: int, bw: float, peak: float = INT8_PEAK) -> tuple[float, str]:
    tb = bytes_ / bw
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


def make_w8a8_weights(K: int, N: int, copies: int, seed: int = 3):
    """`copies` random (int8 W [N, K] in [-127, 127], fp32 w_scale [N]) on the GPU."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [(torch.randint(-127, 128, (N, K), device="cuda", generator=gen, dtype=torch.int8),
             torch.rand(N, device="cuda", generator=gen) * 1e-3 + 1e-4) for _ in range(copies)]


def random_w4a8(K: int, N: int, group: int, device="cuda", gen=None) -> dict:
    """Random QServe W4A8 tensors (qtool.layouts.w4a8kv4 byte order) with valid integer bounds:
    per-group (group > 0): q4 in [0, 15], s2 in [1, 16], zs = round(7.5 * s2) (so q4*s2 - zs stays
    in int8); per-channel (group <= 0): fp16 s1 and sz. Returns the packed tensors."""
    import torch

    from qtool.layouts.w4a8kv4 import pack_qweight, pack_s2

    q4 = torch.randint(0, 16, (N, K), device=device, generator=gen, dtype=torch.uint8)
    s1 = (torch.rand(N, device=device, generator=gen) * 1e-3 + 1e-4).half()
    out = {"qweight": pack_qweight(q4), "s1_scales": s1}
    if group > 0:
        G = K // group
        s2 = torch.randint(1, 17, (N, G), device=device, generator=gen, dtype=torch.int16)
        zs = torch.round(s2.float() * 7.5).to(torch.int16)
        out["s2_scales"] = pack_s2(s2.to(torch.int8))
        out["s2_zeros"] = pack_s2((-zs).to(torch.int8))
    else:
        out["s1_szeros"] = (s1.float() * (torch.rand(N, device=device, generator=gen) * 15)).half()
    return out


def make_w4a8_weights(K: int, N: int, group: int, copies: int, seed: int = 4):
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [random_w4a8(K, N, group, "cuda", gen) for _ in range(copies)]


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

    `backend` goes to `qtool.kernels.select_backend` ("auto", "cuda", "reference"; a Backend is used
    as is). Ops: see KNOWN_OPS. `bw`/`peak`
    default to in-run measurements. With `echo`, prints `format_table(rows)` (or, with `json`,
    the rows as JSON) to stdout when done.
    """
    import torch

    from qtool.kernels import Backend, select_backend

    ops = tuple(ops)
    for op in ops:
        if op not in KNOWN_OPS:
            raise ValueError(f"unknown bench op {op!r}; known: {', '.join(KNOWN_OPS)}")
    if not torch.cuda.is_available():
        raise RuntimeError("qtool bench needs a CUDA GPU")
    be = backend if isinstance(backend, Backend) else select_backend(backend)
    if bw is None or peak is None:
        mbw, mpeak = measure_ceilings()
        bw = bw or mbw
        peak = peak or mpeak
    rows: list[dict] = []
    if "w4a16" in ops:
        rows += _bench_w4a16(be, shapes, ms, group_size, baselines, bw, peak, rotate_bytes, target_s, log)
    if "w8a8" in ops or "w4a8" in ops:
        rows += _bench_int8(be, shapes, ms, ops, bw, rotate_bytes, target_s, log)
    if "kv4attn" in ops:
        rows += _bench_kv4(be, bw, target_s, log)
    if "act_quant" in ops:
        rows += _bench_act_quant(be, bw, target_s, log)
    if echo:
        print(_json.dumps(rows, indent=1) if json else format_table(rows))
    return rows


KNOWN_OPS = ("w4a16", "w8a8", "w4a8", "kv4attn", "act_quant")
KV4_DEFAULT_KERNEL = "u4"  # what kernels_cuda/csrc/kv4_attention.cu runs with QTOOL_KV4_KERNEL unset


def _bench_w4a16(be, shapes, ms, group_size, baselines, bw, peak, rotate_bytes, target_s, log) -> list[dict]:
    import torch
    import torch.nn.functional as F

    gemm = be.op("w4a16_gemm")
    choose = None
    if be.name == "cuda":
        from kernels_cuda import ops as kops

        choose = kops.choose
    baselines = tuple(baselines)
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
            if choose is not None:
                # the decode and (Hopper) register-A wgmma kernels launch with PDL (consecutive calls
                # overlap); the same op without it
                row["us_nopdl"] = _without_pdl(lambda: time_rotating(
                    [lambda t=t: gemm(x, t["qweight"], t["scales"], t["qzeros"], g) for t in wq], target_s))
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
            for base in ("fp16", "tinygemm"):
                if f"us_{base}" in row:
                    row[f"x_{base}"] = row[f"us_{base}"] / row["us"]
                    if "us_nopdl" in row:
                        row[f"x_{base}_nopdl"] = row[f"us_{base}"] / row["us_nopdl"]
            rows.append(row)
            if log is not None:
                log(format_table([row], header=False))
            del x
        del wq, w16, tg
        torch.cuda.empty_cache()
    return rows


def _without_pdl(fn, var: str = "QTOOL_W4A16_PDL"):
    """Run fn with a kernel family's programmatic dependent launch off (`var`=0, read by the launcher
    per call: QTOOL_W4A16_PDL for the W4A16 decode kernels, QTOOL_I8_PDL for the int8 ones)."""
    old = os.environ.get(var)
    os.environ[var] = "0"
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old


def _bench_int8(be, shapes, ms, ops, bw, rotate_bytes, target_s, log) -> list[dict]:
    """W8A8 (vs _int_mm, fp16) and W4A8 per-group g128 / per-channel (vs our W8A8, fp16)."""
    import torch
    import torch.nn.functional as F

    w8 = be.op("w8a8_gemm")
    w4 = be.op("w4a8_gemm")
    choose = None
    if be.name == "cuda":
        from kernels_cuda import ops as kops

        choose = kops.i8_choose
    dev = torch.cuda.get_device_name()
    rows: list[dict] = []
    for K, N in shapes:
        wq8 = make_w8a8_weights(K, N, _copies(K * N, rotate_bytes))
        gen = torch.Generator(device="cuda").manual_seed(2)
        w16 = [torch.randn(N, K, device="cuda", generator=gen, dtype=torch.float16) * 0.02
               for _ in range(_copies(2 * K * N, rotate_bytes))]
        w4s = {}
        if "w4a8" in ops:
            for g in (128, -1):
                if g > 0 and K % g:
                    continue
                w4s[g] = make_w4a8_weights(K, N, g, _copies(w4a8_bytes(0, K, N, g), rotate_bytes), seed=5 + max(g, 0))
        for M in ms:
            xq = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
            xs = torch.rand(M, 1, device="cuda") * 0.01 + 1e-3
            xsum = torch.randn(M, 1, device="cuda")
            calls8 = [lambda t=t: w8(xq, xs, t[0], t[1], None, torch.float16) for t in wq8]
            us8 = time_rotating(calls8, target_s)
            # the decode kernels launch with PDL (consecutive calls overlap); the same ops without it
            nopdl = choose is not None and M <= 16
            us8_nopdl = _without_pdl(lambda: time_rotating(calls8, target_s), "QTOOL_I8_PDL") if nopdl else None
            xh = xq.half()
            calls16 = [lambda w=w: F.linear(xh, w) for w in w16]
            us16 = time_rotating(calls16, target_s)
            fl8, bd8 = int8_floor_us(w8a8_bytes(M, K, N), M, K, N, bw)
            if "w8a8" in ops:
                xp = xq if M > 16 else torch.cat([xq, xq.new_zeros(32 - M, K)])
                callsi = [lambda t=t: torch._int_mm(xp, t[0].t()) for t in wq8]
                try:
                    usi = time_rotating(callsi, target_s)
                except Exception as e:  # noqa: BLE001  (a baseline that cannot run is reported, not fatal)
                    usi = None
                    if log is not None:
                        log(f"_int_mm unavailable for {K}x{N} M={M}: {type(e).__name__}: {e}")
                row = {"op": "w8a8", "K": K, "N": N, "M": M, "backend": be.name, "device": dev, "us": us8,
                       "us_fp16": us16, "x_fp16": us16 / us8, "tops": 2 * M * K * N / (us8 * 1e-6) / 1e12,
                       "floor_us": fl8, "bound": bd8, "pct_floor": 100.0 * fl8 / us8, "bw_tbs": bw / 1e12}
                # the baselines' ratios again with the ops replayed in alternating rounds (time_paired)
                pr = time_paired([calls8, calls16] + ([callsi] if usi is not None else []), target_s)
                row["x_fp16_paired"] = pr[1] / pr[0]
                if usi is not None:
                    row.update(us_int_mm=usi, x_int_mm=usi / us8, x_int_mm_paired=pr[2] / pr[0],
                               int_mm_rows=xp.shape[0])
                if us8_nopdl is not None:
                    row.update(us_nopdl=us8_nopdl, x_fp16_nopdl=us16 / us8_nopdl)
                if choose is not None:
                    c, sp = choose(0, M, N, K)
                    row["cfg"] = f"c{c}/s{sp}"
                rows.append(row)
                if log is not None:
                    log(format_table([row], header=False))
            for g, wl in w4s.items():
                # fp16 out on both sides (what a W4A8 / W8A8 layer returns)
                if g > 0:
                    calls = [lambda t=t: w4(xq, xs, None, t["qweight"], t["s1_scales"], None, t["s2_scales"],
                                            t["s2_zeros"], g, None, torch.float16) for t in wl]
                else:
                    calls = [lambda t=t: w4(xq, xs, xsum, t["qweight"], t["s1_scales"], t["s1_szeros"], None, None,
                                            -1, None, torch.float16) for t in wl]
                us4 = time_rotating(calls, target_s)
                # the ratio again with both ops replayed in alternating rounds: the block-timed one above
                # times W4A8 several blocks after W8A8 and carries their clock / power drift
                us4p, us8p = time_paired([calls, calls8], target_s)
                fl4, bd4 = int8_floor_us(w4a8_bytes(M, K, N, g), M, K, N, bw)
                row = {"op": "w4a8", "variant": f"g{g}" if g > 0 else "chn", "K": K, "N": N, "M": M,
                       "backend": be.name, "device": dev, "us": us4, "us_w8a8": us8, "x_w8a8": us8 / us4,
                       "x_w8a8_paired": us8p / us4p,
                       "us_fp16": us16, "x_fp16": us16 / us4, "tops": 2 * M * K * N / (us4 * 1e-6) / 1e12,
                       "floor_us": fl4, "bound": bd4, "pct_floor": 100.0 * fl4 / us4, "bw_tbs": bw / 1e12}
                if us8_nopdl is not None:
                    us4n = _without_pdl(lambda c=calls: time_rotating(c, target_s), "QTOOL_I8_PDL")
                    row.update(us_nopdl=us4n, x_w8a8_nopdl=us8_nopdl / us4n)
                if choose is not None:
                    c, sp = choose(2 if g > 0 else 1, M, N, K)
                    row["cfg"] = f"c{c}/s{sp}"
                rows.append(row)
                if log is not None:
                    log(format_table([row], header=False))
            del xq
        del wq8, w16, w4s
        torch.cuda.empty_cache()
    return rows


def _bench_kv4(be, bw, target_s, log, batch: int = 64, hq: int = 32, hkv: int = 8, d: int = 128,
               ctxs=(1024, 2048, 4096)) -> list[dict]:
    """KV4 decode attention vs SDPA decode on an fp16 cache (uniform context per batch)."""
    import torch
    import torch.nn.functional as F

    if be.name != "cuda":
        raise RuntimeError("kv4attn needs the cuda backend (no reference op is timed)")
    from kernels_cuda import ops as kops

    dev = torch.cuda.get_device_name()
    rows = []
    for ctx in ctxs:
        gen = torch.Generator(device="cuda").manual_seed(ctx)
        k16 = torch.randn(batch, hkv, ctx, d, device="cuda", generator=gen, dtype=torch.float16)
        v16 = torch.randn(batch, hkv, ctx, d, device="cuda", generator=gen, dtype=torch.float16)
        kc, kp = kops.kv4_pack_cache(*kops.kv4_quantize(k16))
        vc, vp = kops.kv4_pack_cache(*kops.kv4_quantize(v16))
        q = torch.randn(batch, hq, d, device="cuda", generator=gen, dtype=torch.float16)
        lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
        us = time_rotating([lambda: kops.kv4_decode_attention(q, kc, kp, vc, vp, lens)], target_s)
        q4 = q.unsqueeze(2)
        base = {}
        try:
            base["gqa"] = time_rotating([lambda: F.scaled_dot_product_attention(q4, k16, v16, enable_gqa=True)],
                                        target_s)
        except Exception as e:  # noqa: BLE001
            if log is not None:
                log(f"SDPA enable_gqa unavailable: {type(e).__name__}: {e}")
        ke = k16.repeat_interleave(hq // hkv, dim=1)
        ve = v16.repeat_interleave(hq // hkv, dim=1)
        base["expanded"] = time_rotating([lambda: F.scaled_dot_product_attention(q4, ke, ve)], target_s)
        del ke, ve
        best = min(base, key=base.get)
        kv_bytes = batch * hkv * ctx * (d // 2 + 4) * 2
        floor = (kv_bytes + 4 * batch * hq * d) / bw * 1e6
        kern = os.environ.get("QTOOL_KV4_KERNEL") or KV4_DEFAULT_KERNEL
        row = {"op": "kv4attn", "kernel": kern, "B": batch, "ctx": ctx, "Hq": hq, "Hkv": hkv, "D": d,
               "device": dev, "us": us,
               "us_sdpa": base[best], "sdpa_variant": best, "x_sdpa": base[best] / us,
               **{f"us_sdpa_{k}": v for k, v in base.items()},
               "gbs": kv_bytes / (us * 1e-6) / 1e9, "floor_us": floor, "pct_floor": 100.0 * floor / us,
               "fp16_floor_us": (batch * hkv * ctx * d * 4) / bw * 1e6, "bw_tbs": bw / 1e12,
               "split": int(torch.ops.qtool_cuda.kv4_choose_split(batch, hkv, ctx, d))}
        rows.append(row)
        if log is not None:
            log(format_table([row], header=False))
        del k16, v16, kc, kp, vc, vp
        torch.cuda.empty_cache()
    return rows


def _bench_act_quant(be, bw, target_s, log) -> list[dict]:
    """Per-token int8 quantization (+ row sum, + fused RMSNorm) of fp16 activations."""
    import torch

    if be.name != "cuda":
        raise RuntimeError("act_quant needs the cuda backend")
    from kernels_cuda import ops as kops
    from qtool.quant.activations import quantize_per_token as ref

    dev = torch.cuda.get_device_name()
    rows = []
    for K in (4096, 14336):
        for M in (1, 16, 256, 4096):
            xs = [torch.randn(M, K, device="cuda", dtype=torch.float16) for _ in range(_copies(2 * M * K, 128 << 20, 16))]
            w = torch.rand(K, device="cuda", dtype=torch.float16) + 0.5
            byt = 3 * M * K + 8 * M
            res = {"ptq": time_rotating([lambda x=x: kops.quantize_per_token(x) for x in xs], target_s),
                   "ptq_sum": time_rotating([lambda x=x: kops.quantize_per_token_sum(x) for x in xs], target_s),
                   "rms_ptq": time_rotating([lambda x=x: kops.rmsnorm_quantize(x, w, 1e-6) for x in xs], target_s),
                   "torch_ref": time_rotating([lambda x=x: ref(x) for x in xs], target_s)}
            for name, us in res.items():
                if name == "torch_ref":
                    continue
                row = {"op": "act_quant", "variant": name, "M": M, "K": K, "device": dev, "us": us,
                       "us_torch": res["torch_ref"], "x_torch": res["torch_ref"] / us,
                       "gbs": byt / (us * 1e-6) / 1e9, "floor_us": byt / bw * 1e6,
                       "pct_floor": 100.0 * byt / bw * 1e6 / us}
                rows.append(row)
                if log is not None:
                    log(format_table([row], header=False))
            del xs
    return rows


def format_table(rows: list[dict], header: bool = True) -> str:
    """One table per op kind (w4a16, w8a8, w4a8, kv4attn, act_quant), in the order they appear."""
    kinds = []
    for r in rows:
        k = r.get("op", "w4a16")
        if k not in kinds:
            kinds.append(k)
    if len(kinds) > 1:
        return "\n\n".join(format_table([r for r in rows if r.get("op", "w4a16") == k], header) for k in kinds)
    if kinds and kinds[0] in _FORMATS:
        return _fmt(rows, _FORMATS[kinds[0]], header)
    return _format_w4a16(rows, header)


def _f(key, fmt="{:.1f}"):
    return lambda r: fmt.format(r[key]) if r.get(key) is not None else "-"


_FORMATS = {
    "w8a8": [
        ("K×N", lambda r: f"{r['K']}x{r['N']}", 11), ("M", lambda r: str(r["M"]), 5), ("ours µs", _f("us"), 8),
        ("noPDL µs", _f("us_nopdl"), 9), ("intmm µs", _f("us_int_mm"), 9), ("fp16 µs", _f("us_fp16"), 8), ("×intmm", _f("x_int_mm", "{:.2f}"), 7),
        ("pr", _f("x_int_mm_paired", "{:.2f}"), 5), ("×fp16", _f("x_fp16", "{:.2f}"), 6),
        ("pr", _f("x_fp16_paired", "{:.2f}"), 5), ("TOPS", _f("tops"), 7),
        ("floor µs", lambda r: f"{r['floor_us']:.1f}{'c' if r['bound'] == 'compute' else ''}", 9),
        ("%floor", _f("pct_floor", "{:.0f}"), 6), ("cfg", lambda r: r.get("cfg", ""), 7),
    ],
    "w4a8": [
        ("K×N", lambda r: f"{r['K']}x{r['N']}", 11), ("M", lambda r: str(r["M"]), 5),
        ("var", lambda r: r["variant"], 5), ("ours µs", _f("us"), 8), ("noPDL µs", _f("us_nopdl"), 9),
        ("w8a8 µs", _f("us_w8a8"), 8),
        ("fp16 µs", _f("us_fp16"), 8), ("×w8a8", _f("x_w8a8", "{:.2f}"), 6),
        ("pr", _f("x_w8a8_paired", "{:.2f}"), 5), ("×fp16", _f("x_fp16", "{:.2f}"), 6), ("TOPS", _f("tops"), 7),
        ("floor µs", lambda r: f"{r['floor_us']:.1f}{'c' if r['bound'] == 'compute' else ''}", 9),
        ("%floor", _f("pct_floor", "{:.0f}"), 6), ("cfg", lambda r: r.get("cfg", ""), 7),
    ],
    "kv4attn": [
        ("kernel", lambda r: r.get("kernel", KV4_DEFAULT_KERNEL), 6), ("B", lambda r: str(r["B"]), 4),
        ("ctx", lambda r: str(r["ctx"]), 5),
        ("Hq/Hkv/D", lambda r: f"{r['Hq']}/{r['Hkv']}/{r['D']}", 9), ("ours µs", _f("us"), 8),
        ("sdpa µs", _f("us_sdpa"), 8), ("sdpa", lambda r: r["sdpa_variant"], 8), ("×sdpa", _f("x_sdpa", "{:.2f}"), 6),
        ("GB/s", _f("gbs", "{:.0f}"), 6), ("floor µs", _f("floor_us"), 9), ("%floor", _f("pct_floor", "{:.0f}"), 6),
        ("split", lambda r: str(r["split"]), 5),
    ],
    "act_quant": [
        ("variant", lambda r: r["variant"], 8), ("M", lambda r: str(r["M"]), 5), ("K", lambda r: str(r["K"]), 6),
        ("ours µs", _f("us"), 8), ("torch µs", _f("us_torch"), 9), ("×torch", _f("x_torch", "{:.1f}"), 7),
        ("GB/s", _f("gbs", "{:.0f}"), 6), ("%floor", _f("pct_floor", "{:.0f}"), 6),
    ],
}


def _fmt(rows, cols, header):
    lines = []
    if header:
        lines.append(" ".join(f"{n:>{w}}" for n, _, w in cols))
    for r in rows:
        lines.append(" ".join(f"{f(r):>{w}}" for _, f, w in cols))
    return "\n".join(lines)


def _format_w4a16(rows: list[dict], header: bool = True) -> str:
    cols = [
        ("K×N", lambda r: f"{r['K']}x{r['N']}", 11),
        ("M", lambda r: str(r["M"]), 5),
        ("ours µs", lambda r: f"{r['us']:.1f}", 8),
        ("noPDL µs", lambda r: f"{r['us_nopdl']:.1f}" if "us_nopdl" in r else "-", 9),
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
    rows = [r for r in rows if r.get("op", "w4a16") == "w4a16"]
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
        nopdl = [(key, [r[f"{key}_nopdl"] for r in rs if f"{key}_nopdl" in r]) for key, _ in targets]
        nopdl = [f"{key} {statistics.median(v):.2f}" for key, v in nopdl if v]
        if nopdl:
            parts.append("without PDL: " + ", ".join(nopdl))
        pf = statistics.median(r["pct_floor"] for r in rs)
        out.append(f"{name}: " + "; ".join(parts) + f"; median {pf:.0f}% of floor")
    return "\n".join(out)


def summarize_issue7(rows: list[dict]) -> str:
    """Median ratios per M bucket vs the issue-7 targets (W8A8, W4A8, KV4 attention)."""
    out = []

    def med(vals):
        return statistics.median(vals) if vals else float("nan")

    def verdict(name, rs, key, tgt, extra=""):
        # judged on the paired ratio where every row has one (the ops timed in alternating rounds, so clock /
        # power drift between timing blocks stays out of it); else on the block-timed one
        v = [r[key] for r in rs]
        vp = [r[f"{key}_paired"] for r in rs if r.get(f"{key}_paired") is not None]
        judged = vp if len(vp) == len(v) else v
        # a bucket's median can sit between its M values (e.g. all M = 1024 rows short, all M = 4096 above):
        # the per-M medians of the judged ratio show that
        ms = sorted({r["M"] for r in rs})
        by_m = "; by M: " + ", ".join(
            f"{m} {med([x for r, x in zip(rs, judged) if r['M'] == m]):.2f}" for m in ms) if len(ms) > 1 else ""
        out.append(f"{name}: median {med(v):.2f} min {min(v):.2f}"
                   + (f"; paired median {med(vp):.2f} min {min(vp):.2f}" if vp else "")
                   + f" (target >= {tgt}{' on paired' if judged is vp else ''}: "
                   f"{'MET' if med(judged) >= tgt else 'short'}){by_m}" + extra)

    w8 = [r for r in rows if r.get("op") == "w8a8"]
    for name, sel, key, tgt in (("W8A8 M>=256 ×_int_mm", lambda m: m >= 256, "x_int_mm", 0.9),
                                ("W8A8 M>=1024 ×fp16", lambda m: m >= 1024, "x_fp16", 1.6)):
        rs = [r for r in w8 if sel(r["M"]) and r.get(key) is not None]
        if rs:
            verdict(name, rs, key, tgt)
    w4 = [r for r in rows if r.get("op") == "w4a8"]
    for var in sorted({r["variant"] for r in w4}):
        for name, sel, tgt in (("M<=16", lambda m: m <= 16, 1.8), ("M>=1024", lambda m: m >= 1024, 0.8)):
            rs = [r for r in w4 if r["variant"] == var and sel(r["M"])]
            if rs:
                vn = [r["x_w8a8_nopdl"] for r in rs if "x_w8a8_nopdl" in r]
                verdict(f"W4A8 {var} {name} ×w8a8", rs, "x_w8a8", tgt,
                        f"; both without PDL: median {med(vn):.2f}" if vn else "")
    kv = [r for r in rows if r.get("op") == "kv4attn"]
    if kv:
        v = [r["x_sdpa"] for r in kv]
        out.append(f"KV4 attention ×SDPA: median {med(v):.2f} min {min(v):.2f} (target >= 2.5: "
                   f"{'MET' if med(v) >= 2.5 else 'short'})")
    return "\n".join(out)
