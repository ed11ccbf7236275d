"""affine_gather_matmul against mx.gather_qmm, a float64 reference and the dense op.

The op is MLX's gather_qmm: pair i of the broadcast (lhs, rhs) indices multiplies x's matrix
lhs[i] with wq's matrix rhs[i]. The CPU kernel groups the pairs by expert and runs each group
through the dense op's kernels, so besides MLX and float64 it is held bit for bit to
affine_matmul on the same rows wherever both take the streaming path.
"""

from __future__ import annotations

import mlxq
import pytest
import torch
from conftest import random_weight
from oracles import (
    BITS,
    DTYPES,
    GROUP_SIZES,
    assert_gather_grad_within,
    assert_within,
    dequantize_ref,
    eps,
    matmul_tolerance,
    mx_gather_qmm,
)

GRID = [(b, g, d) for b in BITS for g in GROUP_SIZES for d in DTYPES]
GRID_IDS = [f"b{b}-g{g}-{str(d).split('.')[-1]}" for b, g, d in GRID]


def experts(e: int, rows: int, cols: int, dtype, group_size: int, bits: int, gen):
    return mlxq.affine_quantize(random_weight((e, rows, cols), dtype, gen), group_size, bits)


def flat_pairs(x, wq, lhs, rhs):
    """The (x matrix, weight matrix) index of every output pair, broadcast like MLX."""
    lhs = torch.arange(x.shape[:-2].numel()).reshape(x.shape[:-2]) if lhs is None else lhs
    rhs = torch.arange(wq.shape[:-2].numel()).reshape(wq.shape[:-2]) if rhs is None else rhs
    lhs, rhs = torch.broadcast_tensors(lhs.long(), rhs.long())
    return lhs.shape, lhs.reshape(-1), rhs.reshape(-1)


def reference(x, wq, s, b, lhs, rhs, group_size, bits, transpose):
    """float64 x[lhs[i]] @ W[rhs[i]] (.T), and the same with absolute values (error scale)."""
    shape, lf, rf = flat_pairs(x, wq, lhs, rhs)
    xm = x.detach().double().reshape(-1, *x.shape[-2:])[lf]
    w = dequantize_ref(wq, s, b, group_size, bits)
    w_abs = dequantize_ref(wq, s.abs(), b.abs(), group_size, bits)
    w = w.reshape(-1, *w.shape[-2:])[rf]
    w_abs = w_abs.reshape(-1, *w_abs.shape[-2:])[rf]
    if transpose:
        w, w_abs = w.transpose(-1, -2), w_abs.transpose(-1, -2)
    ref, ref_abs = xm @ w, xm.abs() @ w_abs
    return ref.reshape(*shape, *ref.shape[-2:]), ref_abs.reshape(*shape, *ref.shape[-2:])


def check(x, wq, s, b, lhs, rhs, group_size, bits, transpose=True, sorted_indices=False):
    y = mlxq.affine_gather_matmul(
        x, wq, s, b, lhs, rhs, group_size, bits, transpose, sorted_indices
    )
    assert y.dtype == x.dtype
    ref, ref_abs = reference(x, wq, s, b, lhs, rhs, group_size, bits, transpose)
    k = x.shape[-1]
    tol = matmul_tolerance(ref_abs, ref, k, x.dtype)
    if x.dtype == torch.bfloat16 and transpose:
        # Experts with more than 16 rows take the dense op's bf16-tile GEMM: each tile value
        # s*q + b rounds twice in bf16, at most 2u(|s|q + |b|) (test_ops_matmul checks it
        # exactly against those tiles).
        tol = tol + 2.01 * eps(torch.bfloat16) * ref_abs
    assert_within(y, ref, tol, "vs float64 reference")
    theirs = mx_gather_qmm(
        x, wq, s, b, lhs, rhs, transpose, group_size, bits, sorted_indices=sorted_indices
    )
    assert theirs.shape == y.shape
    if x.dtype == torch.float32:
        mlx_tol = 2 * tol
    else:  # MLX on the CPU accumulates in the low dtype: its own worst-case bound, plus ours
        mlx_tol = tol + (k + 2) * eps(x.dtype) * ref_abs + eps(x.dtype) * ref.abs() * 2
    assert_within(y, theirs.double(), mlx_tol, "vs mx.gather_qmm")
    return y


@pytest.mark.parametrize("bits,group_size,dtype", GRID, ids=GRID_IDS)
def test_gather_grid(bits, group_size, dtype, gen):
    """Decode (one token, top-3 of 5 experts, a repeated expert) and prefill (24 tokens, top-2:
    groups above the streaming limit) in mlx-lm's SwitchGLU layout, both transposes."""
    k = 2 * group_size
    wq, s, b = experts(5, 48, k, dtype, group_size, bits, gen)
    x = torch.randn(1, 1, 1, k, generator=gen).to(dtype)
    check(x, wq, s, b, None, torch.tensor([[4, 1, 4]]), group_size, bits)
    x = torch.randn(24, 1, 1, k, generator=gen).to(dtype)
    rhs = torch.randint(0, 5, (24, 2), generator=gen)
    rhs[:20, 0] = 2  # one expert with 20 rows: the dequantize + GEMM path
    check(x, wq, s, b, None, rhs, group_size, bits)
    # x @ W: the weight is [rows=48, cols=k]; x has 48 columns
    x = torch.randn(3, 2, 48, generator=gen).to(dtype)
    check(
        x, wq, s, b, torch.tensor([2, 0, 1, 1]), torch.tensor([0, 3, 3, 1]), group_size, bits, False
    )


@pytest.mark.parametrize("sorted_indices", [False, True])
def test_sorted_and_unsorted_indices(sorted_indices, gen, isa):
    """mlx-lm sorts the (token, expert) pairs of a long prompt and passes sorted_indices; the
    result must be right whatever the hint and the order of the pairs. (A wrong hint splits an
    expert's rows into smaller groups, which may take another decode kernel and so another fp32
    summation order: both are held to float64 and mx.gather_qmm, not to each other bit for bit.)"""
    wq, s, b = experts(8, 64, 128, torch.float32, 64, 4, gen)
    rhs = torch.randint(0, 8, (40,), generator=gen)
    if sorted_indices:
        rhs = rhs.sort().values
    x = torch.randn(40, 1, 128, generator=gen)
    check(x, wq, s, b, None, rhs, 64, 4, sorted_indices=sorted_indices)
    # the hint only groups runs: a wrong hint still gives the right answer
    check(x, wq, s, b, None, rhs, 64, 4, sorted_indices=not sorted_indices)


def test_broadcast_batches(gen, isa):
    """Index shapes broadcast against each other; absent indices are aranges over the batch."""
    wq, s, b = experts(6, 32, 64, torch.float32, 32, 3, gen)
    x = torch.randn(5, 2, 64, generator=gen)
    check(x, wq, s, b, torch.tensor([0, 4, 2]), torch.tensor([[1], [5]]), 32, 3)  # [2, 3]
    check(x, wq, s, b, torch.tensor([[3], [1]]), None, 32, 3)  # rhs: arange(6) -> [2, 6]
    # both absent: the batched quantized matmul (x batch [5] against wq batch [1])
    check(x, wq[:1], s[:1], b[:1], None, None, 32, 3)
    # a 2-D weight (one matrix) picked by index 0, x batch of two dimensions
    check(torch.randn(2, 3, 4, 64, generator=gen), wq[2], s[2], b[2], None, None, 32, 3)
    # int32 and uint32 indices
    idx = torch.tensor([[5, 0, 2]], dtype=torch.int32)
    check(torch.randn(1, 1, 1, 64, generator=gen), wq, s, b, None, idx, 32, 3)
    y_u32 = mlxq.affine_gather_matmul(x[:1, :1], wq, s, b, None, idx.view(torch.uint32), 32, 3)
    y_i64 = mlxq.affine_gather_matmul(x[:1, :1], wq, s, b, None, idx.long(), 32, 3)
    assert torch.equal(y_u32, y_i64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_same_numerics_as_dense_op(bits, dtype, gen, isa):
    """Each pair equals affine_matmul of its rows bit for bit where both stream the weight
    (a group's rows are the rows the dense op would get)."""
    wq, s, b = experts(6, 40, 256, dtype, 64, bits, gen)
    x = torch.randn(2, 3, 256, generator=gen).to(dtype)
    lhs, rhs = torch.tensor([0, 1, 1, 0]), torch.tensor([2, 4, 0, 5])  # distinct experts
    y = mlxq.affine_gather_matmul(x, wq, s, b, lhs, rhs, 64, bits)
    for i, (li, ri) in enumerate(zip(lhs.tolist(), rhs.tolist(), strict=True)):
        assert torch.equal(y[i], mlxq.affine_matmul(x[li], wq[ri], s[ri], b[ri], 64, bits)), i


def test_work_scales_with_the_selected_experts(gen):
    """Experts nobody chose are not read: garbage in them changes nothing."""
    wq, s, b = experts(16, 64, 128, torch.float32, 64, 4, gen)
    x = torch.randn(3, 1, 1, 128, generator=gen)
    rhs = torch.tensor([[1, 7], [7, 9], [1, 1]])
    y = mlxq.affine_gather_matmul(x, wq, s, b, None, rhs, 64, 4)
    s2 = s.clone()
    unused = [e for e in range(16) if e not in (1, 7, 9)]
    s2[unused] = float("nan")
    assert torch.equal(mlxq.affine_gather_matmul(x, wq, s2, b, None, rhs, 64, 4), y)


def test_empty_and_edge_shapes(gen):
    wq, s, b = experts(3, 32, 64, torch.float32, 64, 4, gen)
    x = torch.randn(2, 1, 64, generator=gen)
    empty = torch.zeros(2, 0, dtype=torch.long)
    y = mlxq.affine_gather_matmul(x[:, None], wq, s, b, None, empty, 64, 4)
    assert y.shape == (2, 0, 1, 32)
    y = mlxq.affine_gather_matmul(x[:, :0], wq, s, b, torch.tensor([1]), torch.tensor([2]), 64, 4)
    assert y.shape == (1, 0, 32)


def test_errors_name_the_argument(gen):
    wq, s, b = experts(3, 32, 64, torch.float32, 64, 4, gen)
    x = torch.randn(2, 1, 64, generator=gen)
    with pytest.raises(IndexError, match=r"rhs_indices values must lie in \[0, 3\).*3 to 3"):
        mlxq.affine_gather_matmul(x, wq, s, b, None, torch.tensor([3, 3]), 64, 4)
    with pytest.raises(IndexError, match=r"lhs_indices values must lie in \[0, 2\).*-1"):
        mlxq.affine_gather_matmul(x, wq, s, b, torch.tensor([-1]), torch.tensor([0]), 64, 4)
    with pytest.raises(TypeError, match="rhs_indices must be an integer tensor"):
        mlxq.affine_gather_matmul(x, wq, s, b, None, torch.tensor([0.0, 1.0]), 64, 4)
    with pytest.raises(ValueError, match=r"lhs_indices shape \[3\] and rhs_indices shape \[2\]"):
        mlxq.affine_gather_matmul(x, wq, s, b, torch.tensor([0, 1, 0]), torch.tensor([0, 1]), 64, 4)
    with pytest.raises(ValueError, match="x must have at least 2 dimensions"):
        mlxq.affine_gather_matmul(x[0, 0], wq, s, b, None, torch.tensor([0]), 64, 4)
    with pytest.raises(ValueError, match="x last dimension 32 must equal 64"):
        mlxq.affine_gather_matmul(x[..., :32], wq, s, b, None, torch.tensor([0, 1]), 64, 4)
    with pytest.raises(ValueError, match="bits must be one of"):
        mlxq.affine_gather_matmul(x, wq, s, b, None, torch.tensor([0, 1]), 64, 7)


def test_fake_kernel_and_compile(gen):
    wq, s, b = experts(4, 32, 64, torch.float32, 64, 4, gen)
    x = torch.randn(3, 1, 1, 64, generator=gen)
    rhs = torch.randint(0, 4, (3, 2), generator=gen)
    meta = mlxq.affine_gather_matmul(
        x.to("meta"), wq.to("meta"), s.to("meta"), b.to("meta"), None, rhs.to("meta"), 64, 4
    )
    assert meta.shape == (3, 2, 1, 32) and meta.dtype == torch.float32

    def f(x, rhs):
        return mlxq.affine_gather_matmul(x, wq, s, b, None, rhs, 64, 4) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, rhs), f(x, rhs), rtol=0, atol=0)


@pytest.mark.parametrize("transpose", [True, False])
def test_autograd_wrt_x(transpose, gen):
    """d/dx against the float64 gather written with torch ops; pairs share x matrices."""
    wq, s, b = experts(4, 32, 64, torch.float32, 32, 4, gen)
    cols = 64 if transpose else 32
    x = torch.randn(3, 2, cols, generator=gen, dtype=torch.float32, requires_grad=True)
    lhs, rhs = torch.tensor([[0, 2], [2, 2]]), torch.tensor([[1, 3], [0, 1]])
    y = mlxq.affine_gather_matmul(x, wq, s, b, lhs, rhs, 32, 4, transpose)
    g = torch.randn(y.shape, generator=gen)
    (gx,) = torch.autograd.grad(y, x, g)
    # fp32 products g @ (s*q + b) summed again over the pairs that share an x matrix: the
    # derived bound, with |s|q + |b| as the weight's error scale
    w, w_abs = dequantize_ref(wq, s, b, 32, 4), dequantize_ref(wq, s.abs(), b.abs(), 32, 4)
    assert_gather_grad_within(gx, g, w, w_abs, lhs, rhs, transpose, "d/dx")
    with pytest.raises(RuntimeError, match="gradients with respect to scales"):
        s_req = s.clone().requires_grad_(True)
        out = mlxq.affine_gather_matmul(x, wq, s_req, b, lhs, rhs, 32, 4, transpose)
        out.sum().backward()
