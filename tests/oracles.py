"""Test oracles for the mlxq ops: conversions between torch and MLX, and float64 references.

The references are written from the MLX format description (README), independently of the
kernels: the packed words are unpacked bit by bit with numpy, and every product and sum is
taken in float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch

try:
    import mlx.core as mx
except ImportError:  # no MLX (the lent GPU machines): the float64 references still work, the
    mx = None  # helpers that call MLX fail where they are called

BITS = (2, 3, 4, 5, 6, 8)  # every kernel set, Metal included
CPU_BITS = (1, *BITS)  # 1-bit affine: CPU kernels only so far
GROUP_SIZES = (32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

TORCH_TO_MX = (
    {}
    if mx is None
    else {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}
)


# --- torch <-> MLX ----------------------------------------------------------------------------


def to_mx(t: torch.Tensor) -> mx.array:
    """An MLX array with the same values and dtype (uint32/int32 packed words keep their bits)."""
    t = t.detach().cpu()
    if t.dtype in (torch.uint32, torch.int32):
        return mx.array(t.contiguous().view(torch.int32).numpy().view(np.uint32))
    # bf16 has no numpy dtype: go through fp32, which holds every bf16/fp16 value exactly.
    return mx.array(t.float().numpy()).astype(TORCH_TO_MX[t.dtype])


def to_torch(a: mx.array) -> torch.Tensor:
    """A torch tensor with the same values and dtype as the MLX array `a`."""
    if a.dtype == mx.uint32:
        return torch.from_numpy(np.array(a).view(np.int32)).view(torch.uint32)
    dtype = {v: k for k, v in TORCH_TO_MX.items()}[a.dtype]
    return torch.from_numpy(np.array(a.astype(mx.float32))).to(dtype)


def mx_gather_qmm(
    x, wq, scales, biases, lhs, rhs, transpose=True, group_size=None, bits=None, mode="affine",
    sorted_indices=False,
) -> torch.Tensor:  # fmt: skip
    """`mx.gather_qmm` on torch tensors (indices as uint32, absent ones None; uint8 float-mode
    scales passed as their bytes), the result back as a torch tensor."""

    def idx(t):
        return None if t is None else mx.array(t.numpy().astype(np.uint32))

    out = mx.gather_qmm(
        to_mx(x),
        to_mx(wq),
        mx.array(scales.numpy()) if scales.dtype == torch.uint8 else to_mx(scales),
        None if biases is None else to_mx(biases),
        lhs_indices=idx(lhs),
        rhs_indices=idx(rhs),
        transpose=transpose,
        group_size=group_size,
        bits=bits,
        mode=mode,
        sorted_indices=sorted_indices,
    )
    return to_torch(out)


def words(t: torch.Tensor) -> np.ndarray:
    """Packed words (uint32 or int32 tensor) as a numpy uint32 array, for bit comparisons."""
    return t.detach().contiguous().view(torch.int32).numpy().view(np.uint32)


# --- float64 references -------------------------------------------------------------------------


def unpack(wq: torch.Tensor, bits: int) -> np.ndarray:
    """The integer values of packed rows [..., K*bits/32] as int64 [..., K].

    Each row is a little-endian bit stream: value i occupies bits [i*bits, (i+1)*bits).
    """
    w = words(wq)
    lead, kp = w.shape[:-1], w.shape[-1]
    k = kp * 32 // bits
    stream = np.unpackbits(w.astype("<u4").view(np.uint8), axis=-1, bitorder="little")
    stream = stream.reshape(*lead, k, bits).astype(np.int64)
    return (stream << np.arange(bits, dtype=np.int64)).sum(-1)


def dequantize_ref(
    wq: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, group_size: int, bits: int
) -> torch.Tensor:
    """W = scales * q + biases in float64: the product of a float scale and an integer below 2^8
    is exact, and the sum is rounded once at float64 precision, far below any fp32 rounding."""
    q = torch.from_numpy(unpack(wq, bits)).double()
    s = scales.detach().double().repeat_interleave(group_size, dim=-1)
    b = biases.detach().double().repeat_interleave(group_size, dim=-1)
    return s * q + b


def bf16_tile_ref(
    wq: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, group_size: int, bits: int
) -> torch.Tensor:
    """W as the bf16 tiles of the bf16 GEMM path (MLX's Metal numerics for bf16, the same
    numbers as mx.dequantize in bf16): s*q in fp32 rounded to bf16, plus b in fp32, rounded to
    bf16 again. Returned in float64."""
    q = torch.from_numpy(unpack(wq, bits)).float()
    s = scales.detach().float().repeat_interleave(group_size, dim=-1)
    b = biases.detach().float().repeat_interleave(group_size, dim=-1)
    product = (q * s).to(torch.bfloat16).float()
    return (product + b).to(torch.bfloat16).double()


CPU_DECODE_MAX_ROWS = 16  # kDecodeMaxRows in csrc/cpu/affine_cpu.cpp


def takes_bf16_gemm(x: torch.Tensor, wq: torch.Tensor, transpose: bool) -> bool:
    """Whether the CPU op takes the bf16-tile GEMM: bf16 x @ W.T with more than 16 rows per
    matmul (all of x's rows against a 2-D weight; x's last-but-one dim against a batched one),
    on the avx512 kernel set (AVX512-BF16; elsewhere the tiles stay fp32)."""
    import mlxq

    rows = x.shape[-2] if wq.dim() > 2 else x.numel() // max(x.shape[-1], 1)
    bf16_dot = mlxq._C.cpu_isa() == "avx512"  # only that kernel set has the bf16 tiles
    return x.dtype == torch.bfloat16 and transpose and rows > CPU_DECODE_MAX_ROWS and bf16_dot


def path_weight_refs(
    x: torch.Tensor,
    wq: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor,
    group_size: int,
    bits: int,
    transpose: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 W that the CPU op's path for this x multiplies by (bf16 tiles or exact) and
    the error scale of its terms (|s|q + |b|, or the tiles' magnitudes)."""
    return weight_refs(wq, scales, biases, group_size, bits, takes_bf16_gemm(x, wq, transpose))


def weight_refs(
    wq: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor,
    group_size: int,
    bits: int,
    bf16_tiles: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """W in float64 (bf16_tile_ref's tiles or exact) and the error scale of its terms."""
    if bf16_tiles:
        w = bf16_tile_ref(wq, scales, biases, group_size, bits)
        return w, w.abs()
    w = dequantize_ref(wq, scales, biases, group_size, bits)
    return w, dequantize_ref(wq, scales.abs(), biases.abs(), group_size, bits)


def matmul_ref(
    x: torch.Tensor,
    wq: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor,
    group_size: int,
    bits: int,
    transpose: bool = True,
    absolute: bool = False,
    bf16_tiles: bool = False,
) -> torch.Tensor:
    """x @ W.T (or x @ W) in float64, broadcasting batch dims like mx.quantized_matmul.

    With `absolute`, returns |x| @ (|scales| * q + |biases|).T instead: the scale of the
    rounding error of any float evaluation that splits w into its terms s*q and b (which can
    cancel, so |W| alone would be too small a scale). With `bf16_tiles`, W is bf16_tile_ref's
    (and |W| for `absolute`): the reference of the bf16 GEMM path.
    """
    w, w_abs = weight_refs(wq, scales, biases, group_size, bits, bf16_tiles)
    xd = x.detach().double()
    if absolute:
        w, xd = w_abs, xd.abs()
    wt = w.transpose(-1, -2) if transpose else w
    if w.dim() == 2:
        return xd @ wt
    return torch.matmul(xd, wt)


def eps(dtype: torch.dtype) -> float:
    """Unit roundoff (half an ulp of 1) of a float dtype."""
    return torch.finfo(dtype).eps / 2


def fp32_sum_eps(k: int) -> float:
    """(k + 4) u32: the error of one fp32 evaluation of k products (each term up to 4 roundings,
    then a k-term sum in any order), relative to the sum of the terms' magnitudes. Two such
    evaluations (a kernel and the CPU op) are at most twice this apart."""
    return (k + 4) * eps(torch.float32)


def matmul_tolerance(
    ref_abs: torch.Tensor, ref: torch.Tensor, k: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """Error bound of an fp32 dequantize + fp32 accumulation rounded once to `out_dtype`.

    `k` is the length of the dot products. Evaluating each term x*(s*q + b) in fp32 costs at
    most 4 roundings and a k-term fp32 sum k more, each relative to the terms' magnitudes
    `ref_abs` (the classic worst-case summation bound, (k + 4) * u32 * ref_abs); the final
    rounding adds half an ulp of the output dtype, u_out * |y| (floored for tiny outputs).
    """
    u32 = eps(torch.float32)
    bound = (k + 4) * u32 * ref_abs
    if out_dtype != torch.float32:
        bound = bound + eps(out_dtype) * (ref.abs() + bound) + torch.finfo(out_dtype).tiny
    return bound + 1e-30


def assert_within(actual: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    """Elementwise |actual - ref| <= tol, with a message that shows the worst element. An
    infinite `actual` passes where rounding to its dtype overflows within the tolerance: |ref| +
    tol reaches the dtype's max plus half its last step (round to nearest gives inf there; fp16
    sums of wide-range x reach it)."""
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    err = (actual.double() - ref).abs()
    if actual.is_floating_point():
        fi = torch.finfo(actual.dtype)
        overflow = fi.max + math.ldexp(fi.eps, math.frexp(fi.max)[1] - 2)  # max + ulp(max) / 2
        rounds_to_inf = torch.isinf(actual) & (torch.sign(actual.double()) == torch.sign(ref))
        err = torch.where(rounds_to_inf & (ref.abs() + tol >= overflow), 0.0, err)
    bad = err > tol
    if bad.any():
        i = int((err - tol).flatten().argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{err.numel()} elements out of tolerance; worst at flat "
            f"index {i}: got {actual.flatten()[i].item()!r}, reference {ref.flatten()[i].item()!r}"
            f", |err| {err.flatten()[i].item():.3g} > tol {tol.flatten()[i].item():.3g}"
        )


def assert_product_within(
    actual: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    what: str,
    *,
    b_abs: torch.Tensor | None = None,
    k: int | None = None,
) -> None:
    """`actual` is torch.matmul(a, b) evaluated in fp32 (products, an fp32 sum) and rounded once
    to actual's dtype: held to the float64 product within matmul_tolerance, whatever the order
    of the sum. `b_abs` is the error scale of b's terms where b is itself an fp32 expression
    (|s|q + |b| for an affine weight; default |b|); `k` the length of the longest fp32 sum
    (default a's last dimension: more where partial products are summed again)."""
    a64, b64 = a.detach().double(), b.detach().double()
    b_abs64 = b64.abs() if b_abs is None else b_abs.detach().double()
    ref = torch.matmul(a64, b64)
    ref_abs = torch.matmul(a64.abs(), b_abs64)
    k = a.shape[-1] if k is None else k
    assert_within(actual, ref, matmul_tolerance(ref_abs, ref, k, actual.dtype), what)


def gather_grad_ref(
    g: torch.Tensor,
    w: torch.Tensor,
    lhs: torch.Tensor,
    rhs: torch.Tensor,
    x_shape: tuple[int, ...],
    transpose: bool,
) -> torch.Tensor:
    """d/dx of sum(g * y) for y = x[lhs] @ W[rhs].T (or @ W[rhs]) (x with one batch
    dimension, W float [E, rows, cols]), in float64 by torch's autograd. It is linear in g and
    W and made of products and sums only, so with |g| and the weight's error scale it gives
    the sum of the magnitudes of its terms."""
    xd = torch.zeros(x_shape, dtype=torch.float64, requires_grad=True)
    w = w.detach().double()[rhs]
    yd = xd[lhs] @ (w.transpose(-1, -2) if transpose else w)
    (gd,) = torch.autograd.grad(yd, xd, g.detach().double())
    return gd


def assert_gather_grad_within(
    gx: torch.Tensor,
    g: torch.Tensor,
    w: torch.Tensor,
    w_abs: torch.Tensor,
    lhs: torch.Tensor,
    rhs: torch.Tensor,
    transpose: bool,
    what: str,
) -> None:
    """gx, the fp32 gradient of a gather matmul with respect to x, against the float64 one
    (gather_grad_ref) within matmul_tolerance: each pair's part is an fp32 product g @ W with
    g's last dimension as its length, and the parts of the pairs that share an x matrix are
    summed in fp32 once more (one addition per pair), so k is that length plus the largest
    number of pairs on one x matrix. `w_abs` is the weight's error scale (as for
    assert_product_within)."""
    ref = gather_grad_ref(g, w, lhs, rhs, tuple(gx.shape), transpose)
    ref_abs = gather_grad_ref(g.abs(), w_abs, lhs, rhs, tuple(gx.shape), transpose)
    pairs = int(torch.bincount(torch.broadcast_tensors(lhs, rhs)[0].reshape(-1).long()).max())
    tol = matmul_tolerance(ref_abs, ref, g.shape[-1] + pairs, gx.dtype)
    assert_within(gx, ref, tol, what)


def _f32(a: np.ndarray) -> np.ndarray:
    """Rounds float64 values to float32 (and back): one fp32 operation, correctly rounded,
    since a float64 sum, difference or quotient of fp32 values rounds to fp32 without a
    double-rounding error."""
    return np.asarray(a, dtype=np.float64).astype(np.float32).astype(np.float64)


def _round_away(a: np.ndarray) -> np.ndarray:
    """Round half away from zero (C's round, Metal's round), exact for fp32 values in float64."""
    return np.sign(a) * np.floor(np.abs(a) + 0.5)


def _pack_rows(q: np.ndarray, bits: int) -> torch.Tensor:
    """Packs integers [R, K] into little-endian bit streams [R, K*bits/32] (uint32 tensor)."""
    rows, k = q.shape
    pos = np.arange(k, dtype=np.int64) * bits
    vals = q.astype(np.uint64) << (pos % 32).astype(np.uint64)
    out = np.zeros((rows, k * bits // 32 + 1), dtype=np.uint64)
    r = np.repeat(np.arange(rows), k)
    w = np.tile(pos // 32, rows)
    np.bitwise_or.at(out, (r, w), (vals & np.uint64(0xFFFFFFFF)).ravel())
    np.bitwise_or.at(out, (r, w + 1), (vals >> np.uint64(32)).ravel())
    return torch.from_numpy(out[:, :-1].astype(np.uint32).view(np.int32)).view(torch.uint32)


def affine_quantize_ref(
    w: torch.Tensor, group_size: int, bits: int, rule: str = "gpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MLX's affine quantization restated in float64 numpy (each fp32 operation of MLX rounded
    to fp32 explicitly); returns (packed uint32 [..., K*bits/32], scales, biases [..., K/gs]).

    rule="gpu" is MLX's Metal kernel (what mx.quantize does on a Mac): the group maximum
    starts at 0, the minimum at the dtype's largest value (so, for finite data, the group
    minimum), and rounding is half away from zero. rule="cpu" is MLX's CPU path: plain
    min/max, rounding half to even. Both then: scale = max((max - min) / n_bins, 1e-7),
    negated unless |min| > |max|; the edge of larger magnitude e gives q0 = round(e / scale);
    unless q0 is 0, scale = e / q0 and bias = e (else bias 0); q = round((w - bias) / scale)
    clamped to [0, n_bins]. 1 bit is not covered (MLX uses plain min/max there).
    """
    assert bits >= 2 and rule in ("gpu", "cpu")
    lead, k = w.shape[:-1], w.shape[-1]
    x = w.detach().float().double().numpy().reshape(-1, group_size)
    n_bins = float((1 << bits) - 1)
    rnd = _round_away if rule == "gpu" else np.rint
    w_min = x.min(axis=1)
    w_max = x.max(axis=1)
    if rule == "gpu":
        w_max = np.maximum(w_max, 0.0)
    scale = np.maximum(_f32(_f32(w_max - w_min) / n_bins), _f32(1e-7))
    side = np.abs(w_min) > np.abs(w_max)
    scale = np.where(side, scale, -scale)
    edge = np.where(side, w_min, w_max)
    q0 = rnd(_f32(edge / scale))
    at_zero = q0 == 0
    scale = np.where(at_zero, scale, _f32(edge / np.where(at_zero, 1.0, q0)))
    bias = np.where(at_zero, 0.0, edge)
    q = rnd(_f32(_f32(x - bias[:, None]) / scale[:, None]))
    if rule == "gpu":
        # MLX's Metal kernel clamps only from above: a negative q would be undefined there.
        assert (q >= 0).all(), "MLX's GPU rule produced a negative level"
    q = np.clip(q, 0.0, n_bins).astype(np.int64)
    packed = _pack_rows(q.reshape(-1, k), bits).reshape(*lead, k * bits // 32)
    groups = (*lead, k // group_size)
    s = torch.from_numpy(scale.astype(np.float32)).to(w.dtype).reshape(groups)
    b = torch.from_numpy(bias.astype(np.float32)).to(w.dtype).reshape(groups)
    return packed, s, b


# --- MLX's floating-point modes (mxfp4, nvfp4, mxfp8): float64 reference from the format ------

FP_GROUP = {"mxfp4": 32, "nvfp4": 16, "mxfp8": 32}
FP_BITS = {"mxfp4": 4, "nvfp4": 4, "mxfp8": 8}


def fp4_value(code: np.ndarray) -> np.ndarray:
    """E2M1: sign bit 3, exponent bits 1-2 (bias 1), mantissa bit 0; exponent 0 is subnormal."""
    sign = np.where(code & 8, -1.0, 1.0)
    e, m = (code >> 1) & 3, code & 1
    mag = np.where(e == 0, m * 0.5, (1 + m / 2) * 2.0 ** (e.astype(np.float64) - 1))
    return sign * mag


def fp8_value(code: np.ndarray) -> np.ndarray:
    """E4M3: sign bit 7, exponent bits 3-6 (bias 7), mantissa bits 0-2; exponent 0 subnormal;
    all of bits 0-6 set is NaN (no infinities)."""
    sign = np.where(code & 0x80, -1.0, 1.0)
    e, m = (code >> 3) & 15, code & 7
    mag = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e.astype(np.float64) - 7))
    return np.where((code & 0x7F) == 0x7F, np.nan, sign * mag)


def fp_dequantize_ref(wq, scales, mode: str, global_scale=None) -> torch.Tensor:
    """W in float64: element value times its group's scale (times global_scale / 2688).

    `global_scale` is a float (fp_matmul's single value) or an array of one value per matrix
    of `wq` (shape wq.shape[:-2], mx.gather_qmm's per-expert scales), taken as float32.
    """
    raw = words(wq).astype("<u4").view(np.uint8).reshape(*wq.shape[:-1], -1).astype(np.int64)
    if FP_BITS[mode] == 4:
        codes = np.stack([raw & 15, raw >> 4], axis=-1).reshape(*raw.shape[:-1], -1)
        values = fp4_value(codes)
    else:
        values = fp8_value(raw)
    s = scales.numpy().astype(np.int64)
    scale = fp8_value(s) if mode == "nvfp4" else 2.0 ** (s.astype(np.float64) - 127)
    if global_scale is not None:
        g = np.asarray(global_scale, dtype=np.float32).astype(np.float64) / 2688.0
        scale = scale * g.reshape(*g.shape, 1, 1)
    out = values * np.repeat(scale, FP_GROUP[mode], axis=-1)
    return torch.from_numpy(out)


# --- the layer ops: rms_norm and decode_attention ---------------------------------------------


def ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of t's dtype at |t| (subnormals: the smallest spacing), in float64."""
    info = torch.finfo(t.dtype)
    a = t.double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(a))) * info.eps


def rms_norm_tolerance(x: torch.Tensor, weight: torch.Tensor, want: torch.Tensor, eps_: float):
    """How far two evaluations of mlxq.ops.rms_norm's contract (fp32 mean, 1/sqrt, the normalized
    value rounded to x's dtype, the product with weight rounded to want's dtype) may be apart:
    the fp32 means differ by at most (D + 4) u32 relative each (any summation order), which moves
    the fp32 normalized value by about half that plus a few roundings; rounded to x's dtype the
    two may then sit an ulp apart (a tie between them), times |weight|; and the products round
    once more (an ulp of want's dtype)."""
    x64, w64 = x.double(), weight.double()
    n64 = x64 / torch.sqrt(x64.square().mean(-1, keepdim=True) + eps_)
    fp32 = (fp32_sum_eps(x.shape[-1]) + 4 * eps(torch.float32)) * (n64 * w64).abs()
    normalized = n64.to(x.dtype)
    return ulp(normalized) * w64.abs() + ulp(want) + 2 * fp32 + 1e-45


def attention_reference(q, k, v, mask, scale):
    """float64 attention on the upcast inputs (query head h reads kv head h // (Hq / Hkv)), a row
    that attends nothing giving 0; returns (out, tol): tol bounds the error of an fp32 evaluation
    (decode_attention's contract) rounded once to q's dtype. Per key j of a row, the fp32 score
    is off by at most d_j = (D + 4) u32 scale |q| . |k_j| (its dot product) + u32 (2 |s_j| +
    |s_j - m|) (the scale, the mask's addition, the max's subtraction) + 2 u32 (exp); a common
    shift of every score cancels in the softmax. exp(d) ~ 1 + d makes weight j off by d_j + the
    sum's own error, so the output is off by sum_j p_j (2 d_j + (Lk + 8) u32) |v_j| plus the same
    relative error of the normalizer times |out|, then the rounding to q's dtype."""
    rep = q.shape[1] // k.shape[1]
    q64 = q.double()
    k64 = k.double().repeat_interleave(rep, 1)
    v64 = v.double().repeat_interleave(rep, 1)
    s = q64 @ k64.transpose(-1, -2) * scale
    s_abs = q64.abs() @ k64.abs().transpose(-1, -2) * abs(scale)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    p = torch.softmax(s, -1).nan_to_num(0.0)  # rows of -inf scores: 0
    out = p @ v64
    u = eps(torch.float32)
    lk, d = k.shape[-2], q.shape[-1]
    m = s.amax(-1, keepdim=True).nan_to_num(0.0, neginf=0.0)
    finite = torch.where(s.isfinite(), s, torch.zeros_like(s))
    dj = fp32_sum_eps(d) * s_abs + u * (2 * finite.abs() + (finite - m).abs()) + 2 * u
    w = 2 * dj + (lk + 8) * u
    tol = p * w @ v64.abs() + (p * w).sum(-1, keepdim=True) * out.abs()
    if q.dtype != torch.float32:
        tol = tol + eps(q.dtype) * (out.abs() + tol) + torch.finfo(q.dtype).tiny
    return out, tol + 1e-30
