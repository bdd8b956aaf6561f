#!/usr/bin/env bash
# Runs the whole test suite (sets up .venv first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# One style (pyproject.toml): fails on drift before any test runs; `.venv/bin/pyink .` fixes it.
.venv/bin/pyink --check --quiet . || { echo "pyink: files above need formatting (.venv/bin/pyink .)" >&2; exit 1; }
# Two workers, one test file each at a time (module fixtures are built once).
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile tests "$@"
