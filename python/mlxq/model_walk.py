"""One walk over a model: which modules mlxq may replace, in which format, and the output head.

Every place that goes through a model's modules (loading an MLX checkpoint, quantizing a float
model while it loads or after, mlx-lm's mixed recipes, `mlxq inspect`) calls
:func:`plan_modules`, so that they agree on

- which modules are candidates: MoE experts and routers first (:func:`mlxq.swap.moe_plan`),
  then linear and embedding layers (:func:`mlxq.swap.swap_plan`), in `named_modules` order;
- the format of each linear/embedding layer, from a callback (the checkpoint's tensors, or a
  quantization config);
- the head decision (:func:`head_decision`): an output head tied to the input embedding has
  no tensors of its own in an MLX checkpoint; it follows the embedding (a
  :class:`~mlxq.nn.TiedAffineHead` when the embedding is quantized).

This module sits beside :mod:`mlxq.swap` (nn layer): it imports no transformers code and
nothing from the integration layer.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace

from torch import nn

from mlxq.format import (
    MODE_DEFAULTS,
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    ModuleFormat,
    configured_format,
    fits,
)
from mlxq.nn import AffineEmbedding, TiedAffineHead
from mlxq.swap import MoePlan, SwapPlan, WeightRead, moe_plan, swap_plan, weight_reads

__all__ = [
    "HeadDecision",
    "PlannedModule",
    "ModelPlan",
    "config_ties",
    "head_decision",
    "plan_modules",
    "plan_quantization",
    "mlx_lm_float_modules",
    "mlx_lm_model_entries",
    "tie_head",
]


@dataclass(frozen=True)
class HeadDecision:
    """The model's output head and input embedding (module names, None where it has none), and
    whether the head is tied: it shares the embedding's weight and has no tensors of its own."""

    head: str | None = None
    embedding: str | None = None
    tied: bool = False


@dataclass
class PlannedModule:
    """One module mlxq may replace: its swap plan (linear/embedding) or MoE plan, and for a
    linear/embedding layer the format it is (to be) stored in (None: float), or the error the
    format callback raised for it."""

    name: str
    module: nn.Module
    swap: SwapPlan | None = None
    moe: MoePlan | None = None
    format: ModuleFormat | None = None
    error: Exception | None = None
    # fused MoE experts being quantized: projection (gate_proj/up_proj/down_proj) -> format
    # (None: that stack stays float), as mlx-lm's switch_mlp stores each projection
    parts: dict[str, ModuleFormat | None] = field(default_factory=dict)

    def require_format(self) -> ModuleFormat | None:
        """The format, or the error it could not be read with."""
        if self.error is not None:
            raise self.error
        return self.format


@dataclass
class ModelPlan:
    """The result of :func:`plan_modules`: the candidate modules (the tied head excluded) and
    the head decision."""

    modules: list[PlannedModule] = field(default_factory=list)
    head: HeadDecision = field(default_factory=HeadDecision)

    def formats(self) -> dict[str, ModuleFormat]:
        """Module name -> format of every linear/embedding layer that is quantized."""
        return {m.name: m.format for m in self.modules if m.format is not None}


def _name_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((name for name, module in model.named_modules() if module is target), None)


def config_ties(model: nn.Module) -> bool:
    """`tie_word_embeddings` of the model's (text) config."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))


def head_decision(model: nn.Module, stored: Collection[str] | None = None) -> HeadDecision:
    """Whether `model`'s output head is tied to its input embedding, and their names.

    The head is tied when it shares the embedding's weight (as transformers ties them, also
    on the meta device), or, before the weights are loaded, when the config says
    `tie_word_embeddings`. With `stored` (the checkpoint's tensor names, under the model's
    names), a head whose weight the checkpoint holds is not tied: it loads its own tensors.
    """
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    decision = HeadDecision(_name_of(model, head), _name_of(model, embedding))
    if decision.head is None or decision.embedding is None:
        return decision
    head_w, emb_w = getattr(head, "weight", None), getattr(embedding, "weight", None)
    if head_w is None or emb_w is None:
        return decision
    if head_w is not emb_w and not (head_w.device.type == "meta" and config_ties(model)):
        return decision
    if stored is not None and f"{decision.head}.weight" in stored:
        return decision
    return HeadDecision(decision.head, decision.embedding, tied=True)


def tie_head(model: nn.Module, head: HeadDecision) -> bool:
    """Make a tied head a view of the quantized input embedding (:class:`~mlxq.nn.
    TiedAffineHead`, as MLX does); False where the head is not tied or the embedding is float."""
    if not head.tied:
        return False
    embedding = model.get_submodule(head.embedding)
    if not isinstance(embedding, AffineEmbedding):
        return False
    model.set_submodule(head.head, TiedAffineHead(embedding))
    return True


FormatOf = Callable[[str, SwapPlan], "ModuleFormat | None"]


def plan_modules(
    model: nn.Module,
    format_of: FormatOf,
    stored: Collection[str] | None = None,
    collect_errors: bool = False,
) -> ModelPlan:
    """Walk `model` once: each module mlxq may replace, with its format, and the head decision.

    Args:
        model: the model (on the meta device or loaded).
        format_of: ``(name, swap_plan) -> ModuleFormat | None``, the format of a linear or
            embedding layer (None: it stays float); from the checkpoint's headers when loading
            an MLX checkpoint, from the quantization config when quantizing a float model.
        stored: the checkpoint's tensor names (model names), for the head decision.
        collect_errors: keep a ValueError/NotImplementedError of `format_of` in the module's
            `error` (for reports) instead of raising it at once.
    """
    head = head_decision(model, stored)
    plan = ModelPlan(head=head)
    reads = weight_reads(model, every_method=True)
    for name, module in model.named_modules():
        if not name or (head.tied and name == head.head):
            continue
        moe = moe_plan(name, module)
        if moe is not None:
            plan.modules.append(PlannedModule(name, module, moe=moe))
            continue
        swap = swap_plan(name, module)
        if swap is None:
            continue
        entry = PlannedModule(name, module, swap=swap)
        try:
            entry.format = format_of(name, swap)
            if entry.format is not None:
                entry.swap = swap = _with_row_readers(swap, reads.get(name, ()))
                _refuse_weight_reads(name, reads, served=bool(swap.row_readers))
                if head.tied and name == head.embedding and head.head is not None:
                    _refuse_weight_reads(head.head, reads, tied_head=True)
        except (ValueError, NotImplementedError) as error:
            if not collect_errors:
                raise
            entry.error = error
        plan.modules.append(entry)
    return plan


def _with_row_readers(swap: SwapPlan, reads: Collection[WeightRead]) -> SwapPlan:
    """`swap` with the methods its quantized embedding serves rows to, where the model's
    forward reads single rows of its table (Gemma 4's `embed_tokens.weight[pad_token_id, :]`)
    and nothing else of it but its dtype: every method of the model reading its weight gets
    the rows (:class:`mlxq.nn.WeightRows`), which raise for any other use (Gemma 4's reverse
    lookup of `inputs_embeds` in the whole table). Unchanged otherwise."""
    forward = [r for r in reads if r.in_forward and not r.dtype_only]
    if swap.kind != "embedding" or not forward or not all(r.row for r in forward):
        return swap
    readers = {r.code: r.reader for r in reads if r.code is not None}
    return replace(swap, row_readers=tuple(readers.items()))


def _refuse_weight_reads(
    name: str,
    reads: Mapping[str, list[WeightRead]],
    tied_head: bool = False,
    served: bool = False,
) -> None:
    """A NotImplementedError when model code around `name` reads its `.weight` itself (a
    quantized module's `weight` holds packed uint32 words) in its forward, other than for its
    dtype, which the loader serves by running the layer in float, or for single rows of an
    embedding that `served` them; a tied head, a view of the embedding, has no weight to
    serve at all."""
    bad = [
        r.reader
        for r in reads.get(name, ())
        if r.in_forward and (tied_head or not (r.dtype_only or (served and r.row)))
    ]
    if bad:
        raise NotImplementedError(
            f"mlxq: module {name!r} is quantized in the checkpoint"
            f"{' (as the embedding it is tied to)' if tied_head else ''}, but "
            f"{', '.join(bad)} reads its .weight directly (not through the module's forward), "
            "which a quantized module cannot serve (its weight holds packed uint32 words); "
            "mlxq refuses the model rather than run another one"
        )


# Per-module entries mlx-lm's model classes add through their own `quant_predicate` when
# `mlx_lm convert` is given no recipe: model_type -> (name suffix, entry). Qwen3-MoE and gpt-oss
# keep their routers at 8 bits, group 64 (mlx_lm/models/qwen3_moe.py, gpt_oss.py); the entry
# has no mode, so the router stays affine in a float-mode (mxfp4) conversion too.
_QWEN3_5_MOE_GATES = tuple(
    (suffix, {"group_size": 64, "bits": 8}) for suffix in ("mlp.gate", "shared_expert_gate")
)
_EIGHT = {"group_size": 64, "bits": 8}
# keys are read on mlx-lm's module names (what its predicate sees): a name suffix, `*` and a
# substring, `=` and the whole name, or `^` and a prefix
_MLX_LM_MODEL_ENTRIES: dict[str, tuple[tuple[str, dict | bool], ...]] = {
    "qwen3_moe": (("mlp.gate", _EIGHT),),
    "gpt_oss": (("mlp.router", _EIGHT),),
    # Qwen 3.5 MoE inherits Qwen 3.5's predicate (mlx_lm/models/qwen3_5.py, which mlx-vlm's
    # conversion asks too): with experts, the router and the shared expert's gate at 8 bits
    "qwen3_5_moe": _QWEN3_5_MOE_GATES,
    "qwen3_5_moe_text": _QWEN3_5_MOE_GATES,
    "qwen3_next": _QWEN3_5_MOE_GATES,
    "kimi_linear": (("mlp.gate", _EIGHT),),
    "mellum": (("mlp.gate", _EIGHT),),
    "jamba": (("router", _EIGHT),),
    "lfm2_moe": (("feed_forward.gate", _EIGHT),),
    "minimax": (("block_sparse_moe.gate", _EIGHT),),
    "minimax_m2": (("block_sparse_moe.gate", _EIGHT),),  # (mlx-lm runs it as minimax)
    "afmoe": (("*router.gate", _EIGHT),),
    "longcat_flash": (("classifier", _EIGHT),),
    "bailing_moe": (("mlp.gate.gate_proj", _EIGHT),),
    # Granite: o_proj, down_proj and the head at 8 bits (low-bit float modes underflow there)
    "granite": tuple((k, _EIGHT) for k in ("self_attn.o_proj", "mlp.down_proj", "=lm_head")),
    "granitemoe": tuple(
        (k, _EIGHT)
        for k in ("block_sparse_moe.router.layer", "self_attn.o_proj", "mlp.down_proj", "=lm_head")
    ),
    # Granite 4.0 (H): the router's `layer` only where there are experts (the router exists
    # only then)
    "granitemoehybrid": (("block_sparse_moe.router.layer", _EIGHT),),
    "gemma4_text": (("router.proj", _EIGHT),),
}

# routers mlx-lm's model holds in no linear layer (a MoEGate / TopkRouter with a bare `weight`
# parameter, mlx_lm/models/<type>.py, mlx-lm 0.32): `mlx_lm convert` leaves them float with no
# entry, with or without a recipe. model_type -> module name suffixes.
_MLX_LM_FLOAT_MODULES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        "deepseek_v2 deepseek_v3 deepseek_v32 dots1 exaone_moe glm4_moe glm4_moe_lite "
        "glm_moe_dsa mimo_v2_flash solar_open".split(),
        ("mlp.gate",),
    ),
    "nemotron_h": ("mixer.gate",),
    "glm4v_moe": ("mlp.gate",),  # (mlx-vlm's GLM-4.5V: a MoEGate too)
    "kimi_k25": ("mlp.gate",),  # (mlx-vlm's Kimi K2.5: DeepSeek V3's language model)
}


def mlx_lm_float_modules(model: nn.Module) -> list[str]:
    """The routers of `model` that mlx-lm's model holds in no quantizable layer (float in every
    `mlx_lm convert`, without an entry)."""
    config = getattr(model, "config", None)
    suffixes = _MLX_LM_FLOAT_MODULES.get(getattr(config, "model_type", None) or "", ())
    if not suffixes:
        return []
    return [
        m.name
        for m in plan_modules(model, lambda name, plan: None).modules
        if m.moe is not None and m.moe.kind == "router" and m.name.endswith(suffixes)
    ]


# image-text models are saved as `mlx_vlm convert` writes them, so mlx-vlm's model class's
# rule applies (mlx_vlm/models/<type>/<type>.py `quant_predicate`, mlx-vlm 0.7.10), given as
# (name suffix, or `*` and a substring of the name; entry); False keeps the module float with
# no entry, as the predicate's False does. qwen3_vl_moe: mlx-vlm's Model has no predicate (its
# language model's 8-bit router rule is never asked), so its routers take the top-level format.
_MLX_VLM_MODEL_ENTRIES: dict[str, tuple[tuple[str, dict | bool], ...]] = {
    "gemma4": (("*router", {"group_size": 64, "bits": 8}),),  # `"router" in path`
    "mistral3": (("lm_head", False),),  # the head stays float
    "qwen3_vl_moe": (),
    "qwen3_5": (),  # no experts: no predicate
    "qwen3_5_moe": _QWEN3_5_MOE_GATES,
}


# model types whose mlx-lm class has a `quant_predicate` mlxq does not reproduce (mlx-lm 0.32,
# mlx_lm/models/<type>.py): quantizing them without explicit entries is refused
_MLX_LM_PREDICATES_NOT_REPRODUCED = frozenset(
    "Klear bailing_hybrid bailing_moe_linear gemma4 laguna "
    "longcat_flash_ngram muse_spark qwen3_5 "
    "rwkv7 spark2_5 step3p5".split()
)


# image-text model types whose mlx-vlm class has a `quant_predicate` mlxq does not reproduce
# (mlx-vlm 0.7.10): quantizing them without explicit entries is refused, with what the rule does
_MLX_VLM_PREDICATES_NOT_REPRODUCED = {
    "qwen4_exp": (
        "mlx_vlm/models/qwen4_exp/language.py: the routers and shared-expert gates at 8 bits, "
        "and each shard of the n-gram embeddings at group 32 where the top-level group does "
        "not divide its rows (fallback_group_size), one entry per shard"
    ),
}

# model types mlx-lm runs with another type's module (mlx_lm.utils.MODEL_REMAPPING)
_MLX_LM_MODULE = {"minimax_m2": "minimax"}

# image-text model types whose mlx-vlm model asks its language model's `quant_predicate` (and
# keeps its own modules out by name, which modules_to_not_convert says here): the entries are
# those of text_config's model type (MiniCPM-V 4.7 on Qwen 3.5 MoE: its 8-bit gates)
_TEXT_MODEL_PREDICATE = frozenset({"minicpmv4_6", "minicpmv4_7"})
# ...whose own predicate keeps these float before asking the language model's (MiniCPM-V's
# "sensitive" modules: the embedding, the head, Qwen 3.5's linear attention)
_IMAGE_TEXT_FLOAT = (
    *(("^" + top, False) for top in ("vit_merger", "merger")),  # mlx-vlm's top-level mergers
    *((f"*{part}", False) for part in ("linear_attn", "embed_tokens", "lm_head")),
)


def mlx_lm_model_entries(
    model: nn.Module,
    top: ModuleFormat,
    mlx_names: Callable[[list[str]], Mapping[str, str]] | None = None,
) -> dict[str, dict | bool]:
    """The per-module entries mlx-lm's own model class would write for `model` (its
    `quant_predicate`; mlx-vlm's for an image-text model), for the modules that would be
    quantized (width a multiple of the top group size, as mlx-lm checks before asking the
    predicate). An entry False keeps its module float (the predicate's False: mlx-lm writes no
    entry for it). `mlx_names` gives mlx-lm's (or mlx-vlm's) names of the model's modules, on
    which the rules are read (default: the model's own). The entries are keyed by the model's
    names. Raises NotImplementedError for a model type whose predicate mlxq does not
    reproduce."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    # (mlx-vlm writes an empty vision_config for the text models it converts)
    image_text = getattr(config, "vision_config", None) not in (None, {})
    if image_text and model_type in _MLX_VLM_PREDICATES_NOT_REPRODUCED:
        raise NotImplementedError(
            f"mlxq: mlx_vlm convert quantizes model type {model_type!r} by its own per-module "
            f"rule ({_MLX_VLM_PREDICATES_NOT_REPRODUCED[model_type]}), which mlxq does not "
            "reproduce yet; give the per-module formats yourself (quantize_model(..., "
            "overrides={...}), {} for the top-level format everywhere)"
        )
    if image_text and model_type in _MLX_VLM_MODEL_ENTRIES:
        rules = _MLX_VLM_MODEL_ENTRIES[model_type]
    elif model_type in _MLX_LM_PREDICATES_NOT_REPRODUCED:
        raise NotImplementedError(
            f"mlxq: mlx_lm convert quantizes model type {model_type!r} by its own per-module "
            f"rule (quant_predicate in mlx_lm/models/{_MLX_LM_MODULE.get(model_type, model_type)}"
            ".py), which mlxq does not "
            "reproduce yet; give the per-module formats yourself (quantize_model(..., "
            "overrides={...}), {} for the top-level format everywhere)"
        )
    else:
        own: tuple = ()
        if model_type in _TEXT_MODEL_PREDICATE:
            model_type = getattr(getattr(config, "text_config", None), "model_type", None)
            own = _IMAGE_TEXT_FLOAT  # last: its False wins over the language model's entries
        rules = (*_MLX_LM_MODEL_ENTRIES.get(model_type, ()), *own)
    if not rules:
        return {}
    planned: list[tuple[str, int]] = []  # (name, input width); experts: each stack
    for m in plan_modules(model, lambda name, plan: None).modules:
        if m.moe is not None and m.moe.kind == "experts":
            widths = {"down_proj": m.moe.out_features}
            planned += [
                (f"{m.name}.{p}", widths.get(p, m.moe.in_features)) for p in m.moe.projections
            ]
        else:
            planned.append((m.name, m.swap.in_features if m.swap else m.moe.in_features))
    names = dict(mlx_names([name for name, _ in planned])) if mlx_names is not None else {}
    entries: dict[str, dict | bool] = {}
    for name, width in planned:
        path = names.get(name, name)
        for key, value in rules:
            if key[0] == "*":
                hit = key[1:] in path
            elif key[0] == "=":
                hit = path == key[1:]
            elif key[0] == "^":
                hit = path.startswith(key[1:])
            else:
                hit = path.endswith(key)
            if hit and width % top.group_size == 0:
                entries[name] = dict(value) if isinstance(value, dict) else value
    return entries


_FALCON_H1_MULTIPLIERS = (
    "embedding_multiplier lm_head_multiplier attention_in_multiplier attention_out_multiplier "
    "key_multiplier ssm_in_multiplier ssm_out_multiplier mlp_multipliers ssm_multipliers".split()
)


def _folded_multipliers(config) -> list[str]:
    """Falcon-H1's multipliers other than 1 (mlx-lm folds those into the weights)."""
    if getattr(config, "model_type", None) != "falcon_h1":
        return []
    out = []
    for key in _FALCON_H1_MULTIPLIERS:
        value = getattr(config, key, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v is not None and float(v) != 1.0 for v in values):
            out.append(key)
    return out


def plan_quantization(
    model: nn.Module,
    top: ModuleFormat,
    overrides: Mapping[str, dict | bool] | None = None,
    skip: list[str] | tuple[str, ...] = (),
) -> ModelPlan:
    """The walk for quantizing a float model (after loading or while it loads): each
    linear/embedding layer gets the format the config gives it (:func:`mlxq.format.
    configured_format`), or stays float where its width does not fit that format (as in
    mlx-lm). A MoE router gets a `format` like a linear layer; fused MoE experts get one format
    per projection in `parts` (names `<experts>.gate_proj` ... for per-module entries).
    """
    overrides = overrides or {}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    folded = _folded_multipliers(getattr(model, "config", None))
    if folded:
        raise NotImplementedError(
            f"mlxq: model type {model_type!r} with muP multipliers ({', '.join(folded)}): "
            "mlx_lm convert folds them into the weights (its falcon_h1 sanitize) and its model "
            "no longer applies them, while transformers' model applies them in its forward; "
            "mlxq does not fold them, so it refuses to write a checkpoint mlx-lm would misread"
        )
    # refused before any weight is read or quantized (as mx.quantize refuses them); before,
    # an affine group of 16 or mxfp4 at 8 bits failed at the first layer built, mid-load
    if top.mode == "affine" and top.bits not in SUPPORTED_BITS:
        raise ValueError(f"mlxq: bits={top.bits} is not one of {SUPPORTED_BITS}")
    if top.mode == "affine" and top.group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"mlxq: group_size={top.group_size} is not one of {SUPPORTED_GROUP_SIZES} for "
            "mode 'affine'"
        )
    if top.mode != "affine" and (top.group_size, top.bits) != MODE_DEFAULTS.get(top.mode):
        want = MODE_DEFAULTS.get(top.mode)
        raise ValueError(
            f"mlxq: mode {top.mode!r} needs "
            + (f"group_size={want[0]} and bits={want[1]}" if want else "a known mode")
            + f", got group_size={top.group_size} and bits={top.bits}"
        )

    def format_of(name: str, swap: SwapPlan) -> ModuleFormat | None:
        fmt = configured_format(name, top, overrides, skip)
        return fmt if fmt is not None and fits(swap.in_features, fmt) else None

    plan = plan_modules(model, format_of)
    for entry in plan.modules:
        moe = entry.moe
        if moe is None:
            continue
        if moe.kind == "router":
            fmt = configured_format(entry.name, top, overrides, skip)
            if fmt is not None and fits(moe.in_features, fmt):
                moe.require()
                if moe.casts_float32 and entry.name not in overrides:
                    raise NotImplementedError(
                        f"mlxq: router {entry.name!r} ({moe.cls_name}) is float in mlx-lm's "
                        "model for most architectures with this router (no linear layer "
                        "there): keep it float (modules_to_not_convert), or give it a "
                        "per-module entry to quantize it"
                    )
                if moe.reads_dtype:
                    raise NotImplementedError(
                        f"mlxq: router {entry.name!r} ({moe.cls_name}) reads self.weight.dtype "
                        "in its forward: mlxq runs it quantized when loading an MLX checkpoint "
                        "but does not quantize it; keep it float (modules_to_not_convert)"
                    )
                entry.format = fmt
            continue
        # experts: gate/up read the hidden size, down the intermediate size (as in mlx-lm,
        # each stack is quantized when its own input width fits the format)
        widths = {
            "gate_proj": moe.in_features,
            "up_proj": moe.in_features,
            "down_proj": moe.out_features,
        }
        for proj in moe.projections:
            width = widths[proj]
            fmt = configured_format(f"{entry.name}.{proj}", top, overrides, skip)
            entry.parts[proj] = fmt if fmt is not None and fits(width, fmt) else None
        if any(entry.parts.values()):
            moe.require()
    return plan
