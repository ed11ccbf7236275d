"""Real MLX checkpoints for the integration tests, and mlx-lm as the whole-model oracle.

Checkpoints are made by `mlx_lm.convert` (as mlx-community does) and cached across sessions
under $MLXQ_TEST_CACHE (default: the mlxq user cache + /tests, so an empty $MLXQ_CACHE or
$XDG_CACHE_HOME means a cold start, as for a new user), keyed by the inputs and the versions of
transformers and mlx-lm.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _test_cache() -> Path:
    from mlxq.demo_model import mlxq_cache_dir

    return Path(os.environ.get("MLXQ_TEST_CACHE") or mlxq_cache_dir() / "tests")


TEST_CACHE = _test_cache()


def cached_checkpoint(key: str, build: Callable[[Path, Path], object]) -> Path:
    """TEST_CACHE/models/`key`, made once by `build(float_dir, out)`: the float checkpoint goes
    in `float_dir` (scratch), the converted one into `out`. mlxq's own model cache does the
    rest (a staging folder moved into place whole, so that a killed or concurrent build never
    leaves a half-written entry; a build that lost the race to an equal one is dropped)."""
    from mlxq.demo_model import _cached_build

    return _cached_build(key, lambda out: build(out.with_name("float"), out), TEST_CACHE)


def smollm2(bits: int = 4, group_size: int = 32, recipe: str | None = None) -> Path:
    """SmolLM2-135M-Instruct converted by mlx-lm (cached)."""
    from mlxq.demo_model import cached_smollm2_checkpoint

    return cached_smollm2_checkpoint(bits, group_size, recipe, cache_dir=TEST_CACHE)


TINY_ARCHS = {
    # untied head; intermediate 192 is not a multiple of 128, so with group 128 mlx-lm leaves
    # down_proj in float without a config entry (mlx-lm's own rule)
    "qwen3": dict(
        model_type="qwen3",
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    ),
    # tied embeddings (a quantized embedding is the head); the code SmolLM2 runs
    "llama": dict(
        model_type="llama",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    ),
    # Llama's code with a sliding-window argument to the attention
    "mistral": dict(
        model_type="mistral",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    ),
    # q/k/v carry a float bias next to the quantized weight
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    ),
}


def tiny_float_model(arch: str, out: Path) -> Path:
    """A small random model of another architecture, saved as a float HF checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir = smollm2()  # any tokenizer will do; this one is local
    params = dict(TINY_ARCHS[arch])
    model_type = params.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=49152, **params)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():  # larger random weights than the init, so that logits differ clearly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_theta"] = params["rope_theta"]  # mlx-lm reads the top-level key (trap 2)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def tiny_mlx_checkpoint(arch: str, bits: int = 4, group_size: int = 128) -> Path:
    """The tiny model converted by mlx-lm (cached)."""
    from mlx_lm import convert
    from mlxq.demo_model import _versions

    def build(float_dir: Path, out: Path) -> None:
        tiny_float_model(arch, float_dir)
        convert(str(float_dir), str(out), quantize=True, q_group_size=group_size, q_bits=bits)

    key = f"tiny-{arch}-{bits}bit-g{group_size}-{_versions('transformers', 'mlx-lm')}"
    return cached_checkpoint(key, build)


@functools.lru_cache(maxsize=4)
def _mlx_model(path: str, dtype: str):
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(path)
    if dtype == "float32":
        model.set_dtype(mx.float32)
    return model


def mlx_lm_logits(
    path: str | Path, tokens, dtype: str = "float32", cached: bool = False
) -> np.ndarray:
    """mlx-lm's own forward pass over `tokens` ([T] ints): logits [T, vocab], as float32.

    dtype "float32" casts the model first (exactness is tested in fp32);
    "native" runs it in the checkpoint's dtype. `cached`: with a fresh prompt cache, as
    mlx-lm's generation runs the prompt (some models differ without one: Gemma 3n).
    """
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    model = _mlx_model(str(path), dtype)
    cache = make_prompt_cache(model) if cached else None
    logits = model(mx.array(np.asarray(tokens, dtype=np.int32)[None]), cache=cache)[0]
    return np.array(logits.astype(mx.float32))


def greedy_tokens(model, prompt, new_tokens: int):
    """`prompt` followed by `new_tokens` greedy tokens from transformers' `generate` (KV cache,
    one token a step): a [len(prompt) + new_tokens] tensor."""
    import torch

    ids = torch.as_tensor(prompt)[None]
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )[0]


def assert_logits_match_mlx_lm(model, path: str | Path, tokens, tolerance: float) -> np.ndarray:
    """The model's fp32 logits over `tokens` within `tolerance` of mlx-lm's; returns mlx-lm's."""
    import torch

    ref = mlx_lm_logits(path, tokens.numpy())
    with torch.no_grad():
        got = model(tokens[None]).logits[0].numpy()
    assert float(np.abs(got - ref).max()) <= tolerance
    return ref


def write_mlx_lm_adapters(
    ckpt: str | Path, out: Path, num_layers: int, keys: list[str], scale: float, seed: int
) -> None:
    """LoRA adapters made by mlx-lm's own code, as `mlx_lm lora` sets them up and saves them
    (rank 4 on `keys` of the last `num_layers` layers), with a random lora_b instead of
    training, so that they change the logits."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(ckpt))
    model.freeze()
    params = {"rank": 4, "scale": scale, "dropout": 0.0, "keys": keys}
    linear_to_lora_layers(model, num_layers, params)
    mx.random.seed(seed)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
    out.mkdir()
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    cfg = {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
