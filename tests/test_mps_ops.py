"""On a Mac with MPS: every op on MPS against the CPU op, for every combination."""

from __future__ import annotations

import mlxq
import pytest
import torch
from metal_backend_helpers import (
    DTYPES,
    _assert_matmul_close,
    _check,
    _run_op,
    _weights,
    needs_mps,
)
from mlxq._native import _C
from mlxq.metal import backend as mb
from mlxq.metal import runtime as rt
from oracles import dequantize_ref

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
