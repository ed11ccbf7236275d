"""Every argument check of the ops (csrc/checks.cpp) raises ValueError/TypeError with a message
that names the argument and the expected and actual values; and the empty shapes that are
valid give correct empty or zero results."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import mlxq
import pytest
import torch

U32, I32 = torch.uint32, torch.int32


def packed(n=4, k=64, bits=4, gs=32, dtype=torch.float32, batch=()):
    """A valid (wq, scales, biases) of logical shape [*batch, n, k], all zeros."""
    wq = torch.zeros((*batch, n, k * bits // 32), dtype=U32)
    s = torch.ones((*batch, n, k // gs), dtype=dtype)
    return wq, s, s.clone()


def x_(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


W = packed()  # [4, 64], 4 bits, group 32
W3 = packed(batch=(3,))  # [3, 4, 64]

qz, dq, mm = mlxq.affine_quantize, mlxq.affine_dequantize, mlxq.affine_matmul

# (id, call, exception type, fragments the message must contain: the argument, the expected
# and the actual value)
CASES = [
    # bits and group size, for every op
    ("quantize bits", lambda: qz(x_(2, 64), 32, 7), ValueError, ["bits", "2, 3, 4, 5, 6, 8", "7"]),
    ("quantize bits 0", lambda: qz(x_(2, 64), 32, 0), ValueError, ["bits", "got 0"]),
    (
        "quantize group",
        lambda: qz(x_(2, 64), 16, 4),
        ValueError,
        ["group_size", "32, 64, 128", "16"],
    ),
    ("dequantize bits", lambda: dq(*W, 32, 16), ValueError, ["bits", "got 16"]),
    ("dequantize group", lambda: dq(*W, 256, 4), ValueError, ["group_size", "got 256"]),
    ("matmul bits", lambda: mm(x_(1, 64), *W, 32, 0), ValueError, ["bits", "got 0"]),
    ("matmul group", lambda: mm(x_(1, 64), *W, -32, 4), ValueError, ["group_size", "got -32"]),
    ("huge bits", lambda: dq(*W, 32, 2**40 + 4), ValueError, ["bits", str(2**40 + 4)]),
    # quantize input
    (
        "quantize int w",
        lambda: qz(torch.zeros(2, 64, dtype=I32), 32, 4),
        TypeError,
        ["w", "float32", "Int"],
    ),
    (
        "quantize f64 w",
        lambda: qz(torch.zeros(2, 64, dtype=torch.float64), 32, 4),
        TypeError,
        ["w", "Double"],
    ),
    (
        "quantize scalar w",
        lambda: qz(torch.tensor(1.0), 32, 4),
        ValueError,
        ["w", "non-empty last dimension", "[]"],
    ),
    ("quantize K=0", lambda: qz(x_(4, 0), 32, 4), ValueError, ["w", "non-empty", "[4, 0]"]),
    (
        "quantize K % group",
        lambda: qz(x_(4, 96), 64, 4),
        ValueError,
        ["w last dimension 96", "divisible by group_size 64"],
    ),
    (
        "quantize K < group",
        lambda: qz(x_(4, 32), 128, 4),
        ValueError,
        ["w last dimension 32", "group_size 128"],
    ),
    # packed weight dtype and rank
    (
        "wq float",
        lambda: dq(W[0].float(), *W[1:], 32, 4),
        TypeError,
        ["wq", "uint32 or int32", "Float"],
    ),
    (
        "wq int64",
        lambda: mm(x_(1, 64), W[0].long(), *W[1:], 32, 4),
        TypeError,
        ["wq", "uint32 or int32", "Long"],
    ),
    (
        "wq uint8",
        lambda: mm(x_(1, 64), W[0].to(torch.uint8), *W[1:], 32, 4),
        TypeError,
        ["wq", "Byte"],
    ),
    (
        "wq scalar",
        lambda: dq(torch.tensor(0, dtype=U32), torch.tensor(1.0), torch.tensor(1.0), 32, 4),
        ValueError,
        ["wq", "at least 1 dimensions", "[]"],
    ),
    (
        "matmul 1-D wq",
        lambda: mm(x_(1, 64), W[0][0], W[1][0], W[2][0], 32, 4),
        ValueError,
        ["wq", "at least 2 dimensions", "[8]"],
    ),
    # scales / biases dtypes and shapes
    (
        "scales int",
        lambda: dq(W[0], W[1].int(), W[2].int(), 32, 4),
        TypeError,
        ["scales", "float32, float16 or bfloat16", "Int"],
    ),
    (
        "scales f64",
        lambda: dq(W[0], W[1].double(), W[2].double(), 32, 4),
        TypeError,
        ["scales", "Double"],
    ),
    (
        "biases dtype",
        lambda: dq(W[0], W[1], W[2].half(), 32, 4),
        TypeError,
        ["biases dtype Half", "scales dtype Float"],
    ),
    (
        "biases shape",
        lambda: dq(W[0], W[1], W[2][:3], 32, 4),
        ValueError,
        ["scales shape [4, 2]", "biases shape [3, 2]"],
    ),
    (
        "scales rows",
        lambda: dq(W[0], W[1][:3], W[2][:3], 32, 4),
        ValueError,
        ["scales shape [3, 2]", "wq shape [4, 8]", "every dimension but the last"],
    ),
    (
        "scales rank",
        lambda: dq(W[0], W[1][None], W[2][None], 32, 4),
        ValueError,
        ["scales shape [1, 4, 2]", "wq shape [4, 8]"],
    ),
    (
        "scales batch",
        lambda: mm(x_(3, 1, 64), W3[0], W3[1][:2], W3[2][:2], 32, 4),
        ValueError,
        ["scales shape [2, 4, 2]", "wq shape [3, 4, 8]"],
    ),
    (
        "zero groups",
        lambda: dq(torch.zeros(4, 0, dtype=U32), x_(4, 0), x_(4, 0), 32, 4),
        ValueError,
        ["scales", "at least one group", "[4, 0]"],
    ),
    # packed width against bits, group size and groups
    (
        "packed width bits",
        lambda: dq(*W, 32, 8),
        ValueError,
        ["wq last dimension 8", "expected 16 uint32 words", "K=64", "8 bits"],
    ),
    (
        "packed width group",
        lambda: dq(*W, 64, 4),
        ValueError,
        ["wq last dimension 8", "2 groups of 64", "expected 16", "K=128"],
    ),
    (
        "packed width 3 bits",
        lambda: mm(x_(1, 64), *W, 32, 3),
        ValueError,
        ["wq last dimension 8", "expected 6", "3 bits"],
    ),
    (
        "packed width sliced",
        lambda: dq(W[0][:, :7], *W[1:], 32, 4),
        ValueError,
        ["wq last dimension 7", "expected 8"],
    ),
    # x
    (
        "x int",
        lambda: mm(x_(1, 64, dtype=torch.int64), *W, 32, 4),
        TypeError,
        ["x", "float32, float16 or bfloat16", "Long"],
    ),
    ("x f64", lambda: mm(x_(1, 64, dtype=torch.float64), *W, 32, 4), TypeError, ["x", "Double"]),
    (
        "x scalar",
        lambda: mm(torch.tensor(1.0), *W, 32, 4),
        ValueError,
        ["x", "at least 1 dimension", "scalar"],
    ),
    (
        "x K",
        lambda: mm(x_(2, 63), *W, 32, 4),
        ValueError,
        [
            "x last dimension 63",
            "must equal 64",
            "K of the quantized weight",
            "[4, 64]",
            "transpose=True",
        ],
    ),
    (
        "x N",
        lambda: mm(x_(2, 64), *W, 32, 4, False),
        ValueError,
        ["x last dimension 64", "must equal 4", "N of", "transpose=False"],
    ),
    (
        "x rank vs batched w",
        lambda: mm(x_(64), *W3, 32, 4),
        ValueError,
        ["batched wq", "[3, 4, 8]", "x needs at least 2 dimensions", "[64]"],
    ),
    (
        "batch no broadcast",
        lambda: mm(x_(2, 5, 64), *W3, 32, 4),
        ValueError,
        ["batch dimensions of x [2, 5, 64]", "wq [3, 4, 8]", "do not broadcast"],
    ),
    (
        "batch no broadcast 4-D",
        lambda: mm(x_(2, 2, 5, 64), *W3, 32, 4),
        ValueError,
        ["x [2, 2, 5, 64]", "do not broadcast"],
    ),
    (
        "x batch 0 vs 3",
        lambda: mm(x_(0, 5, 64), *W3, 32, 4),
        ValueError,
        ["x [0, 5, 64]", "do not broadcast"],
    ),
    # devices: a meta operand next to CPU ones (the fake kernels answer for the Meta key)
    (
        "x on meta",
        lambda: mm(x_(2, 64).to("meta"), *W, 32, 4),
        ValueError,
        ["one device", "x on meta", "wq on cpu"],
    ),
    (
        "wq on meta",
        lambda: mm(x_(2, 64), W[0].to("meta"), *W[1:], 32, 4),
        ValueError,
        ["one device", "wq on meta"],
    ),
    # all operands on meta: the fake kernels still refuse what has no output shape
    (
        "meta quantize K % group",
        lambda: qz(x_(2, 48).to("meta"), 32, 4),
        ValueError,
        ["w last dimension 48", "divisible by group_size 32"],
    ),
    (
        "meta matmul group 0",
        lambda: mm(x_(2, 64).to("meta"), *(t.to("meta") for t in W), 0, 4),
        ValueError,
        ["group_size", "got 0"],
    ),
    (
        "meta dequantize bits",
        lambda: dq(*(t.to("meta") for t in W), 32, 7),
        ValueError,
        ["bits", "got 7"],
    ),
    (
        "scales on meta",
        lambda: dq(W[0], W[1].to("meta"), W[2], 32, 4),
        ValueError,
        ["one device", "scales on meta", "biases on cpu"],
    ),
]


@pytest.mark.parametrize("call,exc,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_arguments_raise_clear_errors(call, exc, fragments):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from the message: {message!r}"


def test_same_checks_through_torch_ops():
    """torch.ops.mlxq.* (what compiled graphs call) run the same checks."""
    with pytest.raises(ValueError, match=re.escape("x last dimension 63 must equal 64")):
        torch.ops.mlxq.affine_matmul(x_(2, 63), *W, 32, 4, True)
    with pytest.raises(ValueError, match="bits must be one of"):
        torch.ops.mlxq.affine_quantize(x_(2, 64), 32, 9)


# --- valid empty shapes -----------------------------------------------------------------------


@pytest.mark.parametrize("transpose", [True, False], ids=["xWT", "xW"])
def test_empty_operands_give_empty_or_zero_results(transpose):
    inner = 64 if transpose else 4
    out = 4 if transpose else 64
    # no rows of x, in decode-sized and 3-D shapes
    assert mm(x_(0, inner), *W, 32, 4, transpose).shape == (0, out)
    assert mm(x_(2, 0, inner), *W, 32, 4, transpose).shape == (2, 0, out)
    assert mm(x_(3, 0, inner), *W3, 32, 4, transpose).shape == (3, 0, out)
    assert mm(x_(1, 0, inner), *W3, 32, 4, transpose).shape == (3, 0, out)
    # no rows of W (N = 0): x @ W.T is [M, 0]; x [M, 0] @ W is a sum of nothing: zeros
    w0 = packed(n=0)
    for m in (3, 40):  # decode and GEMM sizes
        y = mm(x_(m, 64 if transpose else 0), *w0, 32, 4, transpose)
        assert y.shape == ((m, 0) if transpose else (m, 64))
        assert bool((y == 0).all())
    w0b = packed(n=0, batch=(2,))
    y = mm(x_(2, 5, 64 if transpose else 0), *w0b, 32, 4, transpose)
    assert y.shape == ((2, 5, 0) if transpose else (2, 5, 64)) and bool((y == 0).all())
    # an empty weight batch
    wb0 = packed(batch=(0,))
    assert mm(x_(1, 5, inner), *wb0, 32, 4, transpose).shape == (0, 5, out)


def test_empty_quantize_and_dequantize():
    wq, s, b = qz(x_(0, 128, dtype=torch.bfloat16), 64, 3)
    assert (wq.shape, s.shape, s.dtype) == ((0, 12), (0, 2), torch.bfloat16)
    assert qz(x_(2, 0, 64), 32, 5)[0].shape == (2, 0, 10)
    d = dq(wq, s, b, 64, 3)
    assert d.shape == (0, 128) and d.dtype == torch.bfloat16
    assert dq(*packed(n=0, batch=(3,)), 32, 4).shape == (3, 0, 64)


# --- sizes whose products overflow int64 ---------------------------------------------------------
# Expanded (stride 0) tensors give any size at no memory cost. Each call runs in a child process:
# before the overflow checks, the first one killed the process (SIGFPE: K wrapped to 0, then a
# division by the empty wq's width).

_OVERFLOW_PRELUDE = """
import json, sys, torch, mlxq
U32 = torch.uint32
def big(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros([1] * len(shape), dtype=dtype, device=device).expand(*shape)
dq, mm, gm = mlxq.affine_dequantize, mlxq.affine_matmul, mlxq.affine_gather_matmul
"""

# (id, call as source text (`device` is "cpu" or "meta"), fragments of the ValueError message)
OVERFLOW_CASES = [
    (
        "K wraps to 0 (issue 18)",
        "s = big(1, 2**59, device=device); dq(big(1, 0, dtype=U32, device=device), s, s, 32, 4)",
        ["scales shape [1, 576460752303423488]", "K = 576460752303423488 * 32", "int64 range"],
    ),
    (
        "K wraps to 64",
        "s = big(1, 2**59 + 2, device=device); "
        "dq(big(1, 64, dtype=U32, device=device), s, s, 32, 4)",
        ["scales shape [1, 576460752303423490]", "groups of group_size 32", "int64 range"],
    ),
    (
        "matmul K",
        "s = big(3, 2**57, device=device); "
        "mm(big(1, 0, device=device), big(3, 0, dtype=U32, device=device), s, s, 128, 4)",
        ["scales shape [3, 144115188075855872]", "* 128", "int64 range"],
    ),
    (
        "broadcast batch",
        "s = big(1, 2**40, 4, 2, device=device); mm(big(2**40, 1, 1, 64, device=device), "
        "big(1, 2**40, 4, 8, dtype=U32, device=device), s, s, 32, 4)",
        ["batch dimensions of x [1099511627776, 1, 1, 64]", "wq [1, 1099511627776, 4, 8]",
         "broadcast to [1099511627776, 1099511627776]", "more batch entries than int64"],
    ),
    (
        "matmul output",
        "s = big(1024, 2, device=device); mm(big(2**56, 64, device=device), "
        "big(1024, 8, dtype=U32, device=device), s, s, 32, 4)",
        ["output of x [72057594037927936, 64]", "wq [1024, 8]", "[72057594037927936, 1024]",
         "more elements than int64"],
    ),
    (
        "dequantize output",
        "s = big(2**59, 2, device=device); "
        "dq(big(2**59, 8, dtype=U32, device=device), s, s, 32, 4)",
        ["wq shape [576460752303423488, 8]", "dequantizes to shape [576460752303423488, 64]",
         "more elements than int64"],
    ),
    # before: torch's "numel: integer multiplication overflow" (CPU), "Storage size calculation
    # overflowed" (meta), naming no operand
    (
        "gather index pairs",
        "s = big(4, 8, 2, device=device); gm(big(4, 1, 64, device=device), "
        "big(4, 8, 8, dtype=U32, device=device), s, s, big(2**40, 1, dtype=torch.int64, "
        "device=device), big(1, 2**40, dtype=torch.int64, device=device), 32, 4)",
        ["lhs_indices shape [1099511627776, 1]", "rhs_indices shape [1, 1099511627776]",
         "broadcast to [1099511627776, 1099511627776]", "more index pairs than int64"],
    ),
    # before: a CPU allocation of 2^48 bytes failed (for a copy of x), the meta kernel's output
    # "Storage size calculation overflowed"
    (
        "gather output",
        "s = big(4, 2**24, 2, device=device); gm(big(1, 2**40, 64, device=device), "
        "big(4, 2**24, 8, dtype=U32, device=device), s, s, None, None, 32, 4)",
        ["gather of x [1, 1099511627776, 64]", "wq [4, 16777216, 8]", "index shape [4]",
         "[4, 1099511627776, 16777216]", "more elements than int64"],
    ),
    # the meta kernel accepted this one (shape [1, 1, 1])
    (
        "gather K",
        "s = big(1, 1, 2**59, device=device); "
        "gm(big(1, 1, 0, device=device), big(1, 1, 0, dtype=U32, device=device), s, s, "
        "None, None, 32, 4)",
        ["scales shape [1, 1, 576460752303423488]", "K = 576460752303423488 * 32", "int64 range"],
    ),
]  # fmt: skip


@pytest.fixture(scope="module")
def overflow_results() -> dict:
    """Runs every overflow case on the CPU in one child process: {id: (type, message)}."""
    code = _OVERFLOW_PRELUDE + "\ndevice = 'cpu'\n"
    for case_id, call, _ in OVERFLOW_CASES:
        code += (
            f"try:\n    {call}\n    r = ('no error', '')\n"
            f"except Exception as e:\n    r = (type(e).__name__, str(e))\n"
            f"print(json.dumps([{case_id!r}, *r]), flush=True)\n"
        )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    results = {}
    for line in proc.stdout.splitlines():
        case_id, kind, message = json.loads(line)
        results[case_id] = (kind, message)
    results["_exit"] = (proc.returncode, proc.stderr[-2000:])
    return results


@pytest.mark.parametrize(
    "case_id,call,fragments", OVERFLOW_CASES, ids=[c[0] for c in OVERFLOW_CASES]
)
def test_overflowing_sizes_are_refused(overflow_results, case_id, call, fragments):
    """Real (CPU, in a child process) and meta kernels refuse with the same clear ValueError."""
    assert case_id in overflow_results, f"the child process died: {overflow_results['_exit']}"
    kind, message = overflow_results[case_id]
    assert kind == "ValueError", f"{kind}: {message}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from the message: {message!r}"
    scope: dict = {}
    exec(_OVERFLOW_PRELUDE + "\ndevice = 'meta'\n", scope)  # noqa: S102 (our own test text)
    with pytest.raises(ValueError) as info:
        exec(call, scope)  # noqa: S102
    assert str(info.value) == message
    # the Metal dispatch plan (built from the same checks) refuses it too
    scope.update(
        dq=mlxq._C.plan_affine_dequantize,
        mm=mlxq._C.plan_affine_matmul,
        gm=mlxq._C.plan_affine_gather_matmul,
    )
    with pytest.raises(ValueError) as info:
        exec(call, scope)  # noqa: S102
    assert str(info.value) == message


# --- the fake (meta) kernels run the real kernels' check ---------------------------------------

M_W = packed()
# a batch of 3 mxfp4 matrices [4, 64]: packed weight and uint8 scales (all zeros)
FP3 = (torch.zeros(3, 4, 8, dtype=U32), torch.zeros(3, 4, 2, dtype=torch.uint8))
BAD_FOR_BOTH = [
    # the cases of issue 18 that the fake kernels used to accept (or fail with IndexError)
    ("x K=63", mm, (x_(2, 63), *M_W, 32, 4)),
    ("wq of 5 words", mm, (x_(2, 64), M_W[0][:, :5], *M_W[1:], 32, 4)),
    ("float64 scales", mm, (x_(2, 64), M_W[0], M_W[1].double(), M_W[2].double(), 32, 4)),
    ("int64 x", mm, (x_(2, 64, dtype=torch.int64), *M_W, 32, 4)),
    ("1-D wq", mm, (x_(2, 64), M_W[0][0], M_W[1][0], M_W[2][0], 32, 4)),
    # and more of the checks
    ("x N", mm, (x_(2, 64), *M_W, 32, 4, False)),
    ("scales rows", dq, (M_W[0], M_W[1][:3], M_W[2][:3], 32, 4)),
    ("biases dtype", dq, (M_W[0], M_W[1], M_W[2].half(), 32, 4)),
    ("zero groups", dq, (torch.zeros(4, 0, dtype=U32), x_(4, 0), x_(4, 0), 32, 4)),
    ("wq float", dq, (M_W[0].float(), *M_W[1:], 32, 4)),
    ("batch no broadcast", mm, (x_(2, 5, 64), *W3, 32, 4)),
    ("x rank vs batched w", mm, (x_(64), *W3, 32, 4)),
    ("quantize K=0", qz, (x_(4, 0), 32, 4)),
    ("quantize int w", qz, (torch.zeros(2, 64, dtype=I32), 32, 4)),
    ("quantize bits", qz, (x_(2, 64), 32, 7)),
    # the gathers' fake kernels used to compute a shape without the native check: meta and fake
    # tensors accepted all of these (and K overflowing int64)
    ("gather bits", mlxq.affine_gather_matmul, (x_(3, 2, 64), *W3, None, None, 32, 7)),
    ("gather group", mlxq.affine_gather_matmul, (x_(3, 2, 64), *W3, None, None, 0, 4)),
    ("gather x K=63", mlxq.affine_gather_matmul, (x_(3, 2, 63), *W3, None, None, 32, 4)),
    ("gather int x", mlxq.affine_gather_matmul, (x_(3, 2, 64).int(), *W3, None, None, 32, 4)),
    (
        "gather float64 scales",
        mlxq.affine_gather_matmul,
        (x_(3, 2, 64), W3[0], W3[1].double(), W3[2].double(), None, None, 32, 4),
    ),
    (
        "gather wq of 7 words",
        mlxq.affine_gather_matmul,
        (x_(3, 2, 64), W3[0][..., :7], *W3[1:], None, None, 32, 4),
    ),
    (
        "gather float indices",
        mlxq.affine_gather_matmul,
        (x_(3, 2, 64), *W3, None, torch.zeros(2), 32, 4),
    ),
    (
        "gather bool indices",
        mlxq.affine_gather_matmul,
        (x_(3, 2, 64), *W3, torch.zeros(2, dtype=torch.bool), None, 32, 4),
    ),
    ("fp gather group", mlxq.fp_gather_matmul, (x_(3, 2, 64), *FP3, "mxfp4", 64, 4)),
    ("fp gather mode", mlxq.fp_gather_matmul, (x_(3, 2, 64), *FP3, "affine", 32, 4)),
    ("fp gather x K=32", mlxq.fp_gather_matmul, (x_(3, 2, 32), *FP3, "mxfp4", 32, 4)),
    (
        "fp gather int16 scales",
        mlxq.fp_gather_matmul,
        (x_(3, 2, 64), FP3[0], FP3[1].to(torch.int16), "mxfp4", 32, 4),
    ),
    (
        "fp gather float indices",
        mlxq.fp_gather_matmul,
        (x_(3, 2, 64), *FP3, "mxfp4", 32, 4, torch.zeros(2), None),
    ),
]


def _outcome(fn, args):
    try:
        out = fn(*args)
    except Exception as e:  # noqa: BLE001 (any exception is an outcome to compare)
        return type(e), str(e)
    outs = out if isinstance(out, tuple) else (out,)
    return [(o.shape, o.dtype) for o in outs]


@pytest.mark.parametrize("fn,args", [c[1:] for c in BAD_FOR_BOTH], ids=[c[0] for c in BAD_FOR_BOTH])
def test_fake_kernels_refuse_what_the_real_op_refuses(fn, args):
    """meta tensors and FakeTensorMode (what torch.compile traces with) raise the real op's
    exception, with the same message."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = _outcome(fn, args)
    assert isinstance(real, tuple) and real[0] in (ValueError, TypeError), real
    to_meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    assert _outcome(fn, to_meta) == real
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        assert _outcome(fn, fake) == real
