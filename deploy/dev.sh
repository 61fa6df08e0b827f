#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (torch pinned first, CPU wheel),
# installs pdserve with its test extras, then runs what was asked.
#   bash deploy/dev.sh demo    # the main job: generate with a locally made tiny model
#   bash deploy/dev.sh test    # the test suite
#   bash deploy/dev.sh setup   # only the environment
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="${PDSERVE_VENV:-$ROOT/.venv}"
TORCH_VERSION="${PDSERVE_TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.pdserve-installed"
  local want
  want="$TORCH_VERSION $(sha1sum pyproject.toml | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: an unpinned resolve on a machine without it pulls CUDA wheels.
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
}

cmd="${1:-demo}"
shift || true
case "$cmd" in
  setup) setup ;;
  demo)
    setup
    exec "$VENV/bin/pdserve" demo "$@"
    ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  *) echo "usage: deploy/dev.sh [setup|demo|test] [args...]" >&2; exit 2 ;;
esac
