"""Image-text models from mlx-vlm: tiny random models converted by `mlx_vlm.convert -q` give
mlx-vlm's fp32 logits in mlxq (text only, and one generated image + text), save back to a
checkpoint mlx-vlm loads, and a checkpoint that would leave a tensor unfilled (or of a family
whose layout mlxq does not map) is refused by name.

Every family's base conversion runs here (each takes a fraction of a second once converted);
`python benchmarks/vlm_coverage.py --variants` adds the variants of every family.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlxq.integrations.mlx_vlm_layout import UNVERIFIED_VLM
from torch import nn
from vlm_models import (
    FAMILIES,
    VISION_MXFP4,
    Variant,
    mlx_vlm_logits,
    mlxq_logits,
    model_inputs,
    run_family,
    saved_and_expected_shapes,
    tiny_mlx_vlm_checkpoint,
    transformers_config,
)

TOLERANCE = 1e-3  # fp32 logits of ~1-10


@pytest.mark.parametrize("name", list(FAMILIES))
def test_matches_mlx_vlm(name: str) -> None:
    if name in UNVERIFIED_VLM:  # mlx-vlm converts it; mlxq refuses it by name, with the reason
        path = tiny_mlx_vlm_checkpoint(name)
        reason = re.escape(UNVERIFIED_VLM[name][:60])
        with pytest.raises(ValueError, match=rf"model_type {name!r} is an image-text .*{reason}"):
            _load(path)
        return
    outcome = run_family(name)
    print(f"\n{outcome.line()}")
    assert outcome.status == "loads", outcome.line()
    assert outcome.text_diff <= TOLERANCE and outcome.image_diff <= TOLERANCE, outcome.line()


def _load(path: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize(
    "name",
    [
        "qwen2_5_vl",
        "gemma3",
        "llava_onevision",
        "lfm2_vl",
        "qwen3_5",
        "qwen3_5_moe",
        "qwen4_exp",
        "cohere_compass",
        "qwen3_vl_moe",
        "glm4v",
        "glm_ocr",
        "mllama",
        "paddleocr_vl",
        "gemma4",
        "gemma4_moe",
        "hunyuan_vl",
        "granite4_vision",
        "minicpmv4_6",
        "minicpmv4_7",
        "minicpmv4_7_moe",
        "kimi_k25",
        "gemma4_unified",
        "muse_glimmer",
        "glm5_next",
        "mistral3_mistral4",  # (its experts saved back under switch_mlp)
    ],
)
def test_save_pretrained_loads_in_mlx_vlm(tmp_path: Path, name: str) -> None:
    """The saved checkpoint has mlx-vlm's names, channels-last convolutions and the config
    keys mlx-vlm reads: mlx-vlm runs it as the same model, and mlxq reads it back."""
    from mlxq.nn import AffineLinear

    source = tiny_mlx_vlm_checkpoint(name)
    model = _load(source)
    assert any(isinstance(m, AffineLinear) for m in model.modules())
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    for file in source.iterdir():  # tokenizer and processor files
        if not (saved / file.name).exists() and file.is_file():
            shutil.copy(file, saved / file.name)
    saved_shapes, want = saved_and_expected_shapes(source, saved)
    assert saved_shapes == want
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and "quant_method" not in cfg["quantization"]
    inputs = model_inputs(saved, name, with_image=True)
    ours = mlxq_logits(saved, name, inputs, model)
    assert float(np.abs(mlx_vlm_logits(saved, name, inputs) - ours).max()) <= TOLERANCE
    np.testing.assert_allclose(mlxq_logits(saved, name, inputs), ours, rtol=0, atol=1e-5)


def test_entries_name_the_saved_tensors_in_mlx_vlm_names(tmp_path: Path) -> None:
    """A float GLM-4V quantized while loading with a per-module entry: the entry names the
    module as the tensors are saved, in mlx-vlm's names (before: transformers', which mlx-vlm
    does not look up, reading the 8-bit layer as 4-bit)."""
    import mlxq
    from transformers import AutoModelForImageTextToText
    from vlm_models import tiny_float_checkpoint, variant_of

    float_dir = tiny_float_checkpoint("glm4v", tmp_path / "float", variant_of("glm4v").tied)
    eight = {"bits": 8, "group_size": 64}
    quant = mlxq.MLXQuantConfig(
        bits=4,
        group_size=64,
        overrides={"model.language_model.layers.0.mlp.down_proj": eight},
        modules_to_not_convert=["model.visual"],  # as mlx-vlm keeps the tower float
    )
    model = AutoModelForImageTextToText.from_pretrained(
        float_dir, dtype=torch.bfloat16, quantization_config=quant
    )
    assert model.model.language_model.layers[0].mlp.down_proj.bits == 8
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    for file in float_dir.iterdir():  # tokenizer and processor files
        if file.is_file() and not (saved / file.name).exists():
            shutil.copy(file, saved / file.name)
    block = json.loads((saved / "config.json").read_text())["quantization"]
    assert block["language_model.model.layers.0.mlp.down_proj"] == eight
    assert not any(k.startswith("model.") for k in block)
    inputs = model_inputs(saved, "glm4v", with_image=True)
    ours = mlxq_logits(saved, "glm4v", inputs)
    assert float(np.abs(mlx_vlm_logits(saved, "glm4v", inputs) - ours).max()) <= TOLERANCE


def test_bf16_checkpoint_saved_again_is_the_same_file(tmp_path: Path) -> None:
    """mlx-vlm's bf16 GLM-4.5V checkpoint loaded in bf16 and saved is the file it was read
    from, tensor for tensor, dtypes included: transformers keeps the routers (weight and
    correction bias) in fp32, which mlxq's save wrote as such before."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    source = tiny_mlx_vlm_checkpoint("glm4v_moe")
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.bfloat16)
    router = model.model.language_model.layers[1].mlp.gate
    assert router.weight.dtype == router.e_score_correction_bias.dtype == torch.float32
    model.save_pretrained(tmp_path / "saved")
    ours, ref = (
        load_file(tmp_path / "saved" / "model.safetensors"),
        load_file(source / "model.safetensors"),
    )
    assert sorted(ours) == sorted(ref)
    assert ref["language_model.model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    unequal = [k for k in ref if ours[k].dtype != ref[k].dtype or not torch.equal(ours[k], ref[k])]
    assert not unequal, unequal[:5]


@pytest.mark.parametrize("name", [n for n in FAMILIES if n not in UNVERIFIED_VLM])
def test_config_keys_from_transformers_config_alone(tmp_path: Path, name: str) -> None:
    """The config.json keys mlxq adds when saving come from transformers 5's config alone (a
    float model quantized by mlxq has no others): mlx-vlm reads that config as the same model
    as its own conversion's."""
    from mlxq.integrations.quantizer import add_mlx_vlm_config_keys

    source = tiny_mlx_vlm_checkpoint(name)
    config = transformers_config(name)
    add_mlx_vlm_config_keys(config)
    cfg = json.loads(config.to_json_string())  # as save_pretrained writes it
    own = json.loads((source / "config.json").read_text())
    cfg.update({k: own[k] for k in ("quantization", "quantization_config")})
    path = tmp_path / "model"
    shutil.copytree(source, path)
    (path / "config.json").write_text(json.dumps(cfg))
    inputs = model_inputs(source, name, with_image=True)
    np.testing.assert_allclose(
        mlx_vlm_logits(path, name, inputs), mlx_vlm_logits(source, name, inputs), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize(
    ("name", "fused", "module", "parts"),
    [
        # PaddleOCR-VL's tower attention (mlx-vlm quantizes that tower, named `visual`): thirds
        (
            "paddleocr_vl",
            "visual.layers.0.self_attn.qkv",
            "model.visual.vision_model.encoder.layers.0.self_attn",
            ("q_proj", "k_proj", "v_proj"),
        ),
        # GLM-5-Next's linear attention: f_a, b and g_a of 32, 4 and 32 rows (its config's
        # linear_head_dim, linear_num_heads, linear_head_dim)
        (
            "glm5_next",
            "language_model.model.layers.0.self_attn.fbg_a_proj",
            "model.language_model.layers.0.self_attn",
            ("forget_gate.f_a_proj", "b_proj", "g_a_proj"),
        ),
    ],
)
def test_fused_projection_is_split(name: str, fused: str, module: str, parts: tuple) -> None:
    """A projection mlx-vlm fuses into one quantized tensor loads as transformers' separate
    projections, each with its own rows of the fused weight, scales, biases (and bias)."""
    from mlxq.nn import AffineLinear
    from safetensors import safe_open

    path = tiny_mlx_vlm_checkpoint(name)
    attn = _load(path).get_submodule(module)
    projs = [attn.get_submodule(p) for p in parts]
    widths = [p.out_features for p in projs]
    with safe_open(path / "model.safetensors", "pt") as f:
        leaves = [k.rsplit(".", 1)[1] for k in f.keys() if k.startswith(f"{fused}.")]
        tensors = {leaf: f.get_tensor(f"{fused}.{leaf}") for leaf in leaves}
    assert {"weight", "scales", "biases"} <= set(tensors)
    assert sum(widths) == len(tensors["weight"])
    for proj, chunk in zip(projs, range(len(projs)), strict=True):
        assert isinstance(proj, AffineLinear)
        for leaf, tensor in tensors.items():
            part = tensor.split(widths)[chunk]
            torch.testing.assert_close(getattr(proj, leaf), part.to(getattr(proj, leaf).dtype))


def test_fused_projection_whose_widths_do_not_add_up_is_refused(tmp_path: Path) -> None:
    """GLM-5-Next's fbg_a_proj is cut by the widths its config gives: a config whose widths do
    not add up to the stored rows is refused naming the tensor and the widths."""
    source = tiny_mlx_vlm_checkpoint("glm5_next")
    path = tmp_path / "glm5_next"
    shutil.copytree(source, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["linear_num_heads"] = 2  # 32 + 2 + 32 rows, where 68 are stored
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match=r"layers\.0\.self_attn\.fbg_a_proj.*68 rows.*\[32, 2, 32\]"
    ):
        _load(path)


def test_missing_vision_tensor_is_refused(tmp_path: Path) -> None:
    """transformers would initialise a missing tensor at random and only log it."""
    from safetensors.torch import load_file, save_file

    source = tiny_mlx_vlm_checkpoint("qwen2_5_vl")
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["vision_tower.merger.ln_q.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "mlx"})
    (broken / "model.safetensors.index.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"no tensor for model\.visual\.merger\.ln_q\.weight"):
        _load(broken)


@pytest.mark.parametrize(
    ("name", "variant"),
    [
        ("qwen2_5_vl", Variant(quantize_vision=True)),
        ("llava", Variant(bits=3, group_size=32, recipe="mixed_3_6")),
        ("qwen2_5_vl", Variant(recipe=VISION_MXFP4)),
        ("qwen3_5", Variant(bits=3, group_size=32, recipe="mixed_3_6")),
        ("qwen3_5_moe", Variant(quantize_vision=True)),
        ("qwen3_vl_moe", Variant(bits=3, group_size=32, recipe="mixed_3_6")),
        ("glm4v_moe", Variant(bits=3, group_size=32, recipe="mixed_3_6")),
        ("hunyuan_vl", Variant(tied=True, bits=3, group_size=32, recipe="mixed_3_6")),
        ("granite4_vision", Variant(bits=3, group_size=32, recipe="mixed_3_6")),
        ("minicpmv4_6", Variant(quantize_vision=True)),
        ("minicpmv4_6", Variant(bits=3, group_size=32, recipe="mixed_3_6")),
        ("minicpmv4_7", Variant(quantize_vision=True)),
        ("minicpmv4_7", Variant(bits=3, group_size=32, recipe="mixed_3_6")),
        ("minicpmv4_7_moe", Variant(bits=3, group_size=32, recipe="mixed_3_6")),
        ("kimi_k25", Variant(quantize_vision=True)),
        ("kimi_k25", Variant(bits=3, group_size=32, recipe="mixed_3_6")),
        ("gemma4_unified", Variant(tied=True, quantize_vision=True)),
        ("gemma4_unified", Variant(tied=True, bits=3, group_size=32, recipe="mixed_3_6")),
        ("muse_glimmer", Variant(quantize_vision=True)),
        ("muse_glimmer", Variant(bits=3, group_size=32, recipe="mixed_3_6")),
    ],
    ids=lambda x: getattr(x, "tag", x),
)
def test_quantized_vision_tower_and_mixed_recipe(name: str, variant: Variant) -> None:
    """A vision tower quantized by mlx-vlm (its own rule keeps it float; patched here), a
    mixed recipe whose per-module entries carry mlx-vlm's names, and entries for vision
    modules only (mxfp4 in an affine 4-bit model): they are found under the model's names
    although no entry names the language model (the mode is read from the entry)."""
    from mlxq.moe import AffineSwitchLinear
    from mlxq.nn import AffineLinear

    outcome = run_family(name, variant)
    assert outcome.status == "loads", outcome.line()
    assert outcome.text_diff <= TOLERANCE and outcome.image_diff <= TOLERANCE, outcome.line()
    if name.startswith("minicpmv4_") and variant.quantize_vision:  # its tower, not Qwen's
        tower = _load(tiny_mlx_vlm_checkpoint(name, variant)).model.vision_tower
        assert isinstance(tower.encoder.layers[0].self_attn.q_proj, AffineLinear)
        # mlx-vlm's own rule for the model keeps the window-attention merger float
        assert type(tower.vit_merger.linear_1) is torch.nn.Linear
    elif name == "kimi_k25" and variant.quantize_vision:  # the fused wqkv, split at load
        attn = _load(tiny_mlx_vlm_checkpoint(name, variant)).model.vision_tower.layers[0].attn
        assert all(isinstance(p, AffineLinear) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    elif name == "gemma4_unified" and variant.quantize_vision:
        # its two projections run float, as Gemma 4's patch embedder (the forward reads their
        # weight dtype to cast its input), although stored quantized
        embed = _load(tiny_mlx_vlm_checkpoint(name, variant)).model.embed_vision
        assert type(embed.patch_dense) is torch.nn.Linear
        assert type(embed.multimodal_embedder.embedding_projection) is torch.nn.Linear
    elif name == "muse_glimmer":  # its normed word embedding: the lookup, then its norm
        from mlxq.nn import NormedAffineEmbedding

        model = _load(tiny_mlx_vlm_checkpoint(name, variant))
        embed = model.model.language_model.embed_tokens
        assert type(embed) is NormedAffineEmbedding
        assert type(embed.embed_norm).__name__ == "MuseGlimmerRMSNorm"
        if variant.quantize_vision:
            assert isinstance(model.model.vision_tower.layers[0].attn.q_proj, AffineLinear)
    elif variant.quantize_vision or variant.recipe == VISION_MXFP4:
        model = _load(tiny_mlx_vlm_checkpoint(name, variant))
        qkv = model.model.visual.blocks[0].attn.qkv
        assert isinstance(qkv, AffineLinear)
        assert qkv.mode == ("mxfp4" if variant.recipe == VISION_MXFP4 else "affine")
        mlp = model.model.language_model.layers[0].mlp
        if hasattr(mlp, "shared_expert"):  # an MoE block: stacked experts, a dense expert
            assert isinstance(mlp.experts.down_proj, AffineSwitchLinear)
            mlp = mlp.shared_expert
        assert mlp.down_proj.mode == "affine"


def test_weight_read_in_helper_forward_calls_is_refused() -> None:
    """HunYuan-VL's vision embedding reads its position table (`weight[1:, :]`, reshaped) in
    `interpolate_pos_encoding`, which its forward calls for every image: with that table
    quantized (mlx-vlm itself fails on this checkpoint) mlxq refuses at load, naming the
    module and the method, instead of a reshape error in the first image forward."""
    path = tiny_mlx_vlm_checkpoint("hunyuan_vl", Variant(tied=True, quantize_vision=True))
    with pytest.raises(
        NotImplementedError,
        match=r"'model\.vision_tower\.embeddings\.position_embedding' is quantized.*"
        r"HunYuanVLVisionPatchEmbed\.interpolate_pos_encoding reads its \.weight directly",
    ):
        _load(path)


def test_quantized_pooling_head_loads(tmp_path: Path) -> None:
    """Granite 4 Vision's SigLIP tower keeps its pooling head (run by the tower's forward, its
    output unused): mlx-vlm quantizes the head's attention input with the tower when asked
    to (a Linear there; transformers holds nn.MultiheadAttention's raw in_proj_weight).
    mlxq loads it into InProjMultiheadAttention, whose forward is torch's MHA with the
    dequantized weight; the logits are mlx-vlm's; saved, it keeps mlx-vlm's names (before:
    refused by name)."""
    from mlxq.nn import AffineLinear, InProjMultiheadAttention
    from safetensors.torch import load_file

    path = tiny_mlx_vlm_checkpoint("granite4_vision", Variant(quantize_vision=True))
    model = _load(path)
    attention = model.model.vision_tower.head.attention
    assert isinstance(attention, InProjMultiheadAttention)
    assert isinstance(attention.in_proj, AffineLinear)
    mha = nn.MultiheadAttention(attention.embed_dim, attention.num_heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(attention.in_proj.dequantize_weight())
        mha.in_proj_bias.copy_(attention.in_proj.bias)
        mha.out_proj.weight.copy_(_dense(attention.out_proj))
        mha.out_proj.bias.copy_(attention.out_proj.bias)
        probe, x = torch.randn(2, 1, attention.embed_dim), torch.randn(2, 7, attention.embed_dim)
        want, got = mha(probe, x, x), attention(probe, x, x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    inputs = model_inputs(path, "granite4_vision", with_image=True)
    ours = mlxq_logits(path, "granite4_vision", inputs, model)
    ref = mlx_vlm_logits(path, "granite4_vision", inputs)
    assert float(np.abs(ref - ours).max()) <= TOLERANCE
    model.save_pretrained(tmp_path)  # (in fp32, as loaded: the stored values, cast)
    saved, stored = load_file(tmp_path / "model.safetensors"), load_file(path / "model.safetensors")
    assert sorted(saved) == sorted(stored)
    head = [k for k in stored if ".head.attention.in_proj." in k]
    assert len(head) == 4  # weight, scales, biases, bias
    assert all(torch.equal(saved[k].to(stored[k].dtype), stored[k]) for k in head)


def _dense(linear: nn.Module) -> torch.Tensor:
    return linear.dequantize_weight() if hasattr(linear, "dequantize_weight") else linear.weight


def test_unmapped_family_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """An mlx-vlm checkpoint of an image-text family whose layout mlxq does not map is
    refused with the family's name and the reason, not with its first unmatched tensor."""
    from mlxq.integrations import mlx_vlm_layout

    source = tiny_mlx_vlm_checkpoint("qwen2_5_vl")
    monkeypatch.delitem(mlx_vlm_layout.VLM_LAYOUTS, "qwen2_5_vl")
    with pytest.raises(ValueError, match=r"model_type 'qwen2_5_vl' is an image-text family whose"):
        _load(source)
    assert "timm" in mlx_vlm_layout.unmapped_vlm_note("gemma3n")


def test_unmapped_family_is_refused_with_every_tensor_filled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An mlx-vlm checkpoint whose names happen to be transformers' own (so every tensor of the
    model would be filled) is still refused when its family is not mapped: it was written by
    MLX and has a vision tower. The same tensors written by transformers (`format: pt`, as
    mlxq's save_pretrained writes) load, as the model mlxq reads from the mapped checkpoint."""
    from mlxq.integrations import mlx_vlm_layout
    from safetensors.torch import load_file, save_file

    source = tiny_mlx_vlm_checkpoint("qwen2_5_vl")
    layout = mlx_vlm_layout.VLM_LAYOUTS["qwen2_5_vl"]
    tensors = {
        layout.to_transformers(k): v for k, v in load_file(source / "model.safetensors").items()
    }
    conv = "model.visual.patch_embed.proj.weight"
    tensors[conv] = tensors[conv].permute(0, 4, 1, 2, 3).contiguous()  # channels-first
    inputs = model_inputs(source, "qwen2_5_vl", with_image=True)
    expected = mlxq_logits(source, "qwen2_5_vl", inputs)
    monkeypatch.delitem(mlx_vlm_layout.VLM_LAYOUTS, "qwen2_5_vl")
    for writer in ("mlx", "pt"):
        path = tmp_path / writer
        shutil.copytree(source, path)
        (path / "model.safetensors.index.json").unlink(missing_ok=True)
        save_file(tensors, path / "model.safetensors", metadata={"format": writer})
        if writer == "mlx":
            with pytest.raises(ValueError, match=r"written by MLX .*model_type 'qwen2_5_vl' is an"):
                _load(path)
        else:
            got = mlxq_logits(path, "qwen2_5_vl", inputs)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["lfm2_vl", "internvl"])
def test_own_class_loads_the_same_model(name: str) -> None:
    """The model's own class reads an mlx-vlm checkpoint as AutoModelForImageTextToText does."""
    import transformers

    path = tiny_mlx_vlm_checkpoint(name)
    auto = _load(path)
    own = getattr(transformers, type(auto).__name__).from_pretrained(path, dtype=torch.float32)
    assert type(own) is type(auto)
    inputs = model_inputs(path, name, with_image=True)
    np.testing.assert_array_equal(
        mlxq_logits(path, name, inputs, own), mlxq_logits(path, name, inputs, auto)
    )


@pytest.mark.parametrize(
    "name",
    [
        "qwen2_5_vl",
        "llava",
        "gemma4",
        "mllama",
        "glm4v_moe",
        "glm_ocr",
        "granite4_vision",
        "minicpmv4_6",
        "minicpmv4_7_moe",
        "kimi_k25",
        "gemma4_unified",
        "muse_glimmer",
        "cohere_compass",
        "glm5_next",  # (decoding through its linear-attention and MLA caches)
    ],
)
def test_inspect_and_generate_image_text_checkpoint(name: str, capsys) -> None:
    """`mlxq inspect` and `mlxq generate` read an mlx-vlm checkpoint whose family transformers
    has no causal-LM class for (they asked AutoModelForCausalLM, and inspect reported a model
    that loads as one that cannot): inspect finds no problem, and generate's text (fp32, greedy,
    raw prompt) is mlx-vlm's greedy continuation."""
    from mlxq.cli import main
    from transformers import AutoTokenizer

    path = tiny_mlx_vlm_checkpoint(name)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "problems     none" in out and "AffineLinear" in out, out[-2000:]

    prompt, steps = "t5 t77 t300 t12", 4
    argv = ["generate", "--model", str(path), "--prompt", prompt, "--max-tokens", str(steps)]
    assert main([*argv, "--dtype", "float32", "--ignore-chat-template"]) == 0
    text = capsys.readouterr().out.splitlines()[0]
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(prompt)["input_ids"]
    sequence = list(ids)
    for _ in range(steps):  # mlx-vlm's greedy tokens, one full forward a step
        array = np.array([sequence], dtype=np.int64)
        inputs = {"input_ids": array, "attention_mask": np.ones_like(array)}
        token = int(mlx_vlm_logits(path, name, inputs)[-1].argmax())
        if token == tokenizer.eos_token_id:
            break
        sequence.append(token)
    assert text == tokenizer.decode(sequence[len(ids) :], skip_special_tokens=True)


@pytest.mark.parametrize(
    ("name", "text_class", "dropped"),
    [
        ("gemma3", "Gemma3ForCausalLM", ("vision_tower.", "multi_modal_projector.")),
        ("gemma4", "Gemma4ForCausalLM", ("vision_tower.", "embed_vision.")),
        # its MoE block: the experts saved as mlx-lm stacks them (`experts.switch_glu`)
        ("gemma4_moe", "Gemma4ForCausalLM", ("vision_tower.", "embed_vision.")),
    ],
)
def test_gemma_text_class_reads_the_language_model_as_mlx_lm_does(
    tmp_path: Path, name: str, text_class: str, dropped: tuple[str, ...]
) -> None:
    """Gemma3ForCausalLM / Gemma4ForCausalLM on mlx-vlm's checkpoint (language model and vision
    tower): the language model, the tower (and Gemma 4's image embedder) left out, as mlx-lm's
    gemma3 / gemma4 sanitize drops them. Its logits are mlx-lm's, and those of the image-text
    model on the same text; it saves as a text model. (mlx-lm reads the vocabulary size at the
    top level, default 262208 / 262144: the tiny model's is written there.)"""
    import transformers
    from mlx_models import mlx_lm_logits

    cls = getattr(transformers, text_class)
    path = tmp_path / name
    shutil.copytree(tiny_mlx_vlm_checkpoint(name), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["vocab_size"] = cfg["text_config"]["vocab_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    tokens = [2, 5, 77, 300, 12, 499, 3, 42]
    model = cls.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0].numpy()
    assert float(np.abs(got - mlx_lm_logits(path, tokens)).max()) <= TOLERANCE
    with torch.no_grad():
        full = _load(path)(torch.tensor([tokens])).logits[0].numpy()
    np.testing.assert_allclose(got, full, rtol=0, atol=1e-5)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    from mlxq.integrations.checkpoint import read_header

    names = read_header(saved / "model.safetensors")
    assert not any(k.startswith(dropped) for k in names)
    assert any(".experts.switch_glu." in k for k in names) == name.endswith("_moe")
    assert any(k.startswith(dropped) for k in read_header(path / "model.safetensors"))
    reloaded = cls.from_pretrained(saved, dtype=torch.float32)
    with torch.no_grad():
        again = reloaded(torch.tensor([tokens])).logits[0].numpy()
    np.testing.assert_array_equal(again, got)
    for file in path.iterdir():  # the tokenizer, which mlx-lm loads with the model
        if file.is_file() and not (saved / file.name).exists():
            shutil.copy(file, saved / file.name)
    assert float(np.abs(got - mlx_lm_logits(saved, tokens)).max()) <= TOLERANCE


@pytest.mark.parametrize(
    "variant",
    [
        Variant(tied=True, quantize_vision=True),
        Variant(tied=True, bits=3, group_size=32, recipe="mixed_3_6"),
        Variant(tied=True, recipe=VISION_MXFP4),
        Variant(tied=True, bits=8, group_size=32),
    ],
    ids=lambda v: v.tag,
)
def test_gemma4_variants(variant: Variant) -> None:
    """Gemma 4's quantized embedding serves the pad row Gemma4Model.forward reads of its table
    (and refuses the reverse lookup of inputs_embeds in the whole table, naming the module);
    a tower quantized by mlx-vlm runs with its patch embedder as a float layer (transformers'
    forward reads that layer's weight dtype), its clippable linears quantized."""
    from mlxq.nn import AffineEmbedding, AffineLinear, RowServingScaledAffineEmbedding
    from torch import nn

    outcome = run_family("gemma4", variant)
    assert outcome.status == "loads", outcome.line()
    assert outcome.text_diff <= TOLERANCE and outcome.image_diff <= TOLERANCE, outcome.line()
    model = _load(tiny_mlx_vlm_checkpoint("gemma4", variant))
    text = model.model.language_model
    assert type(text.embed_tokens) is RowServingScaledAffineEmbedding
    assert "serves rows to Gemma4Model.forward" in repr(text.embed_tokens)
    embeds = text.embed_tokens(torch.tensor([[5, 77, 300]]))
    with pytest.raises(NotImplementedError, match=r"get_per_layer_inputs uses the weight of embed"):
        text(inputs_embeds=embeds)
    if variant.bits == 8:  # group 32: the per-layer table (32 wide) is quantized too
        assert isinstance(text.embed_tokens_per_layer, AffineEmbedding)
    if not (variant.quantize_vision or variant.recipe == VISION_MXFP4):
        return
    tower = model.model.vision_tower
    assert type(tower.patch_embedder.input_proj) is nn.Linear
    q_proj = tower.encoder.layers[0].self_attn.q_proj.linear
    assert isinstance(q_proj, AffineLinear)
    assert q_proj.mode == ("mxfp4" if variant.recipe == VISION_MXFP4 else "affine")


@pytest.mark.parametrize(
    ("name", "on_load"),
    [
        ("qwen3_5", True),
        ("glm4v", True),
        ("glm_ocr", False),
        # mlx-vlm asks mlx-lm's Qwen 3.5 rule: the routers and shared-expert gates at 8 bits
        ("qwen3_5_moe", False),
        ("glm4v_moe", False),  # MoE experts: quantize_model
        ("mllama", True),
        ("cohere2_vision", True),
        ("paddleocr_vl", True),
        ("gemma4", True),
        ("granite4_vision", True),
        ("minicpmv4_6", False),
        ("minicpmv4_7", True),
        ("minicpmv4_7_moe", False),
        ("gemma4_unified", True),
        ("muse_glimmer", True),
        ("cohere_compass", True),
        ("glm5_next", False),  # MoE experts: quantize_model
    ],
)
def test_quantized_float_model_saves_what_mlx_vlm_convert_writes(
    tmp_path: Path, name: str, on_load: bool
) -> None:
    """A float image-text model quantized by mlxq (while loading, or by quantize_model) and
    saved is `mlx_vlm convert -q`'s checkpoint, tensor for tensor: mlx-vlm's names (before,
    transformers' names: mlx-vlm refused Mllama's `vision_model.*`, Cohere 2 Vision's tower
    without its `vision_model.` level, PaddleOCR-VL's split q/k/v), channels-last convolutions
    and Qwen 3.5's norms as 1 + w; mlx-vlm runs it as its own conversion. The modules
    mlx-vlm's rule keeps float (the towers) are named in modules_to_not_convert: mlxq
    quantizes every layer it is given."""
    import contextlib
    import io

    import mlxq
    from mlx_vlm import convert
    from mlxq.integrations.mlx_vlm_layout import VLM_LAYOUTS
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText
    from vlm_models import FAMILIES, tiny_float_checkpoint, variant_of

    float_dir = tiny_float_checkpoint(name, tmp_path / "float", variant_of(name).tied)
    ref_dir = tmp_path / "ref"
    fix = FAMILIES[name].convert_fix  # where mlx-vlm's convert fails on its own
    with contextlib.redirect_stdout(io.StringIO()), fix() if fix else contextlib.nullcontext():
        convert(str(float_dir), str(ref_dir), quantize=True, q_group_size=64, q_bits=4)
    ref = load_file(ref_dir / "model.safetensors")
    layout = VLM_LAYOUTS[FAMILIES[name].model_type]
    kept = sorted(  # the float linear layers of mlx-vlm's conversion, in the model's names
        part
        for k, v in ref.items()
        if k.endswith(".weight") and v.dim() == 2 and f"{k[:-7]}.scales" not in ref
        for part in layout.split_names(layout.to_transformers(k)[:-7])
    )
    quant = mlxq.MLXQuantConfig(bits=4, group_size=64, modules_to_not_convert=kept)
    if on_load:
        model = AutoModelForImageTextToText.from_pretrained(
            float_dir, dtype=torch.bfloat16, quantization_config=quant
        )
    else:
        model = AutoModelForImageTextToText.from_pretrained(float_dir, dtype=torch.bfloat16)
        mlxq.quantize_model(model, bits=4, group_size=64, modules_to_not_convert=kept)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    ours = load_file(saved / "model.safetensors")
    written = json.loads((saved / "config.json").read_text())["quantization"]
    want = json.loads((ref_dir / "config.json").read_text())["quantization"]
    # layers whose weight dtype the forward reads run float, and are saved so with an entry
    # that tells mlx-vlm (GLM-5-Next's indexer weights_proj, which mlx-vlm quantizes)
    floats = {k for k, v in written.items() if v is False and k not in want}
    ours = {k: v for k, v in ours.items() if k.rsplit(".", 1)[0] not in floats}
    ref = {k: v for k, v in ref.items() if k.rsplit(".", 1)[0] not in floats}
    assert sorted(ours) == sorted(ref)
    unequal = [k for k in ref if ours[k].dtype != ref[k].dtype or not torch.equal(ours[k], ref[k])]
    assert not unequal, unequal[:5]
    assert {k: v for k, v in written.items() if k not in floats} == want
    for file in ref_dir.iterdir():  # tokenizer and processor files
        if file.is_file() and not (saved / file.name).exists():
            shutil.copy(file, saved / file.name)
    inputs = model_inputs(ref_dir, name, with_image=True)
    np.testing.assert_array_equal(
        mlx_vlm_logits(saved, name, inputs), mlx_vlm_logits(ref_dir, name, inputs)
    )


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_5_moe", "mllama"])
def test_image_text_checkpoint_of_a_config_with_a_text_causal_lm(name: str, capsys) -> None:
    """transformers maps Qwen 3.5's and Mllama's image-text configs to a text-only causal LM
    (Qwen3_5ForCausalLM, MllamaForCausalLM): for mlx-vlm's checkpoint, which holds the vision
    tower too, `mlxq inspect` and `mlxq generate` build the image-text model (before, inspect
    reported the tower's tensors as ones the model has no place for, and generate refused the
    checkpoint); mlx-lm's conversion (the language model alone) still loads as the text model."""
    from mlxq.cli import main
    from mlxq.cli.common import load_model
    from mlxq.integrations.model_class import auto_model_class
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    path = tiny_mlx_vlm_checkpoint(name)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "problems     none" in out, out[-2000:]
    model, _, _ = load_model(str(path), "cpu", "float32")
    assert type(model) is type(_load(path))
    inputs = model_inputs(path, name, with_image=False)
    assert (
        float(
            np.abs(
                mlxq_logits(path, name, inputs, model) - mlx_vlm_logits(path, name, inputs)
            ).max()
        )
        <= TOLERANCE
    )
    config = AutoConfig.from_pretrained(path)
    assert auto_model_class(config, lambda: ["language_model.model.norm.weight"]) is (
        AutoModelForCausalLM
    )
    assert auto_model_class(config, lambda: ["vision_tower.x"]) is AutoModelForImageTextToText


def test_normed_embedding_dequantizes_to_a_module_mlxq_quantizes_again() -> None:
    """Muse Glimmer's word embedding (`embed_norm(super().forward(ids))`) runs as a quantized
    lookup then the model's own norm module; dequantized, it is a float embedding with that
    forward (the rows exact), which mlxq recognises again; an unknown override is refused."""
    from mlxq.dequantize_model import dequantize_model
    from mlxq.swap import swap_plan

    model = _load(tiny_mlx_vlm_checkpoint("muse_glimmer"))
    ids = torch.tensor([[5, 77, 300, 12]])
    embed = model.model.language_model.embed_tokens
    with torch.no_grad():
        want = embed(ids)
    dequantize_model(model)
    floated = model.model.language_model.embed_tokens
    assert type(floated) is not type(embed) and isinstance(floated, torch.nn.Embedding)
    with torch.no_grad():
        torch.testing.assert_close(floated(ids), want, rtol=0, atol=0)
    assert swap_plan("embed", floated).embed_norm is floated.embed_norm

    class Other(torch.nn.Embedding):
        def forward(self, input_ids):
            return super().forward(input_ids) + 1

    other = Other(8, 4)
    other.embed_norm = torch.nn.Identity()
    assert swap_plan("embed", other).refusal is not None


def _step3p7_float(out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForImageTextToText

    text = {"num_local_experts": 4, "n_routed_experts": 4, "moe_intermediate_size": 64}
    text.update(num_experts_per_tok=2, share_expert_dim=64, hidden_size=128, vocab_size=512)
    text.update(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    vision.update(num_attention_heads=2, image_size=56, patch_size=14, max_position_embeddings=16)
    config = AutoConfig.for_model(
        "step3p7", text_config=text, vision_config=vision, image_token_id=500
    )
    AutoModelForImageTextToText.from_config(config).save_pretrained(out)
    return out


def _muse_spark_float(out: Path) -> Path:
    from arch_models import tiny_float_checkpoint

    return tiny_float_checkpoint("muse_spark", out, tied=True)


def _nemotron_h_omni_float(out: Path) -> Path:
    from arch_models import ARCHS, BASE
    from transformers import AutoConfig, AutoModelForImageTextToText

    vision = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2)
    vision.update(intermediate_size=128, patch_size=16, image_size=64, video_temporal_patch_size=2)
    audio = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2)
    audio.update(intermediate_size=128, projection_hidden_size=128, projection_bias=False)
    config = AutoConfig.for_model(
        "nemotron_h_omni",
        text_config={**BASE, **ARCHS["nemotron_h"][0]},
        vision_config=vision,
        audio_config=audio,
        projector_hidden_size=128,
        vision_hidden_size=64,
        image_token_id=500,
    )
    AutoModelForImageTextToText.from_config(config).save_pretrained(out)
    return out


def _florence2_float(out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForImageTextToText

    text = dict(vocab_size=512, d_model=128, encoder_layers=2, decoder_layers=2)
    text.update(encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=128)
    text.update(encoder_attention_heads=4, decoder_attention_heads=4)
    vision = dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1])
    vision.update(patch_prenorm=[False, True], embed_dim=[32, 64], num_heads=[2, 4])
    vision.update(num_groups=[2, 4], window_size=4, projection_dim=128)
    vision.update(max_temporal_embeddings=4, max_position_embeddings=16)
    config = AutoConfig.for_model(
        "florence2", text_config=text, vision_config=vision, image_token_id=500
    )
    AutoModelForImageTextToText.from_config(config).save_pretrained(out)
    return out


def _molmo2_float(out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForImageTextToText

    heads = dict(num_attention_heads=2, num_key_value_heads=2, head_dim=32)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, **heads)
    vision.update(image_size=[56, 56], patch_size=14, num_position_embeddings=16)
    adapter = dict(vision_feature_layer=[-1, -2], hidden_size=64, intermediate_size=128)
    adapter.update(text_hidden_size=128, **heads)
    text = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    text.update(vocab_size=480, additional_vocab_size=32, num_hidden_layers=2)
    text.update(intermediate_size=256, max_position_embeddings=512)
    ids = ("image_start", "low_res_image_start", "image_end", "frame_start", "frame_end")
    config = AutoConfig.for_model(
        "molmo2",
        vision_config=vision,
        adapter_config=adapter,
        text_config=text,
        image_patch_id=500,
        **{f"{name}_token_id": 501 + i for i, name in enumerate(ids)},
    )
    AutoModelForImageTextToText.from_config(config).save_pretrained(out)
    return out


# refused by another rule: mlxq maps neither mlx-lm's nor mlx-vlm's Muse Spark (MLX_LM_UNCHECKED)
_REFUSED_AS_TEXT = {"muse_spark": r"model type 'muse_spark': .*nor mlx-vlm's"}


@pytest.mark.parametrize(
    ("model_type", "build"),
    [
        ("step3p7", _step3p7_float),
        ("nemotron_h_omni", _nemotron_h_omni_float),
        ("muse_spark", _muse_spark_float),
        ("florence2", _florence2_float),
        ("molmo2", _molmo2_float),
    ],
)
def test_family_without_a_converted_tiny_model_is_refused_by_name(
    tmp_path: Path, model_type: str, build
) -> None:
    """Image-text families that mlx-vlm runs and whose tiny model was not converted by it (see
    UNVERIFIED_VLM): transformers' tiny model with its tensors under mlx-vlm's top-level names
    (`language_model.model.*`, the towers without `model.`), written by MLX, with a 4-bit
    quantization block, is refused naming the family and why (before: a reason that said only
    that no tiny model was checked)."""
    from safetensors.torch import load_file, save_file

    path = build(tmp_path / model_type)
    tensors = {}
    for key, value in load_file(path / "model.safetensors").items():
        key = re.sub(r"^model\.language_model\.", "language_model.model.", key)
        key = re.sub(r"^lm_head\.", "language_model.lm_head.", key)
        tensors[re.sub(r"^model\.", "", key)] = value
    save_file(tensors, path / "model.safetensors", metadata={"format": "mlx"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization"] = cfg["quantization_config"] = {"group_size": 64, "bits": 4}
    (path / "config.json").write_text(json.dumps(cfg))
    if model_type in _REFUSED_AS_TEXT:
        with pytest.raises(NotImplementedError, match=_REFUSED_AS_TEXT[model_type]):
            _load(path)
        return
    reason = re.escape(UNVERIFIED_VLM[model_type][:60])
    with pytest.raises(ValueError, match=rf"model_type {model_type!r} is an image-text .*{reason}"):
        _load(path)


def test_qwen3_omni_moe_conversion_is_refused_by_name(capsys) -> None:
    """mlx-vlm's conversion of a tiny Qwen3-Omni-MoE (its towers' settings under
    thinker_config, none at the top) is refused naming the family and why, through its own
    class and AutoModelForMultimodalLM (before: loading crashed inside transformers with
    "`get_input_embeddings` not auto-handled", and no rule saw a vision tower); `mlxq inspect`
    names it too (before: AutoModelForCausalLM's "Unrecognized configuration class")."""
    from transformers import AutoModelForMultimodalLM, Qwen3OmniMoeForConditionalGeneration
    from vlm_models import tiny_mlx_vlm_omni_checkpoint

    path = tiny_mlx_vlm_omni_checkpoint()
    reason = re.escape(UNVERIFIED_VLM.get("qwen3_omni_moe", "")[:60])
    for auto in (Qwen3OmniMoeForConditionalGeneration, AutoModelForMultimodalLM):
        with pytest.raises(
            ValueError, match=rf"written by MLX .*model_type 'qwen3_omni_moe' is an .*{reason}"
        ):
            auto.from_pretrained(path, dtype=torch.float32)
    _assert_inspect_names(path, "qwen3_omni_moe", capsys)


def test_mlx_vlm_pixtral_conversion_is_refused_by_name(capsys) -> None:
    """mlx-vlm runs a LLaVA with a Pixtral tower under model_type 'pixtral', which transformers
    reads as PixtralVisionConfig (the tower alone): its tiny conversion is refused naming the
    family and why by the auto class mlxq's CLI picks (before: AutoModelForCausalLM's
    "Unrecognized configuration class PixtralVisionConfig") and by LlavaForConditionalGeneration
    (the image-text class that reads its config)."""
    from mlxq.cli import main
    from mlxq.integrations.model_class import auto_model_class
    from safetensors import safe_open
    from transformers import AutoConfig, LlavaForConditionalGeneration
    from vlm_models import tiny_mlx_vlm_pixtral_checkpoint

    path = tiny_mlx_vlm_pixtral_checkpoint()
    with safe_open(path / "model.safetensors", "np") as f:
        names = list(f.keys())
    reason = re.escape(UNVERIFIED_VLM.get("pixtral", "")[:60])
    with pytest.raises(
        ValueError, match=rf"model type 'pixtral': .*PixtralVisionConfig .*{reason}"
    ):
        auto_model_class(AutoConfig.from_pretrained(path), lambda: names)
    with pytest.raises(
        ValueError, match=rf"written by MLX .*model_type 'pixtral' is an .*{reason}"
    ):
        LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    _assert_inspect_names(path, "pixtral", capsys)
    argv = ["generate", "--model", str(path), "--prompt", "t5", "--max-tokens", "1"]
    assert main(argv) != 0
    assert re.search(rf"model type 'pixtral': .*{reason}", capsys.readouterr().err)


def _assert_inspect_names(path: Path, model_type: str, capsys) -> None:
    from mlxq.cli import main

    main(["inspect", str(path)])
    out = capsys.readouterr().out
    reason = re.escape(UNVERIFIED_VLM.get(model_type, "")[:60])
    assert re.search(rf"error: model type {model_type!r}: .*{reason}", out), out[-2000:]


# image-text model types of both libraries that are text models in mlx-vlm (transformers maps
# Mistral 4 to Mistral4ForCausalLM; mlx-vlm's package is a language model): tests/arch_models.py
_TEXT_MODELS = {"mistral4"}


def test_every_image_text_family_of_both_is_compared_or_refused_by_name() -> None:
    """Each model type that mlx-vlm runs (its packages and remapped names) and transformers
    maps to an image-text (or multimodal LM) class is a family compared with mlx-vlm here, one
    refused by name with its reason (UNVERIFIED_VLM, or another tested rule), or a text model
    compared with mlx-lm: a family new to either library fails here until it is checked
    (before: cohere_compass, qwen4_exp, glm5_next, step3p7, diffusion_gemma and
    nemotron_h_omni were none of these; qwen3_omni_moe, a multimodal LM only, was not looked
    at)."""
    import mlx_vlm.utils
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES,
    )

    # (multimodal LMs too: Qwen3-Omni-MoE has no image-text auto class)
    IMAGE_TEXT = {
        **MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        **MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES,
    }
    folder = Path(mlx_vlm.utils.__file__).parent / "models"
    types = {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
    types |= set(mlx_vlm.utils.MODEL_REMAPPING)
    checked = {f.model_type for f in FAMILIES.values()} | set(UNVERIFIED_VLM)
    checked |= set(_REFUSED_AS_TEXT) | _TEXT_MODELS
    assert sorted(t for t in types if t in IMAGE_TEXT and t not in checked) == []


def test_quantizing_a_float_qwen4_exp_without_entries_is_refused(tmp_path: Path) -> None:
    """mlx-vlm's Qwen4-Exp rule (8-bit routers and shared-expert gates, the n-gram embedding's
    shards at a fallback group of 32, an entry per shard) is not reproduced: quantize_model
    without entries refuses naming it (before: 4-bit routers, the embedding left float, saved
    as a checkpoint that is not mlx-vlm's conversion)."""
    import mlxq
    from transformers import AutoModelForImageTextToText
    from vlm_models import tiny_float_checkpoint, variant_of

    float_dir = tiny_float_checkpoint("qwen4_exp", tmp_path / "float", variant_of("qwen4_exp").tied)
    model = AutoModelForImageTextToText.from_pretrained(float_dir, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match=r"'qwen4_exp' by its own .*fallback_group_size"):
        mlxq.quantize_model(model, bits=4, group_size=64)


def test_qwen4_exp_greedy_decode_with_its_caches_is_mlx_vlm_s() -> None:
    """Qwen4-Exp generates through its caches (the n-gram context and convolution states of
    its PLE layer, the linear attention's, the indexer's compressed keys; 13 prompt tokens,
    past the token budget of 8): its greedy tokens are mlx-vlm's, one full forward a step.
    (Its tokenizer class ignores the tiny word-level vocabulary, so ids are given.)"""
    path = tiny_mlx_vlm_checkpoint("qwen4_exp")
    model = _load(path)
    ids, steps = [5, 77, 300, 12, 499, 3, 42, 250, 7, 128, 64, 9, 11], 6
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=steps, do_sample=False, eos_token_id=None
        )
    sequence = list(ids)
    for _ in range(steps):
        array = np.array([sequence], dtype=np.int64)
        inputs = {"input_ids": array, "attention_mask": np.ones_like(array)}
        sequence.append(int(mlx_vlm_logits(path, "qwen4_exp", inputs)[-1].argmax()))
    assert out[0, len(ids) :].tolist() == sequence[len(ids) :]


def test_missing_shard_of_a_sharded_table_is_refused(tmp_path: Path) -> None:
    """Qwen4-Exp's n-gram table without one of its shards is refused naming the table (the
    concatenation would otherwise build a shorter table than the model's)."""
    from safetensors.torch import load_file, save_file

    source = tiny_mlx_vlm_checkpoint("qwen4_exp")
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    tensors = load_file(broken / "model.safetensors")
    shard = "language_model.model.layers.0.ple.ple_embedding.ngram_embedding.shards.2"
    for leaf in ("weight", "scales", "biases"):
        del tensors[f"{shard}.{leaf}"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "mlx"})
    (broken / "model.safetensors.index.json").unlink(missing_ok=True)
    match = r"shards of .*ple_embedding\.ngram_embedding\.weight are not shards 0\.\.2"
    with pytest.raises(ValueError, match=match):
        _load(broken)


@pytest.mark.parametrize(
    ("name", "edit", "match"),
    [
        # transformers' Qwen3-VL-MoE text config takes the alias num_local_experts (2), mlx-vlm's
        # num_experts (4, the experts converted): before, refused by a shape error on the
        # experts' tensor that named no config key
        ("qwen3_vl_moe", {"num_local_experts": 2}, r"builds 2 experts, mlx-vlm reads num_experts"),
        # GLM-4.5V: transformers the alias num_local_experts, mlx-vlm n_routed_experts
        ("glm4v_moe", {"num_local_experts": 2}, r"mlx-vlm reads n_routed_experts \(4\)"),
        # Gemma 4's router reads top_k_experts from its config: before, loaded, then torch.topk
        # failed in the forward
        ("gemma4_moe", {"top_k_experts": 6}, "sets top_k_experts: 6, more experts per token"),
    ],
)
def test_vlm_moe_config_read_otherwise_is_refused_at_load(
    tmp_path: Path, name: str, edit: dict, match: str
) -> None:
    # the family's tiny MoE model (4 experts, 2 per token) converted by mlx-vlm, its text_config
    # edited
    with pytest.raises(ValueError, match=match):
        _load(_with_text_config(tmp_path, name, edit))


def _with_text_config(tmp_path: Path, name: str, edit: dict) -> Path:
    """A copy of the family's tiny mlx-vlm checkpoint with `edit` applied to its text_config."""
    path = tmp_path / name
    shutil.copytree(tiny_mlx_vlm_checkpoint(name), path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"].update(edit)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("name", "edit", "match"),
    [
        # Kimi K2.5's language model is mlx-vlm's DeepSeek V3, which reads moe_layer_freq (MoE
        # every n-th layer) and topk_method; transformers' ignores both: before, loaded as
        # transformers' model (MoE in every layer after the dense ones), not mlx-vlm's
        ("kimi_k25", {"moe_layer_freq": 2}, "sets text_config.moe_layer_freq: 2"),
        ("kimi_k25", {"topk_method": "greedy"}, "sets text_config.topk_method: 'greedy'"),
        # mlx-vlm's GLM-4.5V asserts noaux_tc; transformers' runs noaux_tc whatever the key says
        ("glm4v_moe", {"topk_method": "greedy"}, "sets text_config.topk_method: 'greedy'"),
    ],
)
def test_vlm_text_config_key_only_mlx_vlm_reads_is_refused(
    tmp_path: Path, name: str, edit: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        _load(_with_text_config(tmp_path, name, edit))


@pytest.mark.parametrize(("name", "default"), [("aya_vision", 0.0625), ("cohere_compass", 1.0)])
def test_logit_scale_is_applied_as_mlx_vlm_applies_it(
    tmp_path: Path, name: str, default: float
) -> None:
    """Cohere's logit_scale (0.5 here) scales mlxq's logits as mlx-vlm's, from the forward and
    from `generate` with sampling, also after save_pretrained, a pickle and dequantize_model.
    Before, Aya Vision (and Cohere 2 Vision, its module in mlx-vlm) gave logits 1/logit_scale
    times mlx-vlm's: transformers' image-text class leaves the scale out (max diff 3.07 at the
    default)."""
    import pickle

    from mlxq.dequantize_model import dequantize_model
    from transformers import AutoModelForImageTextToText

    source = tiny_mlx_vlm_checkpoint(name)
    path = tmp_path / "scaled"
    shutil.copytree(source, path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["logit_scale"] = 0.5
    (path / "config.json").write_text(json.dumps(config))
    inputs = model_inputs(path, name, with_image=True)
    expected = mlx_vlm_logits(path, name, inputs)
    # the oracle reads it (its logits scale with it), so 0.5 is a check of its own
    base = mlx_vlm_logits(source, name, inputs)
    np.testing.assert_allclose(expected, base * (0.5 / default), rtol=1e-4, atol=1e-4)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    assert np.abs(mlxq_logits(path, name, inputs, model) - expected).max() <= TOLERANCE
    family = FAMILIES[name]
    numpy_inputs = family.torch_inputs(inputs, model.config) if family.torch_inputs else inputs
    kwargs = {k: torch.from_numpy(v) for k, v in numpy_inputs.items()}
    kwargs["pixel_values"] = kwargs["pixel_values"].float()
    out = model.generate(
        **kwargs,
        do_sample=True,
        temperature=0.7,
        max_new_tokens=2,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert np.abs(out.logits[0][0].numpy() - expected[-1]).max() <= TOLERANCE
    restored = pickle.loads(pickle.dumps(model))
    assert np.abs(mlxq_logits(path, name, inputs, restored) - expected).max() <= TOLERANCE
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    for file in path.iterdir():  # tokenizer and processor files
        if file.is_file() and not (saved / file.name).exists():
            shutil.copy(file, saved / file.name)
    assert json.loads((saved / "config.json").read_text())["text_config"]["logit_scale"] == 0.5
    assert np.abs(mlx_vlm_logits(saved, name, inputs) - expected).max() <= TOLERANCE
    assert np.abs(mlxq_logits(saved, name, inputs) - expected).max() <= TOLERANCE
    dequantize_model(model)  # (for fine-tuning) the float head keeps the scale
    assert np.abs(mlxq_logits(path, name, inputs, model) - expected).max() <= TOLERANCE


@pytest.mark.parametrize("on_load", [True, False])
def test_quantized_float_aya_vision_runs_as_mlx_vlm_runs_its_save(
    tmp_path: Path, on_load: bool
) -> None:
    """A float Aya Vision quantized by mlxq (while loading, or by quantize_model) applies
    logit_scale as its saved checkpoint runs in mlx-vlm (and in mlxq once loaded again)."""
    import mlxq
    from transformers import AutoModelForImageTextToText
    from vlm_models import tiny_float_checkpoint

    name = "aya_vision"
    float_dir = tiny_float_checkpoint(name, tmp_path / "float", True)
    skip = ["vision_tower", "multi_modal_projector"]
    if on_load:
        quant = mlxq.MLXQuantConfig(bits=4, group_size=64, modules_to_not_convert=skip)
        model = AutoModelForImageTextToText.from_pretrained(
            float_dir, dtype=torch.float32, quantization_config=quant
        )
    else:
        model = AutoModelForImageTextToText.from_pretrained(float_dir, dtype=torch.float32)
        mlxq.quantize_model(model, bits=4, group_size=64, modules_to_not_convert=skip)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    for file in float_dir.iterdir():  # tokenizer and processor files
        if file.is_file() and not (saved / file.name).exists():
            shutil.copy(file, saved / file.name)
    inputs = model_inputs(saved, name, with_image=True)
    expected = mlx_vlm_logits(saved, name, inputs)
    assert np.abs(mlxq_logits(saved, name, inputs, model) - expected).max() <= TOLERANCE
