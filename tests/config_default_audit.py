"""Audit: config.json keys whose default differs between mlx-lm/mlx-vlm and transformers.

transformers' `save_pretrained` writes only the values that differ from its config class's
defaults, and mlx-lm builds its `ModelArgs` (mlx-vlm its `TextConfig`) from config.json with
dataclass defaults of its own: a key absent from config.json takes transformers' default in
mlxq and mlx-lm's in mlx-lm. This lists, for every model type that both know, each field with
a default whose transformers default (read through the config's attribute_map, and from
`rope_parameters` for the rope keys transformers 5 keeps there) is another value.

Keys that set a shape (:data:`SHAPE_KEYS`: the tensors would not fit, loudly) and rope dicts
that say nothing but default RoPE are left out. Which of the rest change the forward is read
from mlx-lm's source by hand: decided in :mod:`mlxq.integrations.config_defaults` (mlx-lm's
default given at load, or refused), or listed here in :data:`NOT_FORWARD` or
:data:`UNVERIFIED` with the reason; tests/test_config_defaults.py pins that every mlx-lm row is
one of these. The mlx-vlm rows (its TextConfig/VisionConfig against transformers' sub-config
classes) of the image-text families mlxq maps are pinned the same way (decided in
MLX_TEXT_CONFIG_DEFAULTS/_REFUSED/_DERIVED, or :data:`VLM_NOT_FORWARD`, :data:`VLM_UNVERIFIED`).

    python tests/config_default_audit.py          # the table, mlx-lm then mlx-vlm
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
from typing import Any

# keys transformers 5 reads from rope_parameters (not as attributes)
_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")
_ABSENT = object()
# keys that set a tensor's shape or a layer count: where the two defaults differ, the tensors
# do not fit (mlx-lm or transformers fails loudly at load), so they are not listed
SHAPE_KEYS = frozenset(
    """vocab_size hidden_size intermediate_size moe_intermediate_size num_hidden_layers
    num_attention_heads num_key_value_heads head_dim max_position_embeddings n_routed_experts
    num_experts num_local_experts moe_num_experts n_shared_experts num_shared_experts
    moe_num_shared_experts shared_intermediate_size shared_expert_intermediate_size
    kv_lora_rank q_lora_rank qk_rope_head_dim qk_nope_head_dim v_head_dim text_config
    vision_config audio_config backbone_config pad_token_id bos_token_id eos_token_id
    mamba_d_head mamba_d_ssm mamba_d_state mamba_n_heads mamba_n_groups mamba_d_conv
    mamba_expand mamba_dt_rank mamba_proj_bias mamba_conv_bias ssm_state_size conv_kernel
    depth patch_size image_size out_hidden_size num_channels projection_size
    linear_num_value_heads linear_num_key_heads linear_key_head_dim linear_value_head_dim
    first_k_dense_replace num_dense_layers moe_layer_start_index moe_layer_end_index
    num_nextn_predict_layers""".split()
)


# the differences found that do not change what runs (or fail loudly), with the reason read in
# mlx-lm 0.32's source; the rest are decided in mlxq.integrations.config_defaults
NOT_FORWARD: dict[tuple[str, str], str] = {
    ("bailing_hybrid", "partial_rotary_factor"): "mlx-lm's model is not transformers' (refused "
    "by name)",
    **{
        ("laguna", key): "mlx-lm derives transformers' list (the same rule)"
        for key in ("layer_types", "num_attention_heads_per_layer", "mlp_layer_types")
    },
    **{
        ("step3p5", key): "mlxq refuses step3p5 (transformers has no model of Step3p7TextConfig)"
        for key in ("sliding_window", "layer_types", "moe_router_scaling_factor")
    },
    ("deepseek_v2", "topk_method"): "'gready' and 'greedy': mlx-lm tests group_limited_greedy only",
    ("falcon_h1", "mamba_chunk_size"): "the scan's chunking: same result up to rounding",
    ("gemma4_text", "partial_rotary_factor"): "not read: mlx-lm's default rope_parameters rule",
    ("gemma4_text", "rope_parameters"): "mlx-lm's default is transformers' (both layer types)",
    ("gemma4_text", "use_double_wide_mlp"): "shapes: the tensors do not fit (loud)",
    ("glm", "attention_bias"): "shapes: bias tensors present or not (loud)",
    ("seed_oss", "attention_bias"): "shapes: bias tensors present or not (loud)",
    ("glm_moe_dsa", "rope_theta"): "mlx-lm requires rope_parameters (fails without: loud)",
    ("qwen3", "rope_theta"): "mlx-lm raises 'rope_theta is missing' (loud)",
    ("gpt_oss", "layer_types"): "mlx-lm derives transformers' alternating pattern",
    ("granitemoehybrid", "num_experts_per_tok"): "mlx-lm's None fails in a MoE layer (loud)",
    (
        "jamba",
        "layers_block_type",
    ): "mlx-lm derives it from attn_layer_period/offset as transformers",
    ("lfm2", "full_attn_idxs"): "mlx-lm derives it from layer_types",
    ("lfm2", "layer_types"): "mlx-lm needs it or full_attn_idxs (fails without: loud)",
    ("mistral4", "qk_head_dim"): "derived: qk_nope_head_dim + qk_rope_head_dim in both",
    ("mistral4", "rope_interleave"): "mlx-lm's None means True, transformers' default",
    ("muse_spark", "projector_hidden_size"): "shapes: the projector's tensors (loud)",
    ("nemotron_h", "hybrid_override_pattern"): "the layer structure: tensors do not fit (loud)",
    ("nemotron_h", "layers_block_type"): "the layer structure: tensors do not fit (loud)",
    ("nemotron_h", "layer_types"): "the layer structure: tensors do not fit (loud)",
    ("nemotron_h", "moe_shared_expert_intermediate_size"): "shapes (loud)",
    ("nemotron_h", "n_group"): "mlx-lm's None fails in its router (loud)",
    ("nemotron_h", "topk_group"): "mlx-lm's None fails in its router (loud)",
    ("nemotron_h", "num_experts_per_tok"): "mlx-lm's None fails in its router (loud)",
    ("nemotron_h", "routed_scaling_factor"): "mlx-lm's None fails in its router (loud)",
    ("nemotron_h", "time_step_limit"): "mlx-lm's None becomes (0, inf), transformers' default",
    ("nemotron_h", "time_step_min"): "initialization only",
    ("nemotron_h", "time_step_max"): "initialization only",
    ("olmo3", "layer_types"): "mlx-lm derives transformers' pattern (3 sliding, 1 full)",
    ("olmo_hybrid", "layer_types"): "mlx-lm derives transformers' pattern",
    ("smollm3", "layer_types"): "mlx-lm derives it (all full attention) as transformers",
    ("smollm3", "no_rope_layers"): "mlx-lm derives every 4th layer without RoPE, as transformers",
    ("recurrent_gemma", "block_types"): "mlx-lm derives it from _block_types as transformers",
}
# differences not settled here (left for a follow-up: the reason says what is open)
UNVERIFIED: dict[tuple[str, str], str] = {}

_LOUD_VLM = "mlx-vlm fails to load the checkpoint without it (loud)"
_SAME_LOGITS = "mlxq gives mlx-vlm's logits without it (the tiny model)"
# the mlx-vlm rows (of the image-text families mlxq maps) that do not change what runs, with the
# reason: read in mlx-vlm 0.7.10's source or seen with the tiny models of tests/vlm_models.py
# (the key deleted from the converted config.json: mlx-vlm fails, or gives mlxq's logits to
# 1e-5 on a text prompt; vision_config keys on an image prompt); the rest are decided in
# mlxq.integrations.config_defaults (MLX_TEXT_CONFIG_*), or open (VLM_UNVERIFIED)
VLM_NOT_FORWARD: dict[tuple[str, str], str] = {
    ("cohere_compass.text_config", "tie_word_embeddings"): "the head: " + _SAME_LOGITS,
    ("cohere_compass.text_config", "layer_types"): "mlx-vlm derives all full attention, as "
    "transformers",
    ("gemma4.text_config", "partial_rotary_factor"): "not read: the rope of each layer type is",
    ("gemma4.text_config", "use_double_wide_mlp"): "shapes: the tensors do not fit (loud)",
    ("gemma4.vision_config", "rope_parameters"): _SAME_LOGITS + " (axial rope, theta 100)",
    ("gemma4_unified.text_config", "partial_rotary_factor"): "not read: the rope of each layer "
    "type is",
    ("gemma4_unified.text_config", "rope_parameters"): _SAME_LOGITS + "; mlx-lm's default is "
    "transformers'",
    ("gemma4_unified.text_config", "attention_k_eq_v"): "shapes: v_proj present or not (loud)",
    ("glm4v_moe.text_config", "rope_theta"): "mlx-vlm raises KeyError 'rope_theta' (loud)",
    ("glm4v_moe.text_config", "tie_word_embeddings"): "the head: " + _SAME_LOGITS,
    ("glm5_next.text_config", "mlp_layer_types"): _LOUD_VLM,
    ("glm5_next.text_config", "layer_types"): _LOUD_VLM,
    ("glm5_next.text_config", "indexer_types"): _SAME_LOGITS,
    ("glm_ocr.text_config", "dtype"): "the weights' dtype, not the forward",
    ("granite4_vision.text_config", "tie_word_embeddings"): "the head: " + _SAME_LOGITS,
    ("hunyuan_vl.text_config", "org_vocab_size"): "not in transformers' config.json; "
    + _SAME_LOGITS,
    ("hunyuan_vl.text_config", "attention_head_dim"): "not in transformers' config.json; "
    + _SAME_LOGITS,
    ("hunyuan_vl.text_config", "rope_scaling"): "mlx-vlm asserts its xdrope sections (loud)",
    ("hunyuan_vl.text_config", "dtype"): "the weights' dtype, not the forward",
    ("hunyuan_vl.text_config", "eod_token_id"): "a token id, not the forward",
    ("hunyuan_vl.text_config", "pad_id"): "a token id, not the forward",
    ("hunyuan_vl.text_config", "sep_token_id"): "a token id, not the forward",
    ("internvl.vision_config", "attention_bias"): "shapes: bias tensors present or not (loud)",
    ("kimi_k25.vision_config", "merge_kernel_size"): _SAME_LOGITS,
    ("muse_glimmer.text_config", "layer_types"): _SAME_LOGITS,
    ("muse_glimmer.text_config", "layer_rope_theta"): _SAME_LOGITS,
    ("muse_glimmer.vision_config", "rope_parameters"): _SAME_LOGITS,
    ("muse_glimmer.vision_config", "layer_types"): _SAME_LOGITS,
    ("paddleocr_vl.text_config", "hidden_act"): "mlx-vlm's ('silu',) is transformers' silu",
    ("paddleocr_vl.text_config", "use_bias"): "mlx-vlm's (False,) is transformers' False",
    ("qwen3_vl.vision_config", "deepstack_visual_indexes"): _LOUD_VLM + " (the mergers)",
    ("qwen3_vl_moe.text_config", "tie_word_embeddings"): "the head: " + _SAME_LOGITS,
    ("qwen3_vl_moe.vision_config", "deepstack_visual_indexes"): _LOUD_VLM + " (the mergers)",
    ("qwen4_exp.text_config", "layer_types"): _LOUD_VLM,
    ("qwen4_exp.text_config", "split_ngram_parts"): _LOUD_VLM,
    ("qwen4_exp.text_config", "ple_embed_dim"): _SAME_LOGITS,
    **{
        (f"{family}.text_config", "rope_scaling"): "mlx-vlm reads the mrope sections from "
        "rope_parameters too: " + _SAME_LOGITS + " on an image prompt"
        for family in ("glm4v_moe", "qwen3_vl", "qwen3_vl_moe", "paddleocr_vl")
    },
    ("cohere_compass.text_config", "sliding_window"): "read on sliding_attention layers "
    "alone (mlx-vlm's None: no window, transformers' 4096): refused where layer_types has "
    "one (config_defaults)",
    ("qwen2_vl.text_config", "sliding_window"): "mlx-vlm's Qwen2-VL does not read it (no "
    "window); transformers' None unless use_sliding_window",
    ("glm4v.text_config", "rope_scaling"): "absent: mlx-vlm's and transformers' default "
    "mrope sections are [8, 12, 12]; refused where rope_parameters gives others, which "
    "mlx-vlm does not read (config_defaults._check_glm4v_mrope)",
    **{
        ("qwen4_exp.text_config", key): "transformers' config refuses the set with one absent "
        "(QSA config is missing required fields); all absent, mlx-vlm's shapes do not fit (loud)"
        for key in (
            "indexer_n_heads",
            "indexer_kv_heads",
            "indexer_head_dim",
            "indexer_budget",
            "indexer_compress_ratio",
        )
    },
}
# mlx-vlm rows still open (the reason says what)
VLM_UNVERIFIED: dict[tuple[str, str], str] = {
    ("qwen2_5_vl.vision_config", "tokens_per_second"): "mlx-vlm 2, transformers 4: video "
    "positions only (the same logits on an image prompt); video unchecked",
    ("glm_ocr.text_config", "rope_parameters"): "mlx-vlm's default mrope sections [16, 24, "
    "24] fit GLM-OCR's head, transformers' [8, 12, 12] fail in its rotary embedding (loud, a "
    "torch split error); giving mlx-vlm's would run it, untested (the tiny head fits neither)",
}


def transformers_default(config: Any, key: str) -> Any:
    """The value a transformers config built without `key` holds for it (`_ABSENT` where it
    has no such attribute: transformers does not read the key)."""
    rope = getattr(config, "rope_parameters", None)
    if key in _ROPE_KEYS and isinstance(rope, dict):
        if isinstance(rope.get("full_attention"), dict):
            rope = rope["full_attention"]
        if key in rope:
            return rope[key]
        if key == "partial_rotary_factor" and not hasattr(config, key):
            return 1.0  # transformers' rotary embedding: the whole head
    try:
        return getattr(config, key)
    except AttributeError:
        return _ABSENT
    except Exception as e:  # noqa: BLE001 - per-layer attributes (heterogeneous configs)
        return f"<{type(e).__name__}>"


def _plain_rope(value: Any) -> bool:
    """A rope dict that says nothing but default RoPE (its theta is the rope_theta row's)."""
    if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()) and value:
        return all(_plain_rope(v) for v in value.values())  # keyed by layer type
    if not isinstance(value, dict):
        return False
    rest = {k: v for k, v in value.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return rest.get("rope_type", rest.get("type", "default")) == "default" and set(rest) <= {
        "rope_type",
        "type",
    }


def _same(a: Any, b: Any) -> bool:
    if a in (None, {}) and _plain_rope(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9)
        except (TypeError, ValueError):
            return False
    return a == b


def _defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _rows(model_type: str, args_cls: type, config_cls: type) -> list[tuple]:
    try:
        config = config_cls()
    except Exception as e:  # noqa: BLE001 - a config class that needs arguments
        return [(model_type, "<config>", "", "", f"transformers default config fails: {e}")]
    rows = []
    for key, mlx_default in _defaults(args_cls).items():
        if key == "model_type" or key in SHAPE_KEYS:
            continue
        value = transformers_default(config, key)
        if value is _ABSENT or _same(mlx_default, value):
            continue
        rows.append((model_type, key, mlx_default, value))
    return rows


def mlx_lm_rows() -> list[tuple]:
    """(model type, key, mlx-lm default, transformers default) of every differing default."""
    import mlx_lm.models
    from mlx_lm.utils import MODEL_REMAPPING
    from transformers import CONFIG_MAPPING

    rows = []
    for info in sorted(pkgutil.iter_modules(mlx_lm.models.__path__), key=lambda i: i.name):
        try:
            module = importlib.import_module(f"mlx_lm.models.{info.name}")
        except (Exception, SystemExit):  # noqa: BLE001 - a module that needs what is not installed
            continue
        args = getattr(module, "ModelArgs", None)
        if args is None or not dataclasses.is_dataclass(args):
            continue
        types = [info.name] + [t for t, m in MODEL_REMAPPING.items() if m == info.name]
        for model_type in types:
            if model_type in CONFIG_MAPPING:
                rows += _rows(model_type, args, CONFIG_MAPPING[model_type])
    return rows


def mlx_vlm_rows() -> list[tuple]:
    """The same for mlx-vlm's image-text models: its TextConfig against transformers'
    text_config class (the sub-config class of the model type's config)."""
    import mlx_vlm.models
    from transformers import CONFIG_MAPPING

    rows = []
    for info in sorted(pkgutil.iter_modules(mlx_vlm.models.__path__), key=lambda i: i.name):
        if info.name not in CONFIG_MAPPING:
            continue
        try:
            module = importlib.import_module(f"mlx_vlm.models.{info.name}")
        except (Exception, SystemExit):  # noqa: BLE001
            continue
        outer = CONFIG_MAPPING[info.name]
        for attr, sub_key in (("TextConfig", "text_config"), ("VisionConfig", "vision_config")):
            args = getattr(module, attr, None)
            sub_cls = getattr(outer, "sub_configs", {}).get(sub_key)
            if args is None or sub_cls is None or not dataclasses.is_dataclass(args):
                continue
            if sub_cls.__name__ == "AutoConfig":
                continue
            rows += [(f"{info.name}.{sub_key}", *r[1:]) for r in _rows(info.name, args, sub_cls)]
    return rows


def _short(value: Any) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= 90 else text[:87] + "..."


def main() -> None:
    for title, rows in (("mlx-lm 0.32", mlx_lm_rows()), ("mlx-vlm 0.7", mlx_vlm_rows())):
        print(f"## {title}: {len(rows)} differing defaults")
        for row in rows:
            print(" | ".join(_short(x) for x in row))


if __name__ == "__main__":
    main()
