"""Where mlx-lm's checkpoints differ from transformers' for the same architecture.

Two things, both per architecture:
- tensor names: mlx-lm's `sanitize` renames some architectures' tensors when it converts them
  (GPT-2 `transformer.*` -> `model.*`, GPT-NeoX `gpt_neox.layers.*` -> `model.h.*`, GPT-J
  `transformer.*` -> `model.*`) and stores GPT-2's `Conv1D` weights as linear layers
  (`[out, in]`). :data:`LAYOUTS` maps them back when loading and forward again when saving.
- config.json keys: transformers 5 keeps rope settings only inside `rope_parameters`; mlx-lm
  reads top-level keys (`rope_theta`, `partial_rotary_factor`, `rope_scaling`, GPT-NeoX's
  `rotary_emb_base`/`rotary_pct`, Gemma 3's `rope_local_base_freq`, GPT-2's `n_ctx`) and
  falls back to its own defaults without a word when they are missing.
  :func:`mlx_lm_config_keys` computes them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from mlxq.integrations.weight_ops import (
    ChannelsLastToFirst,
    UnitOffset,
    channels_last_converter,
    scalar_conversions,
    unit_offset_conversions,
)
from mlxq.swap import is_conv1d, swap_plan

__all__ = [
    "MlxLayout",
    "LAYOUTS",
    "MLX_LM_READS_ROPE_PARAMETERS",
    "MLX_LM_KEEPS_STORED_HEAD",
    "MLX_LM_LAYER_TYPE_NAMES",
    "MLX_LM_UNCHECKED",
    "MLX_LM_UNUSED_MODULES",
    "UnitOffset",
    "VISION_DROPPED",
    "unit_offset_conversions",
    "checkpoint_layout",
    "fill_dropped_tensors",
    "mlx_lm_config_keys",
    "mlx_lm_module_names",
    "mlx_lm_outer_model_type",
    "llama4_with_experts",
    "save_llama4_as_mlx_lm",
    "mlx_lm_entries",
    "run_folded_multipliers",
    "use_mlx_lm_layout",
]


@dataclass(frozen=True)
class MlxLayout:
    """mlx-lm's tensor names for one architecture, as regex renames mlx-lm -> transformers."""

    model_type: str
    renames: tuple[tuple[str, str], ...]
    marker: str | tuple[str, ...]  # a key prefix only mlx-lm's layout has (or any of some)
    conv1d_as_linear: bool = False  # Conv1D weights stored [out, in] (as nn.Linear)
    # transformers' names (regexes) of zero-centred norm weights (the module multiplies by
    # 1 + w) that mlx-lm's sanitize stores as 1 + w, for its module that multiplies by w
    unit_offset: tuple[str, ...] = ()
    # transformers' names (regexes) of one-value parameters of shape [1] that mlx-lm's sanitize
    # stores as scalars (Apertus's xIELU `alpha_p`/`alpha_n`)
    scalars: tuple[str, ...] = ()
    # state-dict keys (regexes) of tensors mlx-lm's sanitize drops because its model has no
    # use for them; zeros make transformers' forward the one mlx-lm runs
    dropped_zeros: tuple[str, ...] = ()
    # False where transformers' names are mlx-lm's own for the saved model (a text model read
    # out of an image-text checkpoint saves as the text model), so the renames of the
    # `language_model.` prefix apply on load only (see load_only)
    save_renamed: bool = True
    # checkpoint keys (regexes) that mlx-lm's sanitize drops on purpose, its model having no
    # place for them: the vision tower of an image-text checkpoint read as the text model
    dropped: tuple[str, ...] = ()
    # convolutions mlx-lm keeps apart (channels-last) where transformers concatenates them into
    # one (its own converter, on channels-first weights): ((sources, ...), target), names
    # relative to a layer's module
    conv_concat: tuple[tuple[tuple[str, ...], str], ...] = ()
    # linear layers mlx-lm's sanitize splits that transformers keeps fused: ((parts, ...), fused)
    # module name suffixes (after the renames); the parts' tensors (weight, scales, biases) are
    # concatenated along the output rows at load, which is exact for MLX's row-wise groups
    merges: tuple[tuple[tuple[str, ...], str], ...] = ()
    # per-expert layers mlx-lm's sanitize cuts out of a stacked parameter (DBRX's experts):
    # ((source with `*` for the expert number, target), ...) module name suffixes; each
    # tensor (weight, scales, biases) of experts 0..E-1 is stacked along a new dim 0 at load,
    # as mlxq's experts hold them, and cut back into experts by `save_pretrained`
    stacks: tuple[tuple[str, str], ...] = ()

    def stack_headers(self, headers: dict) -> dict:
        """`headers` (transformers' names -> TensorInfo) with each stack's experts replaced by
        the stacked tensor; experts missing or stored in different formats are refused by
        name."""
        from mlxq.integrations.checkpoint import TensorInfo

        out = dict(headers)
        for source, target in self.stacks:
            pattern = re.compile(re.escape(source).replace(r"\*", r"(\d+)") + r"\.(\w+)$")
            groups: dict[tuple[str, str], dict[int, Any]] = {}
            for key, info in headers.items():
                m = pattern.search(key)
                if m is not None:
                    groups.setdefault((key[: m.start()], m[2]), {})[int(m[1])] = info
                    del out[key]
            for (base, leaf), experts in groups.items():
                found = {(i.dtype, tuple(i.shape)) for i in experts.values()}
                if sorted(experts) != list(range(len(experts))) or len(found) != 1:
                    raise ValueError(
                        f"mlxq: {base}{source} ({leaf}): experts {sorted(experts)} stored as "
                        f"{sorted(found)}; mlxq stacks them into one {base}{target}, which needs "
                        "experts 0..E-1 in one format"
                    )
                dtype, shape = found.pop()
                out[f"{base}{target}.{leaf}"] = TensorInfo(dtype, (len(experts), *shape))
        return out

    def stack_conversions(self) -> list:
        """`WeightConverter`s stacking each stack's experts at load (`save_pretrained` cuts
        the stack back into mlx-lm's per-expert tensors)."""
        from transformers.core_model_loading import MergeModulelist, WeightConverter

        return [
            WeightConverter(
                source_patterns=f"{source}.{leaf}",
                target_patterns=f"{target}.{leaf}",
                operations=[MergeModulelist(dim=0)],
            )
            for source, target in self.stacks
            for leaf in ("weight", "scales", "biases")
        ]

    # source patterns of the model's own renamings (transformers' conversion mapping) whose
    # names mlx-lm keeps: a model quantized by mlxq saves without reversing them (Kimi
    # Linear's `.mlp.`, which transformers reads from the Hub's `.block_sparse_moe.`)
    kept_model_renames: tuple[str, ...] = ()
    # rename patterns that describe mlx-lm's model without experts only (Granite 4.0's dense
    # MLP); a model with experts saves without them, and without the merges
    dense_only: tuple[str, ...] = ()
    # expert stacks that mlx-vlm's port fuses where mlx-lm keeps them apart: (fused, (first,
    # second)) module name suffixes (after the renames); the fused tensors ([E, 2I, ...], the
    # first part's rows, then the second's) are cut in two along dim 1 at load, exact for
    # MLX's row-wise groups. `save_pretrained` writes mlx-lm's separate stacks
    fused_stacks: tuple[tuple[str, tuple[str, str]], ...] = ()

    def _fused(self, keys: Iterable[str]) -> list[tuple[str, tuple[str, str], str]]:
        """(fused, parts, leaf) of :attr:`fused_stacks` whose fused tensor `keys` hold."""
        keys = list(keys)
        return [
            (fused, parts, leaf)
            for fused, parts in self.fused_stacks
            for leaf in ("weight", "scales", "biases")
            if any(k.endswith(f".{fused}.{leaf}") for k in keys)
        ]

    def split_headers(self, headers: dict) -> dict:
        """`headers` (transformers' names -> TensorInfo) with each fused stack replaced by its
        two halves (see :attr:`fused_stacks`)."""
        from mlxq.integrations.checkpoint import TensorInfo

        out = dict(headers)
        for fused, parts, leaf in self._fused(headers):
            for key in [k for k in headers if k.endswith(f".{fused}.{leaf}")]:
                info = out.pop(key)
                if len(info.shape) != 3 or info.shape[1] % 2:
                    raise ValueError(
                        f"mlxq: {key}: {tuple(info.shape)}, expected [experts, 2 x rows, ...] "
                        f"(mlx-vlm's fused {parts[0]} and {parts[1]})"
                    )
                base = key.removesuffix(f"{fused}.{leaf}")
                half = (info.shape[0], info.shape[1] // 2, *info.shape[2:])
                for part in parts:
                    out[f"{base}{part}.{leaf}"] = TensorInfo(info.dtype, half)
        return out

    def split_conversions(self, keys: Iterable[str]) -> list:
        """`WeightConverter`s cutting the fused stacks that `keys` (transformers' names) hold
        into their halves at load."""
        from transformers.core_model_loading import Chunk, WeightConverter

        return [
            WeightConverter(
                source_patterns=f"{fused}.{leaf}",
                target_patterns=[f"{part}.{leaf}" for part in parts],
                operations=[Chunk(dim=1)],
            )
            for fused, parts, leaf in self._fused(keys)
        ]

    def merge_headers(self, headers: dict) -> dict:
        """`headers` (transformers' names -> TensorInfo) with the parts of each merge replaced
        by the fused tensor; parts stored in different formats are refused by name."""
        from mlxq.integrations.checkpoint import TensorInfo

        out = dict(headers)
        for parts, fused in self.merges:
            for key in [k for k in headers if re.search(rf"{re.escape(parts[0])}\.\w+$", k)]:
                module, leaf = key.rsplit(".", 1)
                base = module.removesuffix(parts[0])
                infos = [headers.get(f"{base}{p}.{leaf}") for p in parts]
                shapes = {tuple(i.shape[1:]) for i in infos if i is not None}
                if all(i is not None and not i.shape for i in infos):  # names only
                    for p in parts:
                        del out[f"{base}{p}.{leaf}"]
                    out[f"{base}{fused}.{leaf}"] = infos[0]
                    continue
                if any(i is None for i in infos) or len(shapes) != 1:
                    raise ValueError(
                        f"mlxq: {', '.join(f'{base}{p}' for p in parts)} ({leaf}) are stored in "
                        f"different formats; transformers' {base}{fused} holds them as one "
                        "layer, which needs one format"
                    )
                for p in parts:
                    del out[f"{base}{p}.{leaf}"]
                rows = sum(i.shape[0] for i in infos)
                out[f"{base}{fused}.{leaf}"] = TensorInfo(infos[0].dtype, (rows, *shapes.pop()))
        return out

    def merge_conversions(self) -> list:
        """`WeightConverter`s concatenating the parts of each merge at load (`save_pretrained`
        cuts the fused tensor back into equal parts, as mlx-lm stores them)."""
        from transformers.core_model_loading import Concatenate, WeightConverter

        return [
            WeightConverter(
                source_patterns=[f"{p}.{leaf}" for p in parts],
                target_patterns=f"{fused}.{leaf}",
                operations=[Concatenate(dim=0)],
            )
            for parts, fused in self.merges
            for leaf in ("weight", "scales", "biases")
        ]

    def load_only(self) -> tuple[tuple[str, str], ...]:
        """The renames `save_pretrained` does not reverse: the `language_model.` prefix where
        the text model saves in its own names (the MoE renames of Gemma 4's text model, read
        this way, are reversed as usual)."""
        if self.save_renamed:
            return ()
        return tuple(r for r in self.renames if r in _LANGUAGE_MODEL or r == _LANGUAGE_MODEL_ANY)

    def drops(self, key: str) -> bool:
        """Whether mlx-lm's sanitize drops the checkpoint tensor `key` (see :attr:`dropped`)."""
        return any(re.search(p, key) for p in self.dropped)

    def to_transformers(self, key: str) -> str:
        """`key` renamed as transformers applies the renames: each in turn (a Qwen 3.5 MoE
        expert takes the prefix rename, then the switch_mlp one)."""
        for pattern, repl in self.renames:
            key = re.sub(pattern, repl, key)
        return key

    def weight_renamings(self) -> list:
        """The renames as transformers `WeightRenaming`s (applied on load, reversed on save)."""
        from transformers.core_model_loading import WeightRenaming

        return [WeightRenaming(source_patterns=p, target_patterns=r) for p, r in self.renames]

    def concat_headers(self, headers: dict) -> dict:
        """`headers` (transformers' names -> TensorInfo) with each set of :attr:`conv_concat`
        sources stored channels-last replaced by the concatenated channels-first target, as
        :meth:`conv_concat_conversions` loads them (what `mlxq inspect` checks names against)."""
        from mlxq.integrations.checkpoint import TensorInfo

        out = dict(headers)
        for sources, target in self.conv_concat:
            for key in [k for k in headers if k.endswith(f".{sources[0]}")]:
                base = key.removesuffix(sources[0])
                infos = [headers.get(f"{base}{src}") for src in sources]
                if any(i is None or len(i.shape) != 3 or i.shape[2] != 1 for i in infos):
                    continue
                for src in sources:
                    del out[f"{base}{src}"]
                rows = sum(i.shape[0] for i in infos)
                out[f"{base}{target}"] = TensorInfo(infos[0].dtype, (rows, 1, infos[0].shape[1]))
        return out

    def conv_concat_conversions(self, headers) -> list:
        """`WeightConverter`s for :attr:`conv_concat` where the checkpoint (`headers`: stored
        name -> TensorInfo) holds the sources channels-last (`[C, K, 1]`, as mlx-lm writes
        them): concatenated, then permuted to channels-first; `save_pretrained` reverses
        both."""
        from transformers.core_model_loading import WeightConverter

        out = []
        for sources, target in self.conv_concat:
            shapes = [
                next((tuple(i.shape) for k, i in headers.items() if k.endswith(src)), None)
                for src in sources
            ]
            if any(s is None or len(s) != 3 or s[2] != 1 or s[1] == 1 for s in shapes):
                continue
            # split back by the stored widths (transformers' own reverse cuts equal parts)
            sizes = [s[0] for s in shapes]
            out.append(
                WeightConverter(
                    source_patterns=list(sources),
                    target_patterns=target,
                    operations=[SizedConcat(sizes), ChannelsLastToFirst(True)],
                )
            )
        return out

    def offset_conversions(
        self, names: Iterable[str], source: Callable[[str], str] | None = None
    ) -> list:
        """`WeightConverter`s taking 1 off each of `names` (the model's tensor names) that
        :attr:`unit_offset` matches at load; `save_pretrained` adds it back. Also those giving
        :attr:`scalars` their shape [1] (written back as scalars). `source`: the name each
        converter matches for a model name, where they differ (the base model's)."""
        names = list(names)
        return [
            *unit_offset_conversions(names, self.unit_offset, source),
            *scalar_conversions(names, self.scalars, source),
        ]


class SizedConcat:
    """A transformers `ConversionOps` concatenating its sources (in pattern order) along dim 0;
    its reverse (used by `save_pretrained`) splits them back by `sizes`."""

    def __new__(cls, sizes: list[int], split: bool = False):
        import torch
        from transformers.core_model_loading import ConversionOps

        class _Op(ConversionOps):
            def __init__(self, sizes: list[int], split: bool) -> None:
                self.sizes, self.split = list(sizes), split

            def __repr__(self) -> str:
                return f"Sized{'Split' if self.split else 'Concat'}({self.sizes})"

            @torch.no_grad()
            def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
                if self.split:
                    (value,) = input_dict.values()
                    tensor = value[0] if isinstance(value, list) else value
                    parts = torch.split(tensor, self.sizes, dim=0)
                    return {t: p.contiguous() for t, p in zip(target_patterns, parts, strict=True)}
                tensors = []
                for pattern in source_patterns:
                    value = input_dict.pop(pattern)
                    tensors.extend(value if isinstance(value, list) else [value])
                return {target_patterns[0]: torch.cat(tensors, dim=0)}

            @property
            def reverse_op(self):
                return _Op(self.sizes, not self.split)

            def __reduce__(self):  # a local class: pickled as the call that makes it
                return (SizedConcat, (self.sizes, self.split))

        return _Op(sizes, split)


LAYOUTS: dict[str, MlxLayout] = {
    "gpt2": MlxLayout("gpt2", ((r"^model\.", "transformer."),), "model.h.", conv1d_as_linear=True),
    "gptj": MlxLayout("gptj", ((r"^model\.", "transformer."),), "model.h."),
    # Apertus: mlx-lm's sanitize squeezes the xIELU activation's alpha_p/alpha_n to scalars
    "apertus": MlxLayout("apertus", (), ".mlp.act_fn.alpha_p", scalars=(r"\.act_fn\.alpha_[pn]$",)),
    # nanochat's own names (mlx-lm's model has them): transformers 5 renames them Llama's way
    "nanochat": MlxLayout(
        "nanochat",
        (
            (r"^transformer\.wte\.", "model.embed_tokens."),
            (r"^transformer\.h\.", "model.layers."),
            (r"\.attn\.c_q\.", ".self_attn.q_proj."),
            (r"\.attn\.c_k\.", ".self_attn.k_proj."),
            (r"\.attn\.c_v\.", ".self_attn.v_proj."),
            (r"\.attn\.c_proj\.", ".self_attn.o_proj."),
            (r"\.mlp\.c_fc\.", ".mlp.fc1."),
            (r"\.mlp\.c_proj\.", ".mlp.fc2."),
        ),
        "transformer.h.",
    ),
    "gpt_neox": MlxLayout(
        "gpt_neox",
        (
            (r"^model\.h\.", "gpt_neox.layers."),
            (r"^model\.(embed_in|final_layer_norm|emb_dropout)\.", r"gpt_neox.\1."),
            (r"^model\.embed_out\.", "lm_head."),  # transformers 5 names the head lm_head
        ),
        "model.h.",
        kept_model_renames=(r"^embed_out\.",),  # (its head is mlx-lm's model.embed_out)
    ),
}


# text model types whose image-text checkpoint (mlx-vlm's, with the vision tower) mlx-lm 0.32
# reads as the language model, dropping these tensors in its sanitize: Gemma 3 (mlx-lm's gemma3
# drops `vision_tower` and `multi_modal_projector`)
VISION_DROPPED: dict[str, tuple[str, ...]] = {
    "gemma3_text": (r"^vision_tower\.", r"^multi_modal_projector\."),
    # mlx-lm's gemma4 drops the towers and their embedders (image, audio)
    "gemma4_text": (
        r"^vision_tower\.",
        r"^multi_modal_projector\.",
        r"^audio_tower\.",
        r"^embed_audio\.",
        r"^embed_vision\.",
        r"^vision_embedder\.",
    ),
}


def checkpoint_layout(model_type: str | None, keys: Iterable[str]) -> MlxLayout | None:
    """mlx-lm's layout when the checkpoint of a `model_type` model uses it, else None.

    A text model whose every tensor lies under `language_model.` is read from mlx-lm's
    conversion of an image-text model (Gemma 3 4B and up, Mistral 3, LFM2-VL, Kimi K2.5: mlx-lm
    keeps the language model only) or from mlx-vlm's conversion of a text model (its port of
    mlx-lm's model under `language_model.`, whatever mlx-lm's top-level names); the text
    model's own layout (MoE renames) applies after the prefix. It saves in its own names,
    which are those of mlx-lm's text model. For the text models of :data:`VISION_DROPPED`, an
    image-text checkpoint that also holds the vision tower reads the same way, the tower left
    out (as mlx-lm's sanitize drops it)."""
    keys = list(keys)
    layout = LAYOUTS.get(model_type or "")
    dropped = VISION_DROPPED.get(model_type or "", ())
    text = [k for k in keys if not any(re.search(p, k) for p in dropped)]
    # a layout that names the prefix itself (Qwen 3.5's) is read as it is; any other text
    # model's own renames (MoE experts: Kimi K2.5's DeepSeek V3, Gemma 4) follow the prefix's
    own = layout is None or not any(r in layout.renames for r in _LANGUAGE_MODEL)
    if own and text and all(k.startswith("language_model.") for k in text):
        if layout is None:
            layout = MlxLayout(model_type or "", (), "language_model.")
        return replace(
            layout,
            renames=(*_LANGUAGE_MODEL, _LANGUAGE_MODEL_ANY, *layout.renames),
            marker="language_model.",
            save_renamed=False,
            dropped=dropped if len(text) < len(keys) else (),
        )
    if layout is None or not any(_has_marker(k, layout.marker) for k in keys):
        return None
    return layout


def _flat_rope(rope: dict) -> tuple[dict, dict]:
    """(rope settings of full attention, of sliding attention) from `rope_parameters`, which
    transformers nests per layer type for some models (Gemma 3, OLMo 3)."""
    if isinstance(rope.get("full_attention"), dict):
        sliding = rope.get("sliding_attention")
        return rope["full_attention"], sliding if isinstance(sliding, dict) else {}
    return rope, {}


def _sliding_window_pattern(layer_types: Any) -> int | None:
    """p such that layer i is full attention exactly when (i + 1) % p == 0, else None."""
    if not isinstance(layer_types, list) or "full_attention" not in layer_types:
        return None
    p = layer_types.index("full_attention") + 1
    full = [(i + 1) % p == 0 for i in range(len(layer_types))]
    if full != [t == "full_attention" for t in layer_types]:
        return None
    return p


# model types whose mlx-lm module (mlx-lm 0.32) reads `rope_parameters` itself, so that a
# rope_theta kept only there is not lost
MLX_LM_READS_ROPE_PARAMETERS = frozenset(
    "exaone_moe gemma4_text glm_moe_dsa granitemoehybrid laguna lfm2 lfm2_moe mellum "
    "ministral3 mistral4 olmo_hybrid qwen3 qwen3_5 qwen3_5_moe".split()
)


# model types whose MLX checkpoints mlxq refuses by name, because no tiny model of them could be
# checked against mlx-lm 0.32: its model is another than transformers 5.24's, or it cannot run
# on MLX's CPU back-end
MLX_LM_UNCHECKED: dict[str, str] = {
    "bailing_hybrid": (
        "mlx-lm 0.32's bailing_hybrid has lightning linear attention (a fused "
        "`query_key_value`, `g_proj` and a group norm), transformers 5.24's has KDA linear "
        "attention (`q/k/v_conv1d`, `f_proj`, `A_log`) and gated MLA: they are different models"
    ),
    "muse_spark": (
        "mlx-lm 0.32 runs Muse Spark with Metal kernels only (no CPU oracle) and converts it to "
        "tensors of its own (residual gates as alpha/beta, norms as 1 + w, q/k/v/gate fused "
        "with rope-interleaved rows); mlxq maps neither that layout nor mlx-vlm's"
    ),
}


# model types (transformers' names) whose checkpoints hold modules that transformers does not
# build and that mlx-lm's model holds without using them. Gemma 3n's KV-shared layers reuse the
# keys and values of the last earlier layer of their kind (mlx-lm through its cache), so
# transformers builds no key/value projections or key norm for them: mlxq adds them (copies of
# the same module of another layer), which the forward never calls, so that their tensors load
# as mlx-lm's do and `save_pretrained` writes them back for mlx-lm's strict load
MLX_LM_UNUSED_MODULES: dict[str, str] = {"gemma3n_text": r"\.self_attn\.(k_proj|v_proj|k_norm)$"}


# model types whose mlx-lm 0.32 model reads the Hub's layer type names, which transformers 5
# reads as legacy names and writes as its own (mlx-lm then raises "Unknown layer type")
MLX_LM_LAYER_TYPE_NAMES: dict[str, dict[str, str]] = {
    "granitemoehybrid": {"linear_attention": "mamba", "full_attention": "attention"},
}


# model types (transformers' names) whose mlx-lm 0.32 model runs an output head of its own when
# the checkpoint holds one, whatever `tie_word_embeddings` says: it builds `lm_head` (GPT-NeoX:
# `embed_out`) unconditionally (Solar Open: GLM-4 MoE's model), or keeps it when its weight is
# stored (Gemma 3, RecurrentGemma).
# Every other mlx-lm model with tied embeddings has no head module: its sanitize drops a float
# `lm_head.weight` and its strict load refuses a quantized head's scales and biases.
MLX_LM_KEEPS_STORED_HEAD = frozenset(
    "dbrx deepseek_v2 deepseek_v3 deepseek_v32 gemma3_text glm4 glm4_moe glm4_moe_lite "
    "glm_moe_dsa gpt_neox gpt_oss gptj kimi_k25 longcat_flash mimo_v2_flash muse_spark "
    "nanochat nemotron_h phi phimoe qwen2_moe recurrent_gemma solar_open stablelm step3p5".split()
)


def mlx_lm_config_keys(config: Any) -> dict[str, Any]:
    """Top-level config.json keys mlx-lm reads for this config's architecture and that
    transformers 5 does not write (values from `rope_parameters` and the config itself).

    Keys the config already has at the top level are not returned.
    """
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    model_type = cfg.get("model_type")
    out: dict[str, Any] = {}
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict):
        full, sliding = _flat_rope(rope)
        if "rope_theta" in full:
            out["rope_theta"] = full["rope_theta"]
        if "partial_rotary_factor" in full:
            out["partial_rotary_factor"] = full["partial_rotary_factor"]
        if "rope_theta" in sliding and model_type in ("gemma3_text", "gemma3", "gemma3n_text"):
            out["rope_local_base_freq"] = sliding["rope_theta"]
        rope_type = full.get("rope_type", full.get("type", "default"))
        if rope_type != "default":
            scaling = {
                k: v for k, v in full.items() if k not in ("rope_theta", "partial_rotary_factor")
            }
            out["rope_scaling"] = scaling
        elif model_type in ("exaone4", "llama4_text"):  # required by mlx-lm's exaone4, llama4
            out["rope_scaling"] = None
        if model_type == "gpt_neox":
            out["rotary_emb_base"] = full.get("rope_theta", 10000.0)
            out["rotary_pct"] = full.get("partial_rotary_factor", 1.0)
    # transformers 5 writes these models' expert count as `num_local_experts` only; mlx-lm's
    # ModelArgs requires `num_experts`
    if model_type in ("qwen3_moe", "qwen2_moe", "olmoe") and "num_local_experts" in cfg:
        out["num_experts"] = cfg["num_local_experts"]
    pattern = _sliding_window_pattern(cfg.get("layer_types"))
    if pattern is not None and model_type in ("gemma3_text", "gemma3", "cohere2"):
        out["sliding_window_pattern"] = pattern  # mlx-lm derives the layer types from it
    if model_type == "gpt2" and "n_positions" in cfg:
        out["n_ctx"] = cfg["n_positions"]
    out = {k: v for k, v in out.items() if k not in cfg}
    if model_type == "exaone4" and not isinstance(cfg.get("sliding_window_pattern"), str):
        out["sliding_window_pattern"] = _exaone4_pattern(cfg.get("layer_types"))
    return out


def _exaone4_pattern(layer_types: Any) -> str | None:
    """mlx-lm's exaone4 reads the Hub's layer pattern string ("LLLG": L sliding, G full,
    repeated; None: every layer full) and indexes it, where transformers 5 writes an int."""
    if not layer_types or all(t == "full_attention" for t in layer_types):
        return None
    period = _sliding_window_pattern(layer_types)
    if period is None:
        raise ValueError(
            f"mlxq: exaone4 layer_types {layer_types} are not a repeated pattern ending in one "
            "full-attention layer, which mlx-lm's sliding_window_pattern string cannot express"
        )
    return "L" * (period - 1) + "G"


# Mixture-of-experts: mlx-lm stacks each expert projection as `<block>.switch_mlp.<proj>.*`
# (gpt-oss: `mlp.experts.<proj>`); mlxq's MoeExperts holds them as `<block>.experts.<proj>.*`
# (where transformers 5 has its fused experts module), so only the folder name changes. A
# marker that starts with "." is looked for anywhere in a key.
# The renames name the block too: saving applies them backwards with the target as the
# pattern, and a bare `.experts.` would also match `shared_experts.` (DeepSeek, GLM).
_MOE_RENAMES = ((r"\.mlp\.switch_mlp\.", ".mlp.experts."),)
_MOE_RENAMES_BLOCK = ((r"\.block_sparse_moe\.switch_mlp\.", ".block_sparse_moe.experts."),)
for _model_type in (
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "glm4_moe",
    "solar_open",
    "mellum",
    "mimo_v2_flash",
):
    LAYOUTS[_model_type] = MlxLayout(_model_type, _MOE_RENAMES, ".switch_mlp.")
# EXAONE MoE: the Hub keeps the router's correction bias beside it (`mlp.e_score_correction_bias`),
# mlx-lm's sanitize moves it into the router (`mlp.gate.`), where transformers' model has it:
# transformers' own renaming is not reversed when saving
LAYOUTS["exaone_moe"] = MlxLayout(
    "exaone_moe", _MOE_RENAMES, ".switch_mlp.", kept_model_renames=("mlp.e_score_correction_bias",)
)
for _model_type in ("mixtral", "minimax_m2"):
    LAYOUTS[_model_type] = MlxLayout(_model_type, _MOE_RENAMES_BLOCK, ".switch_mlp.")
# DeepSeek V3, V3.2, GLM-4.7-Flash (glm4_moe_lite), GLM-5 (glm_moe_dsa) and Mistral Small 4
# (mistral4): mlx-lm splits `self_attn.kv_b_proj` into `embed_q` and `unembed_out`
# (mlxq.mla.SplitKvB holds them under kv_b_proj)
for _model_type in ("deepseek_v3", "glm4_moe_lite", "deepseek_v32", "glm_moe_dsa", "mistral4"):
    LAYOUTS[_model_type] = MlxLayout(
        _model_type,
        ((r"\.self_attn\.(embed_q|unembed_out)\.", r".self_attn.kv_b_proj.\1."), *_MOE_RENAMES),
        ".switch_mlp.",
    )
# LongCat-Flash: only the experts' switch_mlp is read. mlxq refuses the model (up to transformers
# 5.24 at its experts, from 5.25 at its router, whose forward reads the quantized classifier's
# weight), so its attention (two modules a layer, kv_b_proj split as DeepSeek's) has no layout
# yet; without this the refusal named the experts' tensors as missing from the checkpoint
LAYOUTS["longcat_flash"] = MlxLayout("longcat_flash", _MOE_RENAMES, ".switch_mlp.")
# Qwen3-Next: its RMSNorms multiply by 1 + w in transformers; mlx-lm's sanitize stores 1 + w
# (rounded to the checkpoint's dtype) for its plain RMSNorm (not the gated norm of the linear
# attention)
_QWEN_NORMS = (
    r"\.(input_layernorm|post_attention_layernorm|q_norm|k_norm)\.weight$",
    r"^model\.norm\.weight$",
)
LAYOUTS["qwen3_next"] = MlxLayout(
    "qwen3_next", _MOE_RENAMES, ".switch_mlp.", unit_offset=_QWEN_NORMS
)
_MOE_RENAMES_FEED_FORWARD = ((r"\.feed_forward\.switch_mlp\.", ".feed_forward.experts."),)
LAYOUTS["jamba"] = MlxLayout("jamba", _MOE_RENAMES_FEED_FORWARD, ".switch_mlp.")
# LFM2-MoE: mlx-lm names the dense layers' w1/w3/w2 gate_proj/up_proj/down_proj
LAYOUTS["lfm2_moe"] = MlxLayout(
    "lfm2_moe",
    (
        *_MOE_RENAMES_FEED_FORWARD,
        (r"\.feed_forward\.gate_proj\.", ".feed_forward.w1."),
        (r"\.feed_forward\.up_proj\.", ".feed_forward.w3."),
        (r"\.feed_forward\.down_proj\.", ".feed_forward.w2."),
    ),
    ".switch_mlp.",
)
# Qwen 3.5 (dense and MoE): an image-text model on the Hub; mlx-lm keeps its language model
# under `language_model.` (`language_model.model.*`, `language_model.lm_head.*`), which
# transformers' causal LM names `model.*` and `lm_head.*`. mlx-lm's sanitize stores the
# RMSNorm weights as 1 + w, as for Qwen3-Next.
_LANGUAGE_MODEL = (
    (r"^language_model\.model\.", "model."),
    (r"^language_model\.lm_head\.", "lm_head."),
)
# mlx-vlm keeps a text model (its port of mlx-lm's) under `language_model.` whatever mlx-lm's
# own top-level names are (GPT-BigCode's `transformer.`, Mamba's `backbone.`)
_LANGUAGE_MODEL_ANY = (r"^language_model\.", "")
# (transformers' causal LM holds the text config: model types qwen3_5_text, qwen3_5_moe_text)
LAYOUTS["qwen3_5_text"] = MlxLayout(
    "qwen3_5", _LANGUAGE_MODEL, "language_model.model.", unit_offset=_QWEN_NORMS
)
LAYOUTS["qwen3_5_moe_text"] = MlxLayout(
    "qwen3_5_moe",
    (*_LANGUAGE_MODEL, *_MOE_RENAMES),
    "language_model.model.",
    unit_offset=_QWEN_NORMS,
)
# transformers renames PhiMoE's `gate.weight` (only) to `router.weight`: rename the router's
# folder for all its tensors (transformers' `.block_sparse_moe.` -> `.mlp.` chains after it)
LAYOUTS["phimoe"] = MlxLayout(
    "phimoe",
    ((r"\.block_sparse_moe\.gate\.", ".block_sparse_moe.router."), *_MOE_RENAMES_BLOCK),
    ".switch_mlp.",
)
# mlx-lm's GraniteMoE router is a `GraniteMoeTopKGating` holding an nn.Linear `layer`
LAYOUTS["granitemoe"] = MlxLayout(
    "granitemoe", (*_MOE_RENAMES_BLOCK, (r"\.router\.layer\.", ".router.")), ".switch_mlp."
)
# Granite 4.0 (H): GraniteMoE's layout; without experts (the dense models) mlx-lm splits the
# MLP's fused `shared_mlp.input_linear` into `mlp.gate_proj`/`mlp.up_proj` and names
# `shared_mlp.output_linear` `mlp.down_proj`
LAYOUTS["granitemoehybrid"] = MlxLayout(
    "granitemoehybrid",
    (
        *_MOE_RENAMES_BLOCK,
        (r"\.router\.layer\.", ".router."),
        (r"\.mlp\.down_proj\.", ".shared_mlp.output_linear."),
    ),
    (".switch_mlp.", ".mlp.gate_proj."),
    merges=(((".mlp.gate_proj", ".mlp.up_proj"), ".shared_mlp.input_linear"),),
    dense_only=(r"\.mlp\.down_proj\.",),
)


# DBRX: mlx-lm's sanitize cuts the Hub's 2-D experts (`ffn.experts.mlp.w1`/`v1`/`w2`,
# [E * I, H]) into one linear layer per expert (`ffn.experts.<e>.w1`, w2 transposed to
# [H, I]); mlxq's experts module holds them stacked
LAYOUTS["dbrx"] = MlxLayout(
    "dbrx",
    (),
    ".ffn.experts.0.",
    stacks=(
        (".ffn.experts.*.w1", ".ffn.experts.gate_proj"),
        (".ffn.experts.*.v1", ".ffn.experts.up_proj"),
        (".ffn.experts.*.w2", ".ffn.experts.down_proj"),
    ),
)


# Nemotron-H: mlx-lm stacks the experts (no gate) as `mixer.switch_mlp.fc1` (up) and `fc2`
# (down); transformers' own renaming maps mlx-lm's (the Hub's) `backbone.` to `model.`
LAYOUTS["nemotron_h"] = MlxLayout(
    "nemotron_h",
    (
        (r"\.mixer\.switch_mlp\.fc1\.", ".mixer.experts.up_proj."),
        (r"\.mixer\.switch_mlp\.fc2\.", ".mixer.experts.down_proj."),
    ),
    ".switch_mlp.",
)


# OLMo Hybrid: mlx-lm keeps the gated-delta layers' q/k/v convolutions apart, channels-last;
# transformers concatenates them into `linear_attn.conv1d`
_QKV_CONV = tuple(f"linear_attn.{p}_conv1d.weight" for p in "qkv")
LAYOUTS["olmo_hybrid"] = MlxLayout(
    "olmo_hybrid",
    (),
    ".linear_attn.q_conv1d.",
    conv_concat=((_QKV_CONV, "linear_attn.conv1d.weight"),),
    # transformers saves the norms under legacy names; mlx-lm's are the model's own
    kept_model_renames=("attention_layer_norm", "feedforward_layer_norm"),
)


# Kimi Linear: mlx-lm names the KDA convolutions `{q,k,v}_conv.conv` (channels-last; transformers
# concatenates them into `conv1d`) and keeps the router's correction bias beside the router
LAYOUTS["kimi_linear"] = MlxLayout(
    "kimi_linear",
    (
        (
            r"\.mlp\.e_score_correction_bias",
            ".mlp.gate.e_score_correction_bias",
        ),  # (no $: reversed)
        (r"\.self_attn\.(embed_q|unembed_out)\.", r".self_attn.kv_b_proj.\1."),
        *_MOE_RENAMES,
    ),
    ".switch_mlp.",
    conv_concat=(
        (tuple(f"self_attn.{p}_conv.conv.weight" for p in "qkv"), "self_attn.conv1d.weight"),
    ),
    kept_model_renames=(r"\.block_sparse_moe\.",),
)


# Laguna: mlx-lm's router holds its linear layer as `gate.proj` (the correction bias stays in
# `gate`); named per tensor, so that saving does not move the bias into `gate.proj`. The Hub
# keeps the bias with the experts, where transformers' renaming (not reversed when saving)
# would put it back: mlx-lm writes it under `gate.`
LAYOUTS["laguna"] = MlxLayout(
    "laguna",
    ((r"\.mlp\.gate\.proj\.(weight|scales|biases)", r".mlp.gate.\1"), *_MOE_RENAMES),
    ".switch_mlp.",
    kept_model_renames=("mlp.experts.e_score_correction_bias",),
    # (mlx-vlm's laguna: `switch_mlp.gate_up_proj`, gate rows then up rows)
    fused_stacks=(("mlp.experts.gate_up_proj", ("mlp.experts.gate_proj", "mlp.experts.up_proj")),),
)
# Llama 4's text model (`llama4_text`, also what transformers builds for a `llama4` checkpoint
# through AutoModelForCausalLM): mlx-lm's llama4_text (the dense variant) names the untied
# head `output`; mlx-lm's llama4 keeps the Hub's `language_model.model.` prefix, which
# transformers maps for every tensor its model has, the stacked experts being mlxq's only
LAYOUTS["llama4_text"] = MlxLayout(
    "llama4_text",
    (
        (r"^output\.", "lm_head."),
        (r"^language_model\.model\.(layers\.\d+\.feed_forward\.experts\.)", r"model.\1"),
    ),
    ("output.", ".feed_forward.experts.gate_proj."),
)
# Gemma 4 (26B-A4B): mlx-lm stacks the experts under `experts.switch_glu`
LAYOUTS["gemma4_text"] = MlxLayout(
    "gemma4_text", ((r"\.experts\.switch_glu\.", ".experts."),), ".switch_glu."
)
# ERNIE 4.5 MoE: mlx-lm drops the routers' `e_score_correction_bias` (transformers adds it to
# the softmax scores before choosing the experts); with zeros both choose alike
LAYOUTS["ernie4_5_moe"] = MlxLayout(
    "ernie4_5_moe",
    _MOE_RENAMES,
    ".switch_mlp.",
    dropped_zeros=(r"\.mlp\.gate\.moe_statics\.e_score_correction_bias$",),
)


# text models that mlx-lm keeps inside its image-text model where transformers' own renaming
# gives the names (Gemma 3n: `model.language_model.*`), with no layout of mlxq's
_NESTED_BY_NAME = {"gemma3n_text": "gemma3n"}


def llama4_with_experts(config: Any) -> bool:
    """Llama 4's text model with MoE layers: mlx-lm 0.32 runs it only as its image-text
    `llama4` (its `llama4_text` is the dense variant, which refuses the experts' tensors)."""
    model_type = getattr(config, "model_type", None)
    return model_type == "llama4_text" and bool(getattr(config, "moe_layers", None))


def save_llama4_as_mlx_lm(model) -> None:
    """Save Llama 4's text model with experts as mlx-lm's `llama4` reads it: every tensor
    under `language_model.` (the config nested: :func:`mlx_lm_outer_model_type`), in place of
    the layout's renames (`output.`, the dense `llama4_text`'s head) and of a prefix read with
    the checkpoint; reversed last when saving, after the model's own renamings."""
    from transformers.core_model_loading import WeightRenaming

    ours = {*_LANGUAGE_MODEL, _LANGUAGE_MODEL_ANY, *LAYOUTS["llama4_text"].renames}
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        from transformers.conversion_mapping import get_model_conversion_mapping

        conversions = get_model_conversion_mapping(model, add_legacy=False)
    kept = [
        c
        for c in conversions
        if not (
            type(c) is WeightRenaming
            and any((p, t) in ours for p in c.source_patterns for t in c.target_patterns)
        )
    ]
    prefix = [WeightRenaming(source_patterns=p, target_patterns=r) for p, r in _LANGUAGE_MODEL]
    model._weight_conversions = [*prefix, *kept]


def mlx_lm_outer_model_type(model_type: str | None, config: Any = None) -> str | None:
    """The model type of mlx-lm's model for a text model that mlx-lm keeps under
    `language_model.` of its image-text model (Qwen 3.5: `qwen3_5_text` -> `qwen3_5`; Llama 4
    with experts, `config`: `llama4_text` -> `llama4`), whose config.json nests the text
    settings in `text_config` as `mlx_lm convert` writes it (mlx-lm 0.32 has no `qwen3_5_text`
    model, nor `gemma3n_text`); None for every other model type."""
    if config is not None and llama4_with_experts(config):
        return "llama4"
    if model_type in _NESTED_BY_NAME:
        return _NESTED_BY_NAME[model_type]
    layout = LAYOUTS.get(model_type or "")
    if layout is None or layout.model_type == model_type or not layout.save_renamed:
        return None
    if not any(rename in layout.renames for rename in _LANGUAGE_MODEL):
        return None
    return layout.model_type


def fill_dropped_tensors(model, layout: MlxLayout) -> list[str]:
    """Zero the tensors of `model` that the checkpoint (in mlx-lm's `layout`) lacks because
    mlx-lm's sanitize drops them (:attr:`MlxLayout.dropped_zeros`); returns their names."""
    import torch

    if not layout.dropped_zeros:
        return []
    pattern = re.compile("|".join(layout.dropped_zeros))
    filled = []
    for key, tensor in model.state_dict(keep_vars=True).items():
        if pattern.search(key) and not getattr(tensor, "_is_hf_initialized", False):
            with torch.no_grad():
                tensor.zero_()
            tensor._is_hf_initialized = True
            filled.append(key)
    return filled


def ignore_dropped_on_save(model, layout: MlxLayout) -> list[str]:
    """`save_pretrained` leaves out the tensors mlx-lm's sanitize drops and mlxq fills with
    zeros when loading (:attr:`MlxLayout.dropped_zeros`: ERNIE 4.5 MoE's router correction
    bias), as `mlx_lm convert` writes no such tensor. Returns their names."""
    if not layout.dropped_zeros:
        return []
    pattern = re.compile("|".join(layout.dropped_zeros))
    names = [k for k in model.state_dict() if pattern.search(k)]
    model._keys_to_ignore_on_save = {*(model._keys_to_ignore_on_save or ()), *names}
    return names


def _has_marker(key: str, marker: str | tuple[str, ...]) -> bool:
    if isinstance(marker, tuple):
        return any(_has_marker(key, m) for m in marker)
    return marker in key if marker.startswith(".") else key.startswith(marker)


# mlx-lm's `cast_predicate` (mlx_lm/models/<type>.py, 0.32): float tensors `mlx_lm convert`
# leaves in the checkpoint's dtype instead of casting them to the config's (names holding one
# of these; mlx-lm tests some as suffixes, which these are where they occur)
_BIAS = ("e_score_correction_bias",)
_LINEAR = ("e_score_correction_bias", "A_log", "dt_bias")  # Kimi Linear / K3
MLX_LM_CAST_KEEP: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("lfm2_moe", "bailing_moe", "bailing_moe_linear"), ("expert_bias",)),
    **dict.fromkeys(("afmoe", "bailing_hybrid", "Klear"), ("expert_bias",)),
    **dict.fromkeys(
        (
            "deepseek_v3",
            "kimi_k2",
            "joyai_llm_flash",
            "deepseek_v32",
            "exaone_moe",
            "glm4_moe",
            "glm4_moe_lite",
            "kimi_k25",
            "kimi_vl",
            "laguna",
            "longcat_flash",
            "longcat_flash_ngram",
            "mimo_v2_flash",
            "minimax",
            "minimax_m2",
            "minimax_m3_vl",
        ),
        _BIAS,
    ),
    "nemotron_h": (*_BIAS, "A_log"),
    "glm_moe_dsa": _BIAS,
    "solar_open": _BIAS,
    "deepseek_v41": ("attn_hc.", "ffn_hc.", "sinks", *_BIAS, "compressor."),
    "deepseek_v41_text": ("attn_hc.", "ffn_hc.", "sinks", *_BIAS, "compressor."),
    "kimi_linear": _LINEAR,
    "kimi_k3": _LINEAR,
    "qwen3_5": ("A_log",),
    "qwen3_5_moe": ("A_log",),
    "muse_spark": ("_alpha", "_beta"),
    "step3p5": ("router_bias",),
}


def use_mlx_lm_layout(model) -> None:
    """Save in mlx-lm's tensor names where they differ from transformers' (GPT-2, GPT-NeoX):
    float GPT-2 `Conv1D`s become `nn.Linear` (mlx-lm's `[out, in]`), and the renames are added
    to the ones transformers reverses when saving."""
    layout = LAYOUTS.get(getattr(model.config, "model_type", None) or "")
    if layout is not None:
        ignore_dropped_on_save(model, layout)
    if layout is None:  # mlx-lm's names; its convolution weights channels-last (Falcon-H1's,
        # RecurrentGemma's), as `mlx_lm convert` writes them
        convs = _channels_last_on_save(model)
        if convs:
            conversions = getattr(model, "_weight_conversions", None)
            if conversions is None:
                from transformers.conversion_mapping import get_model_conversion_mapping

                conversions = get_model_conversion_mapping(model, add_legacy=False)
            model._weight_conversions = [*conversions, *convs]
        return
    if not layout.save_renamed:
        return
    if layout.conv1d_as_linear:
        for name, module in list(model.named_modules()):
            if is_conv1d(module):
                model.set_submodule(name, swap_plan(name, module).float_linear(module))
    from transformers.core_model_loading import PrefixChange

    conversions = getattr(model, "_weight_conversions", None)
    built = conversions is None
    if built:  # built from a config: what transformers would revert when saving
        from transformers.conversion_mapping import get_model_conversion_mapping

        conversions = get_model_conversion_mapping(model, add_legacy=False)
    # a prefix change is dropped for a model built from a config (no prefix was read), and
    # where the layout places the text model under mlx-lm's `language_model.` itself: the Hub
    # prefix a float checkpoint was read with (Qwen 3.5's `model.language_model.`) would put it
    # there twice
    if built or any(rename in layout.renames for rename in _LANGUAGE_MODEL):
        conversions = [c for c in conversions if not isinstance(c, PrefixChange)]
    if layout.kept_model_renames:  # names mlx-lm keeps: not reversed when saving
        from transformers.core_model_loading import WeightRenaming

        conversions = [
            c
            for c in conversions
            if not (
                type(c) is WeightRenaming
                and set(c.source_patterns) <= set(layout.kept_model_renames)
            )
        ]
    # mlx-lm's separate channels-last q/k/v convolutions: split (and permuted) when saving,
    # in place of the model's own concatenation
    conv_split = _conv_split_on_save(model, layout)
    targets = {t for c in conv_split for t in c._original_target_patterns}
    conversions = [
        c
        for c in conversions
        if not (
            type(c).__name__ == "WeightConverter" and targets & set(c._original_target_patterns)
        )
    ]
    # first in the list, so reversed last: the model's own renamings have run by then
    offsets = layout.offset_conversions(name for name, _ in model.named_parameters())
    from transformers.core_model_loading import WeightRenaming

    dense = not _has_experts(model)
    renamings = [
        WeightRenaming(source_patterns=p, target_patterns=r)
        for p, r in layout.renames
        if dense or p not in layout.dense_only
    ]
    model._weight_conversions = [
        *conv_split,
        *renamings,
        *layout.stack_conversions(),  # DBRX's experts: cut into mlx-lm's one layer per expert
        *conversions,
        *(layout.merge_conversions() if dense else []),  # split again when saving
        *offsets,
        *_channels_last_on_save(model, skip=targets),
    ]


def mlx_lm_module_names(model, names: Iterable[str]) -> dict[str, str]:
    """mlx-lm's names of the model's modules `names` (for the per-module entries of
    config.json), as `save_pretrained` names their tensors: the model's own renamings
    reversed (Mixtral's `mlp.` -> `block_sparse_moe.`, Nemotron-H's `model.` -> `backbone.`),
    then the layout's (GraniteMoE's `router` -> `router.layer`); renames that are not literal
    are left out. A name no rename touches is its own."""
    from transformers.core_model_loading import WeightRenaming

    layout = LAYOUTS.get(getattr(model.config, "model_type", None) or "")
    ours = tuple(layout.renames) if layout is not None and layout.save_renamed else ()
    if ours and _has_experts(model):
        ours = tuple(r for r in ours if r[0] not in layout.dense_only)
    kept = layout.kept_model_renames if layout is not None else ()
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        from transformers.conversion_mapping import get_model_conversion_mapping

        conversions = get_model_conversion_mapping(model, add_legacy=False)
    own = [
        (source, target)
        for c in conversions
        if type(c) is WeightRenaming
        for source, target in zip(c.source_patterns, c.target_patterns, strict=False)
        # (renamings of one tensor, `router.layer.weight` -> `router.weight`, are dropped for
        # the modules mlxq replaces, whose layout renames the whole module)
        if (source, target) not in ours and source not in kept and "weight" not in source
    ]
    # saving reverses the list last to first: the model's renamings, then the layout's
    renames = [pair for rename in (*ours, *own) for pair in _alternatives(*rename)]
    # the prefix the checkpoint was read with, which saving puts back last (Gemma 3n's text
    # model read from the image-text checkpoint: `model.` -> `model.language_model.`)
    prefixes = [
        (f"{c.model_prefix}." if c.model_prefix else "", c.prefix_to_remove)
        for c in conversions
        if type(c).__name__ == "PrefixChange" and getattr(c, "prefix_to_remove", None)
    ]
    out = {}
    for name in names:
        key = f"{name}.weight"
        for pattern, repl in reversed(renames):
            source = re.sub(r"\\(.)", r"\1", pattern.removeprefix("^"))
            target = re.sub(r"\\(.)", r"\1", repl.removeprefix("^"))
            if re.search(r"[\\()|\[\]*+?$]", source + target):  # not literal
                continue
            if pattern.startswith("^"):
                key = source + key[len(target) :] if key.startswith(target) else key
            else:
                key = key.replace(target, source)
        for model_prefix, removed in prefixes:
            if key.startswith(model_prefix) and not key.startswith(f"{model_prefix}{removed}."):
                key = f"{model_prefix}{removed}.{key[len(model_prefix) :]}"
        out[name] = key.removesuffix(".weight")
    return out


def mlx_lm_entries(model, entries: dict) -> dict:
    """Per-module `entries` (the model's names) under mlx-lm's names, as config.json holds
    them: renamed (:func:`mlx_lm_module_names`), and an entry of a layer mlx-lm keeps as
    parts (dense Granite 4.0's `shared_mlp.input_linear`: `mlp.gate_proj`, `mlp.up_proj`)
    written for each part."""
    names = mlx_lm_module_names(model, entries)
    layout = LAYOUTS.get(getattr(model.config, "model_type", None) or "")
    merges = layout.merges if layout is not None and not _has_experts(model) else ()
    out = {}
    for key, value in entries.items():
        name = names.get(key, key)
        for parts, fused in merges:
            if name.endswith(fused):
                base = name[: -len(fused)]
                out.update({f"{base}{part}": value for part in parts})
                break
        else:
            out[name] = value
    return out


def _has_experts(model) -> bool:
    """Whether the model has MoE experts (transformers' or mlxq's stacks)."""
    return any(n.endswith(".experts") for n, _ in model.named_modules())


def _alternatives(pattern: str, repl: str) -> list[tuple[str, str]]:
    """A rename with one group of literal alternatives (`\\.(embed_q|unembed_out)\\.` ->
    `.kv_b_proj.\\1.`) as one literal rename per alternative."""
    m = re.fullmatch(r"(.*?)\(([\w|]+)\)(.*)", pattern)
    if m is None or "\\1" not in repl:
        return [(pattern, repl)]
    return [(m[1] + alt + m[3], repl.replace("\\1", alt)) for alt in m[2].split("|")]


def _conv_split_on_save(model, layout: MlxLayout) -> list:
    """The layout's conv_concat converters for a model quantized by mlxq (no checkpoint
    headers to size them): each source convolution as wide as its projection (`q_conv` ->
    `q_proj`), read off the first layer that has the concatenated convolution."""
    from transformers.core_model_loading import WeightConverter

    out = []
    modules = dict(model.named_modules())
    for sources, target in layout.conv_concat:
        conv = next((n for n in modules if f"{n}.weight".endswith(target)), None)
        if conv is None:
            continue
        parent = conv[: -len(target.removesuffix(".weight"))]
        sizes = []
        for src in sources:
            letter = re.search(r"(\w)_conv", src)
            proj = modules.get(f"{parent}{src.split('.')[0]}.{letter[1]}_proj") if letter else None
            sizes.append(getattr(proj, "out_features", None))
        if None in sizes or sum(sizes) != modules[conv].weight.shape[0]:
            continue
        out.append(
            WeightConverter(
                source_patterns=list(sources),
                target_patterns=target,
                operations=[SizedConcat(sizes), ChannelsLastToFirst(True)],
            )
        )
    return out


def _channels_last_on_save(model, skip: Iterable[str] = ()) -> list:
    """Converters that `save_pretrained` reverses into mlx-lm's channels-last convolution
    weights, as `mlx_lm convert` writes them: mlx-lm's Qwen 3.5 sanitize takes a
    channels-first conv1d weight for a Hub checkpoint and adds 1 to the norms again, and
    Qwen3-Next's does not permute a checkpoint with stacked experts at all."""
    from torch import nn

    return [
        channels_last_converter(f"{name}.weight")
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv1d)
        and not any(f"{name}.weight".endswith(t) for t in skip)  # (split and permuted there)
    ]


# Falcon-H1's muP multipliers as transformers' modules hold them (copied from the config when
# built), each set to 1 where `mlx_lm convert` folded it into the weights (its falcon_h1
# sanitize): embeddings, untied head, q/k (attention_in), o_proj, out_proj, gate/down, in_proj's
# rows (ssm_in times the muP vector). Two follow mlx-lm's model rather than transformers':
# attention_in scales v too in transformers (mlx-lm folds it into q and k only), and mlx-lm
# never applies key_multiplier (its sanitize's `k_proj` branch catches k first)
_FALCON_H1_FOLDED = (
    "embedding_multiplier",  # FalconH1Model
    "key_multiplier",  # FalconH1Attention
    "ssm_in_multiplier",  # FalconH1Mixer (mup_vector: its buffer)
    "gate_multiplier",  # FalconH1MLP
    "down_multiplier",
    "attention_in_multiplier",  # FalconH1DecoderLayer
    "attn_out_multiplier",
    "ssm_out_multiplier",
)


def run_folded_multipliers(model) -> None:
    """Run an MLX Falcon-H1 checkpoint as mlx-lm does: the multipliers `mlx_lm convert` folded
    into its weights are not applied again (the config keeps them: saving writes what mlx-lm
    reads, and mlx-lm does not fold a converted checkpoint again). A tied head's logits are
    scaled by lm_head_multiplier / embedding_multiplier, as mlx-lm's model scales them (the
    embedding it shares holds embedding_multiplier)."""
    config = model.config
    if getattr(config, "model_type", None) != "falcon_h1":
        return
    import torch

    found: set[str] = set()
    for module in model.modules():
        for attr in _FALCON_H1_FOLDED:
            if isinstance(getattr(module, attr, None), (int, float)):
                setattr(module, attr, 1.0)
                found.add(attr)
        mup = getattr(module, "mup_vector", None)
        if isinstance(mup, torch.Tensor):
            with torch.no_grad():
                mup.fill_(1.0)
            found.add("mup_vector")
        if isinstance(getattr(module, "lm_head_multiplier", None), (int, float)):
            tied = getattr(config, "tie_word_embeddings", False)
            ratio = config.lm_head_multiplier / config.embedding_multiplier
            module.lm_head_multiplier = ratio if tied else 1.0
            found.add("lm_head_multiplier")
    model._mlxq_folded_multipliers = True  # (a dequantized model's config says so)
    missing = {*_FALCON_H1_FOLDED, "mup_vector", "lm_head_multiplier"} - found
    if missing:  # another transformers than the one checked: never apply them twice silently
        raise NotImplementedError(
            f"mlxq: falcon_h1: transformers' model holds no {', '.join(sorted(missing))}; mlxq "
            "cannot undo the muP multipliers mlx_lm convert folded into this checkpoint"
        )
