"""Quantize a float torch / transformers model into mlxq modules, the way mlx-lm does.

Every `nn.Linear` and `nn.Embedding` (and the modules :mod:`mlxq.swap` knows: scaled word
embeddings, GPT-2's `Conv1D`) whose input width is a multiple of the group size becomes an
:class:`~mlxq.nn.AffineLinear` / :class:`~mlxq.nn.AffineEmbedding` (bit-exact with
`mlx.nn.quantize`); others stay float, as in mlx-lm. A subclass whose forward mlxq does not
reproduce is refused with an error naming it (keep it float with `modules_to_not_convert`).
A tied output head becomes a view of the quantized embedding. A transformers model also gets
an MLX quantization config, so that `save_pretrained` writes an MLX checkpoint that mlx-lm
loads.
"""

from __future__ import annotations

from torch import nn

from mlxq.dequantize_model import dequantize_model, float_where_weight_dtype_is_read
from mlxq.format import check_quantization
from mlxq.model_walk import (
    ModelPlan,
    PlannedModule,
    mlx_lm_float_modules,
    mlx_lm_model_entries,
    plan_quantization,
    tie_head,
)
from mlxq.projection_groups import group_projections

__all__ = ["quantize_model", "dequantize_model"]


def quantize_model(
    model: nn.Module,
    bits: int | None = None,
    group_size: int | None = None,
    overrides: dict[str, dict | bool] | None = None,
    modules_to_not_convert: list[str] | None = None,
    mode: str = "affine",
) -> nn.Module:
    """Replace the model's linear and embedding layers by mlxq quantized modules, in place.

    Args:
        model: a float model (any `nn.Module`; transformers models also get their config set
            and the forwards a loaded MLX checkpoint runs with,
            :func:`mlxq.integrations.forwards.use_mlxq_forwards`).
        bits, group_size: the default format (affine: bits 1, 2, 3, 4, 5, 6, 8; group 32, 64,
            128; None: the mode's default, for affine 4 bits and group 64, as in MLX).
        overrides: module path -> ``{"bits": .., "group_size": ..}`` or ``False`` (keep float),
            recorded in the saved config like mlx-lm's mixed recipes. None: the entries
            mlx-lm's own model class adds (Qwen3-MoE's, Kimi Linear's, Granite 4.0-H's and
            Gemma 4's routers at 8 bits; mlx-vlm's for an image-text model), as `mlx_lm convert`
            without a recipe. Fused MoE experts take entries under `<experts>.gate_proj` ....
            An image-text model's entries may name modules as transformers does or as
            mlx-vlm's config.json does; its vision tower, projector and audio tower stay
            float unless an entry names them (mlx-vlm's `skip_multimodal_module`).
        modules_to_not_convert: module paths (and their children) kept in float.
        mode: MLX's quantization mode: "affine", "mxfp4", "nvfp4" or "mxfp8" (mlx_lm convert
            --q-mode); per-module entries may name their own.

    Returns the same model.
    """
    source = "quantize_model arguments"  # named by errors (not a config.json)
    top = check_quantization({"group_size": group_size, "bits": bits, "mode": mode}, source=source)
    _refuse_quantized(model)
    _untie_head_as_mlx_vlm(model)
    skip = list(modules_to_not_convert or [])
    if overrides is None:  # no recipe: the entries mlx-lm's own model class would add
        overrides = mlx_lm_model_entries(model, top, lambda names: _saved_names(model, names))
        # where its rule says False, mlx-lm leaves the module float and writes no entry
        skip += [name for name, entry in overrides.items() if entry is False]
        overrides = {name: entry for name, entry in overrides.items() if entry is not False}
    overrides = _with_model_names(model, dict(overrides))
    skip += [name for name in mlx_lm_float_modules(model) if name not in overrides]
    skip += _multimodal_modules(model, overrides, skip)
    top = check_quantization(
        {"group_size": group_size, "bits": bits, "mode": mode, **overrides}, source=source
    )
    split = _split_latent_kv_b(model, top, overrides, skip)
    walk = plan_quantization(model, top, overrides, skip)
    replaced = quantize_planned(model, walk) | split
    for name in float_where_weight_dtype_is_read(model):  # its dtype is read by the forward
        overrides[name] = False  # saved float, and said so for mlx-lm
        replaced.discard(name)
    if not _mark_transformers_model(model, bits, group_size, top, overrides, skip, replaced):
        group_projections(model)  # a plain torch model: the one forward that needs no config
    model._mlxq_quantized = True  # a second call is refused (_refuse_quantized)
    return model


def _refuse_quantized(model: nn.Module) -> None:
    """Refuse a model that was quantized already (a loaded MLX checkpoint, or a second call) and
    holds packed layers: the walk skips them, so they kept their format while the config was
    rewritten to the new one, and `save_pretrained` wrote a block that its tensors contradict.
    A call that raised half-way marks nothing (its packed layers stay, and a second call with
    the refused module fixed completes it). Packed layers are found by class: every quantized
    layer class carries RefusesUnsupportedCasts (linear, embedding, experts' stacks, routers,
    per-head latent layers; a tied head is a view of its embedding), the same modules as those
    holding a packed `weight` beside `scales` (tests/test_model_walk.py checks both agree)."""
    from mlxq._casts import RefusesUnsupportedCasts
    from mlxq.integrations.quantizer import MLXHfQuantizer

    loaded = isinstance(getattr(model, "hf_quantizer", None), MLXHfQuantizer)
    if not (loaded or getattr(model, "_mlxq_quantized", False)):
        return
    for name, module in model.named_modules():
        if isinstance(module, RefusesUnsupportedCasts):
            fmt = ", ".join(
                f"{key}={getattr(module, key)}"
                for key in ("bits", "group_size", "mode")
                if hasattr(module, key)
            )
            raise ValueError(
                f"mlxq: quantize_model takes a float model, but {name or 'the model'!r} is "
                f"quantized already ({type(module).__name__}{': ' + fmt if fmt else ''}); "
                "dequantize it first (model.dequantize()) to quantize it in another format"
            )


def latent_kv_b_parts(model: nn.Module) -> dict[str, tuple[int, int, int, int]]:
    """The `self_attn.kv_b_proj` layers of a model that mlx-lm stores split per head into
    `embed_q` / `unembed_out` (DeepSeek V3's family, Mistral 4, Kimi Linear, Kimi K2.5's
    language model: their layouts rename those): name -> (heads, qk_nope_head_dim,
    v_head_dim, kv_lora_rank)."""
    from mlxq.integrations.mlx_lm_layout import LAYOUTS
    from mlxq.integrations.mlx_vlm_layout import VLM_LAYOUTS, is_image_text

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or ""
    layout = (VLM_LAYOUTS if is_image_text(config) else LAYOUTS).get(model_type)  # Kimi K2.5
    if layout is None or not any("embed_q" in pattern for pattern, _ in layout.renames):
        return {}
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    dims = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank)
    heads, nope, v, rank = dims
    return {
        name: dims
        for name, module in model.named_modules()
        if name.endswith("self_attn.kv_b_proj")
        and isinstance(module, nn.Linear)
        and (module.in_features, module.out_features) == (rank, heads * (nope + v))
    }


def _split_latent_kv_b(model: nn.Module, top, overrides: dict, skip: list[str]) -> set[str]:
    """Replace each latent-attention `kv_b_proj` by mlx-lm's split of it
    (:meth:`mlxq.mla.SplitKvB.from_kv_b_proj`), `embed_q` (`[heads, rank, nope]`, quantized
    along nope) and `unembed_out` (`[heads, v, rank]`, along rank) each in its own format
    (entries `<kv_b_proj>.embed_q` / `.unembed_out`, or one for `kv_b_proj`), float where its
    width does not fit: the tensors `mlx_lm convert` writes. Returns the quantized parts."""
    from mlxq.format import configured_format, fits, is_skipped
    from mlxq.mla import SplitKvB

    quantized: set[str] = set()
    for name, (heads, nope, v, rank) in latent_kv_b_parts(model).items():
        if is_skipped(name, skip):
            continue
        formats = {}
        for part, width in (("embed_q", nope), ("unembed_out", rank)):
            key = f"{name}.{part}"
            entries = (
                overrides if key in overrides or name not in overrides else {key: overrides[name]}
            )
            fmt = configured_format(key, top, entries, skip)
            formats[part] = fmt if fmt is not None and fits(width, fmt) else None
        weight = model.get_submodule(name).weight
        model.set_submodule(name, SplitKvB.from_kv_b_proj(weight, heads, nope, v, formats))
        quantized |= {f"{name}.{part}" for part, fmt in formats.items() if fmt is not None}
    return quantized


def _saved_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    from mlxq.integrations.mlx_vlm_layout import saved_module_names

    return saved_module_names(model, names)


def _untie_head_as_mlx_vlm(model: nn.Module) -> None:
    """Gemma 3's tied head given its own copy of the embedding, as mlx-vlm writes it."""
    from mlxq.integrations.mlx_vlm_layout import untie_head_as_mlx_vlm

    untie_head_as_mlx_vlm(model)


def _with_model_names(model: nn.Module, overrides: dict[str, dict | bool]) -> dict:
    """Per-module entries of an image-text model under the model's module names: an entry
    may name its module as transformers does (`model.language_model.layers.0.mlp.down_proj`)
    or as mlx-vlm's config.json does (`language_model.model.layers.0.mlp.down_proj`)."""
    from mlxq.integrations.mlx_vlm_layout import entries_as_model_names

    return entries_as_model_names(model, overrides)


def _multimodal_modules(model: nn.Module, overrides: dict, skip: list[str]) -> list[str]:
    """The modules of an image-text model that `mlx_vlm convert` leaves float (its
    `skip_multimodal_module`: vision towers, projectors, audio), but those given an entry."""
    from mlxq.integrations.mlx_vlm_layout import multimodal_modules

    return [name for name in multimodal_modules(model) if name not in overrides]


def quantize_planned(model: nn.Module, walk: ModelPlan) -> set[str]:
    """Replace every module `walk` gives a format by its quantized form (bit-exact with
    `mlx.nn.quantize`), and a tied head by a view of the quantized embedding; returns the
    names of the modules replaced."""
    replaced: set[str] = set()
    for entry in walk.modules:
        fmt = entry.format
        if entry.moe is not None:
            replaced |= _quantize_moe(model, entry)
            continue
        if entry.swap is None or fmt is None:
            continue
        try:
            new = entry.swap.require().quantize(
                entry.module, bits=fmt.bits, group_size=fmt.group_size, mode=fmt.mode
            )
        except ValueError as error:  # a NaN in the float weight: name the layer
            raise ValueError(
                f"mlxq: layer {entry.name!r}: {str(error).removeprefix('mlxq: ')}"
            ) from None
        model.set_submodule(entry.name, new)
        replaced.add(entry.name)
    if tie_head(model, walk.head):
        replaced.add(walk.head.head)
    return replaced


def _quantize_moe(model: nn.Module, entry: PlannedModule) -> set[str]:
    """A router with a format becomes a quantized router (its own forward, packed weight);
    fused experts with any projection to quantize become :class:`~mlxq.moe.MoeExperts` over
    mlx-lm's three stacks (:func:`~mlxq.moe.fused_expert_stacks`: gpt-oss's biases too)."""
    from mlxq.moe import (
        AffineSwitchLinear,
        SwitchLinear,
        experts_class,
        experts_gate,
        fused_expert_stacks,
        quantized_router,
    )

    module = entry.module
    if entry.moe.kind == "router":
        fmt = entry.format
        if fmt is None:
            return set()
        w = module.weight
        new = quantized_router(
            entry.name, module, fmt.bits, fmt.group_size, w.dtype, w.device, w, fmt.mode
        )
        model.set_submodule(entry.name, new)
        return {entry.name}
    if not any(entry.parts.values()):
        return set()
    stacks = fused_expert_stacks(module, entry.moe.variant)
    projections: dict[str, nn.Module | None] = {"gate_proj": None}  # (Nemotron-H: no gate)
    for proj, (w, bias) in stacks.items():
        fmt = entry.parts[proj]
        if fmt is None:
            e, n, k = w.shape
            float_stack = SwitchLinear(e, k, n, w.dtype, w.device, bias=bias is not None)
            float_stack.weight.data.copy_(w)
            if bias is not None:
                float_stack.bias.data.copy_(bias)
            projections[proj] = float_stack
        else:
            try:
                projections[proj] = AffineSwitchLinear.from_float(
                    w, fmt.bits, fmt.group_size, fmt.mode, bias=bias
                )
            except ValueError as error:
                raise ValueError(
                    f"mlxq: experts '{entry.name}.{proj}': {str(error).removeprefix('mlxq: ')}"
                ) from None
    gate = experts_gate(module, entry.moe.variant)
    model.set_submodule(entry.name, experts_class(entry.moe.variant)(**projections, **gate))
    return {f"{entry.name}.{p}" for p, f in entry.parts.items() if f is not None}


def _mark_transformers_model(model, bits, group_size, top, overrides, skip, replaced) -> bool:
    """A transformers model: its MLX quantization config, saved as mlx-lm (mlx-vlm) writes it,
    and the forwards a loaded MLX checkpoint runs with; returns whether `model` is one."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return False
    from mlxq.integrations.config import MLXQuantConfig
    from mlxq.integrations.forwards import use_mlxq_forwards
    from mlxq.integrations.mlx_lm_layout import mlx_lm_entries, use_mlx_lm_layout
    from mlxq.integrations.mlx_vlm_layout import mlx_vlm_module_names, use_mlx_vlm_layout
    from mlxq.integrations.moe_loading import drop_fused_expert_converters
    from mlxq.integrations.quantizer import (
        MLXHfQuantizer,
        add_mlx_lm_config_keys,
        drop_tied_keys,
        float_checkpoint_files,
        placed_by_buffers,
        read_float_checkpoint,
        save_float_dtypes_as_convert,
    )
    from mlxq.moe import MoeExperts

    drop_tied_keys(model, replaced)
    vlm = use_mlx_vlm_layout(model)
    if vlm:  # image-text models: saved as mlx-vlm writes them
        names = mlx_vlm_module_names(model, overrides)  # the entries too (mlx-vlm reads them)
        overrides = {names.get(k, k): v for k, v in overrides.items()}
    else:
        use_mlx_lm_layout(model)
        overrides = mlx_lm_entries(model, overrides)  # (GraniteMoE's router.layer)
    experts = {name for name, m in model.named_modules() if isinstance(m, MoeExperts)}
    routers = {name for name, m in model.named_modules() if hasattr(m, "_mlxq_name")}
    drop_fused_expert_converters(model, experts, routers)
    # the top level is written resolved (64, not null), as mlx_lm convert writes it
    qconfig = MLXQuantConfig(
        bits=bits or top.bits,
        group_size=group_size or top.group_size,
        mode=top.mode,
        overrides=overrides,
        modules_to_not_convert=skip,
    )
    config.quantization_config = qconfig
    add_mlx_lm_config_keys(config)
    # float32 tensors saved in the dtypes mlx_lm convert writes for the checkpoint the model was
    # read from (found by its name_or_path), or in the model's dtype for one built in memory
    source = read_float_checkpoint(model, float_checkpoint_files(model))
    save_float_dtypes_as_convert(model, source)
    if next(model.parameters(), None) is None:  # nanochat: every tensor quantized
        model.__class__ = placed_by_buffers(type(model))  # (its device, dtype, save_pretrained)
    use_mlxq_forwards(model)  # as a loaded MLX checkpoint runs (the loader's very call)
    model.hf_quantizer = MLXHfQuantizer(qconfig, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = qconfig.quant_method
    return True
