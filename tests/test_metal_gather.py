"""The gather matmul kernels (metal/affine_gather_*.metal) in the MSL emulator, through the
dispatch plan, against the CPU op (mlxq.affine_gather_matmul).

Every bits x group size x dtype runs the decode kernel (gather qmv: one token, top-3 of 5
experts with a repeat) and the prefill kernels (qmm, both transposes) on odd shapes; qvm runs
for each dtype. The traffic test holds the bytes the gather qmv reads to the selected experts:
each pair reads its expert's packed rows, scales and biases exactly once, and an expert no pair
selects is never read. Accuracy bound: as tests/test_metal_kernels.py (one output rounding plus
fp32 accumulation-order noise relative to sum |x| (|s| q + |b|)).
"""

from __future__ import annotations

import math
import struct

import mlxq
import pytest
import torch
from mlxq.testing import metal_emulator as emu
from mlxq.testing.metal_emulator import ops as metal_ops
from oracles import BITS, DTYPES, GROUP_SIZES, fp32_sum_eps, mx_gather_qmm

pytestmark = pytest.mark.skipif(
    not emu.available(), reason="no clang for the MSL emulator (pip install ziglang)"
)

COMBOS = [(b, g, d) for d in DTYPES for g in GROUP_SIZES for b in BITS]
COMBO_IDS = [f"b{b}-gs{g}-{str(d).split('.')[-1]}" for b, g, d in COMBOS]
OUT_EPS = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.fixture(scope="module", autouse=True)
def library() -> emu.Library:
    return emu.load_library()


def _experts(gen, e, rows, cols, gs, bits, dtype):
    w = torch.randn(e, rows, cols, generator=gen).to(dtype)
    return mlxq.affine_quantize(w, gs, bits)


def _check(
    x, wq, s, b, lhs, rhs, gs, bits, transpose, kernel_prefix: str, sorted_indices: bool = False
) -> torch.Tensor:
    y = metal_ops.affine_gather_matmul(x, wq, s, b, lhs, rhs, gs, bits, transpose, sorted_indices)
    kernel = emu.last_dispatch_report().kernel
    assert kernel.startswith(kernel_prefix), kernel
    # the CPU op in fp32 (fp32 tiles, as the Metal kernels use for every dtype), rounded once
    ref = mlxq.affine_gather_matmul(x.float(), wq, s, b, lhs, rhs, gs, bits, transpose).to(x.dtype)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    ones, zeros = torch.ones_like(s), torch.zeros_like(b)
    q = mlxq.affine_dequantize(wq, ones, zeros, gs, bits).float()
    w_abs = s.float().abs().repeat_interleave(gs, -1) * q + b.float().abs().repeat_interleave(
        gs, -1
    )
    lhs_all = torch.arange(x.shape[:-2].numel()).reshape(x.shape[:-2]) if lhs is None else lhs
    lf, rf = (t.reshape(-1) for t in torch.broadcast_tensors(lhs_all, rhs))
    xm = x.float().abs().reshape(-1, *x.shape[-2:])[lf]
    wm = w_abs.reshape(-1, *w_abs.shape[-2:])[rf]
    absprod = (xm @ (wm.transpose(-1, -2) if transpose else wm)).reshape(ref.shape)
    bound = OUT_EPS[x.dtype] * ref.float().abs() + 2 * fp32_sum_eps(x.shape[-1]) * absprod + 1e-30
    err = (y.float() - ref.float()).abs()
    assert not y.isnan().any(), f"{kernel}: some outputs were never written"
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{kernel}: error {err.max().item():.3g} is {worst:.2f}x the bound"
    return y


@pytest.mark.parametrize("bits,gs,dtype", COMBOS, ids=COMBO_IDS)
def test_gather_kernels(bits, gs, dtype, gen) -> None:
    k = gs
    wq, s, b = _experts(gen, 5, 20, k, gs, bits, dtype)
    # decode: one token, top-3 with expert 4 twice (mlx-lm's SwitchGLU layout [T, 1, 1, K])
    x = torch.randn(1, 1, 1, k, generator=gen).to(dtype)
    _check(x, wq, s, b, None, torch.tensor([[4, 1, 4]]), gs, bits, True, "affine_gather_qmv")
    # prefill: 33 rows per pair (partial 32-row tiles), both transposes
    x = torch.randn(2, 33, k, generator=gen).to(dtype)
    lhs, rhs = torch.tensor([1, 0, 1]), torch.tensor([3, 3, 0])
    _check(x, wq, s, b, lhs, rhs, gs, bits, True, "affine_gather_qmm_t")
    x = torch.randn(2, 33, 20, generator=gen).to(dtype)
    _check(x, wq, s, b, lhs, rhs, gs, bits, False, "affine_gather_qmm_n")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_qvm_and_broadcast(dtype, gen) -> None:
    wq, s, b = _experts(gen, 4, 24, 64, 32, 4, dtype)
    x = torch.randn(3, 2, 24, generator=gen).to(dtype)
    _check(
        x,
        wq,
        s,
        b,
        torch.tensor([[2], [0]]),
        torch.tensor([1, 3, 1]),
        32,
        4,
        False,
        "affine_gather_qvm",
    )
    x = torch.randn(3, 2, 64, generator=gen).to(dtype)
    _check(
        x,
        wq,
        s,
        b,
        torch.tensor([[2], [0]]),
        torch.tensor([1, 3, 1]),
        32,
        4,
        True,
        "affine_gather_qmv",
    )


def test_plan_of_the_gather() -> None:
    meta = dict(device="meta")
    x = torch.empty(7, 1, 1, 256, **meta)
    wq = torch.empty(64, 96, 256 * 4 // 32, dtype=torch.uint32, **meta)
    s = torch.empty(64, 96, 4, **meta)
    rhs = torch.empty(7, 8, dtype=torch.long, **meta)
    plan = mlxq._C.plan_affine_gather_matmul(x, wq, s, s, None, rhs, 64, 4, True)
    assert plan["kernel"] == "affine_gather_qmv_float_gs64_b4"
    assert plan["grid"][2] == 56 and plan["out_shapes"][0] == (7, 8, 1, 96)
    assert (6, "lhs_indices") in plan["bindings"] and (7, "rhs_indices") in plan["bindings"]
    dense = mlxq._C.plan_affine_matmul(x[0, 0], wq[0], s[0], s[0], 64, 4, True)
    assert plan["grid"][:2] == dense["grid"][:2] and plan["threads"] == dense["threads"]
    with pytest.raises(ValueError, match="rhs_indices shape"):
        mlxq._C.plan_affine_gather_matmul(x, wq, s, s, None, rhs[:, :3].T, 64, 4, True)


def test_gather_qmv_reads_only_the_selected_experts(gen) -> None:
    e, rows, k, bits, gs = 16, 24, 256, 4, 64
    wq, s, b = _experts(gen, e, rows, k, gs, bits, torch.float16)
    x = torch.randn(2, 1, 1, k, generator=gen).to(torch.float16)
    rhs = torch.tensor([[3, 9, 12], [9, 0, 5]])  # expert 9 twice, 11 experts never
    y = metal_ops.affine_gather_matmul(x, wq, s, b, None, rhs, gs, bits)
    rep = emu.last_dispatch_report()
    assert not y.isnan().any()
    pairs = rhs.numel()
    assert rep.bytes_read[1] == pairs * rows * k * bits // 8  # packed rows, once per pair
    assert rep.bytes_read[2] == rep.bytes_read[3] == pairs * rows * (k // gs) * 2
    # each thread reads its pair's two indices once (4 bytes each)
    threads = math.prod(rep.grid) * math.prod(rep.threads_per_threadgroup)
    assert rep.bytes_read[6] == rep.bytes_read[7] == 4 * threads
    assert rep.bytes_written[4] == pairs * rows * 2


# --- the MPS backend's launch and the run-time fallback, executed by the emulator -------------

LAUNCH_CASES = [  # (bits, gs, dtype, rows of x per pair, transpose)
    (4, 64, torch.bfloat16, 1, True),  # gather qmv
    (3, 32, torch.float16, 2, False),  # gather qvm (threadgroup memory)
    (6, 128, torch.float32, 33, True),  # gather qmm_t
]


def _launch_case(case, gen):
    bits, gs, dtype, m, transpose = case
    wq, s, b = _experts(gen, 4, 20, 2 * gs, gs, bits, dtype)
    x = torch.randn(3, m, 2 * gs if transpose else 20, generator=gen).to(dtype)
    lhs, rhs = torch.tensor([[2], [0]]), torch.tensor([1, 3, 1])
    launch = mlxq._C.metal_launch_affine_gather_matmul(x, wq, s, b, lhs, rhs, gs, bits, transpose)
    for t in launch["outputs"]:
        t.fill_(float("nan"))
    want = mlxq.affine_gather_matmul(x.float(), wq, s, b, lhs, rhs, gs, bits, transpose).to(x.dtype)
    return launch, want


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype and not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), rtol=4 * OUT_EPS[got.dtype], atol=1e-3)


@pytest.mark.parametrize("case", LAUNCH_CASES, ids=lambda c: f"b{c[0]}-gs{c[1]}-m{c[3]}")
def test_native_launch_in_emulator(case, gen) -> None:
    launch, want = _launch_case(case, gen)
    assert launch["kernel"].startswith("affine_gather_")
    assert launch["buffers"][6].dtype == launch["buffers"][7].dtype == torch.int32
    tgm = dict(launch["threadgroup_memory"]) or None
    emu.dispatch(launch["kernel"], launch["grid"], launch["threads"], launch["buffers"], tgm)
    _assert_close(launch["outputs"][0], want)


def test_native_launch_refuses_out_of_range_indices(gen) -> None:
    wq, s, b = _experts(gen, 4, 20, 64, 64, 4, torch.float32)
    with pytest.raises(IndexError, match="rhs_indices"):
        mlxq._C.metal_launch_affine_gather_matmul(
            torch.randn(1, 1, 64), wq, s, b, None, torch.tensor([4]), 64, 4, True
        )


@pytest.mark.parametrize("case", LAUNCH_CASES[:2], ids=lambda c: f"b{c[0]}-gs{c[1]}-m{c[3]}")
def test_runtime_fallback_in_emulator(case, gen, tmp_path) -> None:
    from metal_backend_helpers import METAL_DIR, FakeCompileShader
    from mlxq.metal import runtime as rt

    fake = FakeCompileShader(tmp_path)
    runner = rt.RuntimeKernels(fake, METAL_DIR)
    launch, want = _launch_case(case, gen)
    runner.run(launch)
    _assert_close(launch["outputs"][0], want)
    assert len(fake.sources) == 1


def test_gather_kernels_are_expected_in_a_prebuilt_library() -> None:
    from mlxq.format import METAL_BITS
    from mlxq.metal import backend as mb
    from mlxq.metal import runtime as rt

    names = mb.expected_kernel_names()
    instantiated = rt.instantiated_kernels(mb.metal_source_dir())
    gather = {n for n in names if n.startswith("affine_gather_")}
    per_bits = 6 * len(DTYPES) * len(GROUP_SIZES)  # qmv, qvm, qmm_t, qmm_n, qmm_rhs_t, _rhs_n
    assert len(gather) == per_bits * len(METAL_BITS) and gather <= set(instantiated)


# --- the sorted gather qmm (MoE prefill: rhs indices sorted by expert) ------------------------

# Pairs per expert, in expert order: experts 1 and 4 have none, expert 2 one, expert 3 a run across
# the 32-row block boundary; no run is a multiple of 32. 56 pairs of 7 experts: the plan takes the
# sorted kernel (>= 32 rows, >= 4 rows per expert).
RUNS = (3, 0, 1, 37, 0, 13, 2)
SORTED_COMBOS = [(b, g, d) for d in DTYPES for g in GROUP_SIZES for b in (1, *BITS)]
SORTED_IDS = [f"b{b}-gs{g}-{str(d).split('.')[-1]}" for b, g, d in SORTED_COMBOS]


def _sorted_rhs(runs) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(runs)), torch.tensor(runs))


def _token_order(gen, rhs: torch.Tensor, tokens: int) -> torch.Tensor:
    """lhs of sorted pairs as a MoE layer makes them: within each run, tokens in increasing order
    (a stable sort of the (token, expert) pairs by expert)."""
    lhs = torch.randint(0, tokens, rhs.shape, generator=gen)
    return lhs[torch.argsort(rhs * tokens + lhs, stable=True)]


def _block_passes(rhs_rows: torch.Tensor) -> int:
    """(32-row block, run of equal experts in it) pairs: the expert tiles the sorted kernel reads
    per column tile."""
    return sum(1 + int((blk[1:] != blk[:-1]).sum()) for blk in rhs_rows.split(32))


@pytest.mark.parametrize("bits,gs,dtype", SORTED_COMBOS, ids=SORTED_IDS)
def test_sorted_gather_qmm(bits, gs, dtype, gen) -> None:
    """Every bits (1 included) x group size x dtype, both transposes: one row per pair, x's
    tokens gathered through lhs in token order, rhs sorted in the runs of RUNS."""
    wq, s, b = _experts(gen, len(RUNS), 20, gs, gs, bits, dtype)
    rhs = _sorted_rhs(RUNS)
    lhs = _token_order(gen, rhs, 24)
    x = torch.randn(24, 1, gs, generator=gen).to(dtype)
    _check(x, wq, s, b, lhs, rhs, gs, bits, True, "affine_gather_qmm_rhs_t", sorted_indices=True)
    x = torch.randn(24, 1, 20, generator=gen).to(dtype)
    _check(x, wq, s, b, lhs, rhs, gs, bits, False, "affine_gather_qmm_rhs_n", sorted_indices=True)


def _layouts(gen, transpose: bool):
    k, n = 64, 40  # two 32-column tiles for transpose=True
    feat = k if transpose else n
    rhs = _sorted_rhs(RUNS)
    p = rhs.numel()
    short = _sorted_rhs((2, 0, 5, 1, 4))  # 12 pairs x 3 rows: a block ends inside pair 10
    return [
        # mlx-lm's layout: x already in pair order, no lhs
        ("x in pair order", torch.randn(p, 1, feat, generator=gen), None, rhs),
        ("3 rows per pair", torch.randn(12, 3, feat, generator=gen), None, short),
        # broadcast indices [2, 1] x [1, p]: two sorted sequences one after the other
        ("broadcast", torch.randn(2, 1, feat, generator=gen), torch.tensor([[1], [0]]), rhs[None]),
        # the hint is wrong: unsorted indices passed as sorted still give the exact result
        ("unsorted", torch.randn(p, 1, feat, generator=gen), None, rhs[torch.randperm(p)]),
    ]


@pytest.mark.parametrize("transpose", [True, False], ids=["t", "n"])
def test_sorted_gather_layouts_against_mlx(transpose, gen) -> None:
    """fp32, 4 bits, group 64: the sorted kernel against the CPU op (bound as above) and against
    mx.gather_qmm(sorted_indices=True) directly, for several rows per pair, broadcast indices
    and a wrong hint."""
    k, n = 64, 40
    wq, s, b = _experts(gen, len(RUNS), n, k, 64, 4, torch.float32)
    prefix = "affine_gather_qmm_rhs_" + ("t" if transpose else "n")
    for name, x, lhs, rhs in _layouts(gen, transpose):
        y = _check(x, wq, s, b, lhs, rhs, 64, 4, transpose, prefix, sorted_indices=True)
        theirs = mx_gather_qmm(x, wq, s, b, lhs, rhs, transpose, 64, 4, sorted_indices=True)
        assert theirs.shape == y.shape, name
        torch.testing.assert_close(y, theirs, rtol=1e-5, atol=1e-4, msg=name)


def test_plan_of_the_sorted_gather() -> None:
    """When the plan takes the sorted kernel (sorted_indices, M < 32 rows per pair, >= 32 rows,
    >= 4 rows per expert of wq), and its geometry."""
    meta = dict(device="meta")

    def plan(pairs, m, experts, sorted_indices=True, transpose=True):
        x = torch.empty(pairs, m, 256 if transpose else 96, **meta)
        wq = torch.empty(experts, 96, 256 * 4 // 32, dtype=torch.uint32, **meta)
        s = torch.empty(experts, 96, 4, **meta)
        rhs = torch.empty(pairs, dtype=torch.long, **meta)
        return mlxq._C.plan_affine_gather_matmul(
            x, wq, s, s, None, rhs, 64, 4, transpose, sorted_indices
        )

    p = plan(64, 1, 16)
    assert p["kernel"] == "affine_gather_qmm_rhs_t_float_gs64_b4"
    assert p["grid"] == (3, 2, 1) and p["threads"] == (128, 1, 1)
    assert sorted(p["threadgroup_memory"]) == [(0, 2 * 32 * 36 * 4), (1, 2 * 32 * 4)]
    assert (6, "lhs_indices") in p["bindings"] and (7, "rhs_indices") in p["bindings"]
    m, n, k, groups, in_f, out_f, batch, batch_ndim = struct.unpack("<8i", p["params"][:32])
    assert (m, n, k, groups, in_f, out_f, batch, batch_ndim) == (1, 96, 256, 4, 256, 96, 64, 0)
    assert p["out_shapes"][0] == (64, 1, 96)
    n_plan = plan(64, 1, 16, transpose=False)
    assert n_plan["kernel"] == "affine_gather_qmm_rhs_n_float_gs64_b4"
    assert n_plan["grid"] == (8, 2, 1)
    assert plan(2, 16, 1)["grid"] == (3, 1, 1)  # 32 rows of 2 pairs: one block
    # the per-pair kernels: no hint, too few rows, too few rows per expert, a full tile per pair
    assert plan(64, 1, 16, sorted_indices=False)["kernel"] == "affine_gather_qmv_float_gs64_b4"
    assert plan(31, 1, 1)["kernel"].startswith("affine_gather_qmv_")
    assert plan(32, 1, 1)["kernel"].startswith("affine_gather_qmm_rhs_t")
    assert plan(64, 1, 17)["kernel"].startswith("affine_gather_qmv_")
    assert plan(30, 8, 64)["kernel"].startswith("affine_gather_qmv_")  # 240 rows < 4 x 64
    assert plan(30, 8, 64, transpose=False)["kernel"].startswith("affine_gather_qvm_")
    full = plan(4, 32, 1)
    assert full["kernel"].startswith("affine_gather_qmm_t_") and full["grid"][2] == 4
    assert plan(0, 1, 1)["empty"] and plan(64, 0, 1)["empty"]
    with pytest.raises(ValueError, match="rows of all pairs"):
        plan(2**27, 16, 1)  # 2^31 rows: the row index would overflow int32


def test_sorted_gather_weight_traffic_falls_with_run_length(gen) -> None:
    """The sorted kernel reads an expert's packed weights, scales and biases once per (32-row
    block, run in it): bytes per token ~ (1 / run + 1 / 32) of the expert, where the per-pair
    kernel the plan picks without the hint (gather qmv) reads the whole expert for every token.
    x and the indices are read once per column tile; outputs written once."""
    e, n, k, bits, gs, pairs = 32, 32, 128, 4, 64, 128
    wq, s, b = _experts(gen, e, n, k, gs, bits, torch.float16)
    x = torch.randn(pairs, 1, k, generator=gen).to(torch.float16)
    expert_bytes = n * k * bits // 8
    per_token = {}
    for run in (4, 16, 64):
        rhs = torch.arange(pairs) // run
        y = metal_ops.affine_gather_matmul(x, wq, s, b, None, rhs, gs, bits, True, True)
        rep = emu.last_dispatch_report()
        assert rep.kernel == "affine_gather_qmm_rhs_t_half_gs64_b4" and not y.isnan().any()
        passes = _block_passes(rhs)
        assert rep.bytes_read[1] == passes * expert_bytes
        assert rep.bytes_read[2] == rep.bytes_read[3] == passes * n * (k // gs) * 2
        assert rep.bytes_read[0] == x.nbytes  # one column tile: each x row once
        assert rep.bytes_read[6] == rep.bytes_read[7] == 4 * pairs
        assert rep.bytes_written[4] == pairs * n * 2
        per_token[run] = rep.bytes_read[1] / pairs
        y_pairs = metal_ops.affine_gather_matmul(x, wq, s, b, None, rhs, gs, bits, True, False)
        rep = emu.last_dispatch_report()
        assert rep.kernel.startswith("affine_gather_qmv_")
        assert rep.bytes_read[1] == pairs * expert_bytes  # the whole expert for every token
        torch.testing.assert_close(y, y_pairs, rtol=2e-3, atol=2e-3)
    assert per_token == {4: expert_bytes / 4, 16: expert_bytes / 16, 64: expert_bytes / 32}


@pytest.mark.parametrize("sorted_launch", ["native", "runtime"])
def test_sorted_gather_launch_in_emulator(sorted_launch, gen, tmp_path) -> None:
    """The launch the MPS backend encodes (both threadgroup memories bound) and the run-time
    fallback (which declares them in the kernel body) run the sorted kernel."""
    from metal_backend_helpers import METAL_DIR, FakeCompileShader
    from mlxq.metal import runtime as rt

    wq, s, b = _experts(gen, len(RUNS), 20, 64, 32, 3, torch.bfloat16)
    rhs = _sorted_rhs(RUNS)
    x = torch.randn(rhs.numel(), 1, 64, generator=gen).to(torch.bfloat16)
    launch = mlxq._C.metal_launch_affine_gather_matmul(x, wq, s, b, None, rhs, 32, 3, True, True)
    assert launch["kernel"] == "affine_gather_qmm_rhs_t_bfloat_gs32_b3"
    launch["outputs"][0].fill_(float("nan"))
    if sorted_launch == "native":
        tgm = dict(launch["threadgroup_memory"])
        emu.dispatch(launch["kernel"], launch["grid"], launch["threads"], launch["buffers"], tgm)
    else:
        fake = FakeCompileShader(tmp_path)
        rt.RuntimeKernels(fake, METAL_DIR).run(launch)
        assert len(fake.sources) == 1
    want = mlxq.affine_gather_matmul(x.float(), wq, s, b, None, rhs, 32, 3).to(x.dtype)
    _assert_close(launch["outputs"][0], want)


# Bugs planted in affine_gather_rhs.h (one line each): the emulator's race check must report them.
SORTED_PLANTS = {
    "output_not_published": (  # threads read the output tile before other simdgroups store it
        "    qmm_stage_out(acc, sy, sx, xs);\n"
        "    threadgroup_barrier(mem_flags::mem_threadgroup);\n",
        "    qmm_stage_out(acc, sy, sx, xs);\n    threadgroup_barrier(mem_flags::mem_none);\n",
        r"race on threadgroup\(0\) memory",
    ),
    "indices_not_published": (  # threads read the block's staged indices before they are written
        "    x_mat[tid] = lhs[pair];\n  }\n  threadgroup_barrier(mem_flags::mem_threadgroup);\n",
        "    x_mat[tid] = lhs[pair];\n  }\n  threadgroup_barrier(mem_flags::mem_none);\n",
        r"race on threadgroup\(1\) memory",
    ),
}


@pytest.mark.parametrize("plant", [None, *sorted(SORTED_PLANTS)])
def test_sorted_gather_planted_bugs_are_reported(plant, gen, tmp_path) -> None:
    """A copy of metal/ with one line of the sorted kernel changed (one instantiation, so that it
    compiles in seconds), run on RUNS: the unchanged copy passes, each plant raises a race."""
    import shutil
    from pathlib import Path

    src = tmp_path / "metal"
    shutil.copytree(Path(__file__).resolve().parents[1] / "metal", src)
    if plant is not None:
        old, new, _ = SORTED_PLANTS[plant]
        header = src / "affine_gather_rhs.h"
        text = header.read_text()
        assert old in text, f"affine_gather_rhs.h no longer contains {old!r}"
        header.write_text(text.replace(old, new, 1))
    kernel = "affine_gather_qmm_rhs_t_half_gs32_b4"
    metal = src / "affine_gather_qmm_rhs.metal"
    lines = metal.read_text().splitlines()
    keep = [ln for ln in lines if "MLXQ_INSTANTIATE(" not in ln or f'"{kernel}"' in ln]
    metal.write_text("\n".join(keep) + "\n")
    lib = emu.Library([metal])

    wq, s, b = _experts(gen, len(RUNS), 20, 64, 32, 4, torch.float16)
    rhs = _sorted_rhs(RUNS)
    x = torch.randn(rhs.numel(), 1, 64, generator=gen).to(torch.float16)
    launch = mlxq._C.metal_launch_affine_gather_matmul(x, wq, s, b, None, rhs, 32, 4, True, True)
    assert launch["kernel"] == kernel
    y = launch["outputs"][0].fill_(float("nan"))
    tgm = dict(launch["threadgroup_memory"])
    if plant is None:
        lib.dispatch(kernel, launch["grid"], launch["threads"], launch["buffers"], tgm)
        want = mlxq.affine_gather_matmul(x.float(), wq, s, b, None, rhs, 32, 4).to(x.dtype)
        _assert_close(y, want)
    else:
        with pytest.raises(emu.EmulatorError, match=SORTED_PLANTS[plant][2]):
            lib.dispatch(kernel, launch["grid"], launch["threads"], launch["buffers"], tgm)


def test_sorted_gather_offsets_are_64_bit(gen) -> None:
    """The last threadgroup of a legal sorted gather whose output has 2^32 elements (2^22 pairs
    of 16 rows, 64 outputs; the plan bounds rows, not rows x outputs), with full index buffers
    and tiny x, weights and output: 64-bit offsets reach the output row and are refused as an
    out-of-bounds write, where 32-bit ones would be reported as a signed integer overflow."""
    pairs, m, n, k = 1 << 22, 16, 64, 32
    wq, s, b = _experts(gen, 1, n, k, 32, 4, torch.float32)
    x = torch.empty(1, m, k, device="meta")  # the plan only needs shapes
    idx = torch.empty(pairs, dtype=torch.long, device="meta")
    plan = mlxq._C.plan_affine_gather_matmul(
        x, wq.to("meta"), s.to("meta"), b.to("meta"), idx, idx, 32, 4, True, True
    )
    assert plan["kernel"] == "affine_gather_qmm_rhs_t_float_gs32_b4"
    assert plan["grid"] == (2, pairs * m // 32, 1)
    lhs_flat = torch.zeros(pairs, dtype=torch.int32)  # every pair reads x's matrix 0
    buffers = {
        0: torch.randn(m, k, generator=gen),
        1: wq.view(torch.int32).contiguous(),
        2: s.contiguous(),
        3: b.contiguous(),
        4: torch.zeros(64),
        5: plan["params"],
        6: lhs_flat,
        7: torch.zeros(pairs, dtype=torch.int32),
    }
    last = tuple(g - 1 for g in plan["grid"])
    with pytest.raises(emu.EmulatorError, match=r"out-of-bounds write .* of buffer\(4\)"):
        emu.dispatch(
            plan["kernel"],
            plan["grid"],
            plan["threads"],
            buffers,
            dict(plan["threadgroup_memory"]),
            only_threadgroup=last,
        )
