"""The MSL emulator's own semantics, on small kernels in tests/metal_kernels/.

Barriers, SIMD/quad collectives, simdgroup_matrix, memory checks (out of bounds, unwritten
threadgroup memory, races), divergence reports, the strict address-space pass, traffic counts and
half/bfloat arithmetic. The op kernels of metal/ are tested elsewhere.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from mlxq.testing import metal_emulator as emu
from mlxq.testing.metal_emulator import _source
from oracles import assert_product_within

KERNELS = Path(__file__).parent / "metal_kernels"

pytestmark = pytest.mark.skipif(not emu.available(), reason="no clang >= 17 for the emulator")


@pytest.fixture(scope="module")
def lib() -> emu.Library:
    return emu.load_library([KERNELS / "emu_basic.metal", KERNELS / "emu_bugs.metal"])


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def test_entry_points_and_bindings(lib: emu.Library) -> None:
    copy = lib.kernels["copy_float"]
    assert copy.function == "copy<float>"
    assert copy.buffer_indices == [0, 1, 2]
    assert lib.kernels["reverse_tg"].threadgroup_indices == [0]
    assert "sg_matmul_bfloat" in lib.kernels and "war_race" in lib.kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_copy_and_exact_traffic(lib: emu.Library, dtype: torch.dtype) -> None:
    n = 1000
    x = torch.randn(n).to(dtype)
    y = torch.zeros(n, dtype=dtype)
    name = "copy_float" if dtype == torch.float32 else "copy_half"
    rep = emu.dispatch(name, (8, 1, 1), (128, 1, 1), {0: x, 1: y, 2: u32(n)})
    assert torch.equal(x, y)
    size = x.element_size()
    assert rep.bytes_read[0] == n * size and rep.bytes_written[0] == 0
    assert rep.bytes_written[1] == n * size and rep.bytes_read[1] == 0
    assert rep.bytes_read[2] == 8 * 128 * 4  # every thread reads n once
    assert emu.last_dispatch_report() == rep
    assert (
        rep.kernel == name and rep.grid == (8, 1, 1) and rep.threads_per_threadgroup == (128, 1, 1)
    )


def test_barrier_orders_threadgroup_memory(lib: emu.Library) -> None:
    x = torch.randn(4 * 256)
    y = torch.zeros_like(x)
    rep = emu.dispatch("reverse_tg", (4, 1, 1), (256, 1, 1), {0: x, 1: y}, {0: 256 * 4})
    assert torch.equal(y, x.view(4, 256).flip(1).reshape(-1))
    assert rep.threadgroup_bytes == 1024


def test_threadgroup_memory_limit(lib: emu.Library) -> None:
    x = torch.randn(256)
    with pytest.raises(emu.EmulatorError, match="threadgroup memory of 40000 bytes exceeds"):
        emu.dispatch("reverse_tg", 1, 256, {0: x, 1: torch.zeros(256)}, {0: 40000})


def test_static_threadgroup_array_reused_across_threadgroups(lib: emu.Library) -> None:
    nx, ny = 16, 8  # 128 threads as a 2-D threadgroup, grid of 3 threadgroups in y
    x = torch.randn(nx * ny)
    y = torch.zeros(3 * nx * ny)
    rep = emu.dispatch("reverse_static", (1, 3, 1), (nx, ny, 1), {0: x, 1: y})
    assert rep.threadgroup_bytes == nx * ny * 4  # the part of buf[256] the threads wrote
    count = nx * ny
    for gy in range(3):
        g = torch.tensor([gy * ny * 1000 + 0.0])  # gid.y * 1000 + gid.x for tid's position
        tid = torch.arange(count)
        pos_x, pos_y = tid % nx, tid // nx
        gid_term = ((gy * ny + pos_y) * 1000 + pos_x) % 7
        buf = x + gid_term.float()
        rev = buf.flip(0) * 2.0
        expect = rev[(tid + 1) % count]
        assert torch.equal(y[gy * count : (gy + 1) * count], expect), g


def _simd_reference(x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.numel(), 16)
    for s in range(0, x.numel(), 32):
        v = x[s : s + 32].double()
        lane = torch.arange(32)
        o = out[s : s + 32]
        o[:, 0] = v.sum().float()
        o[:, 1] = v.max().float()
        o[:, 2] = v.min().float()
        o[:, 3] = v.cumsum(0).float()
        o[:, 4] = (v.cumsum(0) - v).float()
        o[:, 5] = v[(lane + 5) % 32].float()
        o[:, 6] = torch.where(lane + 3 < 32, v[(lane + 3).clamp(max=31)], v).float()
        o[:, 7] = torch.where(lane >= 2, v[(lane - 2).clamp(min=0)], v).float()
        o[:, 8] = v[lane ^ 7].float()
        o[:, 9] = v[9].float()
        q = v.view(8, 4)
        o[:, 10] = q.sum(1).repeat_interleave(4).float()
        o[:, 11] = q.flip(1).reshape(-1).float()
        o[:, 12] = v[lane ^ 1].float()
        o[:, 13] = float(sum(range(32)))
        o[:, 14] = float((v > 0).any()) + (2.0 if bool((v > -100).all()) else 0.0)
        o[:, 15] = (2 * v).sum().float()
    return out


def test_simd_and_quad_collectives(lib: emu.Library) -> None:
    # Integer-valued inputs: sums are exact in any order.
    x = torch.randint(-50, 50, (128,)).float()
    out = torch.zeros(128 * 16)
    emu.dispatch("simd_ops", (2, 1, 1), (64, 1, 1), {0: x, 1: out})
    torch.testing.assert_close(out.view(128, 16), _simd_reference(x), rtol=0, atol=0)


def test_collective_over_partial_simdgroup(lib: emu.Library) -> None:
    x = torch.randint(-9, 9, (64,)).float()
    out = torch.full((64,), -1.0)
    # 40 active threads: simdgroup 0 full, simdgroup 1 has lanes 0-7 active.
    emu.dispatch("simd_sum_partial", (1, 1, 1), (64, 1, 1), {0: x, 1: out, 2: u32(40)})
    assert torch.equal(out[:32], x[:32].sum().expand(32))
    assert torch.equal(out[32:40], x[32:40].sum().expand(8))
    assert torch.equal(out[40:], torch.full((24,), -1.0))


@pytest.mark.parametrize(
    "name,dtype,transpose_b",
    [
        ("sg_matmul_float", torch.float32, False),
        ("sg_matmul_half", torch.float16, False),
        ("sg_matmul_bfloat", torch.bfloat16, False),
        ("sg_matmul_float_bt", torch.float32, True),
    ],
)
def test_simdgroup_matrix_multiply(
    lib: emu.Library, name: str, dtype: torch.dtype, transpose_b: bool
) -> None:
    m, n, k = 24, 32, 40
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    b_arg = b.t().contiguous() if transpose_b else b
    c = torch.zeros(m, n)
    # Two simdgroups per threadgroup, each computes one 8x8 tile of C.
    rep = emu.dispatch(
        name,
        (n // 16, m // 8, 1),
        (64, 1, 1),
        {0: a, 1: b_arg, 2: c, 3: struct.pack("<4I", m, n, k, 0)},
    )
    # fp32 accumulation of k products: the derived bound of the float64 product
    assert_product_within(c, a, b, name)
    # Every element of A is loaded once per tile column, B once per tile row.
    assert rep.bytes_read[0] == a.numel() * a.element_size() * (n // 8)
    assert rep.bytes_read[1] == b.numel() * b.element_size() * (m // 8)
    assert rep.bytes_written[2] == c.numel() * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_bfloat_arithmetic(lib: emu.Library, dtype: torch.dtype) -> None:
    n = 256
    x = (torch.randn(n) * 3).to(dtype)
    y = torch.zeros(n, dtype=dtype)
    f = torch.zeros(n)
    bits = torch.zeros(n, dtype=torch.int16)
    name = "arith_half" if dtype == torch.float16 else "arith_bfloat"
    emu.dispatch(name, (2, 1, 1), (128, 1, 1), {0: x, 1: y, 2: f, 3: bits})
    # Each operation rounds to the type, as torch's CPU half/bfloat ops do.
    assert torch.equal(y, x * x + x)
    xf = x.float()
    v4 = torch.stack([xf, (x * 2).float(), torch.full_like(xf, 0.5), -xf])
    assert torch.equal(f, 0.25 + v4[0] + v4[1] + v4[2] + v4[3])
    assert torch.equal(bits, x.view(torch.int16))


def test_out_of_bounds_write_is_reported(lib: emu.Library) -> None:
    x = torch.randn(64)
    y = torch.zeros(64)
    with pytest.raises(emu.EmulatorError) as e:
        emu.dispatch("oob_write", (1, 1, 1), (64, 1, 1), {0: x, 1: y})
    msg = str(e.value)
    assert "oob_write" in msg and "out-of-bounds write" in msg
    assert "buffer(1)" in msg and "byte offset 256" in msg and "thread 63" in msg


def test_out_of_bounds_read_is_reported(lib: emu.Library) -> None:
    with pytest.raises(emu.EmulatorError, match=r"out-of-bounds read .* offset -4 of buffer\(0\)"):
        emu.dispatch("oob_read", (1, 1, 1), (32, 1, 1), {0: torch.randn(32), 1: torch.zeros(32)})


def test_read_of_unwritten_threadgroup_memory_is_reported(lib: emu.Library) -> None:
    x = torch.randn(64)
    with pytest.raises(emu.EmulatorError, match=r"never-written threadgroup\(0\) memory"):
        emu.dispatch("missing_barrier", (1, 1, 1), (64, 1, 1), {0: x, 1: torch.zeros(64)}, {0: 256})


def test_write_after_read_race_is_reported(lib: emu.Library) -> None:
    with pytest.raises(emu.EmulatorError, match=r"race on threadgroup array .* after a read"):
        emu.dispatch("war_race", (1, 1, 1), (64, 1, 1), {0: torch.randn(64), 1: torch.zeros(64)})


@pytest.mark.parametrize(
    "kernel,threads,pattern",
    [
        ("divergent_collective", 32, r"divergent collective .*simd_sum.*simd_max"),
        ("divergent_loop", 32, r"divergent collective"),
        ("exit_before_barrier", 64, r"threadgroup_barrier not reached .*exited"),
    ],
)
def test_divergence_is_reported_not_hung(
    lib: emu.Library, kernel: str, threads: int, pattern: str
) -> None:
    with pytest.raises(emu.EmulatorError, match=pattern):
        emu.dispatch(kernel, (1, 1, 1), (threads, 1, 1), {0: torch.randn(64), 1: torch.zeros(64)})


def test_emulator_recovers_after_errors(lib: emu.Library) -> None:
    with pytest.raises(emu.EmulatorError):
        emu.dispatch("oob_write", (1, 1, 1), (64, 1, 1), {0: torch.randn(64), 1: torch.zeros(64)})
    x = torch.randn(256)
    y = torch.zeros(256)
    emu.dispatch("reverse_tg", (1, 1, 1), (256, 1, 1), {0: x, 1: y}, {0: 1024})
    assert torch.equal(y, x.flip(0))


def test_bad_dispatches_raise_clear_errors(lib: emu.Library) -> None:
    with pytest.raises(emu.EmulatorError, match="unknown kernel 'copy_flaot'.*copy_float"):
        lib.dispatch("copy_flaot", 1, 32, {})
    with pytest.raises(emu.EmulatorError, match=r"buffer\(2\) .*not bound"):
        emu.dispatch("copy_float", 1, 32, {0: torch.zeros(32), 1: torch.zeros(32)})
    with pytest.raises(emu.EmulatorError, match=r"threadgroup\(0\) .*has no size"):
        emu.dispatch("reverse_tg", 1, 32, {0: torch.zeros(32), 1: torch.zeros(32)})
    with pytest.raises(emu.EmulatorError, match="exceeds 1024"):
        emu.dispatch(
            "copy_float", 1, (64, 32, 1), {0: torch.zeros(1), 1: torch.zeros(1), 2: u32(1)}
        )
    x = torch.zeros(64)
    with pytest.raises(emu.EmulatorError, match=r"buffer\(0\) and buffer\(1\) share memory"):
        emu.dispatch("copy_float", 1, 32, {0: x[:32], 1: x[16:48], 2: u32(32)})
    with pytest.raises(emu.EmulatorError, match="contiguous"):
        emu.dispatch(
            "copy_float", 1, 32, {0: torch.zeros(4, 8).t(), 1: torch.zeros(32), 2: u32(32)}
        )


def test_strict_pass_rejects_address_space_mistake() -> None:
    emu.check_syntax_strict(KERNELS / "emu_basic.metal")
    emu.check_syntax_strict(KERNELS / "emu_bugs.metal")
    with pytest.raises(emu.EmulatorError) as e:
        emu.check_syntax_strict(KERNELS / "emu_strict_bad.metal")
    msg = str(e.value)
    # A threadgroup array passed as a device pointer, and a store to constant memory.
    assert "emu_strict_bad.metal" in msg and "store_twice" in msg and "address_space(3)" in msg
    assert "read-only variable is not assignable" in msg and "params[tid] = 1.0f" in msg


def test_kernel_parameters_need_address_spaces(tmp_path: Path) -> None:
    src = tmp_path / "no_space.metal"
    src.write_text(
        "#include <metal_stdlib>\nusing namespace metal;\n"
        "[[kernel]] void k(float* x [[buffer(0)]], uint i [[thread_position_in_grid]]) "
        "{ x[i] = 0; }\n"
    )
    with pytest.raises(emu.EmulatorError, match="needs the device or constant address space"):
        emu.load_library(src)


def test_faults_in_kernel_code_are_reported(lib: emu.Library) -> None:
    with pytest.raises(emu.EmulatorError, match="invalid memory access at 0x10 "):
        emu.dispatch("wild_pointer", 1, 32, {0: torch.zeros(32), 1: struct.pack("<Q", 16)})
    with pytest.raises(emu.EmulatorError, match="stack overflow"):
        emu.dispatch("stack_overflow", 1, 32, {0: torch.zeros(32)})
    x = torch.randn(64)
    y = torch.zeros(64)
    emu.dispatch("reverse_tg", 1, 64, {0: x, 1: y}, {0: 256})
    assert torch.equal(y, x.flip(0))


def test_msl_idioms() -> None:
    lib = emu.load_library(KERNELS / "emu_idioms.metal")
    v = [1.0, 2.0, 0.5, -3.0]
    w = [4.0, -1.0, 2.0, 8.0]
    x = torch.tensor([v, w])
    out = torch.zeros(34)
    lib.dispatch("idioms", 1, 1, {0: x, 1: out, 2: struct.pack("<if", 5, 0.25)})
    h01 = float(torch.tensor(0.1).half())
    expect = [
        2.0 + 10 * 1.0 + 100 * 1.5 + 1000 * 1.5,
        2 + 4 + 1 + 6,
        -3.0,
        7.0 + 1.0,
        -2.0,
        4.0 + 2.0 + 2.0 + 8.0,
        1.0,
        0.0,
        4.0 - 2.0 + 1.0 - 24.0,
        1.0 + 2.0,
        0.5,
        5.0,
        1.0 / -1.0,
        2.0 + 3.0 - 2.0 - 1.0,
        7.0 + 0.25 + 0.5,
        1.0,
        127.0,
        65504.0,
        -(2.0**31),
        8.0 + 4.0 + 0.5,
        3 * 5 + 0.25,
        3.0,
        2.0,
        8.0 + 31.0 + 3.0,
        h01,
        -1.0,
        0.0 + 65535.0,
        43.0,
        5.0,
        2.5,
        9.0,
        8.0 + 1600.0,
        1.0 + 2.0,
        2 + 4 + 1 + 6 + 16,
    ]
    got = out.tolist()
    assert got == pytest.approx(expect, rel=1e-6, abs=0), list(zip(got, expect, strict=True))


def test_device_races_between_threadgroups_are_reported(lib: emu.Library) -> None:
    with pytest.raises(emu.EmulatorError, match=r"buffer\(0\) .*written by threadgroups #0 and #1"):
        emu.dispatch("overlapping_tiles", 2, 32, {0: torch.zeros(32)})
    with pytest.raises(emu.EmulatorError, match=r"read by .* after threadgroup #0 wrote it"):
        emu.dispatch("cross_threadgroup_read", 2, 32, {0: torch.zeros(64)})
    emu.dispatch("overlapping_tiles", 1, 32, {0: torch.zeros(32)})  # one threadgroup: fine


def test_kernel_keyword_and_grid_builtins(lib: emu.Library) -> None:
    grid, threads = (2, 3, 2), (4, 2, 5)  # 40 threads: 2 simdgroups
    n = 2 * 4 * 3 * 2 * 2 * 5
    out = torch.zeros(n, 4, dtype=torch.int32)
    emu.dispatch("grid_ids", grid, threads, {0: out})
    z, y, x = torch.meshgrid(torch.arange(10), torch.arange(6), torch.arange(8), indexing="ij")
    assert torch.equal(out[:, 0], x.reshape(-1).int())
    assert torch.equal(out[:, 1], (y // 2).reshape(-1).int())
    assert torch.equal(out[:, 2], (z // 5).reshape(-1).int())
    assert torch.equal(out[:, 3], torch.full((n,), 232, dtype=torch.int32))


def test_simdgroup_matrix_lane_layout(lib: emu.Library) -> None:
    m = torch.arange(64.0)
    out = torch.zeros(2, 32, 2)
    emu.dispatch("sg_layout", 1, 32, {0: m, 1: out})
    for lane in range(32):
        # Apple's layout, as MLX's steel kernels state it (BaseMMAFrag::get_coord).
        qid = lane // 4
        row = (qid & 4) + (lane // 2) % 4
        col = (qid & 2) * 2 + (lane % 2) * 2
        assert out[0, lane].tolist() == [row * 8 + col, row * 8 + col + 1]
        assert out[1, lane].tolist() == [col * 8 + row, (col + 1) * 8 + row]


def test_simdgroup_matrix_through_threadgroup_memory(lib: emu.Library) -> None:
    x = torch.randn(64)
    y = torch.zeros(64)
    emu.dispatch("sg_tg_roundtrip", 1, 32, {0: x, 1: y})
    assert torch.equal(y, 2 * x)


@pytest.mark.parametrize(
    "decl,shared",
    [
        ("threadgroup float buf[(64 + 1) * 2];", True),
        ("threadgroup float a[4], b[4];", True),
        ("threadgroup vec<float, 4> v[N];", True),
        ("threadgroup float s;", True),
        ("void f(threadgroup float* tg, int x) {}", False),
        ("void g(threadgroup float& r) {}", False),
        ("auto p = (threadgroup float*)x;", False),
        ("threadgroup float* ptrs[4];", False),
        ("threadgroup T (&ref)[4] = x;", False),
        ("threadgroup_barrier(mem_flags::mem_threadgroup);", False),
    ],
)
def test_threadgroup_variables_are_shared(decl: str, shared: bool) -> None:
    # Only variable declarations become one array per threadgroup; pointers stay per thread.
    assert ("MLXQ_TG_VAR" in _source.rewrite(decl)) == shared


@pytest.mark.parametrize(
    "code,expect",
    [
        ("y = (float4)h + 1;", "y = ::mlxq_emu::make_vec<float4>(h) + 1;"),
        ("y = (uint4)(a * b).xy;", "y = ::mlxq_emu::make_vec<uint4>((a * b).xy);"),
        ("y = (float2)x.yz * 2;", "y = ::mlxq_emu::make_vec<float2>(x.yz) * 2;"),
        ("y = (float4)f(a, b)[2] - c;", "y = ::mlxq_emu::make_vec<float4>(f(a, b)[2]) - c;"),
        ("y = (half)p->v.x;", "y = ::mlxq_emu::make_vec<half>(p->v.x);"),
        ("n = sizeof(float4) * 2;", "n = sizeof(float4) * 2;"),
        ("y = (float)x;", "y = (float)x;"),
    ],
)
def test_c_style_vector_casts_convert(code: str, expect: str) -> None:
    # clang would bit-cast same-size vectors; MSL converts element-wise.
    assert _source._rewrite_c_casts(code) == expect


# --- issue 17: barrier flags, races inside one threadgroup, thread-private bounds ---------------


def test_mem_none_barrier_does_not_order_threadgroup_memory(lib: emu.Library) -> None:
    x = torch.randn(64)
    with pytest.raises(emu.EmulatorError) as e:
        emu.dispatch("mem_none_barrier", 1, 64, {0: x, 1: torch.zeros(64)}, {0: 256})
    msg = str(e.value)
    assert msg.startswith("mem_none_barrier: race on threadgroup(0) memory"), msg
    assert "thread 0 (lane 0" in msg and "mem_flags::mem_threadgroup" in msg
    with pytest.raises(emu.EmulatorError, match=r"wrong_flags_barrier: race on threadgroup array"):
        emu.dispatch("wrong_flags_barrier", 1, 64, {0: x, 1: torch.zeros(64)})


@pytest.mark.parametrize("flags", [0, 1])
def test_simdgroup_barrier_flags(lib: emu.Library, flags: int) -> None:
    x = torch.randn(32)
    y = torch.zeros(32)
    if flags == 0:
        with pytest.raises(emu.EmulatorError, match=r"simd_exchange: race on threadgroup array"):
            emu.dispatch("simd_exchange", 1, 32, {0: x, 1: y, 2: u32(flags)})
    else:
        emu.dispatch("simd_exchange", 1, 32, {0: x, 1: y, 2: u32(flags)})
        assert torch.equal(y, x.flip(0))


def test_device_write_race_inside_one_threadgroup(lib: emu.Library) -> None:
    with pytest.raises(emu.EmulatorError) as e:
        emu.dispatch("device_write_race", 1, 32, {0: torch.randn(32), 1: torch.zeros(1)})
    msg = str(e.value)
    assert msg.startswith("device_write_race: race on buffer(1) at byte offset 0"), msg
    assert "written by thread 1 (lane 1" in msg and "and by thread 0" in msg


@pytest.mark.parametrize("flags", [0, 1])
def test_device_memory_needs_a_mem_device_barrier(lib: emu.Library, flags: int) -> None:
    buf, y = torch.zeros(64), torch.zeros(64)
    if flags == 0:
        with pytest.raises(emu.EmulatorError) as e:
            emu.dispatch("device_exchange", 1, 64, {0: buf, 1: y, 2: u32(flags)})
        msg = str(e.value)
        assert msg.startswith("device_exchange: race on buffer(0) at byte offset 4"), msg
        assert "read by thread 0 " in msg and "mem_flags::mem_device" in msg
    else:
        emu.dispatch("device_exchange", 1, 64, {0: buf, 1: y, 2: u32(flags)})
        assert torch.equal(y, (torch.arange(64) + 1).remainder(64).float())


def test_thread_private_array_bounds(lib: emu.Library) -> None:
    x = torch.randn(4 * 32)
    y = torch.zeros(4)
    ok = emu.dispatch("private_overflow", 1, 4, {0: x[: 4 * 31].contiguous(), 1: y, 2: u32(31)})
    assert ok.bytes_written[1] == 16
    terms = x[: 4 * 31].view(4, 31).double() * torch.arange(31).double()
    # fp32 sums of 31 terms, in the kernel's order: within 31 roundings of the sum of |terms|
    # of the float64 sum (torch's own fp32 sum adds in another order)
    bound = 31 * 2.0**-24 * terms.abs().sum(1)
    assert ((y.double() - terms.sum(1)).abs() <= bound).all()
    with pytest.raises(emu.EmulatorError) as e:
        emu.dispatch("private_overflow", 1, 4, {0: x, 1: y, 2: u32(32)})
    msg = str(e.value)
    assert msg.startswith("private_overflow: out-of-bounds index 31 into fixed-size array"), msg
    assert "float[31]" in msg and "emu_bugs.metal:" in msg and "thread 0 (lane 0" in msg


def test_plain_division_is_fast_math_and_precise_divide_is_exact(lib: emu.Library) -> None:
    n = 4096
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, generator=gen)
    b = torch.randn(n, generator=gen) + 3.0
    out = torch.zeros(3 * n)
    hout = torch.zeros(2 * n, dtype=torch.float16)
    emu.dispatch("divisions", n // 64, 64, {0: a, 1: b, 2: out, 3: hout})
    fast, exact, exact_vec = out.view(n, 3).unbind(1)
    assert torch.equal(exact, a / b) and torch.equal(exact_vec, a / b)
    # Fast math: a * (1 / b), two roundings; it differs from a / b on a good share of inputs.
    assert torch.equal(fast, a * (1.0 / b))
    assert (fast != a / b).float().mean() > 0.05
    ah, bh = a.half(), b.half()
    hfast, hexact = hout.view(n, 2).unbind(1)
    assert torch.equal(hexact, (ah.float() / bh.float()).half())
    assert torch.equal(hfast, ah * (1.0 / bh))
