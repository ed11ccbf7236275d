"""Build the mlxq native op library (`mlxq._C`).

A torch extension must be built against the torch it runs with, so install with
`pip install --no-build-isolation .` after installing torch.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path

import torch
from setuptools import setup
from setuptools.command.build_py import build_py
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent.resolve()
IS_MACOS = sys.platform == "darwin"


def _load_build_helpers():
    # Platform logic lives in python/mlxq/_build_helpers.py (stdlib only, tested on Linux);
    # loaded by path because the package is not importable while it is being built.
    path = ROOT / "python" / "mlxq" / "_build_helpers.py"
    spec = importlib.util.spec_from_file_location("_mlxq_build_helpers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


helpers = _load_build_helpers()
MPS_BUILT = torch.backends.mps.is_built()
BUILD_METAL, METAL_REQUIRED, METAL_WHY = helpers.metal_build_decision(sys.platform, os.environ)
print(f"mlxq: {METAL_WHY}")  # said once per build
OMP_CFLAGS, OMP_LDFLAGS, OMP_WHY = helpers.openmp_flags(
    sys.platform,
    torch.backends.openmp.is_available(),
    Path(torch.__file__).parent / "lib",
    os.environ,
)
print(f"mlxq: {OMP_WHY}")
_NVCC = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc" if cpp_extension.CUDA_HOME else None
BUILD_CUDA, CUDA_WHY = helpers.cuda_build_decision(torch.version.cuda, _NVCC, os.environ)
print(f"mlxq: {CUDA_WHY}")
if BUILD_CUDA:
    _torch_archs = getattr(torch._C, "_cuda_getArchFlags", lambda: "")() or ""
    CUDA_ARCH_FLAGS, _ARCH_WHY = helpers.cuda_arch_flags(
        _torch_archs, helpers.nvcc_archs(_NVCC), os.environ
    )
    print(f"mlxq: {_ARCH_WHY}")
if IS_MACOS and not MPS_BUILT:
    print("mlxq: this torch has no MPS support: skipping the Objective-C++ MPS backend")


def native_sources() -> list[str]:
    """The one source list shared with CMakeLists.txt; Objective-C++ only on macOS."""
    return helpers.native_sources(ROOT, sys.platform, MPS_BUILT, cuda=BUILD_CUDA)


def compile_args() -> list[str]:
    args = ["-O3", "-std=c++17", "-ffp-contract=fast", "-fno-math-errno", *OMP_CFLAGS]
    if platform.machine().lower() in ("arm64", "aarch64"):
        args.append("-march=armv8-a")  # NEON is baseline on arm64
    return args


class BuildExtWithMetal(BuildExtension):
    """Builds the extension, then (macOS) mlxq.metallib next to it, in the wheel or in place."""

    def run(self) -> None:
        super().run()
        if not BUILD_METAL:
            return
        out = Path(self.get_ext_fullpath("mlxq._C")).parent / helpers.METALLIB_NAME
        air_dir = Path(self.build_temp) / "metal"
        helpers.build_metallib(ROOT, air_dir, out, required=METAL_REQUIRED)


class BuildPyWithMetalSources(build_py):
    """Ships metal/*.metal and *.h as mlxq/metal/ (read by the run-time compiled fallback)."""

    def run(self) -> None:
        super().run()
        helpers.copy_metal_sources(ROOT, Path(self.build_lib) / "mlxq" / "metal")


def nvcc_args() -> list[str]:
    # No fast math: the quantizer must round exactly like the CPU op (IEEE division, rint).
    return ["-O3", "-std=c++17", "-lineinfo", *CUDA_ARCH_FLAGS]


ext_kwargs = dict(
    name="mlxq._C",
    sources=native_sources(),
    include_dirs=[str(ROOT / "csrc")],
    define_macros=helpers.native_macros(sys.platform, MPS_BUILT, cuda=BUILD_CUDA),
    extra_link_args=[*helpers.native_link_args(sys.platform, MPS_BUILT), *OMP_LDFLAGS],
)
if BUILD_CUDA:
    ext = CUDAExtension(
        **ext_kwargs, extra_compile_args={"cxx": compile_args(), "nvcc": nvcc_args()}
    )
else:
    ext = CppExtension(**ext_kwargs, extra_compile_args={"cxx": compile_args()})

setup(
    ext_modules=[ext],
    cmdclass={
        "build_ext": BuildExtWithMetal.with_options(use_ninja=True),
        "build_py": BuildPyWithMetalSources,
    },
)
