"""Build-time platform logic: which native sources, flags and Metal steps a platform gets.

Standard library only: setup.py loads this file by path before the package exists, and the
tests call the same functions on Linux, so the macOS branch is checked without a Mac.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

METAL_STD = "metal3.1"  # bfloat needs MSL 3.1; libraries built for it load on macOS 14, 15, 26
MACOS_MIN = "14.0"
METALLIB_NAME = "mlxq.metallib"
# -fno-fast-math: the quantizer must round exactly like mlx.core.quantize, and MLX builds its
# own kernels without fast math too.
METAL_FLAGS = ["-fno-fast-math", "-Wall"]
OBJCXX_LINK_ARGS = ["-framework", "Metal", "-framework", "Foundation"]


def read_source_list(root: Path) -> list[str]:
    """csrc/sources.txt: one path per line, '#' comments, relative to the repository root."""
    lines = (Path(root) / "csrc" / "sources.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def builds_objcxx(platform: str, mps_built: bool) -> bool:
    """Objective-C++ (.mm) is built on macOS against a torch with MPS support only."""
    return platform == "darwin" and mps_built


def native_sources(root: Path, platform: str, mps_built: bool, cuda: bool = False) -> list[str]:
    """The source list for this platform: .mm lines only where they build, .cu lines only in a
    CUDA build (see :func:`cuda_build_decision`)."""
    keep_mm = builds_objcxx(platform, mps_built)
    return [
        f
        for f in read_source_list(root)
        if (keep_mm or not f.endswith(".mm")) and (cuda or not f.endswith(".cu"))
    ]


def native_macros(platform: str, mps_built: bool, cuda: bool = False) -> list[tuple[str, str]]:
    """MLXQ_WITH_MPS / MLXQ_WITH_CUDA tell the bindings which GPU backends are linked in."""
    macros = [("MLXQ_WITH_MPS", "1")] if builds_objcxx(platform, mps_built) else []
    return macros + ([("MLXQ_WITH_CUDA", "1")] if cuda else [])


def cuda_build_decision(
    torch_cuda_version: str | None, nvcc: Path | None, env: Mapping[str, str]
) -> tuple[bool, str]:
    """(build the CUDA backend?, why) from torch's CUDA version, the nvcc found, MLXQ_BUILD_CUDA.

    MLXQ_BUILD_CUDA: unset/auto (build when torch has CUDA and nvcc exists), 1/require (fail
    the build when either is missing), 0/off (skip). A CPU-only torch builds exactly as before.
    """
    mode = env.get("MLXQ_BUILD_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("auto", "1", "require", "on", "0", "off"):
        raise ValueError(f"MLXQ_BUILD_CUDA must be auto, require/1 or off/0, got {mode!r}")
    if mode in ("0", "off"):
        return False, "MLXQ_BUILD_CUDA=off: not building the CUDA backend"
    missing = None
    if not torch_cuda_version:
        missing = "this torch has no CUDA support"
    elif nvcc is None or not Path(nvcc).is_file():
        missing = "nvcc was not found (set CUDA_HOME)"
    if missing is not None:
        if mode in ("1", "require", "on"):
            raise ValueError(f"MLXQ_BUILD_CUDA={mode} but {missing}")
        return False, f"{missing}: not building the CUDA backend"
    return True, f"CUDA {torch_cuda_version}: building the CUDA backend with {nvcc}"


def cuda_arch_flags(
    torch_arch_flags: str, nvcc_archs: Sequence[str], env: Mapping[str, str]
) -> tuple[list[str], str]:
    """nvcc -gencode flags: the architectures torch was built for plus sm_90 (as sm_90a), as
    machine code, and PTX of the newest one (so newer GPUs can run it), limited to what this
    nvcc knows.

    `torch_arch_flags` is torch's own list ("sm_80 sm_90 ..."); MLXQ_CUDA_ARCHS ("90" or
    "80;90") replaces it, e.g. to build only for the GPU at hand.
    """
    override = env.get("MLXQ_CUDA_ARCHS", "").strip()
    source = override if override else torch_arch_flags
    archs = {int(m) for m in re.findall(r"(?:sm_|compute_)?(\d{2,3})", source)}
    if not override:
        archs.add(90)
    known = {int(m) for m in re.findall(r"compute_(\d{2,3})", " ".join(nvcc_archs))}
    if known:
        archs &= known
    if not archs:
        raise ValueError(f"no CUDA architecture to build for (from {source!r})")
    # sm_90 machine code is built as sm_90a (runs on every compute capability 9.0 GPU), whose
    # wgmma instructions the fused prefill kernel needs; MLXQ_CUDA_SM90A tells the host code.
    flags = [
        "-gencode=arch=compute_90a,code=sm_90a"
        if a == 90
        else f"-gencode=arch=compute_{a},code=sm_{a}"
        for a in sorted(archs)
    ]
    newest = max(archs)
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    if 90 in archs:
        flags.append("-DMLXQ_CUDA_SM90A=1")
    names = " ".join("sm_90a" if a == 90 else f"sm_{a}" for a in sorted(archs))
    return flags, "CUDA architectures: " + names


def nvcc_archs(nvcc: Path, run: Callable[..., subprocess.CompletedProcess] = subprocess.run):
    """The virtual architectures this nvcc can target (`nvcc --list-gpu-arch`), or []."""
    try:
        res = run([str(nvcc), "--list-gpu-arch"], capture_output=True, text=True)
    except OSError:
        return []
    return res.stdout.split() if res.returncode == 0 else []


def native_link_args(platform: str, mps_built: bool) -> list[str]:
    return list(OBJCXX_LINK_ARGS) if builds_objcxx(platform, mps_built) else []


def openmp_flags(
    platform: str,
    torch_uses_openmp: bool,
    torch_lib_dir: Path,
    env: Mapping[str, str],
    is_file: Callable[[Path], bool] = Path.is_file,
) -> tuple[list[str], list[str], str]:
    """(compile flags, link flags, why) that make `at::parallel_for` run on torch's threads.

    With torch's OpenMP backend, `at::parallel_for` is inline code around `#pragma omp
    parallel`: an extension compiled without OpenMP silently runs it on one thread. On Linux
    `-fopenmp` links `libgomp.so.1`, which resolves to the copy torch already loaded (same
    soname), so mlxq shares torch's thread pool and `torch.set_num_threads`. Apple clang needs an
    `omp.h` from elsewhere (OMP_PREFIX or Homebrew's libomp) and links torch's own libomp.dylib,
    so that one OpenMP runtime is loaded; without a header the CPU kernels run on one thread.
    """
    if not torch_uses_openmp:
        return [], [], "torch's parallel backend is not OpenMP: no OpenMP flags needed"
    if platform != "darwin":
        return ["-fopenmp"], ["-fopenmp"], "OpenMP: -fopenmp, sharing torch's libgomp"
    prefixes = [env.get("OMP_PREFIX", ""), "/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"]
    includes = [Path(p) / "include" for p in prefixes if p]
    include = next((d for d in includes if is_file(d / "omp.h")), None)
    libomp = Path(torch_lib_dir) / "libomp.dylib"
    if include is None or not is_file(libomp):
        missing = "omp.h (set OMP_PREFIX or `brew install libomp`)" if include is None else libomp
        return [], [], f"no OpenMP build: {missing} not found; CPU kernels run on one thread"
    cflags = ["-Xpreprocessor", "-fopenmp", "-I", str(include)]
    ldflags = [f"-L{torch_lib_dir}", "-lomp", f"-Wl,-rpath,{torch_lib_dir}"]
    return cflags, ldflags, f"OpenMP: {include}/omp.h, linking torch's {libomp}"


def metal_sources(root: Path) -> list[Path]:
    """Every metal/*.metal, sorted (each becomes one .air)."""
    return sorted((Path(root) / "metal").glob("*.metal"))


def metal_files(root: Path) -> list[Path]:
    """Kernel sources and the headers they include (what the runtime fallback needs)."""
    d = Path(root) / "metal"
    return sorted([*d.glob("*.metal"), *d.glob("*.h")])


def metal_build_decision(platform: str, env: Mapping[str, str]) -> tuple[bool, bool, str]:
    """(build the metallib?, is a failure fatal?, why) from the platform and MLXQ_BUILD_METAL.

    MLXQ_BUILD_METAL: unset/auto (build on macOS, fall back to run-time compilation if the
    Metal toolchain fails), 1/require (fail the build instead), 0/off (skip).
    """
    mode = env.get("MLXQ_BUILD_METAL", "auto").strip().lower() or "auto"
    if mode not in ("auto", "1", "require", "on", "0", "off"):
        raise ValueError(f"MLXQ_BUILD_METAL must be auto, require/1 or off/0, got {mode!r}")
    if mode in ("0", "off"):
        return False, False, "MLXQ_BUILD_METAL=off: not building mlxq.metallib"
    if platform != "darwin":
        why = f"not macOS ({platform}): skipping mlxq.metallib and the Objective-C++ MPS backend"
        if mode in ("1", "require", "on"):
            raise ValueError(f"MLXQ_BUILD_METAL={mode} but {why}")
        return False, False, why
    return True, mode in ("1", "require", "on"), "macOS: building mlxq.metallib"


def metallib_commands(root: Path, air_dir: Path, out: Path) -> list[list[str]]:
    """xcrun commands: every .metal to .air (MSL 3.1, macOS 14 target), then one metallib."""
    metal_dir = Path(root) / "metal"
    cmds: list[list[str]] = []
    airs: list[str] = []
    for src in metal_sources(root):
        air = Path(air_dir) / (src.stem + ".air")
        airs.append(str(air))
        cmds.append(
            [
                "xcrun",
                "-sdk",
                "macosx",
                "metal",
                f"-std={METAL_STD}",
                f"-mmacosx-version-min={MACOS_MIN}",
                *METAL_FLAGS,
                "-I",
                str(metal_dir),
                "-c",
                str(src),
                "-o",
                str(air),
            ]  # fmt: skip
        )
    cmds.append(["xcrun", "-sdk", "macosx", "metallib", *airs, "-o", str(out)])
    return cmds


def metallib_is_stale(root: Path, out: Path) -> bool:
    """True when `out` is missing or older than any metal/ source or header."""
    out = Path(out)
    if not out.exists():
        return True
    newest = max((p.stat().st_mtime for p in metal_files(root)), default=0.0)
    return out.stat().st_mtime < newest


def build_metallib(
    root: Path,
    air_dir: Path,
    out: Path,
    required: bool,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    log: Callable[[str], None] = print,
) -> bool:
    """Runs :func:`metallib_commands`; returns whether `out` was built (or is up to date).

    A failing Metal toolchain (no Xcode, or Xcode 26 without its separately downloaded Metal
    toolchain) is reported once and, unless `required`, leaves the run-time fallback in charge.
    """
    if not metal_sources(root):
        raise FileNotFoundError(f"no .metal sources in {Path(root) / 'metal'}")
    if not metallib_is_stale(root, out):
        return True
    Path(air_dir).mkdir(parents=True, exist_ok=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    for cmd in metallib_commands(root, air_dir, out):
        try:
            res = run(cmd, capture_output=True, text=True)
            failed, detail = res.returncode != 0, (res.stderr or res.stdout or "").strip()
        except OSError as exc:  # xcrun itself is missing
            failed, detail = True, str(exc)
        if failed:
            msg = (
                f"mlxq: building {METALLIB_NAME} failed at `{' '.join(cmd[:4])} ...`:\n{detail}\n"
                "Install the Xcode command line tools (and on Xcode 26: "
                "`xcodebuild -downloadComponent MetalToolchain`)."
            )
            if required:
                raise RuntimeError(msg)
            log(msg + "\nmlxq: the Metal kernels will be compiled at run time instead.")
            return False
    log(f"mlxq: built {out}")
    return True


def copy_metal_sources(root: Path, dest: Path) -> list[Path]:
    """Copies metal/*.metal and metal/*.h into `dest` (the package's `metal/` in a wheel), so
    that an installed package can compile its kernels at run time."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for src in metal_files(root):
        target = dest / src.name
        shutil.copy2(src, target)
        copied.append(target)
    return copied


__all__: Sequence[str] = [
    "METAL_STD",
    "MACOS_MIN",
    "METALLIB_NAME",
    "builds_objcxx",
    "native_sources",
    "native_macros",
    "native_link_args",
    "cuda_build_decision",
    "cuda_arch_flags",
    "nvcc_archs",
    "openmp_flags",
    "metal_sources",
    "metal_files",
    "metal_build_decision",
    "metallib_commands",
    "metallib_is_stale",
    "build_metallib",
    "copy_metal_sources",
]
