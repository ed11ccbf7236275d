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

import torch
from torch import nn

from mlxq.format import (
    SUPPORTED_BITS,
    ModuleFormat,
    check_quantization,
    entry_format,
    is_skipped,
)
from mlxq.nn import AffineEmbedding, AffineLinear, ScaledAffineEmbedding, TiedAffineHead
from mlxq.swap import is_conv1d, moe_plan, swap_plan

__all__ = ["quantize_model", "dequantize_model"]


def _format(
    name: str, top: ModuleFormat, overrides: dict[str, dict | bool], skip: list[str]
) -> ModuleFormat | None:
    if is_skipped(name, skip):
        return None
    if name not in overrides:
        return top
    return entry_format(name, overrides[name], top)


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
        model: a float model (any `nn.Module`; transformers models also get their config set).
        bits, group_size: the default format (affine: bits 1, 2, 3, 4, 5, 6, 8; group 32, 64,
            128; None: the mode's default, for affine 4 bits and group 64, as in MLX).
        overrides: module path -> ``{"bits": .., "group_size": ..}`` or ``False`` (keep float),
            recorded in the saved config like mlx-lm's mixed recipes.
        modules_to_not_convert: module paths (and their children) kept in float.
        mode: MLX's quantization mode: "affine", "mxfp4", "nvfp4" or "mxfp8" (mlx_lm convert
            --q-mode); per-module entries may name their own.

    Returns the same model.
    """
    overrides = dict(overrides or {})
    top = check_quantization({"group_size": group_size, "bits": bits, "mode": mode, **overrides})
    if top.mode == "affine" and top.bits not in SUPPORTED_BITS:
        raise ValueError(f"mlxq.quantize_model: bits={bits} is not one of {SUPPORTED_BITS}")
    skip = list(modules_to_not_convert or [])
    input_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = (
        input_emb is not None
        and output_emb is not None
        and getattr(output_emb, "weight", None) is not None
        and output_emb.weight is getattr(input_emb, "weight", None)
    )
    replaced: set[str] = set()
    head_name = None
    for name, module in list(model.named_modules()):
        if tied and module is output_emb:
            head_name = name
            continue
        moe = moe_plan(name, module) if name else None
        if moe is not None and moe.kind == "experts" and _format(name, top, overrides, skip):
            raise NotImplementedError(
                f"mlxq.quantize_model: module {name!r} ({moe.cls_name}) holds fused MoE experts, "
                "which mlxq quantizes only when it loads an mlx-lm checkpoint so far (convert "
                f"with mlx_lm.convert), or keep it float: modules_to_not_convert=[{name!r}]"
            )
        plan = swap_plan(name, module) if name else None
        if plan is None:
            continue
        fmt = _format(name, top, overrides, skip)
        if fmt is None:
            continue
        if plan.in_features % fmt.group_size or (plan.in_features * fmt.bits) % 32:
            continue  # mlx-lm leaves such layers in float too
        new = plan.require().quantize(
            module, bits=fmt.bits, group_size=fmt.group_size, mode=fmt.mode
        )
        model.set_submodule(name, new)
        replaced.add(name)
        if module is input_emb:
            input_emb = new
    if head_name is not None and isinstance(input_emb, AffineEmbedding):
        model.set_submodule(head_name, TiedAffineHead(input_emb))
        replaced.add(head_name)
    _mark_transformers_model(model, bits, group_size, top, overrides, skip, replaced)
    return model


def _mark_transformers_model(model, bits, group_size, top, overrides, skip, replaced) -> None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    from mlxq.integrations.config import MLXQuantConfig
    from mlxq.integrations.quantizer import (
        MLXHfQuantizer,
        _drop_tied_keys,
        add_mlx_lm_config_keys,
    )

    _drop_tied_keys(model, replaced)
    _use_mlx_lm_layout(model)
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
    model.hf_quantizer = MLXHfQuantizer(qconfig, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = qconfig.quant_method


def _use_mlx_lm_layout(model) -> None:
    """Save in mlx-lm's tensor names where they differ from transformers' (GPT-2, GPT-NeoX):
    float GPT-2 `Conv1D`s become `nn.Linear` (mlx-lm's `[out, in]`), and the renames are added
    to the ones transformers reverses when saving."""
    from mlxq.integrations.mlx_lm_layout import LAYOUTS

    layout = LAYOUTS.get(getattr(model.config, "model_type", None) or "")
    if layout is None:
        return
    if layout.conv1d_as_linear:
        for name, module in list(model.named_modules()):
            if is_conv1d(module):
                model.set_submodule(name, swap_plan(name, module).float_linear(module))
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:  # built from a config: what transformers would revert when saving
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange

        conversions = get_model_conversion_mapping(model, add_legacy=False)
        conversions = [c for c in conversions if not isinstance(c, PrefixChange)]
    # first in the list, so reversed last: the model's own renamings have run by then
    model._weight_conversions = [*layout.weight_renamings(), *conversions]


class _ScaledEmbedding(nn.Embedding):
    """Float form of a :class:`ScaledAffineEmbedding` with a tensor scale (Gemma's rounding);
    its forward is the one :mod:`mlxq.swap` recognises, so it can be quantized again."""

    def __init__(self, num, dim, padding_idx, embed_scale: float, scale_dtype: torch.dtype):
        super().__init__(num, dim, padding_idx)
        self.register_buffer(
            "embed_scale", torch.tensor(embed_scale, dtype=scale_dtype), persistent=False
        )

    def forward(self, input_ids: torch.Tensor):
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


class _FloatScaledEmbedding(nn.Embedding):
    """Float form of a :class:`ScaledAffineEmbedding` with a Python float scale (BART's)."""

    def __init__(self, num, dim, padding_idx, embed_scale: float):
        super().__init__(num, dim, padding_idx)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor):
        return super().forward(input_ids) * self.embed_scale


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace mlxq modules by float `nn.Linear` / `nn.Embedding` (in place; for fine-tuning)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, AffineLinear):
            w = module.dequantize_weight()
            new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            new.weight = nn.Parameter(w.to(dtype or w.dtype))
            if module.bias is not None:
                new.bias = nn.Parameter(module.bias.detach().to(dtype or w.dtype))
        elif isinstance(module, AffineEmbedding):
            rows = torch.arange(module.num_embeddings, device=module.weight.device)
            w = AffineEmbedding.forward(module, rows)  # the table itself, not scaled
            shape = (module.num_embeddings, module.embedding_dim, module.padding_idx)
            if isinstance(module, ScaledAffineEmbedding) and module.scale_dtype is not None:
                new = _ScaledEmbedding(*shape, module.embed_scale, module.scale_dtype)
            elif isinstance(module, ScaledAffineEmbedding):
                new = _FloatScaledEmbedding(*shape, module.embed_scale)
            else:
                new = nn.Embedding(*shape)
            new.weight = nn.Parameter(w.to(dtype or w.dtype))
        else:
            continue
        model.set_submodule(name, new)
    from mlxq.moe import dequantize_moe

    dequantize_moe(model, dtype)  # MoE experts, routers, DeepSeek V3's split kv_b_proj
    for name, module in list(model.named_modules()):
        if isinstance(module, TiedAffineHead):  # tie the float head to the float embedding
            emb = model.get_input_embeddings()
            head = nn.Linear(module.in_features, module.out_features, bias=False)
            head.weight = emb.weight
            model.set_submodule(name, head)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization"):
        del config.quantization
    return model
