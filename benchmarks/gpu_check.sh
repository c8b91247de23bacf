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
if ! "$PY" -c "import pybind11" 2>/dev/null && ls build/devdeps/pybind11-*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps build/devdeps/pybind11-*.whl  # carried: the machine has no registry
fi
step build 200 "$PY" -m pip install --no-build-isolation --no-deps -v . || { echo "build failed"; exit 1; }
# -P keeps the source tree (which has no compiled module) off sys.path: the installed package is what runs.
step info 30 bash -c "nvidia-smi; '$PY' -P -m dinokernels info"
DINOKERNELS_REQUIRE_CUDA=1 step tests_cuda "${TESTS_LIMIT:-200}" "$PY" -P -m pytest ${TEST_PATHS:-tests} -q -p no:cacheprovider -m cuda
# CI runs the CPU tests; SKIP_CPU_TESTS=1 saves device time.
[ "${SKIP_CPU_TESTS:-0}" = 1 ] || step tests_cpu 200 "$PY" -P -m pytest tests -q -p no:cacheprovider -m "not cuda"
# memcheck and racecheck as separate steps, so that a failure under one does not hide the other.
for tool in memcheck racecheck; do
  step "sanitizer_$tool" "${SANITIZER_LIMIT:-240}" compute-sanitizer --tool "$tool" --error-exitcode 1 \
    "$PY" -P -m pytest tests/ops -q -p no:cacheprovider -k sanitizer
done
# One step per benchmark, so that one failing bench does not hide the others. BENCHES narrows the list.
for bench in ${BENCHES:-dino_loss sinkhorn_knopp softmax_center ibot_patch_loss koleo matcher ms_deform_attn}; do
  # BENCH_FLAGS adds e.g. --compile (the reference under torch.compile, a column of its own).
  TAIL=12 step "bench_$bench" "${BENCH_LIMIT:-240}" "$PY" -P "benchmarks/bench_$bench.py" --device cuda \
    --dtype float32 bfloat16 --quick --rounds 3 ${BENCH_FLAGS:-} --jsonl "$OUT/results.jsonl"
done
# Grounding DINO end to end at 800x1333 (issue 12's GPU rows): batch 1 and 4, float32 and bfloat16, vs transformers
# and the reference backend. GD_BENCH=0 skips it.
[ "${GD_BENCH:-1}" = 0 ] || TAIL=12 step bench_grounding_dino "${GD_BENCH_LIMIT:-240}" "$PY" -P \
  benchmarks/bench_grounding_dino.py --device cuda --dtype float32 bfloat16 --batch 1 4 --rounds 3 \
  --jsonl "$OUT/results.jsonl"
# Per-kernel profile after the change (benchmarks/profile_ops.py); PROFILE=0 skips it.
[ "${PROFILE:-1}" = 0 ] || step profile "${PROFILE_LIMIT:-150}" "$PY" -P benchmarks/profile_ops.py ${PROFILE_OPS:+--ops $PROFILE_OPS} \
  --jsonl "$OUT/profile.jsonl"

if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all GPU checks passed"
