#!/usr/bin/env bash
# Creates or updates ./.venv with ddep and its test extras. Safe to re-run:
# it reinstalls only when setup.py changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.ddep-setup-stamp
want=$(sha256sum setup.py | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # uv installs the same pinned set as pip in a fraction of the time (a fresh clone here:
  # 15 s against 49 s, most of it TensorFlow and jaxlib); pip is the fallback where uv
  # cannot be had. --compile-bytecode because uv, unlike pip, leaves the .pyc files to
  # the first import, and where PYTHONDONTWRITEBYTECODE is set (as on our CI machines)
  # every process then recompiles TensorFlow's sources: `import tensorflow` took 10.3 s
  # here without them and 4.6 s with them.
  if .venv/bin/python -m pip install -q 'uv>=0.5' 2>/dev/null \
    && .venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python -e '.[test]'; then
    :
  else
    echo "setup_env: uv unavailable or failed; installing with pip" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
  fi
  echo "$want" > "$stamp"
fi
