"""Gather matmul kernels of MLX's floating-point modes (metal/fp_gather_qmv.metal,
metal/fp_gather_qmm.metal: mx.gather_qmm with mode="mxfp4" / "nvfp4" / "mxfp8") in the MSL
emulator.

There is no float-mode gather op on this branch yet (the CPU op fp_gather_matmul is being added
separately), so each case is launched from the dispatch plan of its geometry
(`_C.plan_fp_gather_matmul_geometry`: the kernel fp_matmul's plan picks for one pair in its
gather variant, or the sorted gather qmm under the affine gather's rule), binding the flat uint32
lhs/rhs indices at buffers 6 and 7 and nvfp4's global scale as one float32 per matrix of wq at
buffer 3 (pair z reads rhs[z]'s), as the op's launch will.

Oracles: the float64 product of each pair with its expert dequantized by the CPU op
(fp_dequantize, bit-exact with mx.dequantize; its own global scale for nvfp4), and
mx.gather_qmm(mode=...) itself in fp32 when there is no global scale (MLX takes one only on the
GPU). Bound: one output rounding plus fp32 accumulation-order noise, as tests/test_metal_fp.py.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlxq
import numpy as np
import pytest
import torch
from mlxq._native import _C
from mlxq.testing import metal_emulator as emu
from oracles import DTYPES, to_mx, to_torch

pytestmark = pytest.mark.skipif(
    not emu.available(), reason="no clang for the MSL emulator (pip install ziglang)"
)

METAL_DIR = Path(__file__).resolve().parents[1] / "metal"
MODES = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
CASES = [("mxfp4", False), ("nvfp4", False), ("nvfp4", True), ("mxfp8", False)]
CASE_IDS = [f"{m}-global" if g else m for m, g in CASES]
DTYPE_IDS = [str(d).split(".")[-1] for d in DTYPES]
OUT_EPS = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
ACC_EPS = 2e-6
NO_GLOBAL = 448.0 * 6.0  # nvfp4's factor is global / (448 * 6): exactly 1


@pytest.fixture(scope="module", autouse=True)
def library() -> emu.Library:
    names = ("fp_gather_qmv.metal", "fp_gather_qmm.metal", "fp_gather_qmm_rhs.metal")
    return emu.load_library([METAL_DIR / n for n in names])


def _experts(gen, e, rows, cols, mode, dtype, with_global: bool):
    """[e, rows, cols] weights quantized one matrix at a time (nvfp4: each with its own global
    scale when `with_global`), their float64 values, and the per-matrix global scales."""
    gs, bits = MODES[mode]
    w = (torch.randn(e, rows, cols, generator=gen) * 3).to(dtype)
    glob = torch.rand(e, generator=gen) + 0.2 if with_global else torch.full((e,), NO_GLOBAL)
    qs, ss, ws = [], [], []
    for i in range(e):
        g = glob[i : i + 1].reshape(()) if with_global else None
        q, s = mlxq.quantize(w[i], gs, bits, mode=mode, global_scale=g)
        qs.append(q)
        ss.append(s)
        ws.append(torch.ops.mlxq.fp_dequantize(q, s, mode, gs, bits, g, torch.float32).double())
    return torch.stack(qs), torch.stack(ss), torch.stack(ws), glob.float()


def _launch(x, wq, s, glob, mode, lhs, rhs, transpose, sorted_indices: bool = False):
    """Dispatches what the float-mode gather plan (`_C.plan_fp_gather_matmul_geometry`) picks
    for these operands; returns (y [pairs, M, out], kernel)."""
    gs, bits = MODES[mode]
    pairs, m = lhs.numel(), x.shape[-2]
    rows, cols = wq.shape[-2], s.shape[-1] * gs
    plan = _C.plan_fp_gather_matmul_geometry(
        m,
        rows,
        cols,
        [pairs],
        x.shape[0],
        wq.shape[0],
        x.dtype,
        mode,
        gs,
        bits,
        transpose,
        sorted_indices,
    )
    y = torch.full(plan["out_shapes"][0], float("nan"), dtype=x.dtype)
    tensors = {
        "x": x.contiguous(),
        "wq": wq.view(torch.int32).contiguous(),
        "scales": s.contiguous(),
        "global_scale": glob,
        "out": y,
        "params": plan["params"],
        "lhs_indices": lhs.int().contiguous(),
        "rhs_indices": rhs.int().contiguous(),
    }
    buffers = {i: tensors[role] for i, role in plan["bindings"]}
    tgm = dict(plan["threadgroup_memory"]) or None
    emu.dispatch(plan["kernel"], plan["grid"], plan["threads"], buffers, tgm)
    return y, plan["kernel"]


def _check(y, x, W, lhs, rhs, transpose, kernel, ref=None) -> None:
    Wp = W[rhs]
    Wt = Wp.transpose(-1, -2) if transpose else Wp
    xp = x.double()[lhs]
    ref = xp @ Wt if ref is None else ref
    absprod = xp.abs() @ Wt.abs()
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert not y.isnan().any(), f"{kernel}: some outputs were never written"
    bound = OUT_EPS[x.dtype] * ref.abs() + 2 * ACC_EPS * absprod + 1e-30
    err = (y.double() - ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{kernel}: error {err.max().item():.3g} is {worst:.2f}x the bound"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode,with_global", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
    "M,transpose,kernel",
    [(1, True, "fp_gather_qmv"), (33, True, "fp_gather_qmm_t"), (3, False, "fp_gather_qmm_n")],
)
def test_fp_gather_kernels(M, transpose, kernel, mode, with_global, dtype, gen) -> None:
    """Decode (one token, top-3 of 5 experts with a repeat) and prefill shapes (partial 32-row
    tiles, both transposes), x's matrices picked by lhs."""
    gs, _ = MODES[mode]
    n, k = 37, 3 * gs  # N not a multiple of 8 or 32; K = 48 for nvfp4 (not a multiple of 32)
    wq, s, W, glob = _experts(gen, 5, n, k, mode, dtype, with_global)
    x = torch.randn(2, M, k if transpose else n, generator=gen).to(dtype)
    lhs, rhs = torch.tensor([1, 0, 1, 1]), torch.tensor([4, 1, 4, 0])
    y, name = _launch(x, wq, s, glob, mode, lhs, rhs, transpose)
    assert name.startswith(kernel) and name.endswith(mode), name
    _check(y, x, W, lhs, rhs, transpose, name)
    if not with_global:  # mx.gather_qmm itself (it takes a global scale only on the GPU), fp32
        ref = mx.gather_qmm(
            to_mx(x.float()),
            to_mx(wq),
            mx.array(s.numpy()),
            None,
            lhs_indices=mx.array(lhs.numpy().astype(np.uint32)),
            rhs_indices=mx.array(rhs.numpy().astype(np.uint32)),
            transpose=transpose,
            mode=mode,
        )
        _check(y, x, W, lhs, rhs, transpose, name, to_torch(ref).double())


def test_fp_gather_qmv_reads_only_the_selected_experts(gen) -> None:
    """Each pair reads its expert's packed rows and scale bytes once; unselected experts are
    never read; each thread reads its pair's global scale once."""
    mode, (gs, bits) = "nvfp4", MODES["nvfp4"]
    e, n, k = 12, 24, 256
    wq, s, _, glob = _experts(gen, e, n, k, mode, torch.float16, True)
    x = torch.randn(1, 1, k, generator=gen).to(torch.float16)
    rhs = torch.tensor([3, 9, 9, 5])
    y, _ = _launch(x, wq, s, glob, mode, torch.zeros(4, dtype=torch.long), rhs, True)
    rep = emu.last_dispatch_report()
    assert not y.isnan().any()
    assert rep.bytes_read[1] == rhs.numel() * n * k * bits // 8
    assert rep.bytes_read[2] == rhs.numel() * n * (k // gs)
    threads = int(np.prod(rep.grid)) * int(np.prod(rep.threads_per_threadgroup))
    assert rep.bytes_read[3] == 4 * threads  # fp_global_factor: one float per thread


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode,with_global", CASES, ids=CASE_IDS)
def test_fp_sorted_gather_qmm(mode, with_global, dtype, gen) -> None:
    """The sorted gather qmm in the float modes, both transposes: 56 one-row pairs sorted by
    expert in runs of 3, 0, 1, 37, 0, 13, 2 (empty experts, a one-pair run, a run across the
    32-row block boundary), tokens gathered through lhs in token order; against float64 and
    mx.gather_qmm(mode=). Also a wrong hint (unsorted indices): still exact."""
    gs, _ = MODES[mode]
    runs = (3, 0, 1, 37, 0, 13, 2)
    n, k = 37, 3 * gs
    wq, s, W, glob = _experts(gen, len(runs), n, k, mode, dtype, with_global)
    rhs = torch.repeat_interleave(torch.arange(len(runs)), torch.tensor(runs))
    lhs = torch.randint(0, 24, rhs.shape, generator=gen)
    lhs = lhs[torch.argsort(rhs * 24 + lhs, stable=True)]
    for transpose in (True, False):
        x = torch.randn(24, 1, k if transpose else n, generator=gen).to(dtype)
        for r in (rhs, rhs[torch.randperm(rhs.numel(), generator=gen)]):
            y, name = _launch(x, wq, s, glob, mode, lhs, r, transpose, sorted_indices=True)
            assert name.startswith("fp_gather_qmm_rhs_") and name.endswith(mode), name
            _check(y, x, W, lhs, r, transpose, name)
            if not with_global:
                ref = mx.gather_qmm(
                    to_mx(x.float()),
                    to_mx(wq),
                    mx.array(s.numpy()),
                    None,
                    lhs_indices=mx.array(lhs.numpy().astype(np.uint32)),
                    rhs_indices=mx.array(r.numpy().astype(np.uint32)),
                    transpose=transpose,
                    mode=mode,
                    sorted_indices=r is rhs,
                )
                _check(y, x, W, lhs, r, transpose, name, to_torch(ref).double())


def test_fp_sorted_gather_weight_traffic() -> None:
    """mxfp8, runs of 16 one-row pairs: each (32-row block, run) pass reads its expert's packed
    bytes and scale bytes once (128 pairs -> 8 passes), against once per pair unsorted."""
    gen = torch.Generator().manual_seed(3)
    mode, (gs, bits) = "mxfp8", MODES["mxfp8"]
    e, n, k, pairs = 8, 32, 128, 128
    wq, s, _, glob = _experts(gen, e, n, k, mode, torch.float16, False)
    x = torch.randn(pairs, 1, k, generator=gen).to(torch.float16)
    rhs = torch.arange(pairs) // 16
    lhs = torch.arange(pairs)
    y, _ = _launch(x, wq, s, glob, mode, lhs, rhs, True, sorted_indices=True)
    rep = emu.last_dispatch_report()
    assert rep.bytes_read[1] == 8 * n * k * bits // 8 and rep.bytes_read[2] == 8 * n * (k // gs)
    y_pairs, _ = _launch(x, wq, s, glob, mode, lhs, rhs, True)
    assert emu.last_dispatch_report().bytes_read[1] == pairs * n * k * bits // 8
    torch.testing.assert_close(y, y_pairs, rtol=2e-3, atol=2e-3)


def test_fp_gather_plan() -> None:
    """The float-mode gather plan: the pair kernel's gather variant over grid z = pairs, or the
    sorted kernel under the affine gather's rule (sorted hint, M < 32, >= 32 rows, >= 4 rows per
    expert)."""

    def plan(pairs, m, experts, mode="mxfp4", transpose=True, sorted_indices=True):
        gs, bits = MODES[mode]
        return _C.plan_fp_gather_matmul_geometry(
            m,
            96,
            256,
            [pairs],
            pairs,
            experts,
            torch.float16,
            mode,
            gs,
            bits,
            transpose,
            sorted_indices,
        )

    p = plan(64, 1, 16)
    assert p["kernel"] == "fp_gather_qmm_rhs_t_half_mxfp4" and p["grid"] == (3, 2, 1)
    assert sorted(p["threadgroup_memory"]) == [(0, 9216), (1, 256)]
    roles = dict(p["bindings"])
    assert roles[3] == "global_scale" and roles[6] == "lhs_indices" and roles[7] == "rhs_indices"
    assert plan(64, 1, 16, "nvfp4", False)["kernel"] == "fp_gather_qmm_rhs_n_half_nvfp4"
    unsorted = plan(64, 1, 16, sorted_indices=False)
    assert unsorted["kernel"] == "fp_gather_qmv_half_mxfp4" and unsorted["grid"] == (12, 1, 64)
    assert plan(64, 1, 17)["kernel"] == "fp_gather_qmv_half_mxfp4"  # < 4 rows per expert
    assert plan(3, 40, 2)["kernel"] == "fp_gather_qmm_t_half_mxfp4"  # a full tile per pair
    assert plan(5, 1, 2, "mxfp8", False)["kernel"] == "fp_gather_qmm_n_half_mxfp8"  # no qvm
    assert plan(0, 1, 2)["empty"]
    with pytest.raises(ValueError, match="group_size"):
        _C.plan_fp_gather_matmul_geometry(1, 96, 256, [4], 1, 2, torch.float16, "nvfp4", 32, 4)
