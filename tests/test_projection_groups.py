"""Sibling projections in one call: `affine_matmul_many` and the projection groups built on it.

The op's outputs are defined to be `affine_matmul`'s, so the oracle is `affine_matmul` itself,
bit for bit (each is checked against MLX and float64 in test_ops_matmul.py); the groups must
leave every model output unchanged, bit for bit, and fall back whenever siblings do not share
their input.
"""

from __future__ import annotations

from pathlib import Path

import mlxq
import pytest
import torch
from mlx_models import greedy_tokens, tiny_mlx_checkpoint
from mlxq.nn import AffineLinear
from mlxq.ops import affine_matmul, affine_matmul_many
from mlxq.projection_groups import ProjectionGroup, group_projections
from torch import nn

SHAPES = (96, 33, 8)  # rows of the sibling weights: uneven, so thread splits cross weights


def _weights(bits: int, group_size: int, dtype: torch.dtype, gen: torch.Generator, K: int = 256):
    out = []
    for n in SHAPES:
        w, s, b = mlxq.affine_quantize(torch.randn(n, K, generator=gen), group_size, bits)
        out.append((w, s.to(dtype), b.to(dtype)))
    return out


def _many(x, weights, group_size, bits):
    return affine_matmul_many(x, *[list(t) for t in zip(*weights, strict=True)], group_size, bits)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_many_is_bit_for_bit_affine_matmul(bits, group_size, dtype, isa) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + group_size)
    weights = _weights(bits, group_size, dtype, gen)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for M in (1, 2, 3, 7, 16, 17, 40):  # decode kernels up to 16 rows, GEMM tiles above
            x = torch.randn(M, 256, generator=gen).to(dtype)
            outs = _many(x, weights, group_size, bits)
            assert len(outs) == len(weights)
            for i, (out, w) in enumerate(zip(outs, weights, strict=True)):
                want = affine_matmul(x, *w, group_size, bits)
                assert out.dtype == want.dtype and out.shape == want.shape
                assert torch.equal(out, want), f"weight {i}, M={M}, {threads} threads"


def test_many_keeps_leading_dims_and_non_finite_outputs() -> None:
    gen = torch.Generator().manual_seed(3)
    weights = _weights(4, 64, torch.bfloat16, gen)
    x = torch.randn(2, 1, 3, 256, generator=gen).to(torch.bfloat16)
    x[0, 0, 1, :64] = 3e38  # overflows the factored decode sums: recomputed in MLX's order
    x[1, 0, 2, 5] = float("inf")
    outs = _many(x, weights, 64, 4)
    for out, w in zip(outs, weights, strict=True):
        want = affine_matmul(x, *w, 64, 4)
        assert out.shape == (2, 1, 3, w[0].shape[0])
        torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
        assert not torch.isfinite(out).all()


def test_many_gradient_is_affine_matmul_gradient() -> None:
    gen = torch.Generator().manual_seed(4)
    weights = _weights(4, 32, torch.float32, gen)
    x = torch.randn(3, 256, generator=gen, requires_grad=True)
    outs = _many(x, weights, 32, 4)
    sum(o.square().sum() for o in outs).backward()
    x2 = x.detach().clone().requires_grad_()
    sum(affine_matmul(x2, *w, 32, 4).square().sum() for w in weights).backward()
    assert torch.equal(x.grad, x2.grad)
    # forward mode (jvp) goes through affine_matmul, which has it
    tangent = torch.randn(3, 256, generator=gen)
    _, jvp = torch.func.jvp(lambda v: _many(v, weights, 32, 4)[1], (x.detach(),), (tangent,))
    _, want = torch.func.jvp(
        lambda v: affine_matmul(v, *weights[1], 32, 4), (x.detach(),), (tangent,)
    )
    assert torch.equal(jvp, want)


def test_many_fake_kernel_and_compile() -> None:
    gen = torch.Generator().manual_seed(5)
    weights = _weights(4, 64, torch.bfloat16, gen)
    x = torch.randn(1, 256, generator=gen).to(torch.bfloat16)
    ws, ss, bs = (list(t) for t in zip(*weights, strict=True))
    torch.library.opcheck(torch.ops.mlxq.affine_matmul_many.default, (x, ws, ss, bs, 64, 4))
    meta = affine_matmul_many(
        x.to("meta"), [w.to("meta") for w in ws], [s.to("meta") for s in ss],
        [b.to("meta") for b in bs], 64, 4,
    )  # fmt: skip
    assert [tuple(m.shape) for m in meta] == [(1, n) for n in SHAPES]
    compiled = torch.compile(lambda v: affine_matmul_many(v, ws, ss, bs, 64, 4), fullgraph=True)
    for got, want in zip(compiled(x), _many(x, weights, 64, 4), strict=True):
        assert torch.equal(got, want)


def test_many_refuses_bad_arguments() -> None:
    gen = torch.Generator().manual_seed(6)
    (w, s, b), (w2, s2, b2), _ = _weights(4, 64, torch.float32, gen)
    x = torch.randn(1, 256, generator=gen)
    with pytest.raises(ValueError, match="at least one weight"):
        affine_matmul_many(x, [], [], [], 64, 4)
    with pytest.raises(ValueError, match="2 weights, 1 scales and 2 biases"):
        affine_matmul_many(x, [w, w2], [s], [b, b2], 64, 4)
    with pytest.raises(ValueError, match=r"wq\[1\] must be 2-D"):
        affine_matmul_many(x, [w, w2[None]], [s, s2[None]], [b, b2[None]], 64, 4)
    with pytest.raises((ValueError, RuntimeError), match="256|128"):
        affine_matmul_many(torch.randn(1, 128), [w], [s], [b], 64, 4)  # in_features mismatch


class _Block(nn.Module):
    """q/k/v and gate/up siblings, called as transformers calls them (or not, `cross`)."""

    def __init__(self, dtype: torch.dtype, gen: torch.Generator, cross: bool = False) -> None:
        super().__init__()
        self.cross = cross
        for name, n in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32), ("o_proj", 64)):
            lin = nn.Linear(64, n, bias=name != "o_proj")
            with torch.no_grad():
                lin.weight.copy_(torch.randn(n, 64, generator=gen))
            setattr(self, name, AffineLinear.from_float(lin.to(dtype), 4, 32))

    def forward(self, h: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(h)
        kv_in = other if self.cross else h
        return torch.cat([q, self.k_proj(kv_in), self.v_proj(kv_in), self.o_proj(h)], -1)


def _ungrouped(block: nn.Module, h: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    saved = {m: m.projection_group for m in block.modules() if isinstance(m, AffineLinear)}
    for m in saved:
        m.projection_group = None
    try:
        return block(h, other)
    finally:
        for m, g in saved.items():
            m.projection_group = g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["no_grad", "inference", "grad"])
def test_group_outputs_equal_separate_calls(dtype, mode) -> None:
    gen = torch.Generator().manual_seed(7)
    block = _Block(dtype, gen)
    assert group_projections(block) == 1  # q/k/v; o_proj stays alone
    group = block.q_proj.projection_group
    assert group is block.k_proj.projection_group is block.v_proj.projection_group
    assert block.o_proj.projection_group is None
    context = {"no_grad": torch.no_grad, "inference": torch.inference_mode}.get(mode)
    for M in (1, 3, 20):
        h = torch.randn(2, M, 64, generator=gen).to(dtype).requires_grad_(mode == "grad")
        if context is None:
            got, want = block(h, h), _ungrouped(block, h, h)
            got.sum().backward()
        else:
            with context():
                got, want = block(h, h), _ungrouped(block, h, h)
        assert torch.equal(got, want)
        assert group.enabled and group._x is None and not group._pending  # nothing held


def test_group_sees_a_changed_input_and_stops_on_a_miss() -> None:
    gen = torch.Generator().manual_seed(8)
    block = _Block(torch.float32, gen)
    group_projections(block)
    group = block.q_proj.projection_group
    h = torch.randn(1, 1, 64, generator=gen)
    with torch.no_grad():
        q = block.q_proj(h)
        h.mul_(2)  # written in place between the siblings' calls: k must see the new values
        k = block.k_proj(h)
        want = affine_matmul(
            h, block.k_proj.weight, block.k_proj.scales, block.k_proj.biases, 32, 4
        )
        assert torch.equal(k, want + block.k_proj.bias)
        assert not group.enabled  # its output was pending for the old values: a miss
        assert torch.equal(block.v_proj(h), _ungrouped(block, h, h)[..., 96:128])
        # cross-attention: k/v read another tensor than q
        cross = _Block(torch.float32, torch.Generator().manual_seed(9), cross=True)
        group_projections(cross)
        other = torch.randn(1, 1, 64, generator=gen)
        assert torch.equal(cross(h, other), _ungrouped(cross, h, other))
        assert not cross.q_proj.projection_group.enabled
        assert torch.equal(cross(h, other), _ungrouped(cross, h, other))
    assert q.shape == (1, 1, 64)


def test_group_needs_one_format() -> None:
    gen = torch.Generator().manual_seed(10)
    block = _Block(torch.float32, gen)
    lin = nn.Linear(64, 32)
    block.v_proj = AffineLinear.from_float(lin, 8, 32)  # another bit width
    assert group_projections(block) == 0
    with pytest.raises(ValueError, match="one format"):
        ProjectionGroup([block.q_proj, block.v_proj])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_model_is_grouped_and_unchanged(dtype) -> None:
    """A checkpoint written by `mlx_lm convert` loads with its q/k/v and gate/up grouped; prompt
    logits and greedy decode equal the ungrouped model's, bit for bit, and each decode step
    makes one op call per group instead of one per projection."""
    from transformers import AutoModelForCausalLM

    path: Path = tiny_mlx_checkpoint("qwen2", 4, 64)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    layers = model.config.num_hidden_layers
    groups = {id(m.projection_group) for m in model.modules() if isinstance(m, AffineLinear)}
    groups.discard(id(None))
    assert len(groups) == 2 * layers
    prompt = torch.tensor([1, 400, 2000, 31, 7, 99, 1234, 5])
    counts = {"many": 0, "single": 0}
    many_op, single_op = torch.ops.mlxq.affine_matmul_many, torch.ops.mlxq.affine_matmul

    class Count(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is many_op.default or func is many_op:
                counts["many"] += 1
            elif func is single_op.default or func is single_op:
                counts["single"] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        with Count():
            grouped = greedy_tokens(model, prompt, 6)
        logits = model(grouped[None]).logits
        saved = {m: m.projection_group for m in model.modules() if isinstance(m, AffineLinear)}
        for m in saved:
            m.projection_group = None
        separate = greedy_tokens(model, prompt, 6)
        want = model(grouped[None]).logits
    assert torch.equal(grouped, separate)
    assert torch.equal(logits, want)
    # 6 forward passes: per layer one call for q/k/v, one for gate/up, o_proj and down_proj
    # alone, and the head (instead of 7 calls a layer)
    assert counts == {"many": 6 * 2 * layers, "single": 6 * (2 * layers + 1)}
