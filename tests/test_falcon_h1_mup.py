"""Falcon-H1 with muP multipliers (every Hub checkpoint has them): `mlx_lm convert` folds them
into the weights (its falcon_h1 sanitize) and mlx-lm's model no longer applies them, while
transformers' model applies them in its forward. mlxq loads such an MLX checkpoint as mlx-lm
runs it (each folded multiplier not applied again), and saves it as mlx-lm reads it.

mlx-lm's model is not transformers' where its sanitize folds otherwise than transformers'
forward applies: attention_in_multiplier scales q, k and v in transformers (mlx-lm folds it
into q and k only), and key_multiplier is never folded. The checkpoint's weights leave no
choice for v; mlxq follows mlx-lm's model for both, so mlx-lm's logits are the exact oracle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from arch_models import FALCON_H1_MUP, TOKENS, Variant, mlxq_logits, tiny_mlx_checkpoint
from mlx_models import mlx_lm_logits
from mlxq.inspect_checkpoint import inspect_checkpoint

ARCH = "falcon_h1_mup"
TOLERANCE = 1e-4  # fp32 logits of ~1; measured 4e-6 (1.3 / 0.73 with the multipliers twice)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_folded_multipliers_are_not_applied_again(tmp_path: Path, tied: bool) -> None:
    from transformers import AutoModelForCausalLM

    path = tiny_mlx_checkpoint(ARCH, Variant(tied=tied))
    config = json.loads((path / "config.json").read_text())
    assert all(config[k] == v for k, v in FALCON_H1_MUP.items())  # none of them 1
    ref = mlx_lm_logits(path, TOKENS)
    assert float(np.abs(mlxq_logits(path, TOKENS) - ref).max()) <= TOLERANCE
    assert not inspect_checkpoint(path, str(path)).errors

    # saved again: the config keeps the multipliers and the conv1d weights stay channels-last
    # (mlx-lm's sanitize folds only a checkpoint whose conv1d is channels-first)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    for file in path.iterdir():  # the tokenizer's files
        if not (saved / file.name).exists():
            shutil.copy(file, saved / file.name)
    written = json.loads((saved / "config.json").read_text())
    assert all(written[k] == v for k, v in FALCON_H1_MUP.items())
    with torch.no_grad():
        ours = model(torch.tensor([TOKENS])).logits[0].numpy()
    assert float(np.abs(mlx_lm_logits(saved, TOKENS) - ref).max()) <= TOLERANCE
    np.testing.assert_allclose(mlxq_logits(saved, TOKENS), ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_dequantized_model_saves_a_config_of_unfolded_multipliers(
    tmp_path: Path, tied: bool
) -> None:
    """Dequantized, the model's float weights hold the folded multipliers: its config then says
    1 for each (the tied head: lm_head / embedding), and the float checkpoint it saves loads as
    the same model in transformers alone, and in mlx-lm."""
    from transformers import AutoModelForCausalLM

    path = tiny_mlx_checkpoint(ARCH, Variant(tied=tied))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        before = model(ids).logits[0].numpy()
        model.dequantize()
        after = model(ids).logits[0].numpy()
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-4)
    ratio = FALCON_H1_MUP["lm_head_multiplier"] / FALCON_H1_MUP["embedding_multiplier"]
    assert model.config.lm_head_multiplier == (ratio if tied else 1.0)
    assert model.config.ssm_multipliers == [1.0] * 5
    saved = tmp_path / "float"
    model.save_pretrained(saved)
    for file in path.iterdir():  # the tokenizer's files
        if not (saved / file.name).exists():
            shutil.copy(file, saved / file.name)
    assert "quantization" not in json.loads((saved / "config.json").read_text())
    reread = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(reread(ids).logits[0].numpy(), after, rtol=0, atol=1e-5)
    assert float(np.abs(mlx_lm_logits(saved, TOKENS) - after).max()) <= TOLERANCE
