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


def test_mlx_lm_model_is_transformers_with_v_unscaled_and_no_key_multiplier(
    tmp_path: Path,
) -> None:
    """The oracle checked: mlx-lm's float model of an fp32 checkpoint is transformers' with
    attention_in_multiplier on q and k only and without key_multiplier (what its sanitize
    folds), to 1e-6; transformers' own model differs by ~0.6 on logits of ~0.9. Should mlx-lm
    fold them as transformers applies them, this fails and mlxq's choice needs revisiting."""
    import contextlib
    import io

    from arch_models import tiny_float_checkpoint
    from mlx_lm import convert
    from transformers import AutoModelForCausalLM

    bf16 = tiny_float_checkpoint(ARCH, tmp_path / "bf16", False)
    model = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32)
    model.save_pretrained(tmp_path / "fp32")  # (mlx-lm folds in the checkpoint's dtype)
    for file in bf16.iterdir():  # config.json with mlx-lm's keys, the tokenizer's files
        if file.suffix != ".safetensors":
            shutil.copy(file, tmp_path / "fp32" / file.name)
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(tmp_path / "fp32"), str(tmp_path / "mlx"), dtype="float32")
    ref = mlx_lm_logits(tmp_path / "mlx", TOKENS)
    ids = torch.tensor([TOKENS])
    attention_in = FALCON_H1_MUP["attention_in_multiplier"]
    with torch.no_grad():
        transformers_own = model(ids).logits[0].numpy()
        for layer in model.model.layers:
            layer.attention_in_multiplier = 1.0
            layer.self_attn.key_multiplier = 1.0
            layer.self_attn.q_proj.weight.mul_(attention_in)
            layer.self_attn.k_proj.weight.mul_(attention_in)
        as_mlx_lm_folds = model(ids).logits[0].numpy()
    assert float(np.abs(as_mlx_lm_folds - ref).max()) <= 1e-5
    assert float(np.abs(transformers_own - ref).max()) > 0.1
