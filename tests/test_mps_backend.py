"""The MPS backend: build logic, the launch every Metal path executes, the run-time fallback,
the choice of path, backend_info/doctor; and, on a Mac with MPS, every op on MPS vs the CPU op.

Without a Mac, the Metal side is checked by construction: the launch (plan + bound tensors +
outputs) that the Objective-C++ backend encodes is run in the MSL emulator; the source that the
run-time fallback hands to torch.mps.compile_shader is compiled and run by the emulator through a
fake compile_shader that binds arguments as torch's does (argument i -> buffer(i), `threads` =
total threads, `group_size` = threads per threadgroup, int32 `arg_casts`); the choice of path
runs against fakes for every MLXQ_METAL value and failure mode.
"""

from __future__ import annotations

import logging
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlxq
import pytest
import torch
from mlxq import _build_helpers as bh
from mlxq._native import _C
from mlxq.metal import backend as mb
from mlxq.metal import runtime as rt
from mlxq.testing import metal_emulator as emu
from oracles import dequantize_ref

ROOT = Path(__file__).resolve().parents[1]
METAL_DIR = ROOT / "metal"
HAS_MPS = torch.backends.mps.is_available()
needs_emu = pytest.mark.skipif(not emu.available(), reason="no clang for the MSL emulator")
needs_mps = pytest.mark.skipif(not HAS_MPS, reason="needs an Apple GPU (MPS)")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MSL = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat"}
OUT_EPS = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.uint32 else t


def _assert_matmul_close(y, x, wq, s, b, gs, bits, transpose) -> None:
    """y (from a Metal kernel) vs the CPU op: one output rounding plus fp32 accumulation noise
    relative to sum |x| |w| (the bound of tests/test_metal_kernels.py)."""
    ref = mlxq.affine_matmul(x.cpu(), wq.cpu(), s.cpu(), b.cpu(), gs, bits, transpose)
    y = y.cpu()
    assert y.shape == ref.shape and y.dtype == ref.dtype
    q = mlxq.affine_dequantize(
        wq.cpu(), torch.ones_like(s.cpu()), torch.zeros_like(b.cpu()), gs, bits
    )
    w = s.cpu().float().abs().repeat_interleave(gs, -1) * q.float()
    w = w + b.cpu().float().abs().repeat_interleave(gs, -1)
    absprod = (x.cpu().float().abs() @ (w.transpose(-1, -2) if transpose else w)).reshape(ref.shape)
    bound = OUT_EPS[x.dtype] * ref.float().abs() + 2e-6 * absprod + 1e-30
    assert not y.isnan().any(), "some outputs were never written"
    assert ((y.float() - ref.float()).abs() <= bound).all()


def _weights(gen, n, k, gs, bits, dtype, device="cpu"):
    w = torch.randn(n, k, generator=gen).to(dtype)
    return [t.to(device) for t in mlxq.affine_quantize(w, gs, bits)]


# --- build: the platform logic of setup.py / CMakeLists.txt ---------------------------------


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


# --- the plan and the launch, as Python sees them -------------------------------------------


def _all_plans():
    meta = {"device": "meta"}
    for dtype in DTYPES:
        for gs in (32, 64, 128):
            for bits in (2, 3, 4, 5, 6, 8):
                wq = torch.empty(40, 2 * gs * bits // 32, dtype=torch.uint32, **meta)
                s = torch.empty(40, 2, dtype=dtype, **meta)
                yield _C.plan_affine_quantize(torch.empty(3, 2 * gs, dtype=dtype, **meta), gs, bits)
                yield _C.plan_affine_dequantize(wq, s, s, gs, bits)
                for m in (1, 8, 9, 100):
                    for transpose, width in ((True, 2 * gs), (False, 40)):
                        x = torch.empty(m, width, dtype=dtype, **meta)
                        yield _C.plan_affine_matmul(x, wq, s, s, gs, bits, transpose)


def test_plans_fit_metal_and_compile_shader() -> None:
    kinds = set()
    for plan in _all_plans():
        kinds.add(plan["kernel"].split("_")[1])
        indices = sorted(i for i, _ in plan["bindings"])
        assert indices == list(range(len(indices))), plan["kernel"]  # compile_shader's order
        assert [r for _, r in plan["bindings"]].count("params") == 1
        t = plan["threads"]
        assert t[0] * t[1] * t[2] <= 1024 and t[0] % 32 == 0, plan["kernel"]
        for _, nbytes in plan["threadgroup_memory"]:
            assert 0 < nbytes <= 32768 and nbytes % 16 == 0, plan["kernel"]  # Metal's limits
        assert len(plan["params"]) % 4 == 0  # int32 fields (sent as int32 arg_casts)
        assert all(g >= 1 for g in plan["grid"])
    assert kinds == {"quantize", "dequantize", "qmv", "qvm", "qmm"}


def test_every_planned_kernel_is_instantiated_in_metal_sources() -> None:
    expected = mb.expected_kernel_names()
    defined = rt.instantiated_kernels(METAL_DIR)
    # affine: (quantize, dequantize, qmv, qvm, qmm_t, qmm_n + their 4 gather variants) x dtypes
    # x group sizes x bits (1-6, 8); float modes: (fp_qmv, fp_qmm_t, fp_qmm_n, fp_dequantize) x
    # dtypes x modes, + fp_dequantize of nvfp4 with a global scale for half and bfloat, +
    # fp_quantize x dtypes x modes
    assert len(expected) == (6 + 4) * 3 * 3 * 7 + 4 * 3 * 3 + 2 + 3 * 3
    assert expected <= set(defined), sorted(expected - set(defined))[:5]


def test_launch_binds_converted_operands_and_allocates_outputs(gen) -> None:
    gs, bits = 64, 4
    wq, s, b = _weights(gen, 16, 2 * gs, gs, bits, torch.float32)
    x = torch.randn(3, 2 * 2 * gs, generator=gen).to(torch.bfloat16)[:, ::2]  # strided view
    wq32 = wq.view(torch.int32)
    launch = _C.metal_launch_affine_matmul(x, wq32, s, b, gs, bits, True)
    plan = _C.plan_affine_matmul(x, wq32, s, b, gs, bits, True)
    assert launch["kernel"] == plan["kernel"] == "affine_qmv_bfloat_gs64_b4"
    assert launch["grid"] == plan["grid"] and launch["threads"] == plan["threads"]
    bufs = launch["buffers"]
    assert sorted(bufs) == [0, 1, 2, 3, 4, 5] and bufs[launch["params_index"]] == plan["params"]
    roles = dict(plan["bindings"])
    by_role = {roles[i]: t for i, t in bufs.items() if roles[i] != "params"}
    assert all(t.is_contiguous() for t in by_role.values())
    assert torch.equal(by_role["x"], x.contiguous())
    assert by_role["scales"].dtype == by_role["biases"].dtype == torch.bfloat16  # x's dtype
    assert torch.equal(_bits(by_role["wq"]), wq32)
    (out,) = launch["outputs"]
    assert out is by_role["out"] or out.data_ptr() == by_role["out"].data_ptr()
    assert out.shape == (3, 16) and out.dtype == torch.bfloat16

    q = _C.metal_launch_affine_quantize(torch.randn(2, 3, gs, generator=gen), gs, 3)
    assert [tuple(o.shape) for o in q["outputs"]] == [(2, 3, 6), (2, 3, 1), (2, 3, 1)]
    assert q["outputs"][0].dtype == torch.uint32
    # Nothing to launch, but an empty reduction still sums to zeros.
    e = _C.metal_launch_affine_matmul(torch.randn(2, 0), wq[:0], s[:0], b[:0], gs, bits, False)
    assert e["empty"] and torch.equal(e["outputs"][0], torch.zeros(2, 2 * gs))


def test_launch_rejects_bad_input_with_the_shared_checks(gen) -> None:
    wq, s, b = _weights(gen, 8, 64, 64, 4, torch.float32)
    with pytest.raises(ValueError, match="group_size"):
        _C.metal_launch_affine_matmul(torch.randn(1, 64), wq, s, b, 48, 4, True)
    with pytest.raises(ValueError, match="x"):
        _C.metal_launch_affine_matmul(torch.randn(1, 65), wq, s, b, 64, 4, True)


def test_native_encoder_call_sequence(gen) -> None:
    """The calls affine_mps.mm makes on the MTLComputeCommandEncoder (recorded): every tensor at
    its buffer index and storage offset in bytes, the params bytes, threadgroup memory, one
    dispatch of the plan's grid; and the pipeline/device checks before encoding."""
    gs, bits = 32, 5
    wq, s, b = _weights(gen, 48, 4 * gs, gs, bits, torch.float16)
    x = torch.randn(40, 4 * gs, generator=gen).to(torch.float16)
    wq_v, s_v, b_v, x_v = wq[8:], s[8:], b[8:], x[4:]  # contiguous views at offsets: no copies
    calls = _C.metal_encode_trace_affine_matmul(x_v, wq_v, s_v, b_v, gs, bits, True)
    plan = _C.plan_affine_matmul(x_v, wq_v, s_v, b_v, gs, bits, True)
    assert plan["kernel"] == "affine_qmm_t_half_gs32_b5"
    roles = dict(plan["bindings"])
    set_buffers = {c[1]: c for c in calls if c[0] == "set_buffer"}
    assert sorted(set_buffers) == sorted(i for i, r in roles.items() if r != "params")
    expect = {"x": x_v, "wq": wq_v, "scales": s_v, "biases": b_v}
    for index, (_, _, t, offset) in set_buffers.items():
        assert offset == t.storage_offset() * t.element_size()
        if roles[index] in expect:  # bound in place, at the view's offset
            src = expect[roles[index]]
            assert t.data_ptr() == src.data_ptr() and offset > 0
    (params,) = [c for c in calls if c[0] == "set_bytes"]
    assert params[1] == dict((r, i) for i, r in plan["bindings"])["params"]
    assert params[2] == plan["params"]
    tgm = [(c[1], c[2]) for c in calls if c[0] == "set_threadgroup_memory"]
    assert tgm == [(i, -(-n // 16) * 16) for i, n in plan["threadgroup_memory"]] and tgm
    assert calls[-1] == ("dispatch_threadgroups", plan["grid"], plan["threads"])
    assert [c[0] for c in calls].count("dispatch_threadgroups") == 1

    with pytest.raises(RuntimeError, match="affine_qmm_t_half_gs32_b5 needs 128 threads"):
        _C.metal_encode_trace_affine_matmul(x_v, wq_v, s_v, b_v, gs, bits, True, max_threads=64)
    with pytest.raises(RuntimeError, match="bytes of threadgroup memory, the device allows 8192"):
        _C.metal_encode_trace_affine_matmul(
            x_v, wq_v, s_v, b_v, gs, bits, True, max_threadgroup_bytes=8192
        )
    with pytest.raises(ValueError, match="buffer 0 is on cpu, expected MPS"):
        _C.metal_encode_trace_affine_matmul(x_v, wq_v, s_v, b_v, gs, bits, True, device="mps")
    empty = _C.metal_encode_trace_affine_matmul(x[:0], wq, s, b, gs, bits, True)
    assert empty == []  # nothing to launch: nothing encoded


# --- the launch in the emulator: what the native backend encodes ----------------------------

CASES = [  # (op, bits, gs, dtype, M, transpose)
    ("matmul", 4, 64, torch.bfloat16, 3, True),  # qmv
    ("matmul", 3, 32, torch.float16, 2, False),  # qvm (threadgroup memory)
    ("matmul", 6, 128, torch.float32, 33, True),  # qmm_t (threadgroup memory)
    ("matmul", 5, 64, torch.bfloat16, 20, False),  # qmm_n
    ("quantize", 6, 32, torch.float16, 0, True),
    ("dequantize", 5, 128, torch.bfloat16, 0, True),
]
CASE_IDS = [f"{c[0]}-b{c[1]}-gs{c[2]}-{MSL[c[3]]}-m{c[4]}-{'t' if c[5] else 'n'}" for c in CASES]


def _run_op(case, gen, runner, device="cpu"):
    """Runs one case through `runner(launch)`; returns (got outputs, want outputs)."""
    op, bits, gs, dtype, m, transpose = case
    if op == "quantize":
        w = torch.randn(5, 3 * gs, generator=gen).to(dtype)
        launch = _C.metal_launch_affine_quantize(w.to(device), gs, bits)
        runner(launch)
        return launch["outputs"], mlxq.affine_quantize(w, gs, bits)
    n, k = 20, 2 * gs
    wq, s, b = _weights(gen, n, k, gs, bits, dtype, device)
    if op == "dequantize":
        launch = _C.metal_launch_affine_dequantize(wq, s, b, gs, bits)
        runner(launch)
        # the Metal kernel rounds s*q+b once (the CPU op rounds twice, as mx.dequantize does):
        # held to the float64 value rounded once
        want = dequantize_ref(wq.cpu(), s.cpu(), b.cpu(), gs, bits).to(dtype)
        return launch["outputs"], (want,)
    x = torch.randn(m, k if transpose else n, generator=gen).to(dtype).to(device)
    launch = _C.metal_launch_affine_matmul(x, wq, s, b, gs, bits, transpose)
    for t in launch["outputs"]:
        t.fill_(float("nan"))  # an element the kernel forgets cannot pass by luck
    runner(launch)
    _assert_matmul_close(launch["outputs"][0], x, wq, s, b, gs, bits, transpose)
    return None, None


def _check(got, want) -> None:
    if got is None:
        return
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        if g.dtype == torch.uint32 or g.numel() == 0:
            assert torch.equal(_bits(g.cpu()), _bits(w))
        else:  # dequantize: one rounding of the same fp32 value
            torch.testing.assert_close(g.cpu(), w, rtol=OUT_EPS[g.dtype], atol=0)


def _emulate_launch(launch) -> None:
    tgm = dict(launch["threadgroup_memory"]) or None
    emu.dispatch(launch["kernel"], launch["grid"], launch["threads"], launch["buffers"], tgm)


@needs_emu
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_native_launch_in_emulator(case, gen) -> None:
    _check(*_run_op(case, gen, _emulate_launch))


# --- the run-time fallback: the source compile_shader gets, and its argument binding ---------


class FakeKernel:
    """torch's _mps_MetalKernel.__call__ as read in torch/csrc/mps/Module.cpp: argument i is
    [[buffer(i)]] (tensors by buffer, int lists by setBytes after `arg_casts`), and the launch
    is dispatchThreads(threads, group_size). Executed by the emulator."""

    def __init__(self, lib: emu.Library, name: str, calls: list):
        self.lib, self.name, self.calls = lib, name, calls

    def __call__(self, *args, threads=None, group_size=None, arg_casts=None, error_buf_idx=None):
        """__call__(self, *args, threads=None, group_size=None, arg_casts=None)"""
        self.calls.append({"threads": threads, "group_size": group_size, "arg_casts": arg_casts})
        assert len(threads) == len(group_size) == 3
        assert all(t % g == 0 for t, g in zip(threads, group_size, strict=True))
        buffers: dict[int, Any] = {}
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                buffers[i] = a
            else:
                assert isinstance(a, list) and (arg_casts or {}).get(i) == "int32"
                buffers[i] = struct.pack(f"<{len(a)}i", *a)
        grid = [t // g for t, g in zip(threads, group_size, strict=True)]
        self.lib.dispatch(self.name, grid, group_size, buffers)


class FakeKernelOldTorch(FakeKernel):
    def __call__(self, *args, threads=None, group_size=None):
        """__call__(self, *args, threads=None, group_size=None)"""
        self.calls.append({"threads": threads, "group_size": group_size})
        # The params arrive as an int32 tensor bound to the `constant Params&` parameter.
        constant = {p.index for p in self.lib.kernels[self.name].params if "constant" in p.decl}
        args = [a.tolist() if i in constant else a for i, a in enumerate(args)]
        casts = {i: "int32" for i, a in enumerate(args) if isinstance(a, list)}
        return super().__call__(*args, threads=threads, group_size=group_size, arg_casts=casts)


class FakeCompileShader:
    """torch.mps.compile_shader for the emulator: compiles the source as one .metal file."""

    def __init__(self, tmp: Path, kernel_cls=FakeKernel):
        self.tmp, self.kernel_cls = tmp, kernel_cls
        self.sources: list[str] = []
        self.calls: list[dict] = []

    def __call__(self, source: str):
        source.encode("ascii")  # torch reads the source as ASCII
        self.sources.append(source)
        path = self.tmp / f"rt{len(self.sources)}.metal"
        path.write_text(source)
        lib = emu.Library([path])  # not emu.load_library: keep the session's kernels as they are
        return SimpleNamespace(**{n: self.kernel_cls(lib, n, self.calls) for n in lib.kernels})


def test_runtime_source_is_one_kernel_without_host_threadgroup_memory() -> None:
    name = "affine_qvm_half_gs32_b3"
    src = rt.runtime_source(name, METAL_DIR, {0: 14336})
    assert '#include "' not in src and "#pragma once" not in src
    assert src.count('MLXQ_INSTANTIATE("') == 1 and f'MLXQ_INSTANTIATE("{name}"' in src
    assert "[[threadgroup(" not in src
    assert "threadgroup float tg_storage[3584];" in src
    src.encode("ascii")
    with pytest.raises(RuntimeError, match="no size for threadgroup"):
        rt.runtime_source(name, METAL_DIR, {})
    with pytest.raises(RuntimeError, match="no MLXQ_INSTANTIATE"):
        rt.runtime_source("affine_qvm_half_gs48_b3", METAL_DIR, {})


@needs_emu
def test_runtime_source_passes_the_strict_address_space_check(tmp_path: Path) -> None:
    for name in ("affine_qvm_bfloat_gs64_b4", "affine_qmm_t_float_gs32_b5"):
        plan_tgm = {0: 16384}
        path = tmp_path / f"{name}.metal"
        path.write_text(rt.runtime_source(name, METAL_DIR, plan_tgm))
        emu.check_syntax_strict(path)


@needs_emu
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_runtime_fallback_in_emulator(case, gen, tmp_path: Path) -> None:
    fake = FakeCompileShader(tmp_path)
    runner = rt.RuntimeKernels(fake, METAL_DIR)
    _check(*_run_op(case, gen, runner.run))
    assert len(fake.sources) == 1 and len(fake.calls) == 1
    call = fake.calls[0]
    assert call["arg_casts"] and list(call["arg_casts"].values()) == ["int32"]
    _run_op(case, gen, runner.run)  # cached: no second compile
    assert len(fake.sources) == 1


@needs_emu
def test_runtime_fallback_on_torch_without_arg_casts(gen, tmp_path: Path) -> None:
    fake = FakeCompileShader(tmp_path, FakeKernelOldTorch)
    runner = rt.RuntimeKernels(fake, METAL_DIR)
    _check(*_run_op(CASES[0], gen, runner.run))
    assert "arg_casts" not in fake.calls[0]


def test_runtime_fallback_reports_compile_errors(tmp_path: Path) -> None:
    def broken(source: str):
        raise SyntaxError("program_source:3:1: error: unknown type name 'bfloat'")

    runner = rt.RuntimeKernels(broken, METAL_DIR)
    launch = _C.metal_launch_affine_quantize(torch.randn(2, 64), 64, 4)
    with pytest.raises(RuntimeError, match="affine_quantize_float_gs64_b4.*unknown type name"):
        runner.run(launch)


# --- choosing the Metal path -----------------------------------------------------------------

EXPECTED = {"affine_qmv_float_gs64_b4", "affine_quantize_float_gs64_b4"}


class FakeNative:
    def __init__(self, compiled=True, load_error="", names=EXPECTED):
        self.mps_native_compiled = compiled
        self.load_error, self.names = load_error, names
        self.loaded: list[str] = []
        self.registered = 0

    def mps_native_load(self, path: str) -> str:
        self.loaded.append(path)
        return self.load_error

    def mps_native_function_names(self) -> list[str]:
        return sorted(self.names)

    def mps_native_register(self) -> None:
        self.registered += 1


def _env(tmp_path, mps=True, native=None, metallib=True, sources=True, compile_shader=True):
    lib = tmp_path / "mlxq.metallib"
    if metallib:
        lib.write_bytes(b"MTLB")
    return mb.MetalEnv(
        mps_available=mps,
        native=native if native is not None else FakeNative(),
        metallib=lib,
        sources=METAL_DIR if sources else None,
        compile_shader=(lambda src: None) if compile_shader else None,
        expected=lambda: set(EXPECTED),
    )


def test_choice_prebuilt_when_it_loads(tmp_path) -> None:
    env = _env(tmp_path)
    c = mb.choose_path("auto", env)
    assert (c.path, c.attempts) == ("prebuilt", []) and env.native.loaded == [str(env.metallib)]
    assert mb.choose_path("prebuilt", _env(tmp_path)).path == "prebuilt"


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"native": FakeNative(compiled=False)}, "without the Objective-C++ MPS backend"),
        ({"metallib": False}, "does not exist"),
        ({"native": FakeNative(load_error="MSL 3.2 is not supported")}, "MSL 3.2 is not supported"),
        (
            {"native": FakeNative(names={"affine_qmv_float_gs64_b4"})},
            "lacks kernels affine_quantize",
        ),
    ],
    ids=["not-compiled", "no-metallib", "load-fails", "stale-metallib"],
)
def test_choice_falls_back_to_runtime(tmp_path, kwargs, why) -> None:
    c = mb.choose_path("auto", _env(tmp_path, **kwargs))
    assert c.path == "runtime" and "compile_shader" in c.reason
    assert len(c.attempts) == 1 and why in c.attempts[0]
    forced = mb.choose_path("prebuilt", _env(tmp_path, **kwargs))  # forced: no fallback
    assert (
        forced.path == "failed" and "MLXQ_METAL=prebuilt" in forced.reason and why in forced.reason
    )


def test_choice_forced_runtime_off_and_no_mps(tmp_path) -> None:
    env = _env(tmp_path)
    assert mb.choose_path("runtime", env).path == "runtime" and env.native.loaded == []
    assert mb.choose_path("off", env).path == "off" and env.native.loaded == []
    for req in ("auto", "prebuilt", "runtime", "off"):
        c = mb.choose_path(req, _env(tmp_path, mps=False))
        assert c.path == "unavailable" and "no MPS device" in c.reason
    c = mb.choose_path("fast", _env(tmp_path))
    assert c.path == "prebuilt" and "not one of" in c.attempts[0]


def test_choice_fails_with_every_reason(tmp_path) -> None:
    env = _env(tmp_path, native=FakeNative(compiled=False), compile_shader=False)
    c = mb.choose_path("auto", env)
    assert c.path == "failed" and "prebuilt:" in c.reason and "compile_shader" in c.reason
    c = mb.choose_path("runtime", _env(tmp_path, sources=False))
    assert c.path == "failed" and "MLXQ_METAL=runtime" in c.reason and "sources" in c.reason


def _has_mps_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"mlxq::{op}", "MPS")


@needs_emu
def test_install_registers_one_mps_kernel_per_op(tmp_path, gen, monkeypatch, caplog) -> None:
    if any(_has_mps_kernel(op) for op in rt.OPS):
        pytest.skip("this process already registered Metal kernels (a Mac)")
    fake = FakeCompileShader(tmp_path)
    env = _env(tmp_path, native=FakeNative(compiled=False))
    env = mb.MetalEnv(True, env.native, env.metallib, METAL_DIR, fake, env.expected)
    monkeypatch.setattr(mb, "_choice", None)
    lib = torch.library.Library("mlxq", "FRAGMENT")  # registrations die with it
    try:
        with caplog.at_level(logging.INFO, logger="mlxq"):
            c = mb.install(env, "auto", lib=lib)
            assert mb.install(env, "off", lib=lib) is c  # once per process
        assert c.path == "runtime"
        assert [r.getMessage() for r in caplog.records].count(
            f"mlxq: Metal path: runtime ({c.reason})"
        ) == 1
        assert all(_has_mps_kernel(op) for op in rt.OPS)
        # The registered MPS kernel, reached through the dispatcher (with CPU tensors, run by
        # the emulator behind the fake compile_shader).
        wq, s, b = _weights(gen, 8, 64, 64, 4, torch.float32)
        x = torch.randn(1, 64, generator=gen)
        mps_only = torch._C.DispatchKeySet(torch._C.DispatchKey.MPS)
        y = torch.ops.mlxq.affine_matmul.default.redispatch(mps_only, x, wq, s, b, 64, 4, True)
        _assert_matmul_close(y, x, wq, s, b, 64, 4, True)
        # the floating-point modes
        wq4, s4 = mlxq.quantize(torch.randn(8, 64, generator=gen), 32, 4, mode="mxfp4")
        y = torch.ops.mlxq.fp_matmul.default.redispatch(
            mps_only, x, wq4, s4, "mxfp4", 32, 4, True, None
        )
        want = mlxq.quantized_matmul(x, wq4, s4, mode="mxfp4")
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        args = (wq4, s4, "mxfp4", 32, 4, None, torch.float32)
        w = torch.ops.mlxq.fp_dequantize.default.redispatch(mps_only, *args)
        assert torch.equal(w, torch.ops.mlxq.fp_dequantize(*args))
        w = torch.randn(8, 64, generator=gen)
        got = torch.ops.mlxq.fp_quantize.default.redispatch(mps_only, w, "mxfp4", 32, 4, None)
        want = torch.ops.mlxq.fp_quantize(w, "mxfp4", 32, 4, None)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    finally:
        lib._destroy()
    assert not any(_has_mps_kernel(op) for op in rt.OPS)


@pytest.mark.parametrize("mode", ["off", "failed"])
def test_off_and_failed_register_kernels_that_say_why(mode, tmp_path, monkeypatch, caplog) -> None:
    if any(_has_mps_kernel(op) for op in rt.OPS):
        pytest.skip("this process already registered Metal kernels (a Mac)")
    monkeypatch.setattr(mb, "_choice", None)
    if mode == "off":
        monkeypatch.setenv("MLXQ_METAL", "Off ")  # read from the environment, case-insensitive
        env, why = _env(tmp_path), "MLXQ_METAL=off"
    else:
        monkeypatch.delenv("MLXQ_METAL", raising=False)
        env = _env(tmp_path, native=FakeNative(compiled=False), compile_shader=False)
        why = "no torch.mps.compile_shader"
    lib = torch.library.Library("mlxq", "FRAGMENT")
    try:
        with caplog.at_level(logging.INFO, logger="mlxq"):
            c = mb.install(env, lib=lib)
        assert c.path == mode and why in c.reason
        (record,) = [r for r in caplog.records if "Metal path" in r.getMessage()]
        assert record.levelno == (logging.INFO if mode == "off" else logging.WARNING)
        mps_only = torch._C.DispatchKeySet(torch._C.DispatchKey.MPS)
        w = torch.randn(2, 64)
        for op, args in (
            (torch.ops.mlxq.affine_quantize, (w, 64, 4)),
            (torch.ops.mlxq.affine_matmul, (w, *mlxq.affine_quantize(w), 64, 4, True)),
        ):
            with pytest.raises(RuntimeError, match=f"no Metal kernels for MPS tensors: .*{why}"):
                op.default.redispatch(mps_only, *args)
    finally:
        lib._destroy()


def test_process_choice_on_this_machine() -> None:
    c = mb.active()
    if HAS_MPS:
        assert c.path in ("prebuilt", "runtime", "off", "failed")
    else:
        assert c.path == "unavailable" and not any(_has_mps_kernel(op) for op in rt.OPS)


# --- backend_info / doctor ----------------------------------------------------------------------


def test_backend_info_and_doctor() -> None:
    info = mlxq.backend_info()
    assert info["torch_version"] == torch.__version__
    assert info["mps_available"] is HAS_MPS
    assert info["cpu_isa"] == _C.cpu_isa()
    assert info["metal_path"] == mb.active().path and info["metal_reason"] == mb.active().reason
    assert info["native_mps_compiled"] is bool(_C.mps_native_compiled)
    assert info["metallib"].endswith("mlxq.metallib")
    assert info["metal_sources"] == str(mb.metal_source_dir())
    report = mlxq.doctor_report()
    for key, value in info.items():
        line = next(ln for ln in report.splitlines() if ln.startswith(key + " "))
        if not isinstance(value, list):
            assert line.split(None, 1)[1].strip() == str(value)
    from mlxq.doctor import doctor_report

    assert doctor_report() == report


def test_doctor_runs_as_a_module() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "mlxq.doctor"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "metal_path" in res.stdout and "cpu_isa" in res.stdout


# --- on a Mac: every op on MPS vs the CPU op, for every combination --------------------------

COMBOS = [(op, b, g, d) for op in ("quantize", "dequantize", "qmv", "qvm", "qmm_t", "qmm_n")
          for d in DTYPES for g in (32, 64, 128) for b in (2, 3, 4, 5, 6, 8)]  # fmt: skip
# Rows of x per batch entry (x is [2, m, K]: 2*m rows for a 2-D weight) and transpose, so that
# the plan picks the named kernel (checked without a Mac below).
SHAPE = {"qmv": (3, True), "qvm": (4, False), "qmm_t": (37, True), "qmm_n": (40, False)}


def _mps_matmul_operands(gen, op, bits, gs, dtype):
    m, transpose = SHAPE[op]
    wq, s, b = _weights(gen, 20, 2 * gs, gs, bits, dtype)
    x = torch.randn(2, m, 2 * gs if transpose else 20, generator=gen).to(dtype)
    return x, wq, s, b, transpose


@pytest.mark.parametrize("op", sorted(SHAPE))
def test_mps_matmul_shapes_reach_every_kernel(op, gen) -> None:
    x, wq, s, b, transpose = _mps_matmul_operands(gen, op, 4, 64, torch.float16)
    kernel = _C.plan_affine_matmul(x, wq, s, b, 64, 4, transpose)["kernel"]
    assert kernel == f"affine_{op}_half_gs64_b4"


def _mps_case(op, bits, gs, dtype):
    if op in ("quantize", "dequantize"):
        return (op, bits, gs, dtype, 0, True)
    m, transpose = SHAPE[op]
    return ("matmul", bits, gs, dtype, m, transpose)


@needs_mps
@pytest.mark.parametrize(("op", "bits", "gs", "dtype"), COMBOS)
def test_mps_op_matches_cpu(op, bits, gs, dtype, gen) -> None:
    """torch.ops.mlxq.* on MPS tensors, through whichever path import mlxq chose."""
    case = _mps_case(op, bits, gs, dtype)
    if case[0] == "quantize":
        w = torch.randn(5, 3 * gs, generator=gen).to(dtype)
        _check(mlxq.affine_quantize(w.to("mps"), gs, bits), mlxq.affine_quantize(w, gs, bits))
        return
    if case[0] == "dequantize":
        wq, s, b = _weights(gen, 20, 2 * gs, gs, bits, dtype)
        got = mlxq.affine_dequantize(wq.to("mps"), s.to("mps"), b.to("mps"), gs, bits)
        _check((got,), (dequantize_ref(wq, s, b, gs, bits).to(dtype),))  # Metal rounds once
        return
    x, wq, s, b, transpose = _mps_matmul_operands(gen, op, bits, gs, dtype)
    y = mlxq.affine_matmul(x.to("mps"), wq.to("mps"), s.to("mps"), b.to("mps"), gs, bits, transpose)
    _assert_matmul_close(y, x, wq, s, b, gs, bits, transpose)


@needs_mps
@pytest.mark.parametrize(("op", "bits", "gs", "dtype"), [c for c in COMBOS if c[2] == 64])
def test_mps_runtime_path_matches_cpu(op, bits, gs, dtype, gen) -> None:
    """The run-time compiled kernels on the GPU, whatever path the process chose."""
    source_dir = mb.metal_source_dir()
    assert source_dir is not None and hasattr(torch.mps, "compile_shader")
    runner = _MPS_RUNNER.setdefault("r", rt.RuntimeKernels(torch.mps.compile_shader, source_dir))
    case = _mps_case(op, bits, gs, dtype)
    _check(*_run_op(case, gen, runner.run, device="mps"))


_MPS_RUNNER: dict[str, rt.RuntimeKernels] = {}


@needs_mps
def test_mps_views_and_stream_order(gen) -> None:
    """Operands at storage offsets, and a result consumed by the next torch op without sync."""
    wq, s, b = _weights(gen, 24, 128, 64, 4, torch.float16, "mps")
    x = torch.randn(4, 3, 128, generator=gen).to(torch.float16).to("mps")[1:, 1]  # offset view
    y = mlxq.affine_matmul(x, wq[8:], s[8:], b[8:], 64, 4, True) * 2
    _assert_matmul_close(y / 2, x, wq[8:], s[8:], b[8:], 64, 4, True)
