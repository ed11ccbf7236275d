"""The gather matmul kernels (metal/affine_gather_*.metal) in the MSL emulator, through the
dispatch plan, against the CPU op (mlxq.affine_gather_matmul).

Every bits x group size x dtype runs the decode kernel (gather qmv: one token, top-3 of 5
experts with a repeat) and the prefill kernels (qmm, both transposes) on odd shapes; qvm runs
for each dtype. The traffic test holds the bytes the gather qmv reads to the selected experts:
each pair reads its expert's packed rows, scales and biases exactly once, and an expert no pair
selects is never read. Accuracy bound: as tests/test_metal_kernels.py (one output rounding plus
fp32 accumulation-order noise relative to sum |x| (|s| q + |b|)).
"""

from __future__ import annotations

import math

import mlxq
import pytest
import torch
from mlxq.testing import metal_emulator as emu
from mlxq.testing.metal_emulator import ops as metal_ops
from oracles import BITS, DTYPES, GROUP_SIZES

pytestmark = pytest.mark.skipif(
    not emu.available(), reason="no clang for the MSL emulator (pip install ziglang)"
)

COMBOS = [(b, g, d) for d in DTYPES for g in GROUP_SIZES for b in BITS]
COMBO_IDS = [f"b{b}-gs{g}-{str(d).split('.')[-1]}" for b, g, d in COMBOS]
OUT_EPS = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
ACC_EPS = 2e-6


@pytest.fixture(scope="module", autouse=True)
def library() -> emu.Library:
    return emu.load_library()


def _experts(gen, e, rows, cols, gs, bits, dtype):
    w = torch.randn(e, rows, cols, generator=gen).to(dtype)
    return mlxq.affine_quantize(w, gs, bits)


def _check(x, wq, s, b, lhs, rhs, gs, bits, transpose, kernel_prefix: str) -> None:
    y = metal_ops.affine_gather_matmul(x, wq, s, b, lhs, rhs, gs, bits, transpose)
    kernel = emu.last_dispatch_report().kernel
    assert kernel.startswith(kernel_prefix), kernel
    # the CPU op in fp32 (fp32 tiles, as the Metal kernels use for every dtype), rounded once
    ref = mlxq.affine_gather_matmul(x.float(), wq, s, b, lhs, rhs, gs, bits, transpose).to(x.dtype)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    ones, zeros = torch.ones_like(s), torch.zeros_like(b)
    q = mlxq.affine_dequantize(wq, ones, zeros, gs, bits).float()
    w_abs = s.float().abs().repeat_interleave(gs, -1) * q + b.float().abs().repeat_interleave(
        gs, -1
    )
    lhs_all = torch.arange(x.shape[:-2].numel()).reshape(x.shape[:-2]) if lhs is None else lhs
    lf, rf = (t.reshape(-1) for t in torch.broadcast_tensors(lhs_all, rhs))
    xm = x.float().abs().reshape(-1, *x.shape[-2:])[lf]
    wm = w_abs.reshape(-1, *w_abs.shape[-2:])[rf]
    absprod = (xm @ (wm.transpose(-1, -2) if transpose else wm)).reshape(ref.shape)
    bound = OUT_EPS[x.dtype] * ref.float().abs() + 2 * ACC_EPS * absprod + 1e-30
    err = (y.float() - ref.float()).abs()
    assert not y.isnan().any(), f"{kernel}: some outputs were never written"
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{kernel}: error {err.max().item():.3g} is {worst:.2f}x the bound"


@pytest.mark.parametrize("bits,gs,dtype", COMBOS, ids=COMBO_IDS)
def test_gather_kernels(bits, gs, dtype, gen) -> None:
    k = gs
    wq, s, b = _experts(gen, 5, 20, k, gs, bits, dtype)
    # decode: one token, top-3 with expert 4 twice (mlx-lm's SwitchGLU layout [T, 1, 1, K])
    x = torch.randn(1, 1, 1, k, generator=gen).to(dtype)
    _check(x, wq, s, b, None, torch.tensor([[4, 1, 4]]), gs, bits, True, "affine_gather_qmv")
    # prefill: 33 rows per pair (partial 32-row tiles), both transposes
    x = torch.randn(2, 33, k, generator=gen).to(dtype)
    lhs, rhs = torch.tensor([1, 0, 1]), torch.tensor([3, 3, 0])
    _check(x, wq, s, b, lhs, rhs, gs, bits, True, "affine_gather_qmm_t")
    x = torch.randn(2, 33, 20, generator=gen).to(dtype)
    _check(x, wq, s, b, lhs, rhs, gs, bits, False, "affine_gather_qmm_n")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_qvm_and_broadcast(dtype, gen) -> None:
    wq, s, b = _experts(gen, 4, 24, 64, 32, 4, dtype)
    x = torch.randn(3, 2, 24, generator=gen).to(dtype)
    _check(
        x,
        wq,
        s,
        b,
        torch.tensor([[2], [0]]),
        torch.tensor([1, 3, 1]),
        32,
        4,
        False,
        "affine_gather_qvm",
    )
    x = torch.randn(3, 2, 64, generator=gen).to(dtype)
    _check(
        x,
        wq,
        s,
        b,
        torch.tensor([[2], [0]]),
        torch.tensor([1, 3, 1]),
        32,
        4,
        True,
        "affine_gather_qmv",
    )


def test_plan_of_the_gather() -> None:
    meta = dict(device="meta")
    x = torch.empty(7, 1, 1, 256, **meta)
    wq = torch.empty(64, 96, 256 * 4 // 32, dtype=torch.uint32, **meta)
    s = torch.empty(64, 96, 4, **meta)
    rhs = torch.empty(7, 8, dtype=torch.long, **meta)
    plan = mlxq._C.plan_affine_gather_matmul(x, wq, s, s, None, rhs, 64, 4, True)
    assert plan["kernel"] == "affine_gather_qmv_float_gs64_b4"
    assert plan["grid"][2] == 56 and plan["out_shapes"][0] == (7, 8, 1, 96)
    assert (6, "lhs_indices") in plan["bindings"] and (7, "rhs_indices") in plan["bindings"]
    dense = mlxq._C.plan_affine_matmul(x[0, 0], wq[0], s[0], s[0], 64, 4, True)
    assert plan["grid"][:2] == dense["grid"][:2] and plan["threads"] == dense["threads"]
    with pytest.raises(ValueError, match="rhs_indices shape"):
        mlxq._C.plan_affine_gather_matmul(x, wq, s, s, None, rhs[:, :3].T, 64, 4, True)


def test_gather_qmv_reads_only_the_selected_experts(gen) -> None:
    e, rows, k, bits, gs = 16, 24, 256, 4, 64
    wq, s, b = _experts(gen, e, rows, k, gs, bits, torch.float16)
    x = torch.randn(2, 1, 1, k, generator=gen).to(torch.float16)
    rhs = torch.tensor([[3, 9, 12], [9, 0, 5]])  # expert 9 twice, 11 experts never
    y = metal_ops.affine_gather_matmul(x, wq, s, b, None, rhs, gs, bits)
    rep = emu.last_dispatch_report()
    assert not y.isnan().any()
    pairs = rhs.numel()
    assert rep.bytes_read[1] == pairs * rows * k * bits // 8  # packed rows, once per pair
    assert rep.bytes_read[2] == rep.bytes_read[3] == pairs * rows * (k // gs) * 2
    # each thread reads its pair's two indices once (4 bytes each)
    threads = math.prod(rep.grid) * math.prod(rep.threads_per_threadgroup)
    assert rep.bytes_read[6] == rep.bytes_read[7] == 4 * threads
    assert rep.bytes_written[4] == pairs * rows * 2


# --- the MPS backend's launch and the run-time fallback, executed by the emulator -------------

LAUNCH_CASES = [  # (bits, gs, dtype, rows of x per pair, transpose)
    (4, 64, torch.bfloat16, 1, True),  # gather qmv
    (3, 32, torch.float16, 2, False),  # gather qvm (threadgroup memory)
    (6, 128, torch.float32, 33, True),  # gather qmm_t
]


def _launch_case(case, gen):
    bits, gs, dtype, m, transpose = case
    wq, s, b = _experts(gen, 4, 20, 2 * gs, gs, bits, dtype)
    x = torch.randn(3, m, 2 * gs if transpose else 20, generator=gen).to(dtype)
    lhs, rhs = torch.tensor([[2], [0]]), torch.tensor([1, 3, 1])
    launch = mlxq._C.metal_launch_affine_gather_matmul(x, wq, s, b, lhs, rhs, gs, bits, transpose)
    for t in launch["outputs"]:
        t.fill_(float("nan"))
    want = mlxq.affine_gather_matmul(x.float(), wq, s, b, lhs, rhs, gs, bits, transpose).to(x.dtype)
    return launch, want


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype and not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), rtol=4 * OUT_EPS[got.dtype], atol=1e-3)


@pytest.mark.parametrize("case", LAUNCH_CASES, ids=lambda c: f"b{c[0]}-gs{c[1]}-m{c[3]}")
def test_native_launch_in_emulator(case, gen) -> None:
    launch, want = _launch_case(case, gen)
    assert launch["kernel"].startswith("affine_gather_")
    assert launch["buffers"][6].dtype == launch["buffers"][7].dtype == torch.int32
    tgm = dict(launch["threadgroup_memory"]) or None
    emu.dispatch(launch["kernel"], launch["grid"], launch["threads"], launch["buffers"], tgm)
    _assert_close(launch["outputs"][0], want)


def test_native_launch_refuses_out_of_range_indices(gen) -> None:
    wq, s, b = _experts(gen, 4, 20, 64, 64, 4, torch.float32)
    with pytest.raises(IndexError, match="rhs_indices"):
        mlxq._C.metal_launch_affine_gather_matmul(
            torch.randn(1, 1, 64), wq, s, b, None, torch.tensor([4]), 64, 4, True
        )


@pytest.mark.parametrize("case", LAUNCH_CASES[:2], ids=lambda c: f"b{c[0]}-gs{c[1]}-m{c[3]}")
def test_runtime_fallback_in_emulator(case, gen, tmp_path) -> None:
    from metal_backend_helpers import METAL_DIR, FakeCompileShader
    from mlxq.metal import runtime as rt

    fake = FakeCompileShader(tmp_path)
    runner = rt.RuntimeKernels(fake, METAL_DIR)
    launch, want = _launch_case(case, gen)
    runner.run(launch)
    _assert_close(launch["outputs"][0], want)
    assert len(fake.sources) == 1


def test_gather_kernels_are_expected_in_a_prebuilt_library() -> None:
    from mlxq.format import METAL_BITS
    from mlxq.metal import backend as mb
    from mlxq.metal import runtime as rt

    names = mb.expected_kernel_names()
    instantiated = rt.instantiated_kernels(mb.metal_source_dir())
    gather = {n for n in names if n.startswith("affine_gather_")}
    per_bits = 4 * len(DTYPES) * len(GROUP_SIZES)  # qmv, qvm, qmm_t, qmm_n
    assert len(gather) == per_bits * len(METAL_BITS) and gather <= set(instantiated)
