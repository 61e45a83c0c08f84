#!/usr/bin/env bash
# Create (or reuse) ./.venv and install evomerge into it, with the test extra.
# Idempotent: pip runs only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$python" -m venv .venv
fi
stamp=.venv/.evomerge-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing evomerge and its dependencies into .venv (first time: a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # torch is pinned (torch==2.13.0, CPU build) in pyproject.toml
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
