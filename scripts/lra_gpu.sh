#!/usr/bin/env bash
# The Long Range Arena device run (issue 17) as one command: see docs/lra-gpu.md and scripts/lra_gpu.py.
#
#   scripts/lra_gpu.sh                          # on a lent GPU: 8 minutes of work; results in lra-gpu/, bundle in $OUT
#   scripts/lra_gpu.sh --device cpu --tiny      # the CPU rehearsal of the same phases at tiny sizes
#   scripts/lra_gpu.sh --plan-only              # the phases, their budgets and commands; runs nothing
#
# Runs from the repository root with its sources first on the path (no install needed): the interpreter
# is $PYTHON, else .venv/bin/python when there is one, else python3 (on the device image: the one with torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
exec "$PY" scripts/lra_gpu.py "$@"
