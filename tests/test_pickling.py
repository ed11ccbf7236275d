"""Whole-model pickling (`torch.save(model)` / `torch.load(..., weights_only=False)`, and
`copy.deepcopy`) of models loaded by mlxq: the loaded-back model gives identical logits."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch

ARCH_CASES = [  # (arch, tied, bits, group, mode): dense, MoE, float mode
    ("llama", True, 4, 64, "affine"),
    ("qwen3_moe", False, 4, 64, "affine"),
    ("llama", False, 4, 16, "nvfp4"),
]
VLM_CASES = ["llava", "qwen3_vl_moe", "gemma4"]


def _features(model) -> list:
    """What mlxq set up on each module: its class, config classes, flat decode plans (with a
    native step), bound forwards, row-serving embeddings; a copy must keep all of it."""
    from transformers import PreTrainedConfig

    configs = [
        model.config,
        *(v for v in vars(model.config).values() if isinstance(v, PreTrainedConfig)),
    ]
    out = [(type(c).__module__, type(c).__qualname__, c.to_dict()) for c in configs]
    for name, module in model.named_modules():
        state = vars(module)
        plan = state.get("_mlxq_flat_plan")
        forward = state.get("forward")
        out.append(
            (
                name,
                type(module).__qualname__,
                plan is not None and plan.native is not None and plan.intact(),
                getattr(forward, "__func__", forward).__name__ if forward else None,
                tuple(sorted(state.get("_row_readers", {}).values())),
            )
        )
    return out


def _round_trip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _arch_model(arch, tied, bits, group, mode):
    from arch_models import Variant, causal_lm_class, tiny_mlx_checkpoint

    path = tiny_mlx_checkpoint(arch, Variant(tied=tied, bits=bits, group_size=group, mode=mode))
    return causal_lm_class(arch).from_pretrained(path, dtype=torch.float32)


def _text_logits(model) -> np.ndarray:
    tokens = torch.tensor([[1, 40, 200, 31, 7, 99, 123, 5]])
    with torch.no_grad():
        return model(tokens).logits[0].float().numpy()


@pytest.mark.parametrize(("arch", "tied", "bits", "group", "mode"), ARCH_CASES)
def test_text_model_pickles(arch, tied, bits, group, mode) -> None:
    model = _arch_model(arch, tied, bits, group, mode)
    want = _text_logits(model)
    features = _features(model)
    assert any(f[2] for f in features[1:]) == (arch == "llama" and mode == "affine")  # flat plans
    for copied in (_round_trip(model), copy.deepcopy(model)):
        assert _features(copied) == features
        np.testing.assert_array_equal(_text_logits(copied), want)
    np.testing.assert_array_equal(_text_logits(model), want)  # the original is untouched


@pytest.mark.parametrize("name", VLM_CASES)
def test_image_text_model_pickles(name: str) -> None:
    from transformers import AutoModelForImageTextToText
    from vlm_models import mlxq_logits, model_inputs, tiny_mlx_vlm_checkpoint, variant_of

    path: Path = tiny_mlx_vlm_checkpoint(name, variant_of(name))
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    # copied before the first forward: that installs transformers' output-capturing hooks,
    # local functions that do not pickle (transformers' own models alike)
    copies = (_round_trip(model), copy.deepcopy(model))
    features = _features(model)
    if name == "gemma4":  # its embedding serves rows to the model's code
        assert any(f[4] for f in features if isinstance(f, tuple) and len(f) == 5)
    inputs = model_inputs(path, name, with_image=True)
    want = mlxq_logits(path, name, inputs, model=model)
    for copied in copies:
        assert _features(copied) == features
        np.testing.assert_array_equal(mlxq_logits(path, name, inputs, model=copied), want)
