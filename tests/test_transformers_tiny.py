"""Tiny random models of other architectures (Qwen3, Qwen2): untied quantized heads, float
biases, layers mlx-lm leaves in float, quantize_model and the save round trip into mlx-lm."""

from __future__ import annotations

import json
from pathlib import Path

import mlxq
import numpy as np
import pytest
import torch
from mlx_models import greedy_tokens, mlx_lm_logits, tiny_float_model, tiny_mlx_checkpoint
from mlxq.nn import AffineEmbedding, AffineLinear
from safetensors import safe_open


def _load(path: Path, dtype: torch.dtype = torch.float32, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)


def _logits(model, tokens: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(tokens[None]).logits[0].float().numpy()


def _assert_matches_mlx_lm(model, path: Path, prompt: torch.Tensor) -> float:
    """Greedy tokens equal mlx-lm's (teacher forcing) and fp32 logits close; returns max diff."""
    sequence = greedy_tokens(model, prompt, 16)
    ref = mlx_lm_logits(path, sequence.numpy())
    got = _logits(model, sequence)
    diff = float(np.abs(got - ref).max())
    assert diff < 1e-3 * max(1.0, float(np.abs(ref).max())), diff
    want = ref.argmax(-1)[len(prompt) - 1 : -1]
    assert np.array_equal(want, sequence[len(prompt) :].numpy())
    return diff


@pytest.mark.parametrize(("arch", "bits", "group_size"), [("qwen3", 4, 128), ("qwen2", 3, 64)])
def test_untied_mlx_checkpoint_matches_mlx_lm(arch: str, bits: int, group_size: int) -> None:
    path = tiny_mlx_checkpoint(arch, bits, group_size)
    model = _load(path)
    assert isinstance(model.lm_head, AffineLinear)  # untied and quantized
    assert isinstance(model.model.embed_tokens, AffineEmbedding)
    layer = model.model.layers[0]
    if arch == "qwen3":
        # K=192 does not divide 128: mlx-lm kept down_proj float and wrote no config entry
        assert type(layer.mlp.down_proj) is torch.nn.Linear
        assert (
            "model.layers.0.mlp.down_proj"
            not in json.loads((path / "config.json").read_text())["quantization"]
        )
    else:
        assert layer.self_attn.q_proj.bias is not None  # float bias next to quantized weight
    prompt = torch.tensor([1, 400, 2000, 31, 7, 99, 1234, 5])
    diff = _assert_matches_mlx_lm(model, path, prompt)
    print(f"\n[tiny {arch} {bits}-bit g{group_size}] max |logits - mlx-lm| = {diff:.2e}")


def test_quantize_model_is_bit_exact_with_mlx_lm_convert(tmp_path: Path) -> None:
    path = tiny_mlx_checkpoint("qwen3", 4, 128)
    float_dir = tiny_float_model("qwen3", tmp_path / "float")
    model = _load(float_dir, dtype=torch.bfloat16)  # mlx-lm converts in the config's bf16
    assert mlxq.quantize_model(model, bits=4, group_size=128) is model
    ours = model.state_dict()
    with safe_open(path / "model.safetensors", "pt") as ref:
        assert set(ref.keys()) == set(ours)
        for key in ref.keys():
            assert torch.equal(ref.get_tensor(key), ours[key]), key


def test_quantize_model_overrides_and_save_round_trip_into_mlx_lm(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    float_dir = tiny_float_model("qwen2", tmp_path / "float")
    model = _load(float_dir)
    overrides = {
        "model.layers.0.mlp.down_proj": {"bits": 8, "group_size": 32},
        "model.layers.1.self_attn.o_proj": False,
    }
    mlxq.quantize_model(model, bits=4, group_size=64, overrides=overrides)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, AffineLinear) and (down.bits, down.group_size) == (8, 32)
    assert type(model.model.layers[1].self_attn.o_proj) is torch.nn.Linear
    assert isinstance(model.lm_head, AffineLinear)

    saved = tmp_path / "mlx"
    model.save_pretrained(saved)
    AutoTokenizer.from_pretrained(float_dir).save_pretrained(saved)
    config = json.loads((saved / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine", **overrides}

    from mlx_lm import load

    mlx_model, _ = load(str(saved))
    mlx_layers = mlx_model.model.layers
    assert mlx_layers[0].mlp.down_proj.bits == 8
    assert not hasattr(mlx_layers[1].self_attn.o_proj, "bits")  # float in mlx-lm too
    prompt = torch.tensor([3, 14, 159, 2653, 5, 8979])
    _assert_matches_mlx_lm(model, saved, prompt)

    # and transformers loads its own save back (quant_method "mlx" is in the config now)
    again = _load(saved)
    torch.testing.assert_close(
        torch.from_numpy(_logits(again, prompt)), torch.from_numpy(_logits(model, prompt))
    )


def test_explicit_config_quantizes_a_float_checkpoint(tmp_path: Path) -> None:
    float_dir = tiny_float_model("qwen3", tmp_path / "float")
    config = mlxq.MLXQuantConfig(bits=6, group_size=32, overrides={"lm_head": False})
    model = _load(float_dir, quantization_config=config)
    assert isinstance(model.model.layers[1].mlp.up_proj, AffineLinear)
    assert model.model.layers[1].mlp.up_proj.bits == 6
    assert type(model.lm_head) is torch.nn.Linear
    reference = mlxq.quantize_model(_load(float_dir), 6, 32, overrides={"lm_head": False})
    tokens = torch.tensor([5, 6, 7, 8])
    np.testing.assert_array_equal(_logits(model, tokens), _logits(reference, tokens))


def test_dequantize_gives_float_modules() -> None:
    model = _load(tiny_mlx_checkpoint("qwen3", 4, 128))
    tokens = torch.tensor([5, 6, 7, 8])
    before = _logits(model, tokens)
    model.dequantize()
    assert not any(isinstance(m, (AffineLinear, AffineEmbedding)) for m in model.modules())
    np.testing.assert_allclose(_logits(model, tokens), before, rtol=1e-4, atol=1e-4)
    # for fine-tuning: the float weights train
    assert model.model.layers[1].mlp.up_proj.weight.requires_grad
    assert model.model.embed_tokens.weight.requires_grad


def test_image_text_checkpoint_with_mlx_vlm_names(tmp_path: Path) -> None:
    """An image-text model whose checkpoint uses the legacy names mlx-vlm writes
    (`language_model.model.*`, `vision_tower.*`) loads through AutoModelForImageTextToText."""
    from safetensors.torch import save_file
    from transformers import (
        AutoModelForImageTextToText,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
        projection_dim=64,
    )
    text = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=1000, tie_word_embeddings=False
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    # the tower quantized too (mlx-vlm's rule keeps it float: entries name its layers)
    tower = {
        name: {"bits": 4, "group_size": 64}
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".vision_tower." in f".{name}"
    }
    model = mlxq.quantize_model(model, 4, 64, overrides=tower)
    legacy = (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    )
    tensors = {}
    for key, value in model.state_dict().items():
        for new, old in legacy:
            if key.startswith(new):
                key = old + key[len(new) :]
                break
        tensors[key] = value.contiguous()
    assert "language_model.model.layers.0.self_attn.q_proj.scales" in tensors
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "mlx"})
    raw = model.config.to_dict()
    raw.pop("quantization_config")  # as mlx-vlm writes it: only the MLX block
    (tmp_path / "config.json").write_text(json.dumps(raw))

    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32)
    assert isinstance(loaded.model.language_model.layers[0].mlp.up_proj, AffineLinear)
    assert isinstance(loaded.model.vision_tower.encoder.layers[0].mlp.fc1, AffineLinear)
    assert isinstance(loaded.lm_head, AffineLinear)
    ids = torch.tensor([[5, 1000, 1000, 1000, 1000, 9, 11]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model(input_ids=ids, pixel_values=pixels).logits
        got = loaded(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(got, want)
