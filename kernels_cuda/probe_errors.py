#!/usr/bin/env python3
"""Probe: does a C++ TORCH_CHECK failure inside the op raise cleanly? (run each case in a subprocess)"""
import subprocess
import sys

CASES = {
    "shape": "torch.ops.qtool_cuda.w4a16_gemm(x[:, :4064], t['qweight'], t['scales'], t['qzeros'], 128)",
    "launch": "torch.ops.qtool_cuda.w4a16_gemm_cfg(x, t['qweight'], t['scales'], t['qzeros'], 128, 0, 99)",
}
PRE = (
    "import sys, torch; sys.path.insert(0, '.'); from kernels_cuda import ops; ops.load();"
    "from kernels_cuda.reference import random_problem; x, q, z, s, t = random_problem(3, 4096, 4096, 128);"
)
for name, stmt in CASES.items():
    code = PRE + f"\ntry:\n    {stmt}\n    print('no error')\nexcept RuntimeError as e:\n    print('raised', str(e).splitlines()[0][:100])\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    print(f"[probe] {name}: rc={r.returncode} {r.stdout.strip()[-160:]} {r.stderr.strip()[-200:] if r.returncode else ''}")
