"""Where mlx-vlm's checkpoints differ from transformers 5's for the same image-text model.

Three things:
- tensor names: mlx-vlm writes `language_model.model.*`, `language_model.lm_head.*` and its
  own vision prefixes (`vision_tower.*` for Qwen's `visual`, `vision_model.*` for Idefics 3,
  ...) where transformers 5 has `model.language_model.*`, `lm_head.*`, `model.visual.*`, ...
  :data:`VLM_LAYOUTS` holds the renames per `model_type`, applied on load and reversed when
  saving (transformers' `WeightRenaming`).
- convolution weights: MLX convolutions are channels-last (`[out, kh, kw, in]`,
  `[out, t, kh, kw, in]`), PyTorch's channels-first (`[out, in, kh, kw]`, ...).
  :func:`channels_last_conversions` finds the convolutions whose checkpoint tensor is stored
  channels-last (from the shapes in the safetensors header) and returns transformers
  `WeightConverter`s that permute them at load and back at save; nothing is re-initialised.
- config.json: mlx-vlm 0.7 reads the Hub (transformers 4) layout, e.g. Qwen2-VL's text settings
  at the top level, a top-level `rope_theta`/`rope_scaling`, and the vision `model_type` of the
  whole model. :func:`mlx_vlm_config_keys` computes what to add when saving.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from torch import nn

from mlxq.integrations.weight_ops import (
    ChannelsLastToFirst,
    channels_last_converter,
    channels_last_perm,
    permuted,
    unit_offset_conversions,
)

__all__ = [
    "Split",
    "VlmLayout",
    "VLM_LAYOUTS",
    "checkpoint_vlm_layout",
    "has_vision_tower",
    "UNVERIFIED_VLM",
    "looks_like_mlx_vlm",
    "unmapped_vlm_note",
    "ChannelsLastToFirst",
    "channels_last_conversions",
    "channels_last_converter",
    "mlx_vlm_config_keys",
    "takes_flat_text_keys",
]

# mlx-vlm's language model and head, the same in every family it writes
_TEXT = (
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
)


class Split(NamedTuple):
    """A projection mlx-vlm fuses that transformers keeps apart, split along the output rows at
    load (weight, scales, biases and bias alike: MLX's quantization groups run along the input,
    so each part's rows carry their own packed words, scales and biases) and concatenated again
    when saving."""

    pattern: str  # regex of the fused module's name part (after the renames), e.g. `\.qkv\.`
    parts: tuple[str, ...]  # its replacements, one per part, in the fused tensor's row order
    # each part's rows, read from the text config (GLM-5-Next's f_a/b/g_a of unequal widths);
    # None: equal parts
    widths: Callable[[Any], tuple[int, ...]] | None = None
    text: bool = False  # fused in the language model (else in the vision tower)


def _in_text_model(key: str) -> bool:
    return key.startswith(("model.language_model.", "lm_head."))


@dataclass(frozen=True)
class VlmLayout:
    """mlx-vlm's tensor names for one image-text `model_type`, as regex renames
    mlx-vlm -> transformers 5 (applied in turn, as transformers applies them)."""

    model_type: str
    renames: tuple[tuple[str, str], ...]
    marker: str = "language_model.model."  # a key prefix only mlx-vlm's layout has
    # config.json keys mlx-vlm reads from the Hub layout, see mlx_vlm_config_keys
    flat_text_config: bool = False  # the whole text config copied to the top level
    vision_model_type: str | None = None  # vision_config.model_type mlx-vlm expects
    text_keys_from_top: tuple[str, ...] = ()  # top-level keys mlx-vlm reads in text_config
    top_keys_from_text: tuple[str, ...] = ()  # text_config keys mlx-vlm reads at the top
    # (mlx-vlm's key, transformers 5's key) in text_config, e.g. the expert count that
    # transformers 5 writes as num_local_experts only
    text_aliases: tuple[tuple[str, str], ...] = ()
    top_aliases: tuple[tuple[str, str], ...] = ()  # the same at the top level
    vision_aliases: tuple[tuple[str, str], ...] = ()  # and in vision_config
    # vision_config keys transformers writes and mlx-vlm's config class rejects
    vision_drop: tuple[str, ...] = ()
    # False where mlx-vlm reads the rope settings from rope_parameters alone and its config
    # class rejects the flat keys (GLM-OCR)
    rope_keys: bool = True
    # text_config keys mlx-vlm requires, with the value written where transformers has none
    text_defaults: tuple[tuple[str, Any], ...] = ()
    # mlx-vlm places full attention every `full_attention_interval` layers (default 4), read
    # off transformers' layer_types (Qwen 3.5)
    attention_interval: bool = False
    sliding_pattern: bool = False  # the same period as sliding_window_pattern (Gemma 3, Cohere 2)
    # transformers' names (regexes) of zero-centred norm weights (the module multiplies by
    # 1 + w) that mlx-vlm's sanitize stores as 1 + w (Qwen 3.5), see MlxLayout.unit_offset
    unit_offset: tuple[str, ...] = ()
    # projections mlx-vlm fuses that transformers keeps apart (see Split)
    splits: tuple[Split, ...] = ()
    # mlx-vlm reads the rope as the Hub's xdrope `rope_scaling` (its NTK alpha and the
    # section sizes as xdrope_section; HunyuanOCR), transformers' rope_parameters name them
    # alpha and mrope_section
    xdrope: bool = False
    # parts of a fused projection whose rows are permuted from the Hub's interleaved rope to
    # transformers' halves at load (its PermuteForRope over the vision config's heads; the
    # inverse when saving), e.g. ("q_proj", "k_proj") of Kimi K2.5's tower
    split_rope: tuple[str, ...] = ()
    # other keys mlx-vlm reads, computed from transformers' config dict: (config) ->
    # {"text": {...}, "vision": {...}}
    derived_keys: Callable[[dict], dict[str, dict[str, Any]]] | None = None
    # mlx-vlm's model reads the text rope from rope_parameters (its own conversion writes no
    # flat rope_theta, and none is needed): `mlxq inspect` does not warn about it
    reads_rope_parameters: bool = False
    # mlx-vlm's names (regexes ending in `.`) of modules that transformers holds as raw
    # parameters where mlx-vlm has a Linear (nn.MultiheadAttention's in_proj_weight): their
    # renames (those starting with the regex) apply only while they are float; a quantized
    # one keeps mlx-vlm's names, loaded into mlxq.nn.InProjMultiheadAttention
    float_only: tuple[str, ...] = ()
    # text_config layer types written in mlx-vlm's (the Hub's) names: (transformers', mlx-vlm's)
    text_layer_type_names: tuple[tuple[str, str], ...] = ()
    # (key, source) in text_config: transformers writes `key` as None, meaning `source`'s value,
    # where mlx-vlm's config class has a default of its own (Qwen4-Exp's output_gate_type)
    text_none_means: tuple[tuple[str, str], ...] = ()

    # tables mlx-vlm stores in row shards: (shard module name part with `*` for the shard
    # number, the table's name part, the config attribute holding the shard count), after the
    # renames; the shards' tensors (weight, scales, biases) are concatenated along the rows at
    # load, exact for MLX's row-wise groups (Qwen4-Exp's n-gram embedding `shards.N`)
    concats: tuple[tuple[str, str, str], ...] = ()

    def _concat_pattern(self, source: str) -> re.Pattern:
        return re.compile(re.escape(source).replace(r"\*", r"(\d+)") + r"(?=\.|$)")

    def concat_module(self, name: str) -> str:
        """The table a shard's module `name` (either library's naming) belongs to, else `name`."""
        for source, target, _ in self.concats:
            name = self._concat_pattern(source).sub(target, name)
        return name

    def concat_headers(self, headers: Mapping[str, Any]) -> dict[str, Any]:
        """`headers` (transformers' names -> TensorInfo) with each sharded table's shards
        replaced by the whole table; shards missing or stored in different formats are refused
        by name."""
        from mlxq.integrations.checkpoint import TensorInfo

        out = dict(headers)
        for source, target, _ in self.concats:
            pattern = self._concat_pattern(source)
            groups: dict[str, dict[int, Any]] = {}
            for key, info in headers.items():
                m = pattern.search(key)
                if m is not None:
                    table = key[: m.start()] + target + key[m.end() :]
                    groups.setdefault(table, {})[int(m[1])] = info
                    del out[key]
            for table, shards in groups.items():
                formats = {(i.dtype, tuple(i.shape[1:])) for i in shards.values()}
                if sorted(shards) != list(range(len(shards))) or len(formats) != 1:
                    raise ValueError(
                        f"mlxq: the shards of {table} are not shards 0..{len(shards) - 1} of one "
                        f"format ({sorted(shards)}, {sorted(formats, key=str)})"
                    )
                rows = sum(i.shape[0] for i in shards.values())
                dtype, rest = formats.pop()
                out[table] = TensorInfo(dtype, (rows, *rest))
        return out

    def concat_conversions(self) -> list:
        """`WeightConverter`s concatenating each sharded table's shards at load
        (`save_pretrained` cuts the table back into the count of shards its config gives)."""
        from transformers.core_model_loading import Concatenate, WeightConverter

        return [
            WeightConverter(
                source_patterns=f"{source}.{leaf}",
                target_patterns=f"{target}.{leaf}",
                operations=[Concatenate(dim=0, num_shards_attribute=count)],
            )
            for source, target, count in self.concats
            for leaf in ("weight", "scales", "biases")
        ]

    def quantized_float_only(self, keys: Iterable[str]) -> list[str]:
        """The :attr:`float_only` modules that `keys` (mlx-vlm's names) hold quantized."""
        keys = list(keys)
        return [p for p in self.float_only if any(re.search(f"{p}scales$", k) for k in keys)]

    def to_transformers(self, key: str) -> str:
        """`key` renamed as transformers applies the renames: each in turn (a Qwen 3.5 MoE
        expert takes the prefix rename, then the switch_mlp one)."""
        for pattern, repl in self.renames:
            key = re.sub(pattern, repl, key)
        return key

    def _split_of(self, key: str) -> Split | None:
        """The split whose fused module `key` (transformers' names) is, else None."""
        for split in self.splits:
            if split.text == _in_text_model(key) and re.search(split.pattern, key):
                return split
        return None

    def split_names(self, key: str) -> list[str]:
        """The model's names for the checkpoint tensor `key` (transformers' names): its parts
        where mlx-vlm fused a projection, else `key` itself."""
        split = self._split_of(key)
        if split is None:
            return [key]
        return [re.sub(split.pattern, part, key) for part in split.parts]

    def split_widths(self, key: str, rows: int, config: Any = None) -> list[int]:
        """The rows of each part of the fused tensor `key` of `rows` rows: from the text config
        where the split names them, else equal shares. A split that does not add up to `rows`
        is refused naming the tensor and the widths."""
        split = self._split_of(key)
        names = self.split_names(key)
        if split is None:
            return [rows]
        if split.widths is None:
            if rows % len(names):
                raise ValueError(
                    f"mlxq: {key} ({rows} rows) does not split into {len(names)} equal "
                    f"projections ({', '.join(names)})"
                )
            return [rows // len(names)] * len(names)
        if config is None:
            raise ValueError(f"mlxq: splitting {key} needs the model's config (its widths)")
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        widths = [int(w) for w in split.widths(text)]
        if sum(widths) != rows or len(widths) != len(names) or min(widths) <= 0:
            raise ValueError(
                f"mlxq: {key} ({rows} rows) does not split into {', '.join(names)} of "
                f"{widths} rows (the widths its config gives)"
            )
        return widths

    def split_headers(self, headers: Mapping[str, Any], config: Any = None) -> dict[str, Any]:
        """`headers` (transformers' names -> TensorInfo) with each fused tensor replaced by its
        parts, each with its share of the output rows (see :meth:`split_widths`; `config`,
        the model's, gives the widths of unequal parts)."""
        from mlxq.integrations.checkpoint import TensorInfo

        out: dict[str, Any] = {}
        for key, info in headers.items():
            names = self.split_names(key)
            if len(names) == 1:
                out[key] = info
                continue
            rows = info.shape[0] if info.shape else 0
            widths = self.split_widths(key, rows, config)
            for name, width in zip(names, widths, strict=True):
                out[name] = TensorInfo(info.dtype, (width, *info.shape[1:]))
        return out

    def split_conversions(self, keys: Iterable[str], config: Any = None) -> list:
        """`WeightConverter`s splitting each fused tensor among `keys` (transformers' names)
        into its parts at load; `save_pretrained` concatenates them back. `config` (the
        model's) gives the widths of unequal parts."""
        from transformers.core_model_loading import Chunk, PermuteForRope, WeightConverter

        from mlxq.integrations.mlx_lm_layout import SizedConcat

        rope = []
        if self.split_rope:  # a row permutation: quantized rows (and their scales) alike
            rope.append(
                PermuteForRope(
                    subconfig_key="vision_config", permute_layer_names=list(self.split_rope)
                )
            )
        out = []
        for key in sorted(keys):
            names = self.split_names(key)
            if len(names) == 1:
                continue
            split = self._split_of(key)
            if split is not None and split.widths is not None:
                text = config.get_text_config() if hasattr(config, "get_text_config") else config
                widths = [int(w) for w in split.widths(text)]
                cut = SizedConcat(widths, split=True)  # checked against the file by split_headers
            else:
                cut = Chunk(0)
            out.append(
                WeightConverter(
                    source_patterns=f"^{re.escape(key)}",  # no `$`: reversed, it would stay
                    target_patterns=names,
                    operations=[cut, *rope],
                )
            )
        return out

    def offset_conversions(self, names: Iterable[str]) -> list:
        """`WeightConverter`s taking 1 off each of `names` that :attr:`unit_offset` matches
        at load (`save_pretrained` adds it back)."""
        return unit_offset_conversions(names, self.unit_offset)

    def weight_renamings(self) -> list:
        """The renames as transformers `WeightRenaming`s (applied on load, reversed on save)."""
        from transformers.core_model_loading import WeightRenaming

        return [WeightRenaming(source_patterns=p, target_patterns=r) for p, r in self.renames]


def _llava_like(model_type: str, *extra: tuple[str, str], **kw: Any) -> VlmLayout:
    return VlmLayout(
        model_type,
        (
            *_TEXT,
            # CLIP/SigLIP/Pixtral towers: transformers 5 drops their `vision_model.` level
            (r"^vision_tower\.vision_model\.", "model.vision_tower."),
            (r"^vision_tower\.", "model.vision_tower."),
            (r"^multi_modal_projector\.", "model.multi_modal_projector."),
            *extra,
        ),
        **kw,
    )


def _idefics3(model_type: str) -> VlmLayout:
    # mlx-vlm keeps Idefics 3's text model without a `model.` level
    return VlmLayout(
        model_type,
        (
            (r"^language_model\.lm_head\.", "lm_head."),
            (r"^language_model\.", "model.text_model."),
            (r"^vision_model\.", "model.vision_model."),
            (r"^connector\.", "model.connector."),
        ),
        marker="language_model.layers.",
    )


def _qwen_vl(model_type: str, *extra: tuple[str, str], **kw: Any) -> VlmLayout:
    return VlmLayout(model_type, (*_TEXT, (r"^vision_tower\.", "model.visual."), *extra), **kw)


# mlx-vlm stacks each expert projection as `mlp.switch_mlp.<proj>`; mlxq's MoeExperts holds
# them as `mlp.experts.<proj>` (see mlx_lm_layout's _MOE_RENAMES)
_SWITCH_MLP = (r"\.mlp\.switch_mlp\.", ".mlp.experts.")
# Qwen 3.5's RMSNorms multiply by 1 + w in transformers; mlx-vlm's sanitize stores 1 + w for its
# plain RMSNorm (not the gated norm of the linear attention, nor the vision tower's norms)
_QWEN3_5_NORMS = (
    r"^model\.language_model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight$",
    r"^model\.language_model\.layers\.\d+\.self_attn\.(q_norm|k_norm)\.weight$",
    r"^model\.language_model\.norm\.weight$",
)


# GLM-4.1V/4.5V: mlx-vlm names the image start/end tokens vision_start/end_token_id
_GLM4V_KEYS: dict[str, Any] = {
    "top_aliases": (
        ("vision_start_token_id", "image_start_token_id"),
        ("vision_end_token_id", "image_end_token_id"),
    )
}


def _gemma4_unified_keys(cfg: dict) -> dict[str, dict[str, Any]]:
    """Gemma 4 Unified: mlx-vlm reads the full-attention layers' head size and kv heads as
    global_head_dim / num_global_key_value_heads (transformers keeps them in per_layer_config)
    and the embedder's patch size as model_patch_size (default 48)."""
    text = cfg.get("text_config") or {}
    vision = cfg.get("vision_config") or {}
    out: dict[str, dict[str, Any]] = {"text": {}, "vision": {}}
    types = text.get("layer_types") or []
    overrides = text.get("per_layer_config") or {}
    for i, kind in enumerate(types):
        if kind == "full_attention":
            layer = overrides.get(str(i), overrides.get(i, {}))
            out["text"]["global_head_dim"] = layer.get("head_dim", text.get("head_dim"))
            if "num_key_value_heads" in layer:
                out["text"]["num_global_key_value_heads"] = layer["num_key_value_heads"]
            break
    if "patch_size" in vision and "pooling_kernel_size" in vision:
        out["vision"]["model_patch_size"] = vision["patch_size"] * vision["pooling_kernel_size"]
    return out


VLM_LAYOUTS: dict[str, VlmLayout] = {
    "qwen2_vl": _qwen_vl("qwen2_vl", flat_text_config=True, vision_model_type="qwen2_vl"),
    "qwen2_5_vl": _qwen_vl("qwen2_5_vl", flat_text_config=True, vision_model_type="qwen2_5_vl"),
    "qwen3_vl": _qwen_vl("qwen3_vl", vision_model_type="qwen3_vl"),
    "qwen3_vl_moe": _qwen_vl(
        "qwen3_vl_moe",
        _SWITCH_MLP,
        vision_model_type="qwen3_vl_moe",
        text_aliases=(("num_experts", "num_local_experts"),),
    ),
    "glm4v": _qwen_vl("glm4v", **_GLM4V_KEYS, text_defaults=(("eos_token_id", None),)),
    # GLM-4.5V: transformers' text model has no query/key norms (mlx-vlm requires the flag)
    # GLM-OCR: mlx-vlm reads transformers 5's keys, but its config classes take no flat rope
    # keys in text_config and no rope settings or dtype in vision_config
    "glm_ocr": _qwen_vl("glm_ocr", vision_drop=("rope_parameters", "dtype"), rope_keys=False),
    "glm4v_moe": _qwen_vl(
        "glm4v_moe", _SWITCH_MLP, **_GLM4V_KEYS, text_defaults=(("use_qk_norm", False),)
    ),
    "qwen3_5": _qwen_vl("qwen3_5", unit_offset=_QWEN3_5_NORMS, attention_interval=True),
    # GLM-5-Next: GLM-4V's names around a language model whose linear-attention layers
    # mlx-vlm fuses (q/k/v into qkv_proj; f_a, b and g_a, of unequal widths, into fbg_a_proj;
    # the q/k/v convolutions into qkv_conv, which transformers holds fused as conv1d), as it
    # fuses the sparse-attention layers' q_a/kv_a into qkv_a_proj and each dense or shared-
    # expert MLP's gate and up into gate_up_proj; experts stacked in switch_mlp. mlx-vlm keeps
    # the forget gate's other tensors at the attention's level (transformers: in forget_gate).
    "glm5_next": _qwen_vl(
        "glm5_next",
        (r"\.self_attn\.qkv_conv\.conv\.", ".self_attn.conv1d."),
        (r"\.self_attn\.f_b_proj\.", ".self_attn.forget_gate.f_b_proj."),
        (r"\.self_attn\.dt_bias", ".self_attn.forget_gate.dt_bias"),
        (r"\.self_attn\.A_log", ".self_attn.forget_gate.A_log"),
        # the sparse-attention layers' kv_b_proj as mlx-lm splits DeepSeek V3's
        (r"\.self_attn\.(embed_q|unembed_out)\.", r".self_attn.kv_b_proj.\1."),
        _SWITCH_MLP,
        splits=(
            # (mlx-vlm requires qk_rope_head_dim 0: kv_a_proj_with_mqa is kv_lora_rank wide)
            Split(
                r"\.self_attn\.qkv_a_proj\.",
                (".self_attn.q_a_proj.", ".self_attn.kv_a_proj_with_mqa."),
                widths=lambda c: (c.q_lora_rank, c.kv_lora_rank + c.qk_rope_head_dim),
                text=True,
            ),
            Split(
                r"\.self_attn\.qkv_proj\.",
                (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj."),
                text=True,
            ),
            Split(
                r"\.self_attn\.fbg_a_proj\.",
                (".self_attn.forget_gate.f_a_proj.", ".self_attn.b_proj.", ".self_attn.g_a_proj."),
                widths=lambda c: (c.linear_head_dim, c.linear_num_heads, c.linear_head_dim),
                text=True,
            ),
            Split(r"\.mlp\.gate_up_proj\.", (".mlp.gate_proj.", ".mlp.up_proj."), text=True),
            Split(
                r"\.shared_experts\.gate_up_proj\.",
                (".shared_experts.gate_proj.", ".shared_experts.up_proj."),
                text=True,
            ),
        ),
    ),
    # Cohere Compass (North Vision): Qwen3-VL's tower and names around Cohere's parallel block;
    # mlx-vlm reads the rope per layer type from rope_parameters, and the flat keys (a
    # rope_scaling) would make transformers' strict config refuse the saved config.json
    "cohere_compass": _qwen_vl("cohere_compass", rope_keys=False, reads_rope_parameters=True),
    # Qwen4-Exp: Qwen 3.5 MoE's names, with norms stored as they are (its mlx-vlm RMSNorm adds
    # the 1 itself); mlx-vlm reads the indexed-attention layers under the Hub's `full_attention`
    # and defaults the linear attention's output gate to sigmoid where transformers' None means
    # hidden_act
    "qwen4_exp": _qwen_vl(
        "qwen4_exp",
        _SWITCH_MLP,
        text_layer_type_names=(("indexed_attention", "full_attention"),),
        text_none_means=(("output_gate_type", "hidden_act"),),
        concats=((".ngram_embedding.shards.*", ".ngram_embedding", "split_ngram_parts"),),
        reads_rope_parameters=True,  # (its config requires them there)
    ),
    "qwen3_5_moe": _qwen_vl(
        "qwen3_5_moe", _SWITCH_MLP, unit_offset=_QWEN3_5_NORMS, attention_interval=True
    ),
    # MiniCPM-V 4.6: Qwen 3.5's language model (norms stored as 1 + w); mlx-vlm keeps the
    # tower's window-attention merger at the top level (transformers: inside the tower), so its
    # rename comes after the tower's (reversed first when saving)
    "minicpmv4_6": VlmLayout(
        "minicpmv4_6",
        (
            *_TEXT,
            (r"^vision_tower\.", "model.vision_tower."),
            (r"^vit_merger\.", "model.vision_tower.vit_merger."),
            (r"^merger\.", "model.merger."),
        ),
        unit_offset=_QWEN3_5_NORMS,
        attention_interval=True,
        reads_rope_parameters=True,
    ),
    # MiniCPM-V 4.7: 4.6's names (its canvas rope has no tensors), with Qwen 3.5 MoE's stacked
    # experts where its language model is that one
    "minicpmv4_7": VlmLayout(
        "minicpmv4_7",
        (
            *_TEXT,
            (r"^vision_tower\.", "model.vision_tower."),
            (r"^vit_merger\.", "model.vision_tower.vit_merger."),
            (r"^merger\.", "model.merger."),
            _SWITCH_MLP,
        ),
        unit_offset=_QWEN3_5_NORMS,
        attention_interval=True,
        reads_rope_parameters=True,
    ),
    # Kimi K2.5: DeepSeek V3's language model as mlx-lm splits it (kv_b_proj as embed_q and
    # unembed_out, stacked experts); mlx-vlm keeps the Hub's MoonViT names (norm0/1 and fc0/1
    # where transformers counts from 1, `blocks`, the fused wqkv) and its projector's list
    # indices. The fused wqkv is split, its q/k rows permuted from the Hub's interleaved rope as
    # transformers' own converter does (a row permutation, which quantized rows take as they
    # are). Each generic prefix rename comes before the specific ones on its result, so that
    # saving (the renames reversed, last first) undoes the specific ones first.
    "kimi_k25": VlmLayout(
        "kimi_k25",
        (
            *_TEXT,
            (r"\.self_attn\.(embed_q|unembed_out)\.", r".self_attn.kv_b_proj.\1."),
            _SWITCH_MLP,
            (r"^vision_tower\.", "model.vision_tower."),
            (r"^model\.vision_tower\.blocks\.", "model.vision_tower.layers."),
            # renamed so that transformers' own converter of `wqkv` leaves it to the split below
            (r"\.attn\.wqkv\.", ".attn.qkv."),
            (r"\.attn\.wo\.", ".attn.proj."),
            (r"\.norm1\.", ".norm2."),  # then norm0 -> norm1: a swap, applied in turn
            (r"\.norm0\.", ".norm1."),
            (r"\.mlp\.fc1\.", ".mlp.fc2."),
            (r"\.mlp\.fc0\.", ".mlp.fc1."),
            (r"\.patch_embed\.pos_emb\.weight", ".patch_embed.pos_emb.position_embeddings"),
            (r"^mm_projector\.", "model.mm_projector."),
            (r"^model\.mm_projector\.proj\.0\.", "model.mm_projector.in_proj."),
            (r"^model\.mm_projector\.proj\.2\.", "model.mm_projector.out_proj."),
        ),
        vision_model_type="moonvit",
        vision_aliases=(
            ("depth", "num_hidden_layers"),
            ("embed_dim", "hidden_size"),
            ("num_heads", "num_attention_heads"),
            ("init_pos_emb_height", "pos_emb_height"),
            ("init_pos_emb_width", "pos_emb_width"),
        ),
        top_aliases=(("media_placeholder_token_id", "image_token_id"),),
        splits=(Split(r"\.attn\.qkv\.", (".attn.q_proj.", ".attn.k_proj.", ".attn.v_proj.")),),
        split_rope=("q_proj", "k_proj"),
    ),
    # Gemma 4 Unified: mlx-vlm keeps the encoder-free patch embedder as `vision_embedder` and its
    # projection into the text width as `embed_vision` (transformers: both in embed_vision);
    # the embedder's rename comes first, so that saving undoes the projection's first
    "gemma4_unified": VlmLayout(
        "gemma4_unified",
        (
            *_TEXT,
            (r"^vision_embedder\.", "model.embed_vision."),
            (r"^embed_vision\.", "model.embed_vision.multimodal_embedder."),
            (r"\.experts\.switch_glu\.", ".experts."),
        ),
        derived_keys=_gemma4_unified_keys,
    ),
    # Muse Glimmer: transformers' names under mlx-vlm's top level
    "muse_glimmer": VlmLayout(
        "muse_glimmer",
        (
            *_TEXT,
            (r"^vision_tower\.", "model.vision_tower."),
            (r"^vision_adapter\.", "model.vision_adapter."),
            (r"^vision_projection\.", "model.vision_projection."),
        ),
        reads_rope_parameters=True,
    ),
    # mlx-vlm's Gemma 3 scales image features by a top-level hidden_size (default 2048)
    "gemma3": _llava_like(
        "gemma3",
        text_keys_from_top=("mm_tokens_per_image",),
        top_keys_from_text=("hidden_size",),
        sliding_pattern=True,
    ),
    # Llama 3.2 Vision: mlx-vlm reads the tower's head count as num_attention_heads
    "mllama": VlmLayout(
        "mllama",
        (
            *_TEXT,
            (r"^vision_tower\.", "model.vision_model."),
            (r"^multi_modal_projector\.", "model.multi_modal_projector."),
        ),
        vision_aliases=(("num_attention_heads", "attention_heads"),),
    ),
    # PaddleOCR-VL: mlx-vlm keeps the tower's layers and embeddings under `visual.`, the projector
    # (the Hub's mlp_AR) inside it, and fuses each attention's q/k/v into `qkv`
    "paddleocr_vl": VlmLayout(
        "paddleocr_vl",
        (
            *_TEXT,
            (r"^visual\.projector\.", "model.projector."),
            (r"^visual\.embeddings\.", "model.visual.vision_model.embeddings."),
            (r"^visual\.post_layernorm\.", "model.visual.vision_model.post_layernorm."),
            (r"^visual\.layers\.", "model.visual.vision_model.encoder.layers."),
        ),
        flat_text_config=True,
        vision_model_type="paddleocr_vl",
        splits=(
            Split(
                r"\.self_attn\.qkv\.",
                (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj."),
            ),
        ),
    ),
    # Gemma 4: mlx-vlm keeps the tower's names (with its clippable linears' `.linear`) and
    # the embedder of the image features at the top level; it stacks the experts of the MoE
    # block (26B-A4B) under `experts.switch_glu`, as mlx-lm does
    "gemma4": _llava_like(
        "gemma4",
        (r"^embed_vision\.", "model.embed_vision."),
        (r"\.experts\.switch_glu\.", ".experts."),
    ),
    # HunyuanOCR: mlx-vlm keeps the Hub's names of the tower (Megatron-style MLP and norms)
    # and of its patch merger (`perceive`, with an indexed conv stack), which transformers
    # renames; the image tokens as image_*_token_id
    "hunyuan_vl": VlmLayout(
        "hunyuan_vl",
        (
            *_TEXT,
            (
                r"^vision_tower\.layers\.(\d+)\.input_layernorm\.",
                r"vision_tower.layers.\1.layer_norm1.",
            ),
            (
                r"^vision_tower\.layers\.(\d+)\.post_attention_layernorm\.",
                r"vision_tower.layers.\1.layer_norm2.",
            ),
            (r"^vision_tower\.(.*)\.mlp\.dense_h_to_4h\.", r"vision_tower.\1.mlp.fc1."),
            (r"^vision_tower\.(.*)\.mlp\.dense_4h_to_h\.", r"vision_tower.\1.mlp.fc2."),
            (r"^vision_tower\.perceive\.proj\.0\.", "vision_tower.perceive.proj_conv."),
            (r"^vision_tower\.perceive\.proj\.2\.", "vision_tower.perceive.proj_out."),
            (r"^vision_tower\.perceive\.", "vision_tower.patch_merger."),
            (r"^vision_tower\.", "model.vision_tower."),
        ),
        vision_model_type="hunyuan_vl",
        xdrope=True,
        top_aliases=(
            ("image_start_token_id", "im_start_id"),
            ("image_end_token_id", "im_end_id"),
            ("image_newline_token_id", "im_newline_id"),
        ),
    ),
    # Granite 4.0 Vision: the window Q-Former projectors and the image newline at the top level,
    # and the SigLIP tower's pooling head with its attention input as a Linear (transformers'
    # nn.MultiheadAttention holds it as raw parameters; a quantized one, as mlx-vlm writes it
    # when asked to quantize the tower, loads into mlxq's InProjMultiheadAttention)
    "granite4_vision": _llava_like(
        "granite4_vision",
        (r"^layerwise_projectors\.", "model.layerwise_projectors."),
        (r"^spatial_projectors\.", "model.spatial_projectors."),
        (r"^image_newline", "model.image_newline"),
        (r"\.head\.attention\.in_proj\.weight", ".head.attention.in_proj_weight"),
        (r"\.head\.attention\.in_proj\.bias", ".head.attention.in_proj_bias"),
        float_only=(r"\.head\.attention\.in_proj\.",),
    ),
    "paligemma": _llava_like("paligemma"),
    "llava": _llava_like("llava"),
    "llava_next": _llava_like("llava_next", (r"^image_newline", "model.image_newline")),
    "llava_onevision": _llava_like("llava_onevision", (r"^image_newline", "model.image_newline")),
    # (Mistral Small 4: a mistral4 language model, its experts stacked in switch_mlp)
    "mistral3": _llava_like("mistral3", _SWITCH_MLP),
    "aya_vision": _llava_like("aya_vision", sliding_pattern=True),
    # Command A Vision: mlx-vlm runs it as aya_vision, which names the image token
    # image_token_index
    "cohere2_vision": _llava_like(
        "cohere2_vision",
        sliding_pattern=True,
        top_aliases=(("image_token_index", "image_token_id"),),
    ),
    "internvl": _llava_like("internvl"),
    # LFM2-VL: mlx-vlm sizes its blocks by block_dim/conv_dim/conv_dim_out (default 1024), which
    # the Hub writes as the hidden size
    "lfm2_vl": _llava_like(
        "lfm2_vl",
        text_aliases=(
            ("block_dim", "hidden_size"),
            ("conv_dim", "hidden_size"),
            ("conv_dim_out", "hidden_size"),
        ),
    ),
    "idefics2": _idefics3("idefics2"),
    "idefics3": _idefics3("idefics3"),
    "smolvlm": _idefics3("smolvlm"),
}


# Image-text families that transformers 5 and mlx-vlm both have and whose mlx-vlm checkpoints
# mlxq does not map, with the reason; an mlx-vlm checkpoint of one (or of any family missing
# from VLM_LAYOUTS) that leaves a model tensor unfilled is refused with this note.
UNVERIFIED_VLM: dict[str, str] = {
    "llama4": (
        "transformers 5.24's Llama4ForConditionalGeneration.forward fails on every call (it "
        "reads `image_outputs` off its language model's output), so no logits compare with "
        "mlx-vlm's, which runs the tiny model; mlx-vlm keeps transformers' own tensor names "
        "there, with the experts stacked per projection"
    ),
    # found reading mlx-vlm 0.7.10 and transformers 5.24; no tiny model of these was compared
    "molmo2": (
        "no tiny model was compared with mlx-vlm: mlx-vlm keeps the Hub's fused att_proj (q, k "
        "and v of unequal widths), fused ff_proj and the word embedding in two tables "
        "(wte.embedding, wte.new_embedding), which transformers' own converters split and "
        "concatenate at load (not mapped in mlxq for it), and its "
        "processor's crops and pooling indices were not mapped to transformers' inputs"
    ),
    "florence2": (
        "no tiny model was compared with mlx-vlm: its language model is a BART encoder-decoder "
        "(the harness compares a causal prompt's logits) and mlx-vlm reads its DaViT tower's "
        "sizes under the Hub's remote-code names (depths, dim_embed, num_groups, ...)"
    ),
    "unlimited_ocr": (
        "no tiny model can be converted: mlx-vlm 0.7.10 builds its SAM encoder (DeepSeek-OCR's) "
        "from SAMViTConfig() defaults (768 wide, 12 layers, 1024-pixel input) whatever "
        "config.json says"
    ),
    "minimax_m3_vl": (
        "mlx-vlm converts and runs the tiny model, but stacks the experts under "
        "block_sparse_moe.switch_mlp with the shared expert packed in as one more expert (when "
        "its width equals theirs, as in the Hub's) and keeps the dense MLP's gate and up apart "
        "where transformers fuses them: mlxq does not unpack these into transformers' "
        "shared_experts / gate_up_proj"
    ),
    "inkling_mm_model": (
        "no tiny model was compared with mlx-vlm (its `inkling` module, with an audio tower): "
        "its processor output was not converted into transformers' inputs"
    ),
    # found with tiny models of transformers 5.24 converted by mlx-vlm 0.7.10
    "diffusion_gemma": (
        "a block-diffusion model (DiffusionGemmaForBlockDiffusion: an encoder over the prompt "
        "and a decoder that denoises a block), not a causal LM whose logits compare with "
        "mlx-vlm's; mlx-vlm keeps transformers' model.encoder / model.decoder names and its "
        "image + text forward fails on the tiny model"
    ),
    "step3p7": (
        "no tiny model was compared with mlx-vlm: mlx-vlm reads the Hub's remote-code layout "
        "(the tower's width/layers/heads, its fused attn.in_proj that transformers unfuses "
        "with a rope permutation, vit_large_projector), so transformers' checkpoint does not "
        "convert"
    ),
    "nemotron_h_omni": (
        "no tiny model was compared with mlx-vlm: mlx-vlm reads the Hub's remote-code config "
        "(the language model's block types as mamba/attention/moe/mlp where transformers 5 "
        "writes linear_attention/full_attention/..., its RADIO tower's and Parakeet audio "
        "encoder's settings), so transformers' checkpoint does not convert"
    ),
    "pixtral": (
        "mlx-vlm 0.7.10 writes a LLaVA with a Pixtral tower as model_type 'pixtral' (its llava "
        "package runs CLIP / SigLIP towers only), which transformers reads as "
        "PixtralVisionConfig, the tower's config alone, with no image-text class; no logits "
        "were compared"
    ),
    "qwen3_omni_moe": (
        "mlx-vlm 0.7.10 converts the tiny model (its thinker's language model under "
        "thinker.language_model.model / .lm_head and its tower under thinker.vision_tower, "
        "where transformers has thinker.model, thinker.lm_head and thinker.visual), but "
        "transformers 5.24 maps Qwen3OmniMoeConfig to no image-text or causal-LM auto class "
        "and its Qwen3OmniMoeForConditionalGeneration has no input embeddings of its own: no "
        "logits were compared"
    ),
    "gemma3n": (
        "transformers 5 builds Gemma 3n's MobileNetV5 vision tower through timm (which needs "
        "torchvision) and its audio tower has no mlx-vlm counterpart checked here: no tiny "
        "model was converted and compared with mlx-vlm"
    ),
}


def looks_like_mlx_vlm(keys: Iterable[str]) -> bool:
    """True when tensor names follow mlx-vlm's top level (`language_model.*`)."""
    return any(k.startswith("language_model.") for k in keys)


def unmapped_vlm_note(model_type: str | None) -> str:
    """Why an mlx-vlm checkpoint of `model_type` does not load: no mapping of its layout."""
    reason = UNVERIFIED_VLM.get(model_type or "", "no tiny model of it was checked against mlx-vlm")
    return (
        f"model_type {model_type!r} is an image-text family whose mlx-vlm layout mlxq does not "
        f"map ({reason}); mapped: {', '.join(sorted(VLM_LAYOUTS))}"
    )


def takes_flat_text_keys(config: Any) -> bool:
    """Whether mlx-vlm's config class for this model accepts the flat rope keys
    (`rope_theta`, `partial_rotary_factor`, ...) that mlx-lm reads, in text_config."""
    layout = VLM_LAYOUTS.get(getattr(config, "model_type", None) or "")
    return layout is None or layout.rope_keys


def reads_rope_parameters(model_type: str | None) -> bool:
    """Whether mlx-vlm's model of this image-text family reads the text rope from
    rope_parameters (so a rope_theta kept only there is not lost)."""
    layout = VLM_LAYOUTS.get(model_type or "")
    return layout is not None and layout.reads_rope_parameters


# mlx-vlm's `cast_predicate` (mlx_vlm/models/<type>, 0.7.10) of the families mapped here: float
# tensors `mlx_vlm convert` leaves in the checkpoint's dtype (names holding one of these). Only
# the top `Model`'s counts (convert reads `model.cast_predicate`): GLM-4.5V's and Kimi K2.5's
# language models define one that their `Model` does not expose, so convert casts all of theirs.
MLX_VLM_CAST_KEEP: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("qwen3_5", "qwen3_5_moe", "minicpmv4_7", "qwen4_exp"), ("A_log",)),
    # mlx-vlm 0.7.10's glm5_next cast_predicate (in transformers' names: `.attn_hc.` alike)
    "glm5_next": (
        "A_log",
        "dt_bias",
        "e_score_correction_bias",
        ".attn_hc.",
        ".ffn_hc.",
        "index_kpool_compress",
    ),
}


def is_image_text(config: Any) -> bool:
    """True for a composite config with a vision tower (an image-text model). mlx-vlm writes
    an empty `vision_config` into the config.json of the text models it converts (Llama,
    Qwen3-MoE, ...): no vision tower."""
    vision = getattr(config, "vision_config", None)
    return vision is not None and vision != {}


def has_vision_tower(config: Any) -> bool:
    """True for an image-text config (:func:`is_image_text`) or a composite one holding an
    image-text sub-config: Qwen3-Omni-MoE keeps its tower's settings under
    `thinker_config.vision_config`, so its config has no `vision_config` of its own."""
    if is_image_text(config):
        return True
    return any(
        is_image_text(getattr(config, name, None)) for name in getattr(config, "sub_configs", {})
    )


def checkpoint_vlm_layout(model_type: str | None, keys: Iterable[str]) -> VlmLayout | None:
    """mlx-vlm's layout when the checkpoint of a `model_type` model uses it, else None
    (recognised by a key prefix only mlx-vlm writes, e.g. `language_model.model.`)."""
    layout = VLM_LAYOUTS.get(model_type or "")
    keys = list(keys)
    if layout is None or not any(k.startswith(layout.marker) for k in keys):
        return None
    quantized = layout.quantized_float_only(keys)
    if quantized:  # (Granite 4 Vision's pooling head quantized: mlx-vlm's names kept)
        renames = tuple(r for r in layout.renames if not r[0].startswith(tuple(quantized)))
        return replace(layout, renames=renames)
    return layout


def use_in_proj_attention(model: nn.Module, layout: VlmLayout, keys: Iterable[str]) -> list[str]:
    """Replace each nn.MultiheadAttention whose input projection the checkpoint (`keys`,
    mlx-vlm's names) holds quantized by mlxq.nn.InProjMultiheadAttention, whose `in_proj`
    module then loads it. Returns their names."""
    from mlxq.nn import InProjMultiheadAttention

    names = []
    for key in keys:
        name = layout.to_transformers(key)
        if not name.endswith(".in_proj.scales"):
            continue
        name = name.removesuffix(".in_proj.scales")
        module = model.get_submodule(name) if name else None
        if isinstance(module, nn.MultiheadAttention):
            model.set_submodule(name, InProjMultiheadAttention.from_mha(module))
            names.append(name)
    return names


def channels_last_conversions(
    model: nn.Module,
    headers: Mapping[str, Any],
    prefer_last: bool,
    source_key: Callable[[str], str] | None = None,
) -> list:
    """`WeightConverter`s for the convolution weights the checkpoint stores channels-last.

    `headers` maps the model's parameter names (after renaming) to the checkpoint's
    `TensorInfo`. A weight whose stored shape is the channels-last form of the module's shape
    is permuted at load; one stored channels-first is loaded as it is. When both read the same
    (e.g. a 3x3 kernel over 3 channels), `prefer_last` (an mlx-vlm checkpoint) decides.
    `source_key`: the name a converter matches for a model name, where they differ
    (transformers converts before it strips the base-model prefix: `AutoModel` on a causal
    LM's checkpoint).
    """
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        key = f"{name}.weight"
        info = headers.get(key)
        if info is None:
            continue
        want = tuple(module.weight.shape)
        stored = tuple(info.shape)
        as_last = permuted(want, channels_last_perm(len(want)))
        if stored != as_last or (stored == want and not prefer_last):
            continue
        out.append(channels_last_converter(key, source_key(key) if source_key else None))
    return out


def _rope(text: dict, gemma3: bool, partial: bool = False) -> dict:
    rope = text.get("rope_parameters")
    if not isinstance(rope, dict):
        return {}
    out: dict[str, Any] = {}
    if isinstance(rope.get("full_attention"), dict):  # per layer type (Gemma 3)
        sliding = rope.get("sliding_attention")
        if gemma3 and isinstance(sliding, dict) and "rope_theta" in sliding:
            out["rope_local_base_freq"] = sliding["rope_theta"]
        rope = rope["full_attention"]
    if "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
        if gemma3:  # mlx-vlm's Gemma 3 calls the global base rope_global_base_freq
            out["rope_global_base_freq"] = rope["rope_theta"]
    if partial and "partial_rotary_factor" in rope:  # GLM-4V reads it at the top
        out["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if "mrope_section" in rope:
        out["rope_scaling"] = {"type": "default", "mrope_section": list(rope["mrope_section"])}
    return out


def _xdrope(text: dict) -> dict:
    """HunyuanOCR's rope as the Hub writes it (mlx-vlm reads nothing else)."""
    rope = text.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        return {}
    scaling: dict[str, Any] = {"type": "xdrope"}
    scaling.update({k: rope[k] for k in ("alpha", "factor") if k in rope})
    if "mrope_section" in rope:
        scaling["xdrope_section"] = list(rope["mrope_section"])
    return {"rope_theta": rope["rope_theta"], "rope_scaling": scaling}


_GLM4V = ("glm4v", "glm4v_moe")  # mlx-vlm reads partial_rotary_factor at the top of text_config


def mlx_vlm_config_keys(config: Any) -> dict[str, Any]:
    """The config.json keys mlx-vlm reads for this image-text config and that transformers 5
    does not write: `{"top": {...}, "text": {...}, "vision": {...}}` for the top level,
    `text_config` and `vision_config`. Keys already present are not returned. With
    `"vision_drop"`: the vision_config keys to leave out (mlx-vlm's config rejects them)."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    layout = VLM_LAYOUTS.get(cfg.get("model_type") or "")
    out: dict[str, dict[str, Any]] = {"top": {}, "text": {}, "vision": {}}
    if layout is None:
        return out
    text = cfg.get("text_config") or {}
    if layout.xdrope:
        rope = _xdrope(text)
    elif layout.rope_keys:
        rope = _rope(
            text, gemma3=layout.model_type == "gemma3", partial=layout.model_type in _GLM4V
        )
    else:
        rope = {}
    if layout.flat_text_config:  # Qwen2-VL/2.5-VL: text settings at the top, mrope typed
        out["top"].update({k: v for k, v in text.items() if k not in cfg})
        out["top"].update(rope)
        if "rope_scaling" in rope:
            out["top"]["rope_scaling"] = {**rope["rope_scaling"], "type": "mrope"}
    out["text"].update(rope)
    out["top"].update({k: text[k] for k in layout.top_keys_from_text if k in text})
    out["text"].update({k: cfg[k] for k in layout.text_keys_from_top if k in cfg})
    out["text"].update({k: text[t] for k, t in layout.text_aliases if t in text})
    out["top"].update({k: cfg[t] for k, t in layout.top_aliases if t in cfg})
    if layout.attention_interval or layout.sliding_pattern:
        # the period of full-attention layers (mlx-vlm derives the layer types from it)
        from mlxq.integrations.mlx_lm_layout import _sliding_window_pattern

        period = _sliding_window_pattern(text.get("layer_types"))
        if period is not None:
            key = (
                "full_attention_interval" if layout.attention_interval else "sliding_window_pattern"
            )
            out["text"][key] = period
    out["text"].update({k: text.get(k, cfg.get(k, v)) for k, v in layout.text_defaults})
    none_means = dict(layout.text_none_means)
    out["text"].update({k: text.get(s) for k, s in none_means.items() if text.get(k) is None})
    vision = cfg.get("vision_config") or {}
    if layout.derived_keys is not None:
        for part, keys in layout.derived_keys(cfg).items():
            out[part].update(keys)
    if layout.vision_model_type is not None:
        out["vision"]["model_type"] = layout.vision_model_type
    out["vision"].update({k: vision[t] for k, t in layout.vision_aliases if t in vision})
    return {
        "top": {k: v for k, v in out["top"].items() if k not in cfg},
        # transformers 5 writes rope_scaling as its rope_parameters, without the xdrope keys
        "text": {
            k: v
            for k, v in out["text"].items()
            if k not in text
            or (layout.xdrope and k == "rope_scaling" and text[k] != v)
            or (k in none_means and text[k] is None)
        },
        "vision": {k: v for k, v in out["vision"].items() if vision.get(k) != v},
        "vision_drop": [k for k in layout.vision_drop if k in vision],
    }


def use_mlx_vlm_layout(model: nn.Module) -> bool:
    """Save a float image-text model that mlxq quantized (while loading, or
    :func:`mlxq.quantize_model`) in mlx-vlm's layout, as `mlx_vlm convert -q` writes it: its
    tensor names, convolution weights channels-last, Qwen 3.5's norms as 1 + w and fused
    projections concatenated. These are the conversions that loading mlx-vlm's checkpoint
    installs, which `save_pretrained` reverses. False (nothing changed) for a model that is
    not an image-text model of a mapped family."""
    config = getattr(model, "config", None)
    layout = VLM_LAYOUTS.get(getattr(config, "model_type", None) or "")
    if layout is None or not is_image_text(config):
        return False
    from transformers.core_model_loading import PrefixChange, WeightRenaming

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:  # built from a config: what transformers would revert when saving
        from transformers.conversion_mapping import get_model_conversion_mapping

        conversions = get_model_conversion_mapping(model, add_legacy=False)
    # the model's own renames (of older Hub names, a prefix it was read with) are left out:
    # reversed first when saving, they would move tensors away from the names mlx-vlm's
    # renames take back (Mllama's `model.vision_model.` to `vision_model.`), and those renames
    # place every tensor themselves
    # a tower with two mlx-vlm namings is saved as `mlx_vlm convert` writes a float model's
    level = True if layout.model_type in _FLOAT_TOWER_LEVEL else None
    renames = _save_renames(layout, conversions, tower_level=level)
    model._mlxq_model_conversions = conversions  # read by mlx_vlm_module_names
    model._mlxq_tower_level = level
    conversions = [c for c in conversions if not isinstance(c, (PrefixChange, WeightRenaming))]
    names = [name for name, _ in model.named_parameters()]
    names += [name for name, _ in model.named_buffers()]
    fused = set()
    for split in layout.splits:  # each in its own model (the tower's or the language model's)
        literal = re.sub(r"\\(.)", r"\1", split.pattern)
        fused |= {
            n.replace(split.parts[0], literal)
            for n in names
            if split.parts[0] in n and _in_text_model(n) == split.text
        }
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    from transformers.core_model_loading import WeightRenaming as Rename

    model._weight_conversions = [
        # first in the list, so reversed last
        *(Rename(source_patterns=p, target_patterns=r) for p, r in renames),
        *conversions,
        *layout.offset_conversions(names),
        *layout.split_conversions(fused, config),
        *(
            channels_last_converter(f"{name}.weight")
            for name, module in model.named_modules()
            if isinstance(module, convs)
        ),
    ]
    return True


# families whose tower `mlx_vlm convert` writes under `vision_tower.vision_model.` from
# transformers 5's float checkpoint too, which has no such level (Pixtral's, SigLIP's in LLaVA
# OneVision); the others take the level their float checkpoint was read with
_FLOAT_TOWER_LEVEL = frozenset({"mistral3", "llava_onevision"})


def _save_renames(
    layout: VlmLayout, conversions: list, tower_level: bool | None = None
) -> list[tuple[str, str]]:
    """The layout's renames that saving reverses: where two lead to the same names, the one
    the model's tower takes. A SigLIP / CLIP tower, which transformers 5 reads from the Hub's
    `vision_model.` level (a prefix change of its own), keeps that level in mlx-vlm
    (`vision_tower.vision_model.`); loading a checkpoint, its names choose."""
    from transformers.core_model_loading import PrefixChange

    tower_level = (
        tower_level
        if tower_level is not None
        else any(
            isinstance(c, PrefixChange)
            and any(p.startswith("^vision_model") for p in c.source_patterns)
            for c in conversions
        )
    )
    renames: list[tuple[str, str]] = []
    targets: dict[str, tuple[str, str]] = {}
    for pattern, repl in layout.renames:
        if repl in targets:  # the more specific rename comes first
            if tower_level:
                continue
            renames.remove(targets[repl])
        targets[repl] = (pattern, repl)
        renames.append((pattern, repl))
    return renames


def mlx_vlm_module_names(
    model: nn.Module, names: Iterable[str], tower_level: bool | None = None
) -> dict[str, str]:
    """mlx-vlm's names of the model's modules `names` (for the per-module entries of
    config.json), as :func:`use_mlx_vlm_layout` saves their tensors (the parts of a tower
    projection mlx-vlm fuses all under the fused one's name); {} for a model it leaves
    alone. The renames are literal prefixes (`^...`) or infixes, reversed in turn.
    `tower_level` forces the choice of a SigLIP / CLIP tower's level (see _save_renames)."""
    config = getattr(model, "config", None)
    layout = VLM_LAYOUTS.get(getattr(config, "model_type", None) or "")
    if layout is None or not is_image_text(config):
        return {}
    conversions = getattr(model, "_mlxq_model_conversions", None)
    if conversions is None:  # before use_mlx_vlm_layout: the conversions it will read
        conversions = getattr(model, "_weight_conversions", None) or []
    if tower_level is None:  # as use_mlx_vlm_layout chose it, if it ran
        tower_level = getattr(model, "_mlxq_tower_level", None)
    renames = _save_renames(layout, conversions, tower_level)
    out = {}
    for name in names:
        key = f"{name}."
        for pattern, repl in reversed(renames):
            source = re.sub(r"\\(.)", r"\1", pattern.removeprefix("^"))
            if pattern.startswith("^"):
                key = source + key[len(repl) :] if key.startswith(repl) else key
            else:
                key = key.replace(repl, source)
        out[name] = _fused_name(layout, key, text=_in_text_model(name))[:-1]
    return out


def _fused_name(layout: VlmLayout, key: str, text: bool) -> str:
    """mlx-vlm's name of the projection it fuses (PaddleOCR-VL's `self_attn.qkv`) for a
    part of it (`self_attn.q_proj`), `key` ending in a dot, in the language model (`text`) or
    the tower; other names unchanged."""
    for split in layout.splits:
        if split.text != text:
            continue
        for part in split.parts:
            if part in key:
                return key.replace(part, re.sub(r"\\(.)", r"\1", split.pattern))
    return key


# mlx-vlm 0.7.10's `skip_multimodal_module` (mlx_vlm/utils.py): `mlx_vlm convert` leaves every
# module whose (mlx-vlm) name contains one of these float, without an entry
_MLX_VLM_MULTIMODAL = (
    "vision",
    "aligner",
    "vision_model",
    "vision_tower",
    "vl_connector",
    "sam_model",
    "audio_model",
    "audio_tower",
    "code_predictor",
    "img_projector",
    "multi_modal_projector",
    "patch_merge_mlp",
)


def _quantizable_names(model: nn.Module) -> list[str]:
    from mlxq.model_walk import plan_modules

    return [m.name for m in plan_modules(model, lambda name, plan: None).modules]


def multimodal_modules(model: nn.Module) -> list[str]:
    """The layers of an image-text model (transformers' names) that `mlx_vlm convert` keeps
    float by its rule on mlx-vlm's module names (the vision tower, projector, audio tower;
    transformers' names for a family whose layout is not mapped); [] for a text model."""
    modules = _quantizable_names(model)
    names = mlx_vlm_module_names(model, modules)
    if not names and is_image_text(getattr(model, "config", None)):  # a family not mapped
        names = {n: n for n in modules}  # (Llama 4: its names are transformers' own)
    return [n for n, v in names.items() if any(m in v for m in _MLX_VLM_MULTIMODAL)]


# families whose mlx-vlm 0.7.10 model has an output head of its own even when the model ties
# it (its sanitize copies the embedding into it): `mlx_vlm convert` writes it quantized, and
# mlx-vlm cannot load a checkpoint without it (Gemma 3's `language_model.lm_head`)
_OWN_HEAD = frozenset({"gemma3"})


def tied_head_mlx_vlm_writes(model: nn.Module) -> str | None:
    """The name of the tied output head of an image-text model that mlx-vlm's model of the
    family holds as a layer of its own (:data:`_OWN_HEAD`), else None."""
    from mlxq.model_walk import head_decision

    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in _OWN_HEAD or not is_image_text(config):
        return None
    head = head_decision(model)
    return head.head if head.tied else None


def untie_head_as_mlx_vlm(model: nn.Module) -> None:
    """Give a tied head that mlx-vlm holds as its own layer (:func:`tied_head_mlx_vlm_writes`)
    its own copy of the embedding, so that it is quantized and saved as `mlx_vlm convert`
    writes it (the embedding's values in the head's format)."""
    name = tied_head_mlx_vlm_writes(model)
    if name is None:
        return
    head = model.get_submodule(name)
    if head.weight.device.type == "meta":
        return
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)


def entries_as_model_names(model: nn.Module, entries: dict[str, Any]) -> dict[str, Any]:
    """Per-module `entries` of an image-text model, each under the model's own module name.

    An entry may name its module as transformers does (the model's names, e.g.
    `model.language_model.layers.0.mlp.down_proj`) or as mlx-vlm does in its config.json
    (`language_model.model.layers.0.mlp.down_proj`); an mlx-vlm name of a projection that
    transformers splits (PaddleOCR-VL's `qkv`) applies to each part. Other names are kept as
    they are (fused-expert entries `<experts>.gate_proj`, names of no module). Raises
    ValueError where two entries give one module different formats."""
    if not entries:
        return dict(entries)
    modules = _quantizable_names(model)
    names = mlx_vlm_module_names(model, modules)
    if not names:
        return dict(entries)
    # before loading, the model does not know yet whether its tower was read with the Hub's
    # `vision_model.` level: both of mlx-vlm's names of such a tower are accepted
    by_mlx: dict[str, list[str]] = {}
    for level in (None, True, False):
        for name, mlx in mlx_vlm_module_names(model, modules, level).items():
            if name not in by_mlx.setdefault(mlx, []):
                by_mlx[mlx].append(name)
    layout = VLM_LAYOUTS.get(getattr(model.config, "model_type", None) or "")
    out: dict[str, Any] = {}
    for key, value in entries.items():
        key = layout.concat_module(key) if layout is not None else key  # a table's shard
        targets = [key] if key in names else by_mlx.get(key, [key])
        for target in targets:
            if target in out and out[target] != value:
                raise ValueError(
                    f"mlxq: per-module entries {key!r} and another name of module {target!r} "
                    f"give it different formats ({value!r}, {out[target]!r})"
                )
            out[target] = value
    return out


def saved_module_names(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """The names `save_pretrained` gives the model's modules `names`: mlx-vlm's for an
    image-text model mlxq saves in its layout, else mlx-lm's (the names the converters' rules
    and config.json entries use)."""
    from mlxq.integrations.mlx_lm_layout import mlx_lm_module_names

    names = list(names)
    return mlx_vlm_module_names(model, names) or mlx_lm_module_names(model, names)
