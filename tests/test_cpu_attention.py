"""Decode attention in fp32 for bf16/fp16 models on the CPU (integrations/cpu_attention.py):
which models switch, and that decode equals transformers' sdpa run on fp32 copies of q, k, v
while a prompt still takes bf16 sdpa unchanged."""

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


def test_decode_is_fp32_sdpa_and_prompt_is_unchanged(checkpoint, monkeypatch):
    """Every attention call of a bf16 generate: few queries get fp32 q/k/v and return their
    fp32 result rounded to bf16; the prompt's call is transformers' own bf16 sdpa."""
    model = _load(checkpoint, torch.bfloat16)
    calls = []

    def spy(module, query, key, value, mask, **kwargs):
        out, _ = sdpa_attention_forward(module, query, key, value, mask, **kwargs)
        calls.append((query.shape[-2], query.dtype, out))
        return out, None

    monkeypatch.setattr(
        "transformers.integrations.sdpa_attention.sdpa_attention_forward", spy, raising=True
    )
    prompt = torch.tensor([[1, 400, 2000, 31, 7, 99, 1234, 5] * 3])
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    layers = model.config.num_hidden_layers
    assert len(calls) == 4 * layers, len(calls)
    prompt_calls, decode_calls = calls[:layers], calls[layers:]
    assert all(q == prompt.shape[1] and dt == torch.bfloat16 for q, dt, _ in prompt_calls)
    assert all(q == 1 and dt == torch.float32 for q, dt, _ in decode_calls)


def test_fp32_path_equals_sdpa_on_fp32_copies():
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
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.to(torch.bfloat16))
    # and it is closer to float64 attention than torch's bf16 kernel
    s = (q.double() @ k.double().repeat_interleave(3, 1).transpose(-1, -2)) * 0.2 + mask.double()
    exact = s.softmax(-1) @ v.double().repeat_interleave(3, 1)
    theirs, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.2)
    exact = exact.transpose(1, 2)
    assert (got.double() - exact).abs().max() <= (theirs.double() - exact).abs().max()
