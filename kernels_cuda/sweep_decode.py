#!/usr/bin/env python3
"""W4A16 sweep, configs × split-K × programmatic-dependent-launch mode, in one GPU call, with the fp16
cuBLAS time of each problem beside it. Made for decode sizes (M <= 16, the default configs); any M and
config with --ms / --cfgs.

    PYTHONUNBUFFERED=1 python kernels_cuda/sweep_decode.py [--cfgs 2,19,23] [--pdl 0,1,2] [--out DIR]

PDL modes (env QTOOL_W4A16_PDL, read per call by the launcher): 0 off; 1 launch early, wait for the
predecessor before any global load; 2 as 1 but prefetch the first weights before the wait. Each
mode is also checked against the reference (fresh random problem, output poisoned) before timing.
Prints one line per (shape, M): the best (cfg, split) per mode and its ratio to fp16; JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels_cuda import ops  # noqa: E402
from kernels_cuda.reference import random_problem, reference, rel_err  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x4096,4096x12288,4096x22016,11008x4096,14336x4096")
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--cfgs", default="", help="config ids (default: every gdec / tdec config)")
    ap.add_argument("--splits", default="1,2,3,6,8")
    ap.add_argument("--pdl", default="0,1,2")
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / ".out")))
    args = ap.parse_args()
    from qtool.bench import _copies, make_w4a16_weights, time_rotating, w4a16_bytes

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    ops.load(verbose=False)
    n_cfg = ops.config_info(0)["num_configs"]
    cfgs = ([int(v) for v in args.cfgs.split(",")] if args.cfgs else
            [c for c in range(n_cfg) if ops.config_info(c)["kind"] in ("gdec", "tdec")])
    splits = [int(v) for v in args.splits.split(",")]
    modes = args.pdl.split(",")
    g = 128
    gen = torch.Generator(device="cuda").manual_seed(99)
    for mode in modes:  # correctness under each launch mode, every candidate config
        os.environ["QTOOL_W4A16_PDL"] = mode
        worst = 0.0
        for M, N, K in ((1, 4096, 4096), (16, 640, 1536), (5, 12288, 4096), (64, 4096, 4096), (100, 1536, 2048)):
            x, q, z, s, t = random_problem(M, N, K, g, gen=gen)
            ref = reference(x, q, z, s, g)
            for c in cfgs:
                if not ops.config_fits(c, N, K, g, 1, M=M):
                    continue
                out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.float16)
                ops.w4a16_gemm_cfg_out(x, t["qweight"], t["scales"], t["qzeros"], g, c, 0, out)
                worst = max(worst, rel_err(out, ref))
        print(f"[check] pdl={mode}: worst rel err {worst:.3g} ({'ok' if worst <= 1e-3 else 'FAIL'})", flush=True)
    rows = []
    for K, N in shapes:
        wq = make_w4a16_weights(K, N, g, _copies(w4a16_bytes(0, K, N, g), 256 << 20))
        ws = [torch.randn(N, K, device="cuda", dtype=torch.float16)
              for _ in range(_copies(2 * K * N, 256 << 20, cap=8))]
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            fp16 = time_rotating([lambda w=w: F.linear(x, w) for w in ws], target_s=0.03, max_reps=50)
            line = f"{K}x{N} M={M:<2d} fp16 {fp16:6.1f}us"
            for mode in modes:
                os.environ["QTOOL_W4A16_PDL"] = mode
                res = []
                for c in cfgs:
                    for s in splits:
                        if not ops.config_fits(c, N, K, g, s, M=M):
                            continue
                        try:
                            us = time_rotating(
                                [lambda t=t, c=c, s=s: ops.w4a16_gemm_cfg(x, t["qweight"], t["scales"], t["qzeros"],
                                                                          g, c, s) for t in wq],
                                target_s=0.03, max_reps=50)
                        except RuntimeError:
                            continue
                        res.append((us, c, s))
                res.sort()
                us, c, s = res[0]
                auto = ops.choose(M, N, K, g)
                auto_us = next((u for u, cc, ss in res if (cc, ss) == auto), float("nan"))
                line += f" | pdl{mode} best c{c}/s{s} {us:5.1f} x{fp16 / us:4.2f} auto {auto_us:5.1f}"
                rows.append(dict(K=K, N=N, M=M, pdl=mode, fp16_us=fp16,
                                 results=[dict(us=u, cfg=cc, split=ss) for u, cc, ss in res]))
            print(line, flush=True)
        del wq, ws
        torch.cuda.empty_cache()
    os.environ.pop("QTOOL_W4A16_PDL", None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_decode.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
