"""Attention for bf16/fp16 models decoding on the CPU, computed in fp32.

torch's CPU flash-attention kernel is 4-8x slower in bf16 than in fp32 for a few queries
against a long cache (measured at one query and 512 or 1024 keys: 392 vs 90 microseconds with
the conversion, 778 vs 132), and decode calls it once per layer per token. So for a few
queries on the CPU, attention runs in fp32 and only the output is rounded to the model's dtype,
which is also how MLX's fused attention computes (fp32 accumulation and softmax):

- `mlxq.ops.decode_attention` (a native op) reads the bf16/fp16 cache in place, widening each
  value as it is read, for every call whose result it reproduces: no dropout, no softcapping, no
  position bias or attention sinks, one head size for q, k, v, one batch size, Hq a multiple
  of Hkv as the module's `num_key_value_groups` says, unit-stride rows; the mask transformers
  built (it carries causality, padding and sliding windows), or the causal mask
  `scaled_dot_product_attention` applies itself when there is none (`is_causal`, upper-left).
- The other calls with a few queries widen q, k and v to fp32 and run transformers' sdpa on
  them (a copy of the whole cache per call: the path the op replaced, `NATIVE_DECODE = False`
  sends every such call there).
- A prompt takes the native op too while queries x keys stay under MAX_PROMPT_SCORES, four
  times that where the op's 16-row prompt kernel runs (its causal mask is built as a bool
  tensor; the op skips each row group's masked keys, and is faster than torch's bf16 flash
  attention: 2.5x at 512 tokens with that kernel); longer prompts and other devices go to
  transformers' own sdpa unchanged.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from mlxq._native import _C
from mlxq._sizes import known_le

__all__ = [
    "NAME",
    "MAX_QUERIES",
    "MAX_PROMPT_SCORES",
    "NATIVE_DECODE",
    "native_arguments",
    "use_fp32_decode_attention",
    "register_attention",
]

NAME = "mlxq_sdpa"
# Up to this many queries (decode, and short speculative chunks) take the fp32 path (the op, or
# the widening path for calls it does not reproduce); above, the op under MAX_PROMPT_SCORES, or
# bf16 sdpa, which is as fast as widened fp32 there (7.4 vs 7.0 ms for 512 causal queries).
MAX_QUERIES = 16


# False sends every few-query call down the fp32-widening path (comparisons and tests).
NATIVE_DECODE = True
# A prompt goes to the native op too when its causal bool mask (built here when transformers
# passes none) stays small: queries x keys up to this many. The op skips the keys after each
# group of rows, and beat torch's bf16 flash attention at SmolLM2's 512-token prompt (3.1 vs
# 3.5-4.2 ms a layer, 2 threads); longer prompts keep sdpa, which needs no mask.
MAX_PROMPT_SCORES = 1 << 20
# Where the op takes a prompt with its 16-row kernel (bf16, a head size that is a multiple of 32,
# AVX-512 BF16: csrc/cpu/attention_rows16.h), it beats torch's bf16 flash attention further, its
# mask built here included (SmolLM2 shapes, 2 threads: 1.4 vs 3.6 ms at 512 causal queries, 5.1
# vs 10.2 at 1024, 19.8 vs 36.1 at 2048): prompts up to this many times MAX_PROMPT_SCORES.
ROWS16_PROMPT_FACTOR = 4


def _native_fits(module: nn.Module, query, key, value, attention_mask, kwargs) -> bool:
    """Whether mlxq.ops.decode_attention computes exactly what sdpa_attention_forward would
    (in fp32) for this call; anything it does not reproduce keeps the widening path. (Plain
    tests in the order of their cost: this runs once per layer per token.)"""
    if not NATIVE_DECODE or kwargs.get("dropout") or kwargs.get("output_attentions"):
        return False
    if torch.is_grad_enabled() and (
        query.requires_grad or key.requires_grad or value.requires_grad
    ):
        return False  # the op is inference-only: training (LoRA on q/k/v) keeps sdpa's gradient
    if (
        kwargs.get("softcap") is not None
        or kwargs.get("position_bias") is not None
        or kwargs.get("s_aux") is not None
        or getattr(module, "sinks", None) is not None
    ):
        return False
    qs, ks = query.shape, key.shape
    if len(qs) != 4 or len(ks) != 4 or value.shape != ks or qs[0] != ks[0] or qs[3] != ks[3]:
        return False
    if qs[1] != ks[1] * max(getattr(module, "num_key_value_groups", 1), 1):
        return False
    if not (query.dtype == key.dtype == value.dtype):
        return False
    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
        return False
    return attention_mask is None or (
        attention_mask.dim() <= 4
        and (attention_mask.dtype == torch.bool or attention_mask.is_floating_point())
    )


@torch._dynamo.assume_constant_result
def _cpu_isa() -> str:
    """`_C.cpu_isa()`, which torch.compile takes as a constant of the traced graph (a call
    it cannot trace broke the graph at every layer of a prompt): it only moves the threshold
    between two paths that are both right."""
    return _C.cpu_isa()


def _prompt_scores(query: torch.Tensor) -> int:
    """The most queries x keys of a prompt that takes the op."""
    rows16 = query.dtype == torch.bfloat16 and query.shape[-1] % 32 == 0
    if rows16 and _cpu_isa() == "avx512":
        return MAX_PROMPT_SCORES * ROWS16_PROMPT_FACTOR
    return MAX_PROMPT_SCORES


def _native_size(query: torch.Tensor, key: torch.Tensor) -> bool | torch.SymBool:
    """Whether a call of these sizes takes the op (where `_native_fits`): a few queries, or a
    prompt whose queries x keys stay under `_prompt_scores`; under tracing a SymBool (no guard)
    where the sizes do not settle it."""
    q_length, kv_length = query.shape[-2], key.shape[-2]
    if known_le(q_length, MAX_QUERIES):
        return True  # (no call of `_prompt_scores`)
    # `|`, not `or`: `or` would turn a traced length's first test into a guard
    return (q_length <= MAX_QUERIES) | (q_length * kv_length <= _prompt_scores(query))


def _known_native_size(query: torch.Tensor, key: torch.Tensor) -> bool | None:
    """`_native_size` where it is decided without a guard on the lengths, else None."""
    q_length, kv_length = query.shape[-2], key.shape[-2]
    few = known_le(q_length, MAX_QUERIES)
    if few:
        return True
    scores = known_le(q_length * kv_length, _prompt_scores(query))
    return True if scores else (False if few is False and scores is False else None)


def _native_call(
    module: nn.Module, query, key, value, attention_mask, kwargs: dict
) -> tuple[torch.Tensor | None, float | None]:
    """The (mask, scale) of the op's call, with sdpa_attention_forward's causal rule: a causal
    mask only for several queries without a mask, aligned to the first key."""
    q_length, kv_length = query.shape[-2], key.shape[-2]
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # eager: `q_length > 1` is a plain test. A traced length is taken as maybe one at run time
    # (None), whatever tracing claims to know: torch.export reasons about a `Dim(min=1)` as if
    # it were at least 2 (it took `q_length > 1` as known, and its programs kept the first key
    # only for one query over several keys)
    one = q_length <= 1 if isinstance(q_length, int) else None
    if attention_mask is None and is_causal and one is not True:
        attention_mask = torch.ones(
            q_length, kv_length, dtype=torch.bool, device=query.device
        ).tril()
        if one is None:  # one query at run time attends every key (sdpa's rule above)
            single = torch.scalar_tensor(q_length, dtype=torch.int64, device=query.device) == 1
            attention_mask = attention_mask | single
    return attention_mask, kwargs.get("scaling")


def native_arguments(
    module: nn.Module, query, key, value, attention_mask, kwargs: dict
) -> tuple[torch.Tensor | None, float | None] | None:
    """The (mask, scale) with which `mlxq.ops.decode_attention(query, key, value, mask, scale)`,
    transposed to [B, Lq, H, D], is this interface's result, where it takes the native op (a
    bf16/fp16 CPU call that `_native_fits`, with sdpa_attention_forward's causal rule: a causal
    mask only for several queries without a mask, aligned to the first key); else None.
    Eager calls (its size tests would be guards under tracing: :func:`_traced_attention`)."""
    if query.device.type != "cpu" or query.dtype not in (torch.bfloat16, torch.float16):
        return None
    q_length, kv_length = query.shape[-2], key.shape[-2]
    if q_length > MAX_QUERIES and q_length * kv_length > _prompt_scores(query):
        return None
    if not _native_fits(module, query, key, value, attention_mask, kwargs):
        return None
    return _native_call(module, query, key, value, attention_mask, kwargs)


def _widened(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa on fp32 copies of q, k, v (and a float mask), rounded back."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    mask = attention_mask
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    out, weights = sdpa_attention_forward(
        module, query.float(), key.float(), value.float(), mask, **kwargs
    )
    return out.to(query.dtype), weights


def _attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    if torch.compiler.is_compiling():
        return _traced_attention(module, query, key, value, attention_mask, kwargs)
    native = native_arguments(module, query, key, value, attention_mask, kwargs)
    if native is not None:
        out = torch.ops.mlxq.decode_attention(query, key, value, *native)
        return out.transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    reduced = query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16)
    if reduced and query.shape[-2] <= MAX_QUERIES:
        return _widened(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _is_exporting() -> bool:
    """torch.compiler.is_exporting() (torch >= 2.6; before it, torch.export keeps the guard,
    and refuses a dynamic length across the bound by torch's own constraint error)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


def _traced_attention(module: nn.Module, query, key, value, attention_mask, kwargs: dict):
    """:func:`_attention` under torch.compile / torch.export: the same three paths by the
    same rule, with the size tests made without a guard where the sizes settle them. A length
    they do not settle gets, under torch.export, a `torch.cond` that picks at run time
    (:func:`_traced_choice`); under torch.compile a guard and a graph per path, as before
    (inductor's cond passed a transposed q where its subgraph asserted a contiguous one)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    reduced = query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16)
    if not reduced:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    fits = _native_fits(module, query, key, value, attention_mask, kwargs)
    short = _known_native_size(query, key) if fits else known_le(query.shape[-2], MAX_QUERIES)
    if short is None and _is_exporting():
        return _traced_choice(module, query, key, value, attention_mask, fits, kwargs), None
    if short is None:
        short = bool(_native_size(query, key) if fits else query.shape[-2] <= MAX_QUERIES)
    if short and fits:
        mask, scale = _native_call(module, query, key, value, attention_mask, kwargs)
        out = torch.ops.mlxq.decode_attention(query, key, value, mask, scale)
        return out.transpose(1, 2).contiguous(), None
    if short:
        return _widened(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _traced_choice(
    module: nn.Module, query, key, value, attention_mask, fits: bool, kwargs: dict
) -> torch.Tensor:
    """:func:`_attention`'s output for a length only known at run time (torch.export with a
    dynamic length): a `torch.cond` on the eager rule's size test, between the op (or, where
    the op does not fit, the fp32 widening) and transformers' sdpa, so that every length
    computes what eager computes, without a guard on it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    masked = attention_mask is not None
    operands = (query, key, value, *((attention_mask,) if masked else ()))

    def short(q, k, v, *mask):
        m = mask[0] if masked else None
        if fits:
            out = torch.ops.mlxq.decode_attention(
                q, k, v, *_native_call(module, q, k, v, m, kwargs)
            )
            return out.transpose(1, 2).contiguous()
        return _widened(module, q, k, v, m, **kwargs)[0]

    def long(q, k, v, *mask):
        m = mask[0] if masked else None
        return sdpa_attention_forward(module, q, k, v, m, **kwargs)[0].contiguous()

    if fits:
        test = _native_size(query, key)
    else:
        test = query.shape[-2] <= MAX_QUERIES
    return torch.cond(test, short, long, operands)


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def _names_sdpa(model: nn.Module) -> bool:
    """Whether the model's code compares its attention implementation with "sdpa" by name
    (falcon, gemma4, ...): renaming it would send such a model down another path. That code is
    the modeling module of its transformers class, not of a subclass mlxq made of it
    (`placed_by_buffers`, whose module is mlxq's)."""
    cls = next(
        (c for c in type(model).__mro__ if not c.__module__.startswith("mlxq.")), type(model)
    )
    return _module_names_sdpa(cls.__module__)


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
    fp32 paths above for decode on the CPU); returns whether it did. Models with sub-configs
    (image-text), other attention implementations and code that tests for "sdpa" by name are
    left as they are."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if config.sub_configs or config.get_text_config() is not config:
        return False
    if _names_sdpa(model):
        return False
    register_attention()
    model.set_attn_implementation(NAME)
    return True
