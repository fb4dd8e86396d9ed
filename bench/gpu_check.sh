#!/usr/bin/env bash
# The prepared GPU check (one H100, under 8 minutes, offline): CPU sanity tests, DSpark and Eagle3
# training throughput on a random Qwen3-4B-geometry target in bf16, lossless greedy check in fp32.
# Arguments go to bench/gpu_check.py (--device, --out FILE.json, --steps N, --skip-tests, --budget-s).
#   bench/gpu_check.sh --out gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# not installed: run from the checkout's sources
if ! "$PY" -c "import draftsmith" 2>/dev/null; then
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" bench/gpu_check.py "$@"
