"""The Metal kernels of MLX's floating-point modes (mxfp4, nvfp4, mxfp8): fp_qmv / fp_qmm
(fp_matmul), fp_dequantize and fp_quantize (metal/fp_*.metal), executed by the MSL emulator
through the launch that the MPS backend and the run-time fallback encode
(`mlxq._C.metal_launch_fp_*`).

Oracles: mx.quantized_matmul (mx modes and nvfp4 without a global scale; MLX's
quantized_matmul takes none; run in float32), float64 products with the weights dequantized by
the CPU op (bit-exact with mx.dequantize, tests/test_fp_modes.py) for every case, nvfp4's
global scale included; mx.quantize / mx.dequantize and the CPU ops bit for bit. Matmul bound:
one rounding of the output plus fp32 accumulation-order noise relative to sum |x| |w|, as
tests/test_metal_kernels.py. Every FP4/FP8 code and scale byte goes through the matmul and
dequantize kernels; every 16-bit value is a group maximum for quantize.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlxq
import numpy as np
import pytest
import torch
from mlxq._native import _C
from mlxq.testing import metal_emulator as emu
from mlxq.testing.metal_emulator import ops as metal_ops
from oracles import DTYPES, TORCH_TO_MX, fp32_sum_eps, to_mx, to_torch

pytestmark = pytest.mark.skipif(
    not emu.available(), reason="no clang for the MSL emulator (pip install ziglang)"
)

METAL_DIR = Path(__file__).resolve().parents[1] / "metal"
MODES = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
# (mode, global scale): nvfp4 alone takes a global scale
CASES = [("mxfp4", None), ("nvfp4", None), ("nvfp4", 0.37), ("mxfp8", None)]
CASE_IDS = [m if g is None else f"{m}-g{g}" for m, g in CASES]
DTYPE_IDS = [str(d).split(".")[-1] for d in DTYPES]
OUT_EPS = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
MSL_DTYPE = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat"}


@pytest.fixture(scope="module", autouse=True)
def library() -> emu.Library:
    names = ("fp_qmv.metal", "fp_qmm.metal", "fp_dequantize.metal", "fp_quantize.metal")
    return emu.load_library([METAL_DIR / n for n in names])


def _global(g: float | None) -> torch.Tensor | None:
    return None if g is None else torch.tensor(g, dtype=torch.float32)


def _run(x, wq, s, mode, transpose, global_scale=None) -> tuple[torch.Tensor, str]:
    """The shipped launch of fp_matmul, dispatched in the emulator (outputs start as NaN)."""
    gs, bits = MODES[mode]
    launch = _C.metal_launch_fp_matmul(x, wq, s, mode, gs, bits, transpose, global_scale)
    out = launch["outputs"][0]
    if launch["empty"]:
        return out, launch["kernel"]
    out.fill_(float("nan"))
    tgm = dict(launch["threadgroup_memory"]) or None
    emu.dispatch(launch["kernel"], launch["grid"], launch["threads"], launch["buffers"], tgm)
    return out, launch["kernel"]


def _weights(gen, shape, mode, dtype, global_scale=None):
    gs, bits = MODES[mode]
    w = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    wq, s = mlxq.quantize(w, gs, bits, mode=mode, global_scale=_global(global_scale))
    W = torch.ops.mlxq.fp_dequantize(
        wq, s, mode, gs, bits, _global(global_scale), torch.float32
    ).double()
    return wq, s, W


def _check(y, x, W, transpose, kernel, ref=None) -> None:
    """y within the bound of `ref` (default: the float64 product with W)."""
    Wt = W.transpose(-1, -2) if transpose else W
    ref = x.double() @ Wt if ref is None else ref
    absprod = x.double().abs() @ Wt.abs()
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert not y.isnan().any(), f"{kernel}: some outputs were never written"
    bound = OUT_EPS[x.dtype] * ref.abs() + 2 * fp32_sum_eps(x.shape[-1]) * absprod + 1e-30
    err = (y.double() - ref).abs()
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{kernel}: error {err.max().item():.3g} is {worst:.2f}x the bound"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode,global_scale", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
    "M,transpose,kernel",
    [(1, True, "fp_qmv"), (5, True, "fp_qmv"), (33, True, "fp_qmm_t"), (3, False, "fp_qmm_n"),
     (40, False, "fp_qmm_n")],
)  # fmt: skip
def test_fp_matmul(M, transpose, kernel, mode, global_scale, dtype, gen) -> None:
    gs, _ = MODES[mode]
    n, k = 37, 3 * gs  # N not a multiple of 8 or 32; K = 48 for nvfp4 (not a multiple of 32)
    wq, s, W = _weights(gen, (n, k), mode, dtype, global_scale)
    x = torch.randn(M, k if transpose else n, generator=gen).to(dtype)
    y, name = _run(x, wq, s, mode, transpose, _global(global_scale))
    assert name == f"{kernel}_{MSL_DTYPE[dtype]}_{mode}"
    _check(y, x, W, transpose, name)
    if global_scale is None:  # MLX's own quantized_matmul (it takes no global scale), in fp32
        ref = mx.quantized_matmul(
            to_mx(x.float()), to_mx(wq), mx.array(s.numpy()), transpose=transpose, mode=mode
        )
        _check(y, x, W, transpose, name, to_torch(ref).double())


@pytest.mark.parametrize("transpose", [True, False], ids=["xWT", "xW"])
@pytest.mark.parametrize("M", [2, 33])
def test_fp_matmul_batched_weight_broadcasts(M, transpose, gen) -> None:
    mode = "nvfp4"
    wq, s, W = _weights(gen, (2, 24, 64), mode, torch.float16, 1.5)
    x = torch.randn(3, 1, M, 64 if transpose else 24, generator=gen).to(torch.float16)
    y, name = _run(x, wq, s, mode, transpose, _global(1.5))
    assert y.shape == (3, 2, M, 24 if transpose else 64)
    _check(y, x, W, transpose, name)


def test_fp_matmul_leading_dims_and_empty(gen) -> None:
    wq, s, W = _weights(gen, (16, 64), "mxfp8", torch.float32)
    x = torch.randn(2, 3, 64, generator=gen)
    y, name = _run(x, wq, s, "mxfp8", True)
    _check(y, x, W, True, name)
    y, _ = _run(torch.empty(0, 64), wq, s, "mxfp8", True)
    assert y.shape == (0, 16)


def _pack(codes: np.ndarray, bits: int) -> torch.Tensor:
    """Codes [N, K] (4 or 8 bits, little-endian within each word) as uint32 words."""
    per = 32 // bits
    c = codes.astype(np.uint64).reshape(codes.shape[0], -1, per)
    words = (c << (np.arange(per, dtype=np.uint64) * bits)).sum(-1).astype(np.uint32)
    return torch.from_numpy(words.view(np.int32)).view(torch.uint32)


@pytest.mark.parametrize("mode,global_scale", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("M", [8, 64], ids=["qmv", "qmm"])
def test_every_code_and_scale_byte_decodes_as_on_the_cpu(M, mode, global_scale) -> None:
    # x = unit vectors: each output is one decoded value times its scale, exactly. Codes and
    # scale bytes cycle over the rows, so that the first columns already see every one.
    gs, bits = MODES[mode]
    if mode == "nvfp4":
        scale_bytes = [b for b in range(256) if b & 0x7F != 0x7F]  # every non-NaN E4M3
    else:
        scale_bytes = list(range(0, 246, 3))  # E8M0 up to 2^118: no product overflows
    n, k = 256, 64
    rows, cols = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")
    codes = (rows * 13 + cols * 7) % (1 << bits)
    if bits == 8:  # FP8 NaN codes only in row 0: NaN times x's zeros spreads over a row
        codes[(codes & 0x7F) == 0x7F] = 0x7E
        codes[0, 0], codes[0, 1] = 0x7F, 0xFF
    wq = _pack(codes, bits)
    rows, grps = np.meshgrid(np.arange(n), np.arange(k // gs), indexing="ij")
    picks = (rows * 5 + grps) % len(scale_bytes)
    s = torch.from_numpy(np.array(scale_bytes, dtype=np.uint8)[picks])
    g = _global(global_scale)
    want = torch.ops.mlxq.fp_dequantize(wq, s, mode, gs, bits, g, torch.float32)
    x = torch.eye(k)[:M]
    y, name = _run(x, wq, s, mode, True, g)
    got = y.T  # y[m, n] = W[n, m]
    ref = want[:, :M]
    clean = ~want.isnan().any(1)
    same = got == ref  # exact (-0 may come back as +0: the other products are +0)
    assert same[clean].all(), f"{name}: {(~same[clean]).sum().item()} values differ from the CPU"
    assert got[~clean].isnan().all() and (clean.sum() == n - (bits == 8))
    seen_codes = np.unique(codes[1:, :M])
    assert len(seen_codes) == (1 << bits) - 2 * (bits == 8)
    assert len(np.unique(s.numpy()[1:, 0])) == len(scale_bytes)


def test_plan_kernels_and_refusals() -> None:
    meta = dict(device="meta")
    wq = torch.empty(64, 96 * 4 // 32, dtype=torch.uint32, **meta)
    s = torch.empty(64, 96 // 16, dtype=torch.uint8, **meta)
    x = torch.empty(8, 96, dtype=torch.bfloat16, **meta)
    plan = _C.plan_fp_matmul(x, wq, s, "nvfp4", 16, 4, True)
    assert plan["kernel"] == "fp_qmv_bfloat_nvfp4" and plan["grid"] == (8, 1, 1)
    assert (3, "global_scale") in plan["bindings"]
    plan = _C.plan_fp_matmul(torch.empty(9, 96, **meta), wq, s, "nvfp4", 16, 4, True)
    assert plan["kernel"] == "fp_qmm_t_float_nvfp4" and plan["grid"] == (2, 1, 1)
    with pytest.raises(ValueError, match="group_size must be 32 for mode 'mxfp4'"):
        _C.plan_fp_matmul(x, wq, s, "mxfp4", 16, 4, True)
    with pytest.raises(ValueError, match="only used by mode 'nvfp4'"):
        _C.plan_fp_matmul(x, wq, s, "mxfp8", 32, 8, True, torch.ones(1, **meta))


@pytest.mark.parametrize("M,transpose", [(2, True), (33, False)])
def test_runtime_fallback_in_emulator(M, transpose, gen, tmp_path) -> None:
    # The run-time fallback's source for one kernel (headers pasted in, threadgroup memory
    # declared in the body), compiled by a stand-in for torch.mps.compile_shader.
    from metal_backend_helpers import FakeCompileShader
    from mlxq.metal import runtime as rt

    fake = FakeCompileShader(tmp_path)
    runner = rt.RuntimeKernels(fake, METAL_DIR)
    wq, s, W = _weights(gen, (20, 64), "nvfp4", torch.bfloat16, 0.37)
    x = torch.randn(M, 64 if transpose else 20, generator=gen).to(torch.bfloat16)
    launch = _C.metal_launch_fp_matmul(x, wq, s, "nvfp4", 16, 4, transpose, _global(0.37))
    launch["outputs"][0].fill_(float("nan"))
    runner.run(launch)
    _check(launch["outputs"][0], x, W, transpose, launch["kernel"])
    assert len(fake.sources) == 1 and fake.sources[0].count('MLXQ_INSTANTIATE("') == 1


# --- fp_dequantize -------------------------------------------------------------------------------

TORCH_TO_MX_DTYPE = {
    torch.float32: mx.float32,
    torch.float16: mx.float16,
    torch.bfloat16: mx.bfloat16,
}


def _dequantize(wq, s, mode, global_scale, dtype) -> tuple[torch.Tensor, str]:
    gs, bits = MODES[mode]
    launch = _C.metal_launch_fp_dequantize(wq, s, mode, gs, bits, global_scale, dtype)
    out = launch["outputs"][0]
    out.fill_(float("nan"))
    emu.dispatch(launch["kernel"], launch["grid"], launch["threads"], launch["buffers"])
    return out, launch["kernel"]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ints = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return (a.view(ints) == b.view(ints)) | (a.isnan() & b.isnan())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode,global_scale", CASES, ids=CASE_IDS)
def test_fp_dequantize_bit_exact(mode, global_scale, dtype, gen) -> None:
    gs, bits = MODES[mode]
    # K a multiple of 32: mx.dequantize (0.32.4) cannot reshape nvfp4 rows of 16 * odd values
    w = torch.randn(9, 6 * gs, generator=gen) * torch.logspace(-3, 3, 9)[:, None]
    wq, s = mlxq.quantize(w.to(dtype), gs, bits, mode=mode, global_scale=_global(global_scale))
    g = _global(global_scale)
    y, name = _dequantize(wq, s, mode, g, dtype)
    assert y.dtype == (torch.float32 if g is not None else dtype)
    want = torch.ops.mlxq.fp_dequantize(wq, s, mode, gs, bits, g, dtype)
    assert _same_bits(y, want).all(), f"{name} differs from the CPU op"
    kw = {} if g is None else {"global_scale": mx.array(global_scale, mx.float32)}
    ref = mx.dequantize(to_mx(wq), mx.array(s.numpy()), mode=mode, dtype=TORCH_TO_MX[dtype], **kw)
    assert _same_bits(y, to_torch(ref)).all(), f"{name} differs from mx.dequantize"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode,global_scale", CASES, ids=CASE_IDS)
def test_fp_dequantize_every_code_and_scale_byte(mode, global_scale, dtype) -> None:
    # Every element code with every scale byte 0..255 (inf, NaN and subnormal products
    # included), bit for bit against the CPU op.
    gs, bits = MODES[mode]
    n, k = 256, 3 * gs  # nvfp4: K = 48, not a multiple of 32
    rows, cols = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")
    codes = (rows * 13 + cols * 7) % (1 << bits)
    wq = _pack(codes, bits)
    s = torch.from_numpy((np.arange(n * 3).reshape(n, 3) * 5 % 256).astype(np.uint8))
    g = _global(global_scale)
    y, name = _dequantize(wq, s, mode, g, dtype)
    want = torch.ops.mlxq.fp_dequantize(wq, s, mode, gs, bits, g, dtype)
    same = _same_bits(y, want)
    # A result below fp32's normal range (tiny E8M0 scales) may come back flushed to zero:
    # the emulator's float -> bfloat conversion does on AVX-512 BF16 hosts, and GPUs may.
    tiny = (want.float().abs() < 2.0**-126) & (want != 0) & (y.float() == 0)
    assert (same | tiny).all(), f"{name}: {(~same).sum().item()} values differ from the CPU op"
    assert len(np.unique(s.numpy())) == 256 and len(np.unique(codes)) == 1 << bits


def test_fp_dequantize_plan() -> None:
    meta = dict(device="meta")
    wq = torch.empty(3, 5, 64 * 4 // 32, dtype=torch.uint32, **meta)
    s = torch.empty(3, 5, 4, dtype=torch.uint8, **meta)
    plan = _C.plan_fp_dequantize(wq, s, "nvfp4", 16, 4, torch.ones(1, **meta), torch.float16)
    assert plan["kernel"] == "fp_dequantize_half_nvfp4_to_float"
    assert plan["out_shapes"] == [(3, 5, 64)] and plan["grid"] == (1, 1, 1)
    plan = _C.plan_fp_dequantize(wq, s, "nvfp4", 16, 4)
    assert plan["kernel"] == "fp_dequantize_bfloat_nvfp4"  # MLX's default dtype
    with pytest.raises(TypeError, match="dtype must be float32"):
        _C.plan_fp_dequantize(wq, s, "nvfp4", 16, 4, None, torch.int32)


@pytest.mark.parametrize("mode,global_scale", CASES, ids=CASE_IDS)
def test_fp_matmul_traffic(mode, global_scale, gen) -> None:
    # Decode is a memory-bandwidth problem: packed words and scale bytes are read exactly once
    # for all rows of x, the global scale only by nvfp4, and each output is written once.
    gs, bits = MODES[mode]
    n, k, m = 24, 40 * gs, 3
    wq, s, W = _weights(gen, (n, k), mode, torch.float16, global_scale)
    x = torch.randn(m, k, generator=gen).to(torch.float16)
    y, name = _run(x, wq, s, mode, True, _global(global_scale))
    rep = emu.last_dispatch_report()
    assert rep.bytes_read[1] == n * k * bits // 8 and rep.bytes_read[2] == n * k // gs
    assert (rep.bytes_read.get(3, 0) > 0) == (mode == "nvfp4")
    assert rep.bytes_written[4] == m * n * 2 and rep.bytes_written.get(1, 0) == 0
    assert rep.bytes_read[0] == x.numel() * 2 * (n // 4)  # x once per simdgroup (4 rows each)
    _check(y, x, W, True, name)
    # the tiled kernel: the weight tile and its scales once per 32-row block of x, x once per
    # 32-column output tile
    x = torch.randn(40, k, generator=gen).to(torch.float16)
    y, name = _run(x, wq, s, mode, True, _global(global_scale))
    rep = emu.last_dispatch_report()
    assert rep.bytes_read[1] == 2 * n * k * bits // 8 and rep.bytes_read[2] == 2 * n * k // gs
    assert rep.bytes_read[0] == x.numel() * 2 * 1 and rep.bytes_written[4] == 40 * n * 2
    _check(y, x, W, True, name)


# --- fp_quantize ---------------------------------------------------------------------------------


def _quantize(w, mode, global_scale=None) -> tuple[torch.Tensor, torch.Tensor, str]:
    gs, bits = MODES[mode]
    launch = _C.metal_launch_fp_quantize(w, mode, gs, bits, global_scale)
    wq, s = metal_ops.run_launch(launch)
    return wq, s, launch["kernel"]


def _assert_same_quantization(wq, s, ref_q, ref_s, what: str, keep=None) -> None:
    """Words and scale bytes equal, over the rows `keep` (all when None)."""
    keep = slice(None) if keep is None else keep
    wq_bits, ref_bits = wq.view(torch.int32)[keep], ref_q.contiguous().view(torch.int32)[keep]
    assert torch.equal(wq_bits, ref_bits), f"{what}: {(wq_bits != ref_bits).sum()} words differ"
    assert torch.equal(s[keep], ref_s[keep]), f"{what}: {(s[keep] != ref_s[keep]).sum()} scales"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode,global_scale", CASES, ids=CASE_IDS)
def test_fp_quantize_bit_exact(mode, global_scale, dtype, gen) -> None:
    from test_fp_modes import make_weight, mx_quantize

    for shape in [(64, 256), (3, 8, 96)]:
        w = make_weight(shape, dtype, gen)
        wq, s, name = _quantize(w, mode, _global(global_scale))
        assert name == f"fp_quantize_{MSL_DTYPE[dtype]}_{mode}"
        cpu_q, cpu_s = mlxq.quantize(w, mode=mode, global_scale=_global(global_scale))
        _assert_same_quantization(wq, s, cpu_q, cpu_s, f"{name} {shape} vs the CPU op")
        ref_q, ref_s = mx_quantize(w, mode, global_scale)
        _assert_same_quantization(wq, s, ref_q, ref_s, f"{name} {shape} vs mx.quantize")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("mode", MODES)
def test_fp_quantize_every_16bit_value_as_group_maximum(mode, dtype) -> None:
    # Every positive finite value of the dtype as a group's maximum: each scale byte and each
    # rounding of the maximum itself matches the CPU op (itself bit-exact with MLX).
    gs, bits = MODES[mode]
    codes = torch.arange(1, 0x7F80 if dtype == torch.bfloat16 else 0x7C00, dtype=torch.int32)
    vals = codes.to(torch.int16).view(dtype).float()
    w = torch.zeros(vals.numel(), gs)
    w[:, 0], w[:, 1], w[:, 2] = vals, -vals / 3, vals / 7
    w = w.to(dtype)
    wq, s, name = _quantize(w, mode)
    cpu_q, cpu_s = mlxq.quantize(w, mode=mode)
    # bfloat16 intermediates below fp32's normal range (the scale max / 6 or max / 448): the
    # emulator's float -> bfloat conversion flushes them on AVX-512 BF16 hosts (as GPUs may),
    # so only group maxima whose scale is a normal fp32 number are held to the CPU op there.
    keep = vals.abs() >= 2.0**-126 * 448 if dtype == torch.bfloat16 else None
    _assert_same_quantization(wq, s, cpu_q, cpu_s, name, keep)
