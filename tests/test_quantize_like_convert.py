"""A float model quantized by mlxq with no per-module entries is what `mlx_lm convert -q` /
`mlx_vlm convert -q` writes for it: the model class's own rule (routers at 8 bits, Mistral 3's
head float in mlx-vlm), and mlx-vlm's float vision towers and projectors. Per-module entries of
an image-text model may name modules as transformers or as mlx-vlm does.
The whole matrix: benchmarks/quantize_sweep.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def _saved(folder: Path) -> tuple[dict, dict]:
    tensors = load_file(folder / "model.safetensors")
    return tensors, json.loads((folder / "config.json").read_text())["quantization"]


def _assert_same_checkpoint(ours: Path, ref: Path) -> None:
    a, qa = _saved(ours)
    b, qb = _saved(ref)
    assert sorted(a) == sorted(b), (sorted(set(a) - set(b))[:4], sorted(set(b) - set(a))[:4])
    unequal = [k for k in b if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not unequal, unequal[:5]
    assert qa == qb


@pytest.mark.parametrize("arch", ["kimi_linear", "granitemoehybrid"])
def test_text_router_rule_is_mlx_lm_convert(tmp_path: Path, arch: str) -> None:
    """Kimi Linear's `mlp.gate` and Granite 4.0-H's `router.layer` at 8 bits, group 64 (their
    mlx-lm `quant_predicate`), named as mlx-lm names them; before, refused without entries.
    (The tensors of these two also differ for layout reasons the sweep reports; the
    quantization block is the rule.)"""
    import mlxq
    from arch_models import Variant, causal_lm_class, tiny_float_checkpoint, tiny_mlx_checkpoint

    variant = Variant(tied=True)
    ref = tiny_mlx_checkpoint(arch, variant)
    float_dir = tiny_float_checkpoint(arch, tmp_path / "float", variant.tied)
    model = causal_lm_class(arch).from_pretrained(float_dir, dtype=torch.bfloat16)
    mlxq.quantize_model(model, 4, 64)
    model.save_pretrained(tmp_path / "ours")
    _, ours = _saved(tmp_path / "ours")
    _, theirs = _saved(ref)
    assert ours == theirs
    assert sum(isinstance(v, dict) and v["bits"] == 8 for v in ours.values()) >= 1


@pytest.mark.parametrize(
    ("name", "on_load"),
    [("gemma4_moe", False), ("gemma4", True), ("llava", True), ("qwen2_5_vl", False)],
)
def test_image_text_quantized_as_mlx_vlm_convert(tmp_path: Path, name: str, on_load: bool) -> None:
    """With no entries and nothing in modules_to_not_convert, mlxq quantizes an image-text
    model as `mlx_vlm convert -q` does, tensor for tensor: vision tower and projector float
    (mlx-vlm's skip_multimodal_module; before, mlxq quantized them), Gemma 4's routers at 8
    bits (mlx-vlm's rule; before, refused)."""
    import mlxq
    from transformers import AutoModelForImageTextToText
    from vlm_models import tiny_float_checkpoint, tiny_mlx_vlm_checkpoint, variant_of

    variant = variant_of(name)
    ref = tiny_mlx_vlm_checkpoint(name, variant)
    float_dir = tiny_float_checkpoint(name, tmp_path / "float", variant.tied)
    if on_load:
        model = AutoModelForImageTextToText.from_pretrained(
            float_dir, dtype=torch.bfloat16, quantization_config=mlxq.MLXQuantConfig(4, 64)
        )
    else:
        model = AutoModelForImageTextToText.from_pretrained(float_dir, dtype=torch.bfloat16)
        mlxq.quantize_model(model, 4, 64)
    model.save_pretrained(tmp_path / "ours")
    _assert_same_checkpoint(tmp_path / "ours", ref)


@pytest.mark.parametrize("on_load", [False, True])
def test_image_text_entries_in_either_naming(tmp_path: Path, on_load: bool) -> None:
    """An entry of an image-text model may name its module as transformers does
    (`model.language_model.layers.0.mlp.down_proj`) or as mlx-vlm's config.json does
    (`language_model.model.layers.0.mlp.down_proj`): both quantize the same layer, and the
    saved config names it as mlx-vlm does. A vision layer given an entry is quantized."""
    import mlxq
    from transformers import AutoModelForImageTextToText
    from vlm_models import tiny_float_checkpoint

    float_dir = tiny_float_checkpoint("llava", tmp_path / "float", False)
    eight = {"bits": 8, "group_size": 64}
    vision = "model.vision_tower.encoder.layers.0.mlp.fc1"
    namings = {
        "transformers": {"model.language_model.layers.0.mlp.down_proj": eight, vision: eight},
        "mlx-vlm": {
            "language_model.model.layers.0.mlp.down_proj": eight,
            "vision_tower.vision_model.encoder.layers.0.mlp.fc1": eight,
        },
    }
    saved = {}
    for naming, overrides in namings.items():
        if on_load:
            quant = mlxq.MLXQuantConfig(4, 64, overrides=overrides)
            model = AutoModelForImageTextToText.from_pretrained(
                float_dir, dtype=torch.bfloat16, quantization_config=quant
            )
        else:
            model = AutoModelForImageTextToText.from_pretrained(float_dir, dtype=torch.bfloat16)
            mlxq.quantize_model(model, 4, 64, overrides=overrides)
        assert model.get_submodule("model.language_model.layers.0.mlp.down_proj").bits == 8
        assert model.get_submodule(vision).bits == 8
        assert isinstance(model.get_submodule(vision.replace("fc1", "fc2")), torch.nn.Linear)
        model.save_pretrained(tmp_path / naming)
        saved[naming] = _saved(tmp_path / naming)
    (a, qa), (b, qb) = saved.values()
    assert qa == qb and set(namings["mlx-vlm"]) <= set(qa)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
