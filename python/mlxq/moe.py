"""Mixture-of-experts modules holding MLX-quantized experts and routers.

mlx-lm stores the experts of a layer as one stacked tensor per projection
(`switch_mlp.{gate,up,down}_proj.weight` `[E, out, in*bits/32]`, scales and biases
`[E, out, in/group_size]`; the floating-point modes have uint8 scales and no biases; gpt-oss
adds a float `bias` `[E, out]`). A stack is a :class:`SwitchProjection`: the gather matmul of
its storage format (:class:`AffineSwitchLinear`: packed, any MLX mode, through
:func:`mlxq.affine_gather_matmul` / :func:`mlxq.fp_gather_matmul`; :class:`SwitchLinear`:
float), which multiplies only the experts each token selected, then the selected experts' bias.
:class:`MoeExperts` is the experts module of a transformers MoE block on top of three of them,
with transformers' gate (`act_fn(gate) * up`, or gpt-oss's :class:`ClampedSwiGLU`).

Routers (transformers' `*TopKRouter`) are quantized by mlx-lm as the linear layers they are in
MLX, but in transformers each has its own forward (softmax/top-k/normalisation). mlxq keeps that
forward as it is and only changes what `self.weight` is: an :class:`AffineWeight`, on which
`F.linear(x, self.weight[, bias])` runs the quantized matmul (through `__torch_function__`) and
any other use raises an error naming the module (see :func:`quantized_router`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mlxq._casts import RefusesUnsupportedCasts
from mlxq._pickling import PicklesUnsignedBuffers, made_class
from mlxq._sizes import known_le
from mlxq.format import MODE_DEFAULTS
from mlxq.nn import refuse_nonfinite_weight
from mlxq.ops import (
    affine_dequantize,
    affine_quantize,
    dequantize,
    gather_quantized_matmul,
    quantize,
    quantized_matmul,
)

__all__ = [
    "SwitchProjection",
    "AffineSwitchLinear",
    "SwitchLinear",
    "ClampedSwiGLU",
    "MoeExperts",
    "fused_expert_stacks",
    "experts_gate",
    "AffineWeight",
    "quantized_router",
]


class SwitchProjection(nn.Module):
    """`num_experts` linear layers stacked, applied to the experts each token selected.

    `forward(x, indices)` follows `mx.gather_qmm` / `mx.gather_mm`: `x` `[..., M, in]` and
    `indices` broadcast (absent x indices are an arange over x's batch), output
    `[*I, M, out]`; then, when the stack has one, the selected experts' `bias` `[E, out]` is
    added (mlx-lm's `SwitchLinear` with `bias=True`: `y + bias[indices][..., None, :]`).
    A subclass is one storage format: it implements :meth:`gather_matmul` only, so that
    :class:`MoeExperts` and the bias do not depend on the format.
    """

    bias: nn.Parameter | None

    def _init_bias(self, bias: bool, dtype: torch.dtype, device) -> None:
        b = torch.empty(self.num_experts, self.out_features, dtype=dtype, device=device)
        self.bias = nn.Parameter(b, requires_grad=False) if bias else None

    def gather_matmul(
        self, x: torch.Tensor, indices: torch.Tensor, sorted_indices: bool = False
    ) -> torch.Tensor:
        """`x` times the transposed weights of the experts `indices` (no bias)."""
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, sorted_indices: bool = False
    ) -> torch.Tensor:
        y = self.gather_matmul(x, indices, sorted_indices)
        if self.bias is None:
            return y
        # added after the matmul, in the output's dtype, as both transformers (gpt-oss:
        # `x @ W[e] + b[e]`) and mlx-lm do
        return y + self.bias[indices].unsqueeze(-2).to(y.dtype)


class AffineSwitchLinear(RefusesUnsupportedCasts, PicklesUnsignedBuffers, SwitchProjection):
    """`num_experts` quantized linear layers stacked (mlx-lm's `QuantizedSwitchLinear`), in any
    MLX mode: "affine" (float `scales` and `biases`) or "mxfp4", "nvfp4", "mxfp8" (uint8
    `scales`, no `biases`; nvfp4 optionally with mlx-lm's per-expert float32 `global_scale`
    [E]), as :class:`mlxq.nn.AffineLinear` holds every mode under its affine name; the mode
    picks the gather matmul (see :class:`SwitchProjection`; gpt-oss's float `bias` in any mode).
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int = 64,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        mode: str = "affine",
        global_scale: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODE_DEFAULTS:
            raise ValueError(
                f"mlxq: {type(self).__name__}: mode={mode!r} is not one of "
                f"{', '.join(MODE_DEFAULTS)}"
            )
        if mode != "affine" and (group_size, bits) != MODE_DEFAULTS[mode]:
            raise ValueError(
                f"mlxq: {type(self).__name__}: mode {mode!r} needs (group_size, bits) = "
                f"{MODE_DEFAULTS[mode]}, got ({group_size}, {bits})"
            )
        if global_scale and mode != "nvfp4":
            raise ValueError(f"mlxq: global_scale is only used by mode 'nvfp4', got {mode!r}")
        self.num_experts, self.in_features, self.out_features = (
            num_experts,
            in_features,
            out_features,
        )
        self.bits, self.group_size, self.mode, self.dtype = bits, group_size, mode, dtype
        packed = in_features * bits // 32
        groups = in_features // group_size
        kw = dict(device=device)
        self.register_buffer(
            "weight", torch.empty(num_experts, out_features, packed, dtype=torch.uint32, **kw)
        )
        scale_dtype = dtype if mode == "affine" else torch.uint8
        self.register_buffer(
            "scales", torch.empty(num_experts, out_features, groups, dtype=scale_dtype, **kw)
        )
        self.register_buffer("biases", torch.empty_like(self.scales) if mode == "affine" else None)
        gs = torch.empty(num_experts, dtype=torch.float32, **kw) if global_scale else None
        self.register_buffer("global_scale", gs)
        self._init_bias(bias, dtype, device)

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bits: int,
        group_size: int,
        mode: str = "affine",
        *,
        bias: torch.Tensor | None = None,
    ) -> AffineSwitchLinear:
        """Quantize a stacked float weight `[E, out, in]` as `mlx.nn.quantize` would (`bias`
        `[E, out]`, if given, is kept in float as mlx-lm keeps it)."""
        e, out_features, in_features = weight.shape
        module = cls(
            e, in_features, out_features, bits, group_size, weight.dtype, weight.device, mode
        )
        module._init_bias(bias is not None, weight.dtype, weight.device)
        w = weight.detach().contiguous()
        refuse_nonfinite_weight(w)
        if mode == "affine":
            module.weight, module.scales, module.biases = affine_quantize(w, group_size, bits)
        else:
            module.weight, module.scales = quantize(w, group_size, bits, mode)
        if bias is not None:
            module.bias.data.copy_(bias.detach())
        return module

    def gather_matmul(
        self, x: torch.Tensor, indices: torch.Tensor, sorted_indices: bool = False
    ) -> torch.Tensor:
        return gather_quantized_matmul(
            x,
            self.weight,
            self.scales,
            self.biases,
            None,
            indices,
            True,
            self.group_size,
            self.bits,
            self.mode,
            self.global_scale,
            sorted_indices=sorted_indices,
        )

    def dequantize_weight(self) -> torch.Tensor:
        """The float weights `[E, out, in]`, in the dtype of `scales` (affine) or `dtype`; with
        nvfp4's global scales float32 (as `mx.dequantize` returns them)."""
        if self.mode == "affine":
            return affine_dequantize(
                self.weight, self.scales, self.biases, self.group_size, self.bits
            )
        if self.global_scale is None:
            return dequantize(
                self.weight,
                self.scales,
                None,
                self.group_size,
                self.bits,
                self.mode,
                dtype=self.dtype,
            )
        experts = [
            dequantize(
                self.weight[e],
                self.scales[e],
                None,
                self.group_size,
                self.bits,
                self.mode,
                global_scale=self.global_scale[e],
                dtype=self.dtype,
            )
            for e in range(self.num_experts)
        ]
        return torch.stack(experts)

    def extra_repr(self) -> str:
        mode = "" if self.mode == "affine" else f", mode={self.mode}"
        if self.global_scale is not None:
            mode += ", global_scale"
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"
            + mode
            + f", bias={self.bias is not None}"
        )


class SwitchLinear(SwitchProjection):
    """Float stacked experts `[E, out, in]` (a stack mlx-lm left unquantized), with the same
    `forward(x, indices)` as :class:`AffineSwitchLinear`."""

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts, self.in_features, self.out_features = (
            num_experts,
            in_features,
            out_features,
        )
        w = torch.empty(num_experts, out_features, in_features, dtype=dtype, device=device)
        self.weight = nn.Parameter(w, requires_grad=False)
        self._init_bias(bias, dtype, device)

    def gather_matmul(
        self, x: torch.Tensor, indices: torch.Tensor, sorted_indices: bool = False
    ) -> torch.Tensor:
        w = self.weight[indices]  # [*I, out, in]
        return torch.matmul(x, w.transpose(-1, -2).to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}"
        )


class ClampedSwiGLU(nn.Module):
    """gpt-oss's gate (transformers' `GptOssExperts._apply_gate` on the de-interleaved gate
    and up halves, mlx-lm's `SwigluOAI`): the gate clamped from above at `limit`, the up part
    to `[-limit, limit]`, then `(up + 1) * gate * sigmoid(gate * alpha)`, in that order."""

    def __init__(self, alpha: float, limit: float) -> None:
        super().__init__()
        self.alpha, self.limit = alpha, limit

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        return (up + 1) * glu

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, limit={self.limit}"


class LimitedSwiGLU(nn.Module):
    """GLM-5-Next's gate (transformers' `Glm5NextTextExperts._apply_gate`, mlx-vlm's
    `_limited_swiglu`): the gate clamped from above at `limit`, the up part to
    `[-limit, limit]`, then `silu(gate) * up`."""

    def __init__(self, limit: float) -> None:
        super().__init__()
        self.limit = limit

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return F.silu(gate) * up

    def extra_repr(self) -> str:
        return f"limit={self.limit}"


# mlx-lm's SwitchGLU sorts the (token, expert) pairs by expert from this many pairs on
# (`indices.size >= 64`): decode-sized calls (a few tokens x top-k) do not pay the sort.
SORT_MIN_PAIRS = 64


class MoeExperts(nn.Module):
    """The experts of a transformers MoE block (`*Experts`, fused `gate_up_proj`/`down_proj`)
    as three stacked projections in mlx-lm's layout (`gate_proj`, `up_proj`, `down_proj`).

    `forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])` is transformers'
    eager experts loop: `down(act(gate(x)) * up(x))` per selected expert (or `down(glu(gate(x),
    up(x)))` when a `glu` is given, e.g. gpt-oss's :class:`ClampedSwiGLU`; the projections add
    their own biases), weighted and summed over the k experts of each token; only the selected
    experts' weights are read. The projections may be of any :class:`SwitchProjection` format.
    """

    def __init__(
        self,
        gate_proj: SwitchProjection | None,
        up_proj: SwitchProjection,
        down_proj: SwitchProjection,
        act_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        glu: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if (act_fn is None) == (glu is None) or (gate_proj is None and glu is not None):
            raise ValueError("mlxq: MoeExperts takes either act_fn or glu (glu needs a gate)")
        # without a gate (Nemotron-H): `down(act_fn(up(x)))`
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act_fn = act_fn
        self.glu = glu
        self.num_experts = up_proj.num_experts

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        hidden = hidden_states.shape[-1]
        x = hidden_states.reshape(-1, 1, 1, hidden)  # [T, 1, 1, H]: one x matrix per token
        idx = top_k_index.reshape(x.shape[0], -1)  # [T, k]
        # a pair count that tracing cannot settle without a guard (torch.export with a dynamic
        # length) takes the sorted path: it computes every pair's row as the unsorted one does
        if known_le(SORT_MIN_PAIRS, idx.numel()) is not False:
            y = self._sorted_experts(x, idx)
        else:
            y = self._experts(x, idx, False).squeeze(-2)  # [T, k, H]
        y = y * top_k_weights.reshape(idx.shape).unsqueeze(-1)
        return y.sum(dim=1).to(hidden_states.dtype).reshape(hidden_states.shape)

    def _experts(self, x: torch.Tensor, idx: torch.Tensor, sorted_indices: bool) -> torch.Tensor:
        """`down(glu(gate(x), up(x)))` of the pairs (x's matrices, experts `idx`):
        `[*idx.shape, 1, H]`; x's lhs indices are the arange over its batch."""
        up = self.up_proj(x, idx, sorted_indices)
        if self.gate_proj is None:
            return self.down_proj(self.act_fn(up), idx, sorted_indices)
        gate = self.gate_proj(x, idx, sorted_indices)
        h = self.glu(gate, up) if self.glu is not None else self.act_fn(gate) * up
        return self.down_proj(h, idx, sorted_indices)

    def _sorted_experts(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """:meth:`_experts` of the pairs in expert order, as mlx-lm's SwitchGLU runs prefill:
        the pairs of one expert are consecutive, so the gather kernels take their sorted
        path (the Metal sorted gather qmm reads each expert's tiles once per block of rows),
        then the rows go back to token order: `[T, k, H]`. Each pair's row is computed as
        unsorted (a stable sort keeps the pairs of an expert in token order, the order the
        CPU kernels group them in anyway)."""
        t, k = idx.shape
        flat = idx.reshape(-1)
        order = torch.sort(flat, stable=True).indices  # [P]: pair numbers in expert order
        xs = x.reshape(t, 1, x.shape[-1])[order // k]  # [P, 1, H]
        ys = self._experts(xs, flat[order], True).squeeze(-2)  # [P, H]
        # row p of ys is pair order[p]: scatter back instead of sorting again for the inverse
        return ys.new_empty(ys.shape).index_copy(0, order, ys).reshape(t, k, -1)


class DenseRoutedExperts(MoeExperts):
    """Llama 4's experts (`Llama4TextExperts`): `forward(routed_in [E * T, H])`, block e of
    the rows being the T tokens already multiplied by their routing weight for expert e (0
    where e was not chosen); returns each expert's output on its block, `[E * T, H]`.

    transformers runs every expert on every row; the all-zero rows give zero rows exactly
    (no biases, `act(0) * 0 = 0`), so only the others are computed."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        hidden = hidden_states.shape[-1]
        rows = hidden_states.reshape(self.num_experts, -1, hidden)  # [E, T, H]
        expert, token = torch.nonzero(rows.ne(0).any(-1), as_tuple=True)  # expert-sorted
        out = hidden_states.new_zeros(rows.shape)
        # (a traced call computes the empty case too: the count is data, a guard on it fails)
        if torch.compiler.is_compiling() or expert.numel():
            x = rows[expert, token].reshape(-1, 1, 1, hidden)
            y = self._experts(x, expert.reshape(-1, 1), True).reshape(-1, hidden)
            out[expert, token] = y.to(out.dtype)
        return out.reshape(-1, hidden)


def experts_class(variant: str) -> type[MoeExperts]:
    """mlxq's experts module for a :class:`mlxq.swap.MoePlan` variant."""
    return DenseRoutedExperts if variant == "llama4" else MoeExperts


def fused_expert_stacks(
    module: nn.Module, variant: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """mlx-lm's three stacks `{proj: (weight [E, out, in], bias [E, out] or None)}` from the
    fused parameters of transformers' experts `module` of :class:`mlxq.swap.MoePlan` variant
    `variant` (views, not copies)."""
    if variant == "dbrx":  # rows [E * I, H] per expert; w2[e] is down_proj[e] transposed
        glu, e = module.mlp, module.num_experts
        w1, v1, w2 = (
            getattr(glu, p).detach().view(e, -1, glu.w1.shape[1]) for p in ("w1", "v1", "w2")
        )
        return {"gate_proj": (w1, None), "up_proj": (v1, None), "down_proj": (w2.mT, None)}
    down = module.down_proj.detach()
    if variant == "mlp":  # no gate: `up_proj` [E, I, H], `down_proj` [E, H, I]
        return {"up_proj": (module.up_proj.detach(), None), "down_proj": (down, None)}
    if variant == "gpt_oss":  # [E, H, 2I], gate and up interleaved (mlx-lm's sanitize)
        gate_up = module.gate_up_proj.detach().transpose(1, 2)
        bias = module.gate_up_proj_bias.detach()
        return {
            "gate_proj": (gate_up[:, ::2], bias[:, ::2]),
            "up_proj": (gate_up[:, 1::2], bias[:, 1::2]),
            "down_proj": (down.transpose(1, 2), module.down_proj_bias.detach()),
        }
    gate_up = module.gate_up_proj.detach()  # [E, 2I, H]: gate rows, then up rows
    if variant == "llama4":  # [E, H, 2I] and [E, I, H]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    inter = gate_up.shape[1] // 2
    return {
        "gate_proj": (gate_up[:, :inter], None),
        "up_proj": (gate_up[:, inter:], None),
        "down_proj": (down, None),
    }


def experts_gate(module: nn.Module, variant: str) -> dict[str, nn.Module | Callable]:
    """The gate arguments of :class:`MoeExperts` (`act_fn=` or `glu=`) for transformers'
    experts `module` of variant `variant`."""
    if variant == "gpt_oss":
        return {"glu": ClampedSwiGLU(module.alpha, module.limit)}
    if variant == "limited_swiglu":
        return {"glu": LimitedSwiGLU(module.swiglu_limit)}
    if variant == "dbrx":
        return {"act_fn": module.mlp.activation_fn}
    return {"act_fn": module.act_fn}


class AffineWeight:
    """A quantized `[out, in]` weight as a router's forward sees `self.weight`.

    Not a tensor: `F.linear(x, w, bias=None)` computes `quantized_matmul(x, ...) (+ bias)` through
    `__torch_function__` (after `float()`: on the weight dequantized in float32, for a float32
    `x`); every other torch function, and attributes other than `shape`, `dtype`, `device`,
    `element_size()`, `numel()` (and accelerate's `data_ptr()` and `to(device)`, on the packed
    tensor), raise an error naming the module, so that
    a forward mlxq does not reproduce fails loudly instead of running on the packed integers.
    """

    def __init__(self, owner: str, module: nn.Module, float32: bool = False) -> None:
        self._owner = owner
        self._module = module
        self._float32 = float32  # `self.weight.float()`: dequantized in float32

    def float(self) -> AffineWeight:
        """The weight as `weight.float()` gives it: F.linear then dequantizes in float32."""
        return AffineWeight(self._owner, self._module, float32=True)

    def type(self, dtype: torch.dtype) -> AffineWeight:
        """`weight.type(torch.float32)`, which is :meth:`float`; other dtypes are refused."""
        if dtype is not torch.float32:
            raise self._refuse(f"`self.weight.type({dtype})`")
        return self.float()

    # shape, dtype and device are those of the packed tensor stored as `weight` (what the state
    # dict and transformers' loader see); the router's forward never reads them (swap.moe_plan
    # accepts only forwards that use self.weight inside F.linear).
    @property
    def shape(self) -> torch.Size:
        return self._module.weight_packed.shape

    @property
    def dtype(self) -> torch.dtype:
        if getattr(self._module, "_mlxq_float_dtype", False):  # see float_dtype_for_routers
            return self._module._mlxq_dtype
        return self._module.weight_packed.dtype

    @property
    def device(self) -> torch.device:
        return self._module.weight_packed.device

    # Size queries answer for the stored tensor too: transformers' loader sizes its allocator
    # warm-up for an accelerator device map with `element_size()` and `numel()`.
    def element_size(self) -> int:
        return self._module.weight_packed.element_size()

    def numel(self) -> int:
        return self._module.weight_packed.numel()

    # accelerate's device hooks (a dispatched device_map, offload) move a module's state-dict
    # tensors by name, and `getattr(router, "weight")` is this object: its moves act on the
    # packed tensor they mean, as shape/dtype/device describe it. (A router's forward never
    # calls them: swap.moe_plan accepts none that does.)
    def data_ptr(self) -> int:
        return self._module.weight_packed.data_ptr()

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The packed tensor on another device (accelerate's placement); a cast is refused."""
        packed = self._module.weight_packed
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype != packed.dtype:
            raise self._refuse(f"`self.weight.to({dtype})`")
        return packed.to(device=device, non_blocking=non_blocking)

    def _refuse(self, what: str) -> NotImplementedError:
        return NotImplementedError(
            f"mlxq: module {self._owner} uses its quantized weight in {what}; mlxq runs a "
            "quantized router weight only through F.linear(x, self.weight[, bias])"
        )

    def __getattr__(self, name: str):
        if name == "_is_hf_initialized":  # transformers' init functions skip loaded tensors
            packed = self._module.weight_packed
            # and a meta one (accelerate's disk offload keeps it there, its values in a file)
            # is left alone as an init function leaves a float model's: nothing to write
            return getattr(packed, name, False) or packed.device.type == "meta"
        if name.startswith("_"):
            raise AttributeError(name)
        raise self._refuse(f"`self.weight.{name}`")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = next(a for a in (*args, *kwargs.values()) if isinstance(a, AffineWeight))
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if w is owner and isinstance(x, torch.Tensor) and not isinstance(bias, AffineWeight):
                m = owner._module
                scales, biases = m.scales, m.biases
                if owner._float32:
                    if x.dtype != torch.float32:  # as F.linear(x, w.float()) would
                        raise RuntimeError(
                            f"mlxq: module {owner._owner}: F.linear of {x.dtype} input and a "
                            "float32 weight"
                        )
                    if scales.is_floating_point():
                        scales = scales.float()
                    biases = biases.float() if biases is not None else None
                y = quantized_matmul(
                    x, m.weight_packed, scales, biases, True, m.group_size, m.bits, m.mode
                )
                return y if bias is None else y + bias.to(y.dtype)
        raise owner._refuse(f"`{getattr(func, '__name__', func)}`")


class _AffineRouter(RefusesUnsupportedCasts, PicklesUnsignedBuffers):
    """Mixin placed before a router class: `self.weight` becomes an :class:`AffineWeight`
    over the packed buffers (`weight` in the state dict, as in MLX checkpoints)."""

    @property
    def weight(self) -> AffineWeight:
        return AffineWeight(f"{self._mlxq_name!r} ({self._mlxq_router_of.__name__})", self)

    @property
    def weight_packed(self) -> torch.Tensor:
        return self._buffers["weight"]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}"
            + ("" if self.mode == "affine" else f", mode={self.mode}")
            + " (quantized by mlxq)"
        )


_ROUTER_CLASSES: dict[type, type] = {}


def _router_class(cls: type) -> type:
    if cls not in _ROUTER_CLASSES:
        _ROUTER_CLASSES[cls] = made_class(
            f"Affine{cls.__name__}",
            (_AffineRouter, cls),
            {
                "__module__": __name__,
                "__doc__": f"{cls.__name__} with an MLX-quantized weight.",
                # the router class it was made from (its MRO also holds mlxq's mixins)
                "_mlxq_router_of": cls,
            },
            _router_class,
            cls,
        )
    return _ROUTER_CLASSES[cls]


def quantized_router(
    name: str,
    module: nn.Module,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    device,
    weight: torch.Tensor | None = None,
    mode: str = "affine",
) -> nn.Module:
    """`module` (a router whose forward reaches its weight only through `F.linear`; see
    :func:`mlxq.swap.moe_plan`) with that weight quantized: the same object state and forward,
    its `weight` parameter replaced by packed `weight`/`scales`(/`biases` in mode "affine")
    buffers (uninitialized, or `weight` [out, in] quantized bit-exactly as mlx does)."""
    out_features, in_features = module.weight.shape
    new = object.__new__(_router_class(type(module)))
    new.__dict__.update(module.__dict__)
    new._parameters = {k: v for k, v in module._parameters.items() if k != "weight"}
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    new._mlxq_name = name
    new.in_features, new.out_features = in_features, out_features
    new.bits, new.group_size, new.mode, new._mlxq_dtype = bits, group_size, mode, dtype
    if weight is not None:
        packed, scales, *rest = quantize(weight.detach().contiguous(), group_size, bits, mode)
        biases = rest[0] if rest else None
    else:
        scale_dtype = dtype if mode == "affine" else torch.uint8
        packed = torch.empty(out_features, in_features * bits // 32, dtype=torch.uint32)
        scales = torch.empty(out_features, in_features // group_size, dtype=scale_dtype)
        packed, scales = packed.to(device), scales.to(device)
        biases = torch.empty_like(scales) if mode == "affine" else None
    new._buffers.update(weight=packed, scales=scales, biases=biases)
    return new


def float_router(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """The quantized router `module` as its own class with its float weight (dequantized)."""
    w = dequantize(
        module.weight_packed,
        module.scales,
        module.biases,
        module.group_size,
        module.bits,
        module.mode,
        dtype=None if module.mode == "affine" else module._mlxq_dtype,
    )
    new = object.__new__(module._mlxq_router_of)
    new.__dict__.update(module.__dict__)
    for attr in ("_mlxq_name", "bits", "group_size", "mode", "_mlxq_dtype"):
        new.__dict__.pop(attr, None)
    new._buffers = {
        k: v for k, v in module._buffers.items() if k not in ("weight", "scales", "biases")
    }
    new._parameters = {**module._parameters, "weight": nn.Parameter(w.to(dtype or w.dtype))}
    return new


def float_dtype_for_routers(model: nn.Module) -> list[str]:
    """After loading: the routers whose forward reads `self.weight.dtype` (swap.MoePlan.
    reads_dtype, marked at load; MiniMax-M2 casts its input to it) see the dtype their
    quantized F.linear computes in (that of the scales) from now on, instead of the packed
    integers' that transformers' loader needed. Returns their names."""
    done = []
    for name, module in model.named_modules():
        if isinstance(module, _AffineRouter) and getattr(module, "_mlxq_reads_dtype", False):
            module._mlxq_float_dtype = True
            done.append(name)
    return done


def dequantize_moe(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace mlxq's quantized MoE parts by float ones in place (part of
    :func:`mlxq.quantize_model.dequantize_model`): stacked experts become :class:`SwitchLinear`
    (mlx-lm's float `switch_mlp` layout), quantized routers their own class with a float
    `weight`, DeepSeek V3's per-head projections :class:`mlxq.mla.MultiLinear`."""
    from mlxq.mla import AffineMultiLinear, MultiLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, AffineSwitchLinear):
            w = module.dequantize_weight()
            new = SwitchLinear(
                module.num_experts, module.in_features, module.out_features, w.dtype, w.device
            )
            new.weight = nn.Parameter(w.to(dtype or w.dtype), requires_grad=False)
            if module.bias is not None:
                new.bias = nn.Parameter(module.bias.detach().to(dtype or w.dtype), False)
        elif isinstance(module, AffineMultiLinear):
            w = module.dequantize_weight()
            heads, out_features, in_features = w.shape
            new = MultiLinear(heads, in_features, out_features, w.dtype, w.device)
            new.weight = nn.Parameter(w.to(dtype or w.dtype), requires_grad=False)
        elif isinstance(module, _AffineRouter):
            new = float_router(module, dtype)
        else:
            continue
        model.set_submodule(name, new)
    return model
