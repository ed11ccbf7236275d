"""affine_matmul against a float64 reference and mx.quantized_matmul.

Our op dequantizes and accumulates in fp32 and rounds once to x's dtype, so it is held to the
float64 reference within a worst-case fp32 summation bound (see oracles.matmul_tolerance).
One exception, MLX's Metal numerics for bf16 prefill: bf16 x @ W.T with more than 16 rows
rounds W's tiles to bf16 first (oracles.bf16_tile_ref) and is held to that reference.
MLX on the CPU computes fp16/bf16 in that dtype, so against MLX the fp32 comparison is tight
and the fp16/bf16 one uses MLX's own (much larger) error bound.
"""

from __future__ import annotations

import mlx.core as mx
import mlxq
import pytest
import torch
from conftest import random_weight
from oracles import CPU_BITS as BITS
from oracles import (
    DTYPES,
    GROUP_SIZES,
    assert_within,
    bf16_tile_ref,
    dequantize_ref,
    eps,
    matmul_ref,
    matmul_tolerance,
    takes_bf16_gemm,
    to_mx,
    to_torch,
)

GRID = [(b, g, d) for b in BITS for g in GROUP_SIZES for d in DTYPES]
GRID_IDS = [f"b{b}-g{g}-{str(d).split('.')[-1]}" for b, g, d in GRID]
# The CPU op streams the weight for M <= 16 rows (kDecodeMaxRows in affine_cpu.cpp, in blocks
# of 4 rows) and dequantizes tiles for a dense GEMM above; these M cover both sides and every
# remainder of the 4-row blocks.
M_ALL = (1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 18, 20, 33, 64, 70)


def quantized(shape, dtype, group_size, bits, gen):
    """Quantized random weight (wq, scales, biases) of logical shape [..., N, K]."""
    return mlxq.affine_quantize(random_weight(shape, dtype, gen), group_size, bits)


def check(x, wq, s, b, group_size, bits, transpose=True, mlx=True, what="", dense=None):
    """Runs affine_matmul and compares it with the float64 reference and (optionally) MLX.

    `dense` may carry the float64 (W, |s|q+|b|) of the weight, to dequantize a big one once.
    """
    y = mlxq.affine_matmul(x, wq, s, b, group_size, bits, transpose)
    assert y.dtype == x.dtype, f"{what}: output dtype {y.dtype} != x dtype {x.dtype}"
    tiles = takes_bf16_gemm(x, wq, transpose)
    if tiles:
        ref = matmul_ref(x, wq, s, b, group_size, bits, transpose, bf16_tiles=True)
        ref_abs = matmul_ref(x, wq, s, b, group_size, bits, transpose, True, bf16_tiles=True)
    elif dense is None:
        ref = matmul_ref(x, wq, s, b, group_size, bits, transpose)
        ref_abs = matmul_ref(x, wq, s, b, group_size, bits, transpose, absolute=True)
    else:
        w, w_abs = (t.T if transpose else t for t in dense)
        ref, ref_abs = x.double() @ w, x.double().abs() @ w_abs
    k = x.shape[-1]
    tol = matmul_tolerance(ref_abs, ref, k, x.dtype)
    assert_within(y, ref, tol, f"{what} vs float64 reference")
    if mlx:
        theirs = to_torch(
            mx.quantized_matmul(
                to_mx(x), to_mx(wq), to_mx(s), to_mx(b), transpose, group_size, bits
            )
        )
        assert theirs.shape == y.shape
        if x.dtype == torch.float32:
            mlx_tol = 2 * tol
        else:  # MLX accumulates in the low dtype: its own worst-case bound, plus ours
            mlx_tol = tol + (k + 2) * eps(x.dtype) * ref_abs + eps(x.dtype) * ref.abs() * 2
        assert_within(y, theirs.double(), mlx_tol, f"{what} vs mx.quantized_matmul")
    return y


@pytest.mark.parametrize("transpose", [True, False], ids=["xWT", "xW"])
@pytest.mark.parametrize("bits,group_size,dtype", GRID, ids=GRID_IDS)
def test_matmul_grid(bits, group_size, dtype, transpose, gen, isa):
    """Every bits x group x dtype, both transposes, decode and GEMM paths, odd N, K = group."""
    cases = [(1, 1, 1), (5, 7, 2), (16, 13, 1), (17, 9, 3), (21, 24, 2)]  # (M, N, groups)
    for m, n, groups in cases:
        k = groups * group_size
        wq, s, b = quantized((n, k), dtype, group_size, bits, gen)
        x = torch.randn((m, k if transpose else n), generator=gen).to(dtype)
        check(x, wq, s, b, group_size, bits, transpose, what=f"M={m} N={n} K={k}")


@pytest.mark.parametrize("transpose", [True, False], ids=["xWT", "xW"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("bits", [3, 4])
def test_matmul_every_m_across_the_decode_gemm_switch(bits, dtype, transpose, gen, isa):
    n, k, group_size = 40, 192, 64
    wq, s, b = quantized((n, k), dtype, group_size, bits, gen)
    for m in M_ALL:
        x = torch.randn((m, k if transpose else n), generator=gen).to(dtype)
        check(x, wq, s, b, group_size, bits, transpose, what=f"M={m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("bits", [2, 4])
def test_matmul_decode_whole_and_half_blocks(bits, dtype, gen, isa):
    """The AVX512-BF16 decode kernel reads 64-byte blocks and may end in a 32-byte half block
    (K = 576 at 4 bits, SmolLM2's width): K of 1..5 half blocks, every group size."""
    half = 256 // bits  # values in 32 packed bytes
    for group_size in GROUP_SIZES:
        for halves in range(1, 6):
            k = halves * half
            if k % group_size:
                continue
            wq, s, b = quantized((37, k), dtype, group_size, bits, gen)
            for m in (1, 2, 3, 5):
                x = torch.randn((m, k), generator=gen).to(dtype)
                check(x, wq, s, b, group_size, bits, what=f"gs={group_size} K={k} M={m}")


@pytest.mark.parametrize("transpose", [True, False], ids=["xWT", "xW"])
@pytest.mark.parametrize("bits", [2, 5, 6, 8])
def test_matmul_layer_sized(bits, transpose, gen, isa):
    """Bigger K and N: several parallel chunks, several GEMM tiles (tile rows = 4 MiB / 4K)."""
    n, k, group_size = 264, 4096, 128
    wq, s, b = quantized((n, k), torch.float16, group_size, bits, gen)
    dense = (
        dequantize_ref(wq, s, b, group_size, bits),
        dequantize_ref(wq, s.abs(), b.abs(), group_size, bits),
    )
    for m in (1, 6, 19):
        x = torch.randn((m, k if transpose else n), generator=gen).to(torch.float16)
        check(x, wq, s, b, group_size, bits, transpose, m == 1, f"M={m}", dense)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_matmul_leading_dims_of_x(dtype, gen, isa):
    """x with any leading dims against a 2-D weight: 1-D, 3-D, 4-D, and zero rows."""
    wq, s, b = quantized((24, 128), dtype, 32, 4, gen)
    for shape in [(128,), (2, 3, 128), (3, 1, 6, 128), (2, 9, 128)]:
        x = torch.randn(shape, generator=gen).to(dtype)
        y = check(x, wq, s, b, 32, 4, mlx=x.dim() > 1, what=f"x {shape}")
        assert y.shape == (*shape[:-1], 24)
    y = mlxq.affine_matmul(torch.zeros((0, 128), dtype=dtype), wq, s, b, 32, 4)
    assert y.shape == (0, 24)
    xt = torch.randn((2, 24), generator=gen).to(dtype)  # transpose=False: x @ W
    assert mlxq.affine_matmul(xt, wq, s, b, 32, 4, transpose=False).shape == (2, 128)


@pytest.mark.parametrize("transpose", [True, False], ids=["xWT", "xW"])
@pytest.mark.parametrize("m", [3, 20], ids=["decode", "gemm"])
def test_matmul_batched_weights_broadcast(m, transpose, gen, isa):
    """Batched w [B, N, Kp] with batch broadcasting both ways, as mx.quantized_matmul does."""
    n, k, gs, bits, dtype = 12, 64, 32, 6, torch.float32
    wq, s, b = quantized((3, n, k), dtype, gs, bits, gen)
    inner = k if transpose else n
    for x_shape, w_sel in [
        ((3, m, inner), slice(None)),  # same batch
        ((1, m, inner), slice(None)),  # x batch 1 vs w batch 3
        ((4, m, inner), slice(0, 1)),  # x batch 4 vs w batch 1
        ((2, 1, m, inner), slice(None)),  # -> batch [2, 3]
    ]:
        x = torch.randn(x_shape, generator=gen).to(dtype)
        y = check(
            x, wq[w_sel], s[w_sel], b[w_sel], gs, bits, transpose, what=f"x {x_shape} w {w_sel}"
        )
        expected_batch = torch.broadcast_shapes(x_shape[:-2], wq[w_sel].shape[:-2])
        assert y.shape == (*expected_batch, m, n if transpose else k)
    # A 2-D x against a batched weight broadcasts x over the weight's batch.
    x = torch.randn((m, inner), generator=gen)
    y = check(x, wq, s, b, gs, bits, transpose, mlx=False, what="2-D x, batched w")
    assert y.shape == (3, m, n if transpose else k)


@pytest.mark.parametrize("m", [2, 24], ids=["decode", "gemm"])
def test_matmul_int32_and_strided_operands(m, gen, isa):
    """int32 packed words and non-contiguous x / wq / scales give the contiguous result."""
    gs, bits = 64, 5
    wq, s, b = quantized((2 * 10, 3 * gs), torch.bfloat16, gs, bits, gen)
    x = torch.randn((m, 3 * gs), generator=gen).to(torch.bfloat16)
    y = mlxq.affine_matmul(x, wq, s, b, gs, bits)
    assert torch.equal(mlxq.affine_matmul(x, wq.view(torch.int32), s, b, gs, bits), y)
    # x as a transposed view, a column slice and an expanded row
    xt = x.t().contiguous().t()
    assert not xt.is_contiguous()
    assert torch.equal(mlxq.affine_matmul(xt, wq, s, b, gs, bits), y)
    wide = torch.randn((m, 3 * gs * 2), generator=gen).to(torch.bfloat16)
    check(wide[:, ::2], wq, s, b, gs, bits, what="x[:, ::2]")
    check(x[:1].expand(m, -1), wq, s, b, gs, bits, what="expanded x")
    # every other row of the weight: strided wq, scales and biases
    sub = (wq[::2], s[::2], b[::2])
    assert not sub[0].is_contiguous()
    y_sub = mlxq.affine_matmul(x, *sub, gs, bits)
    assert torch.equal(y_sub, mlxq.affine_matmul(x, *(t.contiguous() for t in sub), gs, bits))
    check(x, *sub, gs, bits, what="strided weight")


@pytest.mark.parametrize("x_dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_matmul_x_dtype_differs_from_scales(x_dtype, gen):
    """The output follows x's dtype whatever the scales' dtype is (all math in fp32)."""
    for s_dtype in DTYPES:
        wq, s, b = quantized((9, 64), s_dtype, 32, 4, gen)
        for m in (1, 18):
            x = torch.randn((m, 64), generator=gen).to(x_dtype)
            check(x, wq, s, b, 32, 4, mlx=False, what=f"scales {s_dtype}")


def test_matmul_zero_and_special_x(gen, isa):
    """x full of zeros gives zeros (qvm skips zero inputs); a NaN in x stays NaN in its row."""
    wq, s, b = quantized((16, 64), torch.float32, 32, 4, gen)
    for transpose, m in [(True, 2), (False, 2), (True, 20), (False, 20)]:
        x = torch.zeros((m, 64 if transpose else 16))
        assert torch.equal(
            mlxq.affine_matmul(x, wq, s, b, 32, 4, transpose),
            x.new_zeros(m, 16 if transpose else 64),
        )
        x[1, 3] = float("nan")
        y = mlxq.affine_matmul(x, wq, s, b, 32, 4, transpose)
        assert bool(y[1].isnan().all()), f"transpose={transpose} M={m}: NaN was lost"
        assert not bool(y[0].isnan().any())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("m", [1, 5, 40])
def test_thread_count_does_not_change_results(bits, m, isa, gen):
    # Rows of the output are split between threads; each row's sum runs in one fixed order.
    wq, s, b = quantized((1000, 512), torch.float32, 64, bits, gen)
    x = torch.randn(m, 512, generator=gen)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, max(2, before)):
            torch.set_num_threads(threads)
            outs.append(mlxq.affine_matmul(x, wq, s, b, 64, bits))
            outs.append(mlxq.affine_dequantize(wq, s, b, 64, bits))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[1], outs[3]), "dequantize depends on the thread count"
    if m <= 16:  # decode kernels; the GEMM path's at::mm may reorder sums with threads
        assert torch.equal(outs[0], outs[2]), "decode result depends on the thread count"
    else:  # each within the derived bound of the float64 product, whatever the sum's order
        ref = matmul_ref(x, wq, s, b, 64, bits)
        tol = matmul_tolerance(matmul_ref(x, wq, s, b, 64, bits, absolute=True), ref, 512, x.dtype)
        assert_within(outs[0], ref, tol, "GEMM path, 1 thread")
        assert_within(outs[2], ref, tol, f"GEMM path, {max(2, before)} threads")


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "enable_grad"])
@pytest.mark.parametrize("m", [1, 40])
def test_grad_modes_give_the_same_result(mode, m, gen):
    # The GEMM path runs ATen ops on OpenMP workers, which must see the caller's inference
    # mode: under torch.inference_mode() the output is an inference tensor they write into.
    wq, s, b = quantized((300, 256), torch.float32, 64, 4, gen)
    x = torch.randn(m, 256, generator=gen)
    expected = mlxq.affine_matmul(x, wq, s, b, 64, 4)
    with getattr(torch, mode)():
        got = mlxq.affine_matmul(x, wq, s, b, 64, 4)
        got_t = mlxq.affine_matmul(
            x[:, :128].contiguous(), wq[:128], s[:128], b[:128], 64, 4, False
        )
    assert torch.equal(got, expected)
    assert got_t.shape == (m, 256)


@pytest.mark.parametrize("bits", BITS)
def test_bf16_gemm_tiles_are_mlx_dequantize_in_bf16(bits, gen):
    """The bf16 prefill's tiles are the numbers mx.dequantize gives in bf16, and a bf16 prefill
    lands within fp32 accumulation of x @ tiles.T, well away from the fp32-tile result."""
    for group_size in GROUP_SIZES:
        wq, s, b = quantized((48, 4 * group_size), torch.bfloat16, group_size, bits, gen)
        theirs = to_torch(mx.dequantize(to_mx(wq), to_mx(s), to_mx(b), group_size, bits))
        tiles = bf16_tile_ref(wq, s, b, group_size, bits)
        assert torch.equal(tiles, theirs.double()), f"g{group_size}: tiles != mx.dequantize"
    x = torch.randn((40, 4 * group_size), generator=gen).to(torch.bfloat16)
    y = check(x, wq, s, b, group_size, bits, what="bf16 prefill")
    exact = mlxq.affine_matmul(x.float(), wq, s, b, group_size, bits).to(torch.bfloat16)
    if takes_bf16_gemm(x, wq, True):
        assert not torch.equal(y, exact), "bf16 prefill still uses fp32 tiles"
    else:  # no bf16 dot products on this CPU: fp32 tiles, the exact result
        assert torch.equal(y, exact)


def test_bf16_gemm_tiles_with_tiny_scales(gen):
    """4-bit tiles use vcvtneps2bf16 on AVX512-BF16, which flushes subnormals; rows whose
    scales or biases are below 2^-100 take the generic kernel and keep mx.dequantize's numbers.
    (The bf16 GEMM itself, AVX512-BF16 dot products, reads subnormal bf16 values as zero, so
    the weights here stay normal: about 2^-112.)"""
    wq, s, b = quantized((48, 128), torch.bfloat16, 32, 4, gen)
    tiny = (s.float() * 2.0**-105).to(torch.bfloat16), (b.float() * 2.0**-105).to(torch.bfloat16)
    theirs = to_torch(mx.dequantize(to_mx(wq), to_mx(tiny[0]), to_mx(tiny[1]), 32, 4))
    assert torch.equal(bf16_tile_ref(wq, *tiny, 32, 4), theirs.double())
    x = torch.randn((40, 128), generator=gen).to(torch.bfloat16) * 2.0**100
    check(x, wq, *tiny, 32, 4, what="tiny tiles")
