#!/usr/bin/env bash
# The arm64 (NEON) CPU kernels, run for real on an x86-64 Debian machine under qemu-user.
#
#   bash .ci/arm64.sh            (as root: it installs Debian's qemu-user-static and the
#                                 aarch64 cross g++ when missing)
#
# Route, chosen for speed and robustness: Debian's aarch64 CPython 3.11 and its libraries are
# unpacked from .deb files into a private sysroot (never installed, so the host's python3 is
# untouched), PyPI's aarch64 wheels of torch and numpy are unpacked beside it, and mlxq._C is
# cross-compiled with aarch64-linux-gnu-g++ against that torch (compiling under emulation
# would take ~10x longer). qemu-aarch64-static then runs .ci/arm64_ops.py: quantize bit-exact
# against the x86 build's results for the same inputs, dequantize and matmul against float64,
# every bits x group size x dtype, decode and GEMM, both transposes, odd shapes and K tails.
#
# torch 2.9.1: PyPI's newer aarch64 wheels are CUDA builds that want the NVIDIA libraries;
# 2.9.1 is the CPU build. The x86 side uses whatever python has mlxq importable (PYTHON, else
# .venv/bin/python, else python3). Downloads are cached in MLXQ_ARM64_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
start=$(date +%s)
WORK=${MLXQ_ARM64_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mlxq-arm64}
TORCH_VERSION=2.9.1
mkdir -p "$WORK"

if [ -n "${PYTHON:-}" ]; then
  X86_PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  X86_PY=.venv/bin/python
else
  X86_PY=python3
fi

# --- host tools -------------------------------------------------------------------------------
if ! command -v qemu-aarch64-static >/dev/null || ! command -v aarch64-linux-gnu-g++ >/dev/null; then
  echo "== installing qemu-user-static and g++-aarch64-linux-gnu"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q qemu-user-static g++-aarch64-linux-gnu >/dev/null
fi
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  dpkg --add-architecture arm64
  apt-get update -q
fi

# --- aarch64 sysroot: Debian's python3.11 and its libraries, unpacked -----------------------------
SYSROOT=$WORK/sysroot
if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
  echo "== unpacking Debian's aarch64 python3.11 into $SYSROOT"
  rm -rf "$WORK/debs" "$SYSROOT"
  mkdir -p "$WORK/debs" "$SYSROOT"
  # apt's sandbox user must be able to write the download folder.
  chmod 777 "$WORK/debs"
  (cd "$WORK/debs" && apt-get download -q \
    python3.11-minimal:arm64 libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 \
    libpython3.11-dev:arm64 libc6:arm64 libstdc++6:arm64 libgcc-s1:arm64 libexpat1:arm64 \
    zlib1g:arm64 libffi8:arm64 libssl3:arm64 libbz2-1.0:arm64 liblzma5:arm64 libuuid1:arm64 \
    libcrypt1:arm64 libncursesw6:arm64 libtinfo6:arm64 libsqlite3-0:arm64 >/dev/null)
  for deb in "$WORK"/debs/*.deb; do dpkg -x "$deb" "$SYSROOT"; done
fi

# --- aarch64 torch and numpy from PyPI, unpacked ----------------------------------------------
SITE=$WORK/site-torch$TORCH_VERSION
if [ ! -f "$SITE/.complete" ]; then
  echo "== downloading aarch64 wheels of torch $TORCH_VERSION and numpy"
  rm -rf "$SITE" "$WORK/wheels"
  # --no-deps: pip cannot evaluate torch's platform markers for another machine; these are
  # all that `import torch` needs.
  "$X86_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --implementation cp --abi cp311 --abi abi3 --abi none --platform manylinux_2_28_aarch64 \
    --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 -d "$WORK/wheels" \
    "torch==$TORCH_VERSION" numpy typing_extensions sympy mpmath filelock fsspec networkx \
    jinja2 markupsafe
  mkdir -p "$SITE"
  for whl in "$WORK"/wheels/*.whl; do "$X86_PY" -m zipfile -e "$whl" "$SITE"; done
  touch "$SITE/.complete"
fi
echo "== setup took $(($(date +%s) - start)) s"

# --- cross-compile mlxq._C for aarch64 ---------------------------------------------------------
PKG=$WORK/pkg
rm -rf "$PKG"
mkdir -p "$PKG" "$WORK/obj"
cp -r python/mlxq "$PKG/mlxq"
find "$PKG" -name '_C*.so' -delete
build_start=$(date +%s)
mapfile -t sources < <("$X86_PY" - <<'EOF'
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("h", "python/mlxq/_build_helpers.py")
h = importlib.util.module_from_spec(spec)
spec.loader.exec_module(h)
print("\n".join(h.native_sources(Path(".").resolve(), "linux", False, cuda=False)))
EOF
)
TI=$SITE/torch/include
CXXFLAGS=(-std=c++17 -ffp-contract=fast -fno-math-errno -fopenmp -march=armv8-a -fPIC
  -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=1
  -I"$ROOT/csrc" -isystem "$TI" -isystem "$TI/torch/csrc/api/include"
  -isystem "$SYSROOT/usr/include/python3.11"
  -isystem "$SYSROOT/usr/include")
echo "== cross-compiling ${#sources[@]} sources with $(aarch64-linux-gnu-g++ --version | head -1)"
objs=()
pids=()
for src in "${sources[@]}"; do
  obj=$WORK/obj/$(echo "$src" | tr / _).o
  objs+=("$obj")
  # setup.py's flags (-O3, -march=armv8-a: NEON baseline) for the kernels; -O1 for the
  # bindings and argument checks, whose torch/pybind11 headers dominate the build time.
  case $src in csrc/cpu/*) opt=-O3 ;; *) opt=-O1 ;; esac
  aarch64-linux-gnu-g++ "$opt" "${CXXFLAGS[@]}" -c "$src" -o "$obj" &
  pids+=($!)
  if [ ${#pids[@]} -ge 2 ]; then # two cores
    wait "${pids[0]}"
    pids=("${pids[@]:1}")
  fi
done
for pid in "${pids[@]}"; do wait "$pid"; done
# OpenMP: link the libgomp that torch's wheel bundles (renamed libgomp-HASH.so), which torch
# has loaded already, so that mlxq shares torch's thread pool (-fopenmp would link the
# toolchain's libgomp.so.1, absent from the sysroot and a second OpenMP runtime besides).
gomp=("$SITE"/torch.libs/libgomp-*.so*)
aarch64-linux-gnu-g++ -shared "${objs[@]}" "${gomp[0]}" -L"$SITE/torch/lib" -lc10 -ltorch \
  -ltorch_cpu -ltorch_python -o "$PKG/mlxq/_C.cpython-311-aarch64-linux-gnu.so"
echo "== cross-compile took $(($(date +%s) - build_start)) s"

# --- reference results from this (x86-64) build -------------------------------------------------
echo "== x86-64 reference results with $X86_PY"
"$X86_PY" .ci/arm64_ops.py make "$WORK/x86_reference.npz"

# --- the checks under emulation -------------------------------------------------------------------
echo "== running the checks on aarch64 under $(qemu-aarch64-static --version | head -1)"
run_start=$(date +%s)
PYTHONPATH="$PKG:$SITE" PYTHONNOUSERSITE=1 OMP_NUM_THREADS=2 \
  qemu-aarch64-static -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" \
  .ci/arm64_ops.py check "$WORK/x86_reference.npz"
echo "== aarch64 checks took $(($(date +%s) - run_start)) s; whole script $(($(date +%s) - start)) s"
