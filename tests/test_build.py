"""The build logic of setup.py / CMakeLists.txt: native sources per platform, OpenMP (and that
the built kernels run on torch's threads), the
metallib, the Metal sources shipped with the package, the Objective-C++ backend against the
Metal declarations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from metal_backend_helpers import (
    METAL_DIR,
    ROOT,
)
from mlxq import _build_helpers as bh
from mlxq._native import _C
from mlxq.metal import backend as mb

# --- build: the platform logic of setup.py / CMakeLists.txt ---------------------------------


def test_python_module_binds_only_through_each_backends_register_function() -> None:
    """ops.cpp's PYBIND11_MODULE defines no function itself: each backend binds its own
    (the CPU's ISA switches from csrc/cpu/bindings.cpp, as composite/ and metal_host/ do), and
    the names the Python layer reads are still exported."""
    import re

    text = (ROOT / "csrc" / "ops.cpp").read_text()
    body = text[text.index("PYBIND11_MODULE") :]
    calls = [
        c.strip() for c in body[body.index("{") + 1 : body.rindex("}")].split(";") if c.strip()
    ]
    assert calls[0].startswith("m.doc()")
    assert all(re.fullmatch(r"mlxq::(\w+::)?register_\w+_bindings\(m\)", c) for c in calls[1:]), (
        calls
    )
    assert "mlxq::cpu::register_cpu_bindings(m)" in calls
    assert "csrc/cpu/bindings.cpp" in bh.read_source_list(ROOT)
    for name in ("set_cpu_isa", "cpu_isa", "cpu_threaded", "cpu_vector_exp"):
        assert callable(getattr(_C, name)), name


def test_native_sources_per_platform() -> None:
    listed = bh.read_source_list(ROOT)
    mm = [f for f in listed if f.endswith(".mm")]
    cu = [f for f in listed if f.endswith(".cu")]  # CUDA builds only (tests/test_cuda_ops.py)
    assert "csrc/mps/affine_mps.mm" in mm
    plain = [f for f in listed if f not in mm and f not in cu]
    assert bh.native_sources(ROOT, "linux", True) == plain
    assert bh.native_sources(ROOT, "darwin", True) == [f for f in listed if f not in cu]
    assert bh.native_sources(ROOT, "darwin", False) == plain
    for f in listed:
        assert (ROOT / f).is_file(), f
    assert bh.native_macros("darwin", True) == [("MLXQ_WITH_MPS", "1")]
    assert bh.native_macros("linux", True) == bh.native_macros("darwin", False) == []
    assert "Metal" in bh.native_link_args("darwin", True)
    assert bh.native_link_args("linux", True) == []


def test_openmp_flags() -> None:
    lib = Path("/torch/lib")
    assert bh.openmp_flags("linux", False, lib, {})[:2] == ([], [])
    assert bh.openmp_flags("linux", True, lib, {})[:2] == (["-fopenmp"], ["-fopenmp"])
    # macOS: a header from OMP_PREFIX (or Homebrew) and torch's own libomp.dylib, or no OpenMP.
    have = {Path("/omp/include/omp.h"), lib / "libomp.dylib"}
    cflags, ldflags, why = bh.openmp_flags(
        "darwin", True, lib, {"OMP_PREFIX": "/omp"}, have.__contains__
    )
    assert cflags == ["-Xpreprocessor", "-fopenmp", "-I", "/omp/include"]
    assert ldflags == ["-L/torch/lib", "-lomp", "-Wl,-rpath,/torch/lib"] and "libomp" in why
    cflags, ldflags, why = bh.openmp_flags("darwin", True, lib, {}, lambda p: False)
    assert (cflags, ldflags) == ([], []) and "omp.h" in why and "one thread" in why
    only_header = {Path("/opt/homebrew/opt/libomp/include/omp.h")}.__contains__
    assert bh.openmp_flags("darwin", True, lib, {}, only_header)[:2] == ([], [])


def test_metal_build_decision() -> None:
    assert bh.metal_build_decision("darwin", {}) == (True, False, "macOS: building mlxq.metallib")
    assert bh.metal_build_decision("darwin", {"MLXQ_BUILD_METAL": "require"})[:2] == (True, True)
    assert bh.metal_build_decision("darwin", {"MLXQ_BUILD_METAL": "0"})[:2] == (False, False)
    build, required, why = bh.metal_build_decision("linux", {})
    assert (build, required) == (False, False) and "not macOS" in why
    with pytest.raises(ValueError, match="not macOS"):
        bh.metal_build_decision("linux", {"MLXQ_BUILD_METAL": "1"})
    with pytest.raises(ValueError, match="MLXQ_BUILD_METAL"):
        bh.metal_build_decision("darwin", {"MLXQ_BUILD_METAL": "maybe"})


def test_metallib_commands(tmp_path: Path) -> None:
    cmds = bh.metallib_commands(ROOT, tmp_path / "air", tmp_path / "mlxq.metallib")
    sources = sorted(METAL_DIR.glob("*.metal"))
    assert len(sources) >= 4 and len(cmds) == len(sources) + 1
    airs = []
    for cmd, src in zip(cmds, sources, strict=False):
        assert cmd[:4] == ["xcrun", "-sdk", "macosx", "metal"]
        assert "-std=metal3.1" in cmd and "-mmacosx-version-min=14.0" in cmd
        assert "-fno-fast-math" in cmd  # bit-exact quantization
        assert cmd[cmd.index("-c") + 1] == str(src)
        airs.append(cmd[cmd.index("-o") + 1])
        assert airs[-1].endswith(src.stem + ".air")
    assert cmds[-1] == [
        "xcrun",
        "-sdk",
        "macosx",
        "metallib",
        *airs,
        "-o",
        str(tmp_path / "mlxq.metallib"),
    ]
    # CMakeLists.txt builds the same library with the same flags.
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for flag in (f"-std={bh.METAL_STD}", f"-mmacosx-version-min={bh.MACOS_MIN}", *bh.METAL_FLAGS):
        assert flag in cmake, flag


def _fake_run(fail_at: int | None = None, exc: Exception | None = None):
    calls: list[list[str]] = []

    def run(cmd, capture_output, text):
        calls.append(cmd)
        if exc is not None:
            raise exc
        if fail_at is not None and len(calls) - 1 == fail_at:
            return subprocess.CompletedProcess(cmd, 1, "", "error: cannot execute tool 'metal'")
        Path(cmd[cmd.index("-o") + 1]).write_bytes(b"x")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run, calls


def test_build_metallib_success_failure_and_staleness(tmp_path: Path) -> None:
    out, air = tmp_path / "pkg" / "mlxq.metallib", tmp_path / "air"
    logs: list[str] = []
    run, calls = _fake_run()
    assert bh.build_metallib(ROOT, air, out, required=False, run=run, log=logs.append)
    assert calls == bh.metallib_commands(ROOT, air, out) and out.is_file()
    run, calls = _fake_run()  # up to date: nothing runs
    assert bh.build_metallib(ROOT, air, out, required=False, run=run, log=logs.append)
    assert calls == []

    out.unlink()
    logs.clear()
    run, calls = _fake_run(fail_at=1)
    assert not bh.build_metallib(ROOT, air, out, required=False, run=run, log=logs.append)
    assert len(calls) == 2 and len(logs) == 1  # stops at the failure, says so once
    assert "cannot execute tool" in logs[0] and "run time" in logs[0]
    with pytest.raises(RuntimeError, match="cannot execute tool"):
        bh.build_metallib(ROOT, air, out, required=True, run=_fake_run(fail_at=0)[0], log=print)
    logs.clear()
    run, _ = _fake_run(exc=FileNotFoundError("xcrun"))
    assert not bh.build_metallib(ROOT, air, out, required=False, run=run, log=logs.append)
    assert len(logs) == 1 and "xcrun" in logs[0]


def test_metal_sources_ship_with_the_package(tmp_path: Path) -> None:
    # Wheel layout: build_py copies metal/ into mlxq/metal next to the package's modules.
    pkg = tmp_path / "site-packages" / "mlxq"
    copied = bh.copy_metal_sources(ROOT, pkg / "metal")
    assert sorted(p.name for p in copied) == sorted(p.name for p in bh.metal_files(ROOT))
    for p in copied:
        assert p.read_bytes() == (METAL_DIR / p.name).read_bytes()
    assert mb.metal_source_dir(pkg) == pkg / "metal"
    # Editable layout: python/mlxq -> the repository's metal/.
    assert mb.metal_source_dir(ROOT / "python" / "mlxq") == METAL_DIR
    assert mb.metal_source_dir(tmp_path / "nowhere" / "x" / "mlxq") is None
    # pyproject ships what build_py copies.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"metal/*.metal"' in pyproject and '"metal/*.h"' in pyproject
    assert '"*.metallib"' in pyproject


def test_setup_py_says_once_that_linux_skips_metal() -> None:
    if sys.platform == "darwin":
        pytest.skip("checks the non-macOS branch of setup.py")
    res = subprocess.run(
        [sys.executable, "setup.py", "--name"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("skipping mlxq.metallib") == 1


def test_objective_cxx_backend_compiles_against_metal_declarations() -> None:
    """csrc/mps/affine_mps.mm with torch's real headers and stand-ins for Apple's Metal headers
    (tests/mps_stubs: Apple's selectors and types for what the file uses): C++/Objective-C++
    errors, wrong selectors (-Werror=objc-method-access) and kernel signatures that do not
    match the op schemas (TORCH_FN) fail here instead of on the first Mac build."""
    from mlxq.testing.metal_emulator import _build

    found = _build.find_compiler()
    if found is None:
        pytest.skip("no clang >= 17 (pip install ziglang)")
    import sysconfig

    inc = Path(torch.__file__).parent / "include"
    cmd = [*found[0], "-x", "objective-c++", "-fblocks", "-fsyntax-only", "-std=c++17",
           "-Wno-c++20-extensions", "-Werror=objc-method-access", "-DMLXQ_WITH_MPS=1",
           "-I", str(ROOT / "tests" / "mps_stubs"), "-I", str(ROOT / "csrc"), "-I", str(inc),
           "-I", str(inc / "torch" / "csrc" / "api" / "include"),
           "-I", sysconfig.get_paths()["include"], str(ROOT / "csrc/mps/affine_mps.mm"),
           ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    # zig reports a bogus "failed to rename" of the (never written) object after -fsyntax-only.
    errors = [
        ln for ln in res.stderr.splitlines() if "error" in ln and "failed to rename" not in ln
    ]
    assert not errors, res.stderr[-4000:]


def test_cpu_kernels_run_on_torchs_threads():
    # With torch's OpenMP backend, at::parallel_for is inline OpenMP: a build without -fopenmp
    # silently runs every kernel on one thread. The build decides with openmp_flags; the only
    # unthreaded build it allows is macOS without an omp.h, and it says so.
    uses_openmp = torch.backends.openmp.is_available()
    cflags, _, why = bh.openmp_flags(
        sys.platform, uses_openmp, Path(torch.__file__).parent / "lib", os.environ
    )
    expected = not uses_openmp or bool(cflags)
    assert _C.cpu_threaded() == expected, f"threaded build expected ({why})"


def test_sdist_carries_every_native_and_python_source(tmp_path: Path) -> None:
    """An sdist must rebuild every backend: all of csrc/ (the CUDA .cu / .cuh too) and metal/."""
    src = tmp_path / "src"
    for name in ("setup.py", "CMakeLists.txt", "pyproject.toml", "README.md", "MANIFEST.in"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((ROOT / name).read_bytes())
    wanted = []
    for top, keep in (("csrc", None), ("metal", None), ("python/mlxq", ".py")):
        for p in sorted((ROOT / top).rglob("*")):
            if not p.is_file() or "__pycache__" in p.parts or (keep and p.suffix != keep):
                continue
            rel = p.relative_to(ROOT).as_posix()
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(p.read_bytes())
            wanted.append(rel)
    assert any(w.endswith(".cuh") for w in wanted) and any(w.endswith(".cu") for w in wanted)
    res = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    import tarfile

    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = [w for w in wanted if w not in shipped]
    assert not missing, f"the sdist lacks {missing[:10]} ({len(missing)} files)"
