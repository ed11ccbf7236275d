#!/bin/bash
# One call on a lent GPU machine (bare: nothing kept between calls), from the repository root:
# the standalone harnesses (decode "wide" mode; prefill at GEMM_M on GEMM_SHAPES) while the
# extension builds (about 100 s with 16 cores), then tests/test_cuda_ops.py (over 170 s with 8
# workers; test_errors_and_empty in its own process: it crashed pytest in that image before),
# tests/test_cuda_models.py and bench_ops (mlxq vs tinygemm vs dense bf16 at M = 1, 2 and 512;
# M = 512 again with whole tiles only, MLXQ_CUDA_GEMM_SK=0). Logs in $OUT/logs.tgz (a call
# brings back 8 files at most). A cold start plus this script takes about 500 s of device time.
# QMV_MODES: the decode harness's modes, in turn (default "wide").
# SKIP_BENCH=1 / SKIP_MODELS=1 / SKIP_TESTS=1 leave out bench_ops / test_cuda_models.py /
# test_cuda_ops.py (MLXQ_TEST_SMOLLM2: a prebuilt SmolLM2 MLX checkpoint for the models). TEST_WORKERS,
# TEST_TIMEOUT, TEST_K: pytest workers, seconds and -k selection for test_cuda_ops.py (8, 300).
#   WHEELS=dir/of/wheels [SKIP_HARNESS=1] [QMV_MODES="wide ilv"] bash benchmarks/cuda/device_run.sh
. "$(dirname "$0")/run_common.sh"
logs_to_tgz /tmp/logs
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"
install_wheels
build_extension $L/build.log
if [ -z "$SKIP_HARNESS" ]; then
  $NVCC benchmarks/cuda/qmv_harness.cu -o /tmp/qmv_harness >$L/qmv_build.log 2>&1 &
  P1=$!
  $NVCC benchmarks/cuda/gemm_harness.cu -lcuda -lcublas -o /tmp/gemm_harness >$L/gemm_build.log 2>&1 &
  P2=$!
  wait $P1 $P2
  stamp harnesses built
  for mode in ${QMV_MODES:-wide}; do
    /tmp/qmv_harness $mode >$L/qmv_$mode.log 2>&1
    grep -E "copy|checks:|==|us " $L/qmv_$mode.log | head -50
  done
  stamp qmv
  MLXQ_HARNESS_SHAPES=${GEMM_SHAPES:-28672x8192} timeout 150 /tmp/gemm_harness ${GEMM_M:-256 512 768} >$L/gemm.log 2>&1
  grep -v "ok$" $L/gemm.log | head -20
  echo "gemm checks ok: $(grep -c 'ok$' $L/gemm.log)"
fi
stamp "waiting for the build"
wait_build $L/build.log 3
op_env
python3 -c "import mlxq, transformers; print(mlxq.__file__, transformers.__version__)"
if [ -z "$SKIP_TESTS" ]; then
  stamp tests
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest tests/test_cuda_ops.py -q -p no:cacheprovider \
    -n ${TEST_WORKERS:-8} ${TEST_K:+-k "$TEST_K"} \
    --deselect tests/test_cuda_ops.py::test_errors_and_empty >$L/tests.log 2>&1
  tail -8 $L/tests.log
fi
if [ -z "$SKIP_MODELS" ]; then
  stamp models
  timeout 180 python3 -m pytest tests/test_cuda_models.py -q -p no:cacheprovider -rs >$L/models.log 2>&1
  tail -6 $L/models.log
fi
if [ -z "$SKIP_BENCH" ]; then
  stamp bench_ops
  timeout 120 python3 benchmarks/bench_ops.py --device cuda --bits 4 --m 1 2 512 \
    --cuda-shapes 28672x8192 8192x28672 4096x4096 --cuda-group-sizes 128 --out /tmp/bench_ops \
    >$L/bench.log 2>&1
  tail -12 $L/bench.log
  timeout 60 python3 benchmarks/bench_ops.py --device cuda --bits 4 --m 1 --cuda-shapes 28672x8192 \
    --cuda-group-sizes 64 32 --out /tmp/bench_ops_gs >$L/bench_gs.log 2>&1
  tail -4 $L/bench_gs.log
  MLXQ_CUDA_GEMM_SK=0 timeout 40 python3 benchmarks/bench_ops.py --device cuda --bits 4 --m 512 \
    --cuda-shapes 28672x8192 --cuda-group-sizes 128 --out /tmp/bench_ops_sk0 >$L/bench_sk0.log 2>&1
  tail -3 $L/bench_sk0.log
fi
stamp errors_and_empty
timeout 60 python3 -m pytest tests/test_cuda_ops.py::test_errors_and_empty -q -p no:cacheprovider \
  >$L/errors.log 2>&1
echo "rc=$?"; tail -3 $L/errors.log
stamp done
