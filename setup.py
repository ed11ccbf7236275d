"""Build the mlxq native op library (`mlxq._C`).

A torch extension must be built against the torch it runs with, so install with
`pip install --no-build-isolation .` after installing torch.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).parent.resolve()
IS_MACOS = sys.platform == "darwin"


def native_sources() -> list[str]:
    """The one source list shared with CMakeLists.txt; Objective-C++ only on macOS."""
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    files = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    return [f for f in files if IS_MACOS or not f.endswith(".mm")]


def compile_args() -> list[str]:
    args = ["-O3", "-std=c++17", "-ffp-contract=fast", "-fno-math-errno"]
    if platform.machine().lower() in ("arm64", "aarch64"):
        args.append("-march=armv8-a")  # NEON is baseline on arm64
    return args


ext = CppExtension(
    name="mlxq._C",
    sources=native_sources(),
    include_dirs=[str(ROOT / "csrc")],
    extra_compile_args={"cxx": compile_args()},
)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
