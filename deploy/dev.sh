#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (torch pinned first, CPU wheel), installs
# pdserve with its test extras at the locked versions (deploy/requirements.lock), then runs
# what was asked.
#   bash deploy/dev.sh demo            # the main job: a local cluster and a streamed generation
#   bash deploy/dev.sh test [ARGS]     # lint, then the test suite (ARGS go to pytest)
#   bash deploy/dev.sh test --latest   # the same in .venv-latest, on the newest releases (drift check)
#   bash deploy/dev.sh lock            # rewrite the lock from .venv-latest (after its suite passed)
#   bash deploy/dev.sh setup           # only the environment
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="${PDSERVE_VENV:-$ROOT/.venv}"
LATEST_VENV="${PDSERVE_LATEST_VENV:-$ROOT/.venv-latest}"
LOCK="$ROOT/deploy/requirements.lock"
TORCH_VERSION="${PDSERVE_TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python3}"
# The checkout's root must never be on sys.path: its folders are named kernels/, models/, ...
# and would shadow other libraries' packages (transformers imports Hugging Face's `kernels`).
export PYTHONSAFEPATH=1

# setup VENV locked|latest: create VENV and install pdserve (editable) with its test extras.
setup() {
  local venv="$1" mode="$2"
  if [ ! -x "$venv/bin/python" ]; then
    "$PY" -m venv "$venv"
  fi
  local stamp="$venv/.pdserve-installed" want
  want="$mode $TORCH_VERSION $(cat pyproject.toml "$LOCK" | sha1sum | cut -d' ' -f1)"
  if [ "$mode" = locked ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  "$venv/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: an unpinned resolve on a machine without it pulls CUDA wheels.
  "$venv/bin/python" -m pip install -q "torch==$TORCH_VERSION"
  if [ "$mode" = locked ]; then
    "$venv/bin/python" -m pip install -q -c "$LOCK" -e ".[test,nixl]"
  else
    local pin
    pin=$(mktemp)
    echo "torch==$TORCH_VERSION" > "$pin"
    "$venv/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -c "$pin" -e ".[test,nixl]"
    rm -f "$pin"
  fi
  echo "$want" > "$stamp"
}

run_tests() {
  local venv="$1"
  shift
  "$venv/bin/ruff" check .
  "$venv/bin/python" -m pytest -q "$@"
}

cmd="${1:-demo}"
shift || true
case "$cmd" in
  setup) setup "$VENV" locked ;;
  demo)
    setup "$VENV" locked
    exec "$VENV/bin/pdserve" demo "$@"
    ;;
  test)
    if [ "${1:-}" = "--latest" ]; then
      shift
      setup "$LATEST_VENV" latest
      "$LATEST_VENV/bin/python" -m pip list --format=freeze 2>/dev/null | grep -iE '^(transformers|torch|grpcio|protobuf|redis|opentelemetry-sdk|tokenizers|kernels)==' || true
      run_tests "$LATEST_VENV" "$@"
    else
      setup "$VENV" locked
      run_tests "$VENV" "$@"
    fi
    ;;
  lock)
    [ -x "$LATEST_VENV/bin/python" ] || { echo "run 'bash deploy/dev.sh test --latest' first" >&2; exit 2; }
    {
      echo "# Versions the suite last passed with: what deploy/dev.sh and .ci/run install (pip -c)."
      echo "# torch is not here: dev.sh installs torch==\$PDSERVE_TORCH_VERSION (default $TORCH_VERSION) first, CPU or CUDA build."
      echo "# Written by 'bash deploy/dev.sh lock' from .venv-latest after 'bash deploy/dev.sh test --latest' passed."
      "$LATEST_VENV/bin/python" -m pip list --format=freeze --exclude-editable 2>/dev/null \
        | grep -viE '^(pip|setuptools|wheel|pdserve|torch)==' | LC_ALL=C sort -f
    } > "$LOCK"
    echo "wrote $LOCK"
    ;;
  *) echo "usage: deploy/dev.sh [setup|demo|test [--latest]|lock] [args...]" >&2; exit 2 ;;
esac
