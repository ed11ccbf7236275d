"""The CUDA backend (csrc/cuda/) against the CPU op, and a tiny MLX model on CUDA vs the CPU.

Every op runs on random data for every bits x group size x dtype and is compared with the CPU
op on the same inputs (quantize bit for bit; matmul also against a float64 product of the
dequantized weight). Tests that need a GPU skip with the reason where there is none or mlxq
was built without CUDA; the build logic of the CUDA backend is tested everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import layer_op_cases
import mlxq
import pytest
import torch
from conftest import random_weight
from mlxq import _build_helpers as bh
from oracles import assert_within, attention_reference, fp32_sum_eps, weight_refs

ROOT = Path(__file__).resolve().parents[1]
BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# unit roundoff of each output dtype
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
DECODE_MAX_ROWS = 8  # csrc/cuda/launch.h: larger M dequantizes W to x's dtype for cuBLAS


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (the CUDA backend is tested on an NVIDIA GPU only)"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("mlxq::affine_matmul", "CUDA"):
        return "mlxq was built without its CUDA backend (torch without CUDA, or no nvcc)"
    return None


needs_cuda = pytest.mark.skipif(_cuda_skip_reason() is not None, reason=str(_cuda_skip_reason()))


def _quantized(gen, n, k, gs, bits, dtype):
    w = random_weight((n, k), dtype, gen)
    return mlxq.affine_quantize(w, gs, bits)


_REFS: list = []  # the last weight's (key, refs): tests check one weight against several x


def _weight_refs(wq, s, b, gs, bits):
    """weight_refs, kept for the last weight: holding its tensors keeps their memory from being
    reused, and `is` plus their versions tell an unchanged weight (the float64 dequantize of a
    large W costs seconds a call)."""
    key = (wq, s, b, gs, bits, wq._version, s._version, b._version)
    if _REFS and all(
        a is k if isinstance(k, torch.Tensor) else a == k
        for a, k in zip(_REFS[0], key, strict=True)
    ):
        return _REFS[1]
    _REFS[:] = [key, weight_refs(wq, s, b, gs, bits)]
    return _REFS[1]


def _matmul_tolerance(x, wq, s, b, gs, bits, transpose=True):
    """The float64 product of x and the dequantized W and the error the numerics contract
    allows the CUDA op: fp32 sums of k terms (k = x's last dimension) whose error scale is
    |x| (|s| q + |b|), taken twice oracles.fp32_sum_eps(k) (tensor cores' fp32 sums truncate:
    up to an ulp a step, not half), large M or W not transposed also rounding W to the dtype of
    x first (half an ulp of each weight), and the output rounded once."""
    w, w_abs = _weight_refs(wq, s, b, gs, bits)
    if not transpose:
        w, w_abs = w.transpose(-1, -2), w_abs.transpose(-1, -2)
    ref = x.double() @ w.transpose(-1, -2)
    ref_abs = x.double().abs() @ w_abs.transpose(-1, -2)
    m = x.shape[-2] if x.dim() >= 2 else 1
    prefill = m > DECODE_MAX_ROWS or not transpose  # cuBLAS or the fused kernel: W in x's dtype
    weight_eps = EPS[x.dtype] if prefill and x.dtype != torch.float32 else 0.0
    acc = (2 * fp32_sum_eps(x.shape[-1]) + weight_eps) * ref_abs
    tol = acc + EPS[x.dtype] * (ref.abs() + acc) + torch.finfo(x.dtype).tiny + 1e-30
    return ref, tol


def _check_matmul(x, wq, s, b, gs, bits, transpose=True):
    """GPU vs float64 oracle and vs the CPU op (each within _matmul_tolerance of the oracle, so
    within twice it of each other)."""
    y_gpu = mlxq.affine_matmul(x.cuda(), wq.cuda(), s.cuda(), b.cuda(), gs, bits, transpose).cpu()
    y_cpu = mlxq.affine_matmul(x, wq, s, b, gs, bits, transpose)
    assert y_gpu.dtype == x.dtype and y_gpu.shape == y_cpu.shape
    ref, tol = _matmul_tolerance(x, wq, s, b, gs, bits, transpose)
    assert_within(y_gpu, ref, tol, "GPU vs float64")
    assert_within(y_gpu, y_cpu.double(), 2 * tol, "GPU vs CPU op")


def test_matmul_tolerance_is_tight_enough() -> None:
    # runs everywhere: the derived bound holds the CPU op (fp32 sums, the decode width and above)
    # and still tells a wrong weight row from a right one: row 5 eight steps of q off (half the
    # 4-bit range) puts most of its outputs past the bound, at every dtype and width
    gen = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        wq, s, b = _quantized(gen, 64, 1024, 64, 4, dtype)
        for m in (3, DECODE_MAX_ROWS + 1):
            x = torch.randn(m, 1024, generator=gen).to(dtype)
            ref, tol = _matmul_tolerance(x, wq, s, b, 64, 4)
            assert_within(mlxq.affine_matmul(x, wq, s, b, 64, 4), ref, tol, f"CPU op {dtype}")
            w, _ = weight_refs(wq, s, b, 64, 4)
            w[5] += 8 * s[5].double().repeat_interleave(64)
            off = ((x.double() @ w.T).to(dtype).double() - ref).abs() / tol
            assert float(off[:, 5].median()) > 1, f"{dtype} m={m}: {off[:, 5]}"


def test_tolerance_takes_fp16_overflow() -> None:
    # runs everywhere: fp16 sums of wide-range x can pass fp16's max (a bulk decode case did, at
    # one row of 2192 for some seeds): the op's inf is the float64 product rounded once and passes;
    # an inf of the wrong sign, or where the product stays below the overflow point, fails
    gen = torch.Generator().manual_seed(5)
    wq, s, b = _quantized(gen, 4, 512, 64, 4, torch.float16)
    w, _ = weight_refs(wq, s, b, 64, 4)
    x = (torch.sign(w[0]) * 80000 / w[0].abs().sum()).to(torch.float16)[None]  # row 0: ~80000
    ref, tol = _matmul_tolerance(x, wq, s, b, 64, 4)
    assert ref[0, 0] > 70000 and ref[0, 1:].abs().max() < 60000, ref
    y = mlxq.affine_matmul(x, wq, s, b, 64, 4)
    assert torch.isposinf(y[0, 0]) and torch.isfinite(y[0, 1:]).all()
    assert_within(y, ref, tol, "CPU op")
    for wrong in (-float("inf"), torch.finfo(torch.float16).max):
        bad = y.clone()
        bad[0, 0] = wrong
        with pytest.raises(AssertionError, match="1/4 elements out of tolerance"):
            assert_within(bad, ref, tol, "bad")
    with pytest.raises(AssertionError, match="out of tolerance"):
        assert_within(torch.full_like(y, float("inf")), ref, tol, "inf everywhere")


# --- build logic (runs everywhere) -----------------------------------------------------------


def test_cuda_sources_only_in_cuda_builds() -> None:
    listed = bh.read_source_list(ROOT)
    cu = [f for f in listed if f.endswith(".cu")]
    assert "csrc/cuda/affine_cuda.cu" in cu and all(f.startswith("csrc/cuda/") for f in cu)
    assert not set(cu) & set(bh.native_sources(ROOT, "linux", False))
    assert set(cu) <= set(bh.native_sources(ROOT, "linux", False, cuda=True))
    assert ("MLXQ_WITH_CUDA", "1") in bh.native_macros("linux", False, cuda=True)
    assert bh.native_macros("linux", False) == []


def test_cuda_build_decision(tmp_path: Path) -> None:
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("")
    assert bh.cuda_build_decision(None, nvcc, {})[0] is False  # CPU-only torch: as before
    assert bh.cuda_build_decision("13.0", None, {})[0] is False
    assert bh.cuda_build_decision("13.0", tmp_path / "missing", {})[0] is False
    assert bh.cuda_build_decision("13.0", nvcc, {})[0] is True
    assert bh.cuda_build_decision("13.0", nvcc, {"MLXQ_BUILD_CUDA": "off"})[0] is False
    with pytest.raises(ValueError, match="no CUDA support"):
        bh.cuda_build_decision(None, nvcc, {"MLXQ_BUILD_CUDA": "require"})
    with pytest.raises(ValueError, match="MLXQ_BUILD_CUDA must be"):
        bh.cuda_build_decision("13.0", nvcc, {"MLXQ_BUILD_CUDA": "maybe"})


def test_cuda_arch_flags() -> None:
    nvcc_knows = ["compute_75", "compute_80", "compute_90", "compute_100", "compute_120"]
    flags, why = bh.cuda_arch_flags("sm_80 sm_86 sm_120", nvcc_knows, {})
    # torch's list (as far as nvcc knows it) plus sm_90, PTX of the newest
    assert flags == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",  # wgmma for the fused prefill
        "-gencode=arch=compute_120,code=sm_120",
        "-gencode=arch=compute_120,code=compute_120",
        "-DMLXQ_CUDA_SM90A=1",
    ]
    assert "sm_90a" in why
    flags, _ = bh.cuda_arch_flags("sm_80", nvcc_knows, {"MLXQ_CUDA_ARCHS": "90"})
    assert flags == [
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90,code=compute_90",
        "-DMLXQ_CUDA_SM90A=1",
    ]
    flags, _ = bh.cuda_arch_flags("sm_80", nvcc_knows, {"MLXQ_CUDA_ARCHS": "80"})
    assert flags == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_80,code=compute_80",
    ]
    with pytest.raises(ValueError, match="no CUDA architecture"):
        bh.cuda_arch_flags("", ["compute_75"], {"MLXQ_CUDA_ARCHS": "90"})


def test_cuda_device_refused_without_cuda_kernels() -> None:
    from mlxq.integrations.quantizer import MLXHfQuantizer

    quantizer = MLXHfQuantizer(mlxq.MLXQuantConfig())
    if _cuda_skip_reason() is None:
        quantizer.validate_environment(device_map="cuda")  # accepted
    else:
        with pytest.raises(ValueError, match="device 'cuda' in device_map is not supported"):
            quantizer.validate_environment(device_map="cuda")


# --- ops vs the CPU op -----------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_quantize_bit_exact(gen, bits: int, group_size: int, dtype: torch.dtype) -> None:
    w = random_weight((37, 3 * 128), dtype, gen)
    want = mlxq.affine_quantize(w, group_size, bits)
    got = [t.cpu() for t in mlxq.affine_quantize(w.cuda(), group_size, bits)]
    assert got[0].dtype == torch.uint32 and got[1].dtype == dtype
    assert torch.equal(got[0].view(torch.int32), want[0].view(torch.int32))
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_dequantize(gen, bits: int, group_size: int, dtype: torch.dtype) -> None:
    wq, s, b = _quantized(gen, 37, 3 * 128, group_size, bits, dtype)
    want = mlxq.affine_dequantize(wq, s, b, group_size, bits)
    got = mlxq.affine_dequantize(wq.cuda(), s.cuda(), b.cuda(), group_size, bits).cpu()
    assert got.dtype == dtype and got.shape == want.shape
    # fp32 s*q+b with one FMA (the CPU kernels' too, where the CPU has FMA), then one rounding
    torch.testing.assert_close(got, want, rtol=2 * EPS[dtype], atol=0)
    # int32 packed weights are the same bits; leading dimensions are kept
    got3 = mlxq.affine_dequantize(
        wq.view(torch.int32).cuda().reshape(1, 37, -1),
        s.cuda()[None],
        b.cuda()[None],
        group_size,
        bits,
    )
    assert torch.equal(got3.cpu()[0], got)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_matmul_all_formats(gen, bits: int, group_size: int, dtype: torch.dtype) -> None:
    wq, s, b = _quantized(gen, 37, 3 * 128, group_size, bits, dtype)
    for m in (1, 2, 3, 5, 8, 9, 16, 64):  # every decode width, then the cuBLAS path
        x = torch.randn(m, 3 * 128, generator=gen).to(dtype)
        _check_matmul(x, wq, s, b, group_size, bits)
    for m in (1, 40):  # x @ W
        x = torch.randn(m, 37, generator=gen).to(dtype)
        _check_matmul(x, wq, s, b, group_size, bits, transpose=False)


@needs_cuda
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("m", [1, 4, 16, 100])
def test_matmul_long_rows(gen, bits: int, m: int) -> None:
    # K = 5120: 160 chunks per row, more than one unrolled round of every lane, with a tail
    wq, s, b = _quantized(gen, 301, 5120, 64, bits, torch.bfloat16)
    x = torch.randn(m, 5120, generator=gen).bfloat16()
    _check_matmul(x, wq, s, b, 64, bits)
    _check_matmul(x.float(), wq, s.float(), b.float(), 64, bits)


def _wide_range_x(gen, m, k, dtype):
    """x whose values span 2^80 (bf16) or fp16's normal range within every 128 of them: the
    streaming kernel's fp16 products scale x per span of 128 by a power of two (Prod in
    csrc/cuda/qmv_stream.cuh)."""
    lo, hi = (-40, 40) if dtype == torch.bfloat16 else (-14, 6)
    e = torch.randint(lo, hi, (m, k), generator=gen).float()
    return (torch.randn(m, k, generator=gen) * torch.exp2(e)).to(dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("kernel", ["cores", "mma", "stream"])
def test_decode_kernels(gen, group_size: int, dtype: torch.dtype, kernel: str, monkeypatch) -> None:
    # every decode kernel (the op reads MLXQ_CUDA_DECODE on every call; "stream", the default for
    # M <= 2, runs once a pair of rows above); few rows and a long K: the streaming tensor-core
    # kernels split K over up to 8 warps of a block (summed in shared memory); 40 rows leave a
    # partial 16-row tile, K = 576 a partial 128-value span
    monkeypatch.setenv("MLXQ_CUDA_DECODE", kernel)
    monkeypatch.setenv("MLXQ_CUDA_BULK", "0")  # the ring below; test_decode_kernels_bulk has bulk
    wq, s, b = _quantized(gen, 40, 8192, group_size, 4, dtype)
    for m in range(1, DECODE_MAX_ROWS + 1):
        _check_matmul(torch.randn(m, 8192, generator=gen).to(dtype), wq, s, b, group_size, 4)
    wq, s, b = _quantized(gen, 300, 1024, group_size, 4, dtype)
    for m in (1, 3, 8):
        _check_matmul(torch.randn(m, 1024, generator=gen).to(dtype), wq, s, b, group_size, 4)
    if group_size < 128:  # SmolLM2's width: 4.5 spans of 128 values
        wq, s, b = _quantized(gen, 77, 576, group_size, 4, dtype)
        for m in (1, 2):
            _check_matmul(torch.randn(m, 576, generator=gen).to(dtype), wq, s, b, group_size, 4)
    if kernel == "stream":
        wq, s, b = _quantized(gen, 64, 1024, group_size, 4, dtype)
        for m in (1, 2):
            _check_matmul(_wide_range_x(gen, m, 1024, dtype), wq, s, b, group_size, 4)
    if kernel == "stream":  # the register variant's steps of 4 spans (2 are the default)
        monkeypatch.setenv("MLXQ_CUDA_REGS_SPANS", "4")
        wq, s, b = _quantized(gen, 300, 1024, group_size, 4, dtype)
        for m in (1, 2):
            _check_matmul(torch.randn(m, 1024, generator=gen).to(dtype), wq, s, b, group_size, 4)
        monkeypatch.delenv("MLXQ_CUDA_REGS_SPANS")
    if kernel == "stream":  # more 16-row tiles than warp slots: the shared-memory ring variant,
        # in blocks of 8 warps and (enough tiles for 3/4 of the multiprocessors) of 16
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        k = 640 if group_size == 128 else 576
        for n in (16 * 8 * sms + 40, 16 * 12 * sms + 40):
            wq, s, b = _quantized(gen, n, k, group_size, 4, dtype)
            for m in (1, 2):
                _check_matmul(torch.randn(m, k, generator=gen).to(dtype), wq, s, b, group_size, 4)
            _check_matmul(_wide_range_x(gen, 1, k, dtype), wq, s, b, group_size, 4)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("tiles", [None, "reach_off", "1"])
def test_decode_kernels_bulk(
    gen, group_size: int, dtype: torch.dtype, tiles: str | None, monkeypatch
) -> None:
    # the bulk-copy decode kernel (the default, MLXQ_CUDA_BULK=0 turns it off; csrc/cuda/
    # qmv_bulk.cuh; sm_90a builds on compute capability 9.0, elsewhere the ring): tiles for 3
    # blocks a multiprocessor and a few more (uneven tiles a block), K of one short piece of
    # 4096 values (fewer pieces a tile than groups of warps) and of a whole and a short one,
    # M = 1, 2, x over a wide range (its fp16 products); tiles for 1-2 blocks a multiprocessor
    # with K of 2 pieces and a short one (the default reaches it; MLXQ_CUDA_DECODE_SMALL=0 leaves
    # it to the register kernel), and with K of at most 2 pieces where MLXQ_CUDA_BULK_TILES=1
    # takes it down to 1 tile a multiprocessor
    monkeypatch.delenv("MLXQ_CUDA_BULK", raising=False)
    monkeypatch.delenv("MLXQ_CUDA_BULK_TILES", raising=False)
    monkeypatch.delenv("MLXQ_CUDA_DECODE_SMALL", raising=False)
    # M = 3, 4 as two launches of this kernel (a pair of rows each), whatever the layer's size
    monkeypatch.setenv("MLXQ_CUDA_DECODE_PAIRS_MAX", "4")
    if tiles == "reach_off":
        monkeypatch.setenv("MLXQ_CUDA_DECODE_SMALL", "0")
    elif tiles is not None:
        monkeypatch.setenv("MLXQ_CUDA_BULK_TILES", tiles)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    reach = (16 * sms + 16 * 5, 2 * 4096 + 512)
    cases = [(16 * 3 * sms + 16 * 5, k) for k in (3072, 5120)]
    if tiles == "reach_off":
        cases = [reach]
    else:
        cases += [(16 * sms + 16 * 5, 3072), (16 * 2 * sms - 16, 5120)]
        if tiles is None:
            cases.append(reach)
    for n, k in cases:
        wq, s, b = _quantized(gen, n, k, group_size, 4, dtype)
        for m in (1, 2, 3, 4):
            _check_matmul(torch.randn(m, k, generator=gen).to(dtype), wq, s, b, group_size, 4)
        _check_matmul(_wide_range_x(gen, 1, k, dtype), wq, s, b, group_size, 4)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", [2, 3, 5, 6])
@pytest.mark.parametrize("kernel", ["cores", "default", "lowbit_off"])
def test_decode_kernels_lowbit(gen, bits: int, group_size: int, dtype, kernel: str, monkeypatch):
    # the 2/3/5/6-bit decode: the tensor-core kernel (csrc/cuda/qmv_lowbit.cuh, the default;
    # M <= 2, 5 bits at M = 2 only, scales in x's dtype) and the CUDA-core one (MLXQ_CUDA_LOWBIT=0,
    # or MLXQ_CUDA_DECODE=cores whatever MLXQ_CUDA_LOWBIT says); K split
    # over a block's warps (few rows, long K), a partial 16-row tile, partial 128-value spans
    # (K = 576; group 128 has none), more tiles than warp slots, x over a wide range, and M past 2
    # (the CUDA-core kernel)
    monkeypatch.delenv("MLXQ_CUDA_DECODE", raising=False)
    monkeypatch.delenv("MLXQ_CUDA_LOWBIT", raising=False)
    if kernel == "cores":
        monkeypatch.setenv("MLXQ_CUDA_DECODE", "cores")
        monkeypatch.setenv("MLXQ_CUDA_LOWBIT", "1")
    elif kernel == "lowbit_off":
        monkeypatch.setenv("MLXQ_CUDA_LOWBIT", "0")
    wq, s, b = _quantized(gen, 40, 8192, group_size, bits, dtype)
    for m in (1, 2, 3):
        _check_matmul(torch.randn(m, 8192, generator=gen).to(dtype), wq, s, b, group_size, bits)
    _check_matmul(_wide_range_x(gen, 2, 8192, dtype), wq, s, b, group_size, bits)
    k = 576 if group_size < 128 else 640
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for n in (77, 16 * 16 * sms + 40):
        wq, s, b = _quantized(gen, n, k, group_size, bits, dtype)
        for m in (1, 2):
            _check_matmul(torch.randn(m, k, generator=gen).to(dtype), wq, s, b, group_size, bits)
    # scales in another dtype than x: the CUDA-core kernel
    _check_matmul(
        torch.randn(1, k, generator=gen).to(dtype), wq, s.float(), b.float(), group_size, bits
    )


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize(
    "fused",
    [
        "2",
        "2:64",
        "2:128",
        "2:128x2",
        "2:128w4",
        "2:256",
        "2:256:0",
        "2:256:1",
        "2:256:2",
        "2:256:3:52",
        "2:256:2:52",
        "2:256:3:43l",
        "2:256:3:43lt",
        "2:256:3:p",
        "2:256:2:p",
        "0",
    ],
)
def test_prefill_tiles_and_tails(
    gen, group_size: int, dtype: torch.dtype, fused: str, monkeypatch
) -> None:
    # 4-bit prefill with scales in the dtype of x: the fused Hopper kernel where it is built
    # (forced with MLXQ_CUDA_GEMM=2: by default it runs only where its blocks fill the GPU;
    # tiles of 128 or 256 rows of W by 64, 128 or 256 rows of x, partial in both; every shape of
    # MLXQ_CUDA_GEMM_TILE; for 256 the warp-specialized kernel, MLXQ_CUDA_GEMM_WS 1-3: whole
    # tiles, half tiles, its default rule, with the rings of MLXQ_CUDA_GEMM_WS_RING: 52, 43l
    # (packed pairs), the default 43lt (scales and biases by TMA), the persistent kernel with
    # packed pairs (p); 0 the register-A kernel), and the cuBLAS tiles (MLXQ_CUDA_GEMM=0); the op
    # reads the variables on every call. N = 300 writes y element by element, N = 264 in
    # 16-byte vectors.
    gemm, _, rest = fused.partition(":")
    tile, _, rest = rest.partition(":")
    ws, _, ring = rest.partition(":")
    monkeypatch.setenv("MLXQ_CUDA_GEMM", gemm)
    monkeypatch.setenv("MLXQ_CUDA_GEMM_TILE", tile)
    monkeypatch.setenv("MLXQ_CUDA_GEMM_WS", ws)
    monkeypatch.setenv("MLXQ_CUDA_GEMM_WS_RING", ring)
    for n in (300, 264):
        wq, s, b = _quantized(gen, n, 1024, group_size, 4, dtype)
        for m in (9, 65, 128, 129, 300, 513):
            x = torch.randn(m, 1024, generator=gen).to(dtype)
            _check_matmul(x, wq, s, b, group_size, 4)
    # few tiles with a long K: the fused kernel splits each tile's K over blocks and sums the
    # parts' fp32 tiles
    wq, s, b = _quantized(gen, 200, 8192, group_size, 4, dtype)
    for m in (9, 300):
        _check_matmul(torch.randn(m, 8192, generator=gen).to(dtype), wq, s, b, group_size, 4)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", GROUPS)
def test_prefill_ws_rings_agree(gen, group_size: int, dtype: torch.dtype, monkeypatch) -> None:
    # the warp-specialized kernel's rings (MLXQ_CUDA_GEMM_WS_RING) change how many stages are
    # loaded and dequantized ahead, whether a block keeps running over several tiles (the
    # persistent p and pt) and where the scales and biases come from (packed pairs, or their
    # arrays by TMA: 43lt and pt), never the products or their order: all give
    # the same y bit for bit (whole tiles and the half-tile last wave)
    monkeypatch.setenv("MLXQ_CUDA_GEMM", "2")
    monkeypatch.setenv("MLXQ_CUDA_GEMM_TILE", "256")
    wq, s, b = _quantized(gen, 264, 2048, group_size, 4, dtype)
    x = torch.randn(513, 2048, generator=gen).to(dtype)
    args = (x.cuda(), wq.cuda(), s.cuda(), b.cuda(), group_size, 4)
    for ws in ("1", "2"):
        monkeypatch.setenv("MLXQ_CUDA_GEMM_WS", ws)
        monkeypatch.setenv("MLXQ_CUDA_GEMM_WS_RING", "52")
        ref = mlxq.affine_matmul(*args)
        for ring in ("43l", "43lt", "p", "pt", "p:2", "pt:2", "pt:5"):
            # p:2: the persistent kernel on 2 CTAs, which then run 5-9 tiles each
            ring, _, grid = ring.partition(":")
            monkeypatch.setenv("MLXQ_CUDA_GEMM_WS_RING", ring)
            monkeypatch.setenv("MLXQ_CUDA_GEMM_WSP_GRID", grid)
            assert torch.equal(mlxq.affine_matmul(*args), ref), (ws, ring, grid)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", ["1", "2", "3", "3:43l", "3:p"])
def test_prefill_ragged_rows(gen, dtype: torch.dtype, fused: str, monkeypatch) -> None:
    # the warp-specialized kernel runs the last 1-128 rows of x past a multiple of 256 as one
    # half tile a row of W tiles (GemmParams::ragged; not for the persistent ring p), never
    # other products or another order: y bit for bit as with MLXQ_CUDA_GEMM_WS_RAGGED=0 (those
    # rows in whole tiles), for whole tiles, half tiles and the default rule; M = 385 is one row
    # past the rule (129 rows: a whole tile either way); one M against the float64 oracle
    ws, _, ring = fused.partition(":")
    monkeypatch.setenv("MLXQ_CUDA_GEMM", "2")
    monkeypatch.setenv("MLXQ_CUDA_GEMM_TILE", "256")
    monkeypatch.setenv("MLXQ_CUDA_GEMM_WS", ws)
    monkeypatch.setenv("MLXQ_CUDA_GEMM_WS_RING", ring)
    wq, s, b = _quantized(gen, 264, 2048, 64, 4, dtype)
    args = (wq.cuda(), s.cuda(), b.cuda(), 64, 4)
    for m in (257, 300, 384, 385, 513, 640):
        x = torch.randn(m, 2048, generator=gen).to(dtype).cuda()
        monkeypatch.setenv("MLXQ_CUDA_GEMM_WS_RAGGED", "0")
        ref = mlxq.affine_matmul(x, *args)
        monkeypatch.setenv("MLXQ_CUDA_GEMM_WS_RAGGED", "1")
        assert torch.equal(mlxq.affine_matmul(x, *args), ref), m
    _check_matmul(torch.randn(300, 2048, generator=gen).to(dtype), wq, s, b, 64, 4)


@needs_cuda
@pytest.mark.parametrize("ws", ["0", "3"])
def test_prefill_pairs_any_alignment(gen, ws: str, monkeypatch) -> None:
    # the (scale, bias) pairs the fused kernels read are packed 8 at a time from 16-byte aligned
    # arrays and one at a time otherwise, with a tail where N * G is not a multiple of 8 (G = 9):
    # scales and biases starting 2 bytes off alignment give the same y bit for bit
    monkeypatch.setenv("MLXQ_CUDA_GEMM", "2")
    monkeypatch.setenv("MLXQ_CUDA_GEMM_TILE", "256")
    monkeypatch.setenv("MLXQ_CUDA_GEMM_WS", ws)
    wq, s, b = _quantized(gen, 301, 576, 64, 4, torch.bfloat16)
    x = torch.randn(300, 576, generator=gen).bfloat16().cuda()
    wq, s, b = wq.cuda(), s.cuda(), b.cuda()
    _check_matmul(x.cpu(), wq.cpu(), s.cpu(), b.cpu(), 64, 4)

    def off(t: torch.Tensor) -> torch.Tensor:  # the same values at an odd element offset
        flat = torch.cat([t.new_zeros(1), t.flatten()])
        return flat[1:].view(t.shape)

    assert off(s).data_ptr() % 16 != 0
    ref = mlxq.affine_matmul(x, wq, s, b, 64, 4)
    assert torch.equal(mlxq.affine_matmul(x, wq, off(s), off(b), 64, 4), ref)


@needs_cuda
@pytest.mark.parametrize("ws", ["0", "3:43l", "3", "3:43lt"])
def test_prefill_sb_cache(gen, ws: str, monkeypatch) -> None:
    # MLXQ_CUDA_GEMM_SB_CACHE keeps the fused prefill's (scale, bias) pairs per weight: y bit for
    # bit as when they are packed on every call; an in-place change of the scales or biases is
    # repacked; weights that share a storage at other offsets (batched weights) keep their own
    # pairs; mode 1 leaves graph captures packing inside the graph (a change before a replay
    # reaches it), mode 2 lets a graph read the cached pairs as they were packed. The
    # warp-specialized kernel (ws 3) with its default ring, 43lt, reads the scales and biases
    # themselves: nothing is cached, and a graph's replay reads them as they are then.
    ws, _, ring = ws.partition(":")
    reads_arrays = ws == "3" and ring in ("", "43lt")
    monkeypatch.setenv("MLXQ_CUDA_GEMM", "2")
    monkeypatch.setenv("MLXQ_CUDA_GEMM_TILE", "256")
    monkeypatch.setenv("MLXQ_CUDA_GEMM_WS", ws)
    monkeypatch.setenv("MLXQ_CUDA_GEMM_WS_RING", ring)
    wq, s, b = (t.cuda() for t in _quantized(gen, 264, 2048, 64, 4, torch.bfloat16))
    x = torch.randn(300, 2048, generator=gen).bfloat16().cuda()

    def run(mode: str, *w) -> torch.Tensor:
        monkeypatch.setenv("MLXQ_CUDA_GEMM_SB_CACHE", mode)
        return mlxq.affine_matmul(x, *(w or (wq, s, b)), 64, 4)

    ref = run("0")
    assert torch.equal(run("1"), ref) and torch.equal(run("1"), ref)  # packed, then cached
    with torch.no_grad():
        s.mul_(1.5)
        b.add_(0.25)
    ref2 = run("0")
    assert not torch.equal(ref2, ref)
    assert torch.equal(run("1"), ref2)
    # two weights in one storage (a stacked weight's entries): their own pairs each
    ws3, ss3, bs3 = torch.stack([wq, wq.flip(0)]), torch.stack([s, s.flip(0)]), torch.stack([b, b])
    want = [run("0", ws3[i], ss3[i], bs3[i]) for i in range(2)]
    for _ in range(2):
        assert all(torch.equal(run("1", ws3[i], ss3[i], bs3[i]), want[i]) for i in range(2))

    def capture(mode: str):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run(mode)  # warm up (mode 2: the pairs cached before the capture)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                out = run(mode)
        torch.cuda.current_stream().wait_stream(side)
        return graph, out

    for mode in ("1", "2"):
        before = run("0")
        graph, out = capture(mode)
        with torch.no_grad():
            s.mul_(0.5)
        after = run("0")
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, after if mode == "1" or reads_arrays else before), mode
        assert torch.equal(run(mode), after), mode  # eager calls repack


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", GROUPS)
def test_prefill_stream_k(gen, group_size: int, dtype: torch.dtype, monkeypatch) -> None:
    # the stream-K form of the fused kernel (MLXQ_CUDA_GEMM_SK=2 forces it wherever there are
    # two 256 x 128 tiles or more): every block takes an equal share of all tiles' stages of K,
    # so tiles are cut anywhere in K (here into many small pieces: 16 to 128 stages a tile over
    # one block per multiprocessor) and summed in the order of K by their last piece; the result
    # does not depend on which block finishes last, so two calls agree bit for bit
    monkeypatch.setenv("MLXQ_CUDA_GEMM", "2")
    monkeypatch.setenv("MLXQ_CUDA_GEMM_TILE", "256")
    monkeypatch.setenv("MLXQ_CUDA_GEMM_SK", "2")
    for n, k in ((300, 1024), (264, 8192)):
        wq, s, b = _quantized(gen, n, k, group_size, 4, dtype)
        for m in (129, 513):
            x = torch.randn(m, k, generator=gen).to(dtype)
            _check_matmul(x, wq, s, b, group_size, 4)
            args = (x.cuda(), wq.cuda(), s.cuda(), b.cuda(), group_size, 4)
            assert torch.equal(mlxq.affine_matmul(*args), mlxq.affine_matmul(*args))


@needs_cuda
def test_matmul_mixed_dtypes_layouts_and_batches(gen) -> None:
    wq, s, b = _quantized(gen, 64, 256, 32, 4, torch.float16)
    # bf16 x with fp16 scales; x with leading dimensions
    _check_matmul(torch.randn(2, 3, 256, generator=gen).bfloat16(), wq, s, b, 32, 4)
    # a view that starts off 16-byte alignment, and a transposed one
    big = torch.randn(5, 257, generator=gen)
    _check_matmul(big[:, 1:], wq, s.float(), b.float(), 32, 4)
    xt = torch.randn(256, 6, generator=gen).t()
    _check_matmul(xt, wq, s, b, 32, 4)
    # batched weights broadcast against batched x: [3, 1] x [2] -> [3, 2]
    wqs, ss, bs = (torch.stack([t, t.flip(0)]) for t in (wq, s, b))
    for m in (1, 20):
        x = torch.randn(3, 1, m, 256, generator=gen).half()
        _check_matmul(x, wqs, ss, bs, 32, 4)
        _check_matmul(x[..., :64], wqs, ss, bs, 32, 4, transpose=False)


@needs_cuda
def test_errors_and_empty(gen) -> None:
    wq, s, b = (t.cuda() for t in _quantized(gen, 8, 64, 32, 4, torch.float32))
    with pytest.raises(ValueError, match="one device, got x on cpu, wq on cuda"):
        mlxq.affine_matmul(torch.randn(1, 64), wq, s, b, 32, 4)
    with pytest.raises(ValueError, match="must equal 64"):
        mlxq.affine_matmul(torch.randn(1, 32, device="cuda"), wq, s, b, 32, 4)
    with pytest.raises(ValueError, match="group_size"):
        mlxq.affine_quantize(torch.randn(4, 64, device="cuda"), 16, 4)
    empty = mlxq.affine_matmul(torch.randn(0, 64, device="cuda"), wq, s, b, 32, 4)
    assert empty.shape == (0, 8) and empty.is_cuda


@needs_cuda
def test_streams_and_cuda_graphs(gen) -> None:
    wq, s, b = (t.cuda() for t in _quantized(gen, 512, 1024, 64, 4, torch.bfloat16))
    x = torch.randn(4, 1024, generator=gen).bfloat16().cuda()
    want = {m: mlxq.affine_matmul(x[:m], wq, s, b, 64, 4) for m in (1, 4)}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on the side stream, then capture there
        for m in (1, 4):
            mlxq.affine_matmul(x[:m], wq, s, b, 64, 4)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            out = {m: mlxq.affine_matmul(x[:m], wq, s, b, 64, 4) for m in (1, 4)}
    torch.cuda.current_stream().wait_stream(side)
    x.mul_(-1)  # the graph reads x again when replayed
    graph.replay()
    torch.cuda.synchronize()
    for m in (1, 4):
        assert torch.equal(out[m], -want[m])


# --- a tiny model on CUDA vs the CPU ---------------------------------------------------------


def _tiny_checkpoint(tmp_path: Path) -> Path:
    """A tiny Llama with random weights, quantized (4 bits, group 64) and saved as MLX."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the init, so that logits differ clearly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    mlxq.quantize_model(model, bits=4, group_size=64)
    out = tmp_path / "tiny-mlx"
    model.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    return out


@needs_cuda
def test_tiny_model_on_cuda_matches_cpu(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = _tiny_checkpoint(tmp_path)
    kw = dict(dtype=torch.float32)
    cpu = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **kw)
    gpu = AutoModelForCausalLM.from_pretrained(path, device_map="cuda", **kw)
    assert gpu.model.layers[0].mlp.up_proj.weight.is_cuda
    # 24 tokens: the prefill goes through the cuBLAS path (M > 16), decoding through qmv
    prompt = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = cpu(prompt).logits
        got = gpu(prompt.cuda()).logits.cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    gen = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    with torch.no_grad():
        tokens_cpu = cpu.generate(prompt, attention_mask=torch.ones_like(prompt), **gen)
        tokens_gpu = gpu.generate(
            prompt.cuda(), attention_mask=torch.ones_like(prompt).cuda(), **gen
        ).cpu()
    assert torch.equal(tokens_gpu, tokens_cpu)
    # bf16 on the GPU stays close to the fp32 CPU logits (decode and prefill paths)
    gpu16 = AutoModelForCausalLM.from_pretrained(path, device_map="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got16 = gpu16(prompt.cuda()).logits.float().cpu()
    assert float((got16 - want).abs().max()) < 0.05 * float(want.abs().max())


# --- the composite kernels (csrc/composite/): float modes and gathers vs the CPU op ------------

FP_MODES = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
FP_CASES = [("mxfp4", None), ("nvfp4", None), ("nvfp4", 0.37), ("mxfp8", None)]
FP_IDS = [m if g is None else f"{m}-gs{g}" for m, g in FP_CASES]


def _same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal bit patterns where `want` is a number (so -0.0 is not 0.0), NaN where it is NaN."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if got.is_floating_point():
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan), f"{what}: NaN positions differ"
        ints = {2: torch.int16, 4: torch.int32}[want.element_size()]
        got, want = got.view(ints)[~nan], want.view(ints)[~nan]
    elif got.dtype == torch.uint32:
        got, want = got.view(torch.int32), want.view(torch.int32)
    assert torch.equal(got, want), f"{what}: {int((got != want).sum())} elements differ"


def _fp_weight(gen, shape, dtype) -> torch.Tensor:
    """Rows of very different magnitudes, a zero group, values on FP4/FP8 ties and past 448."""
    w = torch.randn(shape, generator=gen) * torch.logspace(-5, 3, shape[-2])[:, None]
    w[..., 0, :32] = 0.0
    w[..., 1, :8] = torch.tensor([0.25, 0.75, 2.5, 5.0, 448.0, 464.0, -500.0, -1e-3])
    return w.to(dtype)


def _gs(global_scale: float | None) -> torch.Tensor | None:
    return None if global_scale is None else torch.tensor(global_scale, dtype=torch.float32)


def _cuda(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cuda()


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,global_scale", FP_CASES, ids=FP_IDS)
def test_fp_quantize_dequantize_bit_exact(gen, mode: str, global_scale, dtype) -> None:
    group, bits = FP_MODES[mode]
    g = _gs(global_scale)
    w = _fp_weight(gen, (37, 4 * 64), dtype)
    want = mlxq.quantize(w, mode=mode, global_scale=g)
    got = [t.cpu() for t in mlxq.quantize(w.cuda(), mode=mode, global_scale=_cuda(g))]
    _same_bits(got[0], want[0], "wq")
    _same_bits(got[1], want[1], "scales")
    # dequantize: random words (every code, NaN codes too) with every scale byte
    wq = torch.randint(-(2**31), 2**31, (256, 4 * group * bits // 32), generator=gen)
    wq = wq.to(torch.int32).view(torch.uint32)
    s = torch.arange(256 * 4).remainder(256).to(torch.uint8).reshape(256, 4)
    for out in (None, *DTYPES):
        want = mlxq.dequantize(wq, s, mode=mode, global_scale=g, dtype=out)
        got = mlxq.dequantize(wq.cuda(), s.cuda(), mode=mode, global_scale=_cuda(g), dtype=out)
        _same_bits(got.cpu(), want, f"dequantize to {out}")


def _check_fp_matmul(x, wq, s, mode, global_scale, transpose=True) -> None:
    group, bits = FP_MODES[mode]
    args = (None, transpose, group, bits, mode)
    y_gpu = mlxq.quantized_matmul(
        x.cuda(), wq.cuda(), s.cuda(), *args, global_scale=_cuda(global_scale)
    ).cpu()
    y_cpu = mlxq.quantized_matmul(x, wq, s, *args, global_scale=global_scale)
    assert y_gpu.dtype == x.dtype and y_gpu.shape == y_cpu.shape
    w = mlxq.dequantize(wq, s, mode=mode, global_scale=global_scale, dtype=torch.float32)
    w = w.double() if transpose else w.double().transpose(-1, -2)
    ref = x.double() @ w.transpose(-1, -2)
    bound = x.double().abs() @ w.abs().transpose(-1, -2)
    eps = EPS[x.dtype]
    m = x.shape[-2] if x.dim() >= 2 and wq.dim() > 2 else x.numel() // x.shape[-1]
    weight_eps = eps if m > DECODE_MAX_ROWS and x.dtype != torch.float32 else 0.0
    # exact fp32 weights (one rounding by nvfp4's global factor), fp32 sums in any order, the
    # output rounded once; above the decode width W rounded to the dtype of x for cuBLAS
    # fp16 outputs below 2^-14 are subnormal: their rounding error is absolute (up to 2^-25)
    tiny = 2.0**-25 if x.dtype == torch.float16 else 1e-30
    tol = (x.shape[-1] + 4) * 2.0**-24 * bound + eps * ref.abs() + weight_eps * bound + tiny
    # outputs past the dtype's range are infinite in both (fp16's 65504)
    over = y_cpu.isinf()
    assert torch.equal(y_gpu[over], y_cpu[over]), f"{mode} m={m}: overflows differ"
    err = (y_gpu.double() - ref).abs()[~over]
    assert bool((err <= tol[~over]).all()), (
        f"{mode} m={m}: max err/tol {float((err / tol[~over]).max()):.3g}"
    )
    assert bool(((y_gpu.double() - y_cpu.double()).abs()[~over] <= 2 * tol[~over]).all())


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,global_scale", FP_CASES, ids=FP_IDS)
def test_fp_matmul(gen, mode: str, global_scale, dtype) -> None:
    g = _gs(global_scale)
    wq, s = mlxq.quantize(random_weight((37, 3 * 128), dtype, gen), mode=mode, global_scale=g)
    for m in (1, 2, 8, 9, 64):  # fp32 weights up to the decode width, then the dtype of x
        _check_fp_matmul(torch.randn(m, 3 * 128, generator=gen).to(dtype), wq, s, mode, g)
    for m in (1, 40):
        _check_fp_matmul(torch.randn(m, 37, generator=gen).to(dtype), wq, s, mode, g, False)
    # batched weights broadcast against batched x: [3, 1] x [2] -> [3, 2]
    wqs, ss = torch.stack([wq, wq.flip(0)]), torch.stack([s, s.flip(0)])
    x = torch.randn(3, 1, 5, 3 * 128, generator=gen).to(dtype)
    _check_fp_matmul(x, wqs, ss, mode, None if global_scale is None else g)


@needs_cuda
def test_fp_matmul_in_cuda_graph(gen) -> None:
    wq, s = (t.cuda() for t in mlxq.quantize(torch.randn(256, 512, generator=gen), mode="nvfp4"))
    g = torch.tensor(2.5, device="cuda")
    x = torch.randn(4, 512, generator=gen).bfloat16().cuda()
    want = mlxq.quantized_matmul(x, wq, s, None, True, 16, 4, "nvfp4", global_scale=g)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        mlxq.quantized_matmul(x, wq, s, None, True, 16, 4, "nvfp4", global_scale=g)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            out = mlxq.quantized_matmul(x, wq, s, None, True, 16, 4, "nvfp4", global_scale=g)
    torch.cuda.current_stream().wait_stream(side)
    x.mul_(-1)
    graph.replay()
    torch.cuda.synchronize()
    # odd in x; cuBLAS may pick another algorithm under capture: one bf16 rounding apart
    torch.testing.assert_close(out, -want, rtol=2**-7, atol=2**-7 * float(want.abs().max()))


# --- the float-mode decode kernel (csrc/cuda/fp_qmv.cuh: x @ W.T, M <= 8, 2-D weights) --------


def _fp_decode_shapes(mode: str) -> list[tuple[int, int]]:
    """Odd N; K of one chunk, of a partial round of the 32 lanes, and 4096 + 32; nvfp4 with an
    odd number of groups per row (no whole 16-byte chunks: the composite op runs it)."""
    return [(37, 32), (67, 4096 + 32), (130, 288)] + ([(5, 48)] if mode == "nvfp4" else [])


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,global_scale", FP_CASES, ids=FP_IDS)
def test_fp_decode_kernel(gen, mode: str, global_scale, dtype) -> None:
    # every kernel width (M = 1, 2, 3 -> 4, 8) against float64 and the CPU op
    g = _gs(global_scale)
    for n, k in _fp_decode_shapes(mode):
        wq, s = mlxq.quantize(_fp_weight(gen, (n, k), dtype), mode=mode, global_scale=g)
        for m in (1, 2, 3, 8):
            _check_fp_matmul(torch.randn(m, k, generator=gen).to(dtype), wq, s, mode, g)
        _check_fp_matmul(torch.randn(k, generator=gen).to(dtype), wq, s, mode, g)  # 1-D x
        _check_fp_matmul(torch.randn(2, 4, k, generator=gen).to(dtype), wq, s, mode, g)


@needs_cuda
@pytest.mark.parametrize("mode,global_scale", FP_CASES, ids=FP_IDS)
def test_fp_decode_layouts_and_shapes(gen, mode: str, global_scale, monkeypatch) -> None:
    group, bits = FP_MODES[mode]
    g = _cuda(_gs(global_scale))
    wq, s = (t.cuda() for t in mlxq.quantize(torch.randn(67, 512, generator=gen), mode=mode))
    args = (wq, s, None, True, group, bits, mode)
    big = torch.randn(3, 513, generator=gen).bfloat16().cuda()
    x = big[:, 1:]  # not contiguous, not 16-byte aligned: the op copies it
    want = mlxq.quantized_matmul(x.contiguous(), *args, global_scale=g)
    assert torch.equal(mlxq.quantized_matmul(x, *args, global_scale=g), want)
    # the kernel's shapes (MLXQ_CUDA_FP_VARIANT, read on every call) split a row over the lanes
    # alike: the same sums in the same order, at M = 1 and M = 8
    for xm in (big[:1, 1:].contiguous(), big[:, 1:].repeat(3, 1)[:8].contiguous()):
        ys = []
        for v in "abcd":
            monkeypatch.setenv("MLXQ_CUDA_FP_VARIANT", v)
            ys.append(mlxq.quantized_matmul(xm, *args, global_scale=g))
        assert all(torch.equal(y, ys[0]) for y in ys)
    monkeypatch.delenv("MLXQ_CUDA_FP_VARIANT")
    # the composite (MLXQ_CUDA_FP_DECODE=composite) agrees within fp32 summation order
    monkeypatch.setenv("MLXQ_CUDA_FP_DECODE", "composite")
    other = mlxq.quantized_matmul(x.contiguous(), *args, global_scale=g)
    torch.testing.assert_close(other, want, rtol=2**-7, atol=1e-5 * float(want.abs().max()))
    # empty x: zeros of the output shape
    monkeypatch.delenv("MLXQ_CUDA_FP_DECODE")
    empty = mlxq.quantized_matmul(big[:0, 1:], *args, global_scale=g)
    assert empty.shape == (0, 67)


@needs_cuda
@pytest.mark.parametrize("mode", list(FP_MODES))
def test_fp_decode_special_values(gen, mode: str) -> None:
    # random words (every code, FP8 NaN codes included) and scale bytes from the subnormal 2^-127
    # to infinity (E8M0 255; E4M3 NaN): NaN where the CPU op has it, the finite outputs within
    # fp32 summation order of it (bytes <= 200 keep sums from overflowing). An infinite scale
    # makes its row non-finite in both: +-inf times the group's partial sum here, and NaN or
    # +-inf on the CPU, whose fp32 x is summed in three bf16 pieces (inf - inf is NaN)
    group, bits = FP_MODES[mode]
    n, k = 64, 8 * group
    wq = torch.randint(-(2**31), 2**31, (n, k * bits // 32), generator=gen)
    wq = wq.to(torch.int32).view(torch.uint32)
    if mode == "nvfp4":
        s = torch.randint(0, 256, (n, k // group), generator=gen).to(torch.uint8)
    else:
        s = torch.randint(0, 201, (n, k // group), generator=gen)
        s[::7, 0], s[::5, 1] = 255, 0
        s = s.to(torch.uint8)
    args = (None, True, group, bits, mode)
    for m in (1, 8):
        x = torch.randn(m, k, generator=gen)
        y_cpu = mlxq.quantized_matmul(x, wq, s, *args)
        y_gpu = mlxq.quantized_matmul(x.cuda(), wq.cuda(), s.cuda(), *args).cpu()
        inf_row = (s == 255).any(-1) if mode != "nvfp4" else torch.zeros(n, dtype=torch.bool)
        assert not bool(y_gpu[:, inf_row].isfinite().any())
        assert not bool(y_cpu[:, inf_row].isfinite().any())
        assert torch.equal(y_gpu[:, ~inf_row].isnan(), y_cpu[:, ~inf_row].isnan())
        assert not bool(y_cpu[:, ~inf_row].isinf().any())
        w = mlxq.dequantize(wq, s, mode=mode, dtype=torch.float32).double()
        w = torch.where(w.isfinite(), w, 0.0)
        bound = x.double().abs() @ w.abs().T
        fin = y_cpu.isfinite()
        tol = (k + 4) * 2.0**-24 * bound + 1e-30
        assert bool(((y_gpu.double() - y_cpu.double()).abs()[fin] <= 2 * tol[fin]).all())


@needs_cuda
@pytest.mark.parametrize("mode,m", [("mxfp4", 1), ("mxfp8", 8), ("nvfp4", 2)])
def test_fp_decode_in_cuda_graph(gen, mode: str, m: int) -> None:
    # launched on the current stream: captured in a graph, the replay is the eager result
    group, bits = FP_MODES[mode]
    wq, s = (t.cuda() for t in mlxq.quantize(torch.randn(300, 1024, generator=gen), mode=mode))
    x = torch.randn(m, 1024, generator=gen).half().cuda()
    want = mlxq.quantized_matmul(x, wq, s, None, True, group, bits, mode)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            out = mlxq.quantized_matmul(x, wq, s, None, True, group, bits, mode)
    torch.cuda.current_stream().wait_stream(side)
    x.mul_(-1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, -want)  # odd in x, one kernel, one summation order


def _pairs_reference(x, w, lhs, rhs, transpose):
    """float64 x[lhs[i]] @ W[rhs[i]](.T) and the same with absolute values, [*I, M, out]."""
    xb, wb = x.shape[:-2], w.shape[:-2]
    lhs = torch.arange(xb.numel()).reshape(xb) if lhs is None else lhs
    rhs = torch.arange(wb.numel()).reshape(wb) if rhs is None else rhs
    lhs, rhs = torch.broadcast_tensors(lhs.long(), rhs.long())
    xm = x.double().reshape(-1, *x.shape[-2:])[lhs.reshape(-1)]
    wm = w.double().reshape(-1, *w.shape[-2:])[rhs.reshape(-1)]
    wm = wm.transpose(-1, -2) if transpose else wm
    shape = (*lhs.shape, x.shape[-2], wm.shape[-1])
    return (xm @ wm).reshape(shape), (xm.abs() @ wm.abs()).reshape(shape)


GATHER_INDICES = [  # repeated and unsorted experts, broadcast index shapes, absent indices
    (torch.tensor([[0], [1], [2]]), torch.tensor([[3, 1], [1, 0], [3, 3]])),
    (torch.tensor([2, 0, 1, 0, 2, 2]), torch.tensor([3, 0, 3, 1, 2, 3])),
    (None, torch.tensor([[2], [0]])),
]


def _check_gather(y_gpu, y_cpu, x, w, lhs, rhs, transpose) -> None:
    assert y_gpu.dtype == x.dtype and y_gpu.shape == y_cpu.shape
    ref, bound = _pairs_reference(x, w, lhs, rhs, transpose)
    eps = EPS[x.dtype]
    weight_eps = eps if x.dtype != torch.float32 else 0.0  # any group may exceed the decode width
    tol = (x.shape[-1] + 4) * 2.0**-24 * bound + eps * ref.abs() + weight_eps * bound + 1e-30
    err = (y_gpu.double() - ref).abs()
    assert bool((err <= tol).all()), f"max err/tol {float((err / tol).max()):.3g}"
    assert bool(((y_gpu.double() - y_cpu.double()).abs() <= 2 * tol).all())


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["affine4", "affine3", "mxfp4", "nvfp4-gs", "mxfp8"])
def test_gather_matmul(gen, kind: str, dtype) -> None:
    e, n, k = 4, 40, 256
    w = random_weight((e, n, k), dtype, gen)
    if kind.startswith("affine"):
        bits, group = int(kind[-1]), 64
        wq, s, b = mlxq.affine_quantize(w, group, bits)
        wd = mlxq.affine_dequantize(wq, s.float(), b.float(), group, bits)
        operands, gs = (wq, s, b), None
    else:
        mode = kind.split("-")[0]
        group, bits = FP_MODES[mode]
        gs = (torch.rand(e, generator=gen) * 4 + 0.25).float() if kind.endswith("gs") else None
        parts = [mlxq.quantize(w[i], mode=mode, global_scale=_gs_i(gs, i)) for i in range(e)]
        wq, s = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
        wd = torch.stack(
            [
                mlxq.dequantize(
                    wq[i], s[i], mode=mode, global_scale=_gs_i(gs, i), dtype=torch.float32
                )
                for i in range(e)
            ]
        )
        operands = (wq, s, None)
    mode = "affine" if kind.startswith("affine") else kind.split("-")[0]
    for lhs, rhs in GATHER_INDICES:
        for m, transpose in ((1, True), (20, True), (3, False)):
            xb = (3,) if lhs is None or lhs.numel() <= 3 else (6,)
            x = torch.randn(*xb, m, k if transpose else n, generator=gen).to(dtype)
            kw = dict(transpose=transpose, group_size=group, bits=bits, mode=mode)
            y_cpu = mlxq.gather_quantized_matmul(x, *operands, lhs, rhs, global_scale=gs, **kw)
            cuda_ops = [_cuda(t) for t in (x, *operands, lhs, rhs)]
            y_gpu = mlxq.gather_quantized_matmul(*cuda_ops, global_scale=_cuda(gs), **kw).cpu()
            _check_gather(y_gpu, y_cpu, x, wd, lhs, rhs, transpose)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,global_scale", FP_CASES, ids=FP_IDS)
def test_fp_gather_decode_kernel(gen, mode: str, global_scale, dtype, monkeypatch) -> None:
    # the decode kernel's gather (one launch, each pair its own expert: M <= 8, few pairs)
    # against float64 and the CPU op; many pairs go to the composite (grouped by expert)
    group, bits = FP_MODES[mode]
    e, n, k = 5, 37, 320
    w = random_weight((e, n, k), torch.float32, gen)
    gs = None if global_scale is None else (torch.rand(e, generator=gen) * 4 + 0.25).float()
    parts = [mlxq.quantize(w[i], mode=mode, global_scale=_gs_i(gs, i)) for i in range(e)]
    wq, s = torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    wd = torch.stack(
        [
            mlxq.dequantize(wq[i], s[i], mode=mode, global_scale=_gs_i(gs, i), dtype=torch.float32)
            for i in range(e)
        ]
    )
    kw = dict(transpose=True, group_size=group, bits=bits, mode=mode)
    cases = [  # (x batch, M, lhs, rhs): repeated, unsorted experts; 70 pairs (the composite)
        ((3,), 1, torch.tensor([[0], [1], [2]]), torch.tensor([[4, 1], [1, 0], [4, 4]])),
        ((2,), 2, None, torch.tensor([[3], [0]])),
        ((6,), 8, torch.tensor([2, 0, 1, 5, 2, 3]), torch.tensor([3, 0, 3, 1, 2, 4])),
        ((1,), 1, torch.zeros(70, dtype=torch.long), torch.arange(70) % e),
    ]
    for xb, m, lhs, rhs in cases:
        x = torch.randn(*xb, m, k, generator=gen).to(dtype)
        y_cpu = mlxq.gather_quantized_matmul(x, wq, s, None, lhs, rhs, global_scale=gs, **kw)
        cuda_ops = [_cuda(t) for t in (x, wq, s, None, lhs, rhs)]
        y_gpu = mlxq.gather_quantized_matmul(*cuda_ops, global_scale=_cuda(gs), **kw)
        _check_gather(y_gpu.cpu(), y_cpu, x, wd, lhs, rhs, True)
        monkeypatch.setenv("MLXQ_CUDA_FP_DECODE", "composite")
        y_comp = mlxq.gather_quantized_matmul(*cuda_ops, global_scale=_cuda(gs), **kw)
        monkeypatch.delenv("MLXQ_CUDA_FP_DECODE")
        _check_gather(y_comp.cpu(), y_cpu, x, wd, lhs, rhs, True)


def _gs_i(gs: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if gs is None else gs[i]


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", GROUPS)
def test_one_bit_composite(gen, group_size: int, dtype: torch.dtype) -> None:
    # 1 bit has no CUDA kernel of its own: the composite ops (csrc/composite/) run it
    w = random_weight((37, 3 * 128), dtype, gen)
    want = mlxq.affine_quantize(w, group_size, 1)
    got = [t.cpu() for t in mlxq.affine_quantize(w.cuda(), group_size, 1)]
    for a, b, what in zip(got, want, ("wq", "scales", "biases"), strict=True):
        _same_bits(a, b, what)
    wq, s, b = want
    deq = mlxq.affine_dequantize(wq.cuda(), s.cuda(), b.cuda(), group_size, 1).cpu()
    _same_bits(deq, mlxq.affine_dequantize(wq, s, b, group_size, 1), "dequantize")
    for m in (1, 8, 9, 64):
        _check_matmul(torch.randn(m, 3 * 128, generator=gen).to(dtype), wq, s, b, group_size, 1)
    _check_matmul(torch.randn(3, 37, generator=gen).to(dtype), wq, s, b, group_size, 1, False)


def _tiny_float_mode_checkpoint(tmp_path: Path, arch: str, mode: str) -> Path:
    """A tiny random Llama or Qwen3-MoE (4 experts, 2 a token) quantized by mlxq in `mode` (the
    mode's own group size and bits; affine: 4 bits, group 64) and saved as an MLX checkpoint."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    if arch == "qwen3_moe":
        config = Qwen3MoeConfig(
            **common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128
        )
    else:
        config = LlamaConfig(**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than the init, so that logits differ clearly
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    mlxq.quantize_model(model, mode=mode)
    out = tmp_path / f"tiny-{arch}-{mode}"
    model.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["quantization"]["mode"] == mode
    return out


@needs_cuda
@pytest.mark.parametrize(
    "arch,mode", [("llama", "mxfp4"), ("qwen3_moe", "affine"), ("qwen3_moe", "mxfp4")]
)
def test_float_mode_and_moe_models_on_cuda_match_cpu(tmp_path: Path, arch: str, mode: str) -> None:
    # the float mode's matmuls and embedding, and the MoE experts' gathers, run the composite
    # kernels on the GPU: fp32 logits close to the CPU's and the CPU's greedy tokens
    from transformers import AutoModelForCausalLM

    path = _tiny_float_mode_checkpoint(tmp_path, arch, mode)
    cpu = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32)
    gpu = AutoModelForCausalLM.from_pretrained(path, device_map="cuda", dtype=torch.float32)
    prompt = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = cpu(prompt).logits
        got = gpu(prompt.cuda()).logits.cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    gen = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        tokens_cpu = cpu.generate(prompt, attention_mask=mask, **gen)
        tokens_gpu = gpu.generate(prompt.cuda(), attention_mask=mask.cuda(), **gen).cpu()
    assert torch.equal(tokens_gpu, tokens_cpu)


@needs_cuda
@pytest.mark.parametrize("M", [1, 3, 40])
def test_affine_matmul_many_on_cuda_is_affine_matmul(M: int) -> None:
    # no one-call kernel on CUDA: the composite loop, so exactly affine_matmul's outputs
    gen = torch.Generator().manual_seed(M)
    weights = []
    for n in (96, 33, 8):
        w, s, b = mlxq.affine_quantize(torch.randn(n, 256, generator=gen), 64, 4)
        weights.append((w.cuda(), s.bfloat16().cuda(), b.bfloat16().cuda()))
    x = torch.randn(M, 256, generator=gen).bfloat16().cuda()
    ws, ss, bs = (list(t) for t in zip(*weights, strict=True))
    outs = mlxq.ops.affine_matmul_many(x, ws, ss, bs, 64, 4)
    for out, w in zip(outs, weights, strict=True):
        assert out.device == x.device
        assert torch.equal(out, mlxq.affine_matmul(x, *w, 64, 4))


# --- affine gather: the decode kernel over its pairs, the composite otherwise -----------------


def _affine_experts(gen, e, n, k, group_size, bits, dtype):
    wq, s, b = mlxq.affine_quantize(random_weight((e, n, k), dtype, gen), group_size, bits)
    return wq, s, b, mlxq.affine_dequantize(wq, s.float(), b.float(), group_size, bits)


AFFINE_GATHER_CASES = [  # (x batch, lhs, rhs): repeated, unsorted experts; broadcast shapes
    ((3,), torch.tensor([[0], [1], [2]]), torch.tensor([[4, 1], [1, 0], [4, 4]])),
    ((2,), None, torch.tensor([[3], [0]])),
    ((6,), torch.tensor([2, 0, 1, 5, 2, 3]), torch.tensor([3, 0, 3, 1, 2, 4])),
    ((5,), None, None),  # MLX's defaults: x matrix i with expert i
    ((1,), torch.zeros(8, dtype=torch.long), torch.tensor([4, 4, 4, 0, 1, 4, 2, 3])),  # top-8
]


def _check_affine_gather(x, wq, s, b, wd, lhs, rhs, group_size, bits, monkeypatch, transpose=True):
    """The CUDA op (whichever path it takes) and the composite forced by MLXQ_CUDA_GATHER, each
    against float64 and the CPU op."""
    kw = dict(group_size=group_size, bits=bits, transpose=transpose)
    y_cpu = mlxq.affine_gather_matmul(x, wq, s, b, lhs, rhs, **kw)
    ops = [_cuda(t) for t in (x, wq, s, b, lhs, rhs)]
    y_gpu = mlxq.affine_gather_matmul(*ops, **kw)
    assert y_gpu.is_cuda
    _check_gather(y_gpu.cpu(), y_cpu, x, wd, lhs, rhs, transpose)
    monkeypatch.setenv("MLXQ_CUDA_GATHER", "composite")
    y_comp = mlxq.affine_gather_matmul(*ops, **kw)
    monkeypatch.delenv("MLXQ_CUDA_GATHER")
    _check_gather(y_comp.cpu(), y_cpu, x, wd, lhs, rhs, transpose)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_affine_gather_decode_kernel(gen, bits: int, group_size: int, dtype, monkeypatch) -> None:
    # M <= 8 and at most 64 pairs: one launch of the CUDA-core decode kernel, each pair (the
    # grid's y) streaming its own expert; every decode width on the first index case
    e, n, k = 5, 37, 384
    wq, s, b, wd = _affine_experts(gen, e, n, k, group_size, bits, dtype)
    for i, (xb, lhs, rhs) in enumerate(AFFINE_GATHER_CASES):
        for m in range(1, DECODE_MAX_ROWS + 1) if i == 0 else (1, 3, 8):
            x = torch.randn(*xb, m, k, generator=gen).to(dtype)
            _check_affine_gather(x, wq, s, b, wd, lhs, rhs, group_size, bits, monkeypatch)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_gather_composite_side_and_layouts(gen, dtype, monkeypatch) -> None:
    e, n, k = 6, 40, 256
    wq, s, b, wd = _affine_experts(gen, e, n, k, 64, 4, dtype)
    three, experts = torch.tensor([0, 1, 2]), torch.tensor([5, 0, 5])
    cases = [  # (x batch, M, lhs, rhs, transpose)
        ((1,), 1, torch.zeros(70, dtype=torch.long), torch.arange(70) % e, True),  # 70 pairs
        ((64,), 2, torch.arange(64), torch.arange(64) % e, True),  # 64 pairs: still the kernel
        ((3,), 9, three, experts, True),  # M past the decode width
        ((3,), 2, three, experts, False),  # x @ W
        ((3,), 1, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), True),
    ]
    for xb, m, lhs, rhs, transpose in cases:
        x = torch.randn(*xb, m, k if transpose else n, generator=gen).to(dtype)
        _check_affine_gather(x, wq, s, b, wd, lhs, rhs, 64, 4, monkeypatch, transpose)
    # x starting off 16-byte alignment, int32 packed words, scales of another dtype than x
    x = torch.randn(3, 1, k + 1, generator=gen).to(dtype)[..., 1:]
    other = torch.float16 if dtype != torch.float16 else torch.bfloat16
    s2, b2 = s.to(other), b.to(other)
    wd2 = mlxq.affine_dequantize(wq, s2.float(), b2.float(), 64, 4)
    _check_affine_gather(x, wq.view(torch.int32), s2, b2, wd2, three, experts, 64, 4, monkeypatch)
    # 1 bit: the composite
    wq1, s1, b1, wd1 = _affine_experts(gen, e, n, k, 32, 1, dtype)
    x = torch.randn(3, 2, k, generator=gen).to(dtype)
    _check_affine_gather(x, wq1, s1, b1, wd1, three, experts, 32, 1, monkeypatch)
    # the CPU op's argument errors
    with pytest.raises(IndexError, match="rhs_indices values must lie in"):
        mlxq.affine_gather_matmul(_cuda(x), *map(_cuda, (wq, s, b)), None, _cuda(experts + 1))


@needs_cuda
def test_affine_gather_decode_in_cuda_graph(gen) -> None:
    # absent indices (an arange, never read back); given ones: the next tests
    wq, s, b, _ = (t.cuda() for t in _affine_experts(gen, 8, 300, 1024, 64, 4, torch.bfloat16))
    x = torch.randn(1, 2, 1024, generator=gen).bfloat16().cuda()
    want = mlxq.affine_gather_matmul(x, wq, s, b, None, None, 64, 4)
    assert want.shape == (8, 2, 300)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            out = mlxq.affine_gather_matmul(x, wq, s, b, None, None, 64, 4)
    torch.cuda.current_stream().wait_stream(side)
    x.mul_(-1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, -want)  # odd in x, one kernel, one summation order


def _captured(fn):
    """fn() warmed up, then captured in a CUDA graph on a side stream: (graph, its outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return graph, out


@needs_cuda
def test_gather_with_router_indices_in_cuda_graph(gen) -> None:
    # MoE decode under CUDA graphs: given indices (a router's) are checked on the device while
    # the stream captures, so the capture succeeds, and a replay reads the indices of its time
    e, n, k = 8, 300, 1024
    wq, s, b, _ = (t.cuda() for t in _affine_experts(gen, e, n, k, 64, 4, torch.bfloat16))
    fq, fs = (
        t.cuda() for t in mlxq.quantize(random_weight((e, n, k), torch.float32, gen), mode="mxfp4")
    )
    x = torch.randn(2, 1, k, generator=gen).bfloat16().cuda()
    lhs = torch.tensor([0, 0, 0, 1, 1, 1]).cuda()
    rhs = torch.tensor([3, 1, 7, 0, 3, 5]).cuda()

    def step():
        return (
            mlxq.affine_gather_matmul(x, wq, s, b, lhs, rhs, 64, 4),
            torch.ops.mlxq.fp_gather_matmul(x, fq, fs, "mxfp4", 32, 4, lhs, rhs),
        )

    graph, out = _captured(step)
    for new in ([5, 5, 2, 6, 0, 7], [1, 2, 3, 4, 5, 6]):
        rhs.copy_(torch.tensor(new))
        x.normal_(generator=None)
        graph.replay()
        want = step()
        torch.cuda.synchronize()
        for got, wnt in zip(out, want, strict=True):
            assert torch.equal(got, wnt)  # the same kernel, its pairs read at replay


@needs_cuda
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_gather_paths_grouped_eagerly_in_cuda_graph(gen, dtype) -> None:
    # what eager calls group by expert (a device-to-host read of the experts) takes, while
    # captured, the decode kernel (more than 64 pairs at M <= 8) or the composite pair by pair
    # (M > 8, x @ W, 1 bit, float modes at M > 8): each replay against the CPU op
    e, n, k = 6, 40, 256
    wq, s, b, wd = _affine_experts(gen, e, n, k, 64, 4, dtype)
    wq1, s1, b1, wd1 = _affine_experts(gen, e, n, k, 32, 1, dtype)
    fq, fs = mlxq.quantize(random_weight((e, n, k), torch.float32, gen), mode="mxfp8")
    fd = torch.stack(
        [mlxq.dequantize(fq[i], fs[i], mode="mxfp8", dtype=torch.float32) for i in range(e)]
    )
    cases = [  # (name, x batch, M, pairs, transpose)
        ("affine", 1, 1, 70, True),
        ("affine", 3, 9, 3, True),
        ("affine", 3, 2, 3, False),
        ("affine1", 3, 2, 3, True),
        ("mxfp8", 3, 9, 4, True),
        ("mxfp8", 1, 1, 70, True),
    ]
    for name, xb, m, pairs, transpose in cases:
        x = torch.randn(xb, m, k if transpose else n, generator=gen).to(dtype)
        lhs = torch.randint(0, xb, (pairs,), generator=gen)
        rhs = torch.randint(0, e, (pairs,), generator=gen)
        if name == "mxfp8":
            ops, wdq = (fq, fs, None), fd
            kw = dict(mode="mxfp8", group_size=32, bits=8, transpose=transpose)
        else:
            ops, wdq = ((wq, s, b), wd) if name == "affine" else ((wq1, s1, b1), wd1)
            kw = dict(group_size=64 if name == "affine" else 32, bits=4 if name == "affine" else 1)
            kw.update(mode="affine", transpose=transpose)
        xc, lc, rc = x.cuda(), lhs.cuda(), rhs.cuda()
        opc = [_cuda(t) for t in ops]

        def step(xc=xc, lc=lc, rc=rc, opc=opc, kw=kw):
            return mlxq.gather_quantized_matmul(xc, *opc, lc, rc, **kw)

        graph, out = _captured(step)
        for _ in range(2):
            lhs = torch.randint(0, xb, (pairs,), generator=gen)
            rhs = torch.randint(0, e, (pairs,), generator=gen)
            lc.copy_(lhs)
            rc.copy_(rhs)
            graph.replay()
            torch.cuda.synchronize()
            y_cpu = mlxq.gather_quantized_matmul(x, *ops, lhs, rhs, **kw)
            _check_gather(out.cpu(), y_cpu, x, wdq, lhs, rhs, transpose)


@needs_cuda
def test_gather_index_errors_name_the_tensor(gen) -> None:
    # eager (not capturing): the host check's IndexError, on the kernel's and the composite's path
    wq, s, b, _ = (t.cuda() for t in _affine_experts(gen, 4, 40, 256, 64, 4, torch.float16))
    fq, fs = (
        t.cuda()
        for t in mlxq.quantize(random_weight((4, 40, 256), torch.float32, gen), mode="mxfp4")
    )
    for m in (1, 9):  # the decode kernel, the composite
        x = torch.randn(3, m, 256, generator=gen).half().cuda()
        ok, bad = torch.tensor([0, 1]).cuda(), torch.tensor([1, 4]).cuda()
        with pytest.raises(IndexError, match=r"rhs_indices values must lie in \[0, 4\)"):
            mlxq.affine_gather_matmul(x, wq, s, b, ok, bad, 64, 4)
        with pytest.raises(IndexError, match=r"lhs_indices values must lie in \[0, 3\)"):
            mlxq.affine_gather_matmul(x, wq, s, b, bad - 2, ok, 64, 4)
        with pytest.raises(IndexError, match=r"rhs_indices values must lie in \[0, 4\)"):
            torch.ops.mlxq.fp_gather_matmul(x, fq, fs, "mxfp4", 32, 4, ok, bad)


_DEVICE_ASSERT_SCRIPT = """
import torch, mlxq
wq, s, b = mlxq.affine_quantize(torch.randn(4, 64, 256).cuda(), 64, 4)
x = torch.randn(1, 1, 256).cuda()
rhs = torch.tensor([0, 3]).cuda()
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    mlxq.affine_gather_matmul(x, wq, s, b, None, rhs, 64, 4)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        y = mlxq.affine_gather_matmul(x, wq, s, b, None, rhs, 64, 4)
torch.cuda.current_stream().wait_stream(side)
graph.replay()
torch.cuda.synchronize()
print("in range: ran")
rhs.fill_(4)
try:
    graph.replay()
    torch.cuda.synchronize()
    print("out of range: no error")
except RuntimeError as err:
    print("out of range:", str(err).splitlines()[0])
"""


@needs_cuda
def test_captured_gather_checks_indices_on_the_device() -> None:
    # a replay with an index out of range stops the kernel with a device-side assert (as
    # torch's index kernels do) instead of reading outside wq; it ends the process's CUDA
    # context, hence a subprocess
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), *sys.path]))
    run = subprocess.run(
        [sys.executable, "-c", _DEVICE_ASSERT_SCRIPT],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert "in range: ran" in run.stdout, run.stdout + run.stderr
    # seen on an H200: "out of range: CUDA error: device-side assert triggered", and the
    # kernel's message on stderr
    out = run.stdout + run.stderr[-2000:]
    assert "out of range: CUDA error: device-side assert triggered" in run.stdout, out
    assert "lhs_indices or rhs_indices out of range" in run.stderr, out


# --- rms_norm, rotary_embedding (composites of ATen ops) and decode_attention on CUDA ----------


def _run_cuda(name, *args):
    moved = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    out = getattr(torch.ops.mlxq, name)(*moved)
    if isinstance(out, tuple):
        assert all(t.is_cuda for t in out)
        return tuple(t.cpu() for t in out)
    assert out.is_cuda
    return out.cpu()


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_ops_against_cpu_op(gen, dtype) -> None:
    layer_op_cases.check_rotary_embedding(_run_cuda, dtype, gen)  # bit for bit
    layer_op_cases.check_rms_norm(_run_cuda, dtype, gen)
    layer_op_cases.check_decode_attention(_run_cuda, dtype, gen)


@needs_cuda
def test_layer_ops_in_cuda_graph(gen) -> None:
    x = torch.randn(2, 5, 256, generator=gen).bfloat16().cuda()
    w = torch.randn(256, generator=gen).bfloat16().cuda()
    q = torch.randn(1, 4, 1, 64, generator=gen).bfloat16().cuda()
    kv = torch.randn(2, 1, 2, 50, 64, generator=gen).bfloat16().cuda()
    cos, sin = torch.randn(2, 1, 1, 64, generator=gen).bfloat16().cuda()
    mask = (torch.rand(1, 1, 1, 50, generator=gen) > 0.3).cuda()

    def step():
        qr, kr = torch.ops.mlxq.rotary_embedding(q, kv[0, :, :, :1], cos, sin)
        att = torch.ops.mlxq.decode_attention(qr, kv[0], kv[1], mask, None)
        return torch.ops.mlxq.rms_norm(x, w, 1e-6), kr, att

    want = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm up on the side stream
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            out = step()
    torch.cuda.current_stream().wait_stream(side)
    graph.replay()
    torch.cuda.synchronize()
    for g, wnt in zip(out, want, strict=True):
        assert torch.equal(g, wnt)


# --- decode_attention: the kernel (csrc/cuda/attention_cuda.cu) ----------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_kernel_shapes(gen, dtype) -> None:
    # the kernel's own cases against float64 (and the composite it replaced): many key splits
    # merged by the second kernel, a mask of another dtype than q, every register width of the
    # head dim, more query rows than one block takes, and a head dim above 256 (the composite)
    inf = float("-inf")
    cases = [  # (B, Hkv, Hq / Hkv, Lq, Lk, D, mask)
        (1, 2, 4, 1, 5000, 128, None),
        (2, 8, 4, 1, 4096, 128, "bool"),
        (1, 4, 2, 1, 1031, 64, "float16"),
        (3, 1, 1, 2, 777, 256, "bool"),
        (1, 2, 6, 3, 257, 16, "float32"),  # 18 rows per kv head: blocks of 8
        (1, 3, 1, 1, 40, 96, None),  # one split
        (1, 1, 2, 1, 300, 320, "bool"),  # D > 256: the composite
    ]
    for case in cases:
        B, hkv, rep, lq, lk, d, kind = case
        q = torch.randn(B, hkv * rep, lq, d, generator=gen).to(dtype)
        k = torch.randn(B, hkv, lk, d, generator=gen).to(dtype)
        v = torch.randn(B, hkv, lk, d, generator=gen).to(dtype)
        mask = None
        if kind == "bool":
            mask = torch.rand(B, hkv * rep, lq, lk, generator=gen) > 0.4
        elif kind is not None:
            add = torch.randn(B, 1, lq, lk, generator=gen)
            mask = add.masked_fill(add > 1.0, inf).to(getattr(torch, kind))
        scale = 0.9 / d**0.5
        ref, tol = attention_reference(q, k, v, mask, scale)
        got = _run_cuda("decode_attention", q, k, v, mask, scale)
        assert got.dtype == dtype and got.shape == q.shape
        assert_within(got, ref, tol, f"attention kernel {case} {dtype}")
        comp = mlxq._C.composite_decode_attention(*[_cuda(t) for t in (q, k, v, mask)], scale)
        assert_within(comp.cpu(), ref, tol, f"attention composite {case} {dtype}")


@needs_cuda
def test_decode_attention_static_cache_tail_is_not_read(gen) -> None:
    # a static cache: the bool mask attends the first 37 of 4096 positions; the rest holds NaN,
    # which the kernel never reads (as the CPU op, which narrows to the attended keys)
    q = torch.randn(2, 8, 1, 128, generator=gen).bfloat16()
    kv = torch.full((2, 2, 2, 4096, 128), float("nan")).bfloat16()
    kv[..., :37, :] = torch.randn(2, 2, 2, 37, 128, generator=gen).bfloat16()
    mask = torch.zeros(2, 1, 1, 4096, dtype=torch.bool)
    mask[..., :37] = True
    got = _run_cuda("decode_attention", q, kv[0], kv[1], mask, None)
    ref, tol = attention_reference(q, kv[0, :, :, :37], kv[1, :, :, :37], mask[..., :37], 128**-0.5)
    assert_within(got, ref, tol, "static cache")
    assert torch.equal(got, _run_cuda("decode_attention", q, kv[0], kv[1], mask, None))


@needs_cuda
def test_decode_attention_splits_in_cuda_graph(gen) -> None:
    # the two launches (splits, merge) and their workspace captured; replays read new queries
    q = torch.randn(1, 32, 1, 128, generator=gen).bfloat16().cuda()
    k = torch.randn(1, 8, 3000, 128, generator=gen).bfloat16().cuda()
    v = torch.randn(1, 8, 3000, 128, generator=gen).bfloat16().cuda()
    mask = (torch.rand(1, 1, 1, 3000, generator=gen) > 0.2).cuda()
    graph, out = _captured(lambda: torch.ops.mlxq.decode_attention(q, k, v, mask, None))
    for _ in range(2):
        q.normal_()
        graph.replay()
        want = torch.ops.mlxq.decode_attention(q, k, v, mask, None)
        torch.cuda.synchronize()
        assert torch.equal(out, want)
