"""Float modules back from mlxq's quantized ones (:func:`dequantize_model`, for fine-tuning;
also transformers' `model.dequantize()`)."""

from __future__ import annotations

import torch
from torch import nn

from mlxq.nn import (
    AffineEmbedding,
    AffineLinear,
    NormedAffineEmbedding,
    ScaledAffineEmbedding,
    TiedAffineHead,
)

__all__ = ["dequantize_model", "float_where_weight_dtype_is_read"]


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


class _NormedEmbedding(nn.Embedding):
    """Float form of a :class:`NormedAffineEmbedding`; its forward is the one :mod:`mlxq.swap`
    recognises, so it can be quantized again."""

    def __init__(self, num, dim, padding_idx, embed_norm: nn.Module):
        super().__init__(num, dim, padding_idx)
        self.embed_norm = embed_norm

    def forward(self, input_ids: torch.Tensor):
        return self.embed_norm(super().forward(input_ids))


def _float_linear(
    module: AffineLinear, dtype: torch.dtype | None = None, trainable: bool = True
) -> nn.Linear:
    w = module.dequantize_weight()
    new = nn.Linear(
        module.in_features, module.out_features, bias=module.bias is not None, device="meta"
    )
    new.weight = nn.Parameter(w.to(dtype or w.dtype), requires_grad=trainable)
    if module.bias is not None:
        bias = module.bias.detach().to(dtype or w.dtype)
        new.bias = nn.Parameter(bias, requires_grad=trainable)
    return new


def float_where_weight_dtype_is_read(model: nn.Module) -> list[str]:
    """Run as float `nn.Linear`s the quantized linear layers whose `.weight.dtype` the model's
    own forward reads (`x.to(self.lm_head.weight.dtype)` in Mamba's causal LM, DeepSeek V3.2's
    indexer): a quantized `weight` holds packed integers, so the cast would hand the layer
    integers. The float layer holds the dequantized weight in the dtype of the scales (the
    model's); returns the names replaced. Other reads are refused when loading
    (:func:`mlxq.model_walk.plan_modules`)."""
    from mlxq.swap import weight_reads

    done, modules = [], dict(model.named_modules())
    for name, reads in weight_reads(model).items():
        module = modules.get(name)
        if isinstance(module, AffineLinear) and all(r.dtype_only for r in reads):
            # frozen, as the quantized layer it stands for
            model.set_submodule(name, _float_linear(module, trainable=False))
            done.append(name)
    return done


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace mlxq modules by float `nn.Linear` / `nn.Embedding` (in place; for fine-tuning)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, AffineLinear):
            new = _float_linear(module, dtype)
        elif isinstance(module, AffineEmbedding):
            rows = torch.arange(module.num_embeddings, device=module.weight.device)
            w = AffineEmbedding.forward(module, rows)  # the table itself, not scaled
            shape = (module.num_embeddings, module.embedding_dim, module.padding_idx)
            if isinstance(module, NormedAffineEmbedding):
                new = _NormedEmbedding(*shape, module.embed_norm)
            elif isinstance(module, ScaledAffineEmbedding) and module.scale_dtype is not None:
                new = _ScaledEmbedding(*shape, module.embed_scale, module.scale_dtype)
            elif isinstance(module, ScaledAffineEmbedding):
                new = _FloatScaledEmbedding(*shape, module.embed_scale)
            else:
                new = nn.Embedding(*shape)
            new.weight = nn.Parameter(w.to(dtype or w.dtype))
        else:
            continue
        _keep_forward_hooks(module, new)
        model.set_submodule(name, new)
    from mlxq.moe import dequantize_moe

    dequantize_moe(model, dtype)  # MoE experts, routers, DeepSeek V3's split kv_b_proj
    for name, module in list(model.named_modules()):
        if isinstance(module, TiedAffineHead):  # tie the float head to the float embedding
            emb = model.get_input_embeddings()
            head = nn.Linear(module.in_features, module.out_features, bias=False)
            head.weight = emb.weight
            _keep_forward_hooks(module, head)
            model.set_submodule(name, head)
    _unfolded_multipliers_config(model)  # Falcon-H1's muP multipliers, folded by mlx-lm
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization"):
        del config.quantization
    return model


def _keep_forward_hooks(old: nn.Module, new: nn.Module) -> None:
    """The forward hooks of a replaced module stay on its float form: Aya Vision's
    logit_scale (a hook on its head, see mlxq.integrations.logit_scale), so that its logits do
    not change by a factor of 16 when the model is dequantized."""
    for key, hook in old._forward_hooks.items():
        new._forward_hooks[key] = hook
        if key in old._forward_hooks_with_kwargs:
            new._forward_hooks_with_kwargs[key] = True
        if key in old._forward_hooks_always_called:
            new._forward_hooks_always_called[key] = True


def _unfolded_multipliers_config(model) -> None:
    """A dequantized MLX Falcon-H1 model: its config says the multipliers its modules apply
    (1 where mlx-lm folded them, the tied head's ratio), so that its float checkpoint loads
    as it runs in transformers, and in mlx-lm (whose sanitize then folds nothing more)."""
    if not getattr(model, "_mlxq_folded_multipliers", False):
        return
    config = model.config
    tied = getattr(config, "tie_word_embeddings", False)
    head = config.lm_head_multiplier / config.embedding_multiplier if tied else 1.0
    for key in (
        "embedding_multiplier attention_in_multiplier attention_out_multiplier "
        "key_multiplier ssm_in_multiplier ssm_out_multiplier"
    ).split():
        setattr(config, key, 1.0)
    config.lm_head_multiplier = head
    config.mlp_multipliers = [1.0] * len(config.mlp_multipliers)
    config.ssm_multipliers = [1.0] * len(config.ssm_multipliers)
    model._mlxq_folded_multipliers = False
