"""Float checkpoints written by mlx-lm: `mlx_lm convert` without `-q`, and `convert -d` of a
quantized one. They have no quantization block but keep mlx-lm's tensor layout (stacked
experts `switch_mlp.*`, DeepSeek's `embed_q`/`unembed_out`, GPT-2's `model.*` names, Mamba's
channels-last convolutions), which transformers' loader took for missing and unexpected keys
and filled with random weights (logits 1.9 to 5.3 off mlx-lm's, a warning table at most) or
refused with a size mismatch. mlxq reads them as MLX checkpoints with every module float.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from arch_models import TOKENS, Variant, _cache_key, _cached_conversion, mlxq_logits
from mlx_models import mlx_lm_logits

TOLERANCE = 1e-3  # as tests/test_arch_coverage.py; measured 2.1e-6 to 5.3e-6


def _float_mlx(src: str, out: str, **_) -> None:
    from mlx_lm import convert

    convert(src, out, dtype="bfloat16")  # no -q


def _dequantized_mlx(src: str, out: str, **_) -> None:
    from mlx_lm import convert

    quantized = f"{out}-q"
    shutil.rmtree(quantized, ignore_errors=True)
    convert(src, quantized, quantize=True, q_group_size=64, q_bits=4)
    try:
        convert(quantized, out, dequantize=True)
    finally:
        shutil.rmtree(quantized, ignore_errors=True)


WRITERS = {"float": _float_mlx, "dequantized": _dequantized_mlx}


def float_mlx_checkpoint(arch: str, tied: bool, how: str = "float") -> Path:
    variant = Variant(tied=tied)
    key = f"{_cache_key(arch, variant)}-{how}-mlx"
    return _cached_conversion(key, arch, variant, lambda folder: None, WRITERS[how])


CASES = [
    ("qwen3_moe", True, "float"),  # switch_mlp stacks
    ("deepseek_v3", False, "float"),  # embed_q / unembed_out and experts
    ("gpt2", True, "float"),  # mlx-lm's names
    ("mamba", True, "float"),  # channels-last conv1d (was: size mismatch)
    ("qwen3_moe", True, "dequantized"),  # mlx_lm convert -d
]


@pytest.mark.parametrize(("arch", "tied", "how"), CASES)
def test_float_mlx_checkpoint_matches_mlx_lm(arch: str, tied: bool, how: str) -> None:
    path = float_mlx_checkpoint(arch, tied, how)
    config = json.loads((path / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    diff = float(np.abs(mlxq_logits(path, TOKENS) - mlx_lm_logits(path, TOKENS)).max())
    print(f"\n{arch} {how}: max|diff| {diff:.2e}")
    assert diff <= TOLERANCE


def test_float_mlx_checkpoint_inspects_and_saves_for_mlx_lm(tmp_path: Path) -> None:
    from mlxq.inspect_checkpoint import inspect_checkpoint
    from mlxq.moe import AffineSwitchLinear
    from mlxq.nn import AffineEmbedding, AffineLinear
    from transformers import AutoModelForCausalLM

    path = float_mlx_checkpoint("qwen3_moe", True)
    report = inspect_checkpoint(path, str(path))
    assert report.problems == [], report.problems  # (before: 6 tensors "the model does not use")
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16  # as stored
    quantized = (AffineLinear, AffineEmbedding, AffineSwitchLinear)
    assert not any(isinstance(m, quantized) for m in model.modules())
    model.save_pretrained(tmp_path)
    for file in path.glob("tokenizer*"):
        shutil.copy(file, tmp_path / file.name)
    np.testing.assert_array_equal(mlx_lm_logits(tmp_path, TOKENS), mlx_lm_logits(path, TOKENS))


def test_quantization_config_argument_still_quantizes_on_load() -> None:
    # the block mlxq reads such a folder with does not take the place of the caller's
    import mlxq
    from mlxq.nn import AffineLinear
    from transformers import AutoModelForCausalLM

    path = float_mlx_checkpoint("llama", True)
    config = mlxq.MLXQuantConfig(bits=3, group_size=32)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=config
    )
    layers = [m for m in model.modules() if isinstance(m, AffineLinear)]
    assert len(layers) == 14 and {(m.bits, m.group_size) for m in layers} == {(3, 32)}


def test_float_mlx_checkpoint_trains_without_adapters(tmp_path: Path) -> None:
    # nothing in it is quantized: transformers' Trainer may fine-tune every weight (a float
    # checkpoint loaded by transformers alone could be, where its layout let it load)
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(
        float_mlx_checkpoint("qwen3_moe", True), dtype=torch.float32
    )
    before = model.lm_head.weight.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=1,
        max_steps=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    row = torch.as_tensor(TOKENS)
    Trainer(model=model, args=args, train_dataset=[{"input_ids": row, "labels": row}]).train()
    assert not torch.equal(model.lm_head.weight, before)
