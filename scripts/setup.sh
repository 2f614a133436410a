#!/usr/bin/env bash
# Create .venv and install fairtune into it (idempotent; re-installs when pyproject.toml changes).
# torch goes in first, pinned: a bare `torch` requirement resolved first pulls a multi-GB CUDA build,
# while torch==2.13.0 is a CPU wheel on the development machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${FAIRTUNE_TORCH:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.fairtune-installed"
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[test,colored-digits]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import fairtune.data, fairtune.eval, fairtune.models, fairtune.train, fairtune.cli, \
fairtune.colored_digits; assert fairtune.cli.plugins(), 'no fairtune.commands plugin registered'" \
  || { echo "setup: fairtune did not install" >&2; exit 1; }
echo "$want" > "$stamp"
