#!/usr/bin/env bash
# Issue 8's GPU checks in one call on a lent GPU machine (H100/H200 image: Python 3.12, torch 2.11+cu130, nvcc 13.0,
# compute-sanitizer; nothing can be downloaded there). Prepare on this side first:
#
#   bash benchmarks/gpu/prepare.sh /work/.mirror/fundamentalvision+Deformable-DETR/repo   # after `fetch`ing it
#   device run: command="bash benchmarks/gpu/device_checks.sh", carry=[".whl", ".orig"], timeout_s=590
#
# Stages, most important first, each under its own time limit cut to what is left of HARD seconds (default 570,
# for a call with timeout_s=590), and none started past DEADLINE seconds (default 420):
#   build (sm_90 only) -> the CUDA-marked tests -> compute-sanitizer memcheck over benchmarks/gpu/sanitize_ops.py
#   -> MSDA and box-op benchmarks (the original kernel, built from .orig/ops in the background meanwhile, as the
#   baseline) -> racecheck -> the Deformable DETR training step (R50, box refinement, 2 x 800x1216, bf16 autocast
#   and fp32) vs transformers -> the rest of the test suite.
# At most 8 files come back from $OUT: summary.txt (the machine, then each stage's outcome; also printed as it
# goes), build.log, tests.log, sanitizer.log, bench.log, msda_<GPU>.json, box_ops_<GPU>_float32.json,
# train_step_<GPU>.json. Exit status 0 only when every stage passed.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/detrcore_gpu_checks}
DEADLINE=${DEADLINE:-420}
HARD=${HARD:-570}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PY:-python3}
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
summary="$OUT/summary.txt"
note() { echo "$*" | tee -a "$summary"; }
# stage NAME LIMIT_S LOG CMD...: runs CMD under `timeout`, appends to LOG, records the outcome in the summary.
stage() {
  local name=$1 limit=$2 log=$3; shift 3
  if [ "$(elapsed)" -ge "$DEADLINE" ]; then note "SKIPPED  $name (past the ${DEADLINE}s deadline)"; return 0; fi
  local left=$(( HARD - $(elapsed) )); [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name ($(elapsed)s)" | tee -a "$log"
  local s; s=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local word=ok; [ $rc -eq 124 ] && word="TIMEOUT(${limit}s)"; [ $rc -ne 0 ] && [ $rc -ne 124 ] && word="FAILED(rc=$rc)"
  note "$(printf '%-8s %s (%ss)' "$word" "$name" "$(( $(date +%s) - s ))")"
  return $rc
}

{
  date -u; nvidia-smi; nvcc --version | tail -2
  $PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda,
           torch.cuda.get_device_name())"
  command -v compute-sanitizer || echo "compute-sanitizer: not found"
} > "$summary" 2>&1

# Packages the image lacks (benchmarks/gpu/prepare.sh), outside the image's site-packages.
if ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$OUT/build.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d .whl/cache ] && export DETRCORE_CACHE=$PWD/.whl/cache

# The original Deformable-DETR extension, built in the background (CPU only) while our tests use the GPU. Its
# 2021 sources no longer compile against torch 2.x's headers; the copy is patched here, mechanically, to the
# current names (Tensor::type() -> scalar_type()/is_cuda(), data<T>() -> data_ptr<T>(), the removed THC atomics
# header -> ATen's), nothing else; checked to compile with nvcc 13 against torch 2.13's headers.
orig_pid=
if [ -f .orig/ops/setup.py ]; then
  (
    rm -rf /tmp/msda_orig && cp -r .orig/ops /tmp/msda_orig && cd /tmp/msda_orig &&
    find src -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.cpp' | xargs sed -i \
      -e 's/\.type()\.is_cuda()/.is_cuda()/g' \
      -e 's/AT_DISPATCH_FLOATING_TYPES(\([A-Za-z_]*\)\.type()/AT_DISPATCH_FLOATING_TYPES(\1.scalar_type()/g' \
      -e 's/\.data<\([A-Za-z_0-9:]*\)>()/.data_ptr<\1>()/g' -e 's|<THC/THCAtomics.cuh>|<ATen/cuda/Atomic.cuh>|' &&
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 timeout 300 $PY setup.py build_ext --inplace
  ) > "$OUT/orig_build.tmp" 2>&1 &
  orig_pid=$!
fi

# Our wheel, for the GPU in hand only (one architecture builds in about half the time).
export DETRCORE_CUDA=ON CUDAARCHS=${CUDAARCHS:-90} CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-12}
stage "build detrcore (DETRCORE_CUDA=ON, sm_$CUDAARCHS)" 240 "$OUT/build.log" \
  $PY -m pip install -v --no-build-isolation --no-deps . || { cat "$summary"; exit 1; }
# ALLOW_NO_GPU=1: a dry run of this script's plumbing on a machine without a GPU (CUDA tests skip, benchmarks fail).
$PY -c "import detrcore.ops as o; i = o.build_info(); print(i); assert o.cuda_available(), 'no CUDA'" \
  >> "$OUT/build.log" 2>&1 || [ "${ALLOW_NO_GPU:-0}" = 1 ] \
  || { note "FAILED   detrcore sees no CUDA device"; cat "$summary"; exit 1; }

xdist=(); $PY -c "import xdist" 2> /dev/null && xdist=(-n 8)
stage "CUDA-marked tests" 240 "$OUT/tests.log" $PY -m pytest -q -p no:cacheprovider -m cuda -rs tests
if command -v compute-sanitizer > /dev/null; then
  stage "compute-sanitizer memcheck" 150 "$OUT/sanitizer.log" \
    compute-sanitizer --tool memcheck --error-exitcode 1 $PY benchmarks/gpu/sanitize_ops.py
else
  note "SKIPPED  compute-sanitizer (not installed)"
fi

if [ -n "$orig_pid" ]; then
  wait "$orig_pid"; orig_rc=$?
  cat "$OUT/orig_build.tmp" >> "$OUT/build.log"; rm -f "$OUT/orig_build.tmp"
  if [ $orig_rc -eq 0 ]; then
    export PYTHONPATH=/tmp/msda_orig${PYTHONPATH:+:$PYTHONPATH}; note "ok       original MSDA kernel built"
  else
    note "FAILED   original MSDA kernel build (rc=$orig_rc; build.log): benchmarks run without it"
  fi
fi
stage "bench_msda (cuda)" 150 "$OUT/bench.log" $PY benchmarks/bench_msda.py --device cuda --out "$OUT"
stage "bench_box_ops (cuda, float32)" 90 "$OUT/bench.log" \
  $PY benchmarks/bench_box_ops.py --device cuda --dtype float32 --out "$OUT"
if command -v compute-sanitizer > /dev/null; then
  stage "compute-sanitizer racecheck" 150 "$OUT/sanitizer.log" \
    compute-sanitizer --tool racecheck --error-exitcode 1 $PY benchmarks/gpu/sanitize_ops.py
fi
stage "bench_train_step (cuda, deformable-refine, bf16 + fp32)" 180 "$OUT/bench.log" \
  $PY benchmarks/bench_train_step.py --device cuda --variants deformable-refine --precisions bf16,fp32 \
  --repeats 5 --out "$OUT"
stage "the rest of the test suite" 240 "$OUT/tests.log" \
  $PY -m pytest -q -p no:cacheprovider -m "not cuda" "${xdist[@]}" tests

echo "== done ($(elapsed)s)" | tee -a "$summary"
grep -h -E "passed|failed|error" "$OUT/tests.log" | tail -3 | tee -a "$summary"
grep -h -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize_ops:" "$OUT/sanitizer.log" 2> /dev/null | tee -a "$summary"
grep -h -A 12 "^ms_deform_attn on cuda" "$OUT/bench.log" 2> /dev/null | tail -12
grep -h -A 6 "^training step" "$OUT/bench.log" 2> /dev/null | tail -6
! grep -q -E "^(FAILED|TIMEOUT)" "$summary"  # the call's exit status: 0 only when every stage passed
