"""A float model quantized by mlxq with no per-module entries is what `mlx_lm convert -q`
writes for it: the model class's own rule (routers at 8 bits)."""

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
