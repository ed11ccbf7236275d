"""The Metal kernels (metal/*.metal), executed by the MSL emulator through the dispatch plan.

Every kernel runs for every bits x group size x dtype and is compared with the CPU op
(mlxq.ops): quantize bit for bit with MLX's Metal rule (a float64 restatement; the CPU op
keeps MLX's CPU rule), dequantize to one rounding, matmul within the rounding of
the output plus fp32 accumulation-order noise. Shapes are odd on purpose: N=1, N not a multiple
of the rows per threadgroup, K at its smallest legal size (= group_size), M from 1 to 70 (so
that qmv/qvm and qmm with partial tiles all run), and batched/broadcast weights. The traffic
tests hold the device bytes each kernel reads against the minimum: qmv/qvm/quantize/dequantize
read packed weights, scales and biases exactly once; qmm reads each weight tile at most once
per row-block of x (for transpose=False, a group wider than the 32-column tile has its scale
read by each tile it spans); x is read at most once per threadgroup column (qmv: per
simdgroup); outputs are written exactly once and never read; inputs are never written.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import mlxq
import pytest
import torch
from mlxq._native import _C
from mlxq.testing import metal_emulator as emu
from mlxq.testing.metal_emulator import ops as metal_ops
from oracles import (
    BITS,
    DTYPES,
    GROUP_SIZES,
    affine_quantize_ref,
    dequantize_ref,
    fp32_sum_eps,
)

pytestmark = pytest.mark.skipif(
    not emu.available(), reason="no clang for the MSL emulator (pip install ziglang)"
)

METAL_DIR = Path(__file__).resolve().parents[1] / "metal"
COMBOS = [(b, g, d) for d in DTYPES for g in GROUP_SIZES for b in BITS]
COMBO_IDS = [f"b{b}-gs{g}-{str(d).split('.')[-1]}" for b, g, d in COMBOS]
QMV_MAX_M = 8  # metal/mlxq_params.h MLXQ_QMV_MAX_M: larger M goes to qmm
# One rounding of the output (both sides round a close fp32 value) ...
OUT_EPS = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# ... plus the fp32 sums of both (oracles.fp32_sum_eps each), relative to sum |x| |w|.


@pytest.fixture(scope="session", autouse=True)
def library() -> emu.Library:
    """Compile (or load from the on-disk cache) every kernel once per session."""
    return emu.load_library()


def _bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.uint32 else t


def _quantized(gen, shape, gs, bits, dtype):
    w = torch.randn(*shape, generator=gen).to(dtype)
    return mlxq.affine_quantize(w, gs, bits)


def _check_matmul(x, wq, s, b, gs, bits, transpose) -> str:
    """Runs the Metal kernel chosen by the plan, compares with the CPU op; returns the kernel."""
    y = metal_ops.affine_matmul(x, wq, s, b, gs, bits, transpose)
    kernel = emu.last_dispatch_report().kernel
    # the CPU op in fp32 (fp32 tiles, as the Metal kernels use for every dtype), rounded once
    ref = mlxq.affine_matmul(x.float(), wq, s, b, gs, bits, transpose).to(x.dtype)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    # Accumulation noise scales with sum |x| (|s| q + |b|): kernels may sum s*q*x and b*x
    # separately (the bias trick), and those two can cancel.
    q = mlxq.affine_dequantize(wq, torch.ones_like(s), torch.zeros_like(b), gs, bits).float()
    w = s.float().abs().repeat_interleave(gs, -1) * q + b.float().abs().repeat_interleave(gs, -1)
    wt = w.transpose(-1, -2) if transpose else w
    absprod = x.float().abs() @ wt.abs()
    if wq.dim() == 2:
        absprod = absprod.reshape(ref.shape)
    bound = OUT_EPS[x.dtype] * ref.float().abs() + 2 * fp32_sum_eps(x.shape[-1]) * absprod + 1e-30
    err = (y.float() - ref.float()).abs()
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert not y.isnan().any(), f"{kernel}: some outputs were never written"
    assert worst <= 1.0, f"{kernel}: error {err.max().item():.3g} is {worst:.2f}x the bound"
    return kernel


# --- syntax ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(METAL_DIR.glob("*.metal")), ids=lambda p: p.name)
def test_strict_address_space_syntax(path: Path) -> None:
    emu.check_syntax_strict(path)


def test_every_planned_kernel_is_in_the_library(library) -> None:
    names = set(library.kernels)
    msl = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat"}
    for bits, gs, dtype in COMBOS:
        for op in ("qmv", "qvm", "qmm_t", "qmm_n", "quantize", "dequantize"):
            name = f"affine_{op}_{msl[dtype]}_gs{gs}_b{bits}"
            assert name in names, name


# --- quantize / dequantize -------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "gs", "dtype"), COMBOS, ids=COMBO_IDS)
def test_quantize_bit_exact(bits, gs, dtype, gen) -> None:
    w = torch.randn(5, 3 * gs, generator=gen)
    w[0, :gs] = 0.75  # constant group: zero range, the 1e-7 floor on the scale
    w[1, :gs] = w[1, :gs].abs() + 0.1  # all positive: the max edge sets a negative scale
    w[2, gs : 2 * gs] = -w[2, gs : 2 * gs].abs() - 0.1  # all negative
    w[3] *= 1e3
    w = w.to(dtype).reshape(5, 1, 3 * gs)  # leading dims are flattened by the plan
    got = metal_ops.affine_quantize(w, gs, bits)
    # MLX's Metal rule (max starts at 0, round half away from zero), restated in float64; the
    # CPU op keeps MLX's CPU rule: see tests/test_metal_quantize_rule.py.
    want = affine_quantize_ref(w, gs, bits, "gpu")
    for name, g, r in zip(("wq", "scales", "biases"), got, want, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert torch.equal(_bits_of(g), _bits_of(r)), f"{name} differs from MLX's GPU rule"


@pytest.mark.parametrize(("bits", "gs", "dtype"), COMBOS, ids=COMBO_IDS)
def test_dequantize(bits, gs, dtype, gen) -> None:
    wq, s, b = _quantized(gen, (2, 3, 2 * gs), gs, bits, dtype)
    got = metal_ops.affine_dequantize(wq, s, b, gs, bits)
    # The Metal kernel evaluates s * q + b in fp32 and rounds once to the output dtype (the
    # CPU op rounds twice, as mx.dequantize does): compare with the float64 value rounded once.
    want = dequantize_ref(wq, s, b, gs, bits).to(dtype)
    assert got.shape == want.shape and got.dtype == want.dtype
    # s * q + b in fp32 with or without a fused multiply-add differ by a rounding of s * q
    # (which matters where s * q cancels b), then both round to the output dtype.
    sq = (s.float().abs() * (2**bits - 1) + b.float().abs()).repeat_interleave(gs, -1)
    tiny = torch.finfo(dtype).smallest_normal * 2.0**-10 if dtype == torch.float16 else 0.0
    tol = OUT_EPS[dtype] * want.float().abs() + 2.0**-22 * sq + tiny
    assert ((got.float() - want.float()).abs() <= tol).all()


# --- matmul: every combination, decode and prefill shapes -------------------------------------

# (M, N, K in groups) per combination, cycled so every combination gets odd shapes and, across
# the table, N=1, N not a multiple of 8 rows per threadgroup, K = group_size, M = 1..70.
DECODE_SHAPES = [(1, 13, 1), (3, 1, 2), (8, 33, 3), (2, 7, 1), (5, 9, 4), (1, 40, 2)]
PREFILL_SHAPES = [(70, 13, 1), (9, 33, 2), (33, 1, 1), (40, 40, 3), (64, 7, 2), (17, 64, 1)]


@pytest.mark.parametrize("transpose", [True, False], ids=["t", "n"])
@pytest.mark.parametrize(("bits", "gs", "dtype"), COMBOS, ids=COMBO_IDS)
def test_matmul(bits, gs, dtype, transpose, gen) -> None:
    i = COMBOS.index((bits, gs, dtype))
    for shapes, prefix in (
        (DECODE_SHAPES, "affine_qmv" if transpose else "affine_qvm"),
        (PREFILL_SHAPES, "affine_qmm_t" if transpose else "affine_qmm_n"),
    ):
        M, N, kg = shapes[(i + (0 if transpose else 3)) % len(shapes)]
        K = kg * gs
        wq, s, b = _quantized(gen, (N, K), gs, bits, dtype)
        x = torch.randn(M, K if transpose else N, generator=gen).to(dtype)
        kernel = _check_matmul(x, wq, s, b, gs, bits, transpose)
        assert kernel.startswith(prefix + "_"), (M, kernel)


@pytest.mark.parametrize("transpose", [True, False], ids=["t", "n"])
@pytest.mark.parametrize("M", [1, 2, 5, 8, 9, 31, 32, 33, 70])
def test_matmul_every_m(M, transpose, gen) -> None:
    gs, bits, dtype = 32, 4, torch.float16
    wq, s, b = _quantized(gen, (37, 96), gs, bits, dtype)
    x = torch.randn(M, 96 if transpose else 37, generator=gen).to(dtype)
    _check_matmul(x, wq, s, b, gs, bits, transpose)


@pytest.mark.parametrize("transpose", [True, False], ids=["t", "n"])
@pytest.mark.parametrize("M", [2, 40])
@pytest.mark.parametrize(("bits", "gs", "K"), [(3, 128, 1152), (4, 64, 1088), (6, 32, 1056)])
def test_matmul_long_loops(bits, gs, K, M, transpose, gen) -> None:
    """K > 1024 and N = 150: qmv takes a second, partial 1024-value step; qvm walks three
    64-row chunks (the last partial) and, for K = 1088 or 1056, a partial 128-column tile;
    qmm runs 33 to 36 K-steps."""
    wq, s, b = _quantized(gen, (150, K), gs, bits, torch.bfloat16)
    x = torch.randn(M, K if transpose else 150, generator=gen).to(torch.bfloat16)
    _check_matmul(x, wq, s, b, gs, bits, transpose)


@pytest.mark.parametrize("transpose", [True, False], ids=["t", "n"])
@pytest.mark.parametrize("M", [3, 40])
@pytest.mark.parametrize(
    ("x_batch", "w_batch"),
    [((2,), (2,)), ((3, 1), (2,)), ((1,), (3,)), ((2, 3), (1, 3)), ((), (2,))],
    ids=["same", "x-broadcast-dim", "x-broadcast", "w-broadcast", "x-2d"],
)
def test_matmul_batched(x_batch, w_batch, M, transpose, gen) -> None:
    gs, bits, dtype = 64, 3, torch.float32
    N, K = 11, 128
    wq, s, b = _quantized(gen, (*w_batch, N, K), gs, bits, dtype)
    x = torch.randn(*x_batch, M, K if transpose else N, generator=gen).to(dtype)
    _check_matmul(x, wq, s, b, gs, bits, transpose)


def test_matmul_leading_dims_and_empty(gen) -> None:
    wq, s, b = _quantized(gen, (16, 64), 32, 4, torch.float32)
    _check_matmul(torch.randn(2, 3, 64, generator=gen), wq, s, b, 32, 4, True)
    _check_matmul(torch.randn(2, 20, 64, generator=gen), wq, s, b, 32, 4, True)
    y = metal_ops.affine_matmul(torch.randn(0, 64), wq, s, b, 32, 4, True)
    assert y.shape == (0, 16)


def test_matmul_int32_weights_and_upcast_scales(gen) -> None:
    """int32 packed words hold the same bits; scales of another dtype are converted to x's."""
    wq, s, b = _quantized(gen, (9, 64), 32, 5, torch.float16)
    x = torch.randn(3, 64, generator=gen)
    _check_matmul(x, wq.view(torch.int32), s, b, 32, 5, True)
    _check_matmul(torch.randn(40, 64, generator=gen), wq, s, b, 32, 5, True)


def _meta(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def test_plan_geometry_and_params_layout() -> None:
    """The launch contract the MPS backend relies on: kernel, grid, threads, threadgroup memory,
    bindings, and the byte layout of AffineMatmulParams / AffineQuantParams."""
    N, K, gs, bits = 37, 1024, 64, 4
    w = (_meta(N, K * bits // 32, dtype=torch.uint32), _meta(N, K // gs), _meta(N, K // gs))
    cases = [  # x shape, transpose -> kernel, grid, threads, threadgroup memory
        ((5, K), True, "affine_qmv_half_gs64_b4", (5, 1, 1), (64, 1, 1), []),
        ((8, N), False, "affine_qvm_half_gs64_b4", (8, 1, 1), (64, 1, 1), [(0, 19456)]),
        ((70, K), True, "affine_qmm_t_half_gs64_b4", (2, 3, 1), (128, 1, 1), [(0, 9216)]),
        ((9, N), False, "affine_qmm_n_half_gs64_b4", (32, 1, 1), (128, 1, 1), [(0, 9216)]),
    ]
    for xshape, transpose, kernel, grid, threads, tgm in cases:
        plan = _C.plan_affine_matmul(_meta(*xshape), *w, gs, bits, transpose)
        assert (plan["kernel"], plan["grid"], plan["threads"]) == (kernel, grid, threads)
        assert plan["threadgroup_memory"] == tgm
        roles = ["x", "wq", "scales", "biases", "out", "params"]
        assert plan["bindings"] == list(enumerate(roles))
        head = struct.unpack_from("8i", plan["params"])
        assert head == (xshape[0], N, K, K // gs, xshape[1], K if not transpose else N, 1, 0)
        assert len(plan["params"]) == 4 * (8 + 3 * 6)
    # Batched: x [2, 1, M, K] against wq [3, N, ...] -> batch (2, 3), strides in entries.
    wb = (_meta(3, N, K * bits // 32, dtype=torch.uint32), _meta(3, N, K // gs), _meta(3, N, 16))
    plan = _C.plan_affine_matmul(_meta(2, 1, 4, K), *wb, gs, bits, True)
    p = struct.unpack_from("26i", plan["params"])
    assert plan["grid"] == (5, 1, 6) and p[6:8] == (6, 2)
    assert (p[8:10], p[14:16], p[20:22]) == ((2, 3), (1, 0), (0, 1))
    plan = _C.plan_affine_quantize(_meta(3, 5, 256), 128, 3)
    assert (plan["kernel"], plan["grid"], plan["threads"]) == (
        "affine_quantize_half_gs128_b3",
        (1, 1, 1),
        (64, 1, 1),
    )
    assert struct.unpack("3i", plan["params"]) == (15, 256, 2)
    assert plan["out_shapes"] == [(3, 5, 24), (3, 5, 2), (3, 5, 2)]


def test_plan_rejects_bad_input() -> None:
    wq = torch.zeros(16, 8, dtype=torch.uint32)
    s = torch.zeros(16, 2)
    with pytest.raises(ValueError, match="x last dimension"):
        _C.plan_affine_matmul(torch.zeros(2, 48), wq, s, s, 32, 4, True)
    with pytest.raises(ValueError, match="bits"):
        _C.plan_affine_matmul(torch.zeros(2, 64), wq, s, s, 32, 7, True)
    # Alternating broadcasts give 7 batch dimensions that cannot be merged.
    meta = {"device": "meta"}
    wq_b = torch.empty(1, 2, 1, 2, 1, 2, 1, 16, 8, dtype=torch.uint32, **meta)
    s_b = torch.empty(1, 2, 1, 2, 1, 2, 1, 16, 2, **meta)
    x_b = torch.empty(2, 1, 2, 1, 2, 1, 2, 3, 64, **meta)
    with pytest.raises(ValueError, match="batch dimensions"):
        _C.plan_affine_matmul(x_b, wq_b, s_b, s_b, 32, 4, True)
    # Six of them are fine.
    plan = _C.plan_affine_matmul(x_b[0], wq_b[0], s_b[0], s_b[0], 32, 4, True)
    assert plan["grid"][2] == 64 and plan["out_shapes"][0] == (2,) * 6 + (3, 16)


# --- traffic -----------------------------------------------------------------------------------


def _traffic_case(kind: str, gen):
    """Runs one representative dispatch of `kind`; returns (report, bounds, outputs): bounds
    maps a buffer index to (role, minimum bytes read, allowed bytes read), outputs maps an
    output's buffer index to its size in bytes (each output is written exactly once)."""
    gs, bits, dtype = 64, 4, torch.float16
    if kind in ("quantize", "dequantize"):
        w = torch.randn(24, 256, generator=gen).to(dtype)
        if kind == "quantize":
            plan = _C.plan_affine_quantize(w, gs, bits)
            wq, s, b = metal_ops.affine_quantize(w, gs, bits)
            roles, outs = {"w": w}, {"wq": wq, "scales": s, "biases": b}
        else:
            wq, s, b = mlxq.affine_quantize(w, gs, bits)
            plan = _C.plan_affine_dequantize(wq, s, b, gs, bits)
            out = metal_ops.affine_dequantize(wq, s, b, gs, bits)
            roles, outs = {"wq": wq, "scales": s, "biases": b}, {"out": out}
        rep = emu.last_dispatch_report()
        bounds = {
            i: (r, roles[r].nbytes, roles[r].nbytes) for i, r in plan["bindings"] if r in roles
        }
        written = {i: outs[r].nbytes for i, r in plan["bindings"] if r in outs}
        return rep, bounds, written
    transpose = kind in ("qmv", "qmm_t")
    M = 4 if kind in ("qmv", "qvm") else 70
    N, K = 48, 512
    wq, s, b = _quantized(gen, (N, K), gs, bits, dtype)
    x = torch.randn(M, K if transpose else N, generator=gen).to(dtype)
    plan = _C.plan_affine_matmul(x, wq, s, b, gs, bits, transpose)
    y = metal_ops.affine_matmul(x, wq, s, b, gs, bits, transpose)
    rep = emu.last_dispatch_report()
    assert rep.kernel == plan["kernel"] and rep.kernel.startswith(f"affine_{kind}_")
    # qmv/qvm: once. qmm: once per row-block of x (grid y).
    times = 1 if kind in ("qmv", "qvm") else plan["grid"][1]
    roles = {"wq": wq, "scales": s, "biases": b}
    bounds = {
        i: (r, roles[r].nbytes, times * roles[r].nbytes) for i, r in plan["bindings"] if r in roles
    }
    if kind == "qmm_n":  # 32-column tiles narrower than a group each read the group's scale
        for i, (r, minimum, allowed) in list(bounds.items()):
            if r in ("scales", "biases"):
                bounds[i] = (r, minimum, allowed * max(1, gs // 32))
    # x: qmv's simdgroups each read the rows of x they need once (no staging: every lane reads
    # its own K chunk); qvm and qmm read x once per threadgroup column (grid x).
    xi = next(i for i, r in plan["bindings"] if r == "x")
    x_times = plan["grid"][0]
    if kind == "qmv":
        x_times *= -(-plan["threads"][0] // 32)
    bounds[xi] = ("x", x.nbytes, x_times * x.nbytes)
    written = {i: y.nbytes for i, r in plan["bindings"] if r == "out"}
    return rep, bounds, written


TRAFFIC_KINDS = ["qmv", "qvm", "qmm_t", "qmm_n", "quantize", "dequantize"]


@pytest.mark.parametrize("kind", TRAFFIC_KINDS)
def test_traffic_within_bound(kind, gen) -> None:
    rep, bounds, written = _traffic_case(kind, gen)
    for index, (role, minimum, allowed) in bounds.items():
        got = rep.bytes_read[index]
        assert got >= minimum, f"{rep.kernel}: read {got} B of {role}, less than all of it"
        assert got <= allowed, f"{rep.kernel}: read {got} B of {role}, bound {allowed} B"
    for index, nbytes in written.items():
        assert rep.bytes_written[index] == nbytes, f"{rep.kernel}: output {index} not written once"
        assert rep.bytes_read[index] == 0, f"{rep.kernel}: output {index} read back"
    for index in set(rep.bytes_written) - set(written):
        assert rep.bytes_written[index] == 0, f"{rep.kernel}: input buffer({index}) written"
    # The params block (constant memory): at most once per thread.
    threads = math.prod(rep.grid) * math.prod(rep.threads_per_threadgroup)
    params = set(rep.bytes_read) - set(bounds) - set(written)
    for index in params:
        assert rep.bytes_read[index] <= threads * 64, f"{rep.kernel}: params read too often"
    print(f"\n{rep.kernel} grid={rep.grid} threads={rep.threads_per_threadgroup}")
    for index, (role, minimum, allowed) in bounds.items():
        got = rep.bytes_read[index]
        print(
            f"  {role:7s} read {got:8d} B  minimum {minimum:8d} B  x{got / minimum:5.2f}"
            f"  bound x{allowed / minimum:5.2f}"
        )
