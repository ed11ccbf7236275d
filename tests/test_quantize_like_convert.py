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
    """The same tensor names, values and dtypes, and the same quantization block."""
    a, qa = _saved(ours)
    b, qb = _saved(ref)
    assert sorted(a) == sorted(b), (sorted(set(a) - set(b))[:4], sorted(set(b) - set(a))[:4])
    unequal = [k for k in b if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not unequal, unequal[:5]
    assert qa == qb


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


_UNTIED_ONLY = {"nanochat"}  # mlx-lm's model has no tied head


@pytest.mark.parametrize(
    ("arch", "recipe", "on_load"),
    [
        # mlx-lm's recipe on MoE models: routers and each expert stack get entries, named as
        # mlx-lm names them (Mixtral's block_sparse_moe.switch_mlp; before: "needs down_proj")
        ("qwen3_moe", "mixed_3_6", False),
        ("mixtral", "mixed_3_6", False),
        # Granite's rule (o_proj, down_proj, head at 8 bits), also while loading (before: the
        # streaming path quantized them at 4 bits, quantize_model refused)
        ("granite", None, True),
        ("granite", None, False),
        # GraniteMoE's rule reaches the expert stacks (`switch_mlp.down_proj` ends in
        # `mlp.down_proj`); dense Granite 4.0 saves its fused MLP split as mlx-lm's
        ("granitemoe", None, False),
        ("granitemoehybrid_dense", None, False),
        ("granitemoehybrid", None, False),
        # OLMo Hybrid: its norms' own names and q/k/v convolutions, also while loading
        ("olmo_hybrid", None, True),
        # depthwise convolutions saved channels-last, as mlx-lm writes them (before:
        # channels-first, which sends Falcon-H1 through mlx-lm's Hub sanitize again)
        ("falcon_h1", None, True),
        ("recurrent_gemma", "mixed_3_6", False),
        # the recipe read on mlx-lm's names (Llama 4's head is `output`: low bits), and the
        # entries saved under them while loading too
        ("llama4_text", "mixed_3_6", True),
        # dense Granite 4.0's recipe entries for its fused MLP, one per mlx-lm part
        ("granitemoehybrid_dense", "mixed_3_6", True),
        ("solar_open", "mixed_3_6", False),
        # latent attention saved as mlx-lm's embed_q / unembed_out (before: kv_b_proj)
        ("mistral4", None, False),
        # routers mlx-lm holds in no linear layer stay float without an entry (before: refused),
        # their float32 correction biases saved in the dtype the file stores (bf16 here; fp32:
        # test_fp32_kept_tensors_saved_as_convert)
        ("dots1", None, False),
        ("deepseek_v3", "mixed_3_6", False),
        # Kimi Linear: `mlp.` names, q/k/v convolutions, experts, latent attention (before:
        # `block_sparse_moe.experts.0.w2.weight.weight` ...)
        ("kimi_linear", "mixed_3_6", False),
        # nanochat: every tensor quantized, no parameter left for save_pretrained's dtype
        # (before: StopIteration); exaone4 while loading (its layer pattern string:
        # test_model_walk.py)
        ("nanochat", None, False),
        ("exaone4", None, True),
        # LFM2-MoE's fp32 expert_bias in the dtype the file stores (mlx-lm's cast_predicate
        # keeps it; before: fp32); Laguna's router bias under `gate.` (before: switch_mlp.)
        ("lfm2_moe", None, False),
        ("laguna", "mixed_3_6", False),
    ],
)
def test_text_model_saves_mlx_lm_convert(
    tmp_path: Path, arch: str, recipe: str | None, on_load: bool
) -> None:
    """A float text model quantized by mlxq and saved is `mlx_lm convert -q`'s checkpoint of
    it, tensor for tensor, with the same quantization block."""
    from arch_models import VARIANTS, Variant, tiny_mlx_checkpoint

    variant = VARIANTS[1] if recipe else VARIANTS[0]
    if arch in _UNTIED_ONLY:
        variant = Variant(tied=False)
    ref = tiny_mlx_checkpoint(arch, variant)
    ours = _quantized_text(tmp_path, arch, variant, on_load)
    _assert_same_checkpoint(ours, ref)


@pytest.mark.parametrize(
    ("name", "on_load"),
    [
        ("gemma4_moe", False),
        ("gemma4", True),
        ("llava", True),
        ("qwen2_5_vl", False),
        # mlx-vlm's rule keeps Mistral 3's head float; its Pixtral tower and LLaVA
        # OneVision's SigLIP saved under `vision_tower.vision_model.` as mlx-vlm writes them
        ("mistral3", True),
        ("llava_onevision", False),
        # GLM-4.5V's MoEGate routers float, their correction biases cast to text_config's dtype
        # (bf16), as mlx-vlm casts them
        ("glm4v_moe", False),
        # Llama 4 (layout not mapped): its tower and projector float by their own names
        ("llama4", False),
        # MiniCPM-V's own predicate (mergers, embedding, head, linear attention float) before
        # its Qwen 3.5 (MoE) language model's (8-bit gates); before: all quantized
        ("minicpmv4_6", True),
        ("minicpmv4_7_moe", False),
        # Kimi K2.5: its MoEGate routers float, kv_b_proj saved as mlx-vlm's embed_q /
        # unembed_out (before: refused for the routers; kv_b_proj whole)
        ("kimi_k25", False),
    ],
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


def test_gpt_neox_head_keeps_mlx_lm_name(tmp_path: Path) -> None:
    """GPT-NeoX's untied head is saved as mlx-lm's `model.embed_out` (before: `embed_out`,
    transformers' own Hub name, which mlx-lm does not read)."""
    from arch_models import Variant, tiny_mlx_checkpoint

    variant = Variant(tied=False)
    ours = _quantized_text(tmp_path, "gpt_neox", variant, on_load=True)
    _assert_same_checkpoint(ours, tiny_mlx_checkpoint("gpt_neox", variant))


def test_dbrx_quantized_as_mlx_lm_convert(tmp_path: Path) -> None:
    """DBRX's fused experts are quantized as mlx-lm cuts them, one layer per expert (the
    stacks of tests/test_moe.py's convert test), by quantize_model too; quantizing while
    loading is refused for it as for every MoE model."""
    import mlxq
    from arch_models import Variant, causal_lm_class, tiny_float_checkpoint, tiny_mlx_checkpoint

    variant = Variant(tied=False)
    ours = _quantized_text(tmp_path, "dbrx", variant, on_load=False)
    _assert_same_checkpoint(ours, tiny_mlx_checkpoint("dbrx", variant))
    float_dir = tiny_float_checkpoint("dbrx", tmp_path / "float", False)
    with pytest.raises(NotImplementedError):
        causal_lm_class("dbrx").from_pretrained(
            float_dir, dtype=torch.bfloat16, quantization_config=mlxq.MLXQuantConfig(4, 64)
        )


def test_falcon_h1_with_mup_multipliers_is_refused_by_name() -> None:
    """mlx-lm folds Falcon-H1's muP multipliers into the weights when it converts, and its model
    then leaves them out; mlxq does not fold them: a model with multipliers other than 1 is
    refused by name rather than saved as a checkpoint mlx-lm misreads."""
    import mlxq
    from arch_models import _config, causal_lm_class

    config = _config("falcon_h1", True)
    config.embedding_multiplier = 2.0
    config.mlp_multipliers = [1.0, 0.5]
    model = causal_lm_class("falcon_h1").from_config(config)
    with pytest.raises(NotImplementedError, match=r"embedding_multiplier, mlp_multipliers"):
        mlxq.quantize_model(model, 4, 64)


@pytest.mark.parametrize("torch_dtype", [None, "bfloat16"])
@pytest.mark.parametrize("arch", ["glm4_moe", "deepseek_v3", "ernie4_5_moe", "exaone_moe", "dots1"])
def test_fp32_kept_tensors_saved_as_convert(tmp_path: Path, arch: str, torch_dtype) -> None:
    """A MoE checkpoint storing its routers' weights and correction biases in float32 (as the
    Hub does; transformers keeps them float32) is saved by quantize_model as `mlx_lm convert -q`
    writes it: those tensors in the dtype the file stores, or cast to config.json's
    `torch_dtype` unless mlx-lm's cast_predicate keeps them (before: all cast to bf16).
    ERNIE 4.5's router bias left out (mlx-lm's sanitize drops it) and EXAONE MoE's kept under
    the router (`mlp.gate.`), as mlx-lm writes them (before: saved, and at `mlp.`)."""
    import mlxq
    from arch_models import (
        Variant,
        causal_lm_class,
        float_kept_in_fp32,
        tiny_float_checkpoint,
        tiny_mlx_checkpoint_fp32_kept,
    )

    variant = Variant(tied=False)
    ref = tiny_mlx_checkpoint_fp32_kept(arch, variant, torch_dtype)
    float_dir = tiny_float_checkpoint(arch, tmp_path / "float", variant.tied)
    assert float_kept_in_fp32(float_dir, arch, torch_dtype)
    model = causal_lm_class(arch).from_pretrained(float_dir, dtype=torch.bfloat16)
    mlxq.quantize_model(model, 4, 64)
    model.save_pretrained(tmp_path / "ours")
    _assert_same_checkpoint(tmp_path / "ours", ref)


@pytest.mark.parametrize(
    ("arch", "old_layout"),
    [
        # mlxq saved EXAONE MoE's router bias beside the router (the Hub's name) before
        ("exaone_moe", {".mlp.gate.e_score_correction_bias": ".mlp.e_score_correction_bias"}),
        # and ERNIE 4.5's, which mlx-lm drops, as the Hub names it (zeros: mlx-lm's model)
        ("ernie4_5_moe", {".mlp.gate.weight": ".mlp.moe_statics.e_score_correction_bias"}),
    ],
)
def test_router_biases_load_in_either_layout(tmp_path: Path, arch: str, old_layout: dict) -> None:
    """A checkpoint in mlx_lm convert's names and one in the names mlxq saved before load to
    the same model, whose logits are mlx-lm's."""
    import shutil

    import numpy as np
    from arch_models import TOKENS, Variant, mlxq_logits, tiny_mlx_checkpoint
    from mlx_models import mlx_lm_logits
    from safetensors.torch import save_file

    ref = tiny_mlx_checkpoint(arch, Variant(tied=False))
    shutil.copytree(ref, tmp_path / "old")
    tensors = load_file(ref / "model.safetensors")
    for key in list(tensors):
        for new, old in old_layout.items():
            if key.endswith(new):
                value = tensors[key] if "gate.weight" not in new else None
                if value is None:  # (ERNIE: added, the router's width)
                    value = torch.zeros(1, tensors[key.replace(".weight", ".scales")].shape[0])
                else:
                    del tensors[key]
                tensors[key.removesuffix(new) + old] = value
    save_file(tensors, tmp_path / "old" / "model.safetensors", metadata={"format": "mlx"})
    want = mlx_lm_logits(ref, TOKENS)
    got = mlxq_logits(ref, TOKENS)
    assert float(np.abs(got - want).max()) <= 1e-3
    np.testing.assert_array_equal(mlxq_logits(tmp_path / "old", TOKENS), got)


def test_gemma3n_entries_named_as_its_tensors(tmp_path: Path) -> None:
    """Gemma 3n's text model, read from the image-text checkpoint, saves its tensors under
    `model.language_model.` and its per-module entries too, as mlx_lm convert writes them
    (before: `model.altup_projections.0`, ..., which mlx-lm does not look up). The KV-shared
    layers' k/v projections, which the file holds and transformers' model does not build,
    are the only difference (benchmarks/quantize_sweep.py's notes)."""
    from arch_models import Variant, tiny_mlx_checkpoint

    variant = Variant(tied=True, bits=3, recipe="mixed_3_6")  # (mlx-lm ties Gemma 3n's head)
    ref = tiny_mlx_checkpoint("gemma3n", variant)
    ours = _quantized_text(tmp_path, "gemma3n", variant)
    (a, qa), (b, qb) = _saved(ours), _saved(ref)
    shared = {k.rpartition(".")[0] for k in set(b) - set(a)}
    assert shared and all(".self_attn." in k for k in shared) and not set(a) - set(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert qa == {k: v for k, v in qb.items() if k not in shared}


@pytest.mark.parametrize(
    ("arch", "torch_dtype"), [("glm4_moe", None), ("ernie4_5_moe", "bfloat16")]
)
def test_mlxq_convert_saves_fp32_kept_tensors_as_convert(
    tmp_path: Path, arch: str, torch_dtype
) -> None:
    """`mlxq convert` of the fp32-storing MoE checkpoint writes mlx_lm convert's tensors (the
    routers' in the stored dtype or torch_dtype's, as test_fp32_kept_tensors_saved_as_convert;
    before: cast to bf16)."""
    from arch_models import (
        Variant,
        float_kept_in_fp32,
        tiny_float_checkpoint,
        tiny_mlx_checkpoint_fp32_kept,
    )
    from mlxq.convert import convert_checkpoint

    ref = tiny_mlx_checkpoint_fp32_kept(arch, Variant(tied=False), torch_dtype)
    float_dir = tiny_float_checkpoint(arch, tmp_path / "float", False)
    float_kept_in_fp32(float_dir, arch, torch_dtype)
    convert_checkpoint(float_dir, tmp_path / "ours", bits=4, group_size=64)
    _assert_same_checkpoint(tmp_path / "ours", ref)


@pytest.mark.parametrize(("arch", "bias_dtype"), [("glm4_moe", torch.float32), ("dots1", None)])
def test_model_built_in_memory_saves_fp32_kept_tensors_in_its_dtype(
    tmp_path: Path, arch: str, bias_dtype
) -> None:
    """A model built in memory has no file to read the stored dtypes from: its fp32 router
    tensors are saved in the model's dtype, as `mlx_lm convert` casts them to the config's,
    but for those mlx-lm's cast_predicate keeps (GLM-4.5's correction bias stays fp32)."""
    import mlxq
    from arch_models import _config, causal_lm_class
    from safetensors.torch import load_file

    model = causal_lm_class(arch).from_config(_config(arch, False), dtype=torch.bfloat16)
    gate = "model.layers.1.mlp.gate"
    assert model.get_submodule(gate).weight.dtype == torch.float32
    mlxq.quantize_model(model, 4, 64)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert saved[f"{gate}.weight"].dtype == torch.bfloat16
    assert saved[f"{gate}.e_score_correction_bias"].dtype == (bias_dtype or torch.bfloat16)
