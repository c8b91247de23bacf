#!/usr/bin/env bash
# Profile of every op's CUDA path, in one call on a machine with a CUDA GPU (the first step of any kernel redesign):
# build, then per op the GPU time of each kernel, launches, host syncs and CUDA-graph capture (profile_ops.py), then
# Nsight Compute's speed-of-light and memory summaries of one float32 call per case (ncu, clocks left alone).
# Text goes to $OUT (default benchmarks/out/gpu_profile); copy it to benchmarks/profiles/ with the card's name.
#
#   LABEL=before bash benchmarks/gpu_profile.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/benchmarks/out/gpu_profile}"
LABEL="${LABEL:-profile}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export DINOKERNELS_CUDA=1 DINOKERNELS_CUDA_ARCHS="${DINOKERNELS_CUDA_ARCHS:-90}" PYTHONUNBUFFERED=1
if ! "$PY" -c "import pybind11" 2>/dev/null && ls build/devdeps/pybind11-*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps build/devdeps/pybind11-*.whl
fi
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  start=$SECONDS
  timeout 300 "$PY" -m pip install --no-build-isolation --no-deps -q . >"$OUT/build.log" 2>&1 \
    || { echo "build failed"; tail -40 "$OUT/build.log"; exit 1; }
  echo "build: $((SECONDS - start)) s"
fi
"$PY" -P -m dinokernels info | tail -4
start=$SECONDS
timeout "${PROFILE_LIMIT:-200}" "$PY" -P benchmarks/profile_ops.py ${OPS:+--ops $OPS} --jsonl "$OUT/profile_$LABEL.jsonl" \
  2>&1 | tee "$OUT/profile_$LABEL.txt"
echo "profile: $((SECONDS - start)) s"
if [ "${SKIP_NCU:-0}" != 1 ] && command -v ncu >/dev/null; then
  start=$SECONDS
  timeout "${NCU_LIMIT:-200}" ncu --clock-control none --nvtx --nvtx-include "dkprof/" --section SpeedOfLight \
    --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
    "$PY" -P benchmarks/profile_ops.py --nvtx --dtype float32 ${OPS:+--ops $OPS} >"$OUT/ncu_$LABEL.txt" 2>&1
  echo "ncu: exit $? after $((SECONDS - start)) s, $(grep -c 'Section: GPU Speed Of Light' "$OUT/ncu_$LABEL.txt") kernels"
  # One line per kernel: name, duration, DRAM and compute throughput (% of peak).
  "$PY" - "$OUT/ncu_$LABEL.txt" <<'PYEOF' | tee "$OUT/ncu_summary_$LABEL.txt"
import re, sys
name = None
row = {}
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"\s{2}(\S.*?) \(\d+, \d+, \d+\)x\(\d+, \d+, \d+\)", line)
    if m:
        if name and row:
            print(f"{row.get('Duration', '?'):>12}  DRAM {row.get('DRAM Throughput', '?'):>6}%  "
                  f"compute {row.get('Compute (SM) Throughput', '?'):>6}%  regs {row.get('Registers Per Thread', '?'):>4}  "
                  f"occupancy {row.get('Achieved Occupancy', '?'):>6}%  {name[:90]}")
        name, row = m.group(1), {}
        continue
    parts = line.split()
    for key in ("Duration", "DRAM Throughput", "Compute (SM) Throughput", "Registers Per Thread", "Achieved Occupancy"):
        if line.strip().startswith(key + " "):
            row[key] = " ".join(parts[len(key.split()):])
if name and row:
    print(f"{row.get('Duration', '?'):>12}  DRAM {row.get('DRAM Throughput', '?'):>6}%  compute "
          f"{row.get('Compute (SM) Throughput', '?'):>6}%  regs {row.get('Registers Per Thread', '?'):>4}  "
          f"occupancy {row.get('Achieved Occupancy', '?'):>6}%  {name[:90]}")
PYEOF
fi
