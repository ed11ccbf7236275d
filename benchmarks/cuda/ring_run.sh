#!/bin/bash
# One device call for the M >= 256 prefill kernels (from the repository root): the gemm harness
# (-DMLXQ_HARNESS_MIN: the register-A 256-row block and the warp-specialized kernel's rings) at
# GEMM_M on both shapes, then again at M = 512 with MLXQ_HARNESS_PACK=1 (the pairs packed before
# each call, as the op does), while the extension builds; then the prefill tests of
# tests/test_cuda_ops.py and benchmarks/cuda/prefill_rings.py (the same kernels through the op,
# with the pieces of a call). Logs in $OUT/logs.tgz. SKIP_HARNESS=1 leaves the harness out;
# TEST_K, TEST_WORKERS, TEST_THREADS (OpenMP threads a worker), TEST_TIMEOUT; RINGS_M,
# RINGS_ROUNDS, RINGS_TIMEOUT.
#   WHEELS=dir/of/wheels GEMM_M="256 512 768" bash benchmarks/cuda/ring_run.sh
. "$(dirname "$0")/run_common.sh"
logs_to_tgz /tmp/logs
install_wheels
build_extension $L/build.log
if [ -z "$SKIP_HARNESS" ]; then
  $NVCC -DMLXQ_HARNESS_MIN -Xptxas -v \
    benchmarks/cuda/gemm_harness.cu -lcuda -lcublas -o /tmp/gemm_harness >$L/gemm_build.log 2>&1
  grep -E "C75|error" $L/gemm_build.log | head -5
  stamp harness built
  export MLXQ_HARNESS_SHAPES=28672x8192,8192x28672
  timeout 120 /tmp/gemm_harness ${GEMM_M:-256 512 768} >$L/gemm.log 2>&1
  grep -v "ok$" $L/gemm.log | head -20
  echo "gemm checks ok: $(grep -c 'ok$' $L/gemm.log)"
  MLXQ_HARNESS_PACK=1 timeout 60 /tmp/gemm_harness 512 >$L/gemm_pack.log 2>&1
  grep -v "ok$" $L/gemm_pack.log | sed 's/^/pack: /' | head -6
fi
stamp "waiting for the build"
wait_build $L/build.log 2
op_env
stamp tests
OMP_NUM_THREADS=${TEST_THREADS:-2} timeout ${TEST_TIMEOUT:-150} python3 -m pytest \
  tests/test_cuda_ops.py -q -p no:cacheprovider -n ${TEST_WORKERS:-8} -k "${TEST_K:-prefill}" \
  >$L/tests.log 2>&1
tail -6 $L/tests.log
stamp rings
timeout ${RINGS_TIMEOUT:-120} python3 benchmarks/cuda/prefill_rings.py --m ${RINGS_M:-256 512 768} \
  --rounds ${RINGS_ROUNDS:-2} >$L/rings.log 2>&1
cat $L/rings.log | tail -40
stamp done
