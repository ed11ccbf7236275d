"""The transformers API as a user drives it on a loaded MLX model: other model classes than the
causal LM (AutoModel, sequence and token classification), `num_parameters`, the pipeline, and
generate's batching, beam search, caches and scores, each against mlx-lm's fp32 logits or the
model's own uncached forward."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from arch_models import Variant
from arch_models import tiny_mlx_checkpoint as tiny_arch
from mlx_models import mlx_lm_logits, tiny_mlx_checkpoint
from safetensors.torch import load_file, save_file

TOKENS = [1, 5, 77, 300, 12, 499, 3, 42, 250, 7, 128, 64]
IDS = torch.tensor([TOKENS])

# untied quantized head (and down_proj left float by mlx-lm), tied head, MoE experts stacked
CHECKPOINTS = {
    "qwen3_untied": lambda: tiny_mlx_checkpoint("qwen3", 4, 128),
    "llama_tied": lambda: tiny_mlx_checkpoint("llama", 4, 64),
    "qwen3_moe": lambda: tiny_arch("qwen3_moe", Variant(tied=False)),
}


def _load(path: Path, cls_name: str = "AutoModelForCausalLM", **kwargs):
    import transformers

    return getattr(transformers, cls_name).from_pretrained(path, dtype=torch.float32, **kwargs)


@pytest.fixture(scope="module")
def qwen3() -> Path:
    return CHECKPOINTS["qwen3_untied"]()


@pytest.fixture(scope="module")
def qwen3_model(qwen3: Path):
    return _load(qwen3)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_models_without_the_lm_head_run_the_quantized_body_exactly(name: str, caplog) -> None:
    """AutoModel and the classification heads on a causal LM's checkpoint: mlxq refused them
    (the checkpoint's quantized lm_head "has no module", the new `score` head "a corrupt
    checkpoint"), and AutoModel on a MoE checkpoint found no stacked experts (the base model's
    names lack `model.`). Now the base model's outputs equal the causal LM's (whose logits
    are mlx-lm's), and what is dropped or new is named in a warning."""
    path = CHECKPOINTS[name]()
    causal = _load(path)
    with torch.no_grad():
        body = causal.model(IDS).last_hidden_state
        logits = causal(IDS).logits[0].numpy()
    np.testing.assert_allclose(logits, mlx_lm_logits(path, TOKENS), atol=1e-4, rtol=0)
    untied = name != "llama_tied"
    for cls_name, new in (
        ("AutoModel", []),
        ("AutoModelForSequenceClassification", ["score.weight"]),
        ("AutoModelForTokenClassification", ["score.bias", "score.weight"]),
    ):
        caplog.clear()
        kwargs = {} if cls_name == "AutoModel" else {"num_labels": 3}
        with caplog.at_level(logging.WARNING, logger="mlxq"):
            model = _load(path, cls_name, **kwargs)
        with torch.no_grad():
            out = model(IDS, output_hidden_states=True)
        assert torch.equal(out.hidden_states[-1], body), cls_name
        said = " ".join(r.getMessage() for r in caplog.records if r.name == "mlxq")
        assert ("lm_head.scales" in said) == untied, said
        assert all(key in said for key in new), said
        if new:
            assert out.logits.shape == (1, 3) if "Sequence" in cls_name else (1, 12, 3)
            assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("arch", ["qwen3_next", "lfm2"])
def test_base_model_takes_the_conversions_of_the_checkpoints_names(arch: str) -> None:
    """mlxq's converters for mlx-lm's layout (Qwen3-Next's norms stored as 1 + w, LFM2's
    channels-last convolutions) matched the model's names, which the base model's lack the
    checkpoint's `model.` in: AutoModel refused LFM2 ("stored [128, 3, 1], the model's is
    [128, 1, 3]") and, once it found Qwen3-Next's experts, ran its final norm off by one
    (hidden states 3.0 away). Now the base model runs the causal LM's body exactly."""
    from arch_models import causal_lm_class

    path = tiny_arch(arch, Variant(tied=True))
    causal = causal_lm_class(arch).from_pretrained(path, dtype=torch.float32)
    base = _load(path, "AutoModel")
    with torch.no_grad():
        assert torch.equal(base(IDS).last_hidden_state, causal.model(IDS).last_hidden_state)


def test_a_missing_tensor_of_the_base_model_is_still_refused(qwen3: Path, tmp_path: Path):
    """Only what lies outside the base model may be dropped or new."""
    folder = shutil.copytree(qwen3, tmp_path / "ckpt")
    weights = load_file(folder / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "mlx"})
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    for cls_name in ("AutoModel", "AutoModelForSequenceClassification"):
        with pytest.raises(ValueError, match=r"lacks (model\.)?norm\.weight"):
            _load(folder, cls_name)


@pytest.mark.parametrize("name", ["qwen3_untied", "llama_tied", "qwen3_moe"])
def test_num_parameters_counts_the_quantized_weights_as_the_float_model(name: str) -> None:
    """num_parameters() said 49,920 for a 12.8M-weight model (it saw the norms only: packed
    weights are buffers); it is the float model's count now, the quantized weights frozen."""
    model = _load(CHECKPOINTS[name]())
    float_model = type(model)(model.config)
    for kwargs in ({}, {"exclude_embeddings": True}):
        assert model.num_parameters(**kwargs) == float_model.num_parameters(**kwargs), kwargs
    floats = sum(p.numel() for p in model.parameters())
    assert model.num_parameters(only_trainable=True) == floats
    # what it takes in memory is what it holds: packed words, scales, biases, float tensors
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert model.get_memory_footprint() == held


def test_pipeline_generates_the_models_greedy_tokens(qwen3: Path) -> None:
    from transformers import AutoTokenizer, pipeline

    pipe = pipeline("text-generation", model=str(qwen3), dtype=torch.float32)
    text = pipe("t5 t77 t300", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    tokenizer = AutoTokenizer.from_pretrained(qwen3)
    prompt = tokenizer("t5 t77 t300", return_tensors="pt").input_ids
    with torch.no_grad():
        out = pipe.model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert text == tokenizer.decode(out[0], skip_special_tokens=True)


def test_generate_batched_beams_caches_and_scores(qwen3: Path, qwen3_model) -> None:
    """Left-padded rows generate their unpadded tokens; uncached and static-cache runs equal
    the cached one; the scores are mlx-lm's logits; beam scores re-add from a plain forward."""
    model = qwen3_model
    prompts = [TOKENS[:8], TOKENS[:5], TOKENS]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **greedy)
        for row, prompt in enumerate(prompts):
            one = torch.tensor([prompt])
            alone = model.generate(one, attention_mask=torch.ones_like(one), **greedy)
            assert torch.equal(batched[row, width:], alone[0, len(prompt) :]), row

        scored = dict(greedy, return_dict_in_generate=True, output_scores=True)
        ones = torch.ones_like(IDS)
        cached = model.generate(IDS, attention_mask=ones, **scored)
        uncached = model.generate(IDS, attention_mask=ones, use_cache=False, **scored)
        static = model.generate(IDS, attention_mask=ones, cache_implementation="static", **greedy)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(cached.sequences, static)
    scores = torch.stack(cached.scores)[:, 0].numpy()
    ref = mlx_lm_logits(qwen3, cached.sequences[0].tolist())[len(TOKENS) - 1 : -1]
    np.testing.assert_allclose(scores, ref, atol=2e-4, rtol=0)
    np.testing.assert_allclose(torch.stack(uncached.scores)[:, 0].numpy(), ref, atol=2e-4, rtol=0)

    with torch.no_grad():
        beams = model.generate(
            IDS,
            attention_mask=ones,
            num_beams=3,
            num_return_sequences=2,
            max_new_tokens=5,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
        )
        logp = torch.log_softmax(model(beams.sequences).logits, -1)
    new = beams.sequences[:, len(TOKENS) :]
    total = logp[:, len(TOKENS) - 1 : -1].gather(-1, new[..., None])[..., 0].sum(-1)
    torch.testing.assert_close(beams.sequences_scores, total / new.shape[1], atol=1e-4, rtol=0)
