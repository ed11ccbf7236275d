"""A key absent from an MLX checkpoint's config.json is read with mlx-lm's default, not
transformers' (or refused by name): tiny models converted by `mlx_lm.convert`, the key deleted
from the converted config.json, must give mlx-lm's fp32 logits in mlxq.

The keys and defaults come from tests/config_default_audit.py (run it for the whole table).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from arch_models import TOKENS, VARIANTS, Variant, mlxq_logits, tiny_mlx_checkpoint
from mlx_models import mlx_lm_logits

TOLERANCE = 1e-3  # as test_arch_coverage
TIED, UNTIED = VARIANTS[0], VARIANTS[1]
PLAIN_UNTIED = Variant(tied=False, bits=3, group_size=32)  # (phi has no mixed recipe's keys)


def _checkpoint_without(
    arch: str, variant, tmp_path: Path, keys: tuple[str, ...], extra: dict | None = None
) -> Path:
    """A copy of the converted tiny `arch` whose config.json lacks `keys` (top level, or
    "text_config.key"; and inside rope_parameters), plus `extra`. Each key must have been
    there (else the test proves nothing)."""
    folder = tmp_path / arch
    shutil.copytree(tiny_mlx_checkpoint(arch, variant), folder)
    top = json.loads((folder / "config.json").read_text())
    for name in keys:
        where, _, key = name.rpartition(".")  # "text_config.key": in the text config
        config = top[where] if where else top
        rope = config.get("rope_parameters")
        found = key in config or key in (rope or {})
        config.pop(key, None)
        if isinstance(rope, dict):
            rope.pop(key, None)
        assert found, f"{arch}'s converted config.json has no {name}"
        if rope == {} or (isinstance(rope, dict) and set(rope) <= {"rope_type"}):
            config.pop("rope_parameters", None)  # (only its type left: absent, as the key is)
    top.update(extra or {})
    (folder / "config.json").write_text(json.dumps(top, indent=2))
    return folder


@pytest.mark.parametrize(
    ("arch", "variant", "keys"),
    [
        # rope_theta: mlx-lm's qwen2 1e6, transformers' 1e4
        ("qwen2", TIED, ("rope_theta",)),
        # partial_rotary_factor: mlx-lm's phi 0.4, transformers' 0.5
        ("phi", PLAIN_UNTIED, ("partial_rotary_factor",)),
        # query_pre_attn_scalar: mlx-lm's gemma2 144, transformers' 256
        ("gemma2", TIED, ("query_pre_attn_scalar",)),
        # tie_word_embeddings: mlx-lm's llama True (its converted checkpoint has no lm_head),
        # transformers' False (it would want one)
        ("llama", TIED, ("tie_word_embeddings",)),
        # moe_k: mlx-lm's ERNIE 4.5 MoE 1 expert per token, transformers' 6 (of 4 here)
        ("ernie4_5_moe", TIED, ("moe_k",)),
        # routed_scaling_factor: mlx-lm's DeepSeek V3 1.0, transformers' 2.5
        ("deepseek_v3", UNTIED, ("routed_scaling_factor",)),
        # norm_topk_prob: mlx-lm's Qwen3-Next False, transformers' True
        ("qwen3_next", TIED, ("norm_topk_prob",)),
        # final_logit_softcapping: mlx-lm's (and mlx-vlm's) Gemma 4 30, transformers' None
        ("gemma4", TIED, ("text_config.final_logit_softcapping",)),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_absent_key_runs_mlx_lm_default(arch: str, variant, keys, tmp_path: Path) -> None:
    path = _checkpoint_without(arch, variant, tmp_path, keys)
    ref = mlx_lm_logits(path, TOKENS)
    got = mlxq_logits(path, TOKENS)
    diff = float(np.abs(got - ref).max())
    assert diff <= TOLERANCE, f"{arch} without {keys}: max|diff| {diff:.2e}"


def test_alias_mlx_lm_does_not_read_is_refused(tmp_path: Path) -> None:
    # ERNIE 4.5 MoE saying `num_experts_per_tok: 2` and no `moe_k`: transformers reads the
    # alias (2 experts a token), mlx-lm its moe_k default (1): refused, naming both
    from transformers import AutoModelForCausalLM

    path = _checkpoint_without(
        "ernie4_5_moe", TIED, tmp_path, ("moe_k",), {"num_experts_per_tok": 2}
    )
    with pytest.raises(ValueError, match=r"num_experts_per_tok: 2 and no moe_k.*default 1"):
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_rope_scaling_mlx_lm_lacks_is_refused(tmp_path: Path) -> None:
    # GPT-OSS without rope_scaling: mlx-lm runs plain RoPE, transformers' default is yarn
    from transformers import AutoModelForCausalLM

    path = _checkpoint_without("gpt_oss", UNTIED, tmp_path, ("rope_parameters",))
    with pytest.raises(ValueError, match=r"'gpt_oss' has no rope_scaling.*'yarn'"):
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_audit_rows_are_decided() -> None:
    # every forward-changing difference the audit finds for mlx-lm's models is either given
    # mlx-lm's default at load (MLX_LM_DEFAULTS) or listed with the reason it is not
    from config_default_audit import NOT_FORWARD, UNVERIFIED, _same, mlx_lm_rows
    from mlxq.integrations.config_defaults import MLX_LM_DEFAULTS, MLX_LM_PLAIN_ROPE

    undecided = []
    for model_type, key, mlx_default, _ in mlx_lm_rows():
        decided = MLX_LM_DEFAULTS.get(model_type, {})
        if key in decided:
            # (mlx-lm's None where it tests the value's truth: False)
            same = _same(mlx_default, decided[key]) or (mlx_default, decided[key]) == (None, False)
            assert same, (model_type, key, decided[key], mlx_default)
        elif (model_type, key) in {**NOT_FORWARD, **UNVERIFIED} or (
            key in ("rope_scaling", "rope_parameters") and model_type in MLX_LM_PLAIN_ROPE
        ):
            continue
        else:
            undecided.append((model_type, key))
    assert not undecided, undecided


def _omni_thinker_on_meta(raw: dict):
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    with torch.device("meta"):  # (no memory: only the routers are looked at)
        return Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig.from_dict(raw))


def test_qwen3_omni_moe_nested_text_config_is_checked() -> None:
    # Qwen3-Omni-MoE keeps its language model's expert settings in
    # thinker_config.text_config, which mlx-vlm reads (its TextConfig): checked against the
    # thinker's routers, a value other than the one transformers built refused naming the
    # nested key (the check read the top level alone, found no expert count and passed)
    import copy

    from mlxq.integrations.moe_config import check_expert_counts
    from transformers import AutoConfig

    thinker = {  # one layer of each tower (the routers are what counts)
        "text_config": {"num_hidden_layers": 1, "num_experts": 16, "num_experts_per_tok": 8},
        "vision_config": {"depth": 1},
        "audio_config": {"encoder_layers": 1},
    }
    raw = AutoConfig.for_model(
        "qwen3_omni_moe", enable_audio_output=False, thinker_config=thinker
    ).to_dict()
    model = _omni_thinker_on_meta(raw)
    check_expert_counts(model, raw)  # read alike: nothing to refuse
    other = copy.deepcopy(raw)
    other["thinker_config"]["text_config"]["num_experts_per_tok"] = 4
    with pytest.raises(
        ValueError,
        match=r"transformers builds 8 .*thinker_config\.text_config\.num_experts_per_tok",
    ):
        check_expert_counts(model, other)
    other = copy.deepcopy(raw)
    other["thinker_config"]["text_config"]["num_experts"] = 32
    with pytest.raises(ValueError, match=r"thinker_config\.text_config\.num_experts \(32\)"):
        check_expert_counts(model, other)


def test_text_config_key_the_oracles_default_apart_is_refused(tmp_path: Path) -> None:
    # Gemma 3's text_config without sliding_window: mlx-lm's language model 512, mlx-vlm's
    # 1024, transformers' 4096; config.json does not say which oracle converted it: refused
    from mlxq.integrations.config_defaults import with_mlx_lm_defaults

    config = {"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}}
    with pytest.raises(ValueError, match=r"'gemma3' has no text_config.sliding_window.*512.*1024"):
        with_mlx_lm_defaults(config)
    given = {"model_type": "gemma3", "text_config": {"sliding_window": 1024}}
    assert with_mlx_lm_defaults(given) == given
