#!/usr/bin/env bash
# The performance issue's measurements on one GPU, in one call, with a table at the end.
#
#   bash scripts/gpu_benchmark.sh [OUTPUT_DIR]
#
# Needs only JAX with CUDA, flax, optax and absl (no TensorFlow: synthetic batches),
# and about 8 minutes on an H100/H200, most of it compiling. Rows are appended to
# OUTPUT_DIR/bench.jsonl (default: $OUT where the device tool sets it, else
# out/gpu_benchmark); paste the table into docs/performance.md with the device name.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

out="${1:-${OUT:-out/gpu_benchmark}}"
mkdir -p "$out"
rows="$out/bench.jsonl"

run() {
  echo "== benchmark $*"
  timeout "${PHASE_TIMEOUT:-400}" python3 -m ddep.tools.benchmark --output "$rows" "$@" \
    || echo "== FAILED ($?): $*"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true
python3 -c 'import jax, flax, optax; print("jax", jax.__version__, jax.devices())'

# 1. The paper's setting at a batch that fits without remat: DeP, DDeP and the
#    Cityscapes eval step at 1024x2048 (attention: per backend, i.e. cuDNN).
run --task denoise,ddep --batch_size 16 --eval_size 1024x2048 --steps 20 --trials 3
# 2. XLA's attention instead of cuDNN's, for the difference.
run --task denoise --batch_size 16 --eval_size 0 --attention_impl xla --steps 20 --trials 3
# 3. The largest per-device batch that fits, accumulated to the global batch of 128.
#    Deviceless H100 compilation puts DeP at 35.5 GB for 32 (docs/performance.md).
run --task denoise,ddep --batch_size 32 --max_batch 128 --find_max_batch --eval_size 0 \
  --steps 10 --trials 3

python3 - "$rows" <<'EOF'
import json, sys
from ddep.tools import benchmark
with open(sys.argv[1]) as f:
  print(benchmark.format_rows([json.loads(line) for line in f if line.strip()]))
EOF
