#!/usr/bin/env bash
# End-to-end CUDA check on a GPU machine with no network: quantize SmolLM2 with the three packed
# recipes on the GPU, then compare `--backend cuda` with `--backend reference` perplexity on each
# checkpoint (kernels_cuda/e2e_ppl.sh; fp16 activations on the GPU for both, only the ops differ).
#
#   bash kernels_cuda/e2e_device.sh GGUF CORPUS_DIR [MAX_WINDOWS]
#
# GGUF is SmolLM2-135M-Instruct.Q4_1.gguf and CORPUS_DIR the `corpus/` folder of a machine where
# `qtool assets fetch` ran (both are placed into $QTOOL_HOME, so `assets fetch` only converts).
# Needs omegaconf and gguf importable (carry them as wheels). Results: $OUT/<recipe>/.
# RECIPES (space-separated recipe names) limits the run, e.g. RECIPES=awq-w4a16-quick for W4A16 only.
set -euo pipefail
gguf=$1; corpus=$2; mw=${3:-}
out=${OUT:-/tmp/e2e}
export QTOOL_HOME=${QTOOL_HOME:-/tmp/qtool-home} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$QTOOL_HOME/models" "$out"
cp "$gguf" "$QTOOL_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf"
rm -rf "$QTOOL_HOME/corpus" && cp -r "$corpus" "$QTOOL_HOME/corpus"
python3 -m qtool.cli assets fetch -q
for r in ${RECIPES:-awq-w4a16-quick smoothquant-w8a8 qoq-w4a8kv4-g128}; do
    ck=/tmp/e2e-ckpt/$r
    t0=$(date +%s)
    python3 -m qtool.cli quantize -c "recipes/$r.yaml" output.fp_dtype=float16 -o "$ck" --overwrite --json -q \
        > "$out/$r.quantize.json"
    echo "$r: quantized on the GPU in $(( $(date +%s) - t0 )) s"
    OUT="$out/$r" bash kernels_cuda/e2e_ppl.sh "$ck" bundled $mw
done
