#!/usr/bin/env bash
# End-to-end check for the CUDA backend: perplexity of a packed checkpoint through the CUDA
# kernels vs the PyTorch reference ops, both on the GPU in fp16 (only the GEMMs differ).
#
#   bash kernels_cuda/e2e_ppl.sh CKPT_DIR TEXT_FILE [MAX_WINDOWS]
#
# A packed SmolLM2 checkpoint with fp16 embeddings (`qtool convert CKPT --to quick-w4a16
# --fp-dtype float16 -o CKPT16`) is ~122 MB, larger than one device-tool transfer (64 MiB):
# split it (`split -b 60M model.safetensors part_`), send the parts in consecutive calls while the
# machine stays warm, and `cat part_* > model.safetensors` there before running this script.
set -euo pipefail
ckpt=$1; text=$2; mw=${3:-}
extra=(); [ -n "$mw" ] && extra=(--max-windows "$mw")
out=${OUT:-/tmp/e2e}; mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} QTOOL_HOME=${QTOOL_HOME:-/tmp/qtool-home}
python3 -m qtool.cli eval "$ckpt" --ppl "$text" --backend cuda --json -q "${extra[@]}" > "$out/cuda.json"
python3 -m qtool.cli eval "$ckpt" --ppl "$text" --backend reference --device cuda --json -q "${extra[@]}" > "$out/reference.json"
python3 - "$out" <<'PY'
import json, sys
d = sys.argv[1]
c = json.load(open(f"{d}/cuda.json")); r = json.load(open(f"{d}/reference.json"))
for name, pc in c["metrics"]["ppl"].items():
    pr = r["metrics"]["ppl"][name]
    rel = abs(pc - pr) / pr
    print(f"{name}: cuda {pc:.4f}  reference {pr:.4f}  rel diff {rel:.2e}  {'OK' if rel <= 1e-3 else 'FAIL'}")
PY
