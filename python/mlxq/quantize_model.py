"""Quantize a float torch / transformers model into mlxq modules, the way mlx-lm does.

Every `nn.Linear` and `nn.Embedding` whose input width is a multiple of the group size becomes
an :class:`~mlxq.nn.AffineLinear` / :class:`~mlxq.nn.AffineEmbedding` (bit-exact with
`mlx.nn.quantize`); others stay float, as in mlx-lm. A tied output head becomes a view of the
quantized embedding. A transformers model also gets an MLX quantization config, so that
`save_pretrained` writes an MLX checkpoint that mlx-lm loads.
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
from mlxq.nn import AffineEmbedding, AffineLinear, TiedAffineHead

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
    bits: int | None = 4,
    group_size: int | None = 64,
    overrides: dict[str, dict | bool] | None = None,
    modules_to_not_convert: list[str] | None = None,
) -> nn.Module:
    """Replace the model's linear and embedding layers by mlxq quantized modules, in place.

    Args:
        model: a float model (any `nn.Module`; transformers models also get their config set).
        bits, group_size: the default format (bits 2, 3, 4, 5, 6, 8; group 32, 64, 128;
            None: the affine default, 4 bits and group 64, as in MLX).
        overrides: module path -> ``{"bits": .., "group_size": ..}`` or ``False`` (keep float),
            recorded in the saved config like mlx-lm's mixed recipes.
        modules_to_not_convert: module paths (and their children) kept in float.

    Returns the same model.
    """
    overrides = dict(overrides or {})
    top = check_quantization({"group_size": group_size, "bits": bits, **overrides})
    if top.bits not in SUPPORTED_BITS:
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
        if not name or not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        fmt = _format(name, top, overrides, skip)
        if fmt is None:
            continue
        width = module.in_features if isinstance(module, nn.Linear) else module.embedding_dim
        if width % fmt.group_size or (width * fmt.bits) % 32:
            continue  # mlx-lm leaves such layers in float too
        cls = AffineLinear if isinstance(module, nn.Linear) else AffineEmbedding
        new = cls.from_float(module, bits=fmt.bits, group_size=fmt.group_size)
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
    # the top level is written resolved (64, not null), as mlx_lm convert writes it
    qconfig = MLXQuantConfig(
        bits=bits or top.bits,
        group_size=group_size or top.group_size,
        overrides=overrides,
        modules_to_not_convert=skip,
    )
    config.quantization_config = qconfig
    add_mlx_lm_config_keys(config)
    model.hf_quantizer = MLXHfQuantizer(qconfig, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = qconfig.quant_method


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
            w = module(rows)
            new = nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx)
            new.weight = nn.Parameter(w.to(dtype or w.dtype))
        else:
            continue
        model.set_submodule(name, new)
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
