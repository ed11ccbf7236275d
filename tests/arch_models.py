"""Tiny random models of every dense architecture that transformers 5 and mlx-lm both run,
converted by `mlx_lm.convert`, and the comparison of mlxq's logits with mlx-lm's.

Used by tests/test_arch_coverage.py (a fast subset) and benchmarks/arch_coverage.py (the whole
matrix). Each model: 2 layers, hidden 128, vocab 512, random weights larger than the init (so
that a dropped scale or a transposed weight changes the logits clearly), a word-level tokenizer
built here (no download). The float checkpoint is saved by transformers in bfloat16 and gets
the top-level config keys mlx-lm reads (transformers 5 keeps some only in rope_parameters)
from this file's own parameters, not from mlxq's code, so the oracle stays independent of
the code under test.
Converted checkpoints are cached under $MLXQ_TEST_CACHE like tests/mlx_models.py's.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlx_models import cached_checkpoint, mlx_lm_logits

VOCAB = 512
BASE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# rope settings that differ from every default, so that a key mlx-lm misses shows in the logits;
# given the transformers 5 way (some configs ignore a top-level `rope_theta` kwarg)
THETA = 5000.0
ROPE = {"rope_parameters": {"rope_type": "default", "rope_theta": THETA}}
TOP = {"rope_theta": THETA}


# Falcon-H1's muP multipliers, every one other than 1 (tiiuae's checkpoints: embedding 5.66,
# lm_head 0.039, key 0.39, ...)
FALCON_H1_MUP = {
    "embedding_multiplier": 2.0,
    "lm_head_multiplier": 0.25,
    "attention_in_multiplier": 1.5,
    "attention_out_multiplier": 0.75,
    "key_multiplier": 0.5,
    "ssm_in_multiplier": 1.25,
    "ssm_out_multiplier": 0.6,
    "mlp_multipliers": [0.8, 1.3],
    "ssm_multipliers": [0.9, 1.1, 0.7, 1.2, 0.95],
}


def _partial(factor: float) -> tuple[dict, dict]:
    rope = {"rope_type": "default", "rope_theta": THETA, "partial_rotary_factor": factor}
    return {"rope_parameters": rope}, {**TOP, "partial_rotary_factor": factor}


def _alternating(**extra) -> dict:
    """Layer 0 sliding, layer 1 full: a 2-layer model with both kinds of attention."""
    return {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 64, **extra}


# the MoE part of DeepSeek V2/V3 and GLM-4-MoE: 4 routed experts, one shared, layer 0 dense;
# multi-head latent attention with a KV rank the group size divides (so it is quantized)
_DEEPSEEK = {
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "moe_intermediate_size": 64,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 64,
    "q_lora_rank": 64,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16,
    "v_head_dim": 32,
}

_INDEXER = {"num_key_value_heads": 4, "index_topk": 64, "index_head_dim": 32, "index_n_heads": 2}

# the rope of both layer kinds, for configs that key rope_parameters by layer type
_PER_TYPE_ROPE = {
    **_alternating(),
    "rope_parameters": {
        kind: {"rope_type": "default", "rope_theta": THETA}
        for kind in ("sliding_attention", "full_attention")
    },
}
_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 64}

# model_type -> (transformers config overrides, top-level keys mlx-lm needs in config.json)
# Qwen3-Next / Qwen 3.5: a gated-delta linear attention layer, then a full attention one
_LINEAR_ATTENTION = {
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 32,
    "layer_types": ["linear_attention", "full_attention"],
    "full_attention_interval": 2,
}
_QWEN_MOE = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
}
_QWEN35 = {
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": THETA,
        "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
    },
    **_LINEAR_ATTENTION,
}
# image-text architectures whose language model mlx-lm converts: their tiny vision tower
IMAGE_TEXT = {
    arch: {
        "depth": 1,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": 128,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
    }
    for arch in ("qwen3_5", "qwen3_5_moe")
}

IMAGE_TEXT["muse_spark"] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "out_hidden_size": 128,
}
# Gemma 4 (E2B..31B): `mlx_lm convert` of the image-text model keeps its language model (mlx-lm's
# gemma4 drops the towers and embedders)
IMAGE_TEXT["gemma4"] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "patch_size": 16,
    "pooling_kernel_size": 3,
    "position_embedding_size": 64,
}
# Gemma 4 Unified: an encoder-free image-text model (a patch embedder, no vision tower);
# mlx-lm runs its language model as its gemma4 and drops the embedders
IMAGE_TEXT["gemma4_unified"] = {"mm_embed_dim": 64, "output_proj_dims": 64, "mm_posemb_size": 64}
# image-text models whose image-text model transformers cannot build here (Gemma 3n's vision
# tower needs timm): their text model is built by its causal LM and saved under the image-text
# model's names (`model.language_model.*`) with an image-text config.json, as the Hub has it;
# mlx-lm's config keys go into text_config
TEXT_MODEL_OF = {"gemma3n": "gemma3n_text"}
# mlx-lm models whose forward without a cache is not the one they generate with (Gemma 3n's
# KV-shared layers read the cache of an earlier layer; without one they project their own
# keys and values): the oracle runs with mlx-lm's prompt cache
MLX_LM_CACHED = {"gemma3n"}
# image-text models' other sub-configs and top-level settings
IMAGE_TEXT_EXTRA = {
    "gemma4": {"audio_config": None},
    "gemma4_unified": {"audio_config": None},
    "muse_spark": {
        "audio_config": {
            "hidden_sizes": [16, 16, 16, 16],
            "depths": [1, 1, 1, 1],
            "num_hidden_layers": 4,
            "out_hidden_size": 128,
        },
        "projector_hidden_size": 64,
    },
}
# mlx-lm picks a chat template module for these model types unless the tokenizer has one
# (mlx-lm 0.32's muse_spark module has none)
NEEDS_CHAT_TEMPLATE = {"muse_spark"}

ARCHS: dict[str, tuple[dict, dict]] = {
    "llama": (ROPE, TOP),
    "mistral": (ROPE, TOP),
    "qwen2": (ROPE, TOP),
    "qwen3": (ROPE, TOP),
    # transformers runs Gemma's `gelu` as the tanh approximation, mlx-lm as the exact gelu: the
    # float models differ by ~6e-4 (hidden_act is not a choice here)
    "gemma": (ROPE, TOP),
    "gemma2": ({**ROPE, "query_pre_attn_scalar": 32}, TOP),
    "gemma3_text": (
        {
            **_alternating(query_pre_attn_scalar=32),
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "default", "rope_theta": THETA},
            },
        },
        {"rope_theta": THETA, "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 2},
    ),
    "phi": _partial(0.5),
    "phi3": _partial(0.5),
    "stablelm": _partial(0.25),
    "glm4": _partial(0.5),
    # mlx-lm's glm rotates the whole head (transformers' default factor is 0.5)
    "glm": _partial(1.0),
    "nemotron": _partial(0.5),
    "gpt2": (dict(n_embd=128, n_layer=2, n_head=4, n_positions=256), {"n_ctx": 256}),
    # mlx-lm's gpt_neox has an MLP of 4*hidden and a fixed fast gelu
    "gpt_neox": (
        {**_partial(0.5)[0], "intermediate_size": 512, "hidden_act": "gelu_fast"},
        {"rotary_emb_base": THETA, "rotary_pct": 0.5},
    ),
    # mlx-lm's gpt_bigcode and starcoder2 use the exact gelu (so does the tiny gpt_bigcode)
    "gpt_bigcode": (
        dict(n_embd=128, n_layer=2, n_head=4, n_positions=256, n_inner=512)
        | {"activation_function": "gelu"},
        {},
    ),
    "gptj": (dict(n_embd=128, n_layer=2, n_head=4, n_positions=256, rotary_dim=16), {}),
    "starcoder2": ({**ROPE, "hidden_act": "gelu"}, TOP),
    "cohere": (ROPE, TOP),
    "cohere2": ({**ROPE, **_alternating()}, {**TOP, "sliding_window_pattern": 2}),
    "olmo": (ROPE, TOP),
    "olmo2": (ROPE, TOP),
    "olmo3": (
        {
            **_alternating(),
            "rope_parameters": {
                kind: {"rope_type": "default", "rope_theta": THETA}
                for kind in ("sliding_attention", "full_attention")
            },
        },
        TOP,
    ),
    "granite": (ROPE, TOP),
    "helium": (ROPE, TOP),
    "smollm3": (ROPE, TOP),
    "seed_oss": (ROPE, TOP),
    "ernie4_5": (ROPE, TOP),
    # mlx-lm's exaone4 reads the Hub's layer pattern string (transformers 5 writes an int)
    "exaone4": (
        {**ROPE, **_alternating()},
        {**TOP, "rope_scaling": None, "sliding_window_pattern": "LG"},
    ),
    "hunyuan_v1_dense": (ROPE, TOP),
    "internlm3": (ROPE, TOP),
    # transformers' Apertus has q/k norms, no MLP bias and no post norms
    "apertus": (ROPE, {**TOP, "mlp_bias": False, "post_norm": False, "qk_norm": True}),
    # mlx-lm's nanochat normalizes with eps 1e-5 whatever config.json says
    "nanochat": ({**ROPE, "rms_norm_eps": 1e-5}, TOP),
    # mlx-lm's minicpm3 always runs its longrope (SuScaledRoPE, with the long factors at every
    # length): with factors 1 and no extension it is the default rope transformers runs here
    # (MLA: as many key/value heads as query heads; transformers' sdpa needs it said)
    "minicpm3": (
        {**ROPE, "num_key_value_heads": 4},
        {**TOP, "rope_scaling": {"original_max_position_embeddings": 256}},
    ),
    # mlx-lm's lfm2 reads the Hub's `block_dim` (transformers 5 calls it hidden_size)
    # a short-convolution layer, then attention
    "lfm2": (
        {**ROPE, "layer_types": ["conv", "full_attention"]},
        {**TOP, "block_dim": 128, "full_attn_idxs": [1]},
    ),
    "ministral3": ({}, {}),
    "bitnet": (ROPE, TOP),
    # mlx-lm's exaone reads the Hub's names (transformers 5 maps them to its own)
    "exaone": (ROPE, {**TOP, "num_layers": 2, "layer_norm_epsilon": 1e-5}),
    # mixture-of-experts models: transformers 5 fuses the experts into 3-D parameters, mlx-lm
    # stacks them per projection (switch_mlp); routers are quantized too (often at 8 bits)
    # hybrid state-space models: Mamba-2 mixers beside attention (falcon_h1); Mamba alone
    # (its causal LM reads `lm_head.weight.dtype` in forward: refused by name)
    "falcon_h1": (ROPE, TOP),
    # Falcon-H1 with muP multipliers as the Hub's checkpoints have them (none 1): mlx-lm folds
    # them into the weights when it converts, and its model no longer applies them
    "falcon_h1_mup": ({**ROPE, **FALCON_H1_MUP}, TOP),
    "mamba": ({}, {}),
    # LFM2-MoE: short convolutions (layer 0, a dense MLP) and attention (layer 1, experts)
    "lfm2_moe": (
        {
            **ROPE,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "num_dense_layers": 1,
            "layer_types": ["conv", "full_attention"],
        },
        {**TOP, "full_attn_idxs": [1]},
    ),
    # RecurrentGemma: an RG-LRU block (layer 0) and local attention (layer 1); no exact
    # oracle (README)
    "recurrent_gemma": (
        {
            "lru_width": 128,
            "attention_window_size": 16,
            "block_types": ["recurrent", "attention"],
            "num_key_value_heads": 1,
            "rope_theta": THETA,
            "partial_rotary_factor": 0.5,
        },
        TOP,
    ),
    # Qwen 3.5: image-text models on the Hub; mlx-lm converts their language model (dense and
    # MoE, the linear attention of Qwen3-Next), mlxq loads it as transformers' causal LM
    "qwen3_5": (_QWEN35, {}),
    "qwen3_5_moe": ({**_QWEN35, **_QWEN_MOE}, {}),
    # Jamba: Mamba layer 0, attention + MoE layer 1. All experts selected: mlx-lm renormalizes
    # the top-k router weights, transformers does not (README); with k = E both are the softmax
    "jamba": (
        dict(
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            num_experts=4,
            num_experts_per_tok=4,
            mamba_d_state=16,
            mamba_expand=2,
            mamba_dt_rank=8,
        ),
        {},
    ),
    # Qwen3-Next: gated-delta linear attention (layer 0) and gated full attention (layer 1),
    # MoE with a shared expert in both; mlx-lm stores its RMSNorm weights as 1 + w
    "qwen3_next": (
        {**_partial(0.25)[0], **_LINEAR_ATTENTION, **_QWEN_MOE},
        {**_partial(0.25)[1], "full_attention_interval": 2},
    ),
    "mixtral": ({**ROPE, "num_local_experts": 4, "num_experts_per_tok": 2}, TOP),
    "qwen3_moe": (
        {**ROPE, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128},
        {**TOP, "num_experts": 4},  # transformers 5 calls it num_local_experts
    ),
    "qwen2_moe": (
        {
            **ROPE,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 128,
            "shared_expert_intermediate_size": 128,
        },
        {**TOP, "num_experts": 4},
    ),
    "olmoe": (
        {**ROPE, "num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 128},
        {**TOP, "num_experts": 4},
    ),
    # MiniMax-M2 (mlx-lm runs it as its `minimax`): sigmoid router with a correction bias, its
    # forward casts the input to `self.weight.dtype`; mlx-lm needs keys transformers 5 lacks
    "minimax_m2": (
        {**ROPE, "num_local_experts": 4, "num_experts_per_tok": 2},
        {**TOP, "shared_intermediate_size": 0, "rotary_dim": 32},
    ),
    # mlx-lm's phimoe has attention and head biases
    "phimoe": (
        {
            **ROPE,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "attention_bias": True,
            "lm_head_bias": True,
        },
        TOP,
    ),
    "granitemoe": ({**ROPE, "num_local_experts": 4, "num_experts_per_tok": 2}, TOP),
    # mlx-lm's deepseek_v2 always runs YaRN rope: factor 1 is the default rope
    "deepseek_v2": (
        {**ROPE, **_DEEPSEEK, "topk_method": "greedy"},
        {**TOP, "n_routed_experts": 4, "rope_scaling": {"type": "yarn", "factor": 1.0}},
    ),
    # transformers' deepseek_v3 ropes `head_dim` values: the rope part of the heads
    "deepseek_v3": (
        {**ROPE, **_DEEPSEEK, "head_dim": _DEEPSEEK["qk_rope_head_dim"]},
        {**TOP, "n_routed_experts": 4},
    ),
    # GLM-4.7-Flash: DeepSeek V3's attention and sigmoid router; mlx-lm has no tied head
    "glm4_moe_lite": (
        {**ROPE, **_DEEPSEEK, "head_dim": _DEEPSEEK["qk_rope_head_dim"]},
        {**TOP, "n_routed_experts": 4},
    ),
    # DeepSeek V3.2 and GLM-5: V3's attention plus a top-k indexer over the keys. The indexer
    # keeps more keys than the sequence has here: where it drops some, mlx-lm and transformers
    # differ already in float (README); num_key_value_heads: transformers repeats the keys
    # by heads / kv heads
    "deepseek_v32": (
        {**ROPE, **_DEEPSEEK, **_INDEXER, "head_dim": _DEEPSEEK["qk_rope_head_dim"]},
        {**TOP, "n_routed_experts": 4},
    ),
    "glm_moe_dsa": (
        {**ROPE, **_DEEPSEEK, **_INDEXER, "head_dim": _DEEPSEEK["qk_rope_head_dim"]},
        {
            **TOP,
            "n_routed_experts": 4,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "moe_layer_freq": 1,
        },
    ),
    "glm4_moe": (
        {
            **_partial(0.5)[0],
            **_DEEPSEEK,
            "norm_topk_prob": True,
            "use_qk_norm": False,
        },
        {**_partial(0.5)[1], "n_routed_experts": 4, "rope_scaling": None},
    ),
    # ERNIE 4.5 MoE: layer 1 MoE with one shared expert (transformers' default end index -1
    # would mean no MoE layer in mlx-lm)
    "ernie4_5_moe": (
        {
            **ROPE,
            "moe_num_experts": 4,
            "moe_k": 2,
            "moe_intermediate_size": 64,
            "moe_num_shared_experts": 1,
            "moe_layer_start_index": 1,
            "moe_layer_end_index": 1,
        },
        TOP,
    ),
    # dots.llm1: DeepSeek V3's MoE (sigmoid router, float) with GQA attention; mlx-lm stacks
    # the experts as `mlp.experts.*`, the names mlxq's experts module has
    "dots1": (
        {**ROPE, **_DEEPSEEK, "n_routed_experts": 4, "norm_topk_prob": True},
        TOP,
    ),
    # EXAONE 4.5 MoE: layer 0 dense; mlx-lm reads the MoE layers from `is_moe_layer`
    "exaone_moe": (
        {
            **ROPE,
            **_alternating(),
            **_MOE,
            "num_experts": 4,
            "num_shared_experts": 1,
            "first_k_dense_replace": 1,
        },
        {**TOP, "is_moe_layer": [False, True]},
    ),
    # AFMoE (Trinity): gated attention, router 8-bit (mlx-lm's predicate), experts stacked as
    # `mlp.experts.*`
    "afmoe": (
        {**ROPE, **_alternating(), **_MOE, "num_experts": 4, "num_shared_experts": 1},
        TOP,
    ),
    # Solar Open: every layer MoE in transformers (mlx-lm's first_k_dense_replace must say so)
    "solar_open": (
        {**ROPE, **_MOE, "n_routed_experts": 4, "n_shared_experts": 1, "norm_topk_prob": True},
        {**TOP, "first_k_dense_replace": 0, "partial_rotary_factor": 1.0},
    ),
    "mellum": ({**_PER_TYPE_ROPE, **_MOE, "num_experts": 4}, {**TOP, "num_experts": 4}),
    # Laguna: attention output gates, a sigmoid router with a correction bias (8-bit in mlx-lm)
    "laguna": (
        {**_PER_TYPE_ROPE, **_MOE, "num_experts": 4, "shared_expert_intermediate_size": 64},
        TOP,
    ),
    # Gemma 4 with its MoE block (26B-A4B: every layer a dense MLP beside routed experts) and
    # per-layer inputs
    "gemma4_text": (
        {
            **_PER_TYPE_ROPE,
            "hidden_size_per_layer_input": 16,
            "vocab_size_per_layer_input": VOCAB,
            "enable_moe_block": True,
            "num_experts": 4,
            "top_k_experts": 2,
            "moe_intermediate_size": 64,
        },
        {},
    ),
    # MiMo-V2-Flash: sliding layers with sinks and twice the KV heads, partial rope with a theta
    # per layer kind, sigmoid router; mlx-lm reads all of it from keys of its own
    "mimo_v2_flash": (
        {
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 64,
            "mlp_layer_types": ["dense", "sparse"],
            "rope_parameters": {
                "full_attention": {
                    "rope_type": "default",
                    "rope_theta": THETA,
                    "partial_rotary_factor": 0.5,
                },
                "sliding_attention": {
                    "rope_type": "default",
                    "rope_theta": 10_000.0,
                    "partial_rotary_factor": 0.5,
                },
            },
            **_MOE,
            "n_routed_experts": 4,
            "v_head_dim": 32,
        },
        {
            "hybrid_layer_pattern": [1, 0],
            "moe_layer_freq": [0, 1],
            "add_swa_attention_sink_bias": True,
            "add_full_attention_sink_bias": False,
            "sliding_window_size": 64,
            "n_shared_experts": None,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "layernorm_epsilon": 1e-5,
            "rope_theta": THETA,
            "swa_rope_theta": 10_000.0,
            "swa_num_attention_heads": 4,
            "swa_num_key_value_heads": 4,
            "swa_head_dim": 32,
            "swa_v_head_dim": 32,
            "partial_rotary_factor": 0.5,
        },
    ),
    # MiniMax-Text-01 in transformers; mlx-lm's `minimax` is MiniMax-M2 (its router needs a
    # correction bias this model has not): no oracle. All layers full attention
    "minimax": (
        {
            **ROPE,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "layer_types": ["full_attention", "full_attention"],
        },
        {**TOP, "shared_intermediate_size": 0, "rotary_dim": 32, "use_qk_norm": False},
    ),
    # DBRX: transformers reads rope_theta from attn_config (mlx-lm too); no tied head in either.
    # mlx-lm keeps one linear layer per expert, which mlxq stacks at load. clip_qkv low enough
    # that the clamp is reached (q/k/v values of about 1)
    "dbrx": (
        dict(
            d_model=128,
            n_layers=2,
            n_heads=4,
            max_seq_len=256,
            rope_parameters={"rope_type": "default", "rope_theta": THETA},
            attn_config={"kv_n_heads": 2, "clip_qkv": 1.0, "rope_theta": THETA},
            ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
        ),
        {},
    ),
    # LongCat-Flash: MLA, zero (identity) experts. transformers 5 saves weights for the zero
    # experts too, which mlx-lm's model has no place for: no oracle
    "longcat_flash": (
        {
            **ROPE,
            "num_layers": 2,
            "ffn_hidden_size": 256,
            "moe_topk": 2,
            "n_routed_experts": 4,
            "zero_expert_num": 2,
            "expert_ffn_hidden_size": 64,
            **{k: _DEEPSEEK[k] for k in ("kv_lora_rank", "q_lora_rank", "v_head_dim")},
            **{k: _DEEPSEEK[k] for k in ("qk_rope_head_dim", "qk_nope_head_dim")},
            "head_dim": _DEEPSEEK["qk_rope_head_dim"],
            "num_key_value_heads": 4,
            "routed_scaling_factor": 1.0,
        },
        {
            **TOP,
            "attention_method": "MLA",
            "zero_expert_type": "identity",
            "mla_scale_q_lora": True,
            "mla_scale_kv_lora": True,
            "attention_bias": False,
        },
    ),
    # mlx-lm's llama4_text is Llama 4's dense variant (no MoE layer); layer 1 without rope.
    # mlx-lm normalizes q/k on NoPE layers too, transformers on rope layers only (README)
    "llama4_text": (
        {
            **ROPE,
            "moe_layers": [],
            "intermediate_size_mlp": 256,
            "no_rope_layers": [1, 0],
            "use_qk_norm": False,
        },
        TOP,
    ),
    # gpt-oss: experts with biases and a clamped gate; sinks in attention; a sliding window
    # shorter than the test sequences (TOKENS, a generation), so that it shows. transformers'
    # default yarn rope is not used: mlx-lm's yarn rounds the correction range (truncate=True)
    # where gpt-oss's config says truncate=False (README, architecture table)
    "gpt_oss": (
        {
            **ROPE,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "intermediate_size": 128,
            "sliding_window": 8,
        },
        TOP,
    ),
}

_MAMBA2 = {  # Mamba-2 mixers: 8 heads of 32 (expand 2), 2 groups, state 16
    "mamba_num_heads": 8,
    "mamba_head_dim": 32,
    "n_groups": 2,
    "ssm_state_size": 16,
    "conv_kernel": 4,
}
ARCHS.update(
    {
        # Nemotron-H (Nemotron Nano 2/3): one layer of each kind, Mamba-2 mixer, MoE (sigmoid
        # router with a correction bias, a shared expert), attention without rope, relu2 MLP
        "nemotron_h": (
            {
                **_MAMBA2,
                "num_hidden_layers": 4,
                "layers_block_type": ["linear_attention", "moe", "full_attention", "mlp"],
                "n_routed_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 64,
                "moe_shared_expert_intermediate_size": 64,
            },
            {},
        ),
        # Granite 4.0-H: Mamba-2 layer 0, attention layer 1, both with MoE and a shared MLP.
        # mlx-lm 0.32 reads the Hub's layer names (transformers 5 writes linear_attention /
        # full_attention and reads these as them)
        "granitemoehybrid": (
            {
                **ROPE,
                "layer_types": ["mamba", "attention"],
                "mamba_n_heads": 8,
                "mamba_d_head": 32,
                "mamba_n_groups": 1,
                "mamba_d_state": 16,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "intermediate_size": 64,
                "shared_intermediate_size": 64,
                "position_embedding_type": "rope",
            },
            {**TOP, "layer_types": ["mamba", "attention"]},
        ),
        # Mamba-2 alone. One group: mlx-lm 0.32's gated norm normalizes over all heads at
        # once, transformers' (as mamba_ssm) per group (README). Its causal LM reads
        # `lm_head.weight.dtype` in forward: a tied quantized head is refused by name
        # Nemotron 3 Super's MoE: the experts work in a latent space (fc1/fc2_latent_proj)
        "nemotron_h_latent": (
            {
                **_MAMBA2,
                "num_hidden_layers": 4,
                "layers_block_type": ["linear_attention", "moe", "full_attention", "mlp"],
                "n_routed_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 64,
                "moe_shared_expert_intermediate_size": 64,
                "moe_latent_size": 64,
            },
            {},
        ),
        # Granite 4.0-H Micro and Granite 4.0 Micro: no experts, the shared MLP only, which
        # mlx-lm splits into gate_proj/up_proj (transformers: one fused input_linear)
        "granitemoehybrid_dense": (
            {
                **ROPE,
                "layer_types": ["mamba", "attention"],
                "mamba_n_heads": 8,
                "mamba_d_head": 32,
                "mamba_n_groups": 1,
                "mamba_d_state": 16,
                "num_local_experts": 0,
                "shared_intermediate_size": 256,
                "position_embedding_type": "rope",
            },
            {**TOP, "layer_types": ["mamba", "attention"]},
        ),
        "mamba2": (
            {"num_heads": 8, "head_dim": 32, "n_groups": 1, "state_size": 16, "chunk_size": 8},
            {},
        ),
        # Falcon Mamba: Mamba with RMS norms (no weight) on the mixer's B, C and dt; mlx-lm runs
        # it as its mamba (model_type remapped), the norms chosen by the model type
        "falcon_mamba": ({}, {}),
        # Gemma 4's language model with per-layer inputs (E2B/E4B); mlx-lm reads a top-level
        # vocab_size
        "gemma4": (
            {
                **_PER_TYPE_ROPE,
                "hidden_size_per_layer_input": 16,
                "vocab_size_per_layer_input": VOCAB,
            },
            {"vocab_size": VOCAB},
        ),
        # Gemma 4 Unified's language model (no per-layer inputs, which mlx-lm's gemma4 reads
        # as present when hidden_size_per_layer_input is set); mlx-lm reads a top-level
        # vocab_size
        "gemma4_unified": (
            {**_PER_TYPE_ROPE, "hidden_size_per_layer_input": 0},
            {"vocab_size": VOCAB},
        ),
        # Gemma 3n's language model: 4 layers, the last two reusing the keys and values of the
        # last earlier layer of their kind (KV sharing), a sliding window shorter than the test
        # sequences, AltUp with 2 streams, LAuReL, per-layer inputs, and layer 0's activation
        # sparsity (gelu over the 95th percentile's cut-off). mlx-lm reads its rope keys in
        # text_config
        "gemma3n": (
            {
                "num_hidden_layers": 4,
                "layer_types": ["sliding_attention", "full_attention"] * 2,
                "sliding_window": 8,
                "num_kv_shared_layers": 2,
                "laurel_rank": 16,
                "altup_num_inputs": 2,
                "hidden_size_per_layer_input": 16,
                "vocab_size_per_layer_input": VOCAB,
                "activation_sparsity_pattern": [0.95, 0.0, 0.0, 0.0],
                "rope_parameters": {
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                    "full_attention": {"rope_type": "default", "rope_theta": THETA},
                },
            },
            {"rope_theta": THETA, "rope_local_base_freq": 10_000.0},
        ),
        # IQuest-Coder: Llama's model under its own type (transformers and mlx-lm both run it
        # as Llama)
        "iquestcoder": (ROPE, TOP),
        # Mistral Small 4: DeepSeek V3's MLA and MoE (layer 0 dense), interleaved rope; its
        # default yarn rope with Llama 4's query scaling (mlx-lm reads rope_parameters). The
        # rope covers head_dim (qk_nope + qk_rope) x partial_rotary_factor (qk_rope / head_dim)
        "mistral4": ({**_DEEPSEEK, "n_routed_experts": 4}, {}),
        # OLMo Hybrid: gated-delta linear attention (layer 0), post-norm attention (layer 1);
        # keys half as wide as values
        "olmo_hybrid": (
            {
                **ROPE,
                "layer_types": ["linear_attention", "full_attention"],
                "linear_num_key_heads": 2,
                "linear_num_value_heads": 4,
                "linear_key_head_dim": 32,
                "linear_value_head_dim": 32,
            },
            TOP,
        ),
        # Kimi Linear: KDA linear attention (layer 0), MLA without rope (layer 1); layer 0 dense,
        # layer 1 MoE (sigmoid router, shared expert). mlx-lm reads the Hub's own keys
        "kimi_linear": (
            {
                **_DEEPSEEK,
                "q_lora_rank": None,
                "num_local_experts": 4,
                "layer_types": ["linear_attention", "full_attention"],
                "linear_head_dim": 32,
                "linear_num_heads": 4,
                "first_k_dense_replace": 1,
            },
            {
                "rope_theta": THETA,
                "linear_attn_config": {
                    "head_dim": 32,
                    "num_heads": 4,
                    "short_conv_kernel_size": 4,
                    "kda_layers": [1],
                    "full_attn_layers": [2],
                },
                "model_max_length": 256,
                "num_experts": 4,
                "num_experts_per_token": 2,
                "num_shared_experts": 1,
                "moe_renormalize": True,
                "first_k_dense_replace": 1,
                "mla_use_nope": True,
            },
        ),
        # Ling/Ring hybrid (bailing_hybrid): linear attention (layer 0), MLA (layer 1), layer 0
        # dense, layer 1 MoE. mlx-lm reads keys transformers 5 writes under other names
        "bailing_hybrid": (
            {
                **ROPE,
                **_DEEPSEEK,
                "q_lora_rank": None,
                "num_local_experts": 4,
                "layer_types": ["linear_attention", "full_attention"],
                "layer_group_size": 2,
                "first_k_dense_replace": 1,
                "num_mtp_layers": 0,
            },
            {
                **TOP,
                "num_experts_per_tok": 2,
                "n_group": 1,
                "max_position_embeddings": 256,
                "group_norm_size": 4,  # one group per head: transformers' per-head gated norm
            },
        ),
        # Muse Spark: an image-text-audio model; mlx-lm converts it (its language model, MoE
        # layers only) but runs it with Metal kernels only: no oracle on this machine
        "muse_spark": (
            {
                **_MOE,
                "moe_hidden_size": 64,
                "num_local_experts": 4,
                "sliding_window": 64,
                "mlp_layer_types": ["sparse", "sparse"],
            },
            {},
        ),
    }
)

# parameters multiplied after the random init, so that a nonlinearity's edge is reached:
# gpt-oss's gate/up values then pass its clamp (swiglu_limit 7) for about 1% of them
AMPLIFIED = {"gpt_oss": {"gate_up_proj": 3.0}}


def _gpt_oss_hub_layout(folder: Path) -> None:
    """Rewrite transformers 5's gpt-oss experts (`experts.gate_up_proj` [E, H, 2I], gate and up
    interleaved; `experts.down_proj` [E, I, H]; `*_bias`) as the Hub's original layout that
    mlx-lm's sanitize reads (`gate_up_proj.weight` [E, 2I, H], `down_proj.weight` [E, H, I],
    biases as they are): transposes only, so that sanitize itself de-interleaves gate and up
    (the oracle does not share mlxq's split)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    out = {}
    for key, value in tensors.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[f"{key}.weight"] = value.transpose(1, 2).contiguous()
        else:
            out[key] = value
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})


def _fused_experts_hub_layout(folder: Path) -> None:
    """Rewrite transformers 5's per-expert tensors (`mlp.experts.<e>.{gate,up,down}_proj.weight`,
    as it saves Qwen 3.5 MoE) as the Hub's fused layout that mlx-lm's sanitize reads:
    `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows, then up) and `mlp.experts.down_proj`
    [E, H, I]; concatenation and stacking only."""
    import re

    import torch
    from safetensors.torch import load_file, save_file

    out, experts = {}, {}
    for key, value in load_file(folder / "model.safetensors").items():
        m = re.match(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", key)
        if m is None:
            out[key] = value
        else:
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = value
    for prefix, by_index in experts.items():
        order = [by_index[e] for e in sorted(by_index)]
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([p["gate"], p["up"]]) for p in order]
        )
        out[f"{prefix}.down_proj"] = torch.stack([p["down"] for p in order])
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})


def _llama4_text_head(folder: Path) -> None:
    """mlx-lm's (dense) llama4_text names the untied head `output`, not `lm_head`."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    if "lm_head.weight" in tensors:
        tensors["output.weight"] = tensors.pop("lm_head.weight")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _olmo_hybrid_hub_layout(folder: Path) -> None:
    """transformers 5 saves OLMo Hybrid's layer norms under legacy names (`attention_layer_norm`,
    `feedforward_layer_norm`, which it reads back as `input_layernorm` and
    `post_attention_layernorm`), and its fused q/k/v convolution cut into equal thirds; mlx-lm
    reads the norms' own names and the q/k/v convolutions at their widths: renamed, and the
    thirds joined again and cut at the key and value widths."""
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((folder / "config.json").read_text())
    key = config["linear_num_key_heads"] * config["linear_key_head_dim"]
    value = config["linear_num_value_heads"] * config["linear_value_head_dim"]
    names = {
        "attention_layer_norm": "input_layernorm",
        "feedforward_layer_norm": "post_attention_layernorm",
    }
    tensors = {}
    for name, tensor in load_file(folder / "model.safetensors").items():
        for old, new in names.items():
            name = name.replace(f".{old}.", f".{new}.")
        tensors[name] = tensor
    for name in [k for k in tensors if k.endswith("linear_attn.q_conv1d.weight")]:
        prefix = name.removesuffix("q_conv1d.weight")
        parts = [tensors.pop(f"{prefix}{p}_conv1d.weight") for p in "qkv"]
        fused = torch.cat(parts)
        for p, part in zip("qkv", torch.split(fused, [key, key, value]), strict=True):
            tensors[f"{prefix}{p}_conv1d.weight"] = part.contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _kimi_linear_dense_mlp(folder: Path) -> None:
    """transformers 5 saves Kimi Linear's dense MLPs under the MoE name `block_sparse_moe.`
    (its renaming of the Hub's MoE blocks, reversed for every layer); mlx-lm reads them as the
    Hub names them, `mlp.`."""
    import re

    from safetensors.torch import load_file, save_file

    tensors = {
        re.sub(r"\.block_sparse_moe\.(gate|up|down)_proj\.", r".mlp.\1_proj.", k): v
        for k, v in load_file(folder / "model.safetensors").items()
    }
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


# nanochat's own names, which mlx-lm's model has (its sanitize renames nothing)
_NANOCHAT_NAMES = (
    (r"^model\.embed_tokens\.", "transformer.wte."),
    (r"^model\.layers\.", "transformer.h."),
    (r"\.self_attn\.q_proj\.", ".attn.c_q."),
    (r"\.self_attn\.k_proj\.", ".attn.c_k."),
    (r"\.self_attn\.v_proj\.", ".attn.c_v."),
    (r"\.self_attn\.o_proj\.", ".attn.c_proj."),
    (r"\.mlp\.fc1\.", ".mlp.c_fc."),
    (r"\.mlp\.fc2\.", ".mlp.c_proj."),
)


def _nanochat_names(folder: Path) -> None:
    """transformers 5 saves nanochat under Llama-like names; mlx-lm reads nanochat's own."""
    import re

    from safetensors.torch import load_file, save_file

    tensors = {}
    for key, value in load_file(folder / "model.safetensors").items():
        for pattern, repl in _NANOCHAT_NAMES:
            key = re.sub(pattern, repl, key)
        tensors[key] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _longcat_zero_experts(folder: Path) -> None:
    """transformers 5 saves tensors for LongCat-Flash's zero (identity) experts, numbered after
    the routed ones, which its forward does not read and mlx-lm's model has no place for."""
    import re

    from safetensors.torch import load_file, save_file

    routed = json.loads((folder / "config.json").read_text())["n_routed_experts"]
    tensors = {
        k: v
        for k, v in load_file(folder / "model.safetensors").items()
        if not ((m := re.search(r"\.experts\.(\d+)\.", k)) and int(m[1]) >= routed)
    }
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


# architectures whose transformers 5 checkpoint mlx-lm cannot read: rewritten in a layout its
# sanitize reads before `mlx_lm.convert`
MLX_LM_INPUT_LAYOUT = {
    "gpt_oss": _gpt_oss_hub_layout,
    "qwen3_5_moe": _fused_experts_hub_layout,
    "llama4_text": _llama4_text_head,
    "olmo_hybrid": _olmo_hybrid_hub_layout,
    "kimi_linear": _kimi_linear_dense_mlp,
    "nanochat": _nanochat_names,
    "longcat_flash": _longcat_zero_experts,
}

# entries of the table that are a second variant of a model type
MODEL_TYPE = {
    "granitemoehybrid_dense": "granitemoehybrid",
    "nemotron_h_latent": "nemotron_h",
    "falcon_h1_mup": "falcon_h1",
}

# transformers 5.24 has a causal LM for these configs but no AutoModelForCausalLM entry
CAUSAL_LM_CLASS = {"mistral4": "Mistral4ForCausalLM"}
# image-text models whose mlx-lm checkpoint (the language model only) loads through the text
# model's class (AutoModelForCausalLM builds the image-text model, which mlxq refuses naming it)
CAUSAL_LM_CLASS["gemma4_unified"] = "Gemma4UnifiedForCausalLM"
CAUSAL_LM_CLASS["gemma4"] = "Gemma4ForCausalLM"
CAUSAL_LM_CLASS["gemma3n"] = "Gemma3nForCausalLM"


def causal_lm_class(arch: str):
    """The class a causal LM of `arch` loads with (AutoModelForCausalLM where it maps it)."""
    import transformers

    return getattr(transformers, CAUSAL_LM_CLASS.get(arch, "AutoModelForCausalLM"))


# the Hub's GPT-2 checkpoints (which mlx-lm's sanitize expects) have no `transformer.` prefix
HUB_PREFIX_DROPPED = {"gpt2": "transformer."}

# the fast subset run by pytest
FAST = (
    "gemma",
    "gemma2",
    "gemma3_text",
    "gpt2",
    "gpt_neox",
    "llama",
    "qwen3",
    "phi",
    "falcon_h1",
    "qwen3_5",
    "iquestcoder",
    "gemma4_unified",
    "gemma3n",
    "gemma4",
    "exaone",
    "exaone4",
    "lfm2",
    "apertus",
)
# mixture-of-experts architectures run by pytest (tests/test_moe.py)
MOE_FAST = (
    "qwen3_moe",
    "mixtral",
    "olmoe",
    "qwen2_moe",
    "jamba",
    "qwen3_next",
    "qwen3_5_moe",
    "lfm2_moe",
)
TOKENS = [1, 5, 77, 300, 12, 499, 3, 42, 250, 7, 128, 64]


@dataclass(frozen=True)
class Variant:
    """One conversion: tied or untied head, and mlx-lm's quantization settings."""

    tied: bool
    bits: int = 4
    group_size: int = 64
    recipe: str | None = None
    mode: str = "affine"  # mlx_lm convert --q-mode

    @property
    def tag(self) -> str:
        recipe = self.recipe or f"{self.bits}bit"
        mode = "" if self.mode == "affine" else f"{self.mode}-"
        return f"{'tied' if self.tied else 'untied'}-{mode}{recipe}-g{self.group_size}"


def _mixed_fp(path: str, module) -> bool | dict:
    """A per-module recipe across modes (mlx-lm's string recipes are affine only): `down_proj`
    in mxfp8, embeddings and head in affine 4-bit g64, the rest in the top-level mode."""
    if path.endswith("down_proj"):
        return {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    if path.endswith(("embed_tokens", "lm_head")):
        return {"group_size": 64, "bits": 4, "mode": "affine"}
    return True


# recipes given to mlx_lm.convert as a callable predicate
PREDICATES = {"mixed_fp": _mixed_fp}


VARIANTS = (Variant(tied=True), Variant(tied=False, bits=3, recipe="mixed_3_6"))


def tiny_tokenizer(out: Path) -> None:
    """A word-level tokenizer over `t0..t511` with <pad>/<s>/</s> at ids 0/1/2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"t{i}": i for i in range(4, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(out)


def _config(arch: str, tied: bool):
    from transformers import AutoConfig

    overrides = copy.deepcopy(ARCHS[arch][0])  # transformers edits rope_parameters in place
    params = {**BASE, **overrides, "tie_word_embeddings": tied}
    params = {k: v for k, v in params.items() if v is not None}
    if arch in IMAGE_TEXT:  # the text settings nest; the vision tower stays tiny
        vision = IMAGE_TEXT[arch]
        return AutoConfig.for_model(
            arch,
            text_config=params,
            vision_config=vision,
            tie_word_embeddings=tied,
            **copy.deepcopy(IMAGE_TEXT_EXTRA.get(arch, {})),
        )
    return AutoConfig.for_model(TEXT_MODEL_OF.get(arch, MODEL_TYPE.get(arch, arch)), **params)


def _as_image_text(arch: str, folder: Path) -> None:
    """The text model saved in `folder` rewritten as the Hub's image-text checkpoint (see
    TEXT_MODEL_OF). Gemma 3n: transformers builds no key/value projections for KV-shared
    layers, which the Hub's checkpoints (and mlx-lm's model) have: added, random (unused)."""
    import torch
    from safetensors.torch import load_file, save_file

    text = json.loads((folder / "config.json").read_text())
    tensors = {
        (f"model.language_model.{k.removeprefix('model.')}" if k.startswith("model.") else k): v
        for k, v in load_file(folder / "model.safetensors").items()
    }
    generator = torch.Generator().manual_seed(1)
    first_shared = text["num_hidden_layers"] - text.get("num_kv_shared_layers", 0)
    for i in range(first_shared, text["num_hidden_layers"]):
        for leaf in ("k_proj.weight", "v_proj.weight", "k_norm.weight"):
            like = tensors[f"model.language_model.layers.0.self_attn.{leaf}"]
            noise = torch.randn(like.shape, generator=generator) * 0.08
            tensors[f"model.language_model.layers.{i}.self_attn.{leaf}"] = noise.to(like.dtype)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = {
        "model_type": arch,
        "architectures": ["Gemma3nForConditionalGeneration"],
        "text_config": {**text, **ARCHS[arch][1]},
        "tie_word_embeddings": text["tie_word_embeddings"],
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


_SAME_AS = {"rotary_emb_base": "rope_theta", "rotary_pct": "partial_rotary_factor"}


def _check_mlx_keys(arch: str, config) -> None:
    """The keys written for mlx-lm must describe the model transformers runs (a config kwarg
    that transformers ignores would otherwise make the two oracles run different models)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope.get("full_attention"), dict):
        local = rope["sliding_attention"]["rope_theta"]
        rope = {**rope["full_attention"], "rope_local_base_freq": local}
    for key, value in ARCHS[arch][1].items():
        name = _SAME_AS.get(key, key)
        if name in rope and rope[name] != value:
            raise AssertionError(f"{arch}: mlx-lm key {key}={value}, transformers {rope[name]}")


def tiny_float_checkpoint(arch: str, out: Path, tied: bool, **overrides) -> Path:
    """A tiny random bf16 model of `arch` saved by transformers, readable by mlx-lm;
    `overrides`: config attributes set over :data:`ARCHS`' (tests/quant_tools.py's)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _config(arch, tied)
    for key, value in overrides.items():
        setattr(config, key, value)
    _check_mlx_keys(arch, getattr(config, "text_config", config))
    torch.manual_seed(0)
    if arch in IMAGE_TEXT:  # saved as the Hub has it: the image-text model
        from transformers import AutoModelForImageTextToText as AutoModelForCausalLM
    elif arch in CAUSAL_LM_CLASS:
        AutoModelForCausalLM = causal_lm_class(arch)
        config.architectures = [CAUSAL_LM_CLASS[arch]]
    model = (
        AutoModelForCausalLM.from_config(config)
        if hasattr(AutoModelForCausalLM, "from_config")
        else AutoModelForCausalLM(config)
    ).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            else:  # norms and biases away from their init values (0 or 1)
                p.add_(torch.randn_like(p) * 0.05)
        for name, p in model.named_parameters():
            scale = AMPLIFIED.get(arch, {}).get(name.rsplit(".", 1)[-1])
            if scale is not None:
                p.mul_(scale)
    model.save_pretrained(out)
    if arch in HUB_PREFIX_DROPPED:
        from safetensors.torch import load_file, save_file

        prefix = HUB_PREFIX_DROPPED[arch]
        tensors = load_file(out / "model.safetensors")
        tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    tiny_tokenizer(out)
    if arch in TEXT_MODEL_OF:
        _as_image_text(arch, out)
        return out
    if arch in NEEDS_CHAT_TEMPLATE:
        tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
        tokenizer_config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(ARCHS[arch][1])
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def _cache_key(arch: str, variant: Variant) -> str:
    from mlxq.demo_model import _versions

    spec = [BASE, ARCHS[arch], variant.tag, VOCAB]
    if arch in AMPLIFIED:  # (other architectures keep their cached checkpoints)
        spec.append(AMPLIFIED[arch])
    spec = json.dumps(spec, sort_keys=True, default=str)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:10]
    return f"arch-{arch}-{variant.tag}-{_versions('transformers', 'mlx-lm')}-{digest}"


def _cached_conversion(
    key: str, arch: str, variant: Variant, prepare, convert=None, **options
) -> Path:
    """`convert` (mlx_lm.convert unless given) of the tiny float checkpoint after
    `prepare(float_dir)` rewrote it, cached under `key`."""
    if convert is None:
        from mlx_lm import convert

    def build(float_dir: Path, out: Path) -> None:
        tiny_float_checkpoint(arch, float_dir, variant.tied)
        prepare(float_dir)
        with contextlib.redirect_stdout(io.StringIO()):
            convert(
                str(float_dir),
                str(out),
                quantize=True,
                q_group_size=variant.group_size,
                q_bits=variant.bits,
                **options,
            )

    return cached_checkpoint(key, build)


def tiny_mlx_checkpoint(arch: str, variant: Variant) -> Path:
    """The tiny model converted by `mlx_lm.convert` (cached). Raises what mlx-lm raises."""
    return _cached_conversion(
        _cache_key(arch, variant),
        arch,
        variant,
        MLX_LM_INPUT_LAYOUT.get(arch, lambda folder: None),
        q_mode=variant.mode,
        quant_predicate=PREDICATES.get(variant.recipe, variant.recipe),
    )


def tiny_mlx_vlm_checkpoint(arch: str, variant: Variant) -> Path:
    """The tiny text model converted by `mlx_vlm.convert -q` (cached): mlx-vlm 0.7 runs text
    models too, its port of mlx-lm's under `language_model.`, with an empty vision_config."""
    import mlx_vlm
    from mlx_vlm import convert

    key = f"{_cache_key(arch, variant)}-vlm{mlx_vlm.__version__}"
    prepare = MLX_LM_INPUT_LAYOUT.get(arch, lambda folder: None)
    return _cached_conversion(key, arch, variant, prepare, convert)


def mlx_vlm_text_logits(path: Path, tokens) -> np.ndarray:
    """mlx-vlm's fp32 logits of a text model it converted (its language model's forward)."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_vlm.utils import load_model

    model = load_model(Path(path))
    floats = lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p  # noqa: E731
    model.update(tree_map(floats, model.parameters()))
    out = model.language_model(mx.array(np.asarray(tokens, dtype=np.int32)[None]))
    return np.array(getattr(out, "logits", out)[0].astype(mx.float32))


def float_kept_in_fp32(folder: Path, arch: str, torch_dtype: str | None) -> list[str]:
    """Rewrite the float checkpoint in `folder` as the Hub stores a bf16 MoE model: the tensors
    transformers keeps in float32 (`_keep_in_fp32_modules_strict`: routers' weights and
    correction biases) stored in float32, with values no bf16 holds (a cast shows), and
    config.json's `torch_dtype` set (mlx-lm then casts all but its cast_predicate's names) or
    not (transformers 5 writes none: every tensor keeps its stored dtype). Returns their names."""
    import torch
    from safetensors.torch import load_file, save_file

    model = causal_lm_class(arch).from_pretrained(folder, dtype=torch.bfloat16)
    kept = {k for k, v in model.state_dict().items() if v.dtype == torch.float32}
    tensors = load_file(folder / "model.safetensors")
    names = sorted(kept & set(tensors))
    generator = torch.Generator().manual_seed(2)
    for name in names:
        v = tensors[name].float()
        tensors[name] = v + (torch.rand(v.shape, generator=generator) - 0.5) * 2e-3 * v.abs()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if torch_dtype is not None:
        config = json.loads((folder / "config.json").read_text())
        config["torch_dtype"] = torch_dtype
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return names


def tiny_mlx_checkpoint_fp32_kept(arch: str, variant: Variant, torch_dtype: str | None) -> Path:
    """`mlx_lm convert -q` of the float checkpoint of :func:`float_kept_in_fp32` (cached)."""
    return _cached_conversion(
        f"{_cache_key(arch, variant)}-fp32kept-{torch_dtype}",
        arch,
        variant,
        lambda folder: float_kept_in_fp32(folder, arch, torch_dtype),
        quant_predicate=variant.recipe,
    )


def mlxq_logits(path: Path, tokens) -> np.ndarray:
    """mlxq's fp32 logits through transformers' from_pretrained."""
    import torch

    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type", "")
    model = causal_lm_class(model_type).from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


@dataclass
class Outcome:
    """What happened to one architecture/variant: `loads` with a max diff, or a reason."""

    arch: str
    variant: Variant
    status: str  # "loads", "refused" (by mlxq), "mlx-lm fails" (no oracle)
    max_diff: float | None = None
    reason: str = ""

    def line(self) -> str:
        if self.status == "loads":
            return f"{self.arch:18s} {self.variant.tag:24s} loads    max|diff| {self.max_diff:.2e}"
        return f"{self.arch:18s} {self.variant.tag:24s} {self.status}: {self.reason}"


def run_arch(arch: str, variant: Variant) -> Outcome:
    """Convert with mlx-lm, run both, compare fp32 logits (mlxq errors become `refused`).

    A mixed recipe needs `down_proj` modules; without them the variant falls back to plain
    3-bit group 32 (still another format than the tied variant's)."""
    try:
        try:
            path = tiny_mlx_checkpoint(arch, variant)
        except ValueError as e:
            if variant.recipe is None or "expected keys for mixed quant" not in str(e):
                raise
            variant = Variant(variant.tied, bits=3, group_size=32)
            path = tiny_mlx_checkpoint(arch, variant)
        ref = mlx_lm_logits(path, TOKENS, cached=arch in MLX_LM_CACHED)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the oracle cannot run this variant
        return Outcome(arch, variant, "mlx-lm fails", reason=_one_line(e))
    try:
        got = mlxq_logits(path, TOKENS)
    except (NotImplementedError, ValueError, RuntimeError) as e:
        return Outcome(arch, variant, "refused", reason=_one_line(e))
    return Outcome(arch, variant, "loads", max_diff=float(np.abs(got - ref).max()))


# mlx-lm's own models have no untied head for these, and no tied head for those
MLX_LM_TIED_ONLY = {"gemma", "gemma2", "gpt2", "gemma4", "gemma4_unified", "gemma3n", "lfm2"}
MLX_LM_TIED_ONLY |= {"lfm2_moe"}
MLX_LM_UNTIED_ONLY = {"phi", "gpt_neox", "qwen2_moe"}


def assert_matches_mlx_lm(arch: str, variant: Variant, tolerance: float = 1e-3) -> None:
    """mlxq loads the tiny model's `variant` and its fp32 logits are mlx-lm's within
    `tolerance`; where mlx-lm's own model has no such head, mlx-lm must fail instead."""
    outcome = run_arch(arch, variant)
    print(f"\n{outcome.line()}")
    if (variant.tied and arch in MLX_LM_UNTIED_ONLY) or (
        not variant.tied and arch in MLX_LM_TIED_ONLY
    ):
        assert outcome.status == "mlx-lm fails", outcome.line()
        return
    assert outcome.status == "loads", outcome.line()
    assert outcome.max_diff <= tolerance, outcome.line()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"
