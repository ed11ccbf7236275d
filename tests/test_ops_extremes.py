"""affine_matmul with activations at the edge of the float range (issue 18): the output is finite
wherever the float64 result is, and an infinite x gives MLX's +-inf (NaN only where inf * 0 or
inf - inf occurs), on every CPU kernel set and on both the decode (M <= 16) and GEMM paths."""

from __future__ import annotations

import mlx.core as mx
import mlxq
import pytest
import torch
from oracles import (
    BITS,
    DTYPES,
    assert_within,
    matmul_tolerance,
    path_weight_refs,
    to_mx,
    to_torch,
)

M_SIZES = (1, 3, 20)  # decode (fp32 and bf16 kernels) and dequantize + GEMM
N, K, GS = 16, 256, 64


def one_signed_weight(gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """|W| in [0.01, 0.05] with one sign per row: no dequantized value is 0 or near it, so
    inf * w has a definite sign, whatever the rounding of s*q + b (MLX's or ours)."""
    sign = torch.where(torch.rand(N, 1, generator=gen) < 0.5, -1.0, 1.0)
    return (sign * (0.01 + 0.04 * torch.rand(N, K, generator=gen))).to(dtype)


def reference(x: torch.Tensor, w64: torch.Tensor, transpose: bool) -> torch.Tensor:
    """x @ W.T (or x @ W) in float64 as explicit products and sums (a BLAS might turn an
    infinity into NaN through its blocking)."""
    wt = w64.T if transpose else w64  # [inner, out]
    return (x.double()[:, :, None] * wt[None]).sum(1)


@pytest.mark.parametrize("transpose", [True, False], ids=["xWT", "xW"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("bits", BITS)
def test_largest_finite_x_gives_finite_output(isa, bits, dtype, transpose, gen):
    """One element of x at its dtype's largest finite value (or 3e38) with |W| < 0.05: every
    x * w is finite, so the output must be (the decode kernels' factored sums overflowed)."""
    wq, s, b = mlxq.affine_quantize(one_signed_weight(gen, dtype), GS, bits)
    inner = K if transpose else N
    bigs = [torch.finfo(dtype).max, -torch.finfo(dtype).max]
    if dtype != torch.float16:
        bigs.append(3e38)
    for m in M_SIZES:
        for big in bigs:
            x = torch.randn(m, inner, generator=gen)
            x[:, 3] = big
            x = x.to(dtype)
            y = mlxq.affine_matmul(x, wq, s, b, GS, bits, transpose)
            w64, w64_abs = path_weight_refs(x, wq, s, b, GS, bits, transpose)
            ref = reference(x, w64, transpose)
            ref_abs = reference(x.abs(), w64_abs, transpose)
            assert bool(torch.isfinite(y).all()), f"{m=} x={big:g}: non-finite output"
            tol = matmul_tolerance(ref_abs, ref, inner, dtype)
            assert_within(y, ref, tol, f"{isa} {m=} x={big:g}")


@pytest.mark.parametrize("transpose", [True, False], ids=["xWT", "xW"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("bits", BITS)
def test_infinite_x_gives_mlx_infinities(isa, bits, dtype, transpose, gen):
    """+inf / -inf in x: +-inf in the outputs it reaches, NaN where +inf and -inf meet, the
    other rows exact; against float64 and, in fp32, against mx.quantized_matmul."""
    wq, s, b = mlxq.affine_quantize(one_signed_weight(gen, dtype), GS, bits)
    inner = K if transpose else N
    for m in M_SIZES:
        x = torch.randn(m, inner, generator=gen)
        x[0, 3] = float("inf")
        if m > 1:
            x[1, 3] = float("-inf")
        if m > 2:
            x[2, 3], x[2, 5] = float("inf"), float("-inf")  # inf - inf: NaN, as in MLX
        x = x.to(dtype)
        y = mlxq.affine_matmul(x, wq, s, b, GS, bits, transpose).double()
        w64, w64_abs = path_weight_refs(x, wq, s, b, GS, bits, transpose)
        ref = reference(x, w64, transpose)
        what = f"{isa} {m=}"
        assert torch.equal(y.isnan(), ref.isnan()), f"{what}: NaN where float64 has none"
        inf = ref.isinf()
        assert bool(inf[0].all()) and torch.equal(y[inf], ref[inf]), f"{what}: wrong infinities"
        finite = ref.isfinite()
        ref_abs = reference(x.abs(), w64_abs, transpose)
        tol = matmul_tolerance(ref_abs, ref, inner, dtype)
        assert_within(y[finite], ref[finite], tol[finite], what)
        if dtype == torch.float32:
            theirs = mx.quantized_matmul(
                to_mx(x), to_mx(wq), to_mx(s), to_mx(b), transpose=transpose, group_size=GS,
                bits=bits,
            )  # fmt: skip
            ym = to_torch(theirs).double()
            assert torch.equal(y.isnan(), ym.isnan()), f"{what}: NaN pattern differs from MLX"
            assert torch.equal(y[ym.isinf()], ym[ym.isinf()]), f"{what}: infinities differ"
