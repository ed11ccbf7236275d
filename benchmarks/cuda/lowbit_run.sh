#!/bin/bash
# One device call for the 2/3/5/6-bit decode (csrc/cuda/qmv_lowbit.cuh): the extension builds
# while benchmarks/cuda/lowbit_harness.cu runs (float64 checks, then the tensor-core kernel beside
# the CUDA-core one and a plain read, us), then test_cuda_ops.py -k "$TEST_K" and bench_ops for
# 2, 3, 5, 6 and 8 bits at M = 1 (mlxq_prev: the CUDA-core decode, MLXQ_CUDA_LOWBIT=0,
# beside the default, the tensor-core kernel).
# Logs under $OUT. WHEELS: a folder of wheels (transformers) for the tests; HARNESS: the harness's
# mode ("quick": group sizes 64 and 128 at 28672 x 8192 only; "probes": every timing with the
# kernel's probe rows). HARNESS_TIMEOUT, TEST_TIMEOUT, BENCH_TIMEOUT: seconds (150, 150, 120; the
# H200 run took 78 s for the harness and 136 s to build, and the tests needed more than 70).
#   WHEELS=.whl bash benchmarks/cuda/lowbit_run.sh
set -o pipefail
. "$(dirname "$0")/run_common.sh"
install_wheels
build_extension "$OUT/op_build.log"
$NVCC -Xptxas -v benchmarks/cuda/lowbit_harness.cu \
  -o /tmp/lowbit_harness >"$OUT/harness_build.log" 2>&1 ||
  grep -i error "$OUT/harness_build.log" | head
stamp harness built
timeout "${HARNESS_TIMEOUT:-150}" /tmp/lowbit_harness $HARNESS >"$OUT/harness.log" 2>&1
echo "harness rc=$?"
grep -E "^==|us |checks:" "$OUT/harness.log" | cut -c1-72
grep -E "bad of" "$OUT/harness.log" | grep -v " 0 bad" | head
stamp harness
wait_build "$OUT/op_build.log" 2
stamp built the extension
op_env
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest tests/test_cuda_ops.py -q -p no:cacheprovider \
  -n 8 -k "${TEST_K:-lowbit or all_formats or long_rows or gather}" >"$OUT/tests.log" 2>&1
echo "tests rc=$?"
tail -6 "$OUT/tests.log"
stamp tests
timeout "${BENCH_TIMEOUT:-120}" python3 benchmarks/bench_ops.py --device cuda --bits 2 3 5 6 8 \
  --m 1 --cuda-group-sizes 64 128 --cuda-shapes 28672x8192 4096x4096 --out /tmp/bench_ops \
  >"$OUT/bench.log" 2>&1
tail -30 "$OUT/bench.log"
stamp done
