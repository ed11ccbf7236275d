"""Float modules back from mlxq's quantized ones (:func:`dequantize_model`, for fine-tuning;
also transformers' `model.dequantize()`)."""

from __future__ import annotations

import re

import torch
from torch import nn

from mlxq.nn import AffineEmbedding, AffineLinear, ScaledAffineEmbedding, TiedAffineHead

__all__ = ["dequantize_model"]


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


def _float_linear(module: AffineLinear) -> nn.Linear:
    w = module.dequantize_weight()
    new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    new.weight = nn.Parameter(w, requires_grad=False)
    if module.bias is not None:
        new.bias = nn.Parameter(module.bias.detach().to(w.dtype), requires_grad=False)
    return new.to(w.device)


# Only the sparse-attention indexers' `weights_proj` (hidden -> index heads, small): other
# layers whose dtype a parent reads (Mamba's lm_head, T5's wo) would cost their float size
_WEIGHT_DTYPE_READ = re.compile(r"self\.(weights_proj)\.weight\.dtype")


def float_where_weight_dtype_is_read(model: nn.Module) -> list[str]:
    """Dequantize the quantized `weights_proj` layers whose parent's forward reads
    `self.weights_proj.weight.dtype` (DeepSeek V3.2's and GLM-5's indexers cast their input to
    it): mlxq's `weight` is the packed integers, so the cast would feed the layer integers.
    The float layer holds the dequantized weight (the same function); returns their names."""
    from mlxq.swap import forward_body

    done, reads = [], {}
    for name, module in list(model.named_modules()):
        cls = type(module)
        if cls not in reads:
            reads[cls] = dict.fromkeys(_WEIGHT_DTYPE_READ.findall(forward_body(cls) or ""))
        for child in reads[cls]:
            sub = getattr(module, child, None)
            if isinstance(sub, AffineLinear) and type(sub) is AffineLinear:
                setattr(module, child, _float_linear(sub))
                done.append(f"{name}.{child}" if name else child)
    return done


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
