"""The float-mode cases of MLX's own python/tests/test_quantized.py, restated for mlxq: round
trips of values the formats hold exactly, argument errors, zeros, mxfp8's block scale against
saturation, nvfp4's per-16 scales, and quantized (gather) matmul against the dequantized weight.
Each case also checks the packed result bit for bit against mx.quantize where MLX's test only
checks a tolerance.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlxq
import numpy as np
import pytest
import torch
from oracles import assert_product_within

# FP4 E2M1's 16 values, in code order
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def fp4_grid(group: int, gen: torch.Generator) -> torch.Tensor:
    """Random E2M1 values with a 6 at the start of each group (so the group scale is 1), nudged
    by 3e-6 and rounded to bf16: every value comes back from the round trip within 1e-5."""
    codes = torch.randint(0, 16, (128, 512), generator=gen)
    w = torch.tensor(E2M1)[codes].reshape(-1, group)
    w[:, 0] = 6.0
    return (w + 3e-6).to(torch.bfloat16)


def same_as_mlx(w: torch.Tensor, mode: str, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    wq, scales = mlxq.quantize(w, mode=mode, **kw)
    mkw = {k: mx.array(v.numpy()) for k, v in kw.items()}
    w_mx = mx.array(w.float().numpy()).astype(
        mx.bfloat16 if w.dtype == torch.bfloat16 else mx.float32
    )
    their_q, their_s = mx.quantize(w_mx, mode=mode, **mkw)
    assert np.array_equal(wq.numpy().view(np.uint32), np.array(their_q))
    assert np.array_equal(scales.numpy(), np.array(their_s))
    return wq, scales


@pytest.mark.parametrize("mode,group", [("mxfp4", 32), ("nvfp4", 16)])
def test_fp4_round_trip_and_errors(mode, group, gen):
    w = fp4_grid(group, gen)
    with pytest.raises(ValueError, match="bits"):
        mlxq.quantize(w, bits=3, mode=mode)
    with pytest.raises(ValueError, match="group_size"):
        mlxq.quantize(w, group_size=64, mode=mode)
    wq, scales = same_as_mlx(w, mode)
    with pytest.raises(ValueError, match="bits"):
        mlxq.dequantize(wq, scales, bits=3, mode=mode)
    with pytest.raises(ValueError, match="group_size"):
        mlxq.dequantize(wq, scales, group_size=2 * group, mode=mode)
    with pytest.raises((ValueError, TypeError), match="dtype"):
        mlxq.dequantize(wq, scales, mode=mode, dtype=torch.int32)
    w_hat = mlxq.dequantize(wq, scales, mode=mode)
    torch.testing.assert_close(w_hat.float(), w.float(), rtol=1e-5, atol=1e-5)
    zeros = torch.zeros(256, 512)
    assert (mlxq.dequantize(*mlxq.quantize(zeros, mode=mode), mode=mode) == 0).all()


def test_nvfp4_scales_are_per_16_values():
    """Alternating tiny and large groups of 16: a scale shared across 32 values could not
    represent the tiny ones."""
    w = torch.zeros(64, 16, dtype=torch.bfloat16)
    w[::2] = 6 * 2**-9
    w[1::2] = 6.0
    wq, scales = same_as_mlx(w, "nvfp4")
    w_hat = mlxq.dequantize(wq, scales, mode="nvfp4", dtype=torch.bfloat16)
    torch.testing.assert_close(w_hat.float(), w.float(), rtol=1e-5, atol=1e-6)


def test_nvfp4_global_scale_round_trip(gen):
    w = fp4_grid(16, gen)
    g = w.abs().max().float().reshape(())
    wq, scales = same_as_mlx(w, "nvfp4", global_scale=g)
    w_hat = mlxq.dequantize(wq, scales, mode="nvfp4", global_scale=g)
    assert w_hat.dtype == torch.float32
    torch.testing.assert_close(w_hat, w.float(), rtol=1e-5, atol=1e-5)


def test_mxfp8_round_trip_and_errors(gen):
    w = (2 * torch.rand(512, 32, generator=gen) - 1).to(torch.bfloat16)
    with pytest.raises(ValueError, match="bits"):
        mlxq.quantize(w, bits=3, mode="mxfp8")
    with pytest.raises(ValueError, match="bits"):
        mlxq.quantize(w, group_size=32, bits=7, mode="mxfp8")
    wq, scales = same_as_mlx(w, "mxfp8")
    with pytest.raises(ValueError, match="group_size"):
        mlxq.dequantize(wq, scales, group_size=16, mode="mxfp8")
    with pytest.raises(ValueError, match="bits"):
        mlxq.dequantize(wq, scales, bits=4, mode="mxfp8")
    w_hat = mlxq.dequantize(wq, scales, mode="mxfp8")
    torch.testing.assert_close(w_hat.float(), w.float(), rtol=1e-1, atol=1e-1)
    zeros = torch.zeros(256, 512)
    assert (mlxq.dequantize(*mlxq.quantize(zeros, mode="mxfp8"), mode="mxfp8") == 0).all()


def test_mxfp8_block_scale_does_not_saturate(gen):
    """Group maxima swept over one binade: E4M3 keeps a group's largest value within half a step
    (6.25%); more would mean the E8M0 scale rounded below amax / 448 and the maximum saturated."""
    n = 512
    w = torch.randn(n, 32, generator=gen) * torch.exp(torch.arange(n) / n * math.log(2.0))[:, None]
    wq, scales = same_as_mlx(w, "mxfp8")
    w_hat = mlxq.dequantize(wq, scales, mode="mxfp8", dtype=torch.float32)
    amax = w.abs().amax(dim=1)
    assert ((amax - w_hat.abs().amax(dim=1)).abs() / amax).max() < 0.0626


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_matmul_and_gather_against_dequantized_weight(mode, gen):
    """MLX's qmm / gather_qmm mode cases: the quantized products equal x @ dequantized W."""
    w = torch.randn(4, 96, 256, generator=gen)
    wq, scales = mlxq.quantize(w, mode=mode)
    w_hat = mlxq.dequantize(wq, scales, mode=mode, dtype=torch.float32).double()
    x = torch.randn(4, 3, 256, generator=gen)
    y = mlxq.quantized_matmul(x, wq, scales, mode=mode)
    # fp32 sums of exact products (the dequantized values are exact in fp32): the derived bound
    assert_product_within(y, x, w_hat.transpose(-1, -2), f"{mode} quantized_matmul")
    rhs = torch.tensor([3, 0, 0, 2, 1])
    lhs = torch.tensor([0, 1, 2, 3, 3])
    g = mlxq.gather_quantized_matmul(x, wq, scales, lhs_indices=lhs, rhs_indices=rhs, mode=mode)
    assert_product_within(g, x[lhs], w_hat[rhs].transpose(-1, -2), f"{mode} gather_qmm")
