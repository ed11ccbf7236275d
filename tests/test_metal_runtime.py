"""The run-time fallback: the source torch.mps.compile_shader gets, compiled and run by the
emulator through a fake compile_shader that binds arguments as torch's does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from metal_backend_helpers import (
    CASE_IDS,
    CASES,
    METAL_DIR,
    FakeCompileShader,
    FakeKernelOldTorch,
    _check,
    _run_op,
    needs_emu,
)
from mlxq._native import _C
from mlxq.metal import runtime as rt
from mlxq.testing import metal_emulator as emu

# --- the run-time fallback: the source compile_shader gets, and its argument binding ---------


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
