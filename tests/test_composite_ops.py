"""The composite ops (csrc/composite/: compositions of ATen ops that serve as the CUDA kernels of
the float modes and the gather ops) run here on CPU tensors against the CPU ops.

quantize and dequantize must equal the CPU op bit for bit (every mode, dtype, nvfp4 with and
without a global scale, every code and scale byte); the matmuls are held to a float64 product of
the exact weight within the error of fp32 sums in another order (and, above the decode width
with fp16/bf16 x, one rounding of the weight to the dtype of x), and to the CPU op within twice
that. The gathers group pairs by expert and call the CPU's dense op for each expert: they are
held to the CPU gather op with repeated, unsorted and broadcast indices, both transposes, and
to the same argument errors. The layer ops' composites (rms_norm, rotary_embedding,
decode_attention: their CUDA kernels, decode_attention's only past its kernel's head dims) are
held to the CPU ops by layer_op_cases.py's checks.
"""

from __future__ import annotations

import re

import layer_op_cases
import mlxq
import pytest
import torch
from conftest import random_weight
from mlxq._native import _C as C
from oracles import DTYPES, FP_BITS, FP_GROUP, assert_within, eps, matmul_tolerance, weight_refs
from oracles import fp_dequantize_ref as dequantize_ref

MODES = ("mxfp4", "nvfp4", "mxfp8")
CASES = [("mxfp4", None), ("nvfp4", None), ("nvfp4", 0.37), ("nvfp4", 7.5), ("mxfp8", None)]
CASE_IDS = [m if g is None else f"{m}-gs{g}" for m, g in CASES]
DTYPE_IDS = [str(d).split(".")[-1] for d in DTYPES]
EXACT_ROWS = 8  # csrc/composite/composite.h kExactRows: above, fp16/bf16 x rounds W to its dtype


def gs_tensor(global_scale: float | None) -> torch.Tensor | None:
    return None if global_scale is None else torch.tensor(global_scale, dtype=torch.float32)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal dtypes, shapes and bit patterns (so -0.0 is not 0.0), NaN where the other has NaN."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), f"{what}: NaN positions differ"
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[want.element_size()]
    g, w = got.view(ints)[~nan], want.view(ints)[~nan]
    if not torch.equal(g, w):
        i = int((g != w).nonzero()[0])
        raise AssertionError(f"{what}: {int((g != w).sum())} differ, e.g. {g[i]} vs {w[i]}")


def make_weight(shape, dtype, gen) -> torch.Tensor:
    """Rows of very different magnitudes, zero groups, values on FP4/FP8 rounding ties, values
    past FP8's range, tiny values and NaN/inf."""
    w = torch.randn(shape, generator=gen) * torch.logspace(-6, 4, shape[-2])[:, None]
    w[..., 0, :32] = 0.0
    w[..., 1, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25] * 2)
    w[..., 2, :8] = torch.tensor([6.0, -6.0, 7.0, 448.0, 464.0, -500.0, 1e-3, -1e-3])
    w[..., 3, :16] = torch.tensor([-1e-30, 3e-39, -2.5e-38, 1e-40] * 4)
    w[..., 4, 3] = float("nan")
    w[..., 5, 40] = -0.0
    return w.to(dtype)


# --- quantize / dequantize: bit for bit the CPU op ---------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode,global_scale", CASES, ids=CASE_IDS)
def test_quantize_bit_exact(mode, global_scale, dtype, gen):
    for shape in [(64, 256), (3, 8, 96), (1, 32)]:
        w = make_weight(shape, dtype, gen) if shape[-2] > 5 else torch.randn(shape).to(dtype)
        g = gs_tensor(global_scale)
        want = mlxq.quantize(w, mode=mode, global_scale=g)
        got = C.composite_fp_quantize(w, mode, FP_GROUP[mode], FP_BITS[mode], g)
        for a, b, what in zip(got, want, ("wq", "scales"), strict=True):
            assert_same_bits(a, b, f"{mode} {what} {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode", MODES)
def test_quantize_every_scale(mode, dtype):
    """Every positive finite value of the 16-bit dtypes (a float32 sweep across its range, its
    subnormals included) as a group's maximum: every scale byte and each element's rounding."""
    if dtype == torch.float32:
        vals = torch.cat([torch.logspace(-44, 38, 8000), 6 * 2.0 ** torch.arange(-140, 120.0)])
    else:
        bits = torch.arange(1, 0x7F80 if dtype == torch.bfloat16 else 0x7C00, dtype=torch.int32)
        vals = bits.to(torch.int16).view(dtype).float()
    group = FP_GROUP[mode]
    w = torch.zeros(vals.numel(), group)
    w[:, 0], w[:, 1], w[:, 2], w[:, 3] = vals, -vals / 3, vals / 7, vals * 0.2917
    w = w.to(dtype)
    want = mlxq.quantize(w, mode=mode)
    got = C.composite_fp_quantize(w, mode, group, FP_BITS[mode])
    assert_same_bits(got[0], want[0], "wq")
    assert_same_bits(got[1], want[1], "scales")


@pytest.mark.parametrize("mode,global_scale", CASES, ids=CASE_IDS)
def test_dequantize_every_code_and_scale(mode, global_scale, gen):
    """Random packed words (every FP4/FP8 code, NaN codes included) with every scale byte, in
    each output dtype: the CPU op's bits, NaN where it has NaN."""
    group, bits = FP_GROUP[mode], FP_BITS[mode]
    rows, groups = 256, 4
    wq = torch.randint(-(2**31), 2**31, (rows, groups * group * bits // 32), generator=gen)
    wq = wq.to(torch.int32).view(torch.uint32)
    scales = torch.arange(rows * groups).remainder(256).to(torch.uint8).reshape(rows, groups)
    g = gs_tensor(global_scale)
    for dtype in (None, *DTYPES):
        want = mlxq.dequantize(wq, scales, mode=mode, global_scale=g, dtype=dtype)
        got = C.composite_fp_dequantize(wq, scales, mode, group, bits, g, dtype)
        assert_same_bits(got, want, f"{mode} {dtype}")
        # int32 words and leading dimensions
        got3 = C.composite_fp_dequantize(
            wq.view(torch.int32).reshape(2, rows // 2, -1),
            scales.reshape(2, rows // 2, -1),
            mode,
            group,
            bits,
            g,
            dtype,
        )
        assert_same_bits(got3.reshape(got.shape), want, f"{mode} {dtype} 3-D")


# --- matmul: float64 of the exact weight, and the CPU op ---------------------------------------


def _check_fp_matmul(x, wq, s, mode, global_scale, transpose=True):
    group, bits = FP_GROUP[mode], FP_BITS[mode]
    got = C.composite_fp_matmul(x, wq, s, mode, group, bits, transpose, global_scale)
    cpu = mlxq.quantized_matmul(
        x, wq, s, None, transpose, group, bits, mode, global_scale=global_scale
    )
    assert got.dtype == x.dtype and got.shape == cpu.shape
    gv = None if global_scale is None else float(global_scale)
    w = dequantize_ref(wq, s, mode, gv)
    w = w.transpose(-1, -2) if transpose else w
    ref = x.double() @ w
    bound = x.double().abs() @ w.abs()
    k = x.shape[-1]
    m = x.shape[-2] if x.dim() >= 2 and wq.dim() > 2 else x.numel() // max(k, 1)
    rounded_w = x.dtype != torch.float32 and m > EXACT_ROWS
    # exact fp32 weights (one rounding of the group scale by the global factor), a k-term fp32
    # sum, the output rounding; above the decode width one rounding of W to the dtype of x
    tol = (k + 4) * eps(torch.float32) * bound + eps(x.dtype) * ref.abs() + 1e-30
    if rounded_w:
        tol = tol + eps(x.dtype) * bound
    assert_within(got, ref, tol, f"composite {mode} m={m}")
    assert_within(got, cpu.double(), 2 * tol, f"composite vs CPU op {mode} m={m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode,global_scale", CASES, ids=CASE_IDS)
def test_matmul(mode, global_scale, dtype, gen):
    n, k = 48, 256
    w = random_weight((n, k), dtype, gen)
    g = gs_tensor(global_scale)
    wq, s = mlxq.quantize(w, mode=mode, global_scale=g)
    for m in (1, 3, 8, 9, 40):  # decode widths (fp32 weight), then W in the dtype of x
        _check_fp_matmul(torch.randn(m, k, generator=gen).to(dtype), wq, s, mode, g)
    for m in (1, 20):  # x @ W
        _check_fp_matmul(torch.randn(m, n, generator=gen).to(dtype), wq, s, mode, g, False)
    _check_fp_matmul(torch.randn(k, generator=gen).to(dtype), wq, s, mode, g)  # 1-D x
    _check_fp_matmul(torch.randn(2, 3, 5, k, generator=gen).to(dtype), wq, s, mode, g)


@pytest.mark.parametrize("mode", MODES)
def test_matmul_batched_weights_and_tiles(mode, gen):
    group, bits = FP_GROUP[mode], FP_BITS[mode]
    w = random_weight((2, 40, 128), torch.bfloat16, gen)
    wq, s = mlxq.quantize(w, mode=mode)
    for m in (1, 12):  # [3, 1] x batch against [2] weights -> [3, 2]
        x = torch.randn(3, 1, m, 128, generator=gen).bfloat16()
        _check_fp_matmul(x, wq, s, mode, None)
        _check_fp_matmul(x[..., :40].contiguous(), wq, s, mode, None, transpose=False)
    # a weight decoded in row tiles (2**24 values a tile): K = 2**18 leaves 64 rows a tile
    k = 2**18
    wq, s = mlxq.quantize(torch.randn(70, k, generator=gen), mode=mode)
    x = torch.randn(2, k, generator=gen)
    got = C.composite_fp_matmul(x, wq, s, mode, group, bits, True, None)
    want = mlxq.quantized_matmul(x, wq, s, None, True, group, bits, mode)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3 * float(want.abs().max()))


def test_matmul_empty_and_errors(gen):
    wq, s = mlxq.quantize(torch.randn(8, 64, generator=gen), mode="mxfp4")
    assert C.composite_fp_matmul(torch.randn(0, 64), wq, s, "mxfp4", 32, 4).shape == (0, 8)
    cases = [
        (torch.randn(2, 64), wq, s, "mxfp4", 16, 4, True, None),  # group size of the mode
        (torch.randn(2, 64), wq, s, "nvfp4", 16, 4, True, None),  # wq does not fit the mode
        (torch.randn(2, 32), wq, s, "mxfp4", 32, 4, True, None),  # x width
        (torch.randn(2, 64), wq, s.float(), "mxfp4", 32, 4, True, None),  # scales dtype
        (torch.randn(2, 64), wq, s, "mxfp4", 32, 4, True, torch.tensor(1.0)),  # global scale
        (torch.randn(2, 64), wq, s, "affine", 32, 4, True, None),
    ]
    for args in cases:
        with pytest.raises((ValueError, TypeError)) as want:
            torch.ops.mlxq.fp_matmul(*args)
        with pytest.raises(want.type, match="^" + re.escape(str(want.value).split("\n")[0][:60])):
            C.composite_fp_matmul(*args)


# --- gathers: grouped by expert, each expert through the device's dense op ---------------------

# (lhs, rhs, x batch): repeated and unsorted experts, broadcast index shapes, absent indices
GATHER_CASES = [
    (
        "decode",
        lambda: torch.tensor([[0], [1], [2]]),
        lambda: torch.tensor([[3, 1], [1, 0], [3, 3]]),
    ),
    ("unsorted", None, lambda: torch.tensor([2, 0, 3, 0, 2, 2])),
    ("broadcast", lambda: torch.tensor([[0], [2]]), lambda: torch.tensor([[1, 3, 1]])),
    ("arange", None, None),
]


def _gather_operands(case, x_batch_shape, e, m, k, dtype, gen):
    name, lhs, rhs = case
    lhs = None if lhs is None else lhs()
    rhs = None if rhs is None else rhs()
    if name == "unsorted":
        x_batch_shape = (6,)
    if name == "arange":
        x_batch_shape = (e,)
    x = torch.randn(*x_batch_shape, m, k, generator=gen).to(dtype)
    return x, lhs, rhs


def _per_pair(x, lhs, rhs, weights, w_batch, shape, dense):
    """dense(x matrix lhs[p], the matrices of `weights` at rhs[p]) for each pair p, stacked."""
    lhs = torch.arange(x.shape[:-2].numel()).reshape(x.shape[:-2]) if lhs is None else lhs
    rhs = torch.arange(w_batch.numel()).reshape(w_batch) if rhs is None else rhs
    lhs, rhs = (t.reshape(-1) for t in torch.broadcast_tensors(lhs.long(), rhs.long()))
    x3 = x.reshape(-1, *x.shape[-2:])
    flat = [w.reshape(w_batch.numel(), *w.shape[len(w_batch) :]) for w in weights]
    out = [
        dense(x3[i], [w[e] for w in flat]) for i, e in zip(lhs.tolist(), rhs.tolist(), strict=True)
    ]
    return torch.stack(out).reshape(shape) if out else torch.zeros(shape, dtype=x.dtype)


def _assert_same_sums(got, want, x, w_abs, lhs, rhs, transpose, what):
    """got and want take the same dense path per expert (fp32 weights, or W rounded to the
    dtype of x, whose magnitudes are within (1 + u)^2 of w_abs) and sum in fp32 in another
    order: each is within (k + 4) u32 sum |x| |w| of the float64 product with that path's
    weight (the 4: a term's own roundings, such as nvfp4's group scale by the global factor)
    and is rounded once to x's dtype, so they differ by at most twice oracles.matmul_tolerance
    (whose rounding term takes |want| before its rounding: at most (1 + 2u)|want|). At a
    binade's edge one rounding flip comes close to that bound: it is the exact worst case."""
    lhs = torch.arange(x.shape[:-2].numel()).reshape(x.shape[:-2]) if lhs is None else lhs
    rhs = torch.arange(w_abs.shape[:-2].numel()).reshape(w_abs.shape[:-2]) if rhs is None else rhs
    lhs, rhs = torch.broadcast_tensors(lhs.long(), rhs.long())
    xm = x.double().abs().reshape(-1, *x.shape[-2:])[lhs.reshape(-1)]
    w = w_abs.double().reshape(-1, *w_abs.shape[-2:])[rhs.reshape(-1)]
    ref_abs = (xm @ (w.transpose(-1, -2) if transpose else w)).reshape(want.shape)
    ref_abs = ref_abs * (1 + eps(x.dtype)) ** 2
    unrounded = want.double() * (1 + 2 * eps(x.dtype))
    tol = 2 * matmul_tolerance(ref_abs, unrounded, x.shape[-1], x.dtype)
    assert_within(got, want.double(), tol, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bits,group_size", [(4, 64), (3, 32), (8, 128), (1, 32), (6, 64)])
def test_affine_gather(bits, group_size, dtype, gen):
    e, n, k = 4, 40, 256
    wq, s, b = mlxq.affine_quantize(random_weight((e, n, k), dtype, gen), group_size, bits)
    w_abs = weight_refs(wq, s, b, group_size, bits)[1]  # |s| q + |b|
    for case in GATHER_CASES:
        for m, transpose in ((1, True), (5, True), (20, True), (3, False)):
            width = k if transpose else n
            x, lhs, rhs = _gather_operands(case, (3,), e, m, width, dtype, gen)
            args = (x, wq, s, b, lhs, rhs, group_size, bits, transpose, False)
            want = torch.ops.mlxq.affine_gather_matmul(*args)
            got = C.composite_affine_gather_matmul(*args)
            assert got.dtype == want.dtype and got.shape == want.shape
            # the same dense kernels on the same stacked rows: equal up to fp32 sum order
            what = f"affine gather {case[0]} m={m} transpose={transpose}"
            _assert_same_sums(got, want, x, w_abs, lhs, rhs, transpose, what)
            # capturable (the CUDA ops pass it while capturing a graph): the dense op pair by pair
            pairs = C.composite_affine_gather_matmul(*args, capturable=True)
            dense = _per_pair(
                x,
                lhs,
                rhs,
                (wq, s, b),
                wq.shape[:-2],
                want.shape,
                lambda x, w, t=transpose: torch.ops.mlxq.affine_matmul(x, *w, group_size, bits, t),
            )
            assert torch.equal(pairs, dense), what + " capturable"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode,with_global", [("mxfp4", False), ("nvfp4", True), ("mxfp8", False)])
def test_fp_gather(mode, with_global, dtype, gen):
    e, n, k = 4, 40, 256
    group, bits = FP_GROUP[mode], FP_BITS[mode]
    w = random_weight((e, n, k), dtype, gen)
    gs = (torch.rand(e, generator=gen) * 4 + 0.25).float() if with_global else None
    if gs is None:
        wq, s = mlxq.quantize(w, mode=mode)
    else:
        parts = [mlxq.quantize(w[i], mode=mode, global_scale=gs[i]) for i in range(e)]
        wq, s = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    w_abs = dequantize_ref(wq, s, mode, None if gs is None else gs.numpy()).abs()
    for case in GATHER_CASES:
        for m, transpose in ((1, True), (20, True), (3, False)):
            width = k if transpose else n
            x, lhs, rhs = _gather_operands(case, (3,), e, m, width, dtype, gen)
            args = (x, wq, s, mode, group, bits, lhs, rhs, transpose, gs, True)
            want = torch.ops.mlxq.fp_gather_matmul(*args)
            got = C.composite_fp_gather_matmul(*args)
            assert got.dtype == want.dtype and got.shape == want.shape
            what = f"{mode} gather {case[0]} m={m} transpose={transpose}"
            _assert_same_sums(got, want, x, w_abs, lhs, rhs, transpose, what)
            pairs = C.composite_fp_gather_matmul(*args, capturable=True)
            ops = (wq, s) if gs is None else (wq, s, gs.view(-1, 1))
            dense = _per_pair(
                x,
                lhs,
                rhs,
                ops,
                wq.shape[:-2],
                want.shape,
                lambda x, w, t=transpose: torch.ops.mlxq.fp_matmul(
                    x, w[0], w[1], mode, group, bits, t, *w[2:]
                ),
            )
            assert torch.equal(pairs, dense), what + " capturable"


def test_gather_errors_and_empty(gen):
    wq, s, b = mlxq.affine_quantize(torch.randn(3, 8, 64, generator=gen), 32, 4)
    x = torch.randn(2, 1, 64, generator=gen)
    bad = [
        (x, wq, s, b, None, torch.tensor([0, 3]), 32, 4, True, False),  # expert out of range
        (x, wq, s, b, torch.tensor([-1]), torch.tensor([0]), 32, 4, True, False),
        (x, wq, s, b, None, torch.tensor([0.5, 1.0]), 32, 4, True, False),  # float indices
        (x, wq, s, b, None, torch.tensor([0, 1, 2]), 32, 4, True, False),  # shapes
    ]
    for args in bad:
        with pytest.raises((ValueError, TypeError, IndexError)) as want:
            torch.ops.mlxq.affine_gather_matmul(*args)
        with pytest.raises(want.type, match="^" + re.escape(str(want.value).split("\n")[0][:60])):
            C.composite_affine_gather_matmul(*args)
    # capturable: the range checked on the device (at::_assert_async, which on a CPU tensor
    # raises at once), naming the tensor
    for args, name in ((bad[0], "rhs_indices"), (bad[1], "lhs_indices")):
        with pytest.raises(RuntimeError, match=f"mlxq: {name} values must lie in"):
            C.composite_affine_gather_matmul(*args, capturable=True)
    none = torch.zeros(0, dtype=torch.long)
    empty = C.composite_affine_gather_matmul(x, wq, s, b, none, none, 32, 4, True, False)
    assert empty.shape == (0, 1, 8)
    fq, fs = mlxq.quantize(torch.randn(3, 8, 64, generator=gen), mode="mxfp8")
    with pytest.raises(ValueError, match="global_scale is only used by mode 'nvfp4'"):
        C.composite_fp_gather_matmul(x[:1], fq, fs, "mxfp8", 32, 8, None, None, True, torch.ones(3))


# --- 1-bit affine (the CUDA backend's 1-bit path) ----------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_one_bit_affine(group_size, dtype, gen):
    w = random_weight((3, 40, 256), dtype, gen)
    w[0, 0, :group_size] = 0.5  # a constant group: the 1e-7 floor of the scale
    want = mlxq.affine_quantize(w, group_size, 1)
    got = C.composite_affine_quantize_1bit(w, group_size, 1)
    for a, b, what in zip(got, want, ("wq", "scales", "biases"), strict=True):
        assert_same_bits(a, b, what)
    wq, s, b = want
    deq = C.composite_affine_dequantize_1bit(wq, s, b, group_size, 1)
    assert_same_bits(deq, mlxq.affine_dequantize(wq, s, b, group_size, 1), "dequantize")
    wd = mlxq.affine_dequantize(wq, s.float(), b.float(), group_size, 1).double()
    for x, transpose in [
        (torch.randn(5, 256, generator=gen), True),  # [5] x 2-D slices below
        (torch.randn(12, 256, generator=gen), True),
        (torch.randn(2, 3, 9, 256, generator=gen), True),  # batch broadcast against [3]
        (torch.randn(3, 1, 4, 40, generator=gen), False),
    ]:
        x = x.to(dtype)
        operands = (wq, s, b) if x.dim() > 2 else (wq[1], s[1], b[1])
        weight = wd if x.dim() > 2 else wd[1]
        got = C.composite_affine_matmul_1bit(x, *operands, group_size, 1, transpose)
        cpu = mlxq.affine_matmul(x, *operands, group_size, 1, transpose)
        assert got.dtype == x.dtype and got.shape == cpu.shape
        wt = weight.transpose(-1, -2) if transpose else weight
        ref, bound = x.double() @ wt, x.double().abs() @ wt.abs()
        m = x.shape[-2] if x.dim() > 2 else x.shape[0]
        tol = (x.shape[-1] + 4) * eps(torch.float32) * bound + eps(dtype) * ref.abs() + 1e-30
        if dtype != torch.float32 and m > EXACT_ROWS:  # W rounded to the dtype of x
            tol = tol + eps(dtype) * bound
        assert_within(got, ref, tol, f"1-bit m={m}")
        assert_within(got, cpu.double(), 2 * tol, f"1-bit vs CPU op m={m}")
    with pytest.raises(ValueError, match="bits=1 only"):
        C.composite_affine_dequantize_1bit(*mlxq.affine_quantize(w, 32, 2), 32, 2)


# --- the layer ops (the CUDA kernels of rms_norm, rotary_embedding, decode_attention) ----------


def _run_composite(name, *args):
    return getattr(C, f"composite_{name}")(*args)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rms_norm(dtype, gen):
    layer_op_cases.check_rms_norm(_run_composite, dtype, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rotary_embedding_bit_exact(dtype, gen):
    layer_op_cases.check_rotary_embedding(_run_composite, dtype, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_attention(dtype, gen):
    layer_op_cases.check_decode_attention(_run_composite, dtype, gen)


def test_layer_ops_refuse_what_the_cpu_op_refuses(gen):
    x, q, k = torch.randn(2, 8), torch.randn(1, 4, 1, 16), torch.randn(1, 3, 5, 16)
    bad = [
        ("rms_norm", (x, torch.ones(7), 1e-6)),
        ("rms_norm", (x, torch.ones(8), -1.0)),
        ("rotary_embedding", (q, k[:, :2, :1], torch.ones(1, 1, 15), torch.ones(1, 1, 15))),
        ("decode_attention", (q, k, k, None, None)),  # 3 kv heads do not divide 4
        ("decode_attention", (q, k[:, :2], k[:, :2].half(), None, None)),
        ("decode_attention", (q, k[:, :2], k[:, :2], torch.ones(3, 5, dtype=torch.bool), None)),
    ]
    for name, args in bad:
        with pytest.raises((ValueError, TypeError, IndexError, RuntimeError)) as want:
            getattr(torch.ops.mlxq, name)(*args)
        with pytest.raises(want.type, match="^" + re.escape(str(want.value).split("\n")[0][:60])):
            _run_composite(name, *args)
