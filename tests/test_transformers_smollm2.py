"""SmolLM2-135M-Instruct MLX checkpoints through `import mlxq` + transformers, against mlx-lm.

Greedy sequences are compared by teacher forcing: mlx-lm runs one forward pass over the prompt
and mlxq's generated tokens, and its argmax at every position must be mlxq's next token. That
is equivalent to equal greedy generation and costs one forward pass of mlx-lm's (slow) CPU
kernels instead of one per token.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlxq
import numpy as np
import pytest
import torch
from mlx_models import mlx_lm_logits, smollm2
from mlxq.nn import AffineEmbedding, AffineLinear, TiedAffineHead

# fp32 logits of mlxq vs mlx-lm (cast to fp32). Both dequantize exactly and sum in fp32, in
# different orders; an independent fp32 reference differs from mlx-lm by <= 3e-4.
FP32_LOGIT_ATOL = 1e-3
# the chat question answers "Paris"; the plain-text prompts keep mlx-lm's pass short
PROMPTS = [
    "What is the capital of France?",
    "The sea is",
    "def fibonacci(n):",
]
CHAT_PROMPTS = {PROMPTS[0]}


def _load(path: Path, dtype: torch.dtype = torch.float32, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return model, AutoTokenizer.from_pretrained(path)


def _prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    if prompt not in CHAT_PROMPTS:
        return tokenizer(prompt, return_tensors="pt")["input_ids"]
    messages = [{"role": "user", "content": prompt}]
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return out["input_ids"]


def _greedy(model, ids: torch.Tensor, n: int = 32) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
        )
    return out[0]


def _logits(model, tokens: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(tokens[None]).logits[0].float().numpy()


def _check_greedy_equals_mlx_lm(path: Path, sequence: torch.Tensor, prompt_len: int) -> None:
    ref = mlx_lm_logits(path, sequence.numpy())
    want = ref.argmax(-1)[prompt_len - 1 : -1]
    got = sequence[prompt_len:].numpy()
    assert np.array_equal(want, got), f"greedy tokens differ from mlx-lm: {want} vs {got}"


@pytest.fixture(scope="module")
def smollm2_model(smollm2_4bit_g32: Path):
    return _load(smollm2_4bit_g32)


@pytest.fixture(scope="module")
def greedy_runs(smollm2_model) -> dict[str, tuple[int, torch.Tensor]]:
    """mlxq's greedy continuation (32 tokens at most) of each prompt: prompt -> (len, tokens)."""
    model, tokenizer = smollm2_model
    runs = {}
    for prompt in PROMPTS:
        ids = _prompt_ids(tokenizer, prompt)
        runs[prompt] = (ids.shape[1], _greedy(model, ids))
    return runs


def test_loads_with_only_import_mlxq(smollm2_model) -> None:
    model, _ = smollm2_model
    assert isinstance(model.model.embed_tokens, AffineEmbedding)
    assert isinstance(model.lm_head, TiedAffineHead)  # tied: the head is the quantized table
    assert model.lm_head.embedding is model.model.embed_tokens
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, AffineLinear) and (q.bits, q.group_size) == (4, 32)
    assert q.weight.dtype == torch.uint32 and q.weight.shape == (576, 576 * 4 // 32)
    assert isinstance(model.config.quantization_config, mlxq.MLXQuantConfig)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert n_linear == 0  # every linear of this checkpoint is quantized


def test_greedy_generation_equals_mlx_lm_and_answers_paris(
    smollm2_4bit_g32, smollm2_model, greedy_runs
):
    model, tokenizer = smollm2_model
    worst = 0.0
    for prompt in PROMPTS:
        prompt_len, sequence = greedy_runs[prompt]
        text = tokenizer.decode(sequence[prompt_len:], skip_special_tokens=True)
        print(f"\n[4-bit g32] {prompt!r} -> {text!r}")
        if "France" in prompt:
            assert "Paris" in text
        ref = mlx_lm_logits(smollm2_4bit_g32, sequence.numpy())
        got = _logits(model, sequence)
        worst = max(worst, float(np.abs(got - ref).max()))
        want = ref.argmax(-1)[prompt_len - 1 : -1]
        assert np.array_equal(want, sequence[prompt_len:].numpy()), prompt
    print(f"[4-bit g32] max |logits - mlx-lm| = {worst:.2e}")
    assert worst < FP32_LOGIT_ATOL


@pytest.mark.parametrize(
    ("bits", "group_size", "recipe"),
    [(4, 64, None), (3, 32, None), (6, 64, None), (8, 128, None), (4, 64, "mixed_3_6")],
    ids=["4bit-g64", "3bit-g32", "6bit-g64", "8bit-g128", "mixed_3_6-g64"],
)
def test_logits_match_mlx_lm(bits: int, group_size: int, recipe: str | None) -> None:
    path = smollm2(bits, group_size, recipe)
    model, tokenizer = _load(path)
    config = json.loads((path / "config.json").read_text())["quantization"]
    layers = [m for m in model.modules() if isinstance(m, AffineLinear)]
    if recipe:  # the recipe's per-module entries are honoured (several bit widths in use)
        assert len({m.bits for m in layers}) > 1
        assert any(isinstance(v, dict) for v in config.values())
    else:
        assert {(m.bits, m.group_size) for m in layers} == {(bits, group_size)}
    if group_size == 128:  # K=1536 of down_proj divides 128 but K=576 does not: those stay float
        assert isinstance(model.model.layers[0].mlp.down_proj, AffineLinear)
        assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    tokens = _prompt_ids(tokenizer, PROMPTS[0])[0, :16]
    got = _logits(model, tokens)
    ref = mlx_lm_logits(path, tokens.numpy())
    diff = float(np.abs(got - ref).max())
    print(f"\n[{recipe or f'{bits}-bit'} g{group_size}] max |logits - mlx-lm| = {diff:.2e}")
    assert diff < FP32_LOGIT_ATOL
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))


def test_bf16_error_no_larger_than_mlx_lm_bf16(smollm2_4bit_g32: Path) -> None:
    model, tokenizer = _load(smollm2_4bit_g32, dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.scales.dtype == torch.bfloat16
    # mlx's CPU kernels are slowest in bf16: a few positions make the point
    tokens = _prompt_ids(tokenizer, PROMPTS[0])[0, :4]
    ours = _logits(model, tokens)
    ref = mlx_lm_logits(smollm2_4bit_g32, tokens.numpy())
    theirs = mlx_lm_logits(smollm2_4bit_g32, tokens.numpy(), dtype="native")

    def rms(a: np.ndarray) -> float:
        return float(np.sqrt(np.mean((a - ref) ** 2)))

    print(f"\n[bf16] RMS error vs fp32 mlx-lm: mlxq {rms(ours):.3f}, mlx-lm bf16 {rms(theirs):.3f}")
    assert rms(ours) <= rms(theirs) * 1.05


def test_float16_activations_and_to(smollm2_model) -> None:
    model, tokenizer = smollm2_model
    tokens = _prompt_ids(tokenizer, PROMPTS[0])[0, :8]
    ref = _logits(model, tokens)
    half = model.to(torch.float16)
    try:
        assert half.model.embed_tokens.weight.dtype == torch.uint32
        assert half.model.embed_tokens.scales.dtype == torch.float16
        got = _logits(half, tokens)
        assert np.abs(got - ref).max() < 0.5 and np.array_equal(got.argmax(-1), ref.argmax(-1))
        assert half.to("cpu") is half
    finally:
        model.to(torch.float32)


def test_save_round_trip_is_unchanged_and_mlx_lm_generates_the_same(
    smollm2_4bit_g32: Path, greedy_runs, tmp_path: Path
) -> None:
    from safetensors import safe_open

    model, tokenizer = _load(smollm2_4bit_g32, dtype=torch.bfloat16)  # the checkpoint's dtype
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    with (
        safe_open(smollm2_4bit_g32 / "model.safetensors", "pt") as a,
        safe_open(saved / "model.safetensors", "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())  # no lm_head: still tied
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    config = json.loads((saved / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert config["rope_theta"] == 100000.0 and config["tie_word_embeddings"] is True

    prompt_len, sequence = greedy_runs[PROMPTS[0]]
    _check_greedy_equals_mlx_lm(saved, sequence, prompt_len)
