#!/usr/bin/env bash
# The GPU check in one script. On a GPU machine (no network needed), from the repository root,
# within GEOMOE_GPU_BUDGET seconds (default 420):
#   builds the CUDA extension for this card only, runs a short `geomoe pretrain --cuda-graphs` beside
#   the eager one (step times, loss agreement: cuda_graphs.json), the benchmarks (headline figures
#   first; what would start after the budget is skipped, and the results written anyway), a profile of where
#   the time goes, `info --verify` (every kernel backend against the reference), the GPU tests and
#   tests/ops on the GPU's backends (all of them, not stopping at the first failure),
#   compute-sanitizer on a short set, then the rest of the suite with the time left.
#   GEOMOE_GPU_STEPS names a subset of those steps;
#   everything goes to $GEOMOE_GPU_OUT (default gpu-out/): results JSON + markdown + plots, logs,
#   junit XML; when $OUT is set (a second folder meant to hold only a few files), a tarball of it
#   plus the log and the results JSON and markdown are copied there at exit, also when a step fails
#   or the script is stopped.
# Without network, a Python that lacks pybind11 (header-only, pure Python) builds with a copy found
# under .venv/lib/python*/site-packages/pybind11, if the tree was copied with one.
# Rehearse on a CPU machine with GEOMOE_REHEARSE=1 (and GEOMOE_BENCH=smoke for speed).
set -uo pipefail
cd "$(dirname "$0")/.."
RETURN_DIR=${OUT:-}
OUT=${GEOMOE_GPU_OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
pack() {  # $OUT gets few files: one tarball of everything, plus the headline files
  [ -n "$RETURN_DIR" ] && [ "$RETURN_DIR" != "$OUT" ] || return 0
  tar -czf "$RETURN_DIR/gpu_check.tgz" -C "$OUT" . 2> /dev/null
  cp "$OUT/gpu_check.log" "$RETURN_DIR/" 2> /dev/null
  cp "$OUT"/results/*.json "$OUT"/results/*.md "$RETURN_DIR/" 2> /dev/null
  cp "$OUT/cuda_graphs.json" "$RETURN_DIR/" 2> /dev/null
  return 0
}
trap pack EXIT
trap 'exit 143' TERM INT
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"  # no install step: nothing to download
export PYTHONUNBUFFERED=1
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}  # autotune once per shape, not once per process
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${GEOMOE_GPU_BUDGET:-420}
left() { echo $(( START + BUDGET - $(date +%s) )); }
STEPS=${GEOMOE_GPU_STEPS:-info,build,graphs,benchmarks,profile,verify,gpu_tests,sanitizer,other_tests}  # a subset for a short run
want() { [[ ",$STEPS," == *",$1,"* ]]; }
status=0
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }
step() {  # step NAME SECONDS CMD...: run with a time limit (capped by the budget left), log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  want "${name%%_*}" || want "$name" || return 0
  [ "$limit" -le "$(left)" ] || limit=$(left)
  if [ "$limit" -lt 10 ]; then log "$name skipped: the budget is spent"; return; fi
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
if compgen -G "csrc/*.cu" > /dev/null; then
  if ! $PY -c "import pybind11" 2> /dev/null; then
    carried=$(ls -d .venv/lib/python*/site-packages/pybind11 2> /dev/null | head -n 1)
    if [ -n "$carried" ]; then
      PYB=$(mktemp -d) && cp -r "$carried" "$PYB/" && export PYTHONPATH="$PYTHONPATH:$PYB"
      log "pybind11: using the copy $carried"
    else
      log "pybind11 missing and no copy found: the CUDA core will not build"
    fi
  fi
  if [ -z "${GEOMOE_CUDA_ARCHS:-}" ]; then  # this card's architecture only: half the build time
    GEOMOE_CUDA_ARCHS=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}' + ('a' if c[0] == 9 else ''))" 2>/dev/null) \
      && export GEOMOE_CUDA_ARCHS
  fi
  step build 180 $PY setup.py build_ext --inplace
  cp geomoe_kernels/_cuda_build.txt "$OUT/" 2>/dev/null || true
else
  log "build: no CUDA sources in csrc/ yet"
fi
# `geomoe pretrain --cuda-graphs` beside the same eager run (tiny preset, embedded scenes): step
# times and the loss agreement into $OUT/cuda_graphs.json
step graphs 120 $PY -m benchmarks.cuda_graphs_check --out "$OUT/cuda_graphs.json" ${GEOMOE_GRAPHS_ARGS:-}
# benchmarks: stop starting new ones 100 s before the budget ends (results, tables and plots still
# get written; the steps after them get the rest: GEOMOE_BENCH_RESERVE seconds)
quick=()  # GEOMOE_QUICK_CHECKS=1: verify and test with one Triton config per kernel (no autotuning)
[ "${GEOMOE_QUICK_CHECKS:-0}" = 1 ] && quick=(env GEOMOE_TRITON_AUTOTUNE=0)
bench_k=()  # GEOMOE_BENCH_K: a pytest -k expression, to run a subset of the benchmarks
[ -n "${GEOMOE_BENCH_K:-}" ] && bench_k=(-k "$GEOMOE_BENCH_K")
want benchmarks && step benchmarks 400 $PY -m benchmarks.run --out "$OUT/results" "${bench_k[@]}" --budget $(( $(left) - ${GEOMOE_BENCH_RESERVE:-100} ))
# the grouped GEMM again on the pointer-load kernel (GEOMOE_TRITON_GEMM, read at import), to compare
# with the persistent TMA kernel that the run above took on sm_90+ (a full run on such a card only)
if [ -z "${GEOMOE_BENCH_K:-}" ] && [[ "${GEOMOE_CUDA_ARCHS:-}" != 8* ]]; then
  step benchmarks_pointer 90 env GEOMOE_TRITON_GEMM=pointer $PY -m benchmarks.run --out "$OUT/results-pointer" \
    --no-plots --budget 60 -k "grouped_gemm_up_projection and geomoe and not cuda"
fi
cp "$OUT"/results/*.md "$OUT/" 2>/dev/null || true
step profile 60 $PY -m benchmarks.profile_gpu ${GEOMOE_PROFILE_ARGS:-}
step verify 120 "${quick[@]}" $PY -m geomoe_kernels.info --verify
per_test=()  # a hung kernel fails its test instead of eating the budget (where pytest-timeout is installed)
$PY -c "import pytest_timeout" 2> /dev/null && per_test=(--timeout=120)
parallel=()  # the first run of each Triton kernel compiles every autotune config: 8 processes share that
$PY -c "import xdist" 2> /dev/null && parallel=(-n 8)
export GEOMOE_FAILURE_LOG="$OUT/failures.log"  # each failure's traceback as it happens
select=()  # GEOMOE_GPU_TESTS_K: a pytest -k expression, to rerun a subset
[ -n "${GEOMOE_GPU_TESTS_K:-}" ] && select=(-k "$GEOMOE_GPU_TESTS_K")
step gpu_tests ${GEOMOE_GPU_TESTS_LIMIT:-160} "${quick[@]}" $PY -m pytest -q -rfE "${parallel[@]}" "${per_test[@]}" "${select[@]}" tests/test_gpu.py tests/ops --junitxml="$OUT/gpu_tests.xml" -p no:cacheprovider
# compute-sanitizer on a short set of CUDA-core launches (each tool on one small test)
if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck synccheck; do
    step "sanitizer_$tool" 60 compute-sanitizer --tool "$tool" --error-exitcode 3 \
      $PY -m pytest -q "${per_test[@]}" tests/test_gpu.py -p no:cacheprovider \
      -k "(test_cuda_core_ops_match_the_reference and dtype0) or (test_cuda_grouped_gemm_matches_the_reference and gelu and True and dtype1)"
  done
else
  log "compute-sanitizer not found: sanitizer steps skipped"
fi
step other_tests 300 $PY -m pytest -q -x tests --ignore=tests/test_gpu.py --ignore=tests/ops --junitxml="$OUT/all_tests.xml" -p no:cacheprovider
log "done, status $status; results in $OUT/results"
exit $status
