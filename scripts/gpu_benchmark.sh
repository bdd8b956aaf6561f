#!/usr/bin/env bash
# The performance issue's measurements on one GPU, in one call, with a table at the end.
#
#   bash scripts/gpu_benchmark.sh [OUTPUT_DIR]      (PYTHON=... to choose the interpreter)
#
# Needs only JAX with CUDA, flax, optax and absl (no TensorFlow: synthetic batches),
# and about 6 minutes on an H100/H200, most of it compiling. Rows are appended to
# OUTPUT_DIR/bench.jsonl (default: $OUT where the device tool sets it, else
# out/gpu_benchmark); paste the table into docs/performance.md with the device name.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

out="${1:-${OUT:-out/gpu_benchmark}}"
mkdir -p "$out"
rows="$out/bench.jsonl"
python="${PYTHON:-python3}"

run() {
  echo "== benchmark $*"
  timeout "${PHASE_TIMEOUT:-400}" "$python" -m ddep.tools.benchmark --output "$rows" "$@" \
    || echo "== FAILED ($?): $*"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true
"$python" -c 'import jax, flax, optax; print("jax", jax.__version__, jax.devices())' || exit 1

# In order of importance: the device tool allows 10 minutes a call.
# 1. The paper's setting at a batch that fits without remat: DeP, DDeP and the
#    Cityscapes eval step at 1024x2048 (attention: per backend, i.e. cuDNN).
run --task denoise,ddep --batch_size 16 --eval_size 1024x2048 --steps 20 --trials 3
# 2. DeP at the largest per-device batch, accumulated to the global batch of 128.
#    Deviceless H100 compilation finds 64 (docs/performance.md); an H200 may take 128.
run --task denoise --batch_size 64 --max_batch 128 --find_max_batch --eval_size 0 \
  --steps 10 --trials 3
# 3. XLA's attention instead of cuDNN's, for the difference.
run --task denoise --batch_size 16 --eval_size 0 --attention_impl xla --steps 20 --trials 3

[ -s "$rows" ] || { echo "no results in $rows"; exit 1; }
"$python" - "$rows" <<'EOF'
import json, sys
from ddep.tools import benchmark
with open(sys.argv[1]) as f:
  print(benchmark.format_rows([json.loads(line) for line in f if line.strip()]))
EOF
