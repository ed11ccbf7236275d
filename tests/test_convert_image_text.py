"""mlx-vlm's mixed recipes (`mlx_vlm convert -q --quant-predicate mixed_3_6` ...: group 64,
embed_tokens at the high width, its predicate in place of the model's) through
`quantize_model`: the same tensors (names, dtypes, values) and `quantization` block.
The oracles are tests/vlm_models.py's tiny models converted by mlx-vlm 0.7.10 (cached).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


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


def test_what_mlx_vlm_does_not_write_is_refused_by_name() -> None:
    """Where mlx-vlm writes no such checkpoint mlxq refuses by name: Idefics 2's recipe
    (mlx-vlm's model has no `layers`); a recipe mlx-lm lacks for a text model."""
    from mlxq.convert import recipe_overrides
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from vlm_models import transformers_config

    with torch.device("meta"):
        idefics2 = AutoModelForImageTextToText.from_config(transformers_config("idefics2"))
    with pytest.raises(NotImplementedError, match="Idefics 2 model has no `layers`"):
        recipe_overrides(idefics2, "mixed_3_6", 64)
    with torch.device("meta"):
        text = AutoModelForCausalLM.from_config(transformers_config("llava").text_config)
    with pytest.raises(ValueError, match="mixed_3_5.*image-text models only"):
        recipe_overrides(text, "mixed_3_5", 64)
