"""`mlxq.ops.rotary_embedding` and the native eager stand-in for transformers' Llama-family
`apply_rotary_pos_emb`.

Oracle: transformers' own function (the computation the op restates, bit for bit, layouts
included); the stand-in must leave every call it does not take to that function.
"""

from __future__ import annotations

import types

import pytest
import torch
from mlx_models import greedy_tokens, tiny_mlx_checkpoint
from mlxq.integrations import cpu_rope
from mlxq.integrations.cpu_rope import (
    LLAMA_ROTARY_BODY,
    LLAMA_ROTATE_HALF_BODY,
    MAX_POSITIONS,
    use_native_rotary_embedding,
)
from mlxq.ops import rotary_embedding
from mlxq.swap import function_body
from transformers.models.glm import modeling_glm
from transformers.models.llama import modeling_llama

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _original():
    """transformers' apply_rotary_pos_emb of modeling_llama, whether or not it is patched."""
    fn = modeling_llama.apply_rotary_pos_emb
    return getattr(fn, "_mlxq_original", fn)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that NaNs compare equal to themselves."""
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def _layout(t: torch.Tensor) -> tuple[int, ...]:
    """The strides that matter (a dimension of size 1 may have any)."""
    return tuple(st for size, st in zip(t.shape, t.stride(), strict=True) if size > 1)


def _inputs(b, hq, hk, positions, dim, dtype, cos_batch, heads_first, gen):
    """q, k as transformers makes them (transposed views of the projections' outputs when
    heads_first), and cos, sin [cos_batch, positions, dim] as its rotary module returns them."""
    q = (torch.randn(b, positions, hq, dim, generator=gen) * 4).to(dtype)
    k = (torch.randn(b, positions, hk, dim, generator=gen) * 4).to(dtype)
    if heads_first:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    angles = torch.rand(cos_batch, positions, dim // 2, generator=gen) * 100
    angles = torch.cat([angles, angles], dim=-1)
    return q, k, angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads_first", [True, False])
@pytest.mark.parametrize(
    "b,hq,hk,positions,dim,cos_batch",
    [(1, 9, 3, 1, 64, 1), (2, 4, 2, 3, 128, 2), (2, 2, 2, 16, 2, 1), (1, 1, 1, 5, 96, 1)],
)
def test_op_equals_transformers(dtype, heads_first, b, hq, hk, positions, dim, cos_batch):
    gen = torch.Generator().manual_seed(positions * dim + b)
    q, k, cos, sin = _inputs(b, hq, hk, positions, dim, dtype, cos_batch, heads_first, gen)
    unsqueeze = 1 if heads_first else 2
    want_q, want_k = _original()(q, k, cos, sin, unsqueeze)
    if heads_first:
        got_q, got_k = rotary_embedding(q, k, cos, sin)
    else:
        got_q, got_k = rotary_embedding(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        got_q, got_k = got_q.transpose(1, 2), got_k.transpose(1, 2)
    for got, want in ((got_q, want_q), (got_k, want_k)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(_bits(got), _bits(want))
        assert _layout(got) == _layout(want)


def test_op_special_values_and_strided_cos() -> None:
    gen = torch.Generator().manual_seed(3)
    q, k, cos, sin = _inputs(1, 2, 1, 4, 8, torch.float32, 1, True, gen)
    q = q.clone()
    q[0, 0, 0, :3] = torch.tensor([float("inf"), float("nan"), -0.0])
    k = k.clone()
    k[0, 0, 1, 5] = 3e38  # x * cos and rotate_half(x) * sin near overflow
    wide = torch.randn(1, 4, 16, generator=gen)
    cos, sin = wide[..., ::2], wide[..., 1::2]  # non-contiguous cos and sin
    want = _original()(q, k, cos, sin)
    got = rotary_embedding(q, k, cos, sin)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(_bits(g), _bits(w))


def test_op_refuses_bad_arguments() -> None:
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    cos = sin = torch.randn(1, 3, 8)
    with pytest.raises(TypeError, match="k must have q's dtype"):
        rotary_embedding(q, k.double(), cos, sin)
    with pytest.raises(TypeError, match="q must be float32"):
        rotary_embedding(q.long(), k.long(), cos.long(), sin.long())
    with pytest.raises(ValueError, match="q and k must be 4-D"):
        rotary_embedding(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="cos and sin must be 3-D"):
        rotary_embedding(q, k, cos, sin[..., :4])
    with pytest.raises(ValueError, match="k must have q's batch, positions and head_dim"):
        rotary_embedding(q, k[..., :2, :], cos, sin)
    with pytest.raises(ValueError, match=r"cos must have shape \[1 or 1, 3, 8\]"):
        rotary_embedding(q, k, cos[:, :2], sin[:, :2])
    with pytest.raises(ValueError, match="head_dim must be even"):
        odd = torch.randn(1, 3, 7)
        rotary_embedding(q[..., :7], k[..., :7], odd, odd)


def test_op_fake_compile_and_no_gradient() -> None:
    gen = torch.Generator().manual_seed(4)
    q, k, cos, sin = _inputs(1, 4, 2, 2, 16, torch.bfloat16, 1, True, gen)
    torch.library.opcheck(torch.ops.mlxq.rotary_embedding.default, (q, k, cos, sin), test_utils=[
        "test_schema", "test_faketensor", "test_aot_dispatch_static"
    ])  # fmt: skip
    meta = rotary_embedding(q.to("meta"), k.to("meta"), cos.to("meta"), sin.to("meta"))
    assert meta[0].shape == q.shape and meta[1].stride() == k.stride()
    compiled = torch.compile(rotary_embedding, fullgraph=True)
    for got, want in zip(compiled(q, k, cos, sin), rotary_embedding(q, k, cos, sin), strict=True):
        assert torch.equal(got, want)
    out, _ = rotary_embedding(q.float().requires_grad_(), k.float(), cos.float(), sin.float())
    with pytest.raises(RuntimeError, match="no gradient"):
        out.sum().backward()


def test_stand_in_takes_only_the_llama_functions() -> None:
    assert function_body(_original()) == LLAMA_ROTARY_BODY
    assert function_body(modeling_llama.rotate_half) == LLAMA_ROTATE_HALF_BODY
    # GLM rotates interleaved pairs over part of the head: another body, left alone
    assert function_body(modeling_glm.apply_rotary_pos_emb) != LLAMA_ROTARY_BODY
    assert not cpu_rope._patch(modeling_glm)
    assert not hasattr(modeling_glm.apply_rotary_pos_emb, "_mlxq_original")
    # a module whose rotate_half differs in one token keeps its function
    fake = types.ModuleType("fake_modeling")
    exec(  # noqa: S102 - builds a modeling module that differs from Llama's in rotate_half
        "import torch\n"
        "def rotate_half(x):\n"
        "    x1 = x[..., : x.shape[-1] // 2]\n"
        "    x2 = x[..., x.shape[-1] // 2 :]\n"
        "    return torch.cat((x2, -x1), dim=-1)\n",
        fake.__dict__,
    )
    fake.apply_rotary_pos_emb = _original()
    assert not cpu_rope._patch(fake)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stand_in_falls_back_where_the_op_does_not_apply(dtype, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(5)
    original = _original()
    stand_in = cpu_rope._stand_in(original)
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return rotary_embedding(*args)

    monkeypatch.setattr(cpu_rope, "rotary_embedding", counted)
    q, k, cos, sin = _inputs(1, 4, 2, 1, 16, dtype, 1, True, gen)
    with torch.no_grad():
        got = stand_in(q, k, cos, sin)
    assert len(calls) == 1 and all(
        torch.equal(g, w) for g, w in zip(got, original(q, k, cos, sin), strict=True)
    )
    qs, ks = q.transpose(1, 2), k.transpose(1, 2)  # [B, L, H, D] with unsqueeze_dim=2
    with torch.no_grad():
        got = stand_in(qs, ks, cos, sin, unsqueeze_dim=2)
    assert len(calls) == 2
    assert all(torch.equal(g, w) for g, w in zip(got, original(qs, ks, cos, sin, 2), strict=True))
    # autograd: the original, with its gradient
    qg = q.clone().requires_grad_()
    out, _ = stand_in(qg, k, cos, sin)
    out.float().sum().backward()
    assert len(calls) == 2 and qg.grad is not None
    # forward-mode AD, a prompt, mixed dtypes, another device: the original
    torch.func.jvp(lambda x: stand_in(x, k, cos, sin)[0], (q,), (torch.ones_like(q),))
    prompt = _inputs(1, 4, 2, MAX_POSITIONS + 1, 16, dtype, 1, True, gen)
    with torch.no_grad():
        stand_in(*prompt)
        stand_in(q, k, cos.double(), sin.double())
        meta = stand_in(*(t.to("meta") for t in (q, k, cos, sin)))
    assert len(calls) == 2 and meta[0].device.type == "meta"
    # a call in an older signature (position_ids where unsqueeze_dim stands) gets the original's
    # own error, not one of the stand-in's
    with pytest.raises(Exception) as original_error:
        original(q, k, cos, sin, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(type(original_error.value)):
        stand_in(q, k, cos, sin, torch.zeros(1, 3, dtype=torch.long))
    assert len(calls) == 2
    # compiled: the original ops, which inductor fuses (without eager's bf16 roundings of the
    # products, so the reference is the original compiled the same way)
    compiled, compiled_original = (torch.compile(f, fullgraph=True) for f in (stand_in, original))
    with torch.no_grad():
        for g, w in zip(compiled(q, k, cos, sin), compiled_original(q, k, cos, sin), strict=True):
            assert torch.equal(g, w)
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_model_uses_the_op_and_decodes_bit_equal(dtype, monkeypatch) -> None:
    """A checkpoint written by `mlx_lm convert` gets the stand-in in its modeling module; greedy
    decode gives the tokens and logits (bit for bit) of transformers' own function."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen2 import modeling_qwen2

    path = tiny_mlx_checkpoint("qwen2", 4, 64)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    for layer in model.model.layers:  # the layers' own forwards, which call the function
        del layer.forward  # (the flat step's native call, test_cpu_layers.py)
    assert hasattr(modeling_qwen2.apply_rotary_pos_emb, "_mlxq_original")
    assert use_native_rotary_embedding(model) == 0  # already done
    calls = []
    real = cpu_rope.rotary_embedding

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(cpu_rope, "rotary_embedding", counted)
    prompt = torch.tensor([1, 400, 2000, 31, 7, 99, 1234, 5])
    with torch.no_grad():
        tokens = greedy_tokens(model, prompt, 8)
        cache_logits = _decode_logits(model, tokens)
        assert calls  # the decode steps took the op
        monkeypatch.setattr(
            modeling_qwen2,
            "apply_rotary_pos_emb",
            modeling_qwen2.apply_rotary_pos_emb._mlxq_original,
        )
        want_tokens = greedy_tokens(model, prompt, 8)
        want = _decode_logits(model, tokens)
    assert torch.equal(tokens, want_tokens)
    assert torch.equal(cache_logits, want)


def _decode_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of each token fed one at a time through the cache (decode steps)."""
    out = model(tokens[None, :1], use_cache=True)
    cache, logits = out.past_key_values, [out.logits]
    for i in range(1, tokens.numel()):
        out = model(tokens[None, i : i + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits)
    return torch.cat(logits, dim=1)
