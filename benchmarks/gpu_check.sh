#!/usr/bin/env bash
# GPU check, in one call on a machine with a CUDA GPU and no network (Python with a CUDA torch, nvcc,
# pybind11, cmake, ninja, pytest, compute-sanitizer present): build, CUDA tests that may not skip,
# compute-sanitizer on the small CUDA tests named *sanitizer*, benchmarks. Logs and results go to $OUT (default
# benchmarks/out/gpu_check). Budget: under 10 minutes on an H100 host with 16 cores.
#
#   bash benchmarks/gpu_check.sh            # then: python benchmarks/harness.py --render after merging
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/benchmarks/out/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export DINOKERNELS_CUDA=1
export DINOKERNELS_CUDA_ARCHS="${DINOKERNELS_CUDA_ARCHS:-90}"  # the card at hand; CI builds the default set
export PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME SECONDS COMMAND...: log to $OUT/NAME.log, print its tail
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - start)) s"
  tail -n "${TAIL:-15}" "$OUT/$name.log" | sed 's/^/   | /'
  [ "$rc" -eq 0 ] || failed+=("$name")
  return "$rc"
}

nvidia-smi 2>&1 | head -n 12
step build 200 "$PY" -m pip install --no-build-isolation -v . || { echo "build failed"; exit 1; }
# -P keeps the source tree (which has no compiled module) off sys.path: the installed package is what runs.
step info 30 bash -c "nvidia-smi; '$PY' -P -m dinokernels info"
DINOKERNELS_REQUIRE_CUDA=1 step tests_cuda 200 "$PY" -P -m pytest tests -q -p no:cacheprovider -m cuda
step tests_cpu 200 "$PY" -P -m pytest tests -q -p no:cacheprovider -m "not cuda"
step sanitizer 240 bash -c "
  compute-sanitizer --tool memcheck --error-exitcode 1 '$PY' -P -m pytest tests/ops -q -p no:cacheprovider -k sanitizer &&
  compute-sanitizer --tool racecheck --error-exitcode 1 '$PY' -P -m pytest tests/ops -q -p no:cacheprovider -k sanitizer"
TAIL=45 step bench 420 bash -c "
  '$PY' benchmarks/bench_dino_loss.py --device cuda --dtype float32 bfloat16 --quick --rounds 3 --jsonl '$OUT/results.jsonl' &&
  '$PY' benchmarks/bench_sinkhorn_knopp.py --device cuda --dtype float32 bfloat16 --quick --rounds 3 --jsonl '$OUT/results.jsonl' &&
  '$PY' benchmarks/bench_softmax_center.py --device cuda --dtype float32 bfloat16 --quick --rounds 3 --jsonl '$OUT/results.jsonl' &&
  '$PY' benchmarks/bench_ibot_patch_loss.py --device cuda --dtype float32 bfloat16 --quick --rounds 3 --jsonl '$OUT/results.jsonl' &&
  '$PY' benchmarks/bench_koleo.py --device cuda --dtype float32 bfloat16 --rounds 3 --jsonl '$OUT/results.jsonl' &&
  '$PY' benchmarks/bench_ms_deform_attn.py --device cuda --dtype float32 float16 bfloat16 --quick --rounds 3 --jsonl '$OUT/results.jsonl'"

if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed"
