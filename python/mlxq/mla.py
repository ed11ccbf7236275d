"""DeepSeek V3 multi-head latent attention as mlx-lm stores it.

mlx-lm splits transformers' `self_attn.kv_b_proj` (`[heads * (qk_nope + v_head), kv_lora]`)
per head into `embed_q` (the key part, transposed: `[heads, kv_lora, qk_nope]`) and
`unembed_out` (the value part: `[heads, v_head, kv_lora]`), each quantized along its own last
axis or left float (small models: `qk_nope` below the group size). :class:`SplitKvB` is
`kv_b_proj` on top of the two, with transformers' output layout (per head: the `qk_nope` key
values, then the `v_head` values), so the attention module runs unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from mlxq._casts import RefusesUnsupportedCasts
from mlxq._pickling import PicklesUnsignedBuffers
from mlxq.nn import refuse_nonfinite_weight
from mlxq.ops import affine_quantize, dequantize, quantize, quantized_matmul

__all__ = ["MultiLinear", "AffineMultiLinear", "SplitKvB"]


class MultiLinear(nn.Module):
    """Per-head float weights `[heads, out, in]`: `forward(x, transpose)` is `x @ W[h].T`
    (or `x @ W[h]`) for every head h, x broadcast over the heads."""

    def __init__(self, heads: int, in_features: int, out_features: int, dtype, device) -> None:
        super().__init__()
        w = torch.empty(heads, out_features, in_features, dtype=dtype, device=device)
        self.weight = nn.Parameter(w, requires_grad=False)

    def forward(self, x: torch.Tensor, transpose: bool = True) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        return torch.matmul(x, w.transpose(-1, -2) if transpose else w)


class AffineMultiLinear(RefusesUnsupportedCasts, PicklesUnsignedBuffers, nn.Module):
    """Per-head MLX-quantized weights (mlx-lm's `QuantizedMultiLinear`): packed `weight`
    `[heads, out, in*bits/32]`, `scales`/`biases` `[heads, out, in/group_size]` in mode
    "affine"; uint8 `scales` and no `biases` in the floating-point modes."""

    def __init__(
        self,
        heads: int,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        dtype,
        device,
        mode: str = "affine",
    ) -> None:
        super().__init__()
        self.bits, self.group_size, self.mode, self.dtype = bits, group_size, mode, dtype
        kw = dict(device=device)
        packed = in_features * bits // 32
        self.register_buffer(
            "weight", torch.empty(heads, out_features, packed, dtype=torch.uint32, **kw)
        )
        groups = in_features // group_size
        scale_dtype = dtype if mode == "affine" else torch.uint8
        self.register_buffer(
            "scales", torch.empty(heads, out_features, groups, dtype=scale_dtype, **kw)
        )
        self.register_buffer("biases", torch.empty_like(self.scales) if mode == "affine" else None)

    def forward(self, x: torch.Tensor, transpose: bool = True) -> torch.Tensor:
        return quantized_matmul(
            x,
            self.weight,
            self.scales,
            self.biases,
            transpose,
            self.group_size,
            self.bits,
            self.mode,
        )

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, bits: int, group_size: int, mode: str = "affine"
    ) -> AffineMultiLinear:
        """Quantize float per-head weights `[heads, out, in]` along `in`, as `mlx.nn.quantize`
        quantizes mlx-lm's `MultiLinear`."""
        heads, out_features, in_features = weight.shape
        module = cls(
            heads, in_features, out_features, bits, group_size, weight.dtype, weight.device, mode
        )
        w = weight.detach().contiguous()
        refuse_nonfinite_weight(w)
        if mode == "affine":
            module.weight, module.scales, module.biases = affine_quantize(w, group_size, bits)
        else:
            module.weight, module.scales = quantize(w, group_size, bits, mode)
        return module

    def dequantize_weight(self) -> torch.Tensor:
        """The float weights `[heads, out, in]`, in the dtype of `scales` (affine) or `dtype`."""
        dtype = None if self.mode == "affine" else self.dtype
        return dequantize(
            self.weight,
            self.scales,
            self.biases,
            self.group_size,
            self.bits,
            self.mode,
            dtype=dtype,
        )


class SplitKvB(nn.Module):
    """transformers' `kv_b_proj` from mlx-lm's `embed_q` and `unembed_out`."""

    def __init__(
        self,
        heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        v_head_dim: int,
        embed_q: nn.Module,
        unembed_out: nn.Module,
    ) -> None:
        super().__init__()
        self.heads, self.kv_lora_rank = heads, kv_lora_rank
        self.qk_nope_head_dim, self.v_head_dim = qk_nope_head_dim, v_head_dim
        self.in_features = kv_lora_rank
        self.out_features = heads * (qk_nope_head_dim + v_head_dim)
        self.embed_q, self.unembed_out = embed_q, unembed_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(1, -1, self.kv_lora_rank)  # one x matrix, broadcast over the heads
        k = self.embed_q(flat, transpose=False)  # [heads, T, qk_nope]
        v = self.unembed_out(flat)  # [heads, T, v_head]
        out = torch.cat([k, v], dim=-1).transpose(0, 1)  # [T, heads, qk_nope + v_head]
        return out.reshape(*lead, self.out_features)

    @classmethod
    def from_kv_b_proj(
        cls, weight: torch.Tensor, heads: int, qk_nope_head_dim: int, v_head_dim: int, formats
    ) -> SplitKvB:
        """mlx-lm's split of a float `kv_b_proj` weight `[heads * (nope + v), rank]` (its
        deepseek_v3 sanitize), each part quantized in `formats[part]` (a ModuleFormat) or
        kept float (None)."""
        rank = weight.shape[-1]
        w = weight.detach().reshape(heads, qk_nope_head_dim + v_head_dim, rank)
        halves = {
            "embed_q": w[:, :qk_nope_head_dim, :].transpose(-1, -2),  # [heads, rank, nope]
            "unembed_out": w[:, qk_nope_head_dim:, :],  # [heads, v, rank]
        }
        parts = {}
        for part, half in halves.items():
            fmt = formats.get(part)
            if fmt is None:
                h, out_f, in_f = half.shape
                float_part = MultiLinear(h, in_f, out_f, half.dtype, half.device)
                float_part.weight.data.copy_(half)
                parts[part] = float_part
            else:
                parts[part] = AffineMultiLinear.from_float(
                    half.contiguous(), fmt.bits, fmt.group_size, fmt.mode
                )
        return cls(heads, rank, qk_nope_head_dim, v_head_dim, **parts)

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, kv_lora_rank={self.kv_lora_rank}, "
            f"qk_nope_head_dim={self.qk_nope_head_dim}, v_head_dim={self.v_head_dim} "
            "(mlx-lm's embed_q / unembed_out)"
        )
