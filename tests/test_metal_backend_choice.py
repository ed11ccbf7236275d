"""The choice of Metal path (prebuilt, runtime-compiled, off) against fakes for every MLXQ_METAL
value and failure mode; backend_info and doctor."""

from __future__ import annotations

import logging
import subprocess
import sys

import mlxq
import pytest
import torch
from metal_backend_helpers import (
    HAS_MPS,
    METAL_DIR,
    FakeCompileShader,
    _assert_matmul_close,
    _weights,
    needs_emu,
)
from mlxq._native import _C
from mlxq.metal import backend as mb
from mlxq.metal import runtime as rt
from oracles import assert_product_within, fp_dequantize_ref

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
        # the Metal kernel and the CPU op sum in different orders: each within the derived
        # fp32 bound of the float64 product (mxfp4 values are exact in fp32)
        w4 = fp_dequantize_ref(wq4, s4, "mxfp4").T
        assert_product_within(y, x, w4, "Metal fp_matmul")
        assert_product_within(mlxq.quantized_matmul(x, wq4, s4, mode="mxfp4"), x, w4, "CPU")
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
