#!/bin/bash
# One device call for the prefill's warp-specialized rings (issue #20): the gemm harness built
# with -DMLXQ_HARNESS_WSP (43l, 43lt, the persistent pt; float64 checks) RUNS times at M = 512
# while the extension builds; stops there if a check fails; then test_cuda_ops.py -k "$TEST_K",
# wsp_ab.py (the rings through the op, timed back to back) and bench_ops at M = 512
# (x_vs_dense_paired).
# The -k selection takes over 150 s with 8 workers (TEST_TIMEOUT, default 300).
# Logs under $OUT.   WHEELS=.whl bash benchmarks/cuda/wsp_run.sh
set -o pipefail
. "$(dirname "$0")/run_common.sh"
install_wheels
build_extension "$OUT/op_build.log"
$NVCC -DMLXQ_HARNESS_WSP benchmarks/cuda/gemm_harness.cu \
  -lcuda -lcublas -o /tmp/gemm_harness >"$OUT/hbuild.log" 2>&1 || {
  tail -5 "$OUT/hbuild.log"
  exit 1
}
stamp harness built
ok=1
for r in $(seq "${RUNS:-2}"); do
  MLXQ_HARNESS_PACK=1 MLXQ_HARNESS_SHAPES=28672x8192,8192x28672 timeout 90 /tmp/gemm_harness \
    ${GEMM_M:-512} >"$OUT/gemm_$r.log" 2>&1
  echo "harness run $r rc=$?"
  grep -v "ok$" "$OUT/gemm_$r.log" | head -8
  echo "checks ok: $(grep -c 'ok$' "$OUT/gemm_$r.log")"
  grep -q "FAIL\|WRONG\|UNWRITTEN" "$OUT/gemm_$r.log" && ok=0
done
stamp harness
if [ "$ok" = 0 ]; then
  kill $BUILD
  exit 1
fi
wait_build "$OUT/op_build.log" 1
stamp built the extension
op_env
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest tests/test_cuda_ops.py -q -p no:cacheprovider \
  -n 8 -k "${TEST_K:-prefill or mixed_dtypes or streams_and_cuda_graphs}" >"$OUT/tests.log" 2>&1
tail -6 "$OUT/tests.log"
stamp tests
timeout 60 python3 benchmarks/cuda/wsp_ab.py --rings 43l 43lt pt 2>&1 | tee "$OUT/ab.log"
stamp ab
timeout 60 python3 benchmarks/bench_ops.py --device cuda --bits 4 --m 512 \
  --cuda-shapes 28672x8192 8192x28672 --cuda-group-sizes 128 --out /tmp/bench_ops \
  >"$OUT/bench.log" 2>&1
tail -6 "$OUT/bench.log"
stamp done
