"""Decode attention in fp32 for bf16/fp16 models on the CPU (integrations/cpu_attention.py):
which models switch; that decode goes to mlxq.ops.decode_attention, or with NATIVE_DECODE off
equals transformers' sdpa run on fp32 copies of q, k, v, while a prompt still takes bf16 sdpa
unchanged; and which calls the native op leaves to the widening path.
(tests/test_cpu_decode_attention.py holds the op itself to float64.)"""

from __future__ import annotations

import pytest
import torch
from mlx_models import tiny_mlx_checkpoint
from mlxq.integrations import cpu_attention
from transformers.integrations.sdpa_attention import sdpa_attention_forward


def _load(path, dtype, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()


@pytest.fixture(scope="module")
def checkpoint():
    return tiny_mlx_checkpoint("qwen3", 4, 64)


def test_mlxq_text_models_switch_and_explicit_choices_stay(checkpoint):
    assert _load(checkpoint, torch.bfloat16).config._attn_implementation == cpu_attention.NAME
    assert (
        _load(checkpoint, torch.bfloat16, attn_implementation="eager").config._attn_implementation
        == "eager"
    )


def test_models_that_name_sdpa_keep_it():
    from transformers import FalconConfig, FalconForCausalLM

    model = FalconForCausalLM(
        FalconConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4)
    )
    model.set_attn_implementation("sdpa")
    assert not cpu_attention.use_fp32_decode_attention(model)
    assert model.config._attn_implementation == "sdpa"
    # also as the subclass mlxq makes of a model left without parameters (placed by its
    # buffers), whose own module is mlxq's: the modeling module read is still Falcon's
    from mlxq.integrations.quantizer import placed_by_buffers

    model.__class__ = placed_by_buffers(type(model))
    assert not cpu_attention.use_fp32_decode_attention(model)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "native,prompt_scores",
    [(True, cpu_attention.MAX_PROMPT_SCORES), (True, 0), (False, cpu_attention.MAX_PROMPT_SCORES)],
    ids=["native", "native-decode-only", "widening"],
)
def test_decode_is_fp32_and_prompts_take_the_op_or_bf16_sdpa(
    checkpoint, native, prompt_scores, monkeypatch
):
    """Every attention call of a bf16 generate: few queries go to the native op, or (with
    NATIVE_DECODE off) get fp32 q/k/v and return their fp32 result rounded to bf16; the
    prompt's call goes to the native op while its scores stay under MAX_PROMPT_SCORES, else it
    is transformers' own bf16 sdpa."""
    model = _load(checkpoint, torch.bfloat16)
    monkeypatch.setattr(cpu_attention, "NATIVE_DECODE", native)
    monkeypatch.setattr(cpu_attention, "MAX_PROMPT_SCORES", prompt_scores)
    calls, native_calls = [], []
    real_native = cpu_attention.native_arguments

    def native_spy(module, query, *args):
        native = real_native(module, query, *args)
        if native is not None:  # the interface (or the flat decode step) calls the op
            native_calls.append((query.shape[-2], query.dtype))
        return native

    monkeypatch.setattr(cpu_attention, "native_arguments", native_spy)

    def spy(module, query, key, value, mask, **kwargs):
        out, _ = sdpa_attention_forward(module, query, key, value, mask, **kwargs)
        calls.append((query.shape[-2], query.dtype, out))
        return out, None

    monkeypatch.setattr(
        "transformers.integrations.sdpa_attention.sdpa_attention_forward", spy, raising=True
    )
    prompt = torch.tensor([[1, 400, 2000, 31, 7, 99, 1234, 5] * 3])
    assert prompt.shape[1] > cpu_attention.MAX_QUERIES
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    layers = model.config.num_hidden_layers
    prompt_native = native and prompt_scores >= prompt.shape[1] ** 2
    prompt_calls = (native_calls if prompt_native else calls)[:layers]
    decode_calls = native_calls[layers if prompt_native else 0 :] if native else calls[layers:]
    assert len(calls) == (0 if prompt_native else layers) + (0 if native else 3 * layers)
    assert len(decode_calls) == 3 * layers
    assert all(c[0] == prompt.shape[1] and c[1] == torch.bfloat16 for c in prompt_calls)
    want_dtype = torch.bfloat16 if native else torch.float32
    assert all(c[0] == 1 and c[1] == want_dtype for c in decode_calls)


def test_prompt_through_the_op_is_causal_sdpa_in_fp32():
    """A prompt (more queries than MAX_QUERIES, no mask: sdpa's is_causal) through the native
    op: sdpa's causal attention on fp32 copies within one bf16 rounding, and closer to float64
    than torch's bf16 kernel."""
    torch.manual_seed(0)
    module = _module()
    q, k, v = _qkv(lq=100, lk=100)
    got, _ = cpu_attention._attention(module, q, k, v, None, scaling=0.2)
    want, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), None, scaling=0.2)
    torch.testing.assert_close(got, want.to(torch.bfloat16), rtol=2.0**-7, atol=1e-6)
    causal = torch.ones(100, 100, dtype=torch.bool).tril()
    s = (q.double() @ k.double().repeat_interleave(3, 1).transpose(-1, -2)) * 0.2
    exact = s.masked_fill(~causal, float("-inf")).softmax(-1) @ v.double().repeat_interleave(3, 1)
    theirs, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.2)
    exact = exact.transpose(1, 2)
    assert (got.double() - exact).abs().max() <= (theirs.double() - exact).abs().max()


@pytest.mark.parametrize("native", [True, False], ids=["native", "widening"])
def test_fp32_path_equals_sdpa_on_fp32_copies(native, monkeypatch):
    """The widening path is bit for bit sdpa on fp32 copies; the native op the same numbers
    summed in another order (within one bf16 rounding); both closer to float64 attention than
    torch's bf16 kernel."""
    monkeypatch.setattr(cpu_attention, "NATIVE_DECODE", native)
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 3, True, False
    q = torch.randn(1, 6, 1, 32).to(torch.bfloat16)
    k = torch.randn(1, 2, 40, 32).to(torch.bfloat16)
    v = torch.randn(1, 2, 40, 32).to(torch.bfloat16)
    mask = torch.zeros(1, 1, 1, 40, dtype=torch.bfloat16)
    mask[..., 30:] = torch.finfo(torch.bfloat16).min
    got, _ = cpu_attention._attention(module, q, k, v, mask, scaling=0.2)
    want, _ = sdpa_attention_forward(
        module, q.float(), k.float(), v.float(), mask.float(), scaling=0.2
    )
    assert got.dtype == torch.bfloat16 and got.shape == (1, 1, 6, 32) and got.is_contiguous()
    if native:
        torch.testing.assert_close(got, want.to(torch.bfloat16), rtol=2.0**-7, atol=1e-6)
    else:
        assert torch.equal(got, want.to(torch.bfloat16))
    # and it is closer to float64 attention than torch's bf16 kernel
    s = (q.double() @ k.double().repeat_interleave(3, 1).transpose(-1, -2)) * 0.2 + mask.double()
    exact = s.softmax(-1) @ v.double().repeat_interleave(3, 1)
    theirs, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.2)
    exact = exact.transpose(1, 2)
    assert (got.double() - exact).abs().max() <= (theirs.double() - exact).abs().max()


def _module(groups: int = 3) -> torch.nn.Module:
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = groups, True, False
    return module


def _qkv(lq: int = 1, lk: int = 40):
    q = torch.randn(1, 6, lq, 32).to(torch.bfloat16)
    k = torch.randn(1, 2, lk, 32).to(torch.bfloat16)
    return q, k, torch.randn(1, 2, lk, 32).to(torch.bfloat16)


@pytest.mark.parametrize(
    "change",
    [
        {"dropout": 0.1},
        {"softcap": 30.0},
        {"s_aux": torch.zeros(6)},
        {"output_attentions": True},
        {"module.sinks": torch.zeros(6)},
        {"module.num_key_value_groups": 1},  # sdpa would refuse 6 query heads on 2 kv heads
        {"value.head_dim": 16},  # another head size for v (MLA-like)
        {"key.stride": 2},
        {"query.requires_grad": True},  # training: the op has no gradient
    ],
    ids=lambda c: next(iter(c)),
)
def test_calls_the_op_does_not_reproduce_keep_the_widening_path(change, monkeypatch):
    module = _module()
    q, k, v = _qkv()
    kwargs = {"scaling": 0.2}
    ((name, value),) = change.items()
    if name.startswith("module."):
        setattr(module, name.split(".")[1], value)
    elif name == "value.head_dim":
        v = v[..., :16].contiguous()
    elif name == "key.stride":
        k = torch.randn(1, 2, 40, 64).to(torch.bfloat16)[..., ::2]
    elif name == "query.requires_grad":
        q.requires_grad_(True)
    else:
        kwargs[name] = value
    assert not cpu_attention._native_fits(module, q, k, v, None, kwargs)
    assert cpu_attention._native_fits(_module(), *_qkv(), None, {"scaling": 0.2})


def test_training_backpropagates_through_the_widening_path():
    """A bf16 call that needs a gradient (LoRA on the projections) keeps sdpa's autograd."""
    module = _module()
    q, k, v = _qkv(lq=12, lk=12)
    q.requires_grad_(True)
    out, _ = cpu_attention._attention(module, q, k, v, None, scaling=0.2)
    out.float().sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape and q.grad.abs().sum() > 0
    with torch.no_grad():  # no gradient asked: the op again
        assert cpu_attention._native_fits(module, q, k, v, None, {"scaling": 0.2})


def test_several_queries_without_mask_are_causal_from_the_first_key():
    """sdpa's is_causal for a few queries and no mask (a short prompt): query i sees keys
    0..i, the rest of a longer cache too, as sdpa_attention_forward's cropping gives."""
    module = _module()
    for lk in (5, 12):
        q, k, v = _qkv(lq=5, lk=lk)
        got, _ = cpu_attention._attention(module, q, k, v, None, scaling=0.2)
        want, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), None, scaling=0.2)
        torch.testing.assert_close(got, want.to(torch.bfloat16), rtol=2.0**-7, atol=1e-6)
        module.is_causal = False  # and without it, every key
        got, _ = cpu_attention._attention(module, q, k, v, None, scaling=0.2)
        want, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), None, scaling=0.2)
        torch.testing.assert_close(got, want.to(torch.bfloat16), rtol=2.0**-7, atol=1e-6)
        module.is_causal = True


def test_longer_prompts_take_the_op_where_its_16_row_kernel_runs(isa) -> None:
    """bf16 prompts with a head size that is a multiple of 32 on AVX-512 BF16 (the op's 16-row
    prompt kernel) take the op up to ROWS16_PROMPT_FACTOR times MAX_PROMPT_SCORES; others up to
    MAX_PROMPT_SCORES."""
    limit = cpu_attention.MAX_PROMPT_SCORES
    q = torch.empty(1, 9, 1100, 64, dtype=torch.bfloat16)
    fast = isa == "avx512"
    assert cpu_attention._prompt_scores(q) == limit * (
        cpu_attention.ROWS16_PROMPT_FACTOR if fast else 1
    )
    assert cpu_attention._prompt_scores(q.half()) == limit
    assert cpu_attention._prompt_scores(torch.empty(1, 9, 1100, 80, dtype=torch.bfloat16)) == limit
