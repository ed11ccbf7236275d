#!/bin/bash
# Sourced by the device scripts (*_run.sh, run from the repository root) for what every call
# starts with: $OUT, stamp (seconds since the start), the GPU's line, NVCC (the harnesses' H200
# compile line), and the helpers below. Logs go to $L: $OUT unless the script calls logs_to_tgz.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
L=$OUT
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "[t=$(($(date +%s) - T0))s] $*"; }
NVCC="nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.draw --format=csv,noheader

# logs_to_tgz DIR: logs in DIR, brought back as $OUT/logs.tgz at exit (a call brings back 8
# files at most)
logs_to_tgz() {
  L=$1
  mkdir -p "$L"
  trap '(cd "$L" && tar czf "$OUT/logs.tgz" .)' EXIT
}

# install_wheels: the wheels in $WHEELS (transformers, for the tests) into /tmp/site, in the
# background
install_wheels() {
  [ -n "$WHEELS" ] || return 0
  (python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    "$WHEELS"/*.whl >"$L/pip.log" 2>&1; echo "pip rc=$?" >>"$L/pip.log") &
}

# build_extension LOG: the extension built in the background (sm_90, 16 jobs); BUILD: its pid.
# The lent image's default C++ compiler (/opt/gcc) builds an extension whose argument checks
# segfault when their message prints a number (test_errors_and_empty); built with the system g++
# (13.3) the same test passes (H200, two builds of one tree in one call).
build_extension() {
  if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
  (MLXQ_CUDA_ARCHS=90 MAX_JOBS=16 python3 setup.py build_ext --inplace >"$1" 2>&1
    echo "build rc=$?" >>"$1") &
  BUILD=$!
}

# wait_build LOG LINES: wait for the build and every other background job, then LOG's last
# LINES lines
wait_build() {
  wait "$BUILD"
  wait
  tail -"$2" "$1"
}

# op_env: the built tree and the wheels on the path, caches in fresh folders
op_env() {
  export PYTHONPATH=/tmp/site:$PWD/python MLXQ_CACHE=$(mktemp -d) XDG_CACHE_HOME=$(mktemp -d) \
    HF_HOME=$(mktemp -d)
}
