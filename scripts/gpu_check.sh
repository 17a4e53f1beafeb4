#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py says what it checks), one command, no network: the committed t5_multi30k
# testbed and the tiny pairs, wheels the machine lacks from .whl/ (docs/gpu.md). Log and CSV in $OUT (the device
# tool's folder) or gpu_check/. The last line reads `gpu-check: N passed, M failed`.
#   bash scripts/gpu_check.sh                          # on a GPU: 32 sentences, under 8 minutes on one H200
#   GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh     # its rehearsal on a CPU, under 10 minutes
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
OUT_DIR="${OUT:-gpu_check}"
SENTENCES="${GPU_CHECK_SENTENCES:-32}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # packages the GPU machine lacks (docs/gpu.md)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
mkdir -p "$OUT_DIR"
"$PY" scripts/gpu_check.py --device "$DEVICE" --sentences "$SENTENCES" --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/gpu_check.log"
