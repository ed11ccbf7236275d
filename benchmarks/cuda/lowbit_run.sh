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
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "[t=$(($(date +%s) - T0))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
if [ -n "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    "$WHEELS"/*.whl >"$OUT/pip.log" 2>&1 &
fi
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi  # see device_run.sh
(MLXQ_CUDA_ARCHS=90 MAX_JOBS=16 python3 setup.py build_ext --inplace >"$OUT/op_build.log" 2>&1
  echo "build rc=$?" >>"$OUT/op_build.log") &
BUILD=$!
nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc -Xptxas -v \
  benchmarks/cuda/lowbit_harness.cu -o /tmp/lowbit_harness >"$OUT/harness_build.log" 2>&1 ||
  grep -i error "$OUT/harness_build.log" | head
stamp harness built
timeout "${HARNESS_TIMEOUT:-150}" /tmp/lowbit_harness $HARNESS >"$OUT/harness.log" 2>&1
echo "harness rc=$?"
grep -E "^==|us |checks:" "$OUT/harness.log" | cut -c1-72
grep -E "bad of" "$OUT/harness.log" | grep -v " 0 bad" | head
stamp harness
wait $BUILD
wait
tail -2 "$OUT/op_build.log"
stamp built the extension
export PYTHONPATH=/tmp/site:$PWD/python MLXQ_CACHE=$(mktemp -d) XDG_CACHE_HOME=$(mktemp -d) \
  HF_HOME=$(mktemp -d)
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
