"""affine_quantize and affine_dequantize against mlx.core and a float64 reference."""

from __future__ import annotations

import mlx.core as mx
import mlxq
import numpy as np
import pytest
import torch
from conftest import random_weight
from oracles import CPU_BITS as BITS
from oracles import DTYPES, GROUP_SIZES, dequantize_ref, to_mx, to_torch, words

GRID = [(b, g, d) for b in BITS for g in GROUP_SIZES for d in DTYPES]
GRID_IDS = [f"b{b}-g{g}-{str(d).split('.')[-1]}" for b, g, d in GRID]


def leading_shapes(group_size: int) -> list[tuple[int, ...]]:
    """1-D, 2-D (odd row counts, one row, several groups) and 3-D weights."""
    g = group_size
    return [(g,), (3 * g,), (1, g), (7, 2 * g), (2, 3, g)]


def assert_bit_equal(ours: torch.Tensor, theirs: mx.array, what: str) -> None:
    ref = to_torch(theirs)
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} != mlx {ref.dtype}"
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != mlx {tuple(ref.shape)}"
    if ours.dtype == torch.uint32:
        a, b = words(ours), words(ref)
    else:  # compare the bit patterns (so -0.0 vs 0.0 or NaN payloads would show)
        as_int = torch.int16 if ours.element_size() == 2 else torch.int32
        a, b = ours.view(as_int).numpy(), ref.view(as_int).numpy()
    mismatch = np.flatnonzero((a != b).ravel())
    assert mismatch.size == 0, (
        f"{what}: {mismatch.size}/{a.size} differ from mlx, first at flat index {mismatch[0]}: "
        f"{ours.flatten()[mismatch[0]].item()!r} vs {ref.flatten()[mismatch[0]].item()!r}"
    )


def mx_quantize(w: torch.Tensor, group_size: int, bits: int) -> tuple[mx.array, ...]:
    """mx.quantize, which wants 2 dims: a 1-D weight goes in as one row."""
    if w.dim() == 1:
        return tuple(a[0] for a in mx_quantize(w[None], group_size, bits))
    return mx.quantize(to_mx(w), group_size=group_size, bits=bits)


def mx_dequantize(wq, scales, biases, group_size: int, bits: int) -> torch.Tensor:
    if wq.dim() == 1:
        return mx_dequantize(wq[None], scales[None], biases[None], group_size, bits)[0]
    return to_torch(mx.dequantize(to_mx(wq), to_mx(scales), to_mx(biases), group_size, bits))


@pytest.mark.parametrize("bits,group_size,dtype", GRID, ids=GRID_IDS)
def test_quantize_bit_exact_with_mlx(bits, group_size, dtype, gen):
    for shape in leading_shapes(group_size):
        w = random_weight(shape, dtype, gen)
        wq, scales, biases = mlxq.affine_quantize(w, group_size, bits)
        mq, ms, mb = mx_quantize(w, group_size, bits)
        assert_bit_equal(wq, mq, f"packed words of {shape}")
        assert_bit_equal(scales, ms, f"scales of {shape}")
        assert_bit_equal(biases, mb, f"biases of {shape}")


@pytest.mark.parametrize("bits", BITS)
def test_quantize_larger_and_strided(bits, gen):
    """A layer-sized weight (many parallel chunks), and a transposed (non-contiguous) view."""
    w = random_weight((96, 512), torch.bfloat16, gen).t()  # [512, 96] strided, K=96 -> gs 32
    assert not w.is_contiguous()
    for group_size in (32,):
        ours = mlxq.affine_quantize(w, group_size, bits)
        theirs = mx_quantize(w.contiguous(), group_size, bits)
        for o, t, name in zip(ours, theirs, ("wq", "scales", "biases"), strict=True):
            assert_bit_equal(o, t, name)
    w = random_weight((384, 1024), torch.float32, gen)
    ours = mlxq.affine_quantize(w, 128, bits)
    theirs = mx_quantize(w, 128, bits)
    for o, t, name in zip(ours, theirs, ("wq", "scales", "biases"), strict=True):
        assert_bit_equal(o, t, name)


def random_packed(shape, bits, group_size, dtype, gen):
    """Random packed words (every bit pattern, not only what the quantizer emits) and random
    scales/biases, for a weight of logical shape [..., K]."""
    *lead, k = shape
    wq = torch.randint(-(2**31), 2**31, (*lead, k * bits // 32), generator=gen, dtype=torch.int64)
    wq = wq.to(torch.int32).view(torch.uint32)
    scales = (torch.randn((*lead, k // group_size), generator=gen) * 0.1).to(dtype)
    biases = torch.randn((*lead, k // group_size), generator=gen).to(dtype)
    return wq, scales, biases


@pytest.mark.parametrize("bits,group_size,dtype", GRID, ids=GRID_IDS)
def test_dequantize_vs_mlx_and_float64(bits, group_size, dtype, gen, isa):
    shapes = [(group_size,), (5, 2 * group_size), (2, 3, group_size), (17, 3 * group_size)]
    for i, shape in enumerate(shapes):
        if i % 2 == 0:
            wq, s, b = mlxq.affine_quantize(random_weight(shape, dtype, gen), group_size, bits)
        else:
            wq, s, b = random_packed(shape, bits, group_size, dtype, gen)
        out = mlxq.affine_dequantize(wq, s, b, group_size, bits)
        assert out.dtype == dtype and out.shape == shape
        # int32 packed words hold the same bits and must give the same result
        out_i32 = mlxq.affine_dequantize(wq.view(torch.int32), s, b, group_size, bits)
        assert torch.equal(out_i32, out)
        # bit for bit what mx.dequantize computes on the CPU: s*q rounded to the dtype, then
        # + b rounded again (two roundings, no fused multiply-add)
        theirs = mx_dequantize(wq, s, b, group_size, bits)
        mism = out.view(-1) != theirs.view(-1)
        assert not bool(mism.any()), (
            f"{shape}: {int(mism.sum())} elements differ from mx.dequantize, e.g. "
            f"{out.view(-1)[mism][0].item()} vs {theirs.view(-1)[mism][0].item()}"
        )
        # and within one ulp of the terms' magnitude |s*q| + |b| of the float64 value
        ref64 = dequantize_ref(wq, s, b, group_size, bits)
        size = dequantize_ref(wq, s.abs(), b.abs(), group_size, bits)
        tol = torch.finfo(dtype).eps * size + torch.finfo(dtype).tiny
        assert bool(((out.double() - ref64).abs() <= tol).all())


def test_dequantize_product_overflows_like_mlx(isa) -> None:
    """fp16 s * q that overflows before + b brings it back in range (the case a fuzz run found:
    s = -10256, q = 7, b = 41024, s * q + b = -30768): mx.dequantize rounds the product to fp16
    first, so the element is -inf; mlxq gives MLX's value, on every kernel set."""
    bits, group_size = 4, 32
    # q = 7, 6, 1, 0, ... (nibbles, low first): 7 * -10256 overflows fp16, 6 * -10256 does not
    wq = torch.full((1, group_size // 8), 0x01670167, dtype=torch.int32).view(torch.uint32)
    s = torch.tensor([[-10256.0]], dtype=torch.float16)
    b = torch.tensor([[41024.0]], dtype=torch.float16)
    out = mlxq.affine_dequantize(wq, s, b, group_size, bits)
    theirs = mx_dequantize(wq, s, b, group_size, bits)
    assert torch.equal(out, theirs), (out[0, :4], theirs[0, :4])
    assert out[0, 0] == float("-inf") and out[0, 1] == -20512.0 and out[0, 3] == 41024.0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_dequantize_strided_inputs(dtype, gen):
    """Non-contiguous wq/scales/biases (slices of bigger tensors) give the contiguous result."""
    bits, group_size = 3, 32
    wq, s, b = random_packed((9, 8 * group_size), bits, group_size, dtype, gen)
    sub = (wq[::2, 3:], s[::2, 1:], b[::2, 1:])  # drop the first group, every other row
    assert not sub[0].is_contiguous()
    out = mlxq.affine_dequantize(*sub, group_size, bits)
    expected = mlxq.affine_dequantize(*(t.contiguous() for t in sub), group_size, bits)
    assert torch.equal(out, expected)
    theirs = mx_dequantize(*(t.contiguous() for t in sub), group_size, bits)
    assert torch.equal(out.view(-1), theirs.view(-1))  # bit for bit what MLX computes


def test_dequantize_empty_rows():
    """Zero rows is a valid (empty) weight; zero groups is not (checked in test_ops_errors)."""
    wq = torch.zeros((0, 8), dtype=torch.uint32)
    s = torch.zeros((0, 1), dtype=torch.float16)
    out = mlxq.affine_dequantize(wq, s, s, 32, 8)
    assert out.shape == (0, 32) and out.dtype == torch.float16


def test_default_arguments_are_mlx_defaults(gen):
    """group_size=64, bits=4 by default, in the Python API and in the op schemas alike."""
    w = random_weight((6, 128), torch.float16, gen)
    theirs = mx.quantize(to_mx(w))  # mlx defaults: group 64, 4 bits
    for ours in (mlxq.affine_quantize(w), torch.ops.mlxq.affine_quantize(w)):
        for o, t, name in zip(ours, theirs, ("wq", "scales", "biases"), strict=True):
            assert_bit_equal(o, t, name)
    wq, s, b = mlxq.affine_quantize(w)
    expected = mx_dequantize(wq, s, b, 64, 4)
    assert mlxq.affine_dequantize(wq, s, b).shape == expected.shape
    assert torch.ops.mlxq.affine_dequantize(wq, s, b).shape == expected.shape
    x = torch.randn((3, 128), generator=gen).half()
    y = mlxq.affine_matmul(x, wq, s, b)
    assert torch.equal(torch.ops.mlxq.affine_matmul(x, wq, s, b), y)
    assert torch.equal(mlxq.affine_matmul(x, wq, s, b, 64, 4, True), y)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_quantize_extreme_finite_values(dtype, gen):
    """Groups at the edges of the dtype's range (near max, subnormal, all equal, +-0) still
    match mx.quantize bit for bit."""
    info = torch.finfo(dtype)
    w = torch.randn((8, 64), generator=gen)
    w[0] *= info.max / 8  # values near the largest finite magnitude
    w[1, 3] = info.max
    w[2] *= info.tiny  # subnormal and tiny values
    w[3] = -info.max
    w[4] = 0.0
    w[4, ::2] = -0.0
    w[5] = info.tiny
    w = w.to(dtype)
    assert bool(torch.isfinite(w).all())
    for bits in BITS:
        ours = mlxq.affine_quantize(w, 32, bits)
        theirs = mx_quantize(w, 32, bits)
        for o, t, name in zip(ours, theirs, ("wq", "scales", "biases"), strict=True):
            assert_bit_equal(o, t, f"{name} bits={bits}")
