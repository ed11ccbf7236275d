"""A mixture-of-experts config.json read the same way by transformers and mlx-lm, or refused.

Three faults only show late otherwise: more experts per token than experts (transformers'
forward fails in torch.topk with "selected index k out of range", after the whole load), and
two expert counts or two experts-per-token values that disagree (`num_experts` beside
`num_local_experts`, `moe_k` beside `num_experts_per_tok`): transformers builds the value of
the key its config class reads (through its attribute_map, the alias where both are given),
mlx-lm 0.32 the value of its ModelArgs key, so the two run different models (or one fails to
load the tensors). All are refused at load, naming keys and values.
"""

from __future__ import annotations

from torch import nn

__all__ = ["MLX_LM_EXPERT_KEYS", "MLX_VLM_EXPERT_KEYS", "check_expert_counts"]

# model type -> (expert count key, experts per token key) that mlx-lm 0.32's ModelArgs reads
_NUM_EXPERTS = "num_experts afmoe bailing_hybrid exaone_moe gemma4_text jamba kimi_linear laguna "
_NUM_EXPERTS += "lfm2_moe mellum olmoe qwen2_moe qwen3_moe qwen3_next"
_LOCAL = "num_local_experts gpt_oss granitemoe granitemoehybrid minimax minimax_m2 mixtral phimoe"
_ROUTED = "n_routed_experts deepseek_v2 deepseek_v3 deepseek_v32 dots1 glm4_moe glm4_moe_lite "
_ROUTED += "glm_moe_dsa mimo_v2_flash mistral4 nemotron_h solar_open"
MLX_LM_EXPERT_KEYS: dict[str, tuple[str, str]] = {
    model_type: (key, "num_experts_per_tok")
    for key, *types in (s.split() for s in (_NUM_EXPERTS, _LOCAL, _ROUTED))
    for model_type in types
}
MLX_LM_EXPERT_KEYS.update(
    gemma4_text=("num_experts", "top_k_experts"),
    kimi_linear=("num_experts", "num_experts_per_token"),
    ernie4_5_moe=("moe_num_experts", "moe_k"),
    longcat_flash=("n_routed_experts", "moe_topk"),
)
# the language model's model type (text_config's) -> the keys mlx-vlm 0.7.10 reads from the
# text_config of an image-text checkpoint (its TextConfig; mlx-lm's llama4 and step3p5 read
# the same; Kimi K2.5's DeepSeek V3 and Gemma 4's are mlx-lm's own above), or from the top
# level of a text model's
MLX_VLM_EXPERT_KEYS: dict[str, tuple[str, str]] = {
    "qwen3_vl_moe_text": ("num_experts", "num_experts_per_tok"),
    "qwen3_5_moe_text": ("num_experts", "num_experts_per_tok"),
    "qwen4_exp_text": ("num_experts", "num_experts_per_tok"),
    "glm4v_moe_text": ("n_routed_experts", "num_experts_per_tok"),
    "glm5_next_text": ("n_routed_experts", "num_experts_per_tok"),
    "llama4_text": ("num_local_experts", "num_experts_per_tok"),
    "minimax_m3_vl_text": ("num_local_experts", "num_experts_per_tok"),
    "diffusion_gemma_text": ("num_experts", "top_k_experts"),
    "step3p5": ("moe_num_experts", "moe_top_k"),
    # Qwen3-Omni-MoE: thinker_config.text_config and talker_config.text_config (mlx-vlm's
    # TextConfig for both; transformers' talker reads num_experts as num_local_experts)
    "qwen3_omni_moe_text": ("num_experts", "num_experts_per_tok"),
    "qwen3_omni_moe_talker_text": ("num_experts", "num_experts_per_tok"),
    # text models mlx-vlm runs and mlx-lm 0.32 does not (their config.json's top level)
    "cohere2_moe": ("num_experts", "num_experts_per_tok"),
    "deepseek_v4": ("n_routed_experts", "num_experts_per_tok"),
    "flint": ("num_experts", "num_experts_per_tok"),
    "hy_v4": ("n_routed_experts", "num_experts_per_tok"),
    "kolibri1": ("num_experts", "num_experts_per_tok"),
    "openai_privacy_filter": ("num_local_experts", "num_experts_per_tok"),
}
_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOPK_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "moe_top_k")
_TOPK_KEYS += ("top_k_experts",)
# routers whose top-k and expert count live in their config, not in attributes of their own:
# class name -> (top-k key, expert count key) of that config
_CONFIG_ROUTERS = {
    "Gemma4TextRouter": ("top_k_experts", "num_experts"),
    "DiffusionGemmaTextRouter": ("top_k_experts", "num_experts"),
}


def _moe_dict(raw: dict) -> dict:
    """The part of config.json the language model reads: its text_config where it has one
    holding an expert count, else the top level."""
    text = raw.get("text_config")
    if isinstance(text, dict) and any(k in text for k in _COUNT_KEYS):
        return text
    return raw


# sub-models of a composite config.json whose language model nests one level deeper:
# {outer key}.text_config -> the prefix of the modules transformers builds from it
_NESTED_TEXT = {"thinker_config": "thinker.", "talker_config": "talker."}


def _moe_parts(raw: dict) -> list[tuple[str, dict]]:
    """(module name prefix, config dict) of each language model of config.json `raw`: the
    nested ones of a composite model (Qwen3-Omni-MoE's thinker and talker), else the one of
    :func:`_moe_dict` (all modules)."""
    nested = []
    for outer, prefix in _NESTED_TEXT.items():
        sub = raw.get(outer)
        text = sub.get("text_config") if isinstance(sub, dict) else None
        if isinstance(text, dict) and any(k in text for k in _COUNT_KEYS):
            nested.append((prefix, text))
    return nested or [("", _moe_dict(raw))]


def _routers(model: nn.Module, prefix: str = "") -> set[tuple[int, int]]:
    """(experts per token, experts) of every router transformers built in `model` (those
    under module name `prefix` only, where given)."""
    found = set()
    for name, m in model.named_modules():
        if not name.startswith(prefix):
            continue
        top_k, experts = getattr(m, "top_k", None), getattr(m, "num_experts", None)
        keys = _CONFIG_ROUTERS.get(type(m).__name__)
        if keys is not None:
            top_k, experts = (getattr(getattr(m, "config", None), k, None) for k in keys)
        if isinstance(top_k, int) and isinstance(experts, int):
            found.add((top_k, experts))
    return found


def check_expert_counts(model: nn.Module, raw: dict) -> None:
    """Refuse (ValueError naming keys and values) a MoE `model` built from config.json `raw`
    where a router selects more experts per token than it has, or where the expert count or
    the experts per token transformers built differ from those mlx-lm reads
    (:data:`MLX_LM_EXPERT_KEYS`); each language model of a composite config.json against its
    own part (Qwen3-Omni-MoE's `thinker_config.text_config` and `talker_config.text_config`)."""
    for prefix, cfg in _moe_parts(raw):
        _check_part(model, raw, cfg, prefix)


def _check_part(model: nn.Module, raw: dict, cfg: dict, prefix: str) -> None:
    model_type = cfg.get("model_type") or raw.get("model_type")
    where = {"": ""}.get(prefix, f"{prefix.rstrip('.')}_config.text_config.")
    counts = {k: cfg[k] for k in _COUNT_KEYS if isinstance(cfg.get(k), int)}
    said = ", ".join(f"{where}{k}: {v}" for k, v in counts.items()) or "no expert count"
    routers = _routers(model, prefix)
    # (one check of "more per token than experts": where mlx-lm's keys say otherwise than the
    # routers, the disagreement below is refused, so theirs would repeat this one)
    for top_k, experts in sorted(routers):
        if top_k > experts:
            keys = [f"{where}{k}: {cfg[k]}" for k in _TOPK_KEYS if k in cfg] or [f"top_k {top_k}"]
            raise ValueError(
                f"mlxq: config.json of model type {model_type!r} sets {', '.join(keys)}, more "
                f"experts per token than the {experts} experts it has ({said}); torch.topk "
                "would fail in the forward ('selected index k out of range')"
            )
    mlx_keys = MLX_LM_EXPERT_KEYS.get(model_type, MLX_VLM_EXPERT_KEYS.get(model_type))
    # (a text_config: an image-text checkpoint, mlx-vlm's)
    reader = "mlx-lm" if cfg is raw and model_type in MLX_LM_EXPERT_KEYS else "mlx-vlm"
    # (no router built: a dense variant, as Granite 4.0's with num_local_experts 0)
    if mlx_keys is None or not routers:
        return
    for key, built, what in (
        (mlx_keys[0], {experts for _, experts in routers}, "experts"),
        (mlx_keys[1], {top_k for top_k, _ in routers}, "experts per token"),
    ):
        value = cfg.get(key)
        if isinstance(value, int) and built != {value}:
            keys = _COUNT_KEYS if what == "experts" else _TOPK_KEYS
            given = ", ".join(f"{where}{k}: {cfg[k]}" for k in keys if k in cfg)
            raise ValueError(
                f"mlxq: config.json of model type {model_type!r} gives two values of {what} "
                f"({given}): transformers builds {', '.join(map(str, sorted(built)))} {what}, "
                f"{reader} reads {where}{key} ({value}); the two would run different models. "
                "Make them "
                "agree"
            )
