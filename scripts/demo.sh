#!/usr/bin/env bash
# The main job: the label-efficiency experiment on generated demo data (sets up .venv first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m ddep.demo --output=out/demo "$@"
