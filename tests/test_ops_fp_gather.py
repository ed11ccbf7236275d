"""fp_gather_matmul (mx.gather_qmm with mode mxfp4 / nvfp4 / mxfp8) against mx.gather_qmm, a
float64 reference written from the format (oracles.fp_dequantize_ref) and the dense fp op.

The CPU kernel groups the pairs by expert and runs each group through fp_matmul's kernels, so
where both take the streaming path each pair equals fp_matmul of its rows bit for bit. nvfp4's
per-expert global_scale runs only on MLX's GPU: it is held to float64 and to fp_matmul with that
expert's scale.
"""

from __future__ import annotations

import mlxq
import pytest
import torch
from oracles import (
    DTYPES,
    FP_BITS,
    FP_GROUP,
    assert_gather_grad_within,
    assert_within,
    eps,
    mx_gather_qmm,
)
from oracles import fp_dequantize_ref as dequantize_ref
from torch._subclasses.fake_tensor import FakeTensorMode

# (mode, per-expert global scales?) cases: nvfp4 alone takes a global scale
CASES = [("mxfp4", False), ("nvfp4", False), ("nvfp4", True), ("mxfp8", False)]
CASE_IDS = ["mxfp4", "nvfp4", "nvfp4-gs", "mxfp8"]
DTYPE_IDS = [str(d).split(".")[-1] for d in DTYPES]


def experts(e: int, rows: int, cols: int, mode: str, gen, with_global: bool = False):
    """E quantized matrices [e, rows, cols] (rows of very different magnitudes), and nvfp4's
    per-expert global scales (float32 [e]) when asked; quantized per expert as MLX does."""
    w = torch.randn(e, rows, cols, generator=gen) * torch.logspace(-2, 2, rows)[:, None]
    if not with_global:
        wq, s = mlxq.quantize(w, mode=mode)
        return wq, s, None
    gs = (torch.rand(e, generator=gen) * 4 + 0.25).float()
    parts = [mlxq.quantize(w[i], mode=mode, global_scale=gs[i]) for i in range(e)]
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), gs


def flat_pairs(x, wq, lhs, rhs):
    """The (x matrix, weight matrix) index of every output pair, broadcast like MLX."""
    lhs = torch.arange(x.shape[:-2].numel()).reshape(x.shape[:-2]) if lhs is None else lhs
    rhs = torch.arange(wq.shape[:-2].numel()).reshape(wq.shape[:-2]) if rhs is None else rhs
    lhs, rhs = torch.broadcast_tensors(lhs.long(), rhs.long())
    return lhs.shape, lhs.reshape(-1), rhs.reshape(-1)


def reference(x, wq, s, mode, gs, lhs, rhs, transpose):
    """float64 x[lhs[i]] @ W[rhs[i]] (.T), and the same with absolute values (error scale)."""
    shape, lf, rf = flat_pairs(x, wq, lhs, rhs)
    xm = x.detach().double().reshape(-1, *x.shape[-2:])[lf]
    w = dequantize_ref(wq, s, mode, None if gs is None else gs.numpy())
    w = w.reshape(-1, *w.shape[-2:])[rf]
    if transpose:
        w = w.transpose(-1, -2)
    ref, ref_abs = xm @ w, xm.abs() @ w.abs()
    return ref.reshape(*shape, *ref.shape[-2:]), ref_abs.reshape(*shape, *ref.shape[-2:])


def tolerance(ref, ref_abs, k: int, dtype) -> torch.Tensor:
    """test_fp_modes' bound: fp32 products of exact values, a k-term fp32 sum, one rounding of
    the group scale by the global factor, then the output rounding."""
    tol = (k + 3) * eps(torch.float32) * ref_abs
    if dtype != torch.float32:
        tol = tol + eps(dtype) * (ref.abs() + tol) + torch.finfo(dtype).tiny
    return tol + 1e-30


def check(x, wq, s, mode, gs, lhs, rhs, transpose=True, sorted_indices=False):
    y = mlxq.fp_gather_matmul(
        x, wq, s, mode, FP_GROUP[mode], FP_BITS[mode], lhs, rhs, transpose, gs, sorted_indices
    )
    assert y.dtype == x.dtype
    ref, ref_abs = reference(x, wq, s, mode, gs, lhs, rhs, transpose)
    k = x.shape[-1]
    tol = tolerance(ref, ref_abs, k, x.dtype)
    assert_within(y, ref, tol, f"{mode} vs float64 reference")
    if gs is None:  # MLX runs the global scale on its GPU only
        theirs = mx_gather_qmm(
            x, wq, s, None, lhs, rhs, transpose, mode=mode, sorted_indices=sorted_indices
        )
        assert theirs.shape == y.shape
        if x.dtype == torch.float32:
            mlx_tol = 2 * tol
        else:  # MLX on the CPU accumulates in the low dtype: its own worst-case bound, plus ours
            mlx_tol = tol + (k + 2) * eps(x.dtype) * ref_abs + eps(x.dtype) * ref.abs() * 2
        assert_within(y, theirs.double(), mlx_tol, f"{mode} vs mx.gather_qmm")
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode,with_global", CASES, ids=CASE_IDS)
def test_gather_grid(mode, with_global, dtype, gen, isa):
    """Decode (one token, top-3 of 5 experts, a repeated expert) and prefill (24 tokens, top-2:
    one expert above the streaming limit) in mlx-lm's SwitchGLU layout, and x @ W."""
    k = 128
    wq, s, gs = experts(5, 48, k, mode, gen, with_global)
    x = torch.randn(1, 1, 1, k, generator=gen).to(dtype)
    check(x, wq, s, mode, gs, None, torch.tensor([[4, 1, 4]]))
    x = torch.randn(24, 1, 1, k, generator=gen).to(dtype)
    rhs = torch.randint(0, 5, (24, 2), generator=gen)
    rhs[:20, 0] = 2  # one expert with 20 rows: the dequantize + GEMM path
    check(x, wq, s, mode, gs, None, rhs)
    # x @ W: the weight is [rows=48, cols=k]; x has 48 columns
    x = torch.randn(3, 2, 48, generator=gen).to(dtype)
    lhs, rhs = torch.tensor([2, 0, 1, 1]), torch.tensor([0, 3, 3, 1])
    check(x, wq, s, mode, gs, lhs, rhs, transpose=False)


@pytest.mark.parametrize("sorted_indices", [False, True])
@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_sorted_and_unsorted_indices(mode, sorted_indices, gen, isa):
    """mlx-lm sorts the (token, expert) pairs of a long prompt and passes sorted_indices; the
    result must not depend on the hint, nor on the order of the pairs."""
    wq, s, _ = experts(8, 64, 128, mode, gen)
    rhs = torch.randint(0, 8, (40,), generator=gen)
    if sorted_indices:
        rhs = rhs.sort().values
    x = torch.randn(40, 1, 128, generator=gen)
    g, b = FP_GROUP[mode], FP_BITS[mode]
    check(x, wq, s, mode, None, None, rhs, sorted_indices=sorted_indices)
    # the hint only groups runs: a wrong hint still gives the right answer, within the same
    # bound of the float64 product (the grouping may change the summation order)
    y_hint = mlxq.fp_gather_matmul(x, wq, s, mode, g, b, None, rhs, True, None, not sorted_indices)
    ref, ref_abs = reference(x, wq, s, mode, None, None, rhs, True)
    tol = tolerance(ref, ref_abs, x.shape[-1], x.dtype)
    assert_within(y_hint, ref, tol, f"{mode} with the other sorted_indices hint")


def test_broadcast_batches(gen, isa):
    """Index shapes broadcast against each other; absent indices are aranges over the batch."""
    mode = "mxfp4"
    wq, s, _ = experts(6, 32, 64, mode, gen)
    x = torch.randn(5, 2, 64, generator=gen)
    check(x, wq, s, mode, None, torch.tensor([0, 4, 2]), torch.tensor([[1], [5]]))  # [2, 3]
    check(x, wq, s, mode, None, torch.tensor([[3], [1]]), None)  # rhs: arange(6) -> [2, 6]
    # both absent: the batched quantized matmul (x batch [5] against wq batch [1])
    check(x, wq[:1], s[:1], mode, None, None, None)
    # a 2-D weight (one matrix), x batch of two dimensions
    check(torch.randn(2, 3, 4, 64, generator=gen), wq[2], s[2], mode, None, None, None)
    # a weight batch of two dimensions, flat rhs indices into it
    wq2, s2, _ = experts(6, 32, 64, "nvfp4", gen)
    wq2, s2 = wq2.reshape(2, 3, 32, -1), s2.reshape(2, 3, 32, -1)
    check(torch.randn(2, 1, 64, generator=gen), wq2, s2, "nvfp4", None, None, torch.tensor([5, 0]))
    # int32 and uint32 indices
    idx = torch.tensor([[5, 0, 2]], dtype=torch.int32)
    check(torch.randn(1, 1, 1, 64, generator=gen), wq, s, mode, None, None, idx)
    args = (mode, 32, 4, None)
    y_u32 = mlxq.fp_gather_matmul(x[:1, :1], wq, s, *args, idx.view(torch.uint32))
    y_i64 = mlxq.fp_gather_matmul(x[:1, :1], wq, s, *args, idx.long())
    assert torch.equal(y_u32, y_i64)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode,with_global", CASES, ids=CASE_IDS)
def test_same_numerics_as_dense_op(mode, with_global, dtype, gen, isa):
    """Each pair equals fp_matmul of its rows (with its expert's global scale) bit for bit where
    both stream the weight, and closely on the GEMM path."""
    wq, s, gs = experts(6, 40, 256, mode, gen, with_global)
    g, b = FP_GROUP[mode], FP_BITS[mode]
    x = torch.randn(2, 3, 256, generator=gen).to(dtype)
    lhs, rhs = torch.tensor([0, 1, 1, 0]), torch.tensor([2, 4, 0, 5])  # distinct experts
    y = mlxq.fp_gather_matmul(x, wq, s, mode, g, b, lhs, rhs, True, gs)
    for i, (li, ri) in enumerate(zip(lhs.tolist(), rhs.tolist(), strict=True)):
        ge = None if gs is None else gs[ri]
        dense = mlxq.quantized_matmul(x[li], wq[ri], s[ri], mode=mode, global_scale=ge)
        assert torch.equal(y[i], dense), i
    # 20 rows of one expert: the GEMM path of both
    x = torch.randn(20, 256, generator=gen).to(dtype)
    y = mlxq.fp_gather_matmul(x[:, None], wq, s, mode, g, b, None, torch.full((20,), 3), True, gs)
    dense = mlxq.quantized_matmul(
        x, wq[3], s[3], mode=mode, global_scale=None if gs is None else gs[3]
    )
    # the two may sum in different orders: each within the bound of the float64 product
    ref, ref_abs = reference(x[:, None], wq, s, mode, gs, None, torch.full((20,), 3), True)
    tol = tolerance(ref, ref_abs, x.shape[-1], dtype)[:, 0]
    assert_within(y[:, 0], ref[:, 0], tol, f"{mode} gather, 20 rows of one expert")
    assert_within(dense, ref[:, 0], tol, f"{mode} dense op, the same 20 rows")


def test_work_scales_with_the_selected_experts(gen):
    """Experts nobody chose are not read: NaN scales in them change nothing."""
    wq, s, _ = experts(16, 64, 128, "nvfp4", gen)
    x = torch.randn(3, 1, 1, 128, generator=gen)
    rhs = torch.tensor([[1, 7], [7, 9], [1, 1]])
    y = mlxq.fp_gather_matmul(x, wq, s, "nvfp4", 16, 4, None, rhs)
    s2 = s.clone()
    unused = [e for e in range(16) if e not in (1, 7, 9)]
    s2[unused] = 0x7F  # E4M3 NaN
    assert torch.equal(mlxq.fp_gather_matmul(x, wq, s2, "nvfp4", 16, 4, None, rhs), y)
    assert not y.isnan().any()


def test_mode_generic_function_matches_mlx_signature(gen):
    """gather_quantized_matmul takes mx.gather_qmm's arguments and defaults for every mode."""
    wq, s, _ = experts(4, 32, 64, "mxfp8", gen)
    x = torch.randn(3, 1, 64, generator=gen)
    rhs = torch.tensor([3, 0, 3])
    y = mlxq.gather_quantized_matmul(x, wq, s, rhs_indices=rhs, mode="mxfp8")
    assert torch.equal(y, mlxq.fp_gather_matmul(x, wq, s, "mxfp8", 32, 8, None, rhs))
    aq, a_s, ab = mlxq.affine_quantize(torch.randn(4, 32, 64, generator=gen), 64, 4)
    y = mlxq.gather_quantized_matmul(x, aq, a_s, ab, rhs_indices=rhs, sorted_indices=False)
    assert torch.equal(y, mlxq.affine_gather_matmul(x, aq, a_s, ab, None, rhs, 64, 4))
    with pytest.raises(ValueError, match="biases must be None for mode 'mxfp8'"):
        mlxq.gather_quantized_matmul(x, wq, s, s, rhs_indices=rhs, mode="mxfp8")


def test_empty_and_edge_shapes(gen):
    wq, s, _ = experts(3, 32, 64, "mxfp4", gen)
    x = torch.randn(2, 1, 64, generator=gen)
    empty = torch.zeros(2, 0, dtype=torch.long)
    y = mlxq.fp_gather_matmul(x[:, None], wq, s, "mxfp4", 32, 4, None, empty)
    assert y.shape == (2, 0, 1, 32)
    one, two = torch.tensor([1]), torch.tensor([2])
    y = mlxq.fp_gather_matmul(x[:, :0], wq, s, "mxfp4", 32, 4, one, two)
    assert y.shape == (1, 0, 32)


@pytest.mark.parametrize(
    "kwargs,exc,fragments",
    [
        (dict(rhs_indices=torch.tensor([3, 3])), IndexError, ["rhs_indices", "[0, 3)", "3 to 3"]),
        (
            dict(lhs_indices=torch.tensor([-1]), rhs_indices=torch.tensor([0])),
            IndexError,
            ["lhs_indices", "[0, 2)", "-1"],
        ),
        (dict(rhs_indices=torch.tensor([0.0])), TypeError, ["rhs_indices", "integer tensor"]),
        (
            dict(lhs_indices=torch.tensor([0, 1, 0]), rhs_indices=torch.tensor([0, 1])),
            ValueError,
            ["lhs_indices shape [3]", "rhs_indices shape [2]"],
        ),
        (dict(group_size=16), ValueError, ["group_size must be 32", "'mxfp4'", "got 16"]),
        (dict(mode="affine"), ValueError, ["mode", "'mxfp4'", "'affine'"]),
        (
            dict(global_scale=torch.ones(3)),
            ValueError,
            ["global_scale", "'nvfp4'", "'mxfp4'"],
        ),
        (dict(x=torch.zeros(64)), ValueError, ["x must have at least 2 dimensions", "[64]"]),
        (dict(x=torch.zeros(2, 1, 32)), ValueError, ["x last dimension 32", "64"]),
        (dict(x=torch.zeros(2, 1, 64, dtype=torch.int32)), TypeError, ["x must be float", "Int"]),
        (dict(scales=torch.zeros(3, 32, 2)), TypeError, ["scales", "uint8", "Float"]),
    ],
)
def test_errors_name_argument_expected_actual(kwargs, exc, fragments, gen):
    wq, s, _ = experts(3, 32, 64, "mxfp4", gen)
    args = dict(x=torch.randn(2, 1, 64, generator=gen), wq=wq, scales=s, mode="mxfp4")
    args.update(group_size=32, bits=4, rhs_indices=torch.tensor([0, 1]))
    args.update(kwargs)
    with pytest.raises(exc) as info:
        mlxq.fp_gather_matmul(**args)
    for f in fragments:
        assert f in str(info.value), f"{f!r} not in {info.value}"


def test_global_scale_shape_is_one_per_expert(gen):
    wq, s, gs = experts(3, 32, 64, "nvfp4", gen, with_global=True)
    x = torch.randn(2, 1, 64, generator=gen)
    for bad in (gs[0], gs[:2], gs.reshape(3, 1)):
        with pytest.raises(ValueError, match=r"one value per matrix of wq, shape \[3\]"):
            mlxq.fp_gather_matmul(x, wq, s, "nvfp4", 16, 4, None, torch.tensor([0, 1]), True, bad)
    with pytest.raises(TypeError, match="global_scale must be float32"):
        mlxq.fp_gather_matmul(x, wq, s, "nvfp4", 16, 4, None, torch.tensor([0]), True, gs.double())
    # a 2-D weight is one matrix: its global scale is a single value (shape []), as fp_matmul's
    y = mlxq.fp_gather_matmul(x, wq[1], s[1], "nvfp4", 16, 4, None, None, True, gs[1])
    assert torch.equal(y, mlxq.quantized_matmul(x, wq[1], s[1], mode="nvfp4", global_scale=gs[1]))


def test_fake_kernel_meta_and_compile(gen):
    wq, s, gs = experts(4, 32, 64, "nvfp4", gen, with_global=True)
    x = torch.randn(3, 1, 1, 64, generator=gen)
    rhs = torch.randint(0, 4, (3, 2), generator=gen)
    meta = mlxq.fp_gather_matmul(
        x.to("meta"),
        wq.to("meta"),
        s.to("meta"),
        "nvfp4",
        16,
        4,
        None,
        rhs.to("meta"),
        True,
        gs.to("meta"),
    )
    assert meta.shape == (3, 2, 1, 32) and meta.dtype == torch.float32
    with FakeTensorMode():
        xf = torch.empty(5, 2, 32, dtype=torch.bfloat16)
        yf = torch.ops.mlxq.fp_gather_matmul(
            xf,
            torch.empty(4, 32, 8, dtype=torch.uint32),
            torch.empty(4, 32, 4, dtype=torch.uint8),
            "nvfp4",
            16,
            4,
            torch.tensor([0, 4]),
            torch.tensor([[1], [3]]),
            False,
        )
        assert yf.shape == (2, 2, 2, 64) and yf.dtype == torch.bfloat16

    def f(x, rhs):
        return mlxq.fp_gather_matmul(x, wq, s, "nvfp4", 16, 4, None, rhs, True, gs) * 2

    for dynamic in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=dynamic)
        torch.testing.assert_close(compiled(x, rhs), f(x, rhs), rtol=0, atol=0)
        x2, rhs2 = torch.randn(5, 1, 1, 64, generator=gen), torch.randint(0, 4, (5, 3))
        torch.testing.assert_close(compiled(x2, rhs2), f(x2, rhs2), rtol=0, atol=0)


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("mode,with_global", CASES, ids=CASE_IDS)
def test_autograd_wrt_x(mode, with_global, transpose, gen):
    """d/dx against the float64 gather written with torch ops; pairs share x matrices."""
    wq, s, gs = experts(4, 32, 64, mode, gen, with_global)
    cols = 64 if transpose else 32
    x = torch.randn(3, 2, cols, generator=gen, dtype=torch.float32, requires_grad=True)
    lhs, rhs = torch.tensor([[0, 2], [2, 2]]), torch.tensor([[1, 3], [0, 1]])
    args = (mode, FP_GROUP[mode], FP_BITS[mode])
    y = mlxq.fp_gather_matmul(x, wq, s, *args, lhs, rhs, transpose, gs)
    g = torch.randn(y.shape, generator=gen)
    (gx,) = torch.autograd.grad(y, x, g)
    # fp32 products g @ W (the values of W are exact in fp32 but for nvfp4's global factor,
    # one rounding) summed again over the pairs that share an x matrix: the derived bound
    w = dequantize_ref(wq, s, mode, None if gs is None else gs.numpy())
    assert_gather_grad_within(gx, g, w, w.abs(), lhs, rhs, transpose, f"{mode} d/dx")
    if gs is not None:
        with pytest.raises(RuntimeError, match="gradients with respect to scales and global"):
            out = mlxq.fp_gather_matmul(x, wq, s, *args, lhs, rhs, transpose, gs.requires_grad_())
            out.sum().backward()
