#!/usr/bin/env bash
# Set up (./scripts/setup.sh), run the static checks (ruff lint + format, import-linter's layer
# contracts, mypy) and the whole test suite, slow end-to-end tests included.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow" -x`; EVOMERGE_SKIP_STATIC=1 skips
# the static checks (for a quick local rerun; CI never sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_AUTH_MODE=disabled
if [ "${EVOMERGE_SKIP_STATIC:-0}" != 1 ]; then
  echo "static checks: ruff, import-linter, mypy" >&2
  .venv/bin/ruff check evomerge tests scripts
  .venv/bin/ruff format --check evomerge tests scripts
  .venv/bin/lint-imports
  .venv/bin/mypy
fi
exec .venv/bin/python -m pytest -q "$@"
