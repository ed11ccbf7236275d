#!/bin/bash
# A device call with the decode harness alone (no torch build, about 20 s of nvcc): each of MODES
# (default "f16") RUNS times, then Nsight Compute on the launches of NCU_MODE when it is set
# (details and the SASS with its stall samples, of the second launch too). OP=1 also builds the
# extension meanwhile, then runs test_cuda_ops.py -k "$TEST_K" and bench_ops at M = 1, 2 (group
# 128; WHEELS: a folder of wheels, transformers, for the tests). Logs under $OUT.
#   MODES="f16" RUNS=2 NCU_MODE=ncu16 bash benchmarks/cuda/harness_run.sh
#   OP=1 WHEELS=.whl TEST_K=decode bash benchmarks/cuda/harness_run.sh
set -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "[t=$(($(date +%s) - T0))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw --format=csv,noheader
if [ -n "$OP" ]; then
  if [ -n "$WHEELS" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      "$WHEELS"/*.whl >"$OUT/pip.log" 2>&1 &
  fi
  # the system g++ (device_run.sh says why)
  if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
  (MLXQ_CUDA_ARCHS=90 MAX_JOBS=16 python3 setup.py build_ext --inplace >"$OUT/op_build.log" 2>&1
    echo "build rc=$?" >>"$OUT/op_build.log") &
  BUILD=$!
fi
nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc -Xptxas -v \
  benchmarks/cuda/qmv_harness.cu -o /tmp/qmv_harness >"$OUT/build.log" 2>&1 || {
  grep -i error "$OUT/build.log" | head
  exit 1
}
stamp built
for mode in ${MODES:-f16}; do
  for r in $(seq "${RUNS:-1}"); do
    /tmp/qmv_harness "$mode" >"$OUT/qmv_${mode}_$r.log" 2>&1
    echo "$mode run $r rc=$?"
    grep -E "^copy|checks:|==|us " "$OUT/qmv_${mode}_$r.log" | cut -c1-90
    grep -E "bad of" "$OUT/qmv_${mode}_$r.log" | grep -v " 0 bad" | head
  done
done
stamp harness
if [ -n "$NCU_MODE" ]; then
  ncu --clock-control none --set full -k regex:qmv_stream -o /tmp/ncu_q -f /tmp/qmv_harness \
    "$NCU_MODE" >"$OUT/ncu_run.log" 2>&1
  ncu -i /tmp/ncu_q.ncu-rep --page details --print-details all >"$OUT/ncu_details.txt" 2>&1
  for i in 0 1; do
    ncu -i /tmp/ncu_q.ncu-rep --page source --csv --print-source sass --launch-skip $i \
      --launch-count 1 >"$OUT/ncu_sass_$i.csv" 2>&1
  done
  stamp ncu
  grep -E "qmv_stream|Duration|Issue Slots Busy|Warp Cycles Per Issued|Executed Ipc A|DRAM Through|Registers Per" \
    "$OUT/ncu_details.txt" | cut -c1-120 | head -40
fi
if [ -n "$OP" ]; then
  wait $BUILD
  wait
  tail -2 "$OUT/op_build.log"
  stamp built the extension
  export PYTHONPATH=/tmp/site:$PWD/python MLXQ_CACHE=$(mktemp -d) XDG_CACHE_HOME=$(mktemp -d) \
    HF_HOME=$(mktemp -d)
  timeout "${TEST_TIMEOUT:-200}" python3 -m pytest tests/test_cuda_ops.py -q -p no:cacheprovider \
    -n 8 ${TEST_K:+-k "$TEST_K"} >"$OUT/tests.log" 2>&1
  tail -6 "$OUT/tests.log"
  stamp tests
  timeout 90 python3 benchmarks/bench_ops.py --device cuda --bits 4 --m 1 2 \
    --cuda-shapes 28672x8192 8192x28672 4096x4096 --cuda-group-sizes 128 --out /tmp/bench_ops \
    >"$OUT/bench.log" 2>&1
  tail -12 "$OUT/bench.log"
fi
stamp done
