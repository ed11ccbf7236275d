"""Shared by the Metal backend tests (test_metal_build, test_metal_launch, test_metal_runtime,
test_metal_backend_choice, test_mps_ops): operands, the launch cases and their checks."""

from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlxq
import pytest
import torch
from mlxq._native import _C
from mlxq.testing import metal_emulator as emu
from oracles import affine_quantize_ref, dequantize_ref, fp32_sum_eps

ROOT = Path(__file__).resolve().parents[1]
METAL_DIR = ROOT / "metal"
HAS_MPS = torch.backends.mps.is_available()
needs_emu = pytest.mark.skipif(not emu.available(), reason="no clang for the MSL emulator")
needs_mps = pytest.mark.skipif(not HAS_MPS, reason="needs an Apple GPU (MPS)")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MSL = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat"}
OUT_EPS = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.uint32 else t


def _assert_matmul_close(y, x, wq, s, b, gs, bits, transpose) -> None:
    """y (from a Metal kernel) vs the CPU op: one output rounding plus twice one fp32
    evaluation's bound (oracles.fp32_sum_eps) relative to sum |x| |w|, as in
    tests/test_metal_kernels.py."""
    # the CPU op in fp32 (fp32 tiles, as the Metal kernels use for every dtype), rounded once
    xf = x.cpu().float()
    ref = mlxq.affine_matmul(xf, wq.cpu(), s.cpu(), b.cpu(), gs, bits, transpose).to(x.dtype)
    y = y.cpu()
    assert y.shape == ref.shape and y.dtype == ref.dtype
    q = mlxq.affine_dequantize(
        wq.cpu(), torch.ones_like(s.cpu()), torch.zeros_like(b.cpu()), gs, bits
    )
    w = s.cpu().float().abs().repeat_interleave(gs, -1) * q.float()
    w = w + b.cpu().float().abs().repeat_interleave(gs, -1)
    absprod = (x.cpu().float().abs() @ (w.transpose(-1, -2) if transpose else w)).reshape(ref.shape)
    bound = OUT_EPS[x.dtype] * ref.float().abs() + 2 * fp32_sum_eps(x.shape[-1]) * absprod + 1e-30
    assert not y.isnan().any(), "some outputs were never written"
    assert ((y.float() - ref.float()).abs() <= bound).all()


def _weights(gen, n, k, gs, bits, dtype, device="cpu"):
    w = torch.randn(n, k, generator=gen).to(dtype)
    return [t.to(device) for t in mlxq.affine_quantize(w, gs, bits)]


# --- the launch cases: run through the emulator, the runtime fallback, or MPS -----------------

CASES = [  # (op, bits, gs, dtype, M, transpose)
    ("matmul", 4, 64, torch.bfloat16, 3, True),  # qmv
    ("matmul", 3, 32, torch.float16, 2, False),  # qvm (threadgroup memory)
    ("matmul", 6, 128, torch.float32, 33, True),  # qmm_t (threadgroup memory)
    ("matmul", 5, 64, torch.bfloat16, 20, False),  # qmm_n
    ("quantize", 6, 32, torch.float16, 0, True),
    ("dequantize", 5, 128, torch.bfloat16, 0, True),
]
CASE_IDS = [f"{c[0]}-b{c[1]}-gs{c[2]}-{MSL[c[3]]}-m{c[4]}-{'t' if c[5] else 'n'}" for c in CASES]


def _run_op(case, gen, runner, device="cpu"):
    """Runs one case through `runner(launch)`; returns (got outputs, want outputs)."""
    op, bits, gs, dtype, m, transpose = case
    if op == "quantize":
        w = torch.randn(5, 3 * gs, generator=gen).to(dtype)
        launch = _C.metal_launch_affine_quantize(w.to(device), gs, bits)
        runner(launch)
        return launch["outputs"], affine_quantize_ref(w, gs, bits, rule="gpu")  # MLX's Metal rule
    n, k = 20, 2 * gs
    wq, s, b = _weights(gen, n, k, gs, bits, dtype, device)
    if op == "dequantize":
        launch = _C.metal_launch_affine_dequantize(wq, s, b, gs, bits)
        runner(launch)
        # the Metal kernel rounds s*q+b once (the CPU op rounds twice, as mx.dequantize does):
        # held to the float64 value rounded once
        want = dequantize_ref(wq.cpu(), s.cpu(), b.cpu(), gs, bits).to(dtype)
        return launch["outputs"], (want,)
    x = torch.randn(m, k if transpose else n, generator=gen).to(dtype).to(device)
    launch = _C.metal_launch_affine_matmul(x, wq, s, b, gs, bits, transpose)
    for t in launch["outputs"]:
        t.fill_(float("nan"))  # an element the kernel forgets cannot pass by luck
    runner(launch)
    _assert_matmul_close(launch["outputs"][0], x, wq, s, b, gs, bits, transpose)
    return None, None


def _check(got, want) -> None:
    if got is None:
        return
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        if g.dtype == torch.uint32 or g.numel() == 0:
            assert torch.equal(_bits(g.cpu()), _bits(w))
        else:  # dequantize: one rounding of the same fp32 value
            torch.testing.assert_close(g.cpu(), w, rtol=OUT_EPS[g.dtype], atol=0)


def _emulate_launch(launch) -> None:
    tgm = dict(launch["threadgroup_memory"]) or None
    emu.dispatch(launch["kernel"], launch["grid"], launch["threads"], launch["buffers"], tgm)


class FakeKernel:
    """torch's _mps_MetalKernel.__call__ as read in torch/csrc/mps/Module.cpp: argument i is
    [[buffer(i)]] (tensors by buffer, int lists by setBytes after `arg_casts`), and the launch
    is dispatchThreads(threads, group_size). Executed by the emulator."""

    def __init__(self, lib: emu.Library, name: str, calls: list):
        self.lib, self.name, self.calls = lib, name, calls

    def __call__(self, *args, threads=None, group_size=None, arg_casts=None, error_buf_idx=None):
        """__call__(self, *args, threads=None, group_size=None, arg_casts=None)"""
        self.calls.append({"threads": threads, "group_size": group_size, "arg_casts": arg_casts})
        assert len(threads) == len(group_size) == 3
        assert all(t % g == 0 for t, g in zip(threads, group_size, strict=True))
        buffers: dict[int, Any] = {}
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                buffers[i] = a
            else:
                assert isinstance(a, list) and (arg_casts or {}).get(i) == "int32"
                buffers[i] = struct.pack(f"<{len(a)}i", *a)
        grid = [t // g for t, g in zip(threads, group_size, strict=True)]
        self.lib.dispatch(self.name, grid, group_size, buffers)


class FakeKernelOldTorch(FakeKernel):
    def __call__(self, *args, threads=None, group_size=None):
        """__call__(self, *args, threads=None, group_size=None)"""
        self.calls.append({"threads": threads, "group_size": group_size})
        # The params arrive as an int32 tensor bound to the `constant Params&` parameter.
        constant = {p.index for p in self.lib.kernels[self.name].params if "constant" in p.decl}
        args = [a.tolist() if i in constant else a for i, a in enumerate(args)]
        casts = {i: "int32" for i, a in enumerate(args) if isinstance(a, list)}
        return super().__call__(*args, threads=threads, group_size=group_size, arg_casts=casts)


class FakeCompileShader:
    """torch.mps.compile_shader for the emulator: compiles the source as one .metal file."""

    def __init__(self, tmp: Path, kernel_cls=FakeKernel):
        self.tmp, self.kernel_cls = tmp, kernel_cls
        self.sources: list[str] = []
        self.calls: list[dict] = []

    def __call__(self, source: str):
        source.encode("ascii")  # torch reads the source as ASCII
        self.sources.append(source)
        path = self.tmp / f"rt{len(self.sources)}.metal"
        path.write_text(source)
        lib = emu.Library([path])  # not emu.load_library: keep the session's kernels as they are
        return SimpleNamespace(**{n: self.kernel_cls(lib, n, self.calls) for n in lib.kernels})
