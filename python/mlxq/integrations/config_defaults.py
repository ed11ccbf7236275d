"""Keys an MLX config.json lacks, read with mlx-lm's defaults, not transformers' (or refused).

transformers' `save_pretrained` writes only the values that differ from its config class's
defaults, and mlx-lm 0.32 builds its `ModelArgs` from config.json with dataclass defaults of
its own. Where a key is absent and the two defaults differ, the two libraries would run
different models from one checkpoint, silently. The checkpoint is mlx-lm's (mlx-lm is the
oracle), so the config.json of an MLX checkpoint gets mlx-lm's default for each such key that
changes the forward (:data:`MLX_LM_DEFAULTS`, from `tests/config_default_audit.py` and mlx-lm's
source) before transformers reads it. Refused, naming keys and values, where that cannot be
exact:

- the config gives the value under another name that transformers reads and mlx-lm does not
  (ERNIE 4.5 MoE's `num_experts_per_tok`, transformers' alias of `moe_k`): mlx-lm runs its
  default whatever the alias says, which is not the model the config describes;
- the key is a RoPE scaling that mlx-lm lacks and transformers' default has
  (:data:`MLX_LM_PLAIN_ROPE`: GPT-OSS's yarn, Apertus's llama3): mlx-lm runs plain RoPE, which
  transformers' config cannot be told to run.

Some defaults are derived from other keys rather than constant (:data:`MLX_LM_DERIVED`): Gemma
4's `num_kv_shared_layers` (mlx-lm's 20, which it cannot build with 20 layers or fewer) and
`layer_types` (mlx-lm: one full-attention layer in `sliding_window_pattern`, 5 unless given;
transformers: one in 6, and always the last), Laguna's per-layer-type `rope_parameters` (mlx-lm:
theta 10000 and config.json's `partial_rotary_factor` where a layer type's rope says none).
They are given as mlx-lm derives them, or refused where transformers cannot run that, or where
mlx-lm and mlx-vlm (which converted the checkpoint is not in config.json) derive them apart.

An image-text checkpoint's text_config gets mlx-vlm 0.7.10's defaults where mlx-lm has none
other (:data:`MLX_TEXT_CONFIG_DEFAULTS`), refused where the two differ
(:data:`MLX_TEXT_CONFIG_REFUSED`). A text model converted by mlx-vlm (config.json with an empty
vision_config) runs in mlx-vlm's port of mlx-lm's model, whose defaults are mlx-lm's except
those of :data:`MLX_VLM_TEXT_REFUSED`: refused.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = [
    "MLX_LM_DEFAULTS",
    "MLX_LM_DERIVED",
    "MLX_LM_PLAIN_ROPE",
    "MLX_TEXT_CONFIG_DEFAULTS",
    "MLX_TEXT_CONFIG_DERIVED",
    "MLX_TEXT_CONFIG_REFUSED",
    "MLX_VLM_TEXT_REFUSED",
    "with_mlx_lm_defaults",
]

_TIED = {"tie_word_embeddings": True}
_DEEPSEEK_V3 = {
    "num_experts_per_tok": 1,
    "routed_scaling_factor": 1.0,
    "n_group": 1,
    "topk_group": 1,
}
# model type -> {key: mlx-lm 0.32's default} where transformers 5.24's config class has another
# default and mlx-lm's model reads the key in its forward (or, tie_word_embeddings, in which head
# it builds: mlx-lm's sanitize drops `lm_head` when tied, so its converted checkpoints have none)
MLX_LM_DEFAULTS: dict[str, dict[str, Any]] = {
    "afmoe": {"num_experts_per_tok": 8, "route_scale": 2.826, "sliding_window": 2048,
              "mup_enabled": True},
    "bitnet": {"rope_theta": 10000.0, **_TIED},
    "cohere": {"rope_theta": 8000000.0},
    "cohere2": {"rope_theta": 50000.0},
    "deepseek_v3": _DEEPSEEK_V3,
    "deepseek_v32": _DEEPSEEK_V3,
    "ernie4_5_moe": {"moe_k": 1},
    "exaone": _TIED,
    "exaone_moe": {"rope_theta": 1000000.0},
    # the multipliers mlx_lm convert folded into the weights run as 1 in mlxq either way
    # (mlx_lm_layout.run_folded_multipliers); the tied head's ratio and saving read these
    "falcon_h1": {
        "rope_theta": 1e11,
        "attention_out_multiplier": 0.9375,
        "embedding_multiplier": 5.656854249492381,
        "key_multiplier": 0.390625,
        "lm_head_multiplier": 0.0390625,
        "mamba_norm_before_gate": False,
        "mlp_multipliers": [0.8838834764831844, 0.5859375],
        "ssm_in_multiplier": 1.25,
        "ssm_multipliers": [0.3535533905932738, 0.25, 0.3535533905932738, 0.5,
                            0.3535533905932738],
        "ssm_out_multiplier": 0.23570226039551587,
        **_TIED,
    },
    "gemma2": {"query_pre_attn_scalar": 144},  # (an int in transformers' config)
    "gemma3_text": {"sliding_window": 512},
    "gemma4_text": {"final_logit_softcapping": 30.0},
    "glm": _TIED,
    "glm4_moe_lite": {"rope_theta": 1000000.0},
    "granite": _TIED,
    "granitemoe": _TIED,
    "granitemoehybrid": {"position_embedding_type": "rope", "time_step_limit": [0.001, 100.0],
                         **_TIED},
    "iquestcoder": _TIED,
    "jamba": _TIED,
    "kimi_linear": {"num_experts_per_token": 1, "routed_scaling_factor": 1.0},
    "llama": _TIED,
    "mimo_v2_flash": {"attention_value_scale": None},  # mlx-lm: no value scale at all
    "minicpm3": {"rope_theta": 1000000.0, "tie_word_embeddings": False},
    "ministral3": _TIED,
    # mlx-lm runs Mistral as Llama: full attention where config.json gives no layer_types
    "mistral": {"sliding_window": None, **_TIED},
    "nemotron_h": {"norm_topk_prob": False},  # mlx-lm's None: not renormalized
    "olmo2": _TIED,
    "olmoe": _TIED,
    "phi": {"partial_rotary_factor": 0.4},
    "phimoe": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6},
    "qwen2": {"rope_theta": 1000000.0, **_TIED},
    "qwen2_moe": {"rope_theta": 1000000.0},
    "qwen3_next": {"norm_topk_prob": False},
    "seed_oss": _TIED,
    "smollm3": {"rope_theta": 10000.0},
    "starcoder2": {"rope_theta": 100000.0},
}  # fmt: skip
# model types whose transformers config defaults to a RoPE scaling that mlx-lm 0.32 runs without
# (its rope_scaling defaults to None: plain RoPE) -> that scaling's rope_type
MLX_LM_PLAIN_ROPE = {"apertus": "llama3", "gpt_oss": "yarn", "ministral3": "yarn",
                     "mistral4": "yarn"}  # fmt: skip
# mlx-lm's and mlx-vlm's Qwen 3.5 text rope (transformers' theta is 10000)
_QWEN3_5_ROPE = {
    "rope_type": "default",
    "mrope_section": [11, 11, 10],
    "rope_theta": 100000.0,
    "partial_rotary_factor": 0.25,
}
# image-text model type -> {text_config key: the default of mlx-vlm 0.7.10's TextConfig, which
# mlx-lm 0.32's model of the language model shares (or mlx-lm has no model of the type: Llama
# 3.2 Vision, Granite 4 Vision, GLM-4.1V, Qwen4-Exp)}, where transformers' text config has
# another (each checked against mlx-vlm's logits: tests/test_config_defaults.py)
MLX_TEXT_CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma4": {"final_logit_softcapping": 30.0},
    "gemma4_unified": {"final_logit_softcapping": 30.0},
    "glm4v": {"partial_rotary_factor": 0.5},
    "granite4_vision": {
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000000.0,
        "embedding_multiplier": 12.0,
        "attention_multiplier": 0.015625,
        "residual_multiplier": 0.22,
        "logits_scaling": 10.0,
    },
    "mllama": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0},
    "qwen3_5": {"rope_parameters": _QWEN3_5_ROPE},
    "qwen3_5_moe": {"rope_parameters": _QWEN3_5_ROPE},
    # (transformers' None: hidden_act, silu)
    "qwen4_exp": {
        "output_gate_type": "sigmoid",
        "rope_parameters": {**_QWEN3_5_ROPE, "rope_theta": 10000000.0},
    },
}
# image-text model type -> {text_config key: what mlx-lm's and mlx-vlm's defaults are}, where
# the two oracles' defaults differ (which converted the checkpoint is not in config.json)
MLX_TEXT_CONFIG_REFUSED: dict[str, dict[str, str]] = {
    "gemma3": {"sliding_window": "mlx-lm 0.32's 512, mlx-vlm 0.7.10's 1024, transformers' 4096"},
    "gemma4": {
        "rope_parameters": "full-attention partial_rotary_factor: mlx-lm 0.32's and "
        "transformers' 0.25, mlx-vlm 0.7.10's 1.0"
    },
}
# text model type -> {key: the defaults}, where the port of mlx-vlm 0.7.10 that runs a text
# checkpoint it converted (config.json with an empty vision_config) defaults the key otherwise
# than mlx-lm 0.32 (whose defaults the others get: the same in mlx-vlm's ports) and the value
# is not one transformers' model can be told to run, or mlx-vlm's model is not mlx-lm's there
MLX_VLM_TEXT_REFUSED: dict[str, dict[str, str]] = {
    "gemma3_text": {
        "sliding_window": "mlx-vlm 0.7.10's 1024, mlx-lm 0.32's 512, transformers' 4096"
    },
    "laguna": {
        "sliding_window": "mlx-vlm 0.7.10's None (no window), mlx-lm 0.32's and transformers' 512",
        "num_experts_per_tok": "mlx-vlm 0.7.10's 0, mlx-lm 0.32's and transformers' 8",
        "rope_parameters": "mlx-vlm 0.7.10: rope_theta (500000 unless given) on every layer "
        "type, mlx-lm 0.32: theta 10000, transformers: 500000 and half the head rotated on "
        "full-attention layers",
    },
}
# model type -> keys whose mlx-lm default is derived from other keys, settled by a rule of
# their own here (:func:`_gemma4_layers`, :func:`_laguna_rope`)
MLX_LM_DERIVED: dict[str, tuple[str, ...]] = {
    "gemma4_text": ("num_kv_shared_layers", "layer_types"),
    "laguna": ("rope_parameters", "partial_rotary_factor"),
}
# image-text model type -> text_config keys settled by the rule of :func:`_gemma4_layers`
MLX_TEXT_CONFIG_DERIVED: dict[str, tuple[str, ...]] = {
    "gemma4": ("num_kv_shared_layers", "layer_types"),
    "gemma4_unified": ("num_kv_shared_layers", "layer_types"),
}
# Gemma 4 model type -> {oracle: (its default num_kv_shared_layers, sliding_window_pattern)} for
# the language model's config (top level for gemma4_text, text_config for the image-text types:
# mlx-lm 0.32 runs all three with its gemma4_text ModelArgs, mlx-vlm 0.7.10 with its TextConfig).
# transformers 5.24: 0, and one full-attention layer in 6 with the last layer always one.
_GEMMA4_ORACLES: dict[str, dict[str, tuple[int, int]]] = {
    "gemma4_text": {"mlx-lm 0.32": (20, 5)},
    "gemma4": {"mlx-lm 0.32": (20, 5), "mlx-vlm 0.7.10": (20, 5)},
    "gemma4_unified": {"mlx-lm 0.32": (20, 5), "mlx-vlm 0.7.10": (0, 6)},
}
_SLIDING, _FULL = "sliding_attention", "full_attention"
# keys transformers 5 keeps in rope_parameters (a top-level one is moved there)
_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")


def _rope_parameters(config_dict: dict) -> dict:
    rope = config_dict.get("rope_parameters") or config_dict.get("rope_scaling") or {}
    if isinstance(rope.get("full_attention"), dict):  # keyed by layer type
        rope = rope["full_attention"]
    return rope if isinstance(rope, dict) else {}


def _aliases(model_type: str, key: str) -> list[str]:
    """The names transformers' config class of `model_type` also reads `key` under."""
    from transformers import CONFIG_MAPPING

    try:
        attribute_map = getattr(CONFIG_MAPPING[model_type], "attribute_map", {}) or {}
    except KeyError:
        return []
    return [alias for alias, target in attribute_map.items() if target == key]


def _check_rope_scaling(model_type: str, config_dict: dict) -> None:
    scaling = MLX_LM_PLAIN_ROPE.get(model_type)
    if scaling is None:
        return
    if config_dict.get("rope_scaling") is None and config_dict.get("rope_parameters") is None:
        raise ValueError(
            f"mlxq: config.json of model type {model_type!r} has no rope_scaling (nor "
            f"rope_parameters): mlx-lm 0.32 defaults it to None and runs plain RoPE, "
            f"transformers' {model_type} defaults to {scaling!r} scaling; the two would run "
            "different models. Give rope_scaling in config.json"
        )


def with_mlx_lm_defaults(config_dict: dict) -> dict:
    """`config_dict` (an MLX checkpoint's config.json, top level) with mlx-lm's default of every
    key of :data:`MLX_LM_DEFAULTS` that it lacks (a copy; unchanged where none is lacking).

    Refused (ValueError naming the keys and both values) where the config gives the key only
    under a transformers alias that mlx-lm does not read, with another value than mlx-lm's
    default, or lacks a RoPE scaling that transformers would add (:data:`MLX_LM_PLAIN_ROPE`)."""
    model_type = config_dict.get("model_type")
    if not isinstance(model_type, str):
        return config_dict
    _check_rope_scaling(model_type, config_dict)
    text = config_dict.get("text_config")
    if config_dict.get("vision_config") == {} and not isinstance(text, dict):
        _check_mlx_vlm_text(model_type, config_dict)
    if isinstance(text, dict):
        config_dict = _with_text_config_defaults(model_type, config_dict, text)
    if model_type == "gemma4_text":
        config_dict = _gemma4_layers(model_type, config_dict, "")
    elif model_type == "laguna":
        config_dict = _laguna_rope(config_dict)
    defaults = MLX_LM_DEFAULTS.get(model_type)
    if not defaults:
        return config_dict
    rope = _rope_parameters(config_dict)
    added: dict[str, Any] = {}
    for key, value in defaults.items():
        if key in config_dict:
            continue
        if key in _ROPE_KEYS and key in rope:
            # given in rope_parameters only: transformers reads it there (`mlxq inspect`
            # warns where mlx-lm reads the top-level key alone)
            continue
        for alias in _aliases(model_type, key):
            if alias in config_dict and config_dict[alias] != value:
                raise ValueError(
                    f"mlxq: config.json of model type {model_type!r} sets {alias}: "
                    f"{config_dict[alias]!r} and no {key}: transformers reads {alias} as {key}, "
                    f"mlx-lm 0.32 reads {key} alone and runs its default {value!r}; the two "
                    f"would run different models. Set {key} in config.json"
                )
        added[key] = value
    if not added:
        return config_dict
    out = {**config_dict, **added}
    params = config_dict.get("rope_parameters")
    rope_added = {k: v for k, v in added.items() if k in _ROPE_KEYS}
    if (
        rope_added
        and isinstance(params, dict)
        and not isinstance(params.get("full_attention"), dict)
    ):
        # transformers 5 reads these from rope_parameters where config.json has one
        out["rope_parameters"] = {**params, **rope_added}
    return out


def _with_text_config_defaults(model_type: str, config_dict: dict, text: dict) -> dict:
    """`config_dict` whose text_config has the defaults of :data:`MLX_TEXT_CONFIG_DEFAULTS`
    it lacks; refused where it lacks a key of :data:`MLX_TEXT_CONFIG_REFUSED`."""
    _refuse_absent(MLX_TEXT_CONFIG_REFUSED, model_type, text, "text_config.")
    rope = text.get("rope_parameters")
    rope = rope if isinstance(rope, dict) else {}
    if model_type == "glm4v" and text.get("rope_scaling") is None:
        _check_glm4v_mrope(rope)
    sliding = _SLIDING in (text.get("layer_types") or ())
    if model_type == "cohere_compass" and sliding and "sliding_window" not in text:
        raise ValueError(
            "mlxq: config.json of model type 'cohere_compass' has sliding_attention layers and "
            "no text_config.sliding_window: mlx-vlm 0.7.10 defaults it to None (no window), "
            "transformers to 4096; the two would run different models past 4096 tokens. Set "
            "text_config.sliding_window in config.json"
        )
    added = {}
    for key, value in MLX_TEXT_CONFIG_DEFAULTS.get(model_type, {}).items():
        if key in text or (key in _ROPE_KEYS and key in rope):
            continue  # (given in rope_parameters only: transformers reads it there)
        if key == "rope_parameters" and text.get("rope_scaling") is not None:
            continue  # (transformers reads rope_scaling as rope_parameters)
        added[key] = copy.deepcopy(value)
    if added:
        text = {**text, **added}
        rope_added = {k: v for k, v in added.items() if k in _ROPE_KEYS}
        if rope_added and rope and not isinstance(rope.get("full_attention"), dict):
            text["rope_parameters"] = {**rope, **rope_added}  # (transformers 5 reads it there)
    if model_type in _GEMMA4_ORACLES:
        text = _gemma4_layers(model_type, text, "text_config.")
    return (
        {**config_dict, "text_config": text}
        if text is not config_dict["text_config"]
        else config_dict
    )


# mlx-vlm 0.7.10's GLM-4.1V reads the mrope sections from text_config.rope_scaling alone
# (default [8, 12, 12], transformers' default too); transformers 5 from rope_parameters
_GLM4V_MROPE = [8, 12, 12]


def _check_glm4v_mrope(rope: dict) -> None:
    """ValueError where GLM-4.1V's text_config has no rope_scaling and its rope_parameters
    give other mrope sections than the default mlx-vlm then runs."""
    given = rope.get("mrope_section")
    if given is not None and list(given) != _GLM4V_MROPE:
        raise ValueError(
            "mlxq: config.json of model type 'glm4v' has no text_config.rope_scaling and "
            f"text_config.rope_parameters.mrope_section {list(given)}: mlx-vlm 0.7.10 reads the "
            f"sections from rope_scaling alone (its default {_GLM4V_MROPE}), transformers "
            "from rope_parameters; the two would run different models. Set "
            "text_config.rope_scaling in config.json"
        )


def _check_mlx_vlm_text(model_type: str, config_dict: dict) -> None:
    """ValueError naming the first key of :data:`MLX_VLM_TEXT_REFUSED` that the config.json
    of a text model converted by mlx-vlm lacks."""
    _refuse_absent(
        MLX_VLM_TEXT_REFUSED,
        model_type,
        config_dict,
        "",
        " converted by mlx-vlm (its empty vision_config)",
        "and no model here runs mlx-vlm's",
    )


def _refuse_absent(
    refused: dict,
    model_type: str,
    present: dict,
    where: str,
    converted: str = "",
    why: str = "so no model here is sure to match the one that converted it",
) -> None:
    """ValueError naming the first key of `refused[model_type]` (key -> both defaults, said)
    absent from `present` (config.json's part `where`: "" or "text_config.")."""
    for key, said in refused.get(model_type, {}).items():
        if key not in present:
            raise ValueError(
                f"mlxq: config.json of model type {model_type!r}{converted} has no {where}{key}: "
                f"its defaults differ ({said}), {why}. Set {where}{key} in config.json"
            )


def _gemma4_layers(model_type: str, config: dict, where: str) -> dict:
    """Gemma 4's language model `config` (config.json's part `where`: "" or "text_config.")
    with the `num_kv_shared_layers` and `layer_types` its oracles derive where it lacks them (a
    copy; unchanged where it lacks neither). ValueError naming the key and the defaults where
    the oracles derive them apart, where mlx-lm cannot build what it derives (KV sharing with
    no layer left to share from), or where the last layer is not full attention (transformers
    makes it one, with a log line; mlx-lm runs it as the list says)."""
    oracles = _GEMMA4_ORACLES[model_type]
    said = ", ".join(f"{name}'s {kv}" for name, (kv, _) in oracles.items())
    n = config.get("num_hidden_layers")
    added: dict[str, Any] = {}
    if "num_kv_shared_layers" not in config:
        shared = {kv for kv, _ in oracles.values()}
        if len(shared) > 1:
            raise ValueError(
                f"mlxq: config.json of model type {model_type!r} has no "
                f"{where}num_kv_shared_layers: its defaults differ ({said}, transformers' 0), "
                "so no model here is sure to match the one that converted it. Set "
                f"{where}num_kv_shared_layers in config.json"
            )
        (kv,) = shared
        if isinstance(n, int) and kv >= n:
            raise ValueError(
                f"mlxq: config.json of model type {model_type!r} has no "
                f"{where}num_kv_shared_layers: {said} (transformers' 0) leaves none of its {n} "
                "layers to compute keys and values, so that model cannot run (mlx-lm fails to "
                f"build it). Set {where}num_kv_shared_layers in config.json"
            )
        added["num_kv_shared_layers"] = kv
    layer_types = config.get("layer_types")
    if layer_types is None and isinstance(n, int):  # (no layer count: the shapes do not fit)
        derived = {}
        for name, (_, default) in oracles.items():
            pattern = config.get("sliding_window_pattern", default)
            cycle = [_SLIDING] * (pattern - 1) + [_FULL]
            derived[name] = (cycle * (n // len(cycle) + 1))[:n]
        lists = list(derived.values())
        if any(other != lists[0] for other in lists[1:]):
            patterns = ", ".join(f"{name}'s {d[1]}" for name, d in oracles.items())
            raise ValueError(
                f"mlxq: config.json of model type {model_type!r} has no {where}layer_types "
                f"(nor sliding_window_pattern): its defaults differ (one full-attention layer "
                f"in {patterns}), so no model here is sure to match the one that converted "
                f"it. Set {where}layer_types in config.json"
            )
        layer_types = added["layer_types"] = lists[0]
    if isinstance(layer_types, list) and layer_types and layer_types[-1] != _FULL:
        how = "derives (from sliding_window_pattern)" if "layer_types" in added else "gives"
        raise ValueError(
            f"mlxq: config.json of model type {model_type!r} {how} {where}layer_types ending "
            f"in {layer_types[-1]!r}: mlx-lm runs the last layer so, transformers' Gemma 4 "
            "always as 'full_attention'; the two would run different models. Set "
            f"{where}layer_types in config.json, ending in 'full_attention'"
        )
    return {**config, **added} if added else config


def _laguna_rope(config_dict: dict) -> dict:
    """Laguna's config with the per-layer-type RoPE mlx-lm 0.32 runs (a copy; unchanged where
    transformers reads the same). Without rope_parameters mlx-lm runs every layer type with
    theta 10000 and config.json's partial_rotary_factor (else 1.0), where transformers'
    default is theta 500000 and half the head rotated on full-attention layers; a layer type's
    rope without partial_rotary_factor takes config.json's top-level one in mlx-lm, 1.0 in
    transformers. ValueError where config.json has rope_scaling and no rope_parameters (mlx-lm
    does not read it)."""
    partial = config_dict.get("partial_rotary_factor")
    partial = 1.0 if partial is None else partial
    rope = config_dict.get("rope_parameters")
    if rope is None:
        if config_dict.get("rope_scaling") is not None:
            raise ValueError(
                "mlxq: config.json of model type 'laguna' has rope_scaling and no "
                "rope_parameters: mlx-lm 0.32 reads rope_parameters alone (its default: "
                "theta 10000 on every layer type), transformers reads rope_scaling; the two "
                "would run different models. Give rope_parameters in config.json"
            )
        plain = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial}
        return {**config_dict, "rope_parameters": {_FULL: dict(plain), _SLIDING: dict(plain)}}
    if not isinstance(rope, dict) or partial == 1.0:
        return config_dict
    lacking = [
        kind for kind, p in rope.items() if isinstance(p, dict) and "partial_rotary_factor" not in p
    ]
    if not lacking:
        return config_dict
    given = {kind: {**rope[kind], "partial_rotary_factor": partial} for kind in lacking}
    return {**config_dict, "rope_parameters": {**rope, **given}}
