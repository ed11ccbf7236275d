"""1-bit affine weights on Metal: the affine kernels (metal/affine_*.metal) instantiated at one
bit, executed by the MSL emulator through the dispatch plan and the shipped launch.

Oracles: the CPU op (quantize bit for bit, itself bit-exact with mx.quantize at 1 bit, where
MLX uses plain min/max instead of the exact edge), mx.quantize directly, and for matmul the
CPU op within one output rounding plus fp32 accumulation-order noise (as
tests/test_metal_kernels.py). Every group size and dtype; qmv, qvm, qmm (both transposes) and
their gather variants.
"""

from __future__ import annotations

import mlx.core as mx
import mlxq
import pytest
import torch
from mlxq._native import _C
from mlxq.testing import metal_emulator as emu
from mlxq.testing.metal_emulator import ops as metal_ops
from oracles import DTYPES, GROUP_SIZES, fp32_sum_eps, to_mx, to_torch, words

pytestmark = pytest.mark.skipif(
    not emu.available(), reason="no clang for the MSL emulator (pip install ziglang)"
)

COMBOS = [(g, d) for d in DTYPES for g in GROUP_SIZES]
COMBO_IDS = [f"gs{g}-{str(d).split('.')[-1]}" for g, d in COMBOS]
OUT_EPS = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.fixture(scope="module", autouse=True)
def library() -> emu.Library:
    return emu.load_library()


def _assert_close(y, ref, x, wq, s, b, gs, transpose, kernel) -> None:
    q = mlxq.affine_dequantize(wq, torch.ones_like(s), torch.zeros_like(b), gs, 1).float()
    w = s.float().abs().repeat_interleave(gs, -1) * q + b.float().abs().repeat_interleave(gs, -1)
    absprod = (x.float().abs() @ (w.transpose(-1, -2) if transpose else w)).reshape(ref.shape)
    bound = OUT_EPS[x.dtype] * ref.float().abs() + 2 * fp32_sum_eps(x.shape[-1]) * absprod + 1e-30
    err = (y.float() - ref.float()).abs()
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert not y.isnan().any(), f"{kernel}: some outputs were never written"
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{kernel}: error {err.max().item():.3g} is {worst:.2f}x the bound"


@pytest.mark.parametrize("gs,dtype", COMBOS, ids=COMBO_IDS)
def test_quantize_and_dequantize_bit_exact(gs, dtype, gen) -> None:
    w = (torch.randn(13, 3 * gs, generator=gen) * 2).to(dtype)
    w[0] = 0.5  # a constant group
    wq, s, b = metal_ops.affine_quantize(w, gs, 1)
    assert emu.last_dispatch_report().kernel.endswith("_b1")
    cq, cs, cb = mlxq.affine_quantize(w, gs, 1)
    assert torch.equal(words_t(wq), words_t(cq)) and torch.equal(s, cs) and torch.equal(b, cb)
    mq, ms, mb = mx.quantize(to_mx(w), group_size=gs, bits=1)
    assert (words(wq) == words(to_torch(mq))).all()
    assert torch.equal(s, to_torch(ms)) and torch.equal(b, to_torch(mb))
    got = metal_ops.affine_dequantize(wq, s, b, gs, 1)
    assert torch.equal(got, mlxq.affine_dequantize(cq, cs, cb, gs, 1))


def words_t(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("gs,dtype", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize(
    "M,transpose,prefix",
    [(1, True, "affine_qmv"), (3, False, "affine_qvm"), (33, True, "affine_qmm_t"),
     (33, False, "affine_qmm_n")],
)  # fmt: skip
def test_matmul(M, transpose, prefix, gs, dtype, gen) -> None:
    n, k = 20, 2 * gs
    wq, s, b = mlxq.affine_quantize(torch.randn(n, k, generator=gen).to(dtype), gs, 1)
    x = torch.randn(M, k if transpose else n, generator=gen).to(dtype)
    y = metal_ops.affine_matmul(x, wq, s, b, gs, 1, transpose)
    kernel = emu.last_dispatch_report().kernel
    assert kernel.startswith(prefix) and kernel.endswith("_b1"), kernel
    ref = mlxq.affine_matmul(x.float(), wq, s, b, gs, 1, transpose).to(x.dtype)  # fp32 tiles
    _assert_close(y, ref, x, wq, s, b, gs, transpose, kernel)


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).split(".")[-1] for d in DTYPES])
@pytest.mark.parametrize("M,transpose", [(1, True), (2, False), (33, True), (33, False)])
def test_gather_matmul_launch(M, transpose, dtype, gen) -> None:
    gs = 64
    wq, s, b = mlxq.affine_quantize(torch.randn(4, 20, 2 * gs, generator=gen).to(dtype), gs, 1)
    x = torch.randn(3, M, 2 * gs if transpose else 20, generator=gen).to(dtype)
    lhs, rhs = torch.tensor([[2], [0]]), torch.tensor([1, 3, 1])
    launch = _C.metal_launch_affine_gather_matmul(x, wq, s, b, lhs, rhs, gs, 1, transpose)
    y = launch["outputs"][0].fill_(float("nan"))
    tgm = dict(launch["threadgroup_memory"]) or None
    emu.dispatch(launch["kernel"], launch["grid"], launch["threads"], launch["buffers"], tgm)
    assert launch["kernel"].startswith("affine_gather_") and launch["kernel"].endswith("_b1")
    ref = mlxq.affine_gather_matmul(x.float(), wq, s, b, lhs, rhs, gs, 1, transpose).to(x.dtype)
    torch.testing.assert_close(y.float(), ref.float(), rtol=4 * OUT_EPS[dtype], atol=1e-3)
