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
    """A copy of the converted tiny `arch` whose config.json lacks `keys` (top level and inside
    rope_parameters), plus `extra`. Each key must have been there (else the test proves
    nothing)."""
    folder = tmp_path / arch
    shutil.copytree(tiny_mlx_checkpoint(arch, variant), folder)
    config = json.loads((folder / "config.json").read_text())
    rope = config.get("rope_parameters")
    for key in keys:
        found = config.pop(key, None) is not None or key in (rope or {})
        if isinstance(rope, dict):
            rope.pop(key, None)
        assert found, f"{arch}'s converted config.json has no {key}"
    if rope == {} or (isinstance(rope, dict) and set(rope) <= {"rope_type"}):
        config.pop("rope_parameters", None)  # (only its type left: absent, as the key is)
    config.update(extra or {})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.mark.parametrize(
    ("arch", "variant", "keys"),
    [
        # rope_theta: mlx-lm's qwen2 1e6, transformers' 1e4
        ("qwen2", TIED, ("rope_theta", "rope_parameters")),
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
