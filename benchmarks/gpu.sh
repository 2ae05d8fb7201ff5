#!/usr/bin/env bash
# The GPU benchmarks in one go: matmul peaks (fp32, fp32 with TF32, bf16), the training step of phase1 and tiny at
# batch 32 with the spec's precision (tokens/s, MFU against the peaks measured in the same process,
# torch.cuda.max_memory_allocated), and peak memory at batch 32 x 512, one process per spec.
#
#     benchmarks/gpu.sh [RESULTS_DIR]        # default benchmarks/results; writes *_cuda.json there
#
# Needs python3 with a CUDA build of torch and forge's dependencies (pydantic, tomlkit, ...); forge itself is
# imported from this checkout (PYTHONPATH). A few minutes on an H100. PYTHON=... picks another interpreter.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/benchmarks/results}" && cd "${1:-$ROOT/benchmarks/results}" && pwd)"
PYTHON="${PYTHON:-python3}"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export FORGE_BENCH_RESULTS="$OUT"

"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu.sh: torch sees no CUDA device")'
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))'

run() {
    echo "== $*"
    local start=$SECONDS
    "$PYTHON" "$@"
    echo "== $1: $((SECONDS - start)) s"
}
run benchmarks/bench_roofline.py --device cuda --threads "$(nproc)"
run benchmarks/bench_train_step.py --device cuda --batch 32 --rounds 5 --threads "$(nproc)"
run benchmarks/bench_memory.py --device cuda --batch 32 --threads "$(nproc)"
run benchmarks/bench_memory_levers.py --batch 32 --rounds 5 --threads "$(nproc)"
echo "results in $OUT"
