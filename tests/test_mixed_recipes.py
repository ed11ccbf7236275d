"""Mixed-recipe checkpoints written by `mlx_lm convert --quant-predicate` without a group size:
their per-module entries say `"group_size": null` (the mode's default, 64). Loaded, saved and
inspected against mlx-lm (issue: such checkpoints did not load at all)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlx_models import mlx_lm_logits, smollm2
from mlxq.convert import RECIPES
from mlxq.nn import AffineLinear

FP32_LOGIT_ATOL = 1e-3


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        AutoTokenizer.from_pretrained(path),
    )


def _tokens(tokenizer) -> torch.Tensor:
    return tokenizer("The capital of France is", return_tensors="pt").input_ids[0, :8]


def _logits(model, tokens: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(tokens[None]).logits[0].float().numpy()


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_null_group_size_recipe_loads_and_matches_mlx_lm(recipe: str) -> None:
    path = smollm2(4, None, recipe)  # mlx_lm.convert without --q-group-size
    q = json.loads((path / "config.json").read_text())["quantization"]
    entries = {k: v for k, v in q.items() if isinstance(v, dict)}
    assert entries and all(v["group_size"] is None for v in entries.values())
    model, tokenizer = _load(path)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AffineLinear)}
    assert {m.group_size for m in layers.values()} == {64}
    low, high = RECIPES[recipe]
    assert {m.bits for m in layers.values()} == {low, high}
    for name, entry in entries.items():
        if name in layers:
            assert layers[name].bits == entry["bits"], name
    tokens = _tokens(tokenizer)
    ours, ref = _logits(model, tokens), mlx_lm_logits(path, tokens.numpy())
    diff, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    print(f"\n[{recipe} g=null] max |logits - mlx-lm| = {diff:.2e} (max |logit| {scale:.1f})")
    # fp32 sums in another order: the error grows with the logits' size (2-bit models are loud)
    assert diff < FP32_LOGIT_ATOL * max(1.0, scale / 20)
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))


def test_null_group_size_round_trips_through_save_and_mlx_lm(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    path = smollm2(4, None, "mixed_4_6")
    model, tokenizer = _load(path)
    saved = tmp_path / "saved"
    model.to(torch.bfloat16).save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    original = json.loads((path / "config.json").read_text())["quantization"]
    assert json.loads((saved / "config.json").read_text())["quantization"] == original
    a, b = load_file(path / "model.safetensors"), load_file(saved / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    tokens = _tokens(tokenizer)
    np.testing.assert_allclose(
        mlx_lm_logits(saved, tokens.numpy()), mlx_lm_logits(path, tokens.numpy()), atol=1e-5
    )


def test_inspect_and_generate_null_group_size_recipe() -> None:
    path = smollm2(4, None, "mixed_4_6")
    run = [sys.executable, "-m", "mlxq"]
    proc = subprocess.run([*run, "inspect", str(path), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["problems"] == []
    bits = {m["bits"] for m in report["modules"] if m["bits"] and m["bytes"]}
    assert bits == {4, 6}
    assert {m["group_size"] for m in report["modules"] if m["bits"]} == {64}
    # fp32: the exact dtype (in bf16, the CLI's default on this CPU, this 135M model's greedy
    # answer drifts, as mlx-lm's own bf16 answer does)
    args = ["generate", "--model", str(path), "--max-tokens", "12", "--dtype", "float32"]
    proc = subprocess.run([*run, *args, "--prompt", "What is the capital of France?"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def _with_config_entry(src: Path, dst: Path, name: str, entry) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        config[key][name] = entry
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"group_size": None, "bits": 8}, ["bits=8", "bits=6"]),
        ({"group_size": 32, "bits": 6}, ["group_size=32", "group_size=64"]),
        ({"group_size": None, "bits": "six"}, ["'bits'", "'six'"]),
        (False, ["false", "scales"]),
    ],
)
def test_entry_that_contradicts_the_tensors_is_named(tmp_path: Path, entry, words) -> None:
    from transformers import AutoModelForCausalLM

    path = smollm2(4, None, "mixed_4_6")
    q = json.loads((path / "config.json").read_text())["quantization"]
    name = next(k for k, v in q.items() if isinstance(v, dict) and v["bits"] == 6)
    broken = _with_config_entry(path, tmp_path / "broken", name, entry)
    with pytest.raises(ValueError) as error:
        AutoModelForCausalLM.from_pretrained(broken)
    assert name in str(error.value)
    for word in words:
        assert word in str(error.value)
