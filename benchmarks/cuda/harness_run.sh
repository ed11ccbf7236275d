#!/bin/bash
# A device call with the decode harness alone (no torch build, about 20 s of nvcc): each of MODES
# (default "f16") RUNS times, then Nsight Compute on the launches of NCU_MODE when it is set
# (details and the SASS with its stall samples, of the second launch too). OP=1 also builds the
# extension meanwhile, then runs test_cuda_ops.py -k "$TEST_K" and bench_ops at M = 1, 2 (group
# 128; WHEELS: a folder of wheels, transformers, for the tests). Logs under $OUT.
#   MODES="f16" RUNS=2 NCU_MODE=ncu16 bash benchmarks/cuda/harness_run.sh
#   OP=1 WHEELS=.whl TEST_K=decode bash benchmarks/cuda/harness_run.sh
set -o pipefail
. "$(dirname "$0")/run_common.sh"
if [ -n "$OP" ]; then
  install_wheels
  build_extension "$OUT/op_build.log"
fi
$NVCC -Xptxas -v benchmarks/cuda/qmv_harness.cu -o /tmp/qmv_harness >"$OUT/build.log" 2>&1 || {
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
  wait_build "$OUT/op_build.log" 2
  stamp built the extension
  op_env
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
