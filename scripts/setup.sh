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
# Chromium for the browser test of the MLflow leaderboard (tests/test_ui_browser.py): Debian's package,
# driven by playwright (test extra) at /usr/bin/chromium. Where it cannot be installed the test says so.
if ! command -v chromium >/dev/null 2>&1; then
  apt=""
  if [ "$(id -u)" = 0 ]; then apt="apt-get"; elif sudo -n true 2>/dev/null; then apt="sudo -n apt-get"; fi
  if [ -n "$apt" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium (Debian package) for the browser test" >&2
    $apt install -y -q chromium >/dev/null 2>&1 || { $apt update -q >/dev/null 2>&1 && $apt install -y -q chromium >/dev/null 2>&1; } \
      || echo "setup: could not install chromium; the browser test will be skipped" >&2
  else
    echo "setup: no chromium and no way to install it (needs root or sudo with apt-get); the browser test will be skipped" >&2
  fi
fi
