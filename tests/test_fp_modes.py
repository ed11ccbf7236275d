"""MLX's floating-point quantization modes (mxfp4, nvfp4, mxfp8) and the mode-generic ops.

Oracles: mx.quantize / mx.dequantize on the CPU (bit for bit, every dtype, nvfp4 with and
without a global scale), a float64 reference written here from the format (FP4 E2M1 / FP8 E4M3
values decoded from their bit fields, E8M0 / E4M3 scales), and mx.quantized_matmul.
"""

from __future__ import annotations

import mlx.core as mx
import mlxq
import numpy as np
import pytest
import torch
from oracles import (
    DTYPES,
    TORCH_TO_MX,
    assert_product_within,
    assert_within,
    to_mx,
    to_torch,
    words,
)
from oracles import fp_dequantize_ref as dequantize_ref
from torch._subclasses.fake_tensor import FakeTensorMode

MODES = ("mxfp4", "nvfp4", "mxfp8")
GROUP = {"mxfp4": 32, "nvfp4": 16, "mxfp8": 32}
BITS = {"mxfp4": 4, "nvfp4": 4, "mxfp8": 8}
# (mode, global scale) cases: nvfp4 alone takes a global scale
CASES = [("mxfp4", None), ("nvfp4", None), ("nvfp4", 0.37), ("nvfp4", 7.5), ("mxfp8", None)]
CASE_IDS = [m if g is None else f"{m}-gs{g}" for m, g in CASES]
DTYPE_IDS = [str(d).split(".")[-1] for d in DTYPES]


def mx_quantize(w: torch.Tensor, mode: str, global_scale: float | None):
    kw = {} if global_scale is None else {"global_scale": mx.array(global_scale, mx.float32)}
    wq, s = mx.quantize(to_mx(w), mode=mode, **kw)
    return to_torch(wq), torch.from_numpy(np.array(s))


def gs_tensor(global_scale: float | None) -> torch.Tensor | None:
    return None if global_scale is None else torch.tensor(global_scale, dtype=torch.float32)


def make_weight(shape, dtype, gen) -> torch.Tensor:
    """Rows of very different magnitudes, zero groups, and values on FP4/FP8 rounding ties."""
    w = torch.randn(shape, generator=gen) * torch.logspace(-4, 3, shape[-2])[:, None]
    w[..., 0, :32] = 0.0
    w[..., 1, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25] * 2)
    w[..., 2, :8] = torch.tensor([6.0, -6.0, 7.0, 448.0, 464.0, -500.0, 1e-3, -1e-3])
    return w.to(dtype)


# --- quantize / dequantize: bit for bit with MLX -----------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode,global_scale", CASES, ids=CASE_IDS)
def test_quantize_bit_exact(mode, global_scale, dtype, gen):
    for shape in [(64, 256), (3, 8, 96)]:
        w = make_weight(shape, dtype, gen)
        wq, s = mlxq.quantize(w, mode=mode, global_scale=gs_tensor(global_scale))
        ref_q, ref_s = mx_quantize(w, mode, global_scale)
        assert wq.dtype == torch.uint32 and s.dtype == torch.uint8
        assert wq.shape == ref_q.shape and s.shape == ref_s.shape
        np.testing.assert_array_equal(words(wq), words(ref_q), err_msg=f"{mode} wq {shape}")
        torch.testing.assert_close(s, ref_s, rtol=0, atol=0, msg=f"{mode} scales {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode", MODES)
def test_quantize_bit_exact_every_scale(mode, dtype):
    """Every positive finite value of the dtype (all of them for 16-bit types) as a group's
    maximum: each scale byte and each rounding of the maximum itself matches MLX."""
    if dtype == torch.float32:
        vals = torch.cat([torch.logspace(-44, 38, 8000), 6 * 2.0 ** torch.arange(-140, 120.0)])
    else:
        bits = torch.arange(1, 0x7F80 if dtype == torch.bfloat16 else 0x7C00, dtype=torch.int32)
        vals = bits.to(torch.int16).view(dtype).float()
    vals = vals[: vals.numel() // 2 * 2]  # MLX's nvfp4 packs an even number of 16-groups only
    w = torch.zeros(vals.numel(), GROUP[mode])
    w[:, 0], w[:, 1], w[:, 2] = vals, -vals / 3, vals / 7
    w = w.to(dtype)
    wq, s = mlxq.quantize(w, mode=mode)
    ref_q, ref_s = mx_quantize(w, mode, None)
    np.testing.assert_array_equal(words(wq), words(ref_q))
    np.testing.assert_array_equal(s.numpy(), ref_s.numpy())


@pytest.mark.parametrize("out_dtype", [None, *DTYPES], ids=["default", *DTYPE_IDS])
@pytest.mark.parametrize("mode,global_scale", CASES, ids=CASE_IDS)
def test_dequantize_bit_exact(mode, global_scale, out_dtype, gen):
    w = make_weight((32, 128), torch.float32, gen)
    wq, s = mlxq.quantize(w, mode=mode, global_scale=gs_tensor(global_scale))
    # random bytes too: every code and scale, including the ones quantize never writes
    raw_q = torch.randint(0, 2**31, wq.shape, generator=gen, dtype=torch.int64).to(torch.int32)
    raw_s = torch.randint(0, 256, s.shape, generator=gen, dtype=torch.int64).to(torch.uint8)
    for q, sc in [(wq, s), (raw_q.view(torch.uint32), raw_s)]:
        out = mlxq.dequantize(
            q, sc, mode=mode, global_scale=gs_tensor(global_scale), dtype=out_dtype
        )
        kw = {} if out_dtype is None else {"dtype": TORCH_TO_MX[out_dtype]}
        if global_scale is not None:
            kw["global_scale"] = mx.array(global_scale, mx.float32)
        ref = to_torch(mx.dequantize(to_mx(q), mx.array(sc.numpy()), mode=mode, **kw))
        assert out.dtype == ref.dtype  # bfloat16 by default; float32 with a global scale
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    # and the float64 reference agrees with the decoded values (exact in float32)
    if out_dtype == torch.float32 and global_scale is None:
        ref64 = dequantize_ref(wq, s, mode, None)
        assert torch.equal(mlxq.dequantize(wq, s, mode=mode, dtype=torch.float32).double(), ref64)


# --- matmul against float64 and MLX ---------------------------------------------------------


@pytest.mark.parametrize("transpose", [True, False], ids=["xWT", "xW"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode,global_scale", CASES, ids=CASE_IDS)
def test_matmul_matches_float64(mode, global_scale, dtype, transpose, isa, gen):
    # k = 160 is no multiple of 64 (the bf16 FP4 decode's half block: the fp32 kernel runs);
    # 192 ends in half a 128-value bf16 block and 256 does not; n = 42 and 37 leave row tails
    for n, k in ((40, 160), (42, 192), (37, 256)):
        w = torch.randn(n, k, generator=gen)
        wq, s = mlxq.quantize(w, mode=mode, global_scale=gs_tensor(global_scale))
        W = dequantize_ref(wq, s, mode, global_scale)
        W_abs = W.abs()
        for m in (1, 3, 4, 6, 17, 40):  # decode (4-row blocks and remainders) and GEMM paths
            x = torch.randn(m, k if transpose else n, generator=gen).to(dtype)
            y = mlxq.quantized_matmul(
                x, wq, s, transpose=transpose, mode=mode, global_scale=gs_tensor(global_scale)
            )
            assert y.dtype == dtype and y.shape == (m, n if transpose else k)
            Wt = W.T if transpose else W
            ref = x.double() @ Wt
            ref_abs = x.double().abs() @ (W_abs.T if transpose else W_abs)
            # fp32 products of exact values, a k-term fp32 sum, one rounding of the group scale
            # with a global scale, then the output rounding
            u32 = torch.finfo(torch.float32).eps / 2
            tol = (Wt.shape[0] + 3) * u32 * ref_abs
            if dtype != torch.float32:
                tol = tol + torch.finfo(dtype).eps / 2 * (ref.abs() + tol) + torch.finfo(dtype).tiny
            assert_within(y, ref, tol + 1e-30, f"{mode} {n}x{k} M={m} {isa}")


@pytest.mark.parametrize("mode", MODES)
def test_decode_every_code(mode, isa, gen):
    """Each row of W one code repeated (every FP4 / FP8 code: signs, subnormals, E4M3's NaN),
    through the decode kernels against the float64 reference; NaN where the code is NaN."""
    n_codes, k = (16, 128) if BITS[mode] == 4 else (256, 64)
    codes = torch.arange(n_codes, dtype=torch.int64)
    if BITS[mode] == 4:
        row_bytes = (codes | codes << 4).to(torch.uint8)
    else:
        row_bytes = codes.to(torch.uint8)
    wq = row_bytes[:, None].repeat(1, k * BITS[mode] // 8).contiguous().view(torch.uint32)
    # valid scales: E8M0 near 2^0, nvfp4's E4M3 positive and not NaN
    lo, hi = (120, 135) if mode != "nvfp4" else (0x30, 0x40)
    s = torch.randint(lo, hi, (n_codes, k // GROUP[mode]), generator=gen, dtype=torch.uint8)
    W = dequantize_ref(wq, s, mode, None)
    for m in (1, 2, 5):
        x = torch.randn(m, k, generator=gen)
        y = mlxq.quantized_matmul(x, wq, s, mode=mode)
        ref = x.double() @ W.T
        nan = ref.isnan()
        assert torch.equal(y.isnan(), nan), f"{mode} M={m} {isa}: NaN positions"
        tol = (k + 3) * torch.finfo(torch.float32).eps / 2 * (x.double().abs() @ W.abs().T)
        assert_within(y[~nan], ref[~nan], tol[~nan] + 1e-30, f"{mode} M={m} {isa}")


@pytest.mark.parametrize(
    "mode,global_scale", CASES[:3] + CASES[4:], ids=CASE_IDS[:3] + CASE_IDS[4:]
)
def test_decode_every_scale_byte(mode, global_scale, isa, gen):
    """Each row of W one scale byte (every E4M3 byte for nvfp4, its NaN and negative and
    subnormal ones included; every E8M0 byte whose products stay finite in fp32, 0's 2^-127
    included) through the decode kernels, fp32 and bf16 x, against the float64 reference: the
    kernels decode a tile's scale bytes apart from the weights' codes."""
    k = 128
    n_rows = 256 if mode == "nvfp4" else 246  # E8M0 above 2^118 overflows fp32 products here
    s = torch.arange(n_rows, dtype=torch.int64).to(torch.uint8)[:, None].repeat(1, k // GROUP[mode])
    if BITS[mode] == 4:  # random codes, NaN-free (FP4 has none)
        wq = torch.randint(0, 256, (n_rows, k // 2), generator=gen, dtype=torch.int64)
    else:  # FP8 codes without E4M3's NaN (0x7F, 0xFF)
        wq = torch.randint(0, 0x7F, (n_rows, k), generator=gen, dtype=torch.int64)
        wq |= torch.randint(0, 2, (n_rows, k), generator=gen, dtype=torch.int64) << 7
    wq = wq.to(torch.uint8).contiguous().view(torch.uint32)
    W = dequantize_ref(wq, s, mode, global_scale)
    for dtype in (torch.float32, torch.bfloat16):
        for m in (1, 2):
            x = (torch.randn(m, k, generator=gen) / 16).to(dtype)
            y = mlxq.quantized_matmul(x, wq, s, mode=mode, global_scale=gs_tensor(global_scale))
            ref = x.double() @ W.T
            nan = ref.isnan()
            assert torch.equal(y.isnan(), nan), f"{mode} {dtype} M={m} {isa}: NaN positions"
            scale_abs = x.double().abs() @ W.abs().nan_to_num().T
            tol = (k + 3) * torch.finfo(torch.float32).eps / 2 * scale_abs
            if dtype != torch.float32:  # the output's rounding
                tol = tol + torch.finfo(dtype).eps / 2 * (ref.abs().nan_to_num() + tol)
            tol = tol + torch.finfo(torch.float32).tiny
            assert_within(y.double()[~nan], ref[~nan], tol[~nan], f"{mode} {dtype} M={m} {isa}")


@pytest.mark.parametrize("mode", MODES)
def test_matmul_matches_mlx(mode, gen):
    w = torch.randn(64, 128, generator=gen)
    wq, s = mlxq.quantize(w, mode=mode)
    for m in (1, 5, 33):
        x = torch.randn(2, m, 128, generator=gen)
        y = mlxq.quantized_matmul(x, wq, s, mode=mode)
        theirs = mx.quantized_matmul(to_mx(x), to_mx(wq), mx.array(s.numpy()), mode=mode)
        # both fp32, summed in different orders: each within the derived bound of the float64
        # product (MLX, the oracle, must meet it too)
        W = dequantize_ref(wq, s, mode, None)
        assert_product_within(y, x, W.T, f"{mode} M={m}")
        assert_product_within(to_torch(theirs), x, W.T, f"{mode} M={m} mx.quantized_matmul")


@pytest.mark.parametrize("transpose", [True, False], ids=["xWT", "xW"])
def test_matmul_batched_weight_broadcasts(transpose, gen):
    mode = "mxfp4"
    wq, s = mlxq.quantize(torch.randn(3, 1, 24, 64, generator=gen), mode=mode)
    W = dequantize_ref(wq, s, mode, None)
    x = torch.randn(2, 5, 64 if transpose else 24, generator=gen)
    y = mlxq.quantized_matmul(x, wq, s, transpose=transpose, mode=mode)
    ref = torch.matmul(x.double(), W.transpose(-1, -2) if transpose else W)
    assert y.shape == ref.shape == (3, 2, 5, 24 if transpose else 64)
    assert_product_within(y, x, W.transpose(-1, -2) if transpose else W, "batched weight")


def test_grad_x_matches_float64(gen):
    for mode, global_scale in CASES:
        g_t = gs_tensor(global_scale)
        wq, s = mlxq.quantize(torch.randn(24, 64, generator=gen), mode=mode, global_scale=g_t)
        W = dequantize_ref(wq, s, mode, global_scale)
        for transpose in (True, False):
            x = torch.randn(5, 64 if transpose else 24, generator=gen, requires_grad=True)
            y = mlxq.quantized_matmul(x, wq, s, transpose=transpose, mode=mode, global_scale=g_t)
            g = torch.randn(y.shape, generator=gen)
            y.backward(g)
            what = f"{mode} global_scale={global_scale} transpose={transpose} d/dx"
            assert_product_within(x.grad, g, W if transpose else W.T, what)


def test_fake_kernels_give_shapes_and_dtypes():
    with FakeTensorMode():
        w = torch.empty(8, 64, dtype=torch.bfloat16)
        wq, s = torch.ops.mlxq.fp_quantize(w, "nvfp4", 16, 4)
        assert wq.shape == (8, 8) and wq.dtype == torch.uint32
        assert s.shape == (8, 4) and s.dtype == torch.uint8
        d = torch.ops.mlxq.fp_dequantize(wq, s, "nvfp4", 16, 4)
        assert d.shape == (8, 64) and d.dtype == torch.bfloat16
        g = torch.empty((), dtype=torch.float32)
        assert torch.ops.mlxq.fp_dequantize(wq, s, "nvfp4", 16, 4, g).dtype == torch.float32
        x = torch.empty(3, 64, dtype=torch.float16)
        y = torch.ops.mlxq.fp_matmul(x, wq, s, "nvfp4", 16, 4)
        assert y.shape == (3, 8) and y.dtype == torch.float16


def test_compile_fullgraph(gen):
    wq, s = mlxq.quantize(torch.randn(16, 64, generator=gen), mode="mxfp8")
    f = torch.compile(
        lambda x: mlxq.quantized_matmul(x, wq, s, mode="mxfp8"), fullgraph=True, backend="eager"
    )
    x = torch.randn(2, 64, generator=gen)
    torch.testing.assert_close(f(x), mlxq.quantized_matmul(x, wq, s, mode="mxfp8"))


# --- argument checks: the argument, the expected and the actual value --------------------------

W4 = torch.zeros(4, 8, dtype=torch.uint32)  # 4 rows of K=64 at 4 bits
S32 = torch.zeros(4, 2, dtype=torch.uint8)


@pytest.mark.parametrize(
    "call,exc,fragments",
    [
        (
            lambda: mlxq.quantize(torch.zeros(2, 64), 64, mode="mxfp4"),
            ValueError,
            ["group_size", "32", "'mxfp4'", "got 64"],
        ),
        (
            lambda: mlxq.quantize(torch.zeros(2, 64), bits=8, mode="nvfp4"),
            ValueError,
            ["bits", "4", "'nvfp4'", "got 8"],
        ),
        (
            lambda: mlxq.quantize(torch.zeros(2, 64), mode="fp4"),
            ValueError,
            ["mode", "'mxfp4'", "'fp4'"],
        ),
        (  # before: the op schema's RuntimeError
            lambda: mlxq.quantize(torch.zeros(2, 64), mode="nvfp4", global_scale=2.0),
            TypeError,
            ["global_scale", "tensor", "got float 2.0"],
        ),
        (
            lambda: mlxq.quantize(torch.zeros(2, 48), mode="mxfp4"),
            ValueError,
            ["last dimension 48", "group_size 32"],
        ),
        (
            lambda: mlxq.quantize(torch.zeros(2, 64), mode="mxfp4", global_scale=torch.tensor(1.0)),
            ValueError,
            ["global_scale", "'nvfp4'", "'mxfp4'"],
        ),
        (
            lambda: mlxq.quantize(
                torch.zeros(2, 64), mode="nvfp4", global_scale=torch.tensor([1.0, 2.0])
            ),
            ValueError,
            ["global_scale", "one value", "[2]"],
        ),
        (
            lambda: mlxq.quantize(
                torch.zeros(2, 64),
                mode="nvfp4",
                global_scale=torch.tensor(1.0, dtype=torch.float64),
            ),
            TypeError,
            ["global_scale", "float32", "Double"],
        ),
        (
            lambda: mlxq.dequantize(W4, S32, torch.zeros(4, 2), mode="mxfp4"),
            ValueError,
            ["biases", "None", "'mxfp4'"],
        ),
        (
            lambda: mlxq.dequantize(W4, S32.float(), mode="mxfp4"),
            TypeError,
            ["scales", "uint8", "Float"],
        ),
        (
            lambda: mlxq.dequantize(W4, S32[:, :1], mode="mxfp4"),
            ValueError,
            ["wq last dimension 8", "expected 4"],
        ),
        (
            lambda: mlxq.dequantize(W4, S32, mode="mxfp4", dtype=torch.int32),
            TypeError,
            ["dtype", "Int"],
        ),
        (
            lambda: mlxq.quantized_matmul(torch.zeros(1, 32), W4, S32, mode="mxfp4"),
            ValueError,
            ["x last dimension 32", "64"],
        ),
        (
            lambda: mlxq.quantized_matmul(torch.zeros(1, 64), W4, S32, mode="affine"),
            ValueError,
            ["biases", "'affine'", "None"],
        ),
    ],
)
def test_errors_name_argument_expected_actual(call, exc, fragments):
    with pytest.raises(exc) as info:
        call()
    for f in fragments:
        assert f in str(info.value), f"{f!r} not in {info.value}"


def test_mode_generic_affine_equals_affine_ops(gen):
    w = torch.randn(8, 128, generator=gen)
    for bits in (1, 4):
        wq, s, b = mlxq.quantize(w, 64, bits)
        ref = mlxq.affine_quantize(w, 64, bits)
        assert all(torch.equal(a, r) for a, r in zip((wq, s, b), ref, strict=True))
        assert torch.equal(
            mlxq.dequantize(wq, s, b, 64, bits), mlxq.affine_dequantize(*ref, 64, bits)
        )
        x = torch.randn(3, 128, generator=gen)
        assert torch.equal(
            mlxq.quantized_matmul(x, wq, s, b, True, 64, bits),
            mlxq.affine_matmul(x, *ref, 64, bits),
        )
    assert mlxq.quantize(w)[0].shape == (8, 16)  # MLX's defaults: affine, group 64, 4 bits
