"""Checkpoints written by `mlx_lm convert --q-mode mxfp4|nvfp4|mxfp8` (and a per-module recipe
mixing modes) load through transformers + mlxq and give mlx-lm's fp32 logits; save_pretrained
writes the same tensors back, which mlx-lm reads; quantize_model(mode=) is bit-exact with
mlx-lm's conversion.

Oracle: mlx-lm's forward pass on the tiny random models of tests/arch_models.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlxq
import numpy as np
import pytest
import torch
from arch_models import TOKENS, Variant, mlxq_logits, tiny_float_checkpoint, tiny_mlx_checkpoint
from mlx_models import mlx_lm_logits
from mlxq.nn import AffineEmbedding, AffineLinear
from safetensors.torch import load_file

TOLERANCE = 1e-3  # as tests/test_arch_coverage.py; measured: <= 5e-6 on llama and qwen3

VARIANTS = [
    Variant(tied=True, bits=4, group_size=32, mode="mxfp4"),
    Variant(tied=False, bits=4, group_size=16, mode="nvfp4"),
    Variant(tied=True, bits=8, group_size=32, mode="mxfp8"),
    # nvfp4 on top, down_proj in mxfp8, embeddings and head in affine 4-bit (per-module entries)
    Variant(tied=False, bits=4, group_size=16, mode="nvfp4", recipe="mixed_fp"),
]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.tag)
def test_matches_mlx_lm(arch: str, variant: Variant) -> None:
    path = tiny_mlx_checkpoint(arch, variant)
    ref = mlx_lm_logits(path, TOKENS)
    got = mlxq_logits(path, TOKENS)
    diff = float(np.abs(got - ref).max())
    print(f"\n{arch} {variant.tag}: max|diff| {diff:.2e}")
    assert diff <= TOLERANCE


def test_modules_hold_the_checkpoint_format() -> None:
    from transformers import AutoModelForCausalLM

    path = tiny_mlx_checkpoint("llama", VARIANTS[3])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, AffineLinear)
    assert layer.self_attn.q_proj.mode == "nvfp4" and layer.self_attn.q_proj.biases is None
    assert layer.self_attn.q_proj.scales.dtype == torch.uint8
    assert (layer.mlp.down_proj.mode, layer.mlp.down_proj.group_size) == ("mxfp8", 32)
    emb = model.get_input_embeddings()
    assert isinstance(emb, AffineEmbedding) and emb.mode == "affine" and emb.bits == 4


@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[3]], ids=lambda v: v.tag)
def test_save_pretrained_round_trip(tmp_path: Path, variant: Variant) -> None:
    from transformers import AutoModelForCausalLM

    path = tiny_mlx_checkpoint("llama", variant)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)  # as stored
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    before, after = _tensors(path), _tensors(saved)
    assert sorted(before) == sorted(after)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype, key
        assert torch.equal(after[key].view(torch.uint8), tensor.view(torch.uint8)), key
    block = json.loads((saved / "config.json").read_text())["quantization"]
    assert block == json.loads((path / "config.json").read_text())["quantization"]
    for file in path.iterdir():  # the tokenizer's files
        if not (saved / file.name).exists():
            (saved / file.name).write_bytes(file.read_bytes())
    np.testing.assert_allclose(
        mlx_lm_logits(saved, TOKENS), mlx_lm_logits(path, TOKENS), rtol=0, atol=0
    )


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_quantize_model_equals_mlx_lm_convert(tmp_path: Path, mode: str) -> None:
    """mlxq.quantize_model(mode=) on the float model writes mlx-lm's tensors bit for bit."""
    from transformers import AutoModelForCausalLM

    group_size, bits = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}[mode]
    variant = Variant(tied=True, bits=bits, group_size=group_size, mode=mode)
    ref_path = tiny_mlx_checkpoint("llama", variant)
    float_dir = tiny_float_checkpoint("llama", tmp_path / "float", tied=True)
    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.bfloat16)
    mlxq.quantize_model(model, mode=mode)
    model.save_pretrained(tmp_path / "ours")
    ours, ref = _tensors(tmp_path / "ours"), _tensors(ref_path)
    assert sorted(ours) == sorted(ref)
    for key, tensor in ref.items():
        assert torch.equal(ours[key].view(torch.uint8), tensor.view(torch.uint8)), key
    block = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization"]
    assert block == {"group_size": group_size, "bits": bits, "mode": mode}


def test_cli_convert_q_mode_equals_mlx_lm_convert(tmp_path: Path, capsys) -> None:
    """`mlxq convert --q-mode nvfp4` writes mlx_lm convert --q-mode nvfp4's tensors and block,
    and `mlxq inspect` reads the result without problems."""
    from mlxq.cli import main

    ref_path = tiny_mlx_checkpoint("llama", VARIANTS[1])
    float_dir = tiny_float_checkpoint("llama", tmp_path / "float", tied=False)
    assert main(["convert", str(float_dir), str(tmp_path / "ours"), "--q-mode", "nvfp4"]) == 0
    assert "nvfp4 4-bit group default (16)" in capsys.readouterr().out
    ours, ref = _tensors(tmp_path / "ours"), _tensors(ref_path)
    assert sorted(ours) == sorted(ref)
    for key, tensor in ref.items():
        assert torch.equal(ours[key].view(torch.uint8), tensor.view(torch.uint8)), key
    block = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization"]
    assert block == {"group_size": 16, "bits": 4, "mode": "nvfp4"}
    assert main(["inspect", str(tmp_path / "ours")]) == 0
    out = capsys.readouterr().out
    assert "4-bit g16 nvfp4" in out and "problems     none" in out
    assert main(["convert", str(float_dir), str(tmp_path / "x"), "--q-mode", "mxfp4",
                 "--recipe", "mixed_3_6"]) == 1  # fmt: skip
    assert "--q-mode affine only" in capsys.readouterr().err


def test_modules_without_entries_take_the_mode_their_tensors_show(tmp_path: Path) -> None:
    """The mixed-mode checkpoint less its per-module entries (nvfp4 on top, affine embeddings and
    head, mxfp8 down_proj): mlx-lm 0.32 reads each module's mode off its tensors (uint8 or float
    scales, bits and group size from the shapes) and gives the same logits as with the
    entries; mlxq too (it refused the affine embedding: "mode 'nvfp4' has no biases")."""
    import shutil

    source = tiny_mlx_checkpoint("qwen3", VARIANTS[3])
    folder = tmp_path / "no-entries"
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        config[key] = {k: v for k, v in config[key].items() if not isinstance(v, dict)}
    assert config["quantization"] == {"group_size": 16, "bits": 4, "mode": "nvfp4"}
    (folder / "config.json").write_text(json.dumps(config))
    ref = mlx_lm_logits(folder, TOKENS)
    np.testing.assert_array_equal(ref, mlx_lm_logits(source, TOKENS))
    got = mlxq_logits(folder, TOKENS)
    np.testing.assert_array_equal(got, mlxq_logits(source, TOKENS))
    assert float(np.abs(got - ref).max()) <= TOLERANCE


# Gemma's scaled embedding in a float mode. MLX looks a float-mode table up in bfloat16 and
# mlx-lm's Gemma multiplies those rows by sqrt(hidden) in bfloat16 even in a float32 model; mlxq
# multiplied in float32 (measured before: 6.5e-3, 8.7e-3 and 9.6e-3 off mlx-lm's logits)
SCALED = [
    ("gemma3_text", Variant(tied=True, bits=4, group_size=32, mode="mxfp4")),
    ("gemma3_text", Variant(tied=False, bits=4, group_size=16, mode="nvfp4")),
    ("gemma2", Variant(tied=True, bits=8, group_size=32, mode="mxfp8")),
]


@pytest.mark.parametrize(("arch", "variant"), SCALED, ids=lambda v: getattr(v, "tag", v))
def test_scaled_float_mode_embedding_rounds_as_mlx_lm(arch: str, variant: Variant) -> None:
    from mlxq.nn import ScaledAffineEmbedding
    from transformers import AutoModelForCausalLM

    path = tiny_mlx_checkpoint(arch, variant)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    emb = model.get_input_embeddings()
    assert isinstance(emb, ScaledAffineEmbedding) and emb.mode == variant.mode
    ids = torch.tensor([TOKENS])
    rows = AffineEmbedding.forward(emb, ids)  # exact in bfloat16, as MLX returns them
    assert rows.dtype == torch.float32 and torch.equal(rows, rows.bfloat16().float())
    scale = torch.tensor(emb.embed_scale, dtype=torch.bfloat16)
    with torch.no_grad():
        got = emb(ids)
    assert got.dtype == torch.float32 and torch.equal(got, (rows.bfloat16() * scale).float())
    diff = float(np.abs(mlxq_logits(path, TOKENS) - mlx_lm_logits(path, TOKENS)).max())
    print(f"\n{arch} {variant.tag}: max|diff| {diff:.2e}")  # measured: 1.7e-6 to 2.4e-6
    assert diff <= TOLERANCE
