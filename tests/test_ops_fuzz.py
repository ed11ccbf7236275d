"""Hypothesis fuzz of the ops: random shapes (empty ones included), dtypes, bits, group sizes,
layouts and CPU kernels, with random invalid arguments mixed in. Every call must either raise a
clean ValueError / TypeError / RuntimeError whose message names the offending argument, or
return the result of the float64 reference (MLX for quantize); and the same call on meta
tensors (the fake kernels) must raise the same error or give outputs of the same shapes and
dtypes. A fuzzer of sizes whose products overflow int64, and of huge but empty shapes, checks
that both refuse the former with the same ValueError and accept the latter.

The fuzzers run in a child Python process under a time limit, so that a segfault or a hang in
the native code fails its test (with the child's output) instead of killing or stalling the
whole pytest run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import mlxq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

from oracles import (  # noqa: E402
    BITS,
    DTYPES,
    GROUP_SIZES,
    assert_within,
    dequantize_ref,
    matmul_ref,
    matmul_tolerance,
    takes_bf16_gemm,
    to_mx,
    to_torch,
    words,
)

SETTINGS = settings(
    max_examples=int(os.environ.get("MLXQ_FUZZ_EXAMPLES", 150)),
    deadline=None,
    database=None,  # no .hypothesis/ in the tree; a failure prints its reproduction blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CHILD_TIMEOUT_S = 240

from conftest import _available_isas  # noqa: E402

ISAS = ["auto", *_available_isas()]

BAD_BITS = st.sampled_from([-4, 0, 7, 9, 16, 32, 2**33])
BAD_GROUPS = st.sampled_from([-64, 0, 1, 8, 16, 48, 96, 256, 2**40])
BAD_FLOAT_DTYPES = st.sampled_from([torch.float64, torch.int32, torch.int64, torch.uint8])
BAD_WORD_DTYPES = st.sampled_from([torch.float32, torch.int64, torch.int16, torch.uint8])


def on_isa(isa: str, op, args: dict):
    """A call of `op(**args)` with the CPU kernels forced onto `isa` (restored afterwards)."""

    def call():
        mlxq._C.set_cpu_isa(isa)
        try:
            return op(**args)
        finally:
            mlxq._C.set_cpu_isa("auto")

    return call


def names_in(message: str, names: list[str]) -> bool:
    """Whether the message names one of the arguments (as a word: 'x' is not the x of 'mlxq')."""
    return any(re.search(rf"\b{re.escape(n)}\b", message) for n in names)


def on_meta(op, args: dict):
    """The call `op(**args)` with every tensor moved to the meta device (the fake kernels)."""
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    return lambda: op(**meta)


def outputs_of(out) -> list[tuple]:
    return [(tuple(o.shape), o.dtype) for o in (out if isinstance(out, tuple) else (out,))]


def expect_fake_agrees(fake_call, real_error: Exception | None, real_out=None) -> None:
    """The fake kernels refuse exactly what the real op refuses, with the same exception and
    message, and otherwise give outputs of the real op's shapes and dtypes."""
    try:
        fake_out = fake_call()
    except Exception as e:  # noqa: BLE001 (compared with the real outcome below)
        assert real_error is not None, f"fake kernel refused a valid call: {e!r}"
        assert (type(e), str(e)) == (type(real_error), str(real_error)), (
            f"fake kernel raised {e!r}, the real op {real_error!r}"
        )
        return
    assert real_error is None, f"fake kernel accepted a call the real op refused: {real_error!r}"
    assert outputs_of(fake_out) == outputs_of(real_out), "fake and real outputs differ"


def expect_clean_error_or(call, culprits: list[str] | None, check_result, fake_call) -> None:
    """Runs `call`. With culprits (an invalid argument was planted), a clean error naming one of
    them is the expected outcome; if the call succeeds anyway (the mutation happened to be
    valid), or without culprits, the result must pass `check_result`. `fake_call`, the same
    call through the fake kernels, must agree."""
    try:
        out = call()
    except (ValueError, TypeError, RuntimeError) as e:
        msg = str(e)
        assert culprits is not None, f"valid call raised {type(e).__name__}: {msg}"
        assert names_in(msg, culprits), f"error does not name any of {culprits}: {msg!r}"
        expect_fake_agrees(fake_call, e)
        return
    check_result(out)
    expect_fake_agrees(fake_call, None, out)


@st.composite
def packed_case(draw, batched: bool):
    """A valid quantized weight: (wq, scales, biases, bits, group_size, batch)."""
    bits = draw(st.sampled_from(BITS))
    gs = draw(st.sampled_from(GROUP_SIZES))
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(0, 40))
    groups = draw(st.integers(1, 3))
    batch = tuple(draw(st.lists(st.integers(0, 3), min_size=1, max_size=2))) if batched else ()
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    shape = (*batch, n, groups * gs)
    scale = 10.0 ** draw(st.integers(-6, 6))
    w = (torch.randn(shape, generator=gen) * scale).to(dtype)
    wq, s, b = mlxq.affine_quantize(w, gs, bits)
    if draw(st.booleans()):
        wq = wq.view(torch.int32)
    return wq, s, b, bits, gs, gen


def strided(t: torch.Tensor, how: int) -> torch.Tensor:
    """The same values in another layout: 0 contiguous, 1 every other column of a wider tensor,
    2 a transposed copy viewed back."""
    if how == 1:
        wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if how == 2 and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


# Valid calls three times out of fifteen (listed last: hypothesis favours early entries).
MATMUL_MUTATIONS = [
    "bits",
    "group_size",
    "x_dtype",
    "wq_dtype",
    "scales_dtype",
    "biases_dtype",
    "wq_width",
    "scales_groups",
    "scales_rows",
    "x_last",
    "x_batch",
    "transpose",
    None,
    None,
    None,
]


@SETTINGS
@given(data=st.data())
def fuzz_matmul(data) -> None:
    batched = data.draw(st.booleans())
    wq, s, b, bits, gs, gen = data.draw(packed_case(batched))
    transpose = data.draw(st.booleans())
    n, k = wq.shape[-2], s.shape[-1] * gs
    inner = k if transpose else n
    m = data.draw(st.sampled_from([0, 1, 2, 3, 4, 5, 8, 15, 16, 17, 20, 33, 70]))
    if batched:
        wb = list(wq.shape[:-2])
        xb = [data.draw(st.sampled_from([1, d])) for d in wb]
        xb = [data.draw(st.integers(1, 2))] * data.draw(st.integers(0, 1)) + xb
        x_shape = (*xb, m, inner)
    else:
        lead = data.draw(st.lists(st.integers(0 if m else 1, 4), min_size=0, max_size=2))
        x_shape = (*lead, m, inner) if data.draw(st.booleans()) else (inner,)
    x_dtype = data.draw(st.sampled_from(DTYPES))
    x = torch.randn(x_shape, generator=gen).to(x_dtype)
    x = strided(x, data.draw(st.integers(0, 2)))
    args = dict(x=x, wq=wq, scales=s, biases=b, group_size=gs, bits=bits, transpose=transpose)

    mutation = data.draw(st.sampled_from(MATMUL_MUTATIONS))
    culprits = {
        "bits": ["bits"],
        "group_size": ["group_size", "wq"],  # a valid other size misfits the packed width
        "x_dtype": ["x"],
        "wq_dtype": ["wq"],
        "scales_dtype": ["scales"],
        "biases_dtype": ["biases"],
        "wq_width": ["wq"],
        "scales_groups": ["scales", "wq"],
        "scales_rows": ["scales", "biases"],
        "x_last": ["x"],
        "x_batch": ["x", "wq"],
        "transpose": ["x"],
    }.get(mutation)
    if mutation == "bits":
        args["bits"] = data.draw(st.one_of(BAD_BITS, st.sampled_from(BITS)))
    elif mutation == "group_size":
        args["group_size"] = data.draw(st.one_of(BAD_GROUPS, st.sampled_from(GROUP_SIZES)))
    elif mutation == "x_dtype":
        args["x"] = x.to(data.draw(BAD_FLOAT_DTYPES))
    elif mutation == "wq_dtype":
        args["wq"] = wq.view(torch.int32).to(data.draw(BAD_WORD_DTYPES))
    elif mutation in ("scales_dtype", "biases_dtype"):
        key = mutation.split("_")[0]
        args[key] = args[key].to(data.draw(st.sampled_from([*DTYPES, torch.float64, torch.int32])))
    elif mutation == "wq_width":
        delta = data.draw(st.sampled_from([-1, 1, 2]))
        words_ = wq.shape[-1] + delta
        args["wq"] = torch.zeros((*wq.shape[:-1], max(words_, 0)), dtype=wq.dtype)
    elif mutation == "scales_groups":
        g = s.shape[-1] + data.draw(st.sampled_from([-1, 1]))
        args["scales"] = torch.ones((*s.shape[:-1], max(g, 0)), dtype=s.dtype)
        args["biases"] = args["scales"].clone()
    elif mutation == "scales_rows":
        args["scales"] = s[..., : max(n - 1, 0), :] if n > 1 else torch.cat([s, s], -2)
    elif mutation == "x_last":
        # a last size that no longer matches (inner - 1 only where that is a size)
        wrong = inner + data.draw(st.sampled_from([-1, 1, 32] if inner > 0 else [1, 32]))
        args["x"] = torch.zeros((*x_shape[:-1], wrong))
    elif mutation == "x_batch":
        if batched:  # the last batch dim of x no longer broadcasts (unless w's is 1)
            bad = (*x_shape[:-3], wq.shape[-3] + 1, *x_shape[-2:])
            args["x"] = torch.zeros(bad)
        else:  # extra leading dims of x are fine against a 2-D weight
            args["x"] = torch.zeros((data.draw(st.integers(0, 3)), *x_shape))
    elif mutation == "transpose":
        args["transpose"] = not transpose

    isa = data.draw(st.sampled_from(ISAS))
    call = on_isa(isa, mlxq.affine_matmul, args)

    def check(y):
        a = args
        assert y.dtype == a["x"].dtype
        tiles = on_isa(
            isa, takes_bf16_gemm, {"x": a["x"], "wq": a["wq"], "transpose": a["transpose"]}
        )()
        ref = matmul_ref(a["x"], a["wq"], a["scales"], a["biases"], a["group_size"], a["bits"],
                         a["transpose"], bf16_tiles=tiles)  # fmt: skip
        ref_abs = matmul_ref(a["x"], a["wq"], a["scales"], a["biases"], a["group_size"],
                             a["bits"], a["transpose"], True, bf16_tiles=tiles)  # fmt: skip
        tol = matmul_tolerance(ref_abs, ref, a["x"].shape[-1], y.dtype)
        # fp16 outputs can overflow (large weights): there the result is inf of the right sign
        near_max = ref.abs() + tol >= torch.finfo(y.dtype).max
        if bool(near_max.any()):
            big = y[near_max].double()
            assert bool((big.sign() == ref[near_max].sign()).all()), "overflow with wrong sign"
            y, ref, tol = y[~near_max], ref[~near_max], tol[~near_max]
        assert_within(y, ref, tol, f"matmul {mutation=} x {tuple(a['x'].shape)}")

    expect_clean_error_or(call, culprits, check, on_meta(mlxq.affine_matmul, args))


@SETTINGS
@given(data=st.data())
def fuzz_dequantize(data) -> None:
    wq, s, b, bits, gs, gen = data.draw(packed_case(data.draw(st.booleans())))
    if data.draw(st.booleans()) and wq.dim() == 2 and len(wq):  # 1-D weight: a single row
        wq, s, b = wq[0], s[0], b[0]
    args = dict(wq=wq, scales=s, biases=b, group_size=gs, bits=bits)
    mutation = data.draw(
        st.sampled_from(["bits", "group_size", "wq", "scales", "biases", "rank", None, None])
    )
    culprits = {
        "bits": ["bits", "wq"],
        "group_size": ["group_size", "wq"],
        "wq": ["wq"],
        "scales": ["scales", "biases"],
        "biases": ["biases", "scales"],
        "rank": ["scales", "wq"],
    }.get(mutation)
    if mutation == "bits":
        args["bits"] = data.draw(st.one_of(BAD_BITS, st.sampled_from(BITS)))
    elif mutation == "group_size":
        args["group_size"] = data.draw(st.one_of(BAD_GROUPS, st.sampled_from(GROUP_SIZES)))
    elif mutation == "wq":
        choice = data.draw(st.integers(0, 2))
        if choice == 0:
            args["wq"] = wq.view(torch.int32).to(data.draw(BAD_WORD_DTYPES))
        else:
            args["wq"] = wq[..., : wq.shape[-1] - choice]
    elif mutation in ("scales", "biases"):
        t = args[mutation]
        if data.draw(st.booleans()):
            args[mutation] = t.to(data.draw(st.sampled_from([*DTYPES, torch.float64])))
        else:
            args[mutation] = t[..., :-1] if t.shape[-1] > 1 else torch.cat([t, t], -1)
    elif mutation == "rank":
        args["scales"], args["biases"] = s[None], b[None]
    for key in ("wq", "scales", "biases"):
        if args[key].dim() >= 2 and data.draw(st.booleans()):
            args[key] = strided(args[key], 2)
    call = on_isa(data.draw(st.sampled_from(ISAS)), mlxq.affine_dequantize, args)

    def check(out):
        a = args
        wq, s, b, g, n = a["wq"], a["scales"], a["biases"], a["group_size"], a["bits"]
        ref = dequantize_ref(wq, s, b, g, n)
        size = dequantize_ref(wq, s.abs(), b.abs(), g, n)
        assert out.dtype == s.dtype
        # mx.dequantize rounds s * q to the output dtype before it adds b: where that product
        # overflows (fp16 s = -10256 times q = 7, say), the element is its infinity plus b even
        # when s * q + b would be in range
        product = dequantize_ref(wq, s, torch.zeros_like(b), g, n).to(out.dtype).double()
        over = product.isinf()
        if bool(over.any()):
            want = product[over] + dequantize_ref(wq, torch.zeros_like(s), b, g, n)[over]
            got = out.double()[over]
            nan = want.isnan()
            assert torch.equal(got.isnan(), nan) and torch.equal(got[~nan], want[~nan]), (
                f"dequantize {mutation=}: an overflowing s * q gave {got} for {want}"
            )
            out, ref, size = out[~over], ref[~over], size[~over]
        tol = torch.finfo(out.dtype).eps * size + torch.finfo(out.dtype).tiny
        assert_within(out, ref, tol, f"dequantize {mutation=}")

    expect_clean_error_or(call, culprits, check, on_meta(mlxq.affine_dequantize, args))


@SETTINGS
@given(data=st.data())
def fuzz_quantize(data) -> None:
    import mlx.core as mx

    gs = data.draw(st.sampled_from(GROUP_SIZES))
    bits = data.draw(st.sampled_from(BITS))
    dtype = data.draw(st.sampled_from(DTYPES))
    lead = tuple(data.draw(st.lists(st.integers(0, 5), min_size=0, max_size=2)))
    k = gs * data.draw(st.integers(1, 3))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    scale = 10.0 ** data.draw(st.integers(-8 if dtype == torch.float16 else -20, 4))
    w = (torch.randn((*lead, k), generator=gen) * scale + data.draw(st.floats(-2, 2))).to(dtype)
    w = strided(w, data.draw(st.integers(0, 2)))
    args = dict(w=w, group_size=gs, bits=bits)
    mutation = data.draw(st.sampled_from(["bits", "group_size", "dtype", "k", None, None]))
    culprits = {
        "bits": ["bits"],
        "group_size": ["group_size", "w"],
        "dtype": ["w"],
        "k": ["w"],
    }.get(mutation)
    if mutation == "bits":
        args["bits"] = data.draw(st.one_of(BAD_BITS, st.sampled_from(BITS)))
    elif mutation == "group_size":
        args["group_size"] = data.draw(st.one_of(BAD_GROUPS, st.sampled_from(GROUP_SIZES)))
    elif mutation == "dtype":
        args["w"] = w.to(data.draw(BAD_FLOAT_DTYPES))
    elif mutation == "k":
        args["w"] = w[..., : k - data.draw(st.sampled_from([1, 8, k]))]

    def check(out):
        wq, s, b = out
        a = args
        w2 = a["w"].reshape(-1, a["w"].shape[-1])
        if w2.shape[0] == 0:
            assert wq.numel() == 0 and s.numel() == 0
            return
        theirs = mx.quantize(to_mx(w2.contiguous()), group_size=a["group_size"], bits=a["bits"])
        mq, ms, mb = (to_torch(t).reshape(o.shape) for t, o in zip(theirs, out, strict=True))
        assert (words(wq) == words(mq)).all(), "packed words differ from mx.quantize"
        assert torch.equal(s, ms) and torch.equal(b, mb), "scales/biases differ"

    expect_clean_error_or(
        lambda: mlxq.affine_quantize(**args), culprits, check, on_meta(mlxq.affine_quantize, args)
    )


def big(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of any size at no memory cost (all strides 0)."""
    return torch.zeros([1] * len(shape), dtype=dtype).expand(*shape)


INT64_MAX = 2**63 - 1


@SETTINGS
@given(data=st.data())
def fuzz_sizes(data) -> None:
    """Sizes whose products overflow int64 (K = groups * group_size, the broadcast batch, the
    output's element count) must be refused by the real op and the fake kernels with the same
    ValueError naming the operands; huge shapes with no elements must be accepted by both."""
    kind = data.draw(st.sampled_from(["groups", "batch", "out", "dequant_out", "empty_huge"]))
    bits = data.draw(st.sampled_from(BITS))
    gs = data.draw(st.sampled_from(GROUP_SIZES))
    dtype = data.draw(st.sampled_from(DTYPES))
    word = data.draw(st.sampled_from([torch.uint32, torch.int32]))
    transpose = data.draw(st.booleans())
    groups = data.draw(st.integers(1, 3))
    k = groups * gs
    words_ = k * bits // 32
    op, expected = mlxq.affine_matmul, None  # expected: output shape of a valid call
    if kind == "groups":  # K = groups * group_size overflows
        rows = data.draw(st.integers(1, 3))
        g = data.draw(st.integers(INT64_MAX // gs + 1, INT64_MAX // rows))
        s = big((rows, g), dtype)
        wq = big((rows, data.draw(st.sampled_from([0, 1, 2, 64]))), word)
        args = dict(wq=wq, scales=s, biases=s, group_size=gs, bits=bits)
        culprits = ["scales"]
        if data.draw(st.booleans()):
            op = mlxq.affine_dequantize
        else:
            x = big((data.draw(st.integers(0, 3)), data.draw(st.sampled_from([0, 32]))), dtype)
            args.update(x=x, transpose=transpose)
    elif kind == "batch":  # the broadcast batch of x and wq overflows
        n, m = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 3))
        a, b = (data.draw(st.integers(2**32, 2**40)) for _ in range(2))
        s = big((1, b, n, groups), dtype)
        x = big((a, 1, m, k if transpose else n), dtype)
        args = dict(x=x, wq=big((1, b, n, words_), word), scales=s, biases=s)
        args.update(group_size=gs, bits=bits, transpose=transpose)
        culprits = ["x", "wq"]
    elif kind == "out":  # x and the weight fit, the output does not (out_features > inner)
        n = k + data.draw(st.integers(1, 64)) if transpose else data.draw(st.integers(1, k - 1))
        inner = k if transpose else n
        s = big((n, groups), dtype)
        x = big((INT64_MAX // inner, inner), dtype)
        args = dict(x=x, wq=big((n, words_), word), scales=s, biases=s)
        args.update(group_size=gs, bits=bits, transpose=transpose)
        culprits = ["x", "wq"]
    elif kind == "dequant_out":  # wq fits, its dequantized output (K > words) does not
        rows = INT64_MAX // words_
        s = big((rows, groups), dtype)
        args = dict(wq=big((rows, words_), word), scales=s, biases=s, group_size=gs, bits=bits)
        op, culprits = mlxq.affine_dequantize, ["wq"]
    else:  # huge dimensions next to an empty one: valid, and nothing to compute
        variant = data.draw(st.integers(0, 2))
        huge = data.draw(st.integers(2**40, 2**50))
        n = data.draw(st.integers(1, 8))
        culprits = None
        if variant == 0:  # no rows of W, a huge x: [huge, 0]
            s = torch.zeros(0, groups, dtype=dtype)
            args = dict(x=big((huge, k), dtype), wq=torch.zeros(0, words_, dtype=word))
            args.update(scales=s, biases=s, group_size=gs, bits=bits, transpose=True)
            expected = (huge, 0)
        elif variant == 1:  # a huge weight batch, no rows of x: [huge, 0, out]
            s = big((huge, n, groups), dtype)
            x = torch.zeros(1, 0, k if transpose else n, dtype=dtype)
            args = dict(x=x, wq=big((huge, n, words_), word), scales=s, biases=s)
            args.update(group_size=gs, bits=bits, transpose=transpose)
            expected = (huge, 0, n if transpose else k)
        else:  # dequantize no rows of a huge K
            s = torch.zeros(0, huge, dtype=dtype)
            wq = torch.zeros(0, huge * gs // 32 * bits, dtype=word)
            args = dict(wq=wq, scales=s, biases=s, group_size=gs, bits=bits)
            op, expected = mlxq.affine_dequantize, (0, huge * gs)

    def check(out):
        assert expected is not None, f"{kind}: an overflowing size was accepted"
        assert tuple(out.shape) == expected and out.numel() == 0
        assert out.dtype == (args["x"] if "x" in args else args["scales"]).dtype

    call = on_isa(data.draw(st.sampled_from(ISAS)), op, args)
    expect_clean_error_or(call, culprits, check, on_meta(op, args))


# --- the tests: each fuzzer in a child process ----------------------------------------------


@pytest.mark.parametrize(
    "fuzzer", ["fuzz_matmul", "fuzz_dequantize", "fuzz_quantize", "fuzz_sizes"]
)
def test_fuzz(fuzzer: str) -> None:
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); "
        f"import test_ops_fuzz; test_ops_fuzz.{fuzzer}()"
    )
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            env=env,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{fuzzer} hung (no result in {CHILD_TIMEOUT_S} s):\n{e.stdout}\n{e.stderr}")
    if proc.returncode < 0:
        pytest.fail(
            f"{fuzzer} crashed with {signal.Signals(-proc.returncode).name}:\n{proc.stderr[-6000:]}"
        )
    assert proc.returncode == 0, f"{fuzzer} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
