"""The dtype an MLX checkpoint loads in without `dtype=`: mlx-lm 0.32's `load` casts nothing
(each tensor runs as its file stores it, whatever config.json says) and `mlx_lm convert` casts
a float checkpoint's tensors to config.json's `torch_dtype` only (no key: each keeps its own).
Measured with mlx-lm 0.32.2 on the tiny model below: a float checkpoint loads its stored
dtypes with or without `torch_dtype`; converted without `torch_dtype`, its fp32 norms stay
fp32 beside bf16 scales; converted with `--dtype float16`, config.json still says bfloat16.
transformers loads in config.json's `dtype`: bf16 for both (fp32 norms and fp16 scales
rounded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from arch_models import tiny_tokenizer
from safetensors.torch import load_file, save_file

TOKENS = np.array([1, 5, 9, 33, 7, 100, 4, 250], dtype=np.int32)


def _float_checkpoint(out: Path, fp32_norms: bool) -> Path:
    """A tiny bf16 Llama saved by transformers 5 (config.json: `dtype`, no `torch_dtype`), its
    norms stored in fp32 (values off the bf16 grid) where `fp32_norms`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
        rope_theta=10000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08) if p.dim() >= 2 else p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    tiny_tokenizer(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and "torch_dtype" not in cfg
    cfg["rope_theta"] = 10000.0  # mlx-lm reads the top-level key
    (out / "config.json").write_text(json.dumps(cfg))
    if fp32_norms:
        tensors = load_file(out / "model.safetensors")
        for k in [k for k in tensors if "norm" in k]:
            tensors[k] = tensors[k].float() + torch.randn(tensors[k].shape) * 1e-3
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _mlx_lm(path: Path):
    """mlx-lm's model: its tensors' dtypes by name and its logits (its own dtypes, and cast to
    float32)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load

    model, _ = load(str(path))
    dtypes = {
        k: str(v.dtype).removeprefix("mlx.core.") for k, v in tree_flatten(model.parameters())
    }
    native = np.array(model(mx.array(TOKENS[None]))[0].astype(mx.float32))
    model.set_dtype(mx.float32)
    return dtypes, native, np.array(model(mx.array(TOKENS[None]))[0])


def _ours(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    with torch.no_grad():
        logits = model(torch.as_tensor(TOKENS, dtype=torch.long)[None]).logits[0]
    return model, logits.float().numpy()


def test_fp32_norms_beside_bf16_scales_load_in_float32(tmp_path: Path) -> None:
    """mlx_lm convert of a float checkpoint without `torch_dtype` keeps its fp32 norms; mlx-lm
    runs them in fp32 (promoting the activations). mlxq loaded bf16 (config.json's `dtype`),
    rounding them: now float32, each stored value kept; dtype= still wins."""
    import mlxq  # noqa: F401
    from mlx_lm import convert

    src = _float_checkpoint(tmp_path / "float", fp32_norms=True)
    out = tmp_path / "q"
    convert(str(src), str(out), quantize=True, q_group_size=64, q_bits=4)
    dtypes, native, fp32 = _mlx_lm(out)
    assert dtypes["model.norm.weight"] == "float32"
    assert dtypes["model.layers.0.self_attn.q_proj.scales"] == "bfloat16"
    model, logits = _ours(out)
    assert model.dtype == torch.float32
    stored = load_file(out / "model.safetensors")
    for name in ("model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert torch.equal(model.get_parameter(name), stored[name]), name
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert torch.equal(q.scales, stored["model.layers.0.self_attn.q_proj.scales"].float())
    assert float(np.abs(logits - fp32).max()) < 1e-4
    # explicit dtype= wins; it is the bf16 load of before, further from mlx-lm's own logits
    model, bf16 = _ours(out, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert np.abs(logits - native).max() < np.abs(bf16 - native).max()


def test_float16_checkpoint_under_a_bfloat16_config_loads_in_float16(tmp_path: Path) -> None:
    """`mlx_lm convert --dtype float16` writes fp16 scales and leaves config.json's
    `dtype: bfloat16`: mlx-lm runs fp16; mlxq loaded bf16 (rounding the scales, with a
    warning). Now fp16, as stored: its logits within fp16 noise of mlx-lm's fp16 ones."""
    import mlxq  # noqa: F401
    from mlx_lm import convert

    src = _float_checkpoint(tmp_path / "float", fp32_norms=False)
    out = tmp_path / "q"
    convert(str(src), str(out), quantize=True, q_group_size=64, q_bits=4, dtype="float16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    dtypes, native, _ = _mlx_lm(out)
    assert set(dtypes.values()) == {"float16", "uint32"}
    model, logits = _ours(out)
    assert model.dtype == torch.float16
    stored = load_file(out / "model.safetensors")
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert torch.equal(q.scales, stored["model.layers.0.self_attn.q_proj.scales"])
    _, bf16 = _ours(out, dtype=torch.bfloat16)
    assert np.abs(logits - native).max() < np.abs(bf16 - native).max()


@pytest.mark.parametrize("torch_dtype", [None, "float16"])
def test_quantizing_while_loading_takes_the_dtype_mlx_lm_convert_writes(
    tmp_path: Path, torch_dtype
) -> None:
    """A float checkpoint quantized while it loads, without dtype=: `mlx_lm convert -q`
    casts to `torch_dtype` where config.json has one (transformers reads its `dtype` key
    first: bfloat16 here), else keeps the stored dtype."""
    from mlxq.integrations import MLXQuantConfig
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    src = _float_checkpoint(tmp_path / "float", fp32_norms=False)
    if torch_dtype is not None:
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, "torch_dtype": torch_dtype}))
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=MLXQuantConfig(4, 64))
    want = getattr(torch, torch_dtype or "bfloat16")
    assert model.dtype == want
    model.save_pretrained(tmp_path / "saved")
    from mlx_lm import convert

    convert(str(src), str(tmp_path / "mlx"), quantize=True, q_group_size=64, q_bits=4)
    for name in ("saved", "mlx"):
        with safe_open(tmp_path / name / "model.safetensors", "pt") as f:
            got = {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith(".weight")}
        assert got == {{torch.float16: "F16", torch.bfloat16: "BF16"}[want]}, name
