"""mlxq.model_walk: the one walk over a model (candidates, formats, the head decision) that the
loader, quantize_model, the mixed recipes and inspect share."""

from __future__ import annotations

import pytest
import torch
from mlxq.format import ModuleFormat
from mlxq.model_walk import head_decision, plan_modules, plan_quantization
from torch import nn


def _llama(tied: bool, meta: bool = True):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=128,
        tie_word_embeddings=tied,
    )
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_head_decision_tied_untied_and_stored() -> None:
    tied = head_decision(_llama(True))
    assert (tied.head, tied.embedding, tied.tied) == ("lm_head", "model.embed_tokens", True)
    assert not head_decision(_llama(False)).tied
    # a checkpoint that stores the head's own weight: it loads its own tensors
    assert not head_decision(_llama(True), stored={"lm_head.weight"}).tied
    assert head_decision(_llama(True), stored={"model.embed_tokens.weight"}).tied


def test_head_decision_follows_the_loaded_weights_not_the_config() -> None:
    model = _llama(True, meta=False)
    assert head_decision(model).tied
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untied by hand
    assert not head_decision(model).tied  # sharing it would silently change the model


def test_head_decision_of_a_plain_module() -> None:
    decision = head_decision(nn.Sequential(nn.Linear(64, 8)))
    assert (decision.head, decision.embedding, decision.tied) == (None, None, False)


def test_plan_modules_lists_candidates_in_order_without_the_tied_head() -> None:
    model = _llama(True)
    seen = []

    def format_of(name, plan):
        seen.append(name)
        return ModuleFormat(4, 32) if "mlp" in name else None

    walk = plan_modules(model, format_of)
    names = [m.name for m in walk.modules]
    assert names == seen
    assert names[0] == "model.embed_tokens" and "lm_head" not in names
    assert (
        names
        == [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))][:-1]
    )
    assert set(walk.formats()) == {n for n in names if "mlp" in n}


def test_plan_modules_errors_raise_or_are_collected() -> None:
    def format_of(name, plan):
        if name.endswith("q_proj"):
            raise ValueError(f"mlxq: layer {name!r}: bad")
        return None

    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj"):
        plan_modules(_llama(False), format_of)
    walk = plan_modules(_llama(False), format_of, collect_errors=True)
    bad = [m for m in walk.modules if m.error is not None]
    assert [m.name for m in bad] == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    with pytest.raises(ValueError, match="bad"):
        bad[0].require_format()


def test_plan_quantization_config_rules() -> None:
    model = _llama(False)
    walk = plan_quantization(
        model,
        ModuleFormat(4, 64),
        overrides={"model.layers.0.mlp.up_proj": {"bits": 8, "group_size": 32}},
        skip=["model.layers.1"],
    )
    formats = walk.formats()
    assert formats["model.layers.0.mlp.up_proj"] == ModuleFormat(8, 32)
    assert formats["model.layers.0.self_attn.q_proj"] == ModuleFormat(4, 64)
    assert "model.layers.0.mlp.down_proj" not in formats  # width 96: not a multiple of 64
    assert not any(n.startswith("model.layers.1.") for n in formats)  # skipped
    assert formats["lm_head"] == ModuleFormat(4, 64)  # untied: a layer of its own
    with pytest.raises(ValueError, match="bits=7"):
        plan_quantization(model, ModuleFormat(7, 64))
