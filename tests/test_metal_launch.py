"""The Metal plan and launch as Python sees them, and the launch the native MPS backend encodes,
run in the MSL emulator (the Metal side is checked without a Mac by construction)."""

from __future__ import annotations

import pytest
import torch
from metal_backend_helpers import (
    CASE_IDS,
    CASES,
    DTYPES,
    METAL_DIR,
    _bits,
    _check,
    _emulate_launch,
    _run_op,
    _weights,
    needs_emu,
)
from mlxq._native import _C
from mlxq.metal import backend as mb
from mlxq.metal import runtime as rt

# --- the plan and the launch, as Python sees them -------------------------------------------


def _all_plans():
    meta = {"device": "meta"}
    for dtype in DTYPES:
        for gs in (32, 64, 128):
            for bits in (2, 3, 4, 5, 6, 8):
                wq = torch.empty(40, 2 * gs * bits // 32, dtype=torch.uint32, **meta)
                s = torch.empty(40, 2, dtype=dtype, **meta)
                yield _C.plan_affine_quantize(torch.empty(3, 2 * gs, dtype=dtype, **meta), gs, bits)
                yield _C.plan_affine_dequantize(wq, s, s, gs, bits)
                for m in (1, 8, 9, 100):
                    for transpose, width in ((True, 2 * gs), (False, 40)):
                        x = torch.empty(m, width, dtype=dtype, **meta)
                        yield _C.plan_affine_matmul(x, wq, s, s, gs, bits, transpose)


def test_plans_fit_metal_and_compile_shader() -> None:
    kinds = set()
    for plan in _all_plans():
        kinds.add(plan["kernel"].split("_")[1])
        indices = sorted(i for i, _ in plan["bindings"])
        assert indices == list(range(len(indices))), plan["kernel"]  # compile_shader's order
        assert [r for _, r in plan["bindings"]].count("params") == 1
        t = plan["threads"]
        assert t[0] * t[1] * t[2] <= 1024 and t[0] % 32 == 0, plan["kernel"]
        for _, nbytes in plan["threadgroup_memory"]:
            assert 0 < nbytes <= 32768 and nbytes % 16 == 0, plan["kernel"]  # Metal's limits
        assert len(plan["params"]) % 4 == 0  # int32 fields (sent as int32 arg_casts)
        assert all(g >= 1 for g in plan["grid"])
    assert kinds == {"quantize", "dequantize", "qmv", "qvm", "qmm"}


def test_every_planned_kernel_is_instantiated_in_metal_sources() -> None:
    expected = mb.expected_kernel_names()
    defined = rt.instantiated_kernels(METAL_DIR)
    # affine: (quantize, dequantize, qmv, qvm, qmm_t, qmm_n + their 4 gather variants + the
    # sorted gather qmm_rhs_t/_n) x dtypes x group sizes x bits (1-6, 8); float modes: (fp_qmv,
    # fp_qmm_t, fp_qmm_n, fp_dequantize + the gather fp_gather_qmv/_qmm_t/_qmm_n/_qmm_rhs_t/
    # _qmm_rhs_n) x dtypes x modes, + fp_dequantize of nvfp4 with a global scale for half and
    # bfloat, + fp_quantize x dtypes x modes
    assert len(expected) == (6 + 4 + 2) * 3 * 3 * 7 + (4 + 5) * 3 * 3 + 2 + 3 * 3
    assert expected <= set(defined), sorted(expected - set(defined))[:5]


def test_launch_binds_converted_operands_and_allocates_outputs(gen) -> None:
    gs, bits = 64, 4
    wq, s, b = _weights(gen, 16, 2 * gs, gs, bits, torch.float32)
    x = torch.randn(3, 2 * 2 * gs, generator=gen).to(torch.bfloat16)[:, ::2]  # strided view
    wq32 = wq.view(torch.int32)
    launch = _C.metal_launch_affine_matmul(x, wq32, s, b, gs, bits, True)
    plan = _C.plan_affine_matmul(x, wq32, s, b, gs, bits, True)
    assert launch["kernel"] == plan["kernel"] == "affine_qmv_bfloat_gs64_b4"
    assert launch["grid"] == plan["grid"] and launch["threads"] == plan["threads"]
    bufs = launch["buffers"]
    assert sorted(bufs) == [0, 1, 2, 3, 4, 5] and bufs[launch["params_index"]] == plan["params"]
    roles = dict(plan["bindings"])
    by_role = {roles[i]: t for i, t in bufs.items() if roles[i] != "params"}
    assert all(t.is_contiguous() for t in by_role.values())
    assert torch.equal(by_role["x"], x.contiguous())
    assert by_role["scales"].dtype == by_role["biases"].dtype == torch.bfloat16  # x's dtype
    assert torch.equal(_bits(by_role["wq"]), wq32)
    (out,) = launch["outputs"]
    assert out is by_role["out"] or out.data_ptr() == by_role["out"].data_ptr()
    assert out.shape == (3, 16) and out.dtype == torch.bfloat16

    q = _C.metal_launch_affine_quantize(torch.randn(2, 3, gs, generator=gen), gs, 3)
    assert [tuple(o.shape) for o in q["outputs"]] == [(2, 3, 6), (2, 3, 1), (2, 3, 1)]
    assert q["outputs"][0].dtype == torch.uint32
    # Nothing to launch, but an empty reduction still sums to zeros.
    e = _C.metal_launch_affine_matmul(torch.randn(2, 0), wq[:0], s[:0], b[:0], gs, bits, False)
    assert e["empty"] and torch.equal(e["outputs"][0], torch.zeros(2, 2 * gs))


def test_launch_rejects_bad_input_with_the_shared_checks(gen) -> None:
    wq, s, b = _weights(gen, 8, 64, 64, 4, torch.float32)
    with pytest.raises(ValueError, match="group_size"):
        _C.metal_launch_affine_matmul(torch.randn(1, 64), wq, s, b, 48, 4, True)
    with pytest.raises(ValueError, match="x"):
        _C.metal_launch_affine_matmul(torch.randn(1, 65), wq, s, b, 64, 4, True)


def test_native_encoder_call_sequence(gen) -> None:
    """The calls affine_mps.mm makes on the MTLComputeCommandEncoder (recorded): every tensor at
    its buffer index and storage offset in bytes, the params bytes, threadgroup memory, one
    dispatch of the plan's grid; and the pipeline/device checks before encoding."""
    gs, bits = 32, 5
    wq, s, b = _weights(gen, 48, 4 * gs, gs, bits, torch.float16)
    x = torch.randn(40, 4 * gs, generator=gen).to(torch.float16)
    wq_v, s_v, b_v, x_v = wq[8:], s[8:], b[8:], x[4:]  # contiguous views at offsets: no copies
    calls = _C.metal_encode_trace_affine_matmul(x_v, wq_v, s_v, b_v, gs, bits, True)
    plan = _C.plan_affine_matmul(x_v, wq_v, s_v, b_v, gs, bits, True)
    assert plan["kernel"] == "affine_qmm_t_half_gs32_b5"
    roles = dict(plan["bindings"])
    set_buffers = {c[1]: c for c in calls if c[0] == "set_buffer"}
    assert sorted(set_buffers) == sorted(i for i, r in roles.items() if r != "params")
    expect = {"x": x_v, "wq": wq_v, "scales": s_v, "biases": b_v}
    for index, (_, _, t, offset) in set_buffers.items():
        assert offset == t.storage_offset() * t.element_size()
        if roles[index] in expect:  # bound in place, at the view's offset
            src = expect[roles[index]]
            assert t.data_ptr() == src.data_ptr() and offset > 0
    (params,) = [c for c in calls if c[0] == "set_bytes"]
    assert params[1] == dict((r, i) for i, r in plan["bindings"])["params"]
    assert params[2] == plan["params"]
    tgm = [(c[1], c[2]) for c in calls if c[0] == "set_threadgroup_memory"]
    assert tgm == [(i, -(-n // 16) * 16) for i, n in plan["threadgroup_memory"]] and tgm
    assert calls[-1] == ("dispatch_threadgroups", plan["grid"], plan["threads"])
    assert [c[0] for c in calls].count("dispatch_threadgroups") == 1

    with pytest.raises(RuntimeError, match="affine_qmm_t_half_gs32_b5 needs 128 threads"):
        _C.metal_encode_trace_affine_matmul(x_v, wq_v, s_v, b_v, gs, bits, True, max_threads=64)
    with pytest.raises(RuntimeError, match="bytes of threadgroup memory, the device allows 8192"):
        _C.metal_encode_trace_affine_matmul(
            x_v, wq_v, s_v, b_v, gs, bits, True, max_threadgroup_bytes=8192
        )
    with pytest.raises(ValueError, match="buffer 0 is on cpu, expected MPS"):
        _C.metal_encode_trace_affine_matmul(x_v, wq_v, s_v, b_v, gs, bits, True, device="mps")
    empty = _C.metal_encode_trace_affine_matmul(x[:0], wq, s, b, gs, bits, True)
    assert empty == []  # nothing to launch: nothing encoded


# --- the launch in the emulator: what the native backend encodes ----------------------------


@needs_emu
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_native_launch_in_emulator(case, gen) -> None:
    _check(*_run_op(case, gen, _emulate_launch))
