#!/bin/bash
# One device call without the torch build: both standalone harnesses built and run (qmv "wide"
# mode, against a baseline copy of csrc/ in BASE when given; gemm at GEMM_M), then Nsight
# Compute on the M = 1 streaming kernel (the op's default ring, the loads alone, 14-warp blocks,
# the plain read) and on the M = 512 prefill kernels. Everything lands in $OUT/all.tgz (a call
# brings back 8 files at most).
#   BASE=base_csrc GEMM_M="512" NCU=1 bash benchmarks/cuda/profile_run.sh
OUT=${OUT:-/tmp/out}
R=/tmp/res
mkdir -p "$OUT" $R
T0=$(date +%s)
stamp() { echo "[t=$(($(date +%s) - T0))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw --format=csv,noheader
NVCC="nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a"
$NVCC -Icsrc -Xptxas -v benchmarks/cuda/qmv_harness.cu -o /tmp/qmv_harness >$R/qmv_build.log 2>&1 &
$NVCC -Icsrc -Xptxas -v benchmarks/cuda/gemm_harness.cu -lcuda -lcublas -o /tmp/gemm_harness >$R/gemm_build.log 2>&1 &
if [ -n "$BASE" ]; then
  $NVCC -I"$BASE" benchmarks/cuda/qmv_harness.cu -o /tmp/qmv_base >$R/qmv_base_build.log 2>&1 &
fi
wait
stamp built
grep -i "C75\|error" $R/*build.log | head
for run in 1 2; do
  /tmp/qmv_harness wide >$R/qmv$run.log 2>&1
  [ -n "$BASE" ] && /tmp/qmv_base wide >$R/qmv_base$run.log 2>&1
done
paste <(grep -E "==|us " $R/qmv1.log | cut -c1-60) <(grep -E "==|us " $R/qmv_base1.log 2>/dev/null | cut -c42-60) \
  <(grep -E "==|us " $R/qmv2.log | cut -c42-60) <(grep -E "==|us " $R/qmv_base2.log 2>/dev/null | cut -c42-60) | head -50
grep -E "checks:|[1-9][0-9]* bad" $R/qmv1.log | grep -v " 0 bad" | head
stamp qmv
MLXQ_HARNESS_SHAPES=${GEMM_SHAPES:-28672x8192,8192x28672} /tmp/gemm_harness ${GEMM_M:-512} >$R/gemm.log 2>&1
grep -v "ok$" $R/gemm.log | sed 's/ | /\n    /g' | head -150
grep -c "ok$" $R/gemm.log
stamp gemm
if [ -n "$NCU" ]; then
  ncu --clock-control none --set full -k regex:"qmv_stream|read_kernel" -o $R/qmv -f /tmp/qmv_harness ncu >$R/ncu_qmv_run.log 2>&1
  ncu -i $R/qmv.ncu-rep --page details --print-details all >$R/ncu_qmv.txt 2>&1
  ncu -i $R/qmv.ncu-rep --page source --csv --print-source sass --launch-count 1 >$R/qmv_sass.csv 2>&1
  stamp ncu qmv
  ncu --clock-control none --set full -k regex:"gemm_w4" -o $R/gemm -f /tmp/gemm_harness ncu 512 >$R/ncu_gemm_run.log 2>&1
  ncu -i $R/gemm.ncu-rep --page details --print-details all >$R/ncu_gemm.txt 2>&1
  stamp ncu gemm
  grep -E "gemm_w4|qmv_stream|Duration|Issue Slots Busy|Tensor is|Warp Cycles Per Issued" $R/ncu_qmv.txt $R/ncu_gemm.txt | cut -c1-150 | head -40
fi
cd $R && tar czf $OUT/all.tgz --exclude '*.ncu-rep' . && ls -la $OUT
stamp done
