"""Which float modules mlxq may replace by quantized ones, and how, without changing the model.

A module is replaced only when mlxq reproduces its exact forward:
- `nn.Linear` (or a subclass that does not override `forward`): `x @ W.T + b`;
- `nn.Embedding` (same rule; `max_norm` renormalizes rows in `forward`, so it is refused).
  `padding_idx` only changes gradients, not the lookup: it is kept as an attribute;
- transformers' scaled word embeddings (Gemma 1/2/3/3n/4, MiniCPM3, BART, ...), recognised by
  the source of their `forward` (`super().forward(ids) * self.embed_scale[.to(weight.dtype)]`),
  not by their name: the scale and its rounding are kept;
- transformers' normed word embeddings (Muse Glimmer), recognised the same way
  (`self.embed_norm(super().forward(input_ids))`): the norm module is kept;
- GPT-2's `Conv1D` (`x @ W + b` with `W` stored `[in, out]`): an MLX checkpoint stores it as a
  linear layer (`[out, in]`), so it becomes an `AffineLinear`, or an `nn.Linear` when float.
Any other subclass of `nn.Linear`/`nn.Embedding` overrides `forward` with code mlxq does not
know; replacing it would silently change the model, so :meth:`SwapPlan.require` refuses it
with an error naming the module and its class.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import linecache
import os
import re
import textwrap
import types
from dataclasses import dataclass, replace

import torch
from torch import nn

from mlxq._transformers_version import MIN_TRANSFORMERS
from mlxq.nn import (
    AffineEmbedding,
    AffineLinear,
    NormedAffineEmbedding,
    RowServingAffineEmbedding,
    RowServingScaledAffineEmbedding,
    ScaledAffineEmbedding,
    method_code,
)

__all__ = [
    "SwapPlan",
    "swap_plan",
    "is_conv1d",
    "MoePlan",
    "moe_plan",
    "WeightRead",
    "weight_reads",
]

# The bodies of the scaled-embedding forwards mlxq reproduces (whitespace removed), and whether
# the scale is a tensor cast to the weight's dtype (True) or a Python float (False).
_SCALED_FORWARDS = {
    "returnsuper().forward(input_ids)*self.embed_scale.to(self.weight.dtype)": True,
    "returnsuper().forward(input_ids)*self.embed_scale": False,
}


# The body of the normed-embedding forward mlxq reproduces (whitespace removed)
_NORMED_FORWARD = "returnself.embed_norm(super().forward(input_ids))"


def _embed_norm(module: nn.Embedding) -> nn.Module | None:
    """The norm module of a known normed embedding (its lookup, then `embed_norm`); None when
    its forward is not that one."""
    owner = forward_owner(type(module))
    if forward_body(owner) != _NORMED_FORWARD or not issubclass(owner.__mro__[1], nn.Embedding):
        return None
    if owner.__mro__[1].forward is not nn.Embedding.forward:  # super() must be nn.Embedding's
        return None
    norm = getattr(module, "embed_norm", None)
    return norm if isinstance(norm, nn.Module) else None


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style `Conv1D` (weight `[in, out]`), subclasses included,
    as long as they keep its forward."""
    for cls in type(module).__mro__:
        if cls.__name__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils":
            return type(module).forward is cls.forward
    return False


def forward_body(cls: type) -> str | None:
    """The body of `cls.forward` with all whitespace removed; None if it has no source."""
    return _function_body_text(cls.forward)


@functools.lru_cache(maxsize=1024)
def _function_body_text(fn: object) -> str | None:
    # cached by the function itself (a model walk asks once per module, ~100 a model)
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None
    lines = source.splitlines()
    while lines and not lines[0].rstrip().endswith(":"):  # a signature over several lines
        lines.pop(0)
    return "".join("".join(lines[1:]).split())


def function_body(fn: object) -> str | None:
    """fn's arguments and body (docstring dropped) as ast.unparse writes them, without
    whitespace; None for anything but a plain Python function with source."""
    if type(fn) is not types.FunctionType or hasattr(fn, "__wrapped__"):
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    if not isinstance(tree, ast.FunctionDef):
        return None
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    text = ast.unparse(tree.args) + ":" + ";".join(ast.unparse(s) for s in body)
    return "".join(text.split())


def forward_owner(cls: type) -> type:
    """The class of `cls`'s MRO that defines the `forward` it runs (nn.Module at the latest)."""
    return next(c for c in cls.__mro__ if "forward" in vars(c))


def _scaled_embedding(module: nn.Embedding) -> tuple[float, torch.dtype | None] | None:
    """(scale, dtype of the scale tensor or None for a Python float) for a known scaled
    embedding; None when its forward is not one of the known ones."""
    cls = type(module)
    owner = forward_owner(cls)
    as_tensor = _SCALED_FORWARDS.get(forward_body(owner) or "")
    if as_tensor is None or not issubclass(owner.__mro__[1], nn.Embedding):
        return None
    if owner.__mro__[1].forward is not nn.Embedding.forward:  # super() must be nn.Embedding's
        return None
    scale = getattr(module, "embed_scale", None)
    if not as_tensor:
        return (float(scale), None) if isinstance(scale, (int, float)) else None
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
        return None
    if scale.device.type != "meta":
        return float(scale.detach().float().cpu()), scale.dtype
    # on the meta device (before loading) the value lives in the float the buffer is built from
    scalar = getattr(module, "scalar_embed_scale", None)
    if not isinstance(scalar, (int, float)):
        return None
    # (explicit cpu: loading runs under a meta default device)
    return float(torch.tensor(scalar, dtype=scale.dtype, device="cpu").float()), scale.dtype


@dataclass(frozen=True)
class SwapPlan:
    """How a float module maps onto an mlxq module; `refusal` says why it cannot."""

    name: str
    cls_name: str
    kind: str  # "linear" or "embedding"
    in_features: int  # K: the width that is quantized (embedding_dim for embeddings)
    out_features: int  # rows (num_embeddings for embeddings)
    bias: bool = False
    transposed: bool = False  # Conv1D: the float weight is [in, out]
    embed_scale: float | None = None
    scale_dtype: torch.dtype | None = None
    embed_norm: nn.Module | None = None  # a normed embedding's norm module, kept
    padding_idx: int | None = None
    refusal: str | None = None
    # (code, `Class.method`) of the model methods an embedding serves single rows of its
    # table to (see mlxq.model_walk.plan_modules): the quantized module is a RowServing one
    row_readers: tuple[tuple[types.CodeType, str], ...] = ()

    def require(self) -> SwapPlan:
        """This plan, or a NotImplementedError naming the module when mlxq cannot replace it."""
        if self.refusal is not None:
            raise NotImplementedError(
                f"mlxq: module {self.name!r} ({self.cls_name}): {self.refusal}; mlxq replaces "
                "only modules whose forward it reproduces exactly (nn.Linear, nn.Embedding, "
                "transformers' scaled and normed word embeddings and GPT-2 Conv1D)"
            )
        return self

    def empty(
        self, bits: int, group_size: int, dtype: torch.dtype, device, mode: str = "affine"
    ) -> nn.Module:
        """The quantized module with uninitialized buffers of the checkpoint's shapes."""
        self.require()
        if self.kind == "linear":
            return AffineLinear(
                self.in_features,
                self.out_features,
                bias=self.bias,
                bits=bits,
                group_size=group_size,
                dtype=dtype,
                device=device,
                mode=mode,
            )
        common = dict(
            bits=bits,
            group_size=group_size,
            padding_idx=self.padding_idx,
            dtype=dtype,
            device=device,
            mode=mode,
        )
        if self.embed_norm is not None:
            if self.row_readers:  # (no model does both)
                raise NotImplementedError(
                    f"mlxq: module {self.name!r} ({self.cls_name}): a normed embedding whose "
                    "table the model reads rows of"
                )
            return NormedAffineEmbedding(
                self.out_features, self.in_features, self.embed_norm, **common
            )
        if self.embed_scale is not None:
            cls = RowServingScaledAffineEmbedding if self.row_readers else ScaledAffineEmbedding
            embedding = cls(
                self.out_features,
                self.in_features,
                self.embed_scale,
                self.scale_dtype,
                **common,
            )
        else:
            cls = RowServingAffineEmbedding if self.row_readers else AffineEmbedding
            embedding = cls(self.out_features, self.in_features, **common)
        if self.row_readers:
            embedding.serve_rows(self.name, dict(self.row_readers))
        return embedding

    def quantize(
        self, module: nn.Module, bits: int, group_size: int, mode: str = "affine"
    ) -> nn.Module:
        """`module`'s weights quantized exactly as `mlx.nn.quantize` does (bit-exact)."""
        w = module.weight.detach()
        if self.transposed:
            w = w.t()
        new = self.empty(bits, group_size, w.dtype, w.device, mode)
        new.load_quantized(w.contiguous())
        if self.bias and module.bias is not None:
            new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        return new

    def float_linear(self, module: nn.Module | None = None, device=None) -> nn.Linear:
        """An `nn.Linear` with this module's forward (Conv1D in MLX's `[out, in]` layout)."""
        dtype = module.weight.dtype if module is not None else None
        device = module.weight.device if module is not None else device
        new = nn.Linear(
            self.in_features, self.out_features, bias=self.bias, dtype=dtype, device=device
        )
        if module is not None and module.weight.device.type != "meta":
            w = module.weight.detach()
            new.weight = nn.Parameter(w.t().contiguous() if self.transposed else w.clone())
            if self.bias:
                new.bias = nn.Parameter(module.bias.detach().clone())
        return new


def swap_plan(name: str, module: nn.Module) -> SwapPlan | None:
    """How `module` would be replaced; None for modules that hold no linear/embedding weight.

    The plan of a subclass whose forward mlxq does not reproduce carries a `refusal`: callers
    raise it (:meth:`SwapPlan.require`) only where they must replace the module.
    """
    cls = type(module)
    if isinstance(module, nn.Linear):
        plan = SwapPlan(
            name,
            cls.__name__,
            "linear",
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
        )
        if cls.forward is not nn.Linear.forward:
            return _refuse(plan, "it subclasses nn.Linear and overrides forward")
        return plan
    if isinstance(module, nn.Embedding):
        plan = SwapPlan(
            name,
            cls.__name__,
            "embedding",
            module.embedding_dim,
            module.num_embeddings,
            padding_idx=module.padding_idx,
        )
        if module.max_norm is not None:
            return _refuse(plan, f"max_norm={module.max_norm} renormalizes rows in forward")
        if cls.forward is nn.Embedding.forward:
            return plan
        norm = _embed_norm(module)
        if norm is not None:
            return SwapPlan(**{**vars(plan), "embed_norm": norm})
        scaled = _scaled_embedding(module)
        if scaled is None:
            return _refuse(plan, "it subclasses nn.Embedding and overrides forward")
        return SwapPlan(**{**vars(plan), "embed_scale": scaled[0], "scale_dtype": scaled[1]})
    if is_conv1d(module):
        nx, nf = module.weight.shape
        return SwapPlan(name, cls.__name__, "linear", nx, nf, bias=True, transposed=True)
    return None


def _refuse(plan: SwapPlan, why: str) -> SwapPlan:
    return SwapPlan(**{**vars(plan), "refusal": why})


# --- mixture-of-experts: fused experts and routers ---------------------------------------------
#
# transformers 5 keeps a MoE block's experts fused (`gate_up_proj` [E, 2I, H], `down_proj`
# [E, H, I]) in an `*Experts` module whose eager forward is the same loop in every architecture
# that has it, except gpt-oss (biases, transposed and interleaved weights, its own gate); mlxq
# replaces such a module by :class:`mlxq.moe.MoeExperts` only when that forward (and gpt-oss's
# gate) is one it reproduces, recognised by the source, not the class name. Routers
# (`*TopKRouter`, or any module with a 2-D weight) keep their own forward when quantized, which
# is exact when that forward reaches the weight only through `F.linear(x, self.weight[, bias])`
# (or nn.Linear's forward through super()).

# sha256 of the whitespace-free body of transformers 5's eager experts forward (e.g.
# MixtralExperts.forward before `use_experts_implementation` wraps it): one-hot mask over the
# experts hit, `act_fn(gate) * up` from `gate_up_proj[e]`, `down_proj[e]`, times the routing
# weight, `index_add_` into the output. Checked against Mixtral, Qwen2/Qwen3-MoE, OLMoE,
# PhiMoE, GraniteMoE, DeepSeek V2/V3 and GLM-4-MoE in transformers 5.24.
_EAGER_EXPERTS_DIGEST = "9aeb8813b50f2bd3ebab6a861ae28a9bd91af7cb79009da5ddf793d92690033c"
# (5.0-5.17 write it with one class fewer in its one_hot, digest bdd38645...: the same values,
# but those releases are below mlxq's floor, MIN_TRANSFORMERS, for other reasons)
# GptOssExperts.forward (transformers 5.24): the same loop with `x @ gate_up_proj[e] +
# gate_up_proj_bias[e]` (weights stored [in, out]), `self._apply_gate`, and `@ down_proj[e] +
# down_proj_bias[e]`
_GPT_OSS_EXPERTS_DIGEST = "5c459e4a3ca1baaa62d0fd18d8e6ee238acf863f243b6f0aa047540357cb7562"
# GptOssExperts._apply_gate: gate/up interleaved (`[..., ::2]`, `[..., 1::2]`), gate clamped
# from above at `limit`, up to [-limit, limit], `(up + 1) * gate * sigmoid(gate * alpha)`
# (what mlxq.moe.ClampedSwiGLU computes)
_GPT_OSS_GATE_DIGEST = "d65d1ff72a6d9341b4d3b56d16406ae977f1f01e02f681d8dbec2756e6a7eb23"
# Glm5NextTextExperts.forward (transformers 5.24): the eager loop (written with other names)
# through `self._apply_gate`, whose gate is clamped from above at `swiglu_limit`, the up part
# to [-swiglu_limit, swiglu_limit], then `silu(gate) * up` (mlxq.moe.LimitedSwiGLU)
_GLM5_NEXT_EXPERTS_DIGEST = "129ee7171d45403394054d26a5b4cf6e3c0f5b506958fe4941976388eb6616db"
_GLM5_NEXT_GATE_DIGEST = "e7fd5947aab565765365b3ce6dfcfdb48cbf5537dc7d62bdb40c20eed643494b"
# Llama4TextExperts.forward (transformers 5.24, not wrapped): every expert on its block of
# the input (`view(E, -1, H)`, the routing weight already applied to it by Llama4TextMoe),
# `bmm` with `gate_up_proj` [E, H, 2I] (gate columns, then up), `up * act(gate)`, `bmm` with
# `down_proj` [E, I, H] (what mlxq.moe.DenseRoutedExperts computes)
_LLAMA4_EXPERTS_DIGEST = "1b9bbda96cd17e6c98097dfebb686c716febc063d2f94cbf96bbef3fc67871cd"


@dataclass(frozen=True)
class _ExpertsForward:
    """An experts forward mlxq reproduces: its `use_experts_implementation` flags (which
    transformers' other experts implementations also follow) and its `_apply_gate` (None:
    transformers' default `act_fn(gate) * up` on `[gate; up]`)."""

    variant: str
    has_bias: bool
    is_transposed: bool
    is_concatenated: bool
    gate_digest: str | None


# NemotronHExperts.forward (transformers 5.24): the eager loop without a gate,
# `down_proj[e] @ act_fn(up_proj[e] @ x)` (`up_proj` [E, I, H], `down_proj` [E, H, I])
_UNGATED_EXPERTS_DIGEST = "92a15e16c8631dbf1339dd511cf4e2b602cb77fc5d62bd37528170f267442fd1"
# the same in transformers 5.25: written as the eager loop above (one_hot over E + 1 classes,
# the extra one skipped; the sum kept in the input's dtype, no final cast), same values in fp32
_UNGATED_EXPERTS_DIGEST_2 = "af4bb886c3078d74aa8ee393fcccaf8e824692447e072425ea9170fbf4f10a49"

# DbrxExperts.forward and DbrxExpertGLU.forward (transformers 5.24, not wrapped): the eager
# loop over the experts hit on the rows of 2-D `mlp.w1`/`v1`/`w2` [E * I, H] viewed [E, I, H]:
# `act_fn(x @ w1[e].T) * (x @ v1[e].T) @ w2[e]` (so w2[e] is down_proj[e] transposed), times
# the routing weight, `index_add_` into the output
_DBRX_EXPERTS_DIGEST = "104ab71571e52d467542024cb90ad1dca1c069f6e80e277bcd0a12fbc2c83fcf"
_DBRX_GLU_DIGEST = "8f5b39510e75cc34cd37d9275a5607f2e940c248a7af4e9c361e5afbcf1348a5"

_KNOWN_EXPERTS = {
    _EAGER_EXPERTS_DIGEST: _ExpertsForward("swiglu", False, False, True, None),
    _GPT_OSS_EXPERTS_DIGEST: _ExpertsForward("gpt_oss", True, True, False, _GPT_OSS_GATE_DIGEST),
    _GLM5_NEXT_EXPERTS_DIGEST: _ExpertsForward(
        "limited_swiglu", False, False, True, _GLM5_NEXT_GATE_DIGEST
    ),
    _LLAMA4_EXPERTS_DIGEST: _ExpertsForward("llama4", False, True, True, None),
    _UNGATED_EXPERTS_DIGEST: _ExpertsForward("mlp", False, False, True, None),
    _UNGATED_EXPERTS_DIGEST_2: _ExpertsForward("mlp", False, False, True, None),
}

# `x.float()` / `self.weight.float()` too (ERNIE 4.5 MoE's router runs in float32; Kimi Linear's
# and Nemotron-H's spell it `.type(torch.float32)`): the
# quantized weight's `.float()` is its dequantized values in float32 (mlxq.moe.AffineWeight);
# and `x.to(self.weight.dtype)` (MiniMax-M2; see MoePlan.reads_dtype)
_LINEAR_USE = re.compile(
    r"(?:\bF|functional)\.linear\(\w+(?:\.float\(\)|\.type\(torch\.float32\)"
    r"|\.to\(self\.weight\.dtype\))?,"
    r"self\.weight(?:\.float\(\)|\.type\(torch\.float32\))?"
    r"(?:,self\.bias)?\)|super\(\)\.forward\(\w+\)"
)
_WEIGHT_USE = re.compile(r"self\.weight(?!\w)")
_DTYPE_READ = re.compile(r"self\.weight\.dtype(?!\w)")


def _function_digest(function) -> str | None:
    """sha256 of the whitespace-free body of `function`; None without source."""
    if function is None:
        return None
    body = forward_body(type("_Holder", (), {"forward": function}))
    return hashlib.sha256(body.encode()).hexdigest() if body else None


def _experts_digest(cls: type) -> str | None:
    """sha256 of the whitespace-free body of the eager forward an experts class wraps."""
    return _function_digest(getattr(cls.forward, "__wrapped__", None))


@dataclass(frozen=True)
class MoePlan:
    """How a MoE module maps onto mlxq's: `kind` is "experts" (fused `gate_up_proj` and
    `down_proj`) or "router" (a module whose forward uses its 2-D weight through F.linear).

    Experts come in these variants: "swiglu" (transformers' eager loop: `gate_up_proj`
    [E, 2I, H] is gate rows then up rows, `act_fn(gate) * up`, no biases), "gpt_oss"
    (`gate_up_proj` [E, H, 2I] with gate and up interleaved, `down_proj` [E, I, H], biases,
    :class:`mlxq.moe.ClampedSwiGLU`), "limited_swiglu" (GLM-5-Next: "swiglu"'s layout with
    :class:`mlxq.moe.LimitedSwiGLU`), "llama4" (every expert on its block of rows), "mlp"
    (Nemotron-H: no gate, `up_proj` [E, I, H], `act_fn(up)`) and "dbrx" (DBRX: 2-D
    `mlp.w1`/`v1`/`w2` [E * I, H], gate, up and down transposed)."""

    name: str
    cls_name: str
    kind: str
    num_experts: int = 0
    in_features: int = 0  # router: K; experts: hidden size
    out_features: int = 0  # router: rows; experts: intermediate size
    refusal: str | None = None
    variant: str = "swiglu"  # experts only
    # router only: its forward also reads `self.weight.dtype` (MiniMax-M2 casts its input to
    # it): loaded from MLX, it answers the float dtype (mlxq.moe.float_dtype_for_routers)
    reads_dtype: bool = False
    # router only: its forward casts to float32 with `.type(torch.float32)` (DeepSeek V3's
    # family, Kimi Linear, Nemotron-H): most of these routers are no linear layer in mlx-lm,
    # which keeps them float, so quantizing one takes an explicit per-module entry
    casts_float32: bool = False

    @property
    def projections(self) -> tuple[str, ...]:
        """The experts' stacked projections (mlx-lm's switch_mlp/switch_glu members)."""
        if self.variant == "mlp":
            return ("up_proj", "down_proj")
        return ("gate_proj", "up_proj", "down_proj")

    @property
    def float_tensor(self) -> str:
        """The name (under the experts module) of a tensor of transformers' own float layout:
        present in a checkpoint, the experts are float and stay transformers' module."""
        return {"mlp": "up_proj", "dbrx": "mlp.w1"}.get(self.variant, "gate_up_proj")

    @property
    def bias(self) -> bool:
        """Whether each expert projection has a bias (gpt-oss)."""
        return self.variant == "gpt_oss"

    def require(self) -> MoePlan:
        """This plan, or a NotImplementedError naming the module when mlxq cannot replace it."""
        if self.refusal is not None:
            import transformers

            # the forwards are recognised as the supported transformers releases write them
            raise NotImplementedError(
                f"mlxq: module {self.name!r} ({self.cls_name}): {self.refusal}; mlxq replaces "
                "only MoE experts whose forward is transformers' eager experts loop (or its "
                "gpt-oss or GLM-5-Next form), "
                "and routers that use their weight only through F.linear, as transformers "
                f"{MIN_TRANSFORMERS} and later write them (installed: {transformers.__version__})"
            )
        return self


def moe_plan(name: str, module: nn.Module) -> MoePlan | None:
    """The MoE plan of `module`: fused experts, or a router: a module with a 2-D `weight`
    parameter that is not an nn.Linear, nn.Embedding or Conv1D (those are :func:`swap_plan`'s),
    or an nn.Linear subclass named `*Router`; None otherwise."""
    cls = type(module)
    params = dict(module.named_parameters(recurse=False))
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    if gate_up is not None and down is not None and gate_up.dim() == 3:
        return _experts_plan(name, module, params)
    up = params.get("up_proj")
    if gate_up is None and up is not None and down is not None and up.dim() == 3:
        return _ungated_experts_plan(name, module, up, down)
    if not params and isinstance(getattr(module, "mlp", None), nn.Module):
        dbrx = _dbrx_experts_plan(name, module)
        if dbrx is not None:
            return dbrx
    weight = params.get("weight")
    if weight is None or weight.dim() != 2:
        return None
    if isinstance(module, nn.Embedding) or is_conv1d(module):
        return None  # swap_plan's business
    if isinstance(module, nn.Linear) and not cls.__name__.endswith("Router"):
        return None  # swap_plan's (an nn.Linear subclass named *Router is PhiMoE's router)
    out_features, in_features = weight.shape
    plan = MoePlan(name, cls.__name__, "router", 0, in_features, out_features)
    owner = forward_owner(cls)
    body = forward_body(owner) or ""
    uses = _LINEAR_USE.findall(body)
    supers = [u for u in uses if u.startswith("super")]
    if supers and owner.__mro__[1].forward is not nn.Linear.forward:
        return _refuse_moe(plan, "its forward calls a super().forward mlxq does not know")
    if supers and not isinstance(module, nn.Linear):
        return _refuse_moe(plan, "its forward calls super().forward")
    dtype_reads = len(_DTYPE_READ.findall(body))
    if len(_WEIGHT_USE.findall(body)) != len(uses) - len(supers) + dtype_reads or not uses:
        return _refuse_moe(plan, "its forward uses self.weight other than in F.linear(x, w)")
    plan = replace(plan, casts_float32="type(torch.float32)" in body)
    return replace(plan, reads_dtype=True) if dtype_reads else plan


def _ungated_experts_plan(
    name: str, module: nn.Module, up: torch.Tensor, down: torch.Tensor
) -> MoePlan:
    """The plan of experts without a gate (`up_proj` [E, I, H], `down_proj` [E, H, I]):
    refused unless their forward is Nemotron-H's eager loop."""
    cls = type(module)
    e, inter, hidden = up.shape
    plan = MoePlan(name, cls.__name__, "experts", e, hidden, inter, variant="mlp")
    known = _KNOWN_EXPERTS.get(_experts_digest(cls) or "")
    if known is None or known.variant != "mlp":
        return _refuse_moe(plan, "its forward is not transformers' eager experts loop")
    if getattr(module, "has_gate", False) or getattr(module, "has_bias", False):
        return _refuse_moe(plan, "has_gate/has_bias is set on experts with only up_proj")
    if tuple(down.shape) != (e, hidden, inter):
        return _refuse_moe(plan, f"down_proj {list(down.shape)} does not fit up_proj")
    return plan


def _dbrx_experts_plan(name: str, module: nn.Module) -> MoePlan | None:
    """The plan of DBRX's experts (`mlp.w1`/`v1`/`w2`, 2-D [E * I, H]); None for a module
    without such a child. Refused unless both forwards are DBRX's."""
    glu = module.mlp
    params = dict(glu.named_parameters(recurse=False))
    if set(params) != {"w1", "v1", "w2"} or any(p.dim() != 2 for p in params.values()):
        return None
    e, inter = getattr(module, "num_experts", 0), getattr(module, "ffn_hidden_size", 0)
    rows, hidden = params["w1"].shape
    plan = MoePlan(name, type(module).__name__, "experts", e, hidden, inter, variant="dbrx")
    if _function_digest(type(module).forward) != _DBRX_EXPERTS_DIGEST or (
        _function_digest(type(glu).forward) != _DBRX_GLU_DIGEST
    ):
        return _refuse_moe(plan, "its forward is not DBRX's experts loop")
    if not (isinstance(e, int) and isinstance(inter, int) and e > 0 and rows == e * inter) or any(
        tuple(p.shape) != (rows, hidden) for p in params.values()
    ):
        return _refuse_moe(plan, f"w1/v1/w2 are not [{e} x {inter}, {hidden}]")
    return plan


def _experts_plan(name: str, module: nn.Module, params: dict[str, torch.Tensor]) -> MoePlan:
    """The plan of fused experts: refused unless their forward is one mlxq reproduces."""
    cls = type(module)
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    # Llama 4's experts forward is not wrapped by use_experts_implementation: its own digest
    known = _KNOWN_EXPERTS.get(_experts_digest(cls) or _function_digest(cls.forward) or "")
    transposed = known is not None and known.is_transposed
    if transposed:  # [E, H, 2I]
        e, hidden, two_i = gate_up.shape
    else:  # [E, 2I, H]
        e, two_i, hidden = gate_up.shape
    inter = two_i // 2
    plan = MoePlan(name, cls.__name__, "experts", e, hidden, inter)
    if known is None:
        return _refuse_moe(plan, "its forward is not transformers' eager experts loop")
    plan = MoePlan(**{**vars(plan), "variant": known.variant})
    flags = {
        "has_gate": True,
        "has_bias": known.has_bias,
        "is_transposed": known.is_transposed,
        "is_concatenated": known.is_concatenated,
        "has_post_expert_norm": False,
    }
    for flag, want in flags.items():
        if getattr(module, flag, want) != want:
            return _refuse_moe(plan, f"{flag}={getattr(module, flag)} is not supported")
    from transformers.integrations.moe import _default_apply_gate

    apply_gate = getattr(cls, "_apply_gate", _default_apply_gate)
    if known.gate_digest is None and apply_gate is not _default_apply_gate:
        return _refuse_moe(plan, "it overrides _apply_gate")
    if known.gate_digest is not None and _function_digest(apply_gate) != known.gate_digest:
        return _refuse_moe(plan, "its _apply_gate is not the one mlxq reproduces")
    want_down = (e, inter, hidden) if transposed else (e, hidden, inter)
    if tuple(down.shape) != want_down or two_i % 2:
        return _refuse_moe(plan, f"down_proj {list(down.shape)} does not fit gate_up_proj")
    if known.has_bias:
        biases = {"gate_up_proj_bias": (e, two_i), "down_proj_bias": (e, hidden)}
        for bias, shape in biases.items():
            got = params.get(bias)
            if got is None or tuple(got.shape) != shape:
                have = None if got is None else list(got.shape)
                return _refuse_moe(plan, f"{bias} is {have}, expected {list(shape)}")
    numbers = {"gpt_oss": ("alpha", "limit"), "limited_swiglu": ("swiglu_limit",)}
    for attr in numbers.get(known.variant, ()):
        if not isinstance(getattr(module, attr, None), (int, float)):
            return _refuse_moe(plan, f"its {attr} is not a number")
    return plan


def _refuse_moe(plan: MoePlan, why: str) -> MoePlan:
    return MoePlan(**{**vars(plan), "refusal": why})


def _runs_model(name: str) -> bool:
    """The methods whose reads count: `forward` and its helpers (`slow_forward`,
    `torch_forward`, ...). Others (`interpolate_pos_encoding`, initialisation, tying) run only
    when asked for, and a read there of a quantized weight fails loudly on its uint32 dtype,
    unless a forward of the class calls them on every run (:func:`_unconditional_self_calls`)."""
    return "forward" in name


# nodes under which a call may not run: a branch, a short circuit, a handler (or _FRAMES)
_CONDITIONAL = (ast.If, ast.IfExp, ast.BoolOp, ast.Try, ast.Match, ast.Assert)


def _unconditional_self_calls(fn: ast.AST) -> set[str]:
    """Names of the methods `fn` calls as `self.name(...)` on every run (in loops too: the
    call runs once per item, as HunYuan-VL's `interpolate_pos_encoding` per image)."""
    found: set[str] = set()
    for child in ast.iter_child_nodes(fn):
        if isinstance(child, (*_CONDITIONAL, *_FRAMES)):
            continue
        func = child.func if isinstance(child, ast.Call) else None
        if (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id == "self"
        ):
            found.add(func.attr)
        found |= _unconditional_self_calls(child)
    return found


def _reads_training(test: ast.expr) -> bool:
    return any(
        isinstance(n, ast.Attribute) and n.attr == "training" and isinstance(n.value, ast.Name)
        for n in ast.walk(test)
    )


def _inference_nodes(node: ast.AST):
    """The nodes under `node` that run in inference: the bodies of `if self.training ...:`
    are left out (Mamba-style mixers hand their weights to fused kernels only when training;
    mlxq's quantized modules are for inference and adapters)."""
    for child in ast.iter_child_nodes(node):
        yield child
        if isinstance(child, ast.If) and _reads_training(child.test):
            for branch in child.orelse:
                yield branch
                yield from _inference_nodes(branch)
            continue
        yield from _inference_nodes(child)


@dataclass(frozen=True)
class WeightRead:
    """A method (`Class.method`) reading a module's `.weight`; `dtype_only` when it only asks for
    its dtype (`x.to(self.lm_head.weight.dtype)`); `row` when it indexes one row
    (`self.embed_tokens.weight[i, :]`) in the method's own frame, whose `code` it carries;
    `in_forward` for `forward` and its helpers (the reads that count when refusing a model)."""

    reader: str
    dtype_only: bool
    row: bool = False
    code: types.CodeType | None = None
    in_forward: bool = True


_SCOPES = (
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.Lambda,
    ast.ListComp,
    ast.SetComp,
    ast.DictComp,
    ast.GeneratorExp,
)
_FRAMES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def _full_slice(node: ast.expr) -> bool:
    return (isinstance(node, ast.Slice) and node.lower is node.upper is node.step is None) or (
        isinstance(node, ast.Constant) and node.value is Ellipsis
    )


def _row_index(index: ast.expr) -> bool:
    """`w[i]`, `w[i, :]` or `w[i, ...]` with `i` neither a slice nor None (whether `i` is one
    integer is checked when it runs: :class:`mlxq.nn.WeightRows`)."""
    first, rest = (index.elts[0], index.elts[1:]) if isinstance(index, ast.Tuple) else (index, [])
    if isinstance(first, (ast.Slice, ast.Starred, ast.Tuple)):
        return False
    if isinstance(first, ast.Constant) and first.value in (None, Ellipsis):
        return False
    return len(rest) <= 1 and all(_full_slice(e) for e in rest)


def _class_definition(cls: type) -> ast.stmt | None:
    """The statement defining `cls` (its `class` node), as `inspect.getsource(cls)` finds it:
    the first class of that qualified name in its module's source. Before Python 3.13 that
    call parses the whole module again for every class (0.1-0.2 s for a transformers modeling
    file, a few seconds a model of ~20 classes); the module is parsed once here. Source that
    is not a file linecache reads is left to inspect."""
    try:
        file = inspect.getsourcefile(cls)
    except TypeError:
        return None
    if file is not None:
        try:
            stat = os.stat(file)
        except OSError:
            stat = None
        if stat is not None:
            found = _module_classes(file, stat.st_mtime_ns, stat.st_size).get(cls.__qualname__)
            if found is not None:
                return found
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return None
    return tree.body[0] if tree.body else None


@functools.lru_cache(maxsize=8)
def _module_classes(file: str, mtime_ns: int, size: int) -> dict[str, ast.ClassDef]:
    """Qualified name -> the first `class` statement of that name in `file`, in inspect's
    order (depth first, in source order; a function's locals are `name.<locals>`). Keyed by
    the file's modification time and size too, so that an edited file is parsed again."""
    linecache.checkcache(file)
    lines = linecache.getlines(file)
    try:
        tree = ast.parse("".join(lines))
    except SyntaxError:
        return {}
    classes: dict[str, ast.ClassDef] = {}

    def visit(node: ast.AST, stack: tuple[str, ...]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, (*stack, child.name, "<locals>"))
            elif isinstance(child, ast.ClassDef):
                inner = (*stack, child.name)
                classes.setdefault(".".join(inner), child)
                visit(child, inner)
            else:
                visit(child, stack)

    visit(tree, ())
    return classes


def _class_weight_reads(cls: type) -> dict[str, list[WeightRead]]:
    """For a model class of its own (not torch's or transformers' base classes): the attribute
    chains `a.b` of every `self.a.b.weight` read in its methods (not in the training-only
    branches of their forward), with their :class:`WeightRead`s."""
    module = cls.__module__ or ""
    if module.startswith(("torch.", "mlxq.")) or (
        module.startswith("transformers.") and not module.startswith("transformers.models.")
    ):
        return {}
    tree = _class_definition(cls)
    if tree is None:
        return {}
    methods = {id(n) for n in tree.body}
    reads: dict[str, list[WeightRead]] = {}
    # the helpers a forward calls on every run count as forward (HunYuan-VL's vision embedding
    # reads its position table in `interpolate_pos_encoding`, which its forward always calls)
    helpers = set()
    for fn in tree.body:
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and _runs_model(fn.name):
            helpers |= _unconditional_self_calls(fn)
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        in_forward = _runs_model(fn.name) or (id(fn) in methods and fn.name in helpers)
        nodes = list(_inference_nodes(fn)) if in_forward else list(ast.walk(fn))[1:]
        asked = {id(n.value): n.attr for n in nodes if isinstance(n, ast.Attribute)}
        indexed = {id(n.value): n.slice for n in nodes if isinstance(n, ast.Subscript)}
        # a read in a nested function, lambda or comprehension runs in a frame of its own
        nested = {
            id(inner) for scope in nodes if isinstance(scope, _SCOPES) for inner in ast.walk(scope)
        }
        code = method_code(cls, fn.name) if id(fn) in methods else None
        for node in nodes:
            if not (isinstance(node, ast.Attribute) and node.attr == "weight"):
                continue
            if asked.get(id(node)) == "device":  # a packed weight lives where the layer does
                continue
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if chain and isinstance(value, ast.Name) and value.id == "self":
                index = indexed.get(id(node))
                row = index is not None and _row_index(index) and id(node) not in nested
                read = WeightRead(
                    f"{cls.__qualname__}.{fn.name}",
                    asked.get(id(node)) == "dtype",
                    row=row and code is not None,
                    code=code if id(node) not in nested else None,
                    in_forward=in_forward,
                )
                found = reads.setdefault(".".join(reversed(chain)), [])
                if read not in found:
                    found.append(read)
    return reads


_WEIGHT_READS_CACHE: dict[type, dict[str, list[WeightRead]]] = {}


def weight_reads(model: nn.Module, every_method: bool = False) -> dict[str, list[WeightRead]]:
    """Module name -> the forward methods of its ancestors' classes that read its `.weight`
    directly (`self.lm_head.weight.dtype`, `self.dt_proj.weight @ x`); with `every_method`,
    their other methods too. A quantized module's `weight` holds packed words: a module read
    for its dtype only can run as a float layer
    (:func:`mlxq.dequantize_model.float_where_weight_dtype_is_read`), an embedding read for
    single rows serves them (:class:`mlxq.nn.RowServingAffineEmbedding`); any other read means
    the module cannot be quantized."""
    reads: dict[str, list[WeightRead]] = {}
    for prefix, module in model.named_modules():
        for cls in type(module).__mro__:
            if cls not in _WEIGHT_READS_CACHE:
                _WEIGHT_READS_CACHE[cls] = _class_weight_reads(cls)
            for chain, found in _WEIGHT_READS_CACHE[cls].items():
                found = [r for r in found if every_method or r.in_forward]
                if not found:
                    continue
                name = f"{prefix}.{chain}" if prefix else chain
                known = reads.setdefault(name, [])
                known.extend(r for r in found if r not in known)
    return reads
