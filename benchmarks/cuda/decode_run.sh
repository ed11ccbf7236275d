#!/bin/bash
# One device call on the decode (M <= 16) at the shapes real models decode with, from the
# repository root: qmv_harness "small" (the op's kernel choice beside its alternatives, probes and
# floors, float64-checked) while the extension builds, then bench_ops (mlxq vs tinygemm vs dense
# bf16, with columns timed under BENCH_ENV's environment variables in the same process) and the
# decode subset of tests/test_cuda_ops.py. Logs in $OUT/logs.tgz, the bench table in $OUT.
# HARNESS: a qmv_harness built beforehand (nvcc -O3 -std=c++17 -gencode=arch=compute_90a,
# code=sm_90a -Icsrc benchmarks/cuda/qmv_harness.cu), else built here. BENCH_SHAPES, BENCH_M,
# BENCH_GS, BENCH_ENV ("NAME:VAR=VAL[,VAR=VAL] ..."), TEST_K ("all": the whole file), TEST_ENV
# (variables for a second pass of the tests), SKIP_HARNESS=1, SKIP_TESTS=1. The opt-in decode launch
# (the register variant's 2-span steps, the bulk kernel's wider reach) beside the default:
#   BENCH_ENV="small:MLXQ_CUDA_DECODE_SMALL=1"
. "$(dirname "$0")/run_common.sh"
logs_to_tgz /tmp/logs
build_extension $L/build.log
if [ -z "$SKIP_HARNESS" ]; then
  H=${HARNESS:-}
  if [ -z "$H" ] || [ ! -x "$H" ]; then
    $NVCC benchmarks/cuda/qmv_harness.cu -o /tmp/qmv_harness >$L/qmv_build.log 2>&1
    H=/tmp/qmv_harness
  fi
  stamp harness
  timeout 200 "$H" small >$L/qmv_small.log 2>&1
  RC=$?
  if [ $RC = 126 ] || [ $RC = 127 ]; then  # a prebuilt binary that does not run here
    $NVCC benchmarks/cuda/qmv_harness.cu -o /tmp/qmv_harness >$L/qmv_build.log 2>&1
    timeout 200 /tmp/qmv_harness small >$L/qmv_small.log 2>&1
    RC=$?
  fi
  echo "harness rc=$RC"
  grep -E "copy|checks:|==|us |op now|WRONG|bad of" $L/qmv_small.log | grep -v " 0 bad of" |
    sed -E 's/ +/ /g'
  cp $L/qmv_small.log "$OUT/"
fi
stamp "waiting for the build"
wait_build $L/build.log 2
op_env
stamp bench_ops
# shellcheck disable=SC2086
timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/bench_ops.py --device cuda --bits 4 \
  --m ${BENCH_M:-1 2 8 16} --cuda-group-sizes ${BENCH_GS:-128 64} \
  --cuda-shapes ${BENCH_SHAPES:-4096x4096 1024x4096 14336x4096 4096x14336 28672x8192} \
  --cuda-env $BENCH_ENV --out /tmp/bench_small >$L/bench.log 2>&1
echo "bench rc=$?"
cp $L/bench.log "$OUT/"
sed -n '/^# mlxq op benchmark/,$p' $L/bench.log | sed -E 's/ \| /|/g'
if [ -z "$SKIP_TESTS" ]; then
  stamp tests
  K=${TEST_K:-decode or long_rows or all_formats}  # TEST_K=all: the whole file
  SEL=(-k "$K")
  if [ "$K" = all ]; then SEL=(); fi
  OMP_NUM_THREADS=2 timeout ${TEST_TIMEOUT:-150} python3 -m pytest tests/test_cuda_ops.py -q \
    -p no:cacheprovider -n ${TEST_WORKERS:-14} "${SEL[@]}" >$L/tests.log 2>&1
  echo "tests rc=$?"
  tail -4 $L/tests.log
  if [ -n "$TEST_ENV" ]; then
    stamp "tests with $TEST_ENV"
    # shellcheck disable=SC2086
    env $TEST_ENV OMP_NUM_THREADS=2 timeout ${TEST_TIMEOUT:-150} python3 -m pytest \
      tests/test_cuda_ops.py -q -p no:cacheprovider -n ${TEST_WORKERS:-14} "${SEL[@]}" \
      >$L/tests_env.log 2>&1
    echo "tests rc=$?"
    tail -4 $L/tests_env.log
  fi
fi
stamp done
