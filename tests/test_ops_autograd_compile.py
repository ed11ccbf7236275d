"""Gradients of affine_matmul against float64, errors for constant-weight gradients, the fake
(meta) kernels, and torch.compile(fullgraph=True) of modules that call every op."""

from __future__ import annotations

import re

import mlxq
import pytest
import torch
from conftest import random_weight
from oracles import DTYPES, assert_within, matmul_tolerance, path_weight_refs
from torch._dynamo.testing import CompileCounter
from torch._subclasses.fake_tensor import FakeTensorMode


def quantized(shape, dtype, group_size, bits, gen):
    return mlxq.affine_quantize(random_weight(shape, dtype, gen), group_size, bits)


# --- gradients ------------------------------------------------------------------------------


def grad_reference(g, wq, s, b, group_size, bits, transpose, x_shape):
    """d/dx sum(y * g) for y = x @ W.T (g @ W) or y = x @ W (g @ W.T), in float64, summed over
    the batch dims along which x was broadcast; also the error scale |g| @ (|s|q + |b|).
    The backward is a matmul of g, so W is the one that matmul's path uses."""
    w, w_abs = path_weight_refs(g, wq, s, b, group_size, bits, not transpose)
    if not transpose:
        w, w_abs = w.transpose(-1, -2), w_abs.transpose(-1, -2)
    gd = g.double()
    return (
        torch.matmul(gd, w).sum_to_size(x_shape),
        torch.matmul(gd.abs(), w_abs).sum_to_size(x_shape),
    )


@pytest.mark.parametrize("transpose", [True, False], ids=["xWT", "xW"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 64), (8, 128)])
def test_grad_x_matches_float64(bits, group_size, dtype, transpose, gen):
    n, k = 24, 2 * group_size
    wq, s, b = quantized((n, k), dtype, group_size, bits, gen)
    for x_shape in [(1, k), (5, k), (2, 11, k)]:  # decode and GEMM paths in the backward too
        if not transpose:
            x_shape = (*x_shape[:-1], n)
        x = torch.randn(x_shape, generator=gen).to(dtype).requires_grad_(True)
        y = mlxq.affine_matmul(x, wq, s, b, group_size, bits, transpose)
        g = torch.randn(y.shape, generator=gen).to(dtype)
        y.backward(g)
        assert x.grad.dtype == dtype and x.grad.shape == x.shape
        ref, ref_abs = grad_reference(g, wq, s, b, group_size, bits, transpose, x.shape)
        tol = matmul_tolerance(ref_abs, ref, g.shape[-1], dtype)
        assert_within(x.grad, ref, tol, f"grad of x {tuple(x_shape)}")


def jvp_reference(t, wq, s, b, group_size, bits, transpose):
    """The tangent of y = x @ W.T (t @ W.T) or y = x @ W (t @ W) in float64, and its error
    scale |t| @ (|s|q + |b|), with the W of the path that t's matmul takes."""
    w, w_abs = path_weight_refs(t, wq, s, b, group_size, bits, transpose)
    if transpose:
        w, w_abs = w.transpose(-1, -2), w_abs.transpose(-1, -2)
    return torch.matmul(t.double(), w), torch.matmul(t.double().abs(), w_abs)


@pytest.mark.parametrize("transpose", [True, False], ids=["xWT", "xW"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (5, 64)])
def test_forward_mode_tangent_matches_float64(bits, group_size, dtype, transpose, gen):
    """torch.func.jvp and torch.autograd.forward_ad give the tangent (it used to be all zero)."""
    import torch.autograd.forward_ad as fwAD

    n, k = 24, 2 * group_size
    wq, s, b = quantized((n, k), dtype, group_size, bits, gen)
    inner = k if transpose else n
    for x_shape in [(1, inner), (3, 9, inner)]:
        x = torch.randn(x_shape, generator=gen).to(dtype)
        t = torch.randn(x_shape, generator=gen).to(dtype)

        def f(x):
            return mlxq.affine_matmul(x, wq, s, b, group_size, bits, transpose)

        y, tangent = torch.func.jvp(f, (x,), (t,))
        assert torch.equal(y, f(x))
        ref, ref_abs = jvp_reference(t, wq, s, b, group_size, bits, transpose)
        tol = matmul_tolerance(ref_abs, ref, inner, dtype)
        assert_within(tangent, ref, tol, f"jvp tangent {tuple(x_shape)}")
        with fwAD.dual_level():
            dual = f(fwAD.make_dual(x, t))
            assert torch.equal(fwAD.unpack_dual(dual).tangent, tangent)


def test_forward_mode_jacobian_equals_reverse_mode_and_module(gen):
    wq, s, b = quantized((16, 64), torch.float32, 32, 4, gen)
    x = torch.randn(3, 64, generator=gen)

    def f(x):
        return mlxq.affine_matmul(x, wq, s, b, 32, 4)

    torch.testing.assert_close(torch.func.jacfwd(f)(x), torch.func.jacrev(f)(x))
    layer = mlxq.AffineLinear.from_float(torch.nn.Linear(64, 16), bits=4, group_size=32)
    t = torch.randn(3, 64, generator=gen)
    _, tangent = torch.func.jvp(layer, (x,), (t,))
    assert tangent.abs().max() > 0
    torch.testing.assert_close(tangent, layer(t) - layer(torch.zeros_like(t)))


def test_forward_mode_refuses_tangents_of_the_weight(gen):
    import torch.autograd.forward_ad as fwAD

    wq, s, b = quantized((16, 64), torch.float32, 32, 4, gen)
    x = torch.randn(2, 64, generator=gen)
    with pytest.raises(RuntimeError, match="gradients with respect to scales are not supported"):
        torch.func.jvp(lambda s: mlxq.affine_matmul(x, wq, s, b, 32, 4), (s,), (s,))
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="respect to biases"):
        mlxq.affine_matmul(x, wq, s, fwAD.make_dual(b, b), 32, 4)


@pytest.mark.parametrize("transpose", [True, False], ids=["xWT", "xW"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_grad_x_batched_weight_sums_over_broadcast(dtype, transpose, gen):
    """x broadcast against a batched weight gets the sum of the gradients of its copies."""
    n, k, gs, bits = 10, 64, 32, 4
    wq, s, b = quantized((3, n, k), dtype, gs, bits, gen)
    inner = k if transpose else n
    for x_shape, w_sel in [
        ((1, 6, inner), slice(None)),  # x broadcast over the weight batch (3)
        ((6, inner), slice(None)),  # 2-D x against batched w
        ((2, 1, 18, inner), slice(None)),  # batch [2, 3], GEMM path
        ((4, 5, inner), slice(0, 1)),  # w broadcast over x's batch: no sum
    ]:
        x = torch.randn(x_shape, generator=gen).to(dtype).requires_grad_(True)
        w = (wq[w_sel], s[w_sel], b[w_sel])
        y = mlxq.affine_matmul(x, *w, gs, bits, transpose)
        g = torch.randn(y.shape, generator=gen).to(dtype)
        y.backward(g)
        assert x.grad.shape == x.shape
        ref, ref_abs = grad_reference(g, *w, gs, bits, transpose, x.shape)
        copies = y.numel() // (x.numel() // inner * g.shape[-1])  # summed per element of x.grad
        # each copy is rounded to dtype before the sum: one rounding of dtype per copy on top
        tol = matmul_tolerance(ref_abs, ref, g.shape[-1], dtype)
        tol = tol + copies * torch.finfo(dtype).eps * ref_abs
        assert_within(x.grad, ref, tol, f"grad of x {x_shape} vs w batch {wq[w_sel].shape[0]}")


def test_grad_of_quantized_weight_is_a_clear_error(gen):
    wq, s, b = quantized((8, 64), torch.float32, 32, 4, gen)
    x = torch.randn((2, 64), generator=gen, requires_grad=True)
    for name in ("scales", "biases"):
        s_, b_ = s.clone(), b.clone()
        (s_ if name == "scales" else b_).requires_grad_(True)
        y = mlxq.affine_matmul(x, wq, s_, b_, 32, 4)
        with pytest.raises(RuntimeError, match=f"affine_matmul.*constant.*{name}"):
            y.sum().backward()
        d = mlxq.affine_dequantize(wq, s_, b_, 32, 4)
        with pytest.raises(RuntimeError, match=f"affine_dequantize.*constant.*{name}"):
            d.sum().backward()
    w = torch.randn((4, 64), generator=gen, requires_grad=True)
    _, s_q, b_q = mlxq.affine_quantize(w, 32, 4)
    with pytest.raises(RuntimeError, match="affine_quantize.*no useful gradient"):
        (s_q.sum() + b_q.sum()).backward()
    # with the weight constant, x still gets its gradient
    mlxq.affine_matmul(x, wq, s, b, 32, 4).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("mode", ["affine", "mxfp4"])
def test_inference_call_runs_no_python(mode, gen):
    """A call that needs no gradient (no_grad, as transformers' generate runs) goes from the
    dispatcher to the kernel without Python: a Python autograd kernel cost ~7 us of a ~10 us
    decode-step matmul. Reverse mode lives in C++ (csrc/autograd.cpp)."""
    import sys

    w = random_weight((64, 64), torch.float32, gen)
    packed = mlxq.quantize(w, mode=mode) if mode != "affine" else mlxq.affine_quantize(w)
    if mode == "affine":
        call = torch.ops.mlxq.affine_matmul.default
        args = (*packed, 64, 4, True)
    else:
        call = torch.ops.mlxq.fp_matmul.default
        args = (*packed, mode, 32, 4, True, None)
    x = torch.randn(1, 64, generator=gen, requires_grad=True)
    python_calls = []
    with torch.no_grad():
        sys.setprofile(lambda frame, event, arg: python_calls.append((event, frame.f_code)))
        try:
            call(x, *args)
        finally:
            sys.setprofile(None)
    # the only Python is the op handle's own __call__ (torch/_ops.py)
    called = [c for e, c in python_calls if e == "call"]
    assert [c for c in called if not c.co_filename.endswith("_ops.py")] == []


# --- fake kernels -------------------------------------------------------------------------------


def op_calls(gen):
    """(name, callable on a tuple of tensors, tensors) for each op in several shapes."""
    out = []
    for bits, gs, shape in [(4, 32, (7, 64)), (3, 64, (2, 5, 128)), (6, 128, (128,))]:
        w = random_weight(shape, torch.bfloat16, gen)
        out.append(
            (f"quantize {shape}", lambda w, gs=gs, b=bits: mlxq.affine_quantize(w, gs, b), (w,))
        )
        q = mlxq.affine_quantize(w, gs, bits)
        out.append(
            (f"dequantize {shape}", lambda *t, gs=gs, b=bits: mlxq.affine_dequantize(*t, gs, b), q)
        )
    wq, s, b = quantized((3, 12, 64), torch.float16, 32, 5, gen)
    for x_shape, w_sel, tr in [
        ((4, 64), 0, True),
        ((2, 3, 12), 0, False),
        ((1, 4, 64), slice(None), True),
        ((2, 1, 4, 12), slice(None), False),
    ]:
        x = torch.randn(x_shape, generator=gen).half()
        out.append(
            (
                f"matmul x {x_shape} transpose={tr}",
                lambda *t, tr=tr: mlxq.affine_matmul(*t, 32, 5, tr),
                (x, wq[w_sel], s[w_sel], b[w_sel]),
            )
        )
    return out


def test_fake_kernels_match_real_shapes_and_dtypes(gen):
    """The meta device and FakeTensorMode give the real outputs' shapes, dtypes and devices."""
    for name, fn, args in op_calls(gen):
        real = fn(*args)
        real = real if isinstance(real, tuple) else (real,)
        meta = fn(*(a.to("meta") for a in args))
        meta = meta if isinstance(meta, tuple) else (meta,)
        with FakeTensorMode() as mode:
            fake = fn(*(mode.from_tensor(a) for a in args))
        fake = fake if isinstance(fake, tuple) else (fake,)
        for r, m, f in zip(real, meta, fake, strict=True):
            assert (m.shape, m.dtype, m.device.type) == (r.shape, r.dtype, "meta"), name
            assert (f.shape, f.dtype, f.device) == (r.shape, r.dtype, r.device), name


def test_opcheck(gen):
    """torch.library.opcheck (schema, autograd registration, fake kernel against the real one on
    fake tensors, AOT dispatch with dynamic shapes) for every op, empty shapes included."""
    w = random_weight((8, 64), torch.float32, gen)
    wq, s, b = mlxq.affine_quantize(w, 32, 4)
    ops = torch.ops.mlxq
    cases = [
        (ops.affine_quantize.default, (w, 32, 4)),
        (ops.affine_quantize.default, (w[:0], 32, 4)),
        (ops.affine_dequantize.default, (wq, s, b, 32, 4)),
        (ops.affine_dequantize.default, (wq[:0], s[:0], b[:0], 32, 4)),
        (ops.affine_matmul.default, (torch.randn(3, 64, generator=gen), wq, s, b, 32, 4, True)),
        (ops.affine_matmul.default, (torch.randn(2, 3, 8, generator=gen), wq, s, b, 32, 4, False)),
        (ops.affine_matmul.default, (torch.randn(0, 64, generator=gen), wq, s, b, 32, 4, True)),
    ]
    # the floating-point modes (nvfp4 with and without its global scale) and the gather op
    for mode, gs, bits, global_scale in [
        ("mxfp4", 32, 4, None),
        ("nvfp4", 16, 4, torch.tensor(3.0)),
        ("mxfp8", 32, 8, None),
    ]:
        fq, fs = ops.fp_quantize(w, mode, gs, bits, global_scale)
        cases += [
            (ops.fp_quantize.default, (w, mode, gs, bits, global_scale)),
            (ops.fp_dequantize.default, (fq, fs, mode, gs, bits, global_scale, torch.bfloat16)),
            (
                ops.fp_matmul.default,
                (torch.randn(3, 64, generator=gen), fq, fs, mode, gs, bits, True, global_scale),
            ),
        ]
    ew, es, eb = mlxq.affine_quantize(random_weight((3, 8, 64), torch.float32, gen), 32, 4)
    xg = torch.randn(4, 1, 64, generator=gen)
    rhs = torch.tensor([2, 0, 2, 1])
    cases += [
        (ops.affine_gather_matmul.default, (xg, ew, es, eb, None, rhs, 32, 4, True, False)),
        (ops.affine_gather_matmul.default, (xg, ew, es, eb, None, rhs.sort().values, 32, 4)),
    ]
    # fp_gather_matmul in the three float modes (nvfp4 with per-expert global scales), both
    # transposes, sorted indices
    for mode, gs, bits, global_scale in [
        ("mxfp4", 32, 4, None),
        ("nvfp4", 16, 4, torch.tensor([0.5, 2.0, 3.0])),
        ("mxfp8", 32, 8, None),
    ]:
        fq, fs = ops.fp_quantize(random_weight((3, 8, 64), torch.float32, gen), mode, gs, bits)
        xt = torch.randn(4, 1, 8, generator=gen)
        cases += [
            (
                ops.fp_gather_matmul.default,
                (xg, fq, fs, mode, gs, bits, None, rhs, True, global_scale, False),
            ),
            (ops.fp_gather_matmul.default, (xt, fq, fs, mode, gs, bits, None, rhs, False)),
            (
                ops.fp_gather_matmul.default,
                (xg, fq, fs, mode, gs, bits, None, rhs.sort().values, True, global_scale, True),
            ),
        ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


# --- torch.compile ----------------------------------------------------------------------------


class QuantModule(torch.nn.Module):
    """A small module that calls every op: quantize a weight, dequantize it, and matmul."""

    def __init__(self, w: torch.Tensor, group_size: int, bits: int, transpose: bool = True):
        super().__init__()
        wq, s, b = mlxq.affine_quantize(w, group_size, bits)
        self.register_buffer("wq", wq)
        self.register_buffer("scales", s)
        self.register_buffer("biases", b)
        self.group_size, self.bits, self.transpose = group_size, bits, transpose

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        gs, bits = self.group_size, self.bits
        y = mlxq.affine_matmul(x, self.wq, self.scales, self.biases, gs, bits, self.transpose)
        w = mlxq.affine_dequantize(self.wq, self.scales, self.biases, gs, bits)
        wq2, s2, b2 = mlxq.affine_quantize(w * 2, gs, bits)
        return torch.nn.functional.gelu(y) * 0.5, w, wq2, s2, b2


def assert_same(outs, refs, what):
    for i, (o, r) in enumerate(zip(outs, refs, strict=True)):
        assert o.shape == r.shape and o.dtype == r.dtype, f"{what}: output {i}"
        assert torch.equal(o, r), f"{what}: output {i} differs from eager"


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_matches_eager(backend, dynamic, gen):
    torch._dynamo.reset()
    for transpose in (True, False):
        mod = QuantModule(random_weight((16, 128), torch.bfloat16, gen), 64, 3, transpose)
        counter = CompileCounter()
        # CompileCounter stands in for the backend: it counts graphs and runs them eagerly;
        # aot_eager also traces the ops through the fake kernels (and the backward).
        compiled = torch.compile(
            mod, fullgraph=True, dynamic=dynamic, backend=counter if backend == "eager" else backend
        )
        inner = 128 if transpose else 16
        for shape in [(3, inner), (20, inner), (2, 7, inner)]:
            x = torch.randn(shape, generator=gen).to(torch.bfloat16)
            assert_same(compiled(x), mod(x), f"{backend} transpose={transpose} x {shape}")
        if backend == "eager":
            # 2-D and 3-D x are different graphs; with dynamic shapes M varies without recompiling
            assert counter.frame_count <= (2 if dynamic else 3), counter.frame_count


def test_compile_aot_eager_backward_and_batched_weight(gen):
    torch._dynamo.reset()
    wq, s, b = quantized((3, 12, 64), torch.float32, 32, 4, gen)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return mlxq.affine_matmul(x, wq, s, b, 32, 4).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager", dynamic=True)
    for shape in [(1, 5, 64), (3, 18, 64), (2, 1, 4, 64)]:
        x = torch.randn(shape, generator=gen)
        xc, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        lc, le = compiled(xc), loss(xe)
        lc.backward()
        le.backward()
        assert torch.equal(lc, le), shape
        assert torch.equal(xc.grad, xe.grad), shape


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_bad_arguments_still_name_the_argument(backend, gen):
    """Under torch.compile an invalid call fails with the op's message (raised by the native
    checks at run time, or by the fake kernel while tracing, which dynamo wraps)."""
    wq, s, b = quantized((8, 64), torch.float32, 32, 4, gen)
    cases = [
        (
            lambda x: mlxq.affine_matmul(x, wq, s, b, 32, 4),
            torch.zeros(2, 63),
            "x last dimension 63",
        ),
        (lambda w: mlxq.affine_quantize(w, 32, 4), torch.zeros(2, 48), "w last dimension 48"),
        (lambda x: mlxq.affine_matmul(x, wq, s, b, 32, 5), torch.zeros(2, 64), "wq last dimension"),
        (lambda x: mlxq.affine_matmul(x, wq, s, b, 16, 4), torch.zeros(2, 64), "group_size"),
    ]
    for fn, arg, fragment in cases:
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend=backend)
        with pytest.raises((ValueError, RuntimeError), match=re.escape(fragment)):
            compiled(arg)


def test_compile_inductor(gen):
    """The default backend (inductor) fuses around the custom op and matches eager."""
    torch._dynamo.reset()
    mod = QuantModule(random_weight((24, 64), torch.float32, gen), 32, 4)
    compiled = torch.compile(mod, fullgraph=True)
    for shape in [(2, 64), (19, 64)]:
        x = torch.randn(shape, generator=gen)
        outs, refs = compiled(x), mod(x)
        assert_same(outs[1:], refs[1:], f"inductor x {shape}")
        torch.testing.assert_close(outs[0], refs[0], rtol=1e-6, atol=1e-6)
