# Sourced by the kernels_cuda/check_*_device.sh scripts (GPU machine, repository root): the environment, the wheels
# the device lacks (omegaconf, antlr4, gguf, expected in .whl/), the GPU's name / clock / power limit, then the
# extension build with its time. Leaves OUT (default .out) created, and defines i8_bench.
export QTOOL_HOME=${QTOOL_HOME:-/tmp/qm} PYTHONUNBUFFERED=1
OUT=${OUT:-.out}
mkdir -p "$OUT"
pip install -q --no-deps .whl/*.whl 2>&1 | grep -v "root user" | tail -1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
t0=$(date +%s)
MAX_JOBS=${MAX_JOBS:-16} python3 -c "from kernels_cuda import ops; ops.load(verbose=False)" 2>&1 | tail -3
echo "build $(( $(date +%s) - t0 )) s"

# The issue-7 int8 bench (W8A8 / W4A8) with the current defaults into $OUT/${1:-bench}, its target lines last; BENCH=0
# skips it
i8_bench() {
  [ "${BENCH:-1}" = 0 ] && return 0
  timeout 200 python3 kernels_cuda/check_issue7.py --no-check --no-sweep \
    --ms 1,16,256,1024,4096 --bench-ops w8a8,w4a8 --kv4-variants "" --out "$OUT/${1:-bench}" 2>&1 | tail -9
}
