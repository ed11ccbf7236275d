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


def _assert_same_checkpoint(ours: Path, ref: Path, float32_kept: bool = False) -> None:
    """The same tensor names, values, dtypes and quantization block. `float32_kept`: a float
    tensor that transformers keeps in float32 (routers' correction biases, Kimi's dt_bias) may
    be saved so where mlx-lm casts it to the model's dtype, with the same values once cast."""
    a, qa = _saved(ours)
    b, qb = _saved(ref)
    assert sorted(a) == sorted(b), (sorted(set(a) - set(b))[:4], sorted(set(b) - set(a))[:4])

    def same(k: str) -> bool:
        if a[k].dtype == b[k].dtype:
            return torch.equal(a[k], b[k])
        return (
            float32_kept and a[k].dtype == torch.float32 and torch.equal(a[k].to(b[k].dtype), b[k])
        )

    unequal = [k for k in b if not same(k)]
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


def _quantized_text(tmp_path: Path, arch: str, variant, on_load: bool = False) -> Path:
    import mlxq
    from arch_models import causal_lm_class, tiny_float_checkpoint
    from mlxq.convert import recipe_overrides

    float_dir = tiny_float_checkpoint(arch, tmp_path / "float", variant.tied)
    cls = causal_lm_class(arch)
    if on_load:
        model = cls.from_pretrained(float_dir, dtype=torch.bfloat16)
        entries = recipe_overrides(model, variant.recipe, 64) if variant.recipe else None
        quant = mlxq.MLXQuantConfig(variant.bits, variant.group_size, overrides=entries)
        model = cls.from_pretrained(float_dir, dtype=torch.bfloat16, quantization_config=quant)
    else:
        model = cls.from_pretrained(float_dir, dtype=torch.bfloat16)
        entries = recipe_overrides(model, variant.recipe, 64) if variant.recipe else None
        mlxq.quantize_model(model, variant.bits, variant.group_size, overrides=entries)
    model.save_pretrained(tmp_path / "ours")
    return tmp_path / "ours"


@pytest.mark.parametrize(
    ("arch", "recipe", "on_load", "float32_kept"),
    [
        # mlx-lm's recipe on MoE models: routers and each expert stack get entries, named as
        # mlx-lm names them (Mixtral's block_sparse_moe.switch_mlp; before: "needs down_proj")
        ("qwen3_moe", "mixed_3_6", False, False),
        ("mixtral", "mixed_3_6", False, False),
        # Granite's rule (o_proj, down_proj, head at 8 bits), also while loading (before: the
        # streaming path quantized them at 4 bits, quantize_model refused)
        ("granite", None, True, False),
        ("granite", None, False, False),
        # GraniteMoE's rule reaches the expert stacks (`switch_mlp.down_proj` ends in
        # `mlp.down_proj`); dense Granite 4.0 saves its fused MLP split as mlx-lm's
        ("granitemoe", None, False, False),
        ("granitemoehybrid_dense", None, False, False),
        ("granitemoehybrid", None, False, False),
        # OLMo Hybrid: its norms' own names and q/k/v convolutions, also while loading
        ("olmo_hybrid", None, True, True),
        # latent attention saved as mlx-lm's embed_q / unembed_out (before: kv_b_proj)
        ("mistral4", None, False, False),
        # routers mlx-lm holds in no linear layer stay float without an entry (before: refused)
        ("dots1", None, False, True),
        ("deepseek_v3", "mixed_3_6", False, True),
        # Kimi Linear: `mlp.` names, q/k/v convolutions, experts, latent attention (before:
        # `block_sparse_moe.experts.0.w2.weight.weight` ...)
        ("kimi_linear", "mixed_3_6", False, True),
    ],
)
def test_text_model_saves_mlx_lm_convert(
    tmp_path: Path, arch: str, recipe: str | None, on_load: bool, float32_kept: bool
) -> None:
    """A float text model quantized by mlxq and saved is `mlx_lm convert -q`'s checkpoint of
    it, tensor for tensor, with the same quantization block."""
    from arch_models import VARIANTS, tiny_mlx_checkpoint

    variant = VARIANTS[1] if recipe else VARIANTS[0]
    ref = tiny_mlx_checkpoint(arch, variant)
    ours = _quantized_text(tmp_path, arch, variant, on_load)
    _assert_same_checkpoint(ours, ref, float32_kept)


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
