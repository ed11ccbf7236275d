"""Loading mlx-lm mixture-of-experts checkpoints into transformers 5 MoE models.

mlx-lm stacks each expert projection (`mlp.switch_mlp.{gate,up,down}_proj.*`, [E, out, ...]);
transformers 5 fuses gate and up into one `*Experts` parameter. Before the weights load, each
experts module is replaced by :class:`mlxq.moe.MoeExperts` with buffers of the checkpoint's
shapes (its tensors are named `experts.{gate,up,down}_proj.*`, which
:mod:`.mlx_lm_layout` maps from and back to `switch_mlp`), and each quantized router by
:func:`mlxq.moe.quantized_router`. The checks follow :func:`mlxq.format.stored_format`: the
bits and group size come from the tensors, and anything missing or mis-shaped is refused by
name.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import nn

from mlxq.format import ModuleFormat, stored_format
from mlxq.integrations.checkpoint import TensorInfo
from mlxq.mla import AffineMultiLinear, MultiLinear, SplitKvB
from mlxq.moe import (
    AffineSwitchLinear,
    SwitchLinear,
    experts_class,
    experts_gate,
    quantized_router,
)
from mlxq.swap import MoePlan

__all__ = [
    "replace_split_kv_b",
    "stored_stack_format",
    "stack_global_scale",
    "replace_moe_module",
    "check_moe_tensors_loaded",
    "PROJECTIONS",
    "drop_fused_expert_converters",
    "converts_replaced_tensors",
]

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def stored_stack_format(
    name: str,
    num_experts: int,
    in_features: int,
    out_features: int,
    headers: dict[str, TensorInfo],
    config,
) -> ModuleFormat | None:
    """The format of the stacked projection `name` ([E, out, in]); None if it is float."""
    weight = headers.get(f"{name}.weight")
    if weight is None:
        raise ValueError(
            f"mlxq: experts {name!r}: {name}.weight is missing from the checkpoint (expected "
            f"the {num_experts} experts stacked, as mlx-lm's switch_mlp writes them)"
        )
    flat: dict[str, TensorInfo] = {}
    for leaf in ("weight", "scales", "biases"):
        info = headers.get(f"{name}.{leaf}")
        if info is None:
            continue
        if len(info.shape) != 3 or info.shape[0] != num_experts:
            raise ValueError(
                f"mlxq: experts {name!r}: {name}.{leaf} has shape {list(info.shape)}; expected "
                f"[{num_experts}, {out_features}, ...] ({num_experts} experts stacked)"
            )
        flat[f"{name}.{leaf}"] = TensorInfo(info.dtype, info.shape[1:])
    fmt = stored_format(name, in_features, out_features, flat, config)
    if fmt is None and tuple(weight.shape) != (num_experts, out_features, in_features):
        raise ValueError(
            f"mlxq: experts {name!r}: float {name}.weight has shape {list(weight.shape)}, "
            f"expected {[num_experts, out_features, in_features]}"
        )
    return fmt


def stack_global_scale(
    name: str, num_experts: int, fmt: ModuleFormat | None, headers: dict[str, TensorInfo]
) -> bool:
    """Whether the stack `name` has mlx-lm's per-expert nvfp4 tensor scales
    (`<name>.global_scale`, float32 [E], written by `quantize_model(..., global_scale=True)`)."""
    info = headers.get(f"{name}.global_scale")
    if info is None:
        return False
    if fmt is None or fmt.mode != "nvfp4":
        mode = "float" if fmt is None else f"mode {fmt.mode!r}"
        raise ValueError(
            f"mlxq: experts {name!r}: {name}.global_scale is only used by mode 'nvfp4', but the "
            f"stack is stored in {mode}; refusing to ignore it"
        )
    if info.dtype != "F32" or list(info.shape) != [num_experts]:
        raise ValueError(
            f"mlxq: experts {name!r}: {name}.global_scale must be float32 [{num_experts}] (one "
            f"per expert), got {info.dtype} {list(info.shape)}"
        )
    return True


def _projection(
    plan: MoePlan,
    fmt: ModuleFormat | None,
    in_features: int,
    out_features: int,
    dtype,
    global_scale: bool = False,
) -> nn.Module:
    """The stack in its stored format (float, or packed in any MLX mode), on the meta device."""
    e, bias = plan.num_experts, plan.bias
    if fmt is None:
        return SwitchLinear(e, in_features, out_features, dtype, device="meta", bias=bias)
    return AffineSwitchLinear(
        e,
        in_features,
        out_features,
        fmt.bits,
        fmt.group_size,
        dtype,
        "meta",
        mode=fmt.mode,
        global_scale=global_scale,
        bias=bias,
    )


def replace_moe_module(
    model: nn.Module,
    name: str,
    module: nn.Module,
    plan: MoePlan,
    headers: dict[str, TensorInfo],
    config,
) -> set[str]:
    """Replace `module` by its mlxq form when the checkpoint quantizes it; returns the names of
    the modules now holding quantized tensors (empty when it stays as it is)."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float16)
    if plan.kind == "router":
        fmt = stored_format(name, plan.in_features, plan.out_features, headers, config)
        if fmt is None:
            return set()
        plan.require()
        new = quantized_router(name, module, fmt.bits, fmt.group_size, dtype, "meta", mode=fmt.mode)
        new._mlxq_reads_dtype = plan.reads_dtype  # made float after loading
        model.set_submodule(name, new)
        return {name}
    hidden, inter, e = plan.in_features, plan.out_features, plan.num_experts
    shapes = {
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    quantized = {f"{name}.{p}.scales" in headers for p in plan.projections}
    if not any(quantized) and f"{name}.{plan.float_tensor}" in headers:
        return set()  # transformers' own float layout: nothing for mlxq to do
    plan.require()
    projections = {"gate_proj": None}  # (none without a gate: Nemotron-H)
    for proj in plan.projections:
        k, n = shapes[proj]
        fmt = stored_stack_format(f"{name}.{proj}", e, k, n, headers, config)
        gs = stack_global_scale(f"{name}.{proj}", e, fmt, headers)
        projections[proj] = _projection(plan, fmt, k, n, dtype, gs)
    new = experts_class(plan.variant)(**projections, **experts_gate(module, plan.variant))
    model.set_submodule(name, new)
    return {
        f"{name}.{p}" for p in plan.projections if isinstance(projections[p], AffineSwitchLinear)
    }


def check_moe_tensors_loaded(
    model: nn.Module, skip: Callable[[str], bool], loaded: Collection[str] = ()
) -> None:
    """Every tensor of mlxq's MoE modules came from the checkpoint, except in the modules
    named by `skip` (those the device_map places on the meta device). `loaded`: tensors loaded
    and since offloaded by accelerate (meta, their values in its hooks).

    transformers materializes a missing tensor (it reports it as MISSING and initializes it),
    so a tensor still on the meta device is not the only sign of a name that did not map: the
    loader marks what it loaded with `_is_hf_initialized`, and anything else is refused.
    """
    for name, module in model.named_modules():
        kinds = (AffineSwitchLinear, SwitchLinear, AffineMultiLinear, MultiLinear)
        if (not isinstance(module, kinds) and not hasattr(module, "_mlxq_name")) or skip(name):
            continue
        tensors = dict(module.named_buffers(recurse=False))
        tensors.update(module.named_parameters(recurse=False))
        for leaf, tensor in tensors.items():
            if f"{name}.{leaf}" in loaded:
                continue
            if tensor.device.type == "meta" or not getattr(tensor, "_is_hf_initialized", False):
                raise ValueError(
                    f"mlxq: {name}.{leaf} was not loaded from the checkpoint (its name did not "
                    "map onto the model's)"
                )


def replace_split_kv_b(
    model: nn.Module,
    name: str,
    module: nn.Module,
    headers: dict[str, TensorInfo],
    config,
) -> set[str] | None:
    """DeepSeek V3's `kv_b_proj` stored as mlx-lm's `embed_q`/`unembed_out` (mapped to
    `<name>.embed_q.*`/`<name>.unembed_out.*` by :mod:`.mlx_lm_layout`): replaced by
    :class:`mlxq.mla.SplitKvB`. Returns the quantized parts' names, or None when `module` is
    not such a projection (it is then swap_plan's)."""
    if not isinstance(module, nn.Linear) or f"{name}.unembed_out.weight" not in headers:
        return None
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = cfg.num_attention_heads
    nope, v_dim, rank = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if (module.in_features, module.out_features) != (rank, heads * (nope + v_dim)):
        raise ValueError(
            f"mlxq: {name}: {module.out_features}x{module.in_features} does not match "
            f"kv_lora_rank={rank} and {heads} heads of {nope}+{v_dim} (mlx-lm's embed_q / "
            "unembed_out split)"
        )
    dtype = module.weight.dtype if module.weight.is_floating_point() else torch.float16
    parts, quantized = {}, set()
    for part, (k, n) in {"embed_q": (nope, rank), "unembed_out": (rank, v_dim)}.items():
        fmt = stored_stack_format(f"{name}.{part}", heads, k, n, headers, config)
        if fmt is None:
            parts[part] = MultiLinear(heads, k, n, dtype, "meta")
        else:
            parts[part] = AffineMultiLinear(
                heads, k, n, fmt.bits, fmt.group_size, dtype, "meta", mode=fmt.mode
            )
            quantized.add(f"{name}.{part}")
    model.set_submodule(name, SplitKvB(heads, rank, nope, v_dim, **parts))
    return quantized


def drop_fused_expert_converters(model: nn.Module, experts: set[str], routers: set[str]) -> None:
    """Forget transformers' converters and renamings between its checkpoints' expert tensors and
    the fused experts parameters (`experts.*.down_proj.weight` <-> `experts.down_proj`,
    GraniteMoE's `output_linear.weight` <-> `experts.down_proj`) of the experts modules
    `experts` that mlxq replaced by :class:`mlxq.moe.MoeExperts` after loading, and those onto
    the weight of the quantized `routers` (GraniteMoE's `router.layer.weight` <->
    `router.weight`): saving would otherwise reverse them on mlxq's tensors (split a stack, or
    rename a router's `weight` but not its `scales`); mlx-lm's layout renames the whole
    module instead."""

    from transformers.core_model_loading import WeightConverter, WeightRenaming

    if not experts and not routers:
        return
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:  # built from a config: what transformers would revert when saving
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange

        conversions = get_model_conversion_mapping(model, add_legacy=False)
        conversions = [c for c in conversions if not isinstance(c, PrefixChange)]
    model._weight_conversions = [
        c
        for c in conversions
        if not (
            isinstance(c, (WeightConverter, WeightRenaming))
            and converts_replaced_tensors(c, experts, routers)
        )
    ]


def converts_replaced_tensors(
    conversion, experts: set[str], routers: set[str] = frozenset()
) -> bool:
    """Whether every target of `conversion` (a transformers WeightConverter or WeightRenaming)
    is a fused experts parameter of one of `experts` (replaced by MoeExperts) or the weight of
    one of the quantized `routers`: mlxq's tensors there must not go through it."""
    import re

    params = ("gate_up_proj", "up_proj", "down_proj")  # (up_proj: Nemotron-H's, no gate)
    fused = [f"{name}.{param}" for name in experts for param in params]
    fused += [f"{name}.weight" for name in routers]

    def replaced(pattern: str) -> bool:
        # (a pattern may come regex-escaped already: Kimi Linear's `\.experts.down_proj`)
        pattern = re.sub(r"\\(.)", r"\1", pattern)
        regex = re.compile(re.escape(pattern).replace(r"\*", r"\d+") + "$")
        return any(regex.search(key) for key in fused)

    return all(map(replaced, conversion._original_target_patterns))
