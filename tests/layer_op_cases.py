"""Cases and checks of the layer ops (rms_norm, rotary_embedding, decode_attention) shared by the
tests of their other implementations: the composites on CPU tensors (test_composite_ops.py) and
the ops on CUDA tensors (test_cuda_ops.py). Each check takes `run(op_name, *cpu_args)`, which
evaluates the implementation under test on (copies of) the CPU arguments and returns CPU
tensors, and holds it to the CPU op: rotary_embedding bit for bit, rms_norm and decode_attention
within oracles' derived bounds (the CPU op within them too, against the float64 reference)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from oracles import assert_within, attention_reference, rms_norm_tolerance

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Run = Callable[..., object]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def check_rms_norm(run: Run, x_dtype: torch.dtype, gen: torch.Generator) -> None:
    for shape, w_dtype, eps in [
        ((1, 1, 576), x_dtype, 1e-5),
        ((3, 7, 64), torch.float32, 1e-6),
        ((5, 1), x_dtype, 1e-5),
        ((2, 4096), x_dtype, 1e-6),  # a long row: fp32 sums in another order
    ]:
        x = (torch.randn(shape, generator=gen) * 3).to(x_dtype)
        x[..., 0] = x[..., 0] * 1e3  # one large value per row
        w = (torch.randn(shape[-1], generator=gen) * 2).to(w_dtype)
        want = torch.ops.mlxq.rms_norm(x, w, eps)
        got = run("rms_norm", x, w, eps)
        assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype)
        tol = rms_norm_tolerance(x, w, want, eps)
        assert_within(got, want.double(), tol, f"rms_norm {shape} {x_dtype}/{w_dtype}")
        if x_dtype != torch.float32:  # a tie flip is rare: most values are the same bits
            assert (got != want).double().mean() < 0.01
    zeros = run("rms_norm", torch.zeros(2, 8, dtype=x_dtype), torch.ones(8, dtype=x_dtype), 1e-6)
    assert torch.equal(zeros, torch.zeros(2, 8, dtype=x_dtype))
    empty = run("rms_norm", torch.zeros(0, 8, dtype=x_dtype), torch.ones(8, dtype=x_dtype), 1e-6)
    assert empty.shape == (0, 8)


def check_rotary_embedding(run: Run, dtype: torch.dtype, gen: torch.Generator) -> None:
    for b, hq, hk, positions, dim, cos_batch, strided in [
        (1, 9, 3, 1, 64, 1, True),  # transposed views of the projections' outputs
        (2, 4, 2, 3, 128, 2, False),  # per-batch cos and sin
        (2, 2, 2, 16, 2, 1, True),
        (1, 1, 1, 5, 96, 1, False),
    ]:
        q = (torch.randn(b, positions, hq, dim, generator=gen) * 4).to(dtype).transpose(1, 2)
        k = (torch.randn(b, positions, hk, dim, generator=gen) * 4).to(dtype).transpose(1, 2)
        if not strided:
            q, k = q.contiguous(), k.contiguous()
        angles = torch.rand(cos_batch, positions, dim // 2, generator=gen) * 100
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        q[..., 0, 0, 0] = float("inf")
        q[..., 0, 0, -1] = float("nan")
        k[..., 0, -1, 0] = torch.finfo(dtype).max  # products near overflow
        want = torch.ops.mlxq.rotary_embedding(q, k, cos, sin)
        got = run("rotary_embedding", q, k, cos, sin)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape
            # bit for bit, but for NaN's sign and payload (the CPU op's bf16 NaN is canonical)
            nan = w.isnan()
            assert torch.equal(g.isnan(), nan), f"rotary {dtype} {q.shape}: NaN positions"
            assert torch.equal(_bits(g)[~nan], _bits(w)[~nan]), f"rotary {dtype} {q.shape}"


# (B, Hkv, Hq/Hkv, Lq, Lk, D, mask kind, mask shape): GQA, every mask kind and broadcast
ATTENTION_CASES = [
    (1, 3, 3, 1, 512, 64, None, None),
    (1, 3, 3, 1, 513, 64, "bool", "b1"),
    (2, 2, 1, 4, 7, 32, "float", "full"),
    (1, 1, 8, 16, 300, 128, "bool", "b1"),
    (2, 1, 3, 16, 64, 80, "float_inf", "b1"),
    (1, 4, 1, 4, 700, 256, "float_min", "2d"),
    (1, 1, 3, 1, 7, 80, "bool", "full"),
    (1, 1, 1, 3, 100, 30, "bool", "2d"),
]


def _mask(kind, shape, dtype, gen):
    if kind is None:
        return None
    keep = torch.rand(shape, generator=gen) > 0.3
    keep[..., -1] = True
    if kind == "bool":
        keep[..., 0, :] = False  # a row (of every head that reads it) attends nothing
        return keep
    add = torch.randn(shape, generator=gen).to(dtype)
    fill = float("-inf") if kind == "float_inf" else torch.finfo(dtype).min
    return add.masked_fill(~keep, fill)


def check_decode_attention(run: Run, dtype: torch.dtype, gen: torch.Generator) -> None:
    for case in ATTENTION_CASES:
        B, hkv, rep, lq, lk, d, kind, mshape = case
        q = torch.randn(B, hkv * rep, lq, d, generator=gen).to(dtype)
        k = torch.randn(B, hkv, lk, d, generator=gen).to(dtype)
        v = torch.randn(B, hkv, lk, d, generator=gen).to(dtype)
        shape = {"b1": (B, 1, lq, lk), "full": (B, hkv * rep, lq, lk), "2d": (lq, lk)}
        mask = _mask(kind, shape.get(mshape), dtype, gen)
        scale = 0.7 / d**0.5
        ref, tol = attention_reference(q, k, v, mask, scale)
        want = torch.ops.mlxq.decode_attention(q, k, v, mask, scale)
        got = run("decode_attention", q, k, v, mask, scale)
        assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
        what = f"attention {case} {dtype}"
        assert_within(want, ref, tol, what + " (CPU op)")
        assert_within(got, ref, tol, what)
        assert_within(got, want.double(), 2 * tol, what + " vs CPU op")
        if kind == "bool":
            assert (got[:, :, 0] == 0).all()  # no key attended: 0
    # strided views of a cache (the last dimension unit-stride), no keys, empty, default scale
    cache = torch.randn(1, 2, 40, 2, 64, generator=gen).to(dtype)
    q = torch.randn(1, 4, 2, 64, generator=gen).to(dtype)
    k, v = cache[:, :, :33, 0], cache[:, :, :33, 1]
    want = torch.ops.mlxq.decode_attention(q, k, v, None, None)
    ref, tol = attention_reference(q, k, v, None, 64**-0.5)
    assert_within(run("decode_attention", q, k, v, None, None), ref, tol, "strided, default scale")
    assert_within(want, ref, tol, "strided, default scale (CPU op)")
    none = torch.randn(1, 2, 0, 64, generator=gen).to(dtype)
    assert torch.equal(run("decode_attention", q, none, none, None, None), torch.zeros_like(q))
    empty = torch.randn(0, 4, 1, 64).to(dtype)
    assert run("decode_attention", empty, empty[:, :2], empty[:, :2], None, None).shape == (
        0,
        4,
        1,
        64,
    )
