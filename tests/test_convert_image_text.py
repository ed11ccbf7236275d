"""`mlxq convert` of a float image-text checkpoint is `mlx_vlm convert -q`'s checkpoint of it:
the same tensors (names, dtypes, values), the same `quantization` block, the source's JSON
files and processor beside it, and mlxq runs it with mlx-vlm's fp32 logits. mlx-vlm's mixed
recipes (`--quant-predicate mixed_3_6` ...: group 64, embed_tokens at the high width, its
predicate in place of the model's) likewise, through `quantize_model` and `mlxq convert`.
The oracles are tests/vlm_models.py's tiny models converted by mlx-vlm 0.7.10 (cached).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

TOLERANCE = 1e-3  # fp32 logits of ~1-10, as tests/test_vlm_coverage.py (Gemma 3: 4.5e-4)


def _assert_same_checkpoint(ours: Path, ref: Path) -> None:
    """The same tensor names, dtypes and values, and the same quantization block."""
    a, b = load_file(ours / "model.safetensors"), load_file(ref / "model.safetensors")
    assert sorted(a) == sorted(b), (sorted(set(a) - set(b))[:4], sorted(set(b) - set(a))[:4])
    unequal = [k for k in b if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not unequal, unequal[:5]
    qa, qb = (json.loads((p / "config.json").read_text())["quantization"] for p in (ours, ref))
    assert qa == qb, sorted(k for k in set(qa) | set(qb) if qa.get(k) != qb.get(k))[:6]


@pytest.fixture
def wide_qwen3_vl_moe(monkeypatch: pytest.MonkeyPatch) -> str:
    """Qwen3-VL-MoE with experts of width 192: at vlm_models' 64 (or 128) one of the Hub's
    expert tensors, [E, 128, 2 * 64] (or [E, 128, 128]), is square, and transformers' loading
    (Transpose with check_dims) leaves it untransposed: the float model transformers reads
    is then not the one mlx-vlm reads."""
    import vlm_models

    family = vlm_models.FAMILIES["qwen3_vl_moe"]
    wide = dataclasses.replace(family, text={**family.text, "moe_intermediate_size": 192})
    monkeypatch.setitem(vlm_models.FAMILIES, "qwen3_vl_moe_wide", wide)
    return "qwen3_vl_moe_wide"


@pytest.fixture
def deep_qwen2_5_vl(monkeypatch: pytest.MonkeyPatch) -> str:
    """Qwen2.5-VL with 12 text layers: the recipe's high-width layers then fall as in a real
    model (the first and last eighth, every third between), not only on the last of two."""
    import vlm_models

    family = vlm_models.FAMILIES["qwen2_5_vl"]
    deep = dataclasses.replace(family, text={**family.text, "num_hidden_layers": 12})
    monkeypatch.setitem(vlm_models.FAMILIES, "qwen2_5_vl_deep", deep)
    return "qwen2_5_vl_deep"


def _logit_diffs(ours: Path, ref: Path, name: str) -> list[float]:
    """max |mlxq's logits on `ours` - mlx-vlm's on `ref`| for the text and the image + text
    prompt; the processor saved with `ours` gives mlx-vlm's inputs, and mlx-vlm runs `ours`
    as its own conversion."""
    from vlm_models import mlx_vlm_logits, mlxq_logits, model_inputs

    diffs = []
    for with_image in (False, True):
        inputs = model_inputs(ours, name, with_image)
        theirs = model_inputs(ref, name, with_image)
        assert inputs.keys() == theirs.keys()
        assert all(np.array_equal(inputs[k], theirs[k]) for k in inputs)
        got = mlxq_logits(ours, name, inputs)
        expected = mlx_vlm_logits(ref, name, inputs)
        assert np.array_equal(mlx_vlm_logits(ours, name, inputs), expected)
        diffs.append(float(np.abs(got - expected).max()))
    return diffs


@pytest.mark.parametrize(
    ("name", "tied", "logits"),
    [
        ("llava", False, True),
        ("qwen2_5_vl", False, False),
        ("idefics3", False, False),
        # mlx-vlm's rule: Mistral 3's head float (no entry)
        ("mistral3", False, False),
        ("gemma3", True, True),
        # MoE: loaded whole, then quantized (experts stacked as mlx-vlm's switch_mlp)
        ("qwen3_vl_moe_wide", False, False),
    ],
)
def test_convert_equals_mlx_vlm_convert(
    tmp_path: Path, name: str, tied: bool, logits: bool, request: pytest.FixtureRequest
) -> None:
    """mlxq convert writes `mlx_vlm convert -q`'s checkpoint (before: refused, "writes text
    models only"); mlx-vlm's processor reads the same inputs off it, and mlxq runs it with
    mlx-vlm's logits on its own conversion."""
    from mlxq.convert import convert_checkpoint
    from vlm_models import Variant, tiny_float_checkpoint, tiny_mlx_vlm_checkpoint

    if name == "qwen3_vl_moe_wide":
        request.getfixturevalue("wide_qwen3_vl_moe")
    ref = tiny_mlx_vlm_checkpoint(name, Variant(tied=tied))
    src = tiny_float_checkpoint(name, tmp_path / "float", tied)
    summary = convert_checkpoint(src, tmp_path / "ours", bits=4, group_size=64)
    assert summary.quantized > 0 and summary.kept_float  # the vision tower stays float
    _assert_same_checkpoint(tmp_path / "ours", ref)
    # every file mlx-vlm writes but its README, its index of the one shard and, where
    # transformers cannot build the processor (Qwen2.5-VL's video processor needs
    # torchvision), processor_config.json: its processor (mlx-vlm's own classes) loads from
    # the source's files all the same (the inputs are compared below)
    files = {p.name for p in (tmp_path / "ours").iterdir()}
    missing = {p.name for p in ref.iterdir()} - files
    assert missing <= {"README.md", "model.safetensors.index.json", "processor_config.json"}
    assert {"tokenizer.json", "tokenizer_config.json"} <= files
    if logits:
        diffs = _logit_diffs(tmp_path / "ours", ref, name)
        assert max(diffs) <= TOLERANCE, diffs


# mixed_3_6 at 3 bits group 32 (entries at group 64: mlx-vlm's recipe ignores the group size);
# the other families: benchmarks/quantize_sweep.py
@pytest.mark.parametrize(
    ("name", "tied"),
    [
        ("llava", False),
        # fused experts (each stack its own entry); latent attention (embed_q quantized,
        # unembed_out of 32 rows float without an entry); Gemma 4's per-layer embedding (width
        # 32: float, though the top level's group 32 fits it)
        ("qwen3_5", False),
        ("qwen3_vl_moe_wide", False),
        ("kimi_k25", False),
        ("gemma4_moe", True),
        # PaddleOCR-VL's tower under `visual.` (quantized: no word skip_multimodal_module
        # knows), its fused qkv one entry (before: an entry per part, q_proj ...)
        ("paddleocr_vl", False),
        # LFM2's down projection is `feed_forward.w2`
        ("lfm2_vl", False),
        # Gemma 3's tied head written as its own layer, at the high width (before: left out)
        ("gemma3", True),
    ],
)
def test_mlx_vlm_recipe_equals_mlx_vlm_convert(
    tmp_path: Path, name: str, tied: bool, request: pytest.FixtureRequest
) -> None:
    """quantize_model with recipe_arguments writes what `mlx_vlm convert -q --quant-predicate
    mixed_3_6` writes (before: refused, "mlxq does not reproduce it")."""
    import mlxq
    from mlxq.convert import recipe_arguments
    from transformers import AutoModelForImageTextToText
    from vlm_models import Variant, tiny_float_checkpoint, tiny_mlx_vlm_checkpoint

    if name == "qwen3_vl_moe_wide":
        request.getfixturevalue("wide_qwen3_vl_moe")
    variant = Variant(tied=tied, bits=3, group_size=32, recipe="mixed_3_6")
    ref = tiny_mlx_vlm_checkpoint(name, variant)
    src = tiny_float_checkpoint(name, tmp_path / "float", tied)
    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.bfloat16)
    mlxq.quantize_model(model, 3, 32, **recipe_arguments(model, "mixed_3_6", 32))
    model.save_pretrained(tmp_path / "ours")
    _assert_same_checkpoint(tmp_path / "ours", ref)


def test_every_mlx_vlm_recipe_through_the_cli(tmp_path: Path, deep_qwen2_5_vl: str) -> None:
    """Each of mlx-vlm's seven recipes (four of them mlx-lm's too, three its own), written
    by `mlxq convert --recipe`, is mlx-vlm's checkpoint. Qwen2.5-VL's tower has down_proj
    layers too (mlx-vlm reads the layer index where the language model's has it), and its
    12 text layers place the high widths as in a real model."""
    from mlxq.cli import main
    from mlxq.convert import VLM_RECIPES
    from vlm_models import Variant, tiny_float_checkpoint, tiny_mlx_vlm_checkpoint

    assert len(VLM_RECIPES) == 7
    name = deep_qwen2_5_vl
    src = tiny_float_checkpoint(name, tmp_path / "float", False)
    for recipe in VLM_RECIPES:
        ref = tiny_mlx_vlm_checkpoint(name, Variant(recipe=recipe))
        out = tmp_path / recipe
        assert main(["convert", str(src), str(out), "--recipe", recipe]) == 0
        _assert_same_checkpoint(out, ref)
    entries = json.loads((tmp_path / "mixed_3_6" / "config.json").read_text())["quantization"]
    high = [
        i
        for i in range(12)
        if entries[f"language_model.model.layers.{i}.mlp.down_proj"]["bits"] == 6
    ]
    assert high == [0, 3, 6, 9, 10, 11]


def test_what_mlx_vlm_does_not_write_is_refused_by_name(tmp_path: Path, capsys) -> None:
    """Where mlx-vlm writes no such checkpoint, or one that runs wrong, mlxq refuses by name:
    Idefics 2's recipe (mlx-vlm's model has no `layers`), Gemma 3 with an untied head (mlx-vlm
    runs the embedding as its head), a recipe mlx-lm lacks for a text model."""
    from mlxq.convert import convert_checkpoint, recipe_overrides
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from vlm_models import transformers_config

    with torch.device("meta"):
        idefics2 = AutoModelForImageTextToText.from_config(transformers_config("idefics2"))
    with pytest.raises(NotImplementedError, match="Idefics 2 model has no `layers`"):
        recipe_overrides(idefics2, "mixed_3_6", 64)
    from vlm_models import tiny_float_checkpoint

    src = tiny_float_checkpoint("gemma3", tmp_path / "float", False)
    with pytest.raises(NotImplementedError, match="Gemma 3 image-text model with an untied"):
        convert_checkpoint(src, tmp_path / "out", bits=4, group_size=64)
    assert not (tmp_path / "out").exists()
    from mlxq.cli import main

    assert main(["convert", str(src), str(tmp_path / "out2")]) == 1
    assert "untied head" in capsys.readouterr().err
    with torch.device("meta"):
        text = AutoModelForCausalLM.from_config(transformers_config("llava").text_config)
    with pytest.raises(ValueError, match="mixed_3_5.*image-text models only"):
        recipe_overrides(text, "mixed_3_5", 64)


def test_convert_keeps_what_mlx_vlm_cast_predicate_keeps(tmp_path: Path) -> None:
    """mlx-vlm's Qwen 3.5 keeps `A_log` in the stored dtype when convert casts to the config's
    (its cast_predicate); mlxq wrote it bf16 (mlx-vlm's predicates were not applied, and
    transformers rounded the fp32 tensor at load). Checkpoint with fp32 A_log and dt_bias."""
    from mlx_vlm import convert
    from mlxq.convert import convert_checkpoint
    from safetensors.torch import save_file
    from vlm_models import tiny_float_checkpoint

    src = tiny_float_checkpoint("qwen3_5", tmp_path / "float", False)
    tensors = load_file(src / "model.safetensors")
    fp32 = [k for k in tensors if k.endswith(("A_log", "dt_bias"))]
    assert fp32
    tensors.update({k: tensors[k].float() for k in fp32})
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"  # (without it mlx-vlm casts nothing)
    (src / "config.json").write_text(json.dumps(config))
    convert(str(src), str(tmp_path / "ref"), quantize=True, q_group_size=64, q_bits=4)
    convert_checkpoint(src, tmp_path / "ours", bits=4, group_size=64)
    _assert_same_checkpoint(tmp_path / "ours", tmp_path / "ref")
    ref = load_file(tmp_path / "ref" / "model.safetensors")
    dtypes = {
        k.rpartition(".")[2]: v.dtype for k, v in ref.items() if k.endswith(("A_log", "dt_bias"))
    }
    assert dtypes == {"A_log": torch.float32, "dt_bias": torch.bfloat16}  # the predicate's rule
