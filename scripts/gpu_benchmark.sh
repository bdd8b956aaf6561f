#!/usr/bin/env bash
# The performance issue's measurements on one GPU, in one call, with a table at the end.
#
#   bash scripts/gpu_benchmark.sh [OUTPUT_DIR]      (PYTHON=... to choose the interpreter)
#
# Needs only JAX with CUDA, flax, optax and absl (no TensorFlow: synthetic batches).
# Rows are appended to OUTPUT_DIR/bench.jsonl (default: $OUT where the device tool sets
# it, else out/gpu_benchmark) as each phase ends; paste the table into
# docs/performance.md with the device name.
#
# The whole run keeps within BUDGET_S seconds (default 450: the device tool allows 600 a
# call). Each phase has its own share and gets at most what is left, so a cut run still
# leaves the rows of the phases before it, and the table. A compile of the paper's step
# takes ~85 s on an H200, so the phases share compiled programs through JAX's persistent
# cache (the profile re-uses the DeP step's) and each phase runs in one process.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

out="${1:-${OUT:-out/gpu_benchmark}}"
mkdir -p "$out"
rows="$out/bench.jsonl"
python="${PYTHON:-python3}"
budget="${BUDGET_S:-450}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$out/jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0

# phase SHARE_S MIN_S MODULE ARGS...: runs MODULE for at most SHARE_S seconds and what
# is left of the budget, and not at all when under MIN_S is left.
phase() {
  local share="$1" min="$2" module="$3"
  shift 3
  local left=$((budget - SECONDS))
  local limit=$((share < left ? share : left))
  if ((limit < min)); then
    echo "== SKIPPED (${left}s of the ${budget}s budget left): $module $*"
    return
  fi
  echo "== $module $* (${limit}s at most; ${SECONDS}s elapsed)"
  timeout "$limit" "$python" -m "$module" "$@" || echo "== FAILED or CUT ($?): $module $*"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true
"$python" -c 'import jax, flax, optax; print("jax", jax.__version__, jax.devices())' || exit 1

paper=(--batch_size 16 --image_size 512 --eval_size 0 --steps 10 --trials 3)
# In order of importance (issue 24):
# 1. The paper's setting at batch 16: DeP, then DDeP (attention per backend: cuDNN).
phase 150 100 ddep.tools.benchmark --output "$rows" --task denoise "${paper[@]}"
phase 130 90 ddep.tools.benchmark --output "$rows" --task ddep "${paper[@]}"
# 2. Where the DeP step's time goes, per op and model part (its compile is a cache hit).
phase 60 30 ddep.tools.profile_step --output "$out/profile.jsonl" --task denoise \
  --batch_size 16 --image_size 512 --eval_size 0 --profile_steps 3
# 3. The Cityscapes eval step at 1024x2048 (the --task phase is not timed with it).
phase 90 60 ddep.tools.benchmark --output "$rows" --task denoise --batch_size 16 \
  --eval_size 1024x2048 --only_phase eval --steps 10 --trials 3
# 4. DeP at the largest per-device batch, accumulated to the global batch of 128
#    (deviceless H100 compilation finds 64, docs/performance.md; an H200 may take 128).
phase 200 120 ddep.tools.benchmark --output "$rows" --task denoise --batch_size 64 \
  --max_batch 128 --find_max_batch --eval_size 0 --steps 5 --trials 2

echo "== ${SECONDS}s in all"
[ -s "$rows" ] || { echo "no results in $rows"; exit 1; }
"$python" - "$rows" <<'EOF'
import json, sys
from ddep.tools import benchmark
with open(sys.argv[1]) as f:
  print(benchmark.format_rows([json.loads(line) for line in f if line.strip()]))
EOF
