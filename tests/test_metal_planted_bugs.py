"""Regression suite of the MSL emulator: realistic bugs planted in the real kernels of metal/.

Each case copies metal/ into a temporary directory, changes one line of one kernel (the kind of
slip the emulator missed before issue 17, and a few it always caught), keeps a single
instantiation (so that a case compiles in seconds) and runs it the way the dispatch plan does.
The emulator must refuse it with a message naming the kernel, the buffer and the thread, or
(for the traffic and fast-math cases) the check the kernel tests apply must fail. Each case first
checks the unmutated copy passes, so that a case cannot pass by breaking the harness.

The mutated libraries are built with `emu.Library` directly, never registered with
`emu.load_library`, so they cannot shadow the real kernels for other tests.
"""

from __future__ import annotations

import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import mlxq
import pytest
import torch
from mlxq._native import _C
from mlxq.testing import metal_emulator as emu
from oracles import affine_quantize_ref

pytestmark = pytest.mark.skipif(not emu.available(), reason="no clang >= 17 for the emulator")

METAL_DIR = Path(__file__).resolve().parents[1] / "metal"
GS, BITS = 64, 4


@dataclass(frozen=True)
class Plant:
    """One planted bug: `old` -> `new` in `header`, exercised by `op`."""

    header: str
    old: str
    new: str
    op: str  # "qmv" | "qvm" | "quantize"
    expect: str  # regex on the error (EmulatorError message or failed check)


PLANTS = {
    # Execution-only barrier where threadgroup memory must be ordered (slipped before issue 17).
    "qvm_mem_none_barrier": Plant(
        "affine_qvm.h",
        "threadgroup_barrier(mem_flags::mem_threadgroup);",
        "threadgroup_barrier(mem_flags::mem_none);",
        "qvm",
        r"^affine_qvm_half_gs64_b4: race on threadgroup\(0\) memory at byte offset \d+: .*"
        r"thread \d+ \(lane \d+ of simdgroup \d+\)",
    ),
    # Thread-private array one element short (slipped before issue 17).
    "qmv_private_array_short": Plant(
        "affine_qmv.h",
        "float xs[32];",
        "float xs[31];",
        "qmv",
        r"^affine_qmv_half_gs64_b4: out-of-bounds access to 'float' at 0x[0-9a-f]+ past the end "
        r"of its thread-private object at .*affine_qmv\.h:\d+ by thread 0 \(lane 0",
    ),
    # Two lanes write the same output element (a write race inside one threadgroup).
    "qmv_two_lanes_write": Plant(
        "affine_qmv.h",
        "if (lane == 0 && n0 + r < N) {",
        "if (lane < 2 && n0 + r < N) {",
        "qmv",
        r"^affine_qmv_half_gs64_b4: race on buffer\(4\) at byte offset 0: written by thread 1 "
        r"\(lane 1 of simdgroup 0\) .* and by thread 0",
    ),
    # x reloaded from device memory for every weight row instead of once per chunk (slipped).
    "qmv_x_reloaded_per_row": Plant(
        "affine_qmv.h",
        "acc[m][r] += s[r] * dot32<BITS>(w[r], xs) + b[r] * xsum;",
        "acc[m][r] += s[r] * dot32<BITS>(w[r], xs) + b[r] * load_x32<T, BITS>(x + long(m) * K + "
        "k, xs);",
        "qmv",
        r"^affine_qmv_half_gs64_b4: read \d+ B of x \(buffer\(0\)\), bound \d+ B",
    ),
    # Output row bound off by one.
    "qmv_row_bound": Plant(
        "affine_qmv.h",
        "if (lane == 0 && n0 + r < N) {",
        "if (lane == 0 && n0 + r <= N) {",
        "qmv",
        r"^affine_qmv_half_gs64_b4: (out-of-bounds write of 2 bytes at byte offset \d+ of "
        r"buffer\(4\)|race on buffer\(4\) at byte offset \d+: written by threadgroups) .*"
        r"thread \d+",
    ),
    # A missing barrier before threadgroup memory is reused.
    "qvm_missing_barrier": Plant(
        "affine_qvm.h",
        "threadgroup_barrier(mem_flags::mem_threadgroup);",
        "",
        "qvm",
        r"^affine_qvm_half_gs64_b4: (race on|read of never-written) threadgroup\(0\) memory .*"
        r"by thread \d+",
    ),
    # 32-bit index arithmetic: the group's first element as int (never reached by small shapes).
    "dequantize_int_offset": Plant(
        "affine_quantize.h",
        "device T* dst = out + long(gid) * GS;",
        "device T* dst = out + int(gid) * GS;",
        "dequantize",
        r"^affine_dequantize_half_gs64_b4: signed integer overflow \(multiplication of 'int'\) "
        r"at .*affine_quantize\.h:\d+ by thread \d+ .*compute it in 64 bits",
    ),
    # Fast-math division in the quantizer (slipped before issue 17).
    "quantize_plain_divide": Plant(
        "affine_quantize.h",
        "const float r = precise::divide(v[j] - b, s);",
        "const float r = (v[j] - b) / s;",
        "quantize",
        r"^affine_quantize_half_gs64_b4: packed weights differ from MLX's GPU rule",
    ),
}


def _build(tmp_path: Path, op: str, plant: Plant | None) -> emu.Library:
    kernel = f"affine_{op}_half_gs{GS}_b{BITS}"
    src = tmp_path / "metal"
    shutil.copytree(METAL_DIR, src)
    if plant is not None:
        header = src / plant.header
        text = header.read_text()
        assert plant.old in text, f"{plant.header} no longer contains {plant.old!r}"
        header.write_text(text.replace(plant.old, plant.new, 1))
    metal = src / f"affine_{'quantize' if 'quantize' in op else op}.metal"
    lines = metal.read_text().splitlines()
    keep = [ln for ln in lines if "MLXQ_INSTANTIATE(" not in ln or f'"{kernel}"' in ln]
    metal.write_text("\n".join(keep) + "\n")
    return emu.Library([metal])


def _dispatch(lib: emu.Library, plan: dict, tensors: dict[str, torch.Tensor]) -> emu.DispatchReport:
    buffers = {i: plan["params"] if r == "params" else tensors[r] for i, r in plan["bindings"]}
    tgm = dict(plan["threadgroup_memory"])
    return lib.dispatch(plan["kernel"], plan["grid"], plan["threads"], buffers, tgm)


def _run(lib: emu.Library, op: str) -> None:
    """Runs `op` with the kernel of `lib`; raises EmulatorError or AssertionError on a bug."""
    gen = torch.Generator().manual_seed(17)
    dtype = torch.float16
    if op == "quantize":
        w = torch.randn(16, 256, generator=gen).to(dtype)
        # A group whose exact quotient (v - b) / s is a tie (7.5: 8 under either rounding) that
        # a * (1 / b) misses: random data almost never lands within an ulp of a tie.
        m = 0.43359375
        w[0, :GS] = torch.tensor([0.0, m, m / 2] * (GS // 3) + [0.0] * (GS % 3), dtype=dtype)
        plan = _C.plan_affine_quantize(w, GS, BITS)
        qshape, sshape, _ = plan["out_shapes"]
        wq = torch.zeros(qshape, dtype=torch.uint32)
        s, b = torch.zeros(sshape, dtype=dtype), torch.zeros(sshape, dtype=dtype)
        _dispatch(lib, plan, {"w": w, "wq": wq, "scales": s, "biases": b})
        ref = affine_quantize_ref(w, GS, BITS, "gpu")  # MLX's Metal rule, in float64
        if not torch.equal(wq.view(torch.int32), ref[0].contiguous().view(torch.int32)):
            raise AssertionError(f"{plan['kernel']}: packed weights differ from MLX's GPU rule")
        assert torch.equal(s, ref[1]) and torch.equal(b, ref[2]), plan["kernel"]
        return
    if op == "dequantize":
        _huge_dequantize(lib)
        return
    transpose = op == "qmv"
    N, K, M = 37, 512, 3  # N not a multiple of the rows per threadgroup
    wq, s, b = mlxq.affine_quantize(torch.randn(N, K, generator=gen).to(dtype), GS, BITS)
    x = torch.randn(M, K if transpose else N, generator=gen).to(dtype)
    plan = _C.plan_affine_matmul(x, wq, s, b, GS, BITS, transpose)
    y = torch.full(plan["out_shapes"][0], float("nan"), dtype=dtype)
    rep = _dispatch(lib, plan, {"x": x, "wq": wq, "scales": s, "biases": b, "out": y})
    ref = mlxq.affine_matmul(x.float(), wq, s, b, GS, BITS, transpose).to(x.dtype)  # fp32 tiles
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    # The traffic bound of tests/test_metal_kernels.py: x once per simdgroup (qmv) or
    # threadgroup column (qvm).
    xi = next(i for i, r in plan["bindings"] if r == "x")
    times = plan["grid"][0] * (-(-plan["threads"][0] // 32) if op == "qmv" else 1)
    got, bound = rep.bytes_read[xi], times * x.nbytes
    if got > bound:
        raise AssertionError(f"{plan['kernel']}: read {got} B of x (buffer({xi})), bound {bound} B")


def _huge_dequantize(lib: emu.Library) -> None:
    """The last threadgroup of a dequantize whose output has 3 * 2^30 elements (legal: the plan
    bounds rows * groups, not rows * K), with params claiming that shape, scales and biases of
    that size (96 MiB each) and tiny packed weights and output: the kernel's 64-bit offsets leave
    those (an out-of-bounds error), 32-bit ones overflow."""
    kernel = f"affine_dequantize_half_gs{GS}_b{BITS}"
    rows, K = 3 << 15, 1 << 15
    groups = K // GS
    wq = torch.zeros(64, dtype=torch.uint32)
    s = bytes(torch.ones(rows * groups, dtype=torch.float16).view(torch.uint8).numpy())
    b = bytes(rows * groups * 2)
    out = torch.zeros(64, dtype=torch.float16)
    grid = (rows * groups // 64, 1, 1)
    params = struct.pack("<3i", rows, K, groups)
    try:
        lib.dispatch(kernel, grid, 64, {0: wq, 1: s, 2: b, 3: out, 4: params}, None, (grid[0] - 1,))
    except emu.EmulatorError as e:
        if "out-of-bounds" not in str(e):
            raise
        assert re.search(r"out-of-bounds (read|write) .* of buffer\((0|3)\)", str(e)), str(e)


@pytest.mark.parametrize("op", ["qmv", "qvm", "quantize", "dequantize"])
def test_unmutated_kernels_pass(tmp_path: Path, op: str) -> None:
    _run(_build(tmp_path, op, None), op)


@pytest.mark.parametrize("name", sorted(PLANTS))
def test_planted_bug_is_reported(tmp_path: Path, name: str) -> None:
    plant = PLANTS[name]
    lib = _build(tmp_path, plant.op, plant)
    with pytest.raises((emu.EmulatorError, AssertionError)) as e:
        _run(lib, plant.op)
    assert re.search(plant.expect, str(e.value)), str(e.value)
