"""Checkpoints written by mlx-lm's other quantization tools (mlx_lm.quant.*), cached.

`mlx_lm convert` is not the only writer users bring: `mlx_lm.quant.dynamic_quant` (per-layer
bits from sensitivities), `awq`, `gptq` and `dwq` (trained scales and biases) each write their
own config and tensors. Their `main()`s download calibration text or a Hub dataset, so each
tool's own functions run here on random tokens over a tiny random model, then mlx-lm's `save`
writes the folder exactly as the tool's `main()` does. Cached like tests/mlx_models.py's
conversions, keyed by the tool, the inputs and the versions of transformers and mlx-lm.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
from pathlib import Path

from mlx_models import TEST_CACHE, tiny_float_model

TOOLS = ("dynamic_quant", "awq", "gptq", "dwq")
# DeepSeek V2 with experts (SwitchLinear) and a router; q_lora_rank None: AWQ's deepseek_v2
# recipe scales q_proj (DeepSeek-V2-Lite's attention)
MOE_ARCHS = {"deepseek_v2": {"q_lora_rank": None}}
# image-text families whose language model mlx-lm quantizes (AWQ's lm_key "language_model"):
# checkpoints under `language_model.`, read by this text class (tests/vlm_models.py's models)
IMAGE_TEXT_CLASS = {"gemma3": "Gemma3ForCausalLM"}


def _random_tokens(n: int, length: int, seed: int, vocab: int = 4096):
    import mlx.core as mx

    mx.random.seed(seed)
    # any ids will do: low ones, so that a large vocabulary's rare rows stay untouched
    return mx.random.randint(0, min(vocab, 4096), (n, length)).astype(mx.int32)


def _load(src: Path, **kwargs):
    """mlx-lm's `load`; a MoE model runs the tool in float32 (MLX's CPU gather_mm takes float32
    only) and is cast back to bf16 when saved, as its checkpoint has it from a Mac."""
    import mlx.core as mx
    from mlx_lm.utils import load

    model, tokenizer, config = load(str(src), return_config=True, **kwargs)
    if config["model_type"] in MOE_ARCHS:
        model.set_dtype(mx.float32)
    return model, tokenizer, config


def _save(dst: Path, src: Path, model, tokenizer, config) -> None:
    import mlx.core as mx
    from mlx_lm.utils import save

    if config["model_type"] in MOE_ARCHS:
        model.set_dtype(mx.bfloat16)
    save(dst, src, model, tokenizer, config)


def _dynamic_quant(src: Path, dst: Path) -> None:
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities, estimate_threshold
    from mlx_lm.utils import quantize_model

    model, tokenizer, config = _load(src)
    data = _random_tokens(4, 64, 0, config["vocab_size"])
    low, high = (4, 64), (8, 32)  # another bits and group size for the sensitive layers
    sens = dict(estimate_sensitivities(model, data, *low, *high))
    threshold = estimate_threshold(model, sens, 5.0, *low, *high)

    def predicate(p, m):  # dynamic_quant.main's quant_predicate
        if not hasattr(m, "to_quantized"):
            return False
        if sens[p] > threshold:
            return {"bits": high[0], "group_size": high[1]}
        return True

    model, config = quantize_model(
        model, config, group_size=low[1], bits=low[0], quant_predicate=predicate
    )
    _save(dst, src, model, tokenizer, config)


def _awq(src: Path, dst: Path) -> None:
    from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config

    model, tokenizer, config = _load(src, lazy=True)
    awq_quantize(
        model,
        _random_tokens(8, 64, 1, config["vocab_size"]),
        AWQ_MODEL_CONFIGS[config["model_type"]],
        bits=3,
        group_size=64,
        embed_bits=4,
        embed_group_size=32,
        n_grid=4,
    )
    _save(dst, src, model, tokenizer, update_config(model, config))


def _gptq(src: Path, dst: Path, bits: int = 4) -> None:
    from mlx_lm.quant.gptq import gptq_quantize

    model, tokenizer, config = _load(src, lazy=True)
    model, config["quantization"] = gptq_quantize(
        model, _random_tokens(8, 64, 2, config["vocab_size"]), bits, 64, 6, 64
    )
    _save(dst, src, model, tokenizer, config)


def _dwq(src: Path, dst: Path) -> None:
    import mlx.optimizers as optimizers
    import numpy as np
    from mlx_lm.quant.dwq import dwq_quantize
    from mlx_lm.utils import quantize_model

    np.random.seed(3)
    model, tokenizer, config = _load(src)
    q_model = copy.deepcopy(model)
    # a mixed student (as `--quantized-model` takes one): DWQ trains only the layers below 8 bits
    _, config = quantize_model(
        q_model,
        config,
        group_size=64,
        bits=4,
        quant_predicate=lambda p, m: (
            {"bits": 8, "group_size": 32} if p.endswith(("v_proj", "down_proj")) else True
        ),
    )
    tokens = np.array(_random_tokens(6, 17, 3, config["vocab_size"]))
    data = [(list(map(int, row)), 0) for row in tokens]
    # a large learning rate, so that the trained scales and biases move off mx.quantize's grid
    opt = optimizers.Adam(learning_rate=1e-3, bias_correction=True)
    dwq_quantize(q_model, lambda b, i, split: model(b), opt, data[:4], data[4:], 2, 16, 3)
    _save(dst, src, q_model, tokenizer, config)


_WRITERS = {"dynamic_quant": _dynamic_quant, "awq": _awq, "gptq": _gptq, "dwq": _dwq}
# GPTQ at the other ends of its bit range (its linears at 2 / 8 bits; the embedding at 6)
_WRITERS |= {f"gptq{b}": functools.partial(_gptq, bits=b) for b in (2, 8)}
# DWQ trains in bf16 and writes what it trained (scales, biases, norms) so, whatever the
# model's dtype: from a float16 model, its 8-bit layers keep float16 scales and the rest is bf16
_FLOAT_DTYPE = {"dwq": "float16"}


def quant_tool_checkpoint(tool: str, arch: str = "qwen3") -> Path:
    """A tiny random `arch` model (tests/mlx_models.py's TINY_ARCHS, an image-text family of
    :data:`IMAGE_TEXT_CLASS`, else tests/arch_models.py's untied one) quantized by
    mlx_lm.quant.`tool` (cached)."""
    from mlx_models import TINY_ARCHS
    from mlxq.demo_model import _versions

    final = TEST_CACHE / "models" / f"quant-{tool}-{arch}-{_versions('transformers', 'mlx-lm')}"
    if (final / "config.json").is_file():
        return final
    staging = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if arch in TINY_ARCHS:
            src = tiny_float_model(arch, staging / "float")
        elif arch in IMAGE_TEXT_CLASS:
            src = _image_text_float(arch, staging / "float")
        else:
            from arch_models import tiny_float_checkpoint

            src = tiny_float_checkpoint(
                arch, staging / "float", tied=False, **MOE_ARCHS.get(arch, {})
            )
        if (dtype := _FLOAT_DTYPE.get(tool)) is not None:
            _recast(src, dtype)
        _WRITERS[tool](src, staging / "out")
        os.replace(staging / "out", final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _recast(folder: Path, dtype: str) -> None:
    import json

    import torch
    from safetensors.torch import load_file, save_file

    for f in folder.glob("*.safetensors"):
        tensors = {k: v.to(getattr(torch, dtype)) for k, v in load_file(f).items()}
        save_file(tensors, f, metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def _image_text_float(family: str, out: Path) -> Path:
    import json

    from vlm_models import tiny_float_checkpoint

    src = tiny_float_checkpoint(family, out, tied=True)
    config = json.loads((src / "config.json").read_text())
    config["vocab_size"] = config["text_config"]["vocab_size"]  # mlx-lm's gemma3 reads it here
    (src / "config.json").write_text(json.dumps(config))
    return src
