"""Attention for bf16/fp16 models decoding on the CPU: torch's sdpa, computed in fp32.

torch's CPU flash-attention kernel is 4-8x slower in bf16 than in fp32 for a few queries
against a long cache (measured at one query and 512 or 1024 keys: 392 vs 90 microseconds with
the conversion, 778 vs 132), and decode calls it once per layer per token. So for a few
queries on the CPU, q, k and v are widened to fp32 and the output rounded back to the model's
dtype, which is also how MLX's fused attention computes (fp32 accumulation and softmax). Other
shapes and devices go to transformers' own sdpa unchanged.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

__all__ = ["NAME", "MAX_QUERIES", "use_fp32_decode_attention"]

NAME = "mlxq_sdpa"
# Up to this many queries (decode, and short speculative chunks) take the fp32 path; a prompt
# takes bf16 sdpa, which is as fast as fp32 there (7.4 vs 7.0 ms for 512 causal queries).
MAX_QUERIES = 16


def _attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (
        query.device.type == "cpu"
        and query.dtype in (torch.bfloat16, torch.float16)
        and query.shape[-2] <= MAX_QUERIES
    ):
        mask = attention_mask
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), mask, **kwargs
        )
        return out.to(query.dtype), weights
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def _names_sdpa(model: nn.Module) -> bool:
    """Whether the model's code compares its attention implementation with "sdpa" by name
    (falcon, gemma4, ...): renaming it would send such a model down another path."""
    return _module_names_sdpa(type(model).__module__)


@functools.cache
def _module_names_sdpa(module_name: str) -> bool:
    """_names_sdpa for one modeling module, read once per process (each load asks again)."""
    import inspect
    import sys

    module = sys.modules.get(module_name)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        return True  # no source to read: do not guess
    return '"sdpa"' in source


def use_fp32_decode_attention(model: nn.Module) -> bool:
    """Switch a text model that uses transformers' sdpa to NAME (the same sdpa, with the
    fp32 path above for decode on the CPU); returns whether it did. Models with sub-configs
    (image-text), other attention implementations and code that tests for "sdpa" by name are
    left as they are."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if config.sub_configs or config.get_text_config() is not config:
        return False
    if _names_sdpa(model):
        return False
    _register()
    model.set_attn_implementation(NAME)
    return True
