#!/usr/bin/env bash
# The one prepared device script. On a fresh GPU machine with no network (Python 3.12, torch 2.11,
# Triton 3.6, nvcc 13.0), from the repository root, in at most 8 minutes:
#   builds the CUDA extension, runs the GPU tests and the whole suite, runs the benchmarks,
#   and writes everything to $OUT: results JSON + markdown + plots, logs, junit XML.
# Rehearse on a CPU machine with GEOMOE_REHEARSE=1 (and GEOMOE_BENCH=smoke for speed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"  # no install step: nothing to download
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, remember failures
  local name=$1 limit=$2; shift 2
  log "$name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/gpu_check.log"
  [ $rc -eq 0 ] || { log "$name failed (rc $rc)"; status=1; }
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ "${GEOMOE_REHEARSE:-0}" != 1 ]; then log "no CUDA device visible to torch"; exit 2; fi
  log "rehearsal: no GPU, running every step on the CPU"
fi
step info 60 $PY -m geomoe_kernels.info
if ls csrc/*.cu csrc/**/*.cu > /dev/null 2>&1; then
  step build 240 $PY setup.py build_ext --inplace
  cp geomoe_kernels/_cuda_build.txt "$OUT/" 2>/dev/null || true
else
  log "build: no CUDA sources in csrc/ yet"
fi
step gpu_tests 150 $PY -m pytest -q -x tests/test_gpu.py --junitxml="$OUT/gpu_tests.xml"
step all_tests 200 $PY -m pytest -q tests --junitxml="$OUT/all_tests.xml" -p no:cacheprovider
step benchmarks 270 $PY -m benchmarks.run --out "$OUT/results"
cp "$OUT"/results/*.md "$OUT/" 2>/dev/null || true
log "done, status $status; results in $OUT/results"
exit $status
