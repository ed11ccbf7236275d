"""Gather matmul kernels of MLX's floating-point modes (metal/fp_gather_qmv.metal,
metal/fp_gather_qmm.metal: mx.gather_qmm with mode="mxfp4" / "nvfp4" / "mxfp8") in the MSL
emulator.

The kernel cases are launched from the dispatch plan of their geometry
(`_C.plan_fp_gather_matmul_geometry`: the kernel fp_matmul's plan picks for one pair in its
gather variant, or the sorted gather qmm under the affine gather's rule), binding the flat uint32
lhs/rhs indices at buffers 6 and 7 and nvfp4's global scale as one float32 per matrix of wq at
buffer 3 (pair z reads rhs[z]'s). The op itself runs end to end through the launch the MPS
backend and the run-time fallback execute (`_C.metal_launch_fp_gather_matmul`, emulator
`metal_ops.fp_gather_matmul`), against the CPU op.

Oracles: the float64 product of each pair with its expert dequantized by the CPU op
(fp_dequantize, bit-exact with mx.dequantize; its own global scale for nvfp4), and
mx.gather_qmm(mode=...) itself in fp32 when there is no global scale (MLX takes one only on the
GPU). Bound: one output rounding plus fp32 accumulation-order noise, as tests/test_metal_fp.py.
"""

from __future__ import annotations

from pathlib import Path

import mlxq
import numpy as np
import pytest
import torch
from mlxq._native import _C
from mlxq.testing import metal_emulator as emu
from mlxq.testing.metal_emulator import ops as metal_ops
from oracles import DTYPES, fp32_sum_eps, mx_gather_qmm

pytestmark = pytest.mark.skipif(
    not emu.available(), reason="no clang for the MSL emulator (pip install ziglang)"
)

METAL_DIR = Path(__file__).resolve().parents[1] / "metal"
MODES = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
CASES = [("mxfp4", False), ("nvfp4", False), ("nvfp4", True), ("mxfp8", False)]
CASE_IDS = [f"{m}-global" if g else m for m, g in CASES]
DTYPE_IDS = [str(d).split(".")[-1] for d in DTYPES]
OUT_EPS = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
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
    bound = OUT_EPS[x.dtype] * ref.abs() + 2 * fp32_sum_eps(x.shape[-1]) * absprod + 1e-30
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
        ref = mx_gather_qmm(x.float(), wq, s, None, lhs, rhs, transpose, mode=mode)
        _check(y, x, W, lhs, rhs, transpose, name, ref.double())


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
                ref = mx_gather_qmm(
                    x.float(), wq, s, None, lhs, r, transpose, mode=mode, sorted_indices=r is rhs
                )
                _check(y, x, W, lhs, r, transpose, name, ref.double())


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


# --- the op's launch (MPS backend, run-time fallback), executed by the emulator ---------------

OP_CASES = [  # (mode, per-expert global scales, dtype, rows of x per pair, transpose, sorted)
    ("nvfp4", True, torch.bfloat16, 1, True, False),  # gather qmv, broadcast lhs x rhs
    ("mxfp4", False, torch.float16, 1, True, True),  # sorted gather qmm: 64 one-row pairs
    ("mxfp8", False, torch.float32, 33, False, False),  # gather qmm_n
]
OP_IDS = ["nvfp4-global-qmv", "mxfp4-sorted", "mxfp8-qmm_n"]


def _op_case(case, gen):
    """Operands of one OP_CASES case, the kernel family it must take, and the flat pairs."""
    mode, with_global, dtype, m, transpose, sorted_indices = case
    gs, _ = MODES[mode]
    n, k = 40, 2 * gs
    wq, s, W, glob = _experts(gen, 4, n, k, mode, dtype, with_global)
    width = k if transpose else n
    if sorted_indices:
        x = torch.randn(64, m, width, generator=gen).to(dtype)
        lhs, rhs = None, torch.randint(0, 4, (64,), generator=gen).sort().values
        lf, rf, kernel = torch.arange(64), rhs, "fp_gather_qmm_rhs_t"
    else:
        x = torch.randn(3, m, width, generator=gen).to(dtype)
        lhs, rhs = torch.tensor([[2], [0]]), torch.tensor([1, 3, 1])
        lf, rf = (t.reshape(-1) for t in torch.broadcast_tensors(lhs, rhs))
        kernel = "fp_gather_qmv" if m == 1 else "fp_gather_qmm_n"
    args = (x, wq, s, mode, gs, MODES[mode][1], lhs, rhs, transpose)
    kwargs = {"global_scale": glob if with_global else None, "sorted_indices": sorted_indices}
    return args, kwargs, W, lf, rf, kernel


def _check_op(y, args, kwargs, W, lf, rf, kernel) -> None:
    x, transpose = args[0], args[8]
    assert emu.last_dispatch_report().kernel.startswith(kernel)
    ys = y.reshape(-1, *y.shape[-2:])
    _check(ys, x, W, lf, rf, transpose, kernel)  # float64 oracle
    # the CPU op in fp32, rounded once (as the kernels, which keep fp32 inside for every dtype)
    want = torch.ops.mlxq.fp_gather_matmul(x.float(), *args[1:], **kwargs).to(x.dtype)
    assert y.shape == want.shape and y.dtype == want.dtype
    torch.testing.assert_close(y.float(), want.float(), rtol=4 * OUT_EPS[x.dtype], atol=1e-3)


@pytest.mark.parametrize("case", OP_CASES, ids=OP_IDS)
def test_fp_gather_op_in_emulator(case, gen) -> None:
    """The op through the shipped launch (`_C.metal_launch_fp_gather_matmul`: checks, plan,
    indices, nvfp4's per-expert global scale or 448 * 6 per expert) against the CPU op."""
    args, kwargs, W, lf, rf, kernel = _op_case(case, gen)
    y = metal_ops.fp_gather_matmul(*args, **kwargs)
    _check_op(y, args, kwargs, W, lf, rf, kernel)


def test_fp_gather_launch_binds_one_global_scale_per_expert(gen) -> None:
    args, kwargs, *_ = _op_case(OP_CASES[1], gen)  # mxfp4: no global scale given
    launch = _C.metal_launch_fp_gather_matmul(*args, **kwargs)
    buffers = launch["buffers"]
    assert buffers[3].dtype == torch.float32 and buffers[3].tolist() == [448.0 * 6.0] * 4
    assert buffers[6].dtype == buffers[7].dtype == torch.int32
    args, kwargs, *_ = _op_case(OP_CASES[0], gen)  # nvfp4 with its own [E] global scales
    launch = _C.metal_launch_fp_gather_matmul(*args, **kwargs)
    assert torch.equal(launch["buffers"][3], kwargs["global_scale"])
    with pytest.raises(IndexError, match="rhs_indices"):
        _C.metal_launch_fp_gather_matmul(*args[:7], torch.tensor([4]), *args[8:], **kwargs)
    with pytest.raises(ValueError, match="global_scale"):
        bad = dict(kwargs, global_scale=kwargs["global_scale"][:2])
        _C.metal_launch_fp_gather_matmul(*args, **bad)


def test_fp_gather_runtime_fallback_in_emulator(gen, tmp_path) -> None:
    """The run-time compiled fallback registers the op and runs the same launch."""
    from metal_backend_helpers import FakeCompileShader
    from mlxq.metal import runtime as rt

    assert "fp_gather_matmul" in rt.OPS
    fake = FakeCompileShader(tmp_path)
    runner = rt.RuntimeKernels(fake, METAL_DIR)
    args, kwargs, W, lf, rf, kernel = _op_case(OP_CASES[0], gen)
    launch = _C.metal_launch_fp_gather_matmul(*args, **kwargs)
    for t in launch["outputs"]:
        t.fill_(float("nan"))
    runner.run(launch)
    emu_kernel = launch["kernel"]
    assert emu_kernel.startswith(kernel) and len(fake.sources) == 1
    ys = launch["outputs"][0].reshape(-1, *launch["outputs"][0].shape[-2:])
    _check(ys, args[0], W, lf, rf, args[8], emu_kernel)


def test_fp_gather_kernels_are_expected_in_a_prebuilt_library() -> None:
    """The prebuilt-library check asks for every float-mode gather kernel the op can pick."""
    from mlxq.metal import backend as mb
    from mlxq.metal import runtime as rt

    names = {n for n in mb.expected_kernel_names() if n.startswith("fp_gather_")}
    instantiated = rt.instantiated_kernels(mb.metal_source_dir())
    # qmv, qmm_t, qmm_n, qmm_rhs_t, qmm_rhs_n per dtype and mode
    assert len(names) == 5 * len(DTYPES) * len(MODES) and names <= set(instantiated)


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="needs an Apple GPU (MPS)")
@pytest.mark.parametrize("case", OP_CASES, ids=OP_IDS)
def test_fp_gather_op_on_mps(case, gen) -> None:
    """On a Mac: the op on MPS tensors (whichever path import mlxq chose) against the CPU op."""
    args, kwargs, W, lf, rf, kernel = _op_case(case, gen)

    def mps(t):
        return t.to("mps") if isinstance(t, torch.Tensor) else t

    y = torch.ops.mlxq.fp_gather_matmul(
        *(mps(a) for a in args), **{k: mps(v) for k, v in kwargs.items()}
    ).cpu()
    x = args[0]
    _check(y.reshape(-1, *y.shape[-2:]), x, W, lf, rf, args[8], kernel)
    want = torch.ops.mlxq.fp_gather_matmul(x.float(), *args[1:], **kwargs).to(x.dtype)
    torch.testing.assert_close(y.float(), want.float(), rtol=4 * OUT_EPS[x.dtype], atol=1e-3)
