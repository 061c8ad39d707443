#!/usr/bin/env bash
# The benchmark in one command: installs what it needs (the Python extras into .venv, Debian's wrk
# when it is missing and this runs as root), then runs bench/run.py; arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_venv requirements-bench.txt
if ! command -v wrk >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq wrk >/dev/null
  else
    echo "wrk is needed: sudo apt-get install wrk" >&2
    exit 1
  fi
fi
exec .venv/bin/python -m bench.run "$@"
