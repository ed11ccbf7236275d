"""`MLXHfQuantizer`: how transformers builds a model from an MLX checkpoint.

Before the weights load (the model is still on the meta device), every `nn.Linear` and
`nn.Embedding` whose checkpoint tensors are quantized is replaced by :class:`mlxq.nn.AffineLinear`
or :class:`mlxq.nn.AffineEmbedding`, with buffers of exactly the checkpoint's shapes; transformers
then copies the MLX tensors in unchanged. Which modules are quantized, and how, is read from the
safetensors headers first and the config second: mlx-lm leaves modules in float without saying
so (a K not divisible by the group size), so the config alone is not enough.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from mlxq._pickling import made_class
from mlxq.dequantize_model import float_where_weight_dtype_is_read
from mlxq.format import stored_format
from mlxq.integrations.checkpoint import TensorInfo, read_headers, written_by_mlx
from mlxq.integrations.config import MLXQuantConfig, config_and_text_config
from mlxq.integrations.forwards import use_mlxq_forwards
from mlxq.integrations.mlx_lm_layout import (
    MLX_LM_CAST_KEEP,
    MLX_LM_KEEPS_STORED_HEAD,
    MLX_LM_LAYER_TYPE_NAMES,
    MLX_LM_UNCHECKED,
    MLX_LM_UNUSED_MODULES,
    MlxLayout,
    checkpoint_layout,
    fill_dropped_tensors,
    ignore_dropped_on_save,
    llama4_with_experts,
    mlx_lm_config_keys,
    mlx_lm_outer_model_type,
    run_folded_multipliers,
    save_llama4_as_mlx_lm,
    use_mlx_lm_layout,
)
from mlxq.integrations.mlx_vlm_layout import (
    MLX_VLM_CAST_KEEP,
    VLM_LAYOUTS,
    VlmLayout,
    channels_last_conversions,
    checkpoint_vlm_layout,
    has_vision_tower,
    is_image_text,
    looks_like_mlx_vlm,
    mlx_vlm_config_keys,
    takes_flat_text_keys,
    unmapped_vlm_note,
    use_in_proj_attention,
    use_mlx_vlm_layout,
)
from mlxq.integrations.model_class import language_model_only_refusal, text_model_class
from mlxq.integrations.moe_config import check_expert_counts
from mlxq.integrations.moe_loading import (
    check_moe_tensors_loaded,
    converts_replaced_tensors,
    replace_moe_module,
    replace_split_kv_b,
)
from mlxq.integrations.offload import is_offloaded, offloaded_tensors
from mlxq.integrations.quantize_on_load import QuantizeOnLoad, plan_on_load
from mlxq.integrations.weight_ops import (
    cast_on_save_converters,
    convert_cast_dtype,
    join_casts,
    save_as_convert,
    save_as_read,
)
from mlxq.model_walk import (
    HeadDecision,
    config_ties,
    plan_modules,
    tie_head,
)
from mlxq.moe import AffineSwitchLinear, MoeExperts, float_dtype_for_routers
from mlxq.nn import (
    AffineEmbedding,
    AffineLinear,
    TiedAffineHead,
)

logger = logging.getLogger("mlxq")

__all__ = [
    "MLXHfQuantizer",
    "stored_format",
    "check_all_quantized_tensors_used",
    "add_unused_modules",
    "refuse_tied_head_tensors",
    "check_finite",
    "check_float_parameters_finite",
    "check_nothing_missing",
    "check_nothing_unexpected",
    "outside_the_base_model",
    "quantized_weight_count",
    "check_no_mismatched_shapes",
    "unexpected_tensors",
    "missing_tensors",
    "missing_message",
    "tie_quantized_head",
    "drop_tied_keys",
    "add_mlx_lm_config_keys",
]

_PLACEMENT_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_finite(name: str, tensor: torch.Tensor, mode: str = "affine") -> None:
    """Refuse NaN or Inf in scales/biases: the layer would compute garbage without a word.

    The floating-point modes store scales as bytes, which `isfinite` cannot see through: an
    E8M0 byte (mxfp4, mxfp8) of 0xFF is 2^128, Inf in fp32 (NaN in the OCP spec), and the E4M3
    bytes (nvfp4) 0x7F and 0xFF are NaN, in MLX and in mlxq's kernels alike."""
    if tensor.dtype == torch.uint8 and mode != "affine":
        bad = (tensor & 0x7F) == 0x7F if mode == "nvfp4" else tensor == 0xFF
        what = f"{mode} scale bytes that decode to NaN or Inf"
    else:
        bad = ~torch.isfinite(tensor)
        what = "NaN or Inf"
    if bool(bad.any()):
        where = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(
            f"mlxq: {name} has {int(bad.sum())} non-finite values ({what}), e.g. at index "
            f"{where}: the checkpoint is corrupt"
        )


def check_float_parameters_finite(
    model: nn.Module, offloaded: dict[str, Callable[[], torch.Tensor]] | None = None
) -> None:
    """Refuse NaN or Inf in the float parameters read from an MLX checkpoint (norms, float
    layers, biases): as in scales, one such value makes every logit NaN without a word (mlx-lm
    runs them too). Parameters only: buffers may hold -inf on purpose (attention masks).
    `offloaded`: accelerate's offloaded tensors (meta in the model), read one at a time."""
    offloaded = offloaded or {}
    for name, param in model.named_parameters():
        if param.device.type == "meta" and name in offloaded:
            param = offloaded[name]()
        if param.is_floating_point() and param.device.type != "meta":
            check_finite(name, param.detach())


def check_nothing_missing(
    model: nn.Module,
    offloaded: Iterable[str] = (),
    new_head: Callable[[str], bool] | None = None,
) -> None:
    """Every parameter and persistent buffer must have come from the checkpoint.

    transformers marks what it loaded (and tied weights) with `_is_hf_initialized` and fills
    anything else with random values, saying so only in its load report; a quantized model
    with a random layer generates garbage, so a missing tensor is an error naming it.
    `offloaded`: the names of loaded tensors that accelerate's offload made meta since (their
    values in its hooks, without the mark). `new_head`: the test of a key that may be missing
    (:func:`outside_the_base_model`: another task's head, new).
    """
    loaded = {
        key
        for key, tensor in model.state_dict(keep_vars=True).items()
        if getattr(tensor, "_is_hf_initialized", False)
    }
    loaded.update(offloaded)
    missing = [k for k in missing_tensors(model, loaded) if new_head is None or not new_head(k)]
    if missing:
        raise ValueError(f"mlxq: {missing_message(missing)}")


def refuse_offloaded_tied_embedding(model: nn.Module) -> None:
    """Refuse a tied head (:class:`mlxq.nn.TiedAffineHead`) whose quantized embedding accelerate
    offloads: the head reads the embedding's tensors without the embedding's forward, whose
    hook alone loads them (they are meta in between)."""
    for name, module in model.named_modules():
        embedding = getattr(module, "_embedding", None)
        if isinstance(module, TiedAffineHead) and is_offloaded(embedding):
            where = _module_name(model, embedding) or "the embedding"
            raise NotImplementedError(
                f"mlxq: the device_map offloads {where}, whose quantized tensors the tied head "
                f"{name!r} reads too (as MLX ties them): accelerate loads them only for the "
                f"embedding's own forward. Keep {where} on the execution device (device_map "
                "entry, or more max_memory there)"
            )


def refuse_offloaded_dtype_routers(model: nn.Module) -> None:
    """Refuse offloading a quantized router whose forward reads `self.weight.dtype` (MiniMax-M2;
    :func:`mlxq.moe.float_dtype_for_routers`): that dtype is the float one its forward computes
    in, and accelerate, which casts each tensor it loads back to it, would cast the packed
    integers."""
    for name, module in model.named_modules():
        if getattr(module, "_mlxq_reads_dtype", False) and is_offloaded(module):
            raise NotImplementedError(
                f"mlxq: the device_map offloads the quantized router {name!r}, whose forward "
                "reads its weight's dtype (accelerate would cast its packed integers when "
                "loading it): keep its layer on the execution device"
            )


def refuse_offloaded_fills(model: nn.Module, layout: MlxLayout) -> None:
    """Refuse offloading a tensor that mlxq fills after loading (:func:`fill_dropped_tensors`:
    ERNIE 4.5 MoE's router correction bias, which mlx-lm drops): it is meta in the model, and
    accelerate's hook has no value of it to load (the checkpoint has none)."""
    import re

    if not layout.dropped_zeros:
        return
    pattern = re.compile("|".join(layout.dropped_zeros))
    for key in model.state_dict(keep_vars=True):
        if pattern.search(key) and is_offloaded(model.get_submodule(key.rpartition(".")[0])):
            raise NotImplementedError(
                f"mlxq: the device_map offloads {key}, which mlxq fills with zeros after "
                "loading (mlx-lm's checkpoints drop it), so that accelerate has no value of it "
                "to load: keep its layer on the execution device"
            )


def add_unused_modules(model: nn.Module, headers: dict[str, TensorInfo]) -> list[str]:
    """Add the modules the checkpoint holds (`headers`: model names) that the model does not
    build and does not call (:data:`MLX_LM_UNUSED_MODULES`: Gemma 3n's KV-shared layers' key
    and value projections), each a copy of the module of that name in another layer, so that
    their tensors load and are saved back; returns their names."""
    import copy
    import re

    pattern = MLX_LM_UNUSED_MODULES.get(_model_type(model) or "")
    if pattern is None:
        return []
    modules = dict(model.named_modules())
    by_role = {re.sub(r"\.\d+\.", ".N.", name): module for name, module in modules.items()}
    added = []
    for key in headers:
        name, _, leaf = key.rpartition(".")
        parent, _, child = name.rpartition(".")
        if leaf != "weight" or name in modules or not re.search(pattern, name):
            continue
        template = by_role.get(re.sub(r"\.\d+\.", ".N.", name))
        if template is None or parent not in modules:
            continue
        modules[name] = copy.deepcopy(template)
        modules[parent].add_module(child, modules[name])
        added.append(name)
    if added:
        logger.info(
            f"mlxq: {type(model).__name__} holds the checkpoint's {len(added)} modules that its "
            "forward does not call (as mlx-lm holds them), to save them back"
        )
    return added


def unexpected_tensors(model: nn.Module, keys: Iterable[str]) -> list[str]:
    """`keys` (checkpoint tensors the model has no place for) less those transformers itself
    leaves out on purpose, by its own rules (`_keys_to_ignore_on_load_unexpected`, the
    rotary `inv_freq` and `position_ids` buffers of older checkpoints)."""
    from types import SimpleNamespace

    info = SimpleNamespace(missing_keys=set(), unexpected_keys=set(keys))
    adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
    if callable(adjust):
        adjust(info)
    return sorted(info.unexpected_keys)


def check_nothing_unexpected(model: nn.Module, unexpected: Iterable[str]) -> None:
    """Refuse checkpoint tensors the model has no place for: transformers drops them (saying so
    only in its load report), where mlx-lm's strict load refuses them ("parameters not in
    model"); a tensor mlx-lm's model uses and transformers' does not (a bias, a norm the config
    turns off) would change the logits without a word."""
    unexpected = unexpected_tensors(model, unexpected)
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise ValueError(
            f"mlxq: the checkpoint holds {', '.join(unexpected[:5])}{more}, which "
            f"{type(model).__name__} has no place for: transformers would drop "
            f"{'it' if len(unexpected) == 1 else 'them'} and mlx-lm's strict load refuses "
            f"{'it' if len(unexpected) == 1 else 'them'} (does config.json describe this "
            "checkpoint?)"
        )


def say_other_task_head(
    model: nn.Module,
    unexpected: Iterable[str],
    missing: Iterable[str],
    outside: Callable[[str], bool],
) -> None:
    """Warn, naming them, of the checkpoint's tensors a model without its LM head leaves out
    and of the tensors of its own head that the checkpoint lacks (random: transformers' load
    report says so too, unless its logging is silenced)."""
    dropped = sorted(k for k in unexpected if outside(k))
    new = sorted(k for k in missing if outside(k))

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

    said = []
    if dropped:
        said.append(f"leaves out the checkpoint's {listed(dropped)} (a head it does not have)")
    if new:
        said.append(
            f"has {listed(new)}, which the checkpoint lacks: initialised randomly, to be trained "
            "on the downstream task"
        )
    if said:
        logger.warning(f"mlxq: {type(model).__name__} {'; and '.join(said)}")


def check_no_mismatched_shapes(model: nn.Module, mismatched: Iterable[tuple]) -> None:
    """Refuse float tensors stored in another shape than the model's (a norm of the wrong width):
    transformers raises only "look at the above report", a report that a caller who silences its
    logging (`mlxq generate`) never sees; with `ignore_mismatched_sizes=True` it would fill them
    randomly. `mismatched`: transformers' (name, stored shape, model shape) triples."""
    rows = sorted((name, list(stored), list(expected)) for name, stored, expected in mismatched)
    if rows:
        said = "; ".join(f"{n} is stored {s}, the model's is {e}" for n, s, e in rows[:5])
        more = f"; and {len(rows) - 5} more" if len(rows) > 5 else ""
        raise ValueError(
            f"mlxq: the checkpoint's tensors do not fit {type(model).__name__}: {said}{more} "
            "(does config.json describe this checkpoint?)"
        )


def missing_tensors(model: nn.Module, present: set[str]) -> list[str]:
    """State-dict keys of `model` not in `present`, less tied weights and the keys the model
    declares optional (`_keys_to_ignore_on_load_missing`)."""
    import re

    patterns = getattr(model, "_keys_to_ignore_on_load_missing", None) or []
    ignore = re.compile("|".join(f"({p})" for p in patterns)) if patterns else None
    tied: set[str] = set()  # each (sub)model lists its tied keys relative to itself
    for name, sub in model.named_modules():
        keys = getattr(sub, "all_tied_weights_keys", None)
        if isinstance(keys, dict):
            tied.update(f"{name}.{k}" if name else k for k in keys)
    return [
        key
        for key in model.state_dict()
        if key not in present and key not in tied and not (ignore and ignore.search(key))
    ]


def missing_message(missing: list[str]) -> str:
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return (
        f"the checkpoint lacks {', '.join(missing[:5])}{more}; transformers would initialise "
        "them randomly (a corrupt or incomplete checkpoint?)"
    )


def add_mlx_lm_config_keys(config) -> None:
    """Make a saved config.json read the same in mlx-lm: its `quantization` block, and the
    top-level keys mlx-lm reads but transformers 5 keeps only inside `rope_parameters`
    (`rope_theta`, `partial_rotary_factor`, `rope_scaling`, ...: mlx-lm silently falls back to
    defaults otherwise; see :func:`mlxq.integrations.mlx_lm_layout.mlx_lm_config_keys`)."""
    for cfg in config_and_text_config(config):
        if cfg is not config and not takes_flat_text_keys(config):
            continue  # mlx-vlm's config class rejects them there (GLM-OCR)
        # written into __dict__: `rope_scaling` is a property aliasing `rope_parameters` in
        # transformers 5, and to_dict serializes __dict__
        vars(cfg).update(mlx_lm_config_keys(cfg))
    add_mlx_vlm_config_keys(config)
    q = getattr(config, "quantization_config", None)
    if hasattr(q, "mlx_dict"):
        config.quantization = q.mlx_dict()
    names = MLX_LM_LAYER_TYPE_NAMES.get(getattr(config, "model_type", None) or "")
    if names is not None:  # Granite 4.0-H: saved in the layer names mlx-lm reads
        config.__class__ = _with_layer_type_names(type(config), names)
    outer = mlx_lm_outer_model_type(getattr(config, "model_type", None), config)
    if outer is not None:  # Qwen 3.5's text model: saved nested, as mlx_lm convert writes it
        config.__class__ = _nested_for_mlx_lm(type(config), outer)


# keys of a nested config.json that mlx-lm (and transformers' composite config) read at the top
_TOP_LEVEL_KEYS = ("architectures", "dtype", "quantization", "quantization_config",
                   "transformers_version")  # fmt: skip
_NESTED_CONFIGS: dict[tuple[type, str], type] = {}


def _nested_for_mlx_lm(cls: type, outer: str) -> type:
    """A subclass of the text config class `cls` whose config.json (`save_pretrained`) is the
    image-text layout mlx-lm reads: `model_type` `outer`, the text settings in `text_config`,
    the quantization block and `tie_word_embeddings` at the top. In memory it stays `cls`."""
    key = (cls, outer)
    if key not in _NESTED_CONFIGS:

        def to_json_file(self, json_file_path, use_diff: bool = True) -> None:
            text = json.loads(cls.to_json_string(self, use_diff=use_diff))
            text["model_type"] = cls.model_type
            top = {k: text.pop(k) for k in _TOP_LEVEL_KEYS if k in text}
            top.update(model_type=outer, text_config=text)
            if "tie_word_embeddings" in text:
                top["tie_word_embeddings"] = text["tie_word_embeddings"]
            with open(json_file_path, "w", encoding="utf-8") as f:
                f.write(json.dumps(top, indent=2, sort_keys=True) + "\n")

        _NESTED_CONFIGS[key] = made_class(
            cls.__name__, (cls,), {"to_json_file": to_json_file}, _nested_for_mlx_lm, cls, outer
        )
    return _NESTED_CONFIGS[key]


_BUFFER_PLACED: dict[type, type] = {}


def placed_by_buffers(cls: type) -> type:
    """A subclass of the model class `cls` whose `device` and `dtype` are read from its
    buffers where it has no parameters: transformers' read the first parameter (its
    `generate` asks for them), and a model whose every tensor mlxq quantized (nanochat: no
    norm weights) has none. Otherwise it is `cls`."""
    if cls not in _BUFFER_PLACED:

        def tensors(self):
            return itertools.chain(self.parameters(), self.buffers())

        def device(self) -> torch.device:
            return next(tensors(self)).device

        def dtype(self) -> torch.dtype:
            return next(t.dtype for t in tensors(self) if t.is_floating_point())

        namespace = {"device": property(device), "dtype": property(dtype)}
        _BUFFER_PLACED[cls] = made_class(cls.__name__, (cls,), namespace, placed_by_buffers, cls)
    return _BUFFER_PLACED[cls]


def add_mlx_vlm_config_keys(config) -> None:
    """For image-text models: the config.json keys mlx-vlm reads from the Hub layout (text
    settings at the top level for Qwen2-VL/2.5-VL, the vision `model_type` it expects), see
    :func:`mlxq.integrations.mlx_vlm_layout.mlx_vlm_config_keys`."""
    keys = mlx_vlm_config_keys(config)
    # written into __dict__ (to_dict serializes it; properties such as rope_scaling alias
    # rope_parameters in transformers 5)
    vars(config).update(keys["top"])
    for sub, name in (("text_config", "text"), ("vision_config", "vision")):
        sub_config = getattr(config, sub, None)
        if sub_config is None or not keys[name]:
            continue
        values = dict(keys[name])
        model_type = values.pop("model_type", None)
        vars(sub_config).update(values)
        if model_type is not None:
            # to_dict writes the class's model_type: a subclass that names mlx-vlm's (the Hub
            # layout, e.g. "qwen2_5_vl"; transformers reads it back as the same vision config)
            sub_config.__class__ = _with_model_type(type(sub_config), model_type)
    layout = VLM_LAYOUTS.get(getattr(config, "model_type", None) or "")
    text = getattr(config, "text_config", None)
    if layout is not None and layout.text_layer_type_names and text is not None:
        names = dict(layout.text_layer_type_names)  # serialized only; in memory they stay
        text.__class__ = _with_layer_type_names(type(text), names)
    drop = keys.get("vision_drop")
    vision = getattr(config, "vision_config", None)
    if drop and vision is not None:  # keys mlx-vlm's config class rejects (GLM-OCR's rope)
        vision.__class__ = _without_keys(type(vision), tuple(drop))


_RENAMED_CONFIGS: dict[tuple[type, str], type] = {}
_DROPPING_CONFIGS: dict[tuple[type, tuple[str, ...]], type] = {}


def _serializing_through(
    cls: type, edit: Callable[[dict], dict], factory: Callable, *args, **attributes
) -> type:
    """A subclass of the config class `cls` whose `to_dict` and `to_diff_dict` (what
    config.json is written from) pass through `edit`; in memory it reads as `cls` does.
    `factory(*args)` makes it again when a pickled model loads (:func:`made_class`);
    `attributes` go into its namespace."""
    namespace = {
        **attributes,
        "to_dict": lambda self: edit(cls.to_dict(self)),
        "to_diff_dict": lambda self: edit(cls.to_diff_dict(self)),
    }
    return made_class(cls.__name__, (cls,), namespace, factory, *args)


def _without_keys(cls: type, keys: tuple[str, ...]) -> type:
    """A subclass of the config class `cls` that leaves `keys` out of what it serializes
    (the model keeps reading them; a reload falls back to their defaults)."""
    if (cls, keys) not in _DROPPING_CONFIGS:

        def dropped(out: dict) -> dict:
            for key in keys:
                out.pop(key, None)
            return out

        _DROPPING_CONFIGS[(cls, keys)] = _serializing_through(
            cls, dropped, _without_keys, cls, keys
        )
    return _DROPPING_CONFIGS[(cls, keys)]


_LAYER_NAMED_CONFIGS: dict[type, type] = {}


def _with_layer_type_names(cls: type, names: dict[str, str]) -> type:
    """A subclass of the config class `cls` that serializes `layer_types` in mlx-lm's names
    (`names`); in memory (the model, its cache) they stay transformers' own, and transformers
    reads mlx-lm's back as its legacy names."""
    if getattr(cls, "_mlxq_layer_names", None) is not None:
        return cls
    if cls not in _LAYER_NAMED_CONFIGS:

        def renamed(out: dict) -> dict:
            if isinstance(out.get("layer_types"), list):
                out["layer_types"] = [names.get(t, t) for t in out["layer_types"]]
            return out

        _LAYER_NAMED_CONFIGS[cls] = _serializing_through(
            cls, renamed, _with_layer_type_names, cls, names, _mlxq_layer_names=names
        )
    return _LAYER_NAMED_CONFIGS[cls]


_DTYPE_SAVED_CONFIGS: dict[tuple[type, str], type] = {}


def _saving_dtype(cls: type, name: str) -> type:
    """A subclass of the config class `cls` that serializes `dtype` as `name`."""
    key = (cls, name)
    if key not in _DTYPE_SAVED_CONFIGS:

        def named(out: dict) -> dict:
            out["dtype"] = name
            return out

        _DTYPE_SAVED_CONFIGS[key] = _serializing_through(
            cls, named, _saving_dtype, cls, name, _mlxq_dtype_of=cls
        )
    return _DTYPE_SAVED_CONFIGS[key]


def save_dtype_of_most_values(model: nn.Module) -> None:
    """Make `save_pretrained` write config.json's `dtype` as the dtype most of the model's float
    values are in (bfloat16 for bf16 weights beside fp32 norms, as `mlx_lm convert` keeps the
    float checkpoint's `dtype: bfloat16`), not transformers' pick, its first float
    parameter's: after quantization that is a norm's, which a float checkpoint quantized while
    it loads may keep in fp32 (`keep_stored_fp32`), writing "float32"."""
    config = getattr(model, "config", None)
    if config is None:
        return
    sizes: dict[torch.dtype, int] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    cls = getattr(type(config), "_mlxq_dtype_of", type(config))
    most = max(sizes, key=sizes.get) if sizes else None
    if most is None or most == model.dtype:
        config.__class__ = cls  # transformers' own pick is that dtype
        return
    config.__class__ = _saving_dtype(cls, str(most).removeprefix("torch."))


def _with_model_type(cls: type, model_type: str) -> type:
    if getattr(cls, "model_type", None) == model_type:
        return cls
    key = (cls, model_type)
    if key not in _RENAMED_CONFIGS:
        _RENAMED_CONFIGS[key] = made_class(
            cls.__name__, (cls,), {"model_type": model_type}, _with_model_type, cls, model_type
        )
    return _RENAMED_CONFIGS[key]


# the tensors of a linear or embedding layer, renamed with their module (a quantized layer's
# scales and biases follow its weight)
_LAYER_LEAVES = frozenset({"weight", "scales", "biases", "global_scale", "bias"})


def checkpoint_keys_as_model_keys(model: nn.Module, headers: dict[str, TensorInfo]):
    """Rename checkpoint tensor names the way transformers will when loading them.

    Image-text checkpoints (mlx-vlm, older transformers) name tensors `language_model.model.*`
    where transformers 5 modules are `model.language_model.*`; the model's own renamings (and
    the base-model prefix) are applied per module, so `scales`/`biases` follow their `weight`.
    mlx-lm's own names for GPT-2/GPT-J/GPT-NeoX are mapped first (:mod:`.mlx_lm_layout`).
    """
    layout = checkpoint_layout(_model_type(model), headers)
    if layout is not None:  # mlx-lm renamed this architecture's tensors (GPT-2, GPT-NeoX)
        headers = layout.merge_headers({layout.to_transformers(k): v for k, v in headers.items()})
        headers = layout.split_headers(layout.stack_headers(headers))
    vlm_layout = checkpoint_vlm_layout(_model_type(model), headers)
    if vlm_layout is not None:  # mlx-vlm's names for image-text models (and fused parts)
        headers = vlm_layout.concat_headers(
            vlm_layout.split_headers(
                {vlm_layout.to_transformers(k): v for k, v in headers.items()}, model.config
            )
        )
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    except (ImportError, AttributeError, TypeError):  # another transformers: names as they are
        return headers
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    modules: dict[str, str] = {}
    out: dict[str, TensorInfo] = {}
    for key, info in headers.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in _LAYER_LEAVES:  # a tensor of its own (MiMo's attention_sink_bias -> sinks)
            out[rename_source_key(key, renamings, [], prefix, meta)[0]] = info
            continue
        if module not in modules:
            renamed, _ = rename_source_key(f"{module}.weight", renamings, [], prefix, meta)
            modules[module] = _base_prefix_moved(model, renamed.removesuffix(".weight"), prefix)
        out[f"{modules[module]}.{leaf}" if modules[module] else leaf] = info
    return out


def _base_prefix_moved(model: nn.Module, name: str, prefix: str | None) -> str:
    """Module `name` with the base-model prefix stripped or added as transformers will when
    loading: it moves the prefix only where that gives a key the model holds, and the modules
    mlxq replaces before loading (stacked MoE experts) hold none yet. Decided here by the
    top-level module instead: `AutoModel` (the base model) on a causal LM's checkpoint strips
    `model.`, a task model on a base model's checkpoint adds it."""
    if not prefix:
        return name
    children = dict(model.named_children())
    first, _, rest = name.partition(".")
    if first == prefix and prefix not in children and rest.partition(".")[0] in children:
        return rest
    base = children.get(prefix)
    if first not in children and base is not None and hasattr(base, first):
        return f"{prefix}.{name}"
    return name


def _converted_name(model: nn.Module, stored_keys: Iterable[str]) -> Callable[[str], str]:
    """The name a `WeightConverter` sees for the model's tensor `key` (the checkpoint's name
    renamed, before transformers strips the base-model prefix): for the base model itself
    (`AutoModel`) on a checkpoint whose names carry the prefix (a causal LM's: `model.`), `key`
    with it; else `key`. `stored_keys`: the checkpoint's tensor names."""
    prefix = getattr(model, "base_model_prefix", None) or None
    if prefix is None or prefix in dict(model.named_children()):  # (not the base model)
        return lambda key: key
    mark = f"{prefix}."
    if not any(k.startswith(mark) for k in stored_keys):
        return lambda key: key
    return lambda key: key if key.startswith(mark) else mark + key


def outside_the_base_model(model: nn.Module) -> Callable[[str], bool] | None:
    """For a model without a language-modelling head (the base model of `AutoModel`, or one
    with another task's head: `AutoModelForSequenceClassification`, ...), the test of whether
    a tensor (in the model's names) lies outside its base model: the checkpoint's LM head,
    which such a model has no place for, or its own new head, which no causal LM's checkpoint
    holds (transformers initialises it randomly and says so, "newly initialized", as for a
    float checkpoint). Everything of the base model must still load exactly. None for a model
    that generates: the checkpoint's whole model, held to mlx-lm's strict load."""
    can_generate = getattr(model, "can_generate", None)
    if can_generate is None or can_generate():
        return None
    prefix = getattr(model, "base_model_prefix", None) or None
    children = {name for name, _ in model.named_children()}
    if prefix is not None and prefix in children:  # a task model: its base model's tensors
        return lambda key: not key.startswith(f"{prefix}.")
    # the base model itself: a name under the prefix is the base model's, unstripped
    return lambda key: key.partition(".")[0] not in children and key.partition(".")[0] != prefix


def quantized_weight_count(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """The number of weights mlxq's quantized layers of `model` hold packed (buffers, which
    transformers' `num_parameters` does not see): each layer's float weight, `scales` times the
    group size ([..., N, K / group_size] scales for an [..., N, K] weight, in every mode), once
    per layer (a tied head reads its embedding's). `exclude_embeddings`: without the quantized
    embeddings, as transformers leaves out `nn.Embedding` weights."""
    from mlxq._casts import RefusesUnsupportedCasts

    count = 0
    for module in model.modules():
        if not isinstance(module, RefusesUnsupportedCasts):
            continue
        if exclude_embeddings and isinstance(module, AffineEmbedding):
            continue
        scales = module._buffers.get("scales")
        if scales is not None:
            count += scales.numel() * module.group_size
    return count


def float_checkpoint_files(model: nn.Module) -> list[str]:
    """The safetensors files `model` was read from: its `name_or_path` as a folder, or as a Hub
    id already in the local cache (nothing is downloaded); [] for a model built in memory."""
    import os

    source = str(getattr(model, "name_or_path", "") or "")
    if not source:
        return []
    folder = source if os.path.isdir(source) else None
    if folder is None:
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(
                source, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]
            )
        except Exception:  # noqa: BLE001 - not a cached Hub id: as a model built in memory
            return []
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f).get("weight_map", {}).values()))
    else:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    return [os.path.join(folder, n) for n in names]


def read_float_checkpoint(model: nn.Module, files: list[str]) -> tuple[dict, dict] | None:
    """The stored dtypes of a float checkpoint's tensors (keyed by `model`'s state-dict names)
    and its config.json, or None where there are no files (a model built in memory)."""
    found = _safetensors_and_config(files)
    if found is None:
        return None
    files, config = found
    return checkpoint_keys_as_model_keys(model, read_headers(files)), config


def _safetensors_and_config(files: list[str] | None) -> tuple[list[str], dict] | None:
    """The .safetensors among `files` and the config.json beside them ({} where there is
    none), or None where there are no such files (a model built in memory)."""
    import os

    files = [f for f in files or [] if str(f).endswith(".safetensors")]
    if not files:
        return None
    config_file = os.path.join(os.path.dirname(str(files[0])), "config.json")
    if not os.path.isfile(config_file):
        return files, {}
    with open(config_file) as f:
        return files, json.load(f)


def convert_cast_keeps(model: nn.Module) -> tuple[str, ...]:
    """Name markers of the float tensors the converter of `model`'s saved layout leaves in the
    stored dtype (its model class's `cast_predicate`): mlx-vlm's for an image-text model of a
    family saved in mlx-vlm's layout (as :func:`use_mlx_vlm_layout` decides), else mlx-lm's."""
    model_type = _model_type(model) or ""
    if model_type in VLM_LAYOUTS and is_image_text(getattr(model, "config", None)):
        return MLX_VLM_CAST_KEEP.get(model_type, ())
    return MLX_LM_CAST_KEEP.get(model_type, ())


def keep_stored_fp32(model: nn.Module, stored: dict, config: dict | None = None) -> list[str]:
    """Load in fp32 the tensors a float checkpoint stores in fp32 that its converter keeps,
    where transformers would cast them to a bf16 / fp16 model's dtype: their fp32 values are
    then saved as `mlx_lm convert` / `mlx_vlm convert` write them (before: rounded to bf16 at
    load, saved so). Kept: the converter's cast_predicate names (:func:`convert_cast_keeps`;
    Qwen 3.5's `A_log`) always; every tensor stored in fp32 where the converter casts nothing
    (`config`, the checkpoint's config.json, names no `torch_dtype`: :func:`convert_cast_dtype`;
    None where from_pretrained was given a dtype, which casts them all as `--dtype` does;
    fp32 norms beside bf16 linear weights, as transformers 5 saves a bf16 model with fp32
    norms). Adds the markers (exact names for the latter) to `_keep_in_fp32_modules_strict`
    (read after the quantizer's preprocessing); returns them.

    Raises ValueError for a tensor stored in the other 16-bit float type than the model's
    where the converter casts nothing: the model cannot hold it as stored (an fp32 copy would
    quantize otherwise than MLX does on the stored dtype), and for a 16-bit matrix (a weight
    MLX quantizes in its stored dtype) beside a float32 model."""
    import re

    keep = convert_cast_keeps(model)
    markers = {k for k in keep for n, i in stored.items() if k in n and i[0] == "F32"}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if config is not None and convert_cast_dtype(config) is None:
        model._mlxq_as_stored = True  # read by save_as_convert
        markers |= {f"^{re.escape(n)}$" for n, i in stored.items() if i[0] == "F32"}
        other = {torch.bfloat16: "F16", torch.float16: "BF16"}.get(dtype)
        mixed = sorted(n for n, i in stored.items() if i[0] == other)
        if dtype == torch.float32:  # 16-bit matrices, which MLX quantizes in their dtype (the
            # fp32 model would quantize them in fp32); 16-bit vectors are saved as stored
            mixed = sorted(
                n for n, i in stored.items() if i[0] in ("BF16", "F16") and len(i[1]) > 1
            )
        if mixed:
            name = _DTYPE_NAMES[stored[mixed[0]][0]]
            raise ValueError(
                f"mlxq: {', '.join(mixed[:4])}{' ...' if len(mixed) > 4 else ''} stored in "
                f"{name} beside a {str(dtype).removeprefix('torch.')} model, "
                "and config.json names no torch_dtype: mlx_lm convert keeps each tensor's "
                "stored dtype, which one torch model cannot hold; pass a dtype (convert "
                "--dtype) to cast them all"
            )
    if markers:
        strict = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
        model._keep_in_fp32_modules_strict = strict | markers
    return sorted(markers)


def save_float_dtypes_as_convert(model: nn.Module, source: tuple[dict, dict] | None) -> None:
    """`save_pretrained` writes the tensors a quantized model holds in float32 in the dtypes
    `mlx_lm convert -q` / `mlx_vlm convert -q` write: read from the float checkpoint the model
    came from where there is one (`source`: :func:`read_float_checkpoint`; the file's dtype or
    the config's, mlx-lm's cast_predicate kept), else the model's dtype (a model built in
    memory: as if converted from a checkpoint of the model's dtype). The tensors the model's
    cast_predicate keeps (mlx-lm's, or mlx-vlm's for a model saved in its layout:
    :func:`convert_cast_keeps`) keep their stored dtype."""
    keep = convert_cast_keeps(model)
    if source is not None:
        stored, config = source
        save_as_convert(model, stored, convert_cast_dtype(config), keep)
        return
    casts = cast_on_save_converters(model, keep)
    if casts:
        conversions = getattr(model, "_weight_conversions", None)
        if conversions is None:  # built from a config: what transformers would revert
            from transformers.conversion_mapping import get_model_conversion_mapping

            conversions = get_model_conversion_mapping(model, add_legacy=False)
        model._weight_conversions = [*conversions, *join_casts(conversions, casts)]


def _with_model_names(
    model: nn.Module, config: MLXQuantConfig, vlm_layout: VlmLayout | None = None
) -> MLXQuantConfig:
    """`config` with its per-module entries under the model's module names (mlx-vlm names
    them as in its checkpoint, e.g. `language_model.model.layers.0.mlp.down_proj`).

    `vlm_layout` is the layout the checkpoint's tensors were recognised by: the entries alone
    may not show it (a recipe with entries for vision modules only)."""
    if not config.overrides:
        return config
    names = list(config.overrides)
    keys = [f"{name}.weight" for name in names]
    if vlm_layout is not None:
        keys = [vlm_layout.to_transformers(key) for key in keys]
        if vlm_layout.splits:  # an entry for a fused projection applies to each of its parts
            pairs = [
                (n, part)
                for n, k in zip(names, keys, strict=True)
                for part in vlm_layout.split_names(k)
            ]
            names, keys = [n for n, _ in pairs], [k for _, k in pairs]
    renamed = list(checkpoint_keys_as_model_keys(model, dict.fromkeys(keys, TensorInfo("F32", ()))))
    if len(renamed) != len(names):  # two entries for one module: keep the names as they are
        return config
    if renamed == [f"{name}.weight" for name in names]:
        return config
    overrides = {
        new.removesuffix(".weight"): config.overrides[old]
        for old, new in zip(names, renamed, strict=True)
    }
    return MLXQuantConfig(
        bits=config.bits,
        group_size=config.group_size,
        mode=config.mode,
        overrides=overrides,
        modules_to_not_convert=config.modules_to_not_convert,
    )


def _with_overrides(config: MLXQuantConfig, overrides: dict, skip: list | None = None):
    return MLXQuantConfig(
        bits=config.bits,
        group_size=config.group_size,
        mode=config.mode,
        overrides=overrides,
        modules_to_not_convert=config.modules_to_not_convert if skip is None else skip,
    )


def _as_convert_quantizes(model: nn.Module, config: MLXQuantConfig) -> MLXQuantConfig:
    """The config of quantizing a float model while it loads, as `mlx_lm convert -q` /
    `mlx_vlm convert -q` quantize it (the same as :func:`mlxq.quantize_model`): entries under
    the model's module names (an image-text model's may be given in mlx-vlm's names too); with
    no entries, those of the model class's own rule where mlxq reproduces it; an image-text
    model's vision tower, projector and audio tower float unless an entry names them."""
    from mlxq.integrations.mlx_vlm_layout import (
        entries_as_model_names,
        multimodal_modules,
        saved_module_names,
    )
    from mlxq.model_walk import mlx_lm_float_modules, mlx_lm_model_entries

    overrides = entries_as_model_names(model, config.overrides)
    skip = list(config.modules_to_not_convert)
    if not overrides:
        try:
            rule = mlx_lm_model_entries(
                model, config.default_format, lambda names: saved_module_names(model, names)
            )
        except NotImplementedError:  # (quantize_model refuses these; kept as before here)
            rule = {}
        skip += [name for name, entry in rule.items() if entry is False]
        overrides = {name: entry for name, entry in rule.items() if entry is not False}
    skip += [name for name in mlx_lm_float_modules(model) if name not in overrides]
    skip += [name for name in multimodal_modules(model) if name not in overrides]
    if overrides == config.overrides and skip == config.modules_to_not_convert:
        return config
    return _with_overrides(config, overrides, skip)


def _refuse_missing_tensors(
    model: nn.Module, headers: dict[str, TensorInfo], note: str = ""
) -> None:
    """An mlx-vlm checkpoint must fill every tensor of the model: transformers would
    initialise a missing one at random (and only log it)."""
    missing = missing_tensors(model, headers)
    if missing:
        unused = sorted(set(headers) - set(model.state_dict()))
        raise ValueError(
            f"mlxq: {type(model).__name__}: the checkpoint has no tensor for "
            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} ({len(missing)} "
            f"missing; checkpoint tensors without a place: {', '.join(unused[:4]) or 'none'})"
            + (f": {note}" if note else "")
        )


def _refuse_unmapped_vlm(
    model: nn.Module,
    headers: dict[str, TensorInfo],
    stored_keys: list[str],
    mlx_vlm_names: bool,
    files: list | None,
) -> None:
    """An mlx-vlm checkpoint of an image-text family whose layout mlxq does not map is refused
    by name: written by MLX with tensors outside the language model (mlx-vlm's conversion; an
    mlx-lm one keeps the language model only), even when every model tensor would be filled
    (names that coincide with transformers' are no proof that the config keys, convolution
    layouts and norm conventions do); else, with mlx-vlm's names, when a tensor stays unfilled
    (later checks would only see the first unmatched tensor)."""
    note = unmapped_vlm_note(_model_type(model))
    if _model_type(model) not in VLM_LAYOUTS and written_by_mlx(files or []):
        if any(not key.startswith("language_model.") for key in stored_keys):
            raise ValueError(
                f"mlxq: {type(model).__name__}: an image-text checkpoint written by MLX "
                f"(mlx-vlm's conversion): {note}"
            )
    if mlx_vlm_names:
        _refuse_missing_tensors(model, headers, note)


def _read_load_report(model: nn.Module, read: Callable[[Any], None]) -> None:
    """Run `read(loading_info)` on transformers' load report once, after the model's own hook
    that adjusts it (`_adjust_missing_and_unexpected_keys`, called once a load; transformers
    tells quantizers nothing else of the report), the class's hook then back in place."""
    adjust = model._adjust_missing_and_unexpected_keys

    def hook(loading_info) -> None:
        adjust(loading_info)
        del model._adjust_missing_and_unexpected_keys  # the class's method again
        read(loading_info)

    model._adjust_missing_and_unexpected_keys = hook


def check_quantized_on_load_errors(on_load: QuantizeOnLoad) -> None:
    """Refuse the model when a layer failed to quantize while loading, naming it and why."""
    if on_load.errors:
        name, why = sorted(on_load.errors.items())[0]
        more = f" (and {len(on_load.errors) - 1} more layers)" if len(on_load.errors) > 1 else ""
        raise ValueError(f"mlxq: quantizing layer {name!r} while loading failed: {why}{more}")


def check_all_quantized_on_load(on_load: QuantizeOnLoad) -> None:
    """Every layer planned to be quantized while loading got its float weight from the
    checkpoint: transformers fills a tensor the file lacks with uninitialised memory (reported
    as missing in its load report), which would be this layer's packed weights and scales."""
    missing = sorted(set(on_load.layers) - on_load.done - set(on_load.errors))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(
            f"mlxq: the checkpoint holds no float weight for {len(missing)} layers mlxq was to "
            f"quantize while loading ({', '.join(f'{n}.weight' for n in missing[:3])}{more}): "
            "it is not this model class's checkpoint, or names its tensors otherwise"
        )


def check_all_quantized_tensors_used(
    model, headers: dict[str, TensorInfo], used: set[str], skip_absent: bool = False
) -> None:
    """Quantized tensors of modules mlxq cannot replace would load as garbage: refuse them.

    Those of a module the model does not have at all (a config.json with fewer layers than the
    checkpoint) are refused as tensors the model has no place for (a ValueError worded as
    :func:`check_nothing_unexpected`'s), not as a kind of module mlxq cannot run; with
    `skip_absent` they are left to the caller's own check of such tensors (`mlxq inspect`).
    """
    scaled = [k[: -len(".scales")] for k in headers if k.endswith(".scales")]
    absent = [name for name in scaled if name not in used and not _has_submodule(model, name)]
    if absent and not skip_absent:
        # not check_nothing_unexpected itself: before loading, the model's hook that adjusts
        # unexpected keys is the quantizer's recorder of transformers' load report
        prefixes = tuple(f"{name}." for name in absent)
        keys = sorted(k for k in headers if k.startswith(prefixes))
        more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
        raise ValueError(
            f"mlxq: the checkpoint holds {', '.join(keys[:5])}{more}, quantized tensors of "
            f"{', '.join(repr(n) for n in absent[:3])}{' ...' if len(absent) > 3 else ''}, "
            f"which {type(model).__name__} has no module for: transformers would drop them and "
            "mlx-lm's strict load refuses them (does config.json describe this checkpoint?)"
        )
    for name in scaled:
        if name in used or (skip_absent and name in absent):
            continue
        key = f"{name}.scales"
        try:
            kind = type(model.get_submodule(name)).__name__
        except AttributeError:
            kind = "no such module"
        raise NotImplementedError(
            f"mlxq: {key}: module {name!r} ({kind}) of {type(model).__name__} is quantized in the "
            "checkpoint, but mlxq runs quantized nn.Linear and nn.Embedding modules, MoE experts "
            "and routers only"
        )


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def refuse_tied_head_tensors(
    model: nn.Module, headers, head: HeadDecision, stored_names: dict[str, str] | None = None
) -> None:
    """Refuse a checkpoint holding tensors for an output head that config.json ties to the input
    embedding (`tie_word_embeddings: true`), for the model types whose mlx-lm model then has no
    head of its own (all but :data:`MLX_LM_KEEPS_STORED_HEAD`): transformers would load the head
    untied, where mlx-lm ties it (a float head weight is dropped) or refuses it (its strict
    load: "parameters not in model"); either way the two would not run the same model.

    `headers`: the checkpoint's tensor names as the model's names; `stored_names` maps them to
    the names in the files, for the message. Image-text models (mlx-vlm's checkpoints, another
    loader's rules) are left alone."""
    model_type = _model_type(model)
    if (
        head.head is None
        or model_type in MLX_LM_KEEPS_STORED_HEAD
        or is_image_text(getattr(model, "config", None))
        or not config_ties(model)
    ):
        return
    names = stored_names or {}
    stored = sorted(names.get(k, k) for k in headers if k.startswith(f"{head.head}."))
    if stored:
        raise ValueError(
            f"mlxq: config.json sets tie_word_embeddings: true, but the checkpoint also holds "
            f"{', '.join(stored)}: mlx-lm's {model_type} then ties the head to "
            f"{head.embedding} and has no place for these tensors (its strict load refuses "
            "quantized ones, it drops a float weight), while transformers would load them as "
            "an untied head. Set tie_word_embeddings to false to use them, or delete them"
        )


_STORED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def mlx_lm_dtype(files: list[str], config: Any, pre_quantized: bool) -> torch.dtype | None:
    """The dtype to load an MLX checkpoint in when from_pretrained is given none ("auto"),
    as mlx-lm 0.32 runs it, or None to keep transformers' (config.json's `dtype`).

    mlx-lm's `load` casts nothing: each tensor runs in the dtype its file stores, whatever
    config.json says (`mlx_lm convert --dtype float16` leaves its `dtype: bfloat16`), and MLX
    promotes mixed operands. The activations pass every quantized layer (output in its scales'
    dtype) and norm, so those set their dtype: one stored dtype is the model's; several (fp32
    norms beside bf16 scales, from a float checkpoint without `torch_dtype`, whose fp32
    tensors `mlx_lm convert` keeps; DWQ's bf16 and fp16 scales) mean float32, the one dtype
    holding each value as stored. Tensors elsewhere (a router's fp32 bias) are local in mlx-lm.

    A float checkpoint quantized while it loads (`pre_quantized` False) gets the dtype `mlx_lm
    convert -q` writes: config.json's `torch_dtype`, else the dtype most of its float values
    are stored in (mlx-lm then keeps each tensor's: :func:`keep_stored_fp32` keeps fp32 ones)."""
    found = _safetensors_and_config(files)
    if found is None:
        return None
    files, raw = found
    headers = read_headers(files)
    if not pre_quantized:
        cast = convert_cast_dtype(raw)
        if cast is not None:
            return cast
        keep = MLX_LM_CAST_KEEP.get(getattr(config, "model_type", "") or "", ())
        sizes: dict[torch.dtype, int] = {}
        for name, i in headers.items():
            if i.dtype in _STORED_DTYPES and not any(k in name for k in keep):
                dtype = _STORED_DTYPES[i.dtype]
                sizes[dtype] = sizes.get(dtype, 0) + math.prod(i.shape)
        # mixed: the dtype of most values (the linear weights), the others kept as stored
        # (keep_stored_fp32), not transformers' pick (config.json's `dtype`, else the first
        # float tensor's: an fp32 norm would make every bf16 weight quantize in fp32)
        return max(sizes, key=sizes.get) if sizes else None
    stored = {
        _STORED_DTYPES[i.dtype]
        for name, i in headers.items()
        if i.dtype in _STORED_DTYPES
        and (name.endswith((".scales", ".biases")) or "norm" in name.rpartition(".")[0])
    }
    if not stored:
        return None
    return stored.pop() if len(stored) == 1 else torch.float32


# (stored dtype of scales/biases, model dtype) pairs that lose bits when loaded
_ROUNDING = {("F32", torch.float16), ("F32", torch.bfloat16), ("F16", torch.bfloat16)}
_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def warn_if_scales_rounded(model: nn.Module, headers: dict[str, TensorInfo]) -> None:
    """Say so when the affine scales and biases are stored more precisely than the model's
    dtype (mlx-lm runs them as stored): an explicit `dtype=torch.bfloat16` on fp16 scales
    (without `dtype=`, :func:`mlx_lm_dtype` picks one that keeps them).

    `mlx_lm.quant.dwq` stores the layers it trained in bf16 next to untrained (8-bit) ones in
    the model's dtype: with both 16-bit dtypes stored, only float32 holds every value (bf16 to
    fp16 rounds what lies outside fp16's normal range)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    stored = {i.dtype for k, i in headers.items() if k.endswith((".scales", ".biases"))}
    both = {"F16", "BF16"} <= stored
    lossy = sorted(
        s
        for s in stored
        if (s, dtype) in _ROUNDING or (both and (s, dtype) == ("BF16", torch.float16))
    )
    if lossy:
        names = " and ".join(_DTYPE_NAMES[s] for s in sorted(stored if both else lossy))
        keep = "float32" if both else _DTYPE_NAMES[lossy[-1]]
        logger.warning(
            f"mlxq: the checkpoint's scales and biases are {names}; the model loads in "
            f"{str(dtype).removeprefix('torch.')}, which rounds them (mlx-lm runs them as "
            f"stored): pass dtype=torch.{keep} to from_pretrained to keep them"
        )


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def drop_tied_keys(model: nn.Module, module_names: set[str]) -> None:
    """Forget transformers' tying of tensors that quantized modules now own or share."""
    for sub in model.modules():
        keys = getattr(sub, "all_tied_weights_keys", None)
        if not isinstance(keys, dict):
            continue
        prefix = _module_name(model, sub) or ""
        prefix = f"{prefix}." if prefix else ""
        for target, source in list(keys.items()):
            for key in (prefix + target, prefix + source):
                if any(key == n or key.startswith(n + ".") for n in module_names if n):
                    keys.pop(target, None)
                    break


def tie_quantized_head(model: nn.Module, head: HeadDecision) -> str | None:
    """With a tied head (:func:`mlxq.model_walk.head_decision`) and a quantized input
    embedding, make the head use it (as MLX does). Returns the head's name when replaced."""
    if not tie_head(model, head):
        return None
    drop_tied_keys(model, {head.head, head.embedding})
    return head.head


def _has_cuda_kernels() -> bool:
    """Whether this build of mlxq registered CUDA kernels (csrc/cuda/, built only with CUDA)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("mlxq::affine_matmul", "CUDA")


class MLXHfQuantizer(HfQuantizer):
    """Loads MLX affine checkpoints into :mod:`mlxq.nn` modules (quant_method ``"mlx"``).

    With a float checkpoint and an explicit ``quantization_config=MLXQuantConfig(...)``, each
    layer is quantized as its float weight is read (:mod:`.quantize_on_load`; the same tensors
    as :func:`mlxq.quantize_model` makes from the loaded float model).
    """

    requires_calibration = False
    quantization_config: MLXQuantConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        devices = device_map.values() if isinstance(device_map, dict) else [device_map]
        if not self.pre_quantized and "disk" in devices:
            # transformers' disk offload would point a layer's packed weight at the float weight
            # of the file (it re-saves only tensors a WeightConverter made)
            disk = sorted(k for k, v in device_map.items() if v == "disk")
            raise NotImplementedError(
                f"mlxq: quantizing a float checkpoint while loading cannot offload to disk (the "
                f"device_map puts {', '.join(disk[:3])}{' ...' if len(disk) > 3 else ''} there): "
                "quantize it once (mlxq convert, or save_pretrained of the quantized model) and "
                "load that checkpoint with the device_map"
            )
        for device in devices:
            if device is None or device in (*_PLACEMENT_STRATEGIES, "disk"):
                continue
            kind = "cuda" if isinstance(device, int) else torch.device(device).type
            if kind == "cuda" and _has_cuda_kernels():
                continue
            if kind not in ("cpu", "mps", "meta"):
                raise ValueError(
                    f"mlxq: device '{device}' in device_map is not supported (cpu and mps are; "
                    "cuda needs mlxq built with its CUDA backend)"
                )

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """`dtype=` of from_pretrained (or the config's): one the quantized kernels run in."""
        from mlxq._casts import KERNEL_DTYPES

        if dtype is not None and dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"mlxq: an MLX model cannot load in {dtype}: mlxq's quantized kernels run in "
                "float32, float16 or bfloat16 only (load in one, then dequantize_model to cast "
                "a float model)"
            )
        return dtype

    def update_device_map(self, device_map):
        """A placement strategy ("auto", ...) is accelerate's to follow (layers spread over the
        GPUs where mlxq runs on CUDA, the rest offloaded to "cpu" and "disk" as `max_memory`
        plans); on Apple silicon without CUDA it means the one device mlxq runs on, MPS."""
        self._device_map = device_map
        if isinstance(device_map, str) and device_map in _PLACEMENT_STRATEGIES:
            cuda = torch.cuda.is_available() and _has_cuda_kernels()
            if not cuda and torch.backends.mps.is_available():
                return {"": "mps"}
        return device_map

    def adjust_max_memory(self, max_memory: dict[str, int | str]) -> dict[str, int | str]:
        """A placement strategy plans over the CPU (and disk) alone where this build of mlxq has
        no CUDA kernels, GPUs or not (accelerate would place layers there otherwise)."""
        if torch.cuda.is_available() and not _has_cuda_kernels():
            return {k: v for k, v in max_memory.items() if not isinstance(k, int)}
        return max_memory

    def _placed_on_meta(self, name: str) -> bool:
        """Whether the user's device_map puts module `name` on the meta device: its tensors are
        then left unloaded on purpose, as transformers leaves a float model's (for a look at
        the structure and sizes without reading the weights)."""
        device_map = getattr(self, "_device_map", None)
        if not isinstance(device_map, dict):
            device_map = {"": device_map}
        owners = [k for k in device_map if k == "" or name == k or name.startswith(f"{k}.")]
        if not owners:
            return False
        device = device_map[max(owners, key=len)]
        if device is None or isinstance(device, int) or device in _PLACEMENT_STRATEGIES:
            return False
        return device != "disk" and torch.device(device).type == "meta"

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        found = _safetensors_and_config(list(checkpoint_files or []))
        if found is not None:  # a MoE config transformers and mlx-lm read alike, or refused
            check_expert_counts(model, found[1])
        if not self.pre_quantized:  # a float checkpoint: quantized tensor by tensor as it loads
            # the stored dtypes, saved as mlx_lm convert writes them (save_float_dtypes_as_convert)
            self._float_source = read_float_checkpoint(model, list(checkpoint_files or []))
            if self._float_source is not None:
                stored, config = self._float_source
                # each tensor kept as stored where no dtype= was given (mlx_lm convert without
                # --dtype); an explicit one casts them all (with --dtype)
                auto = getattr(self, "dtype_was_auto", False)
                keep_stored_fp32(model, stored, config if auto else None)
            self.quantization_config = _as_convert_quantizes(model, self.quantization_config)
            layers, replaced = plan_on_load(model, self.quantization_config)
            self._on_load = QuantizeOnLoad(layers, checkpoint_files)
            drop_tied_keys(model, replaced)
            self._take_conversion_errors(model)
            return model
        headers = read_headers(checkpoint_files or [])
        warn_if_scales_rounded(model, headers)
        text_class = text_model_class(model.config.to_dict(), lambda: headers)
        if text_class is not None:  # AutoModelForCausalLM built the image-text model
            raise ValueError(
                f"mlxq: {type(model).__name__}: this checkpoint holds the language model only "
                "(mlx-lm's layout: every tensor under `language_model.`, no vision tower); load "
                f"it with transformers.{text_class.__name__}.from_pretrained (`mlxq generate` "
                "does)"
            )
        text_only = language_model_only_refusal(model.config.to_dict(), headers)
        if text_only is not None:
            raise NotImplementedError(f"mlxq: {type(model).__name__}: {text_only}")
        other = MLX_LM_UNCHECKED.get(_model_type(model) or "")
        if other is not None:
            raise NotImplementedError(
                f"mlxq: model type {_model_type(model)!r}: {other}; mlxq refuses it rather than "
                "run a model it has not checked against mlx-lm's"
            )
        layout = checkpoint_layout(_model_type(model), headers)
        self._mlx_layout: MlxLayout | None = layout
        if layout is not None and layout.dropped:  # Gemma 3's vision tower, read as text
            kept = {k: v for k, v in headers.items() if not layout.drops(k)}
            logger.info(
                f"mlxq: {type(model).__name__} leaves out the checkpoint's "
                f"{len(headers) - len(kept)} image-text tensors (as mlx-lm does)"
            )
            headers = kept
        vlm_layout = checkpoint_vlm_layout(_model_type(model), headers)
        self._vlm_layout: VlmLayout | None = vlm_layout
        if vlm_layout is not None:  # a quantized MultiheadAttention input (Granite 4 Vision)
            use_in_proj_attention(model, vlm_layout, headers)
        self._record_unexpected_keys(model)
        mlx_vlm_names = looks_like_mlx_vlm(headers)
        # mlx-lm's separate channels-last convolutions that transformers concatenates
        self._conv_concat = layout.conv_concat_conversions(headers) if layout is not None else []
        stored_keys = list(headers)
        headers = checkpoint_keys_as_model_keys(model, headers)
        self._stored = headers  # the stored dtypes, saved again (save_as_read)
        stored_names = dict(zip(headers, stored_keys, strict=False))  # model -> file names
        add_unused_modules(model, headers)  # Gemma 3n's KV-shared layers' projections
        # (a tower in a sub-config too: Qwen3-Omni-MoE's thinker, refused by name before its
        # class fails on a missing get_input_embeddings)
        if vlm_layout is None and has_vision_tower(model.config):
            _refuse_unmapped_vlm(model, headers, stored_keys, mlx_vlm_names, checkpoint_files)
        # channels-last convolution weights (mlx-vlm's vision towers) are permuted at load,
        # and norm weights that mlx-lm stores as 1 + w (Qwen3-Next) get their 1 back
        source = _converted_name(model, stored_keys)
        self._value_conversions = channels_last_conversions(
            model, headers, prefer_last=vlm_layout is not None, source_key=source
        )
        if layout is not None:
            self._value_conversions += layout.offset_conversions(headers, source)
            self._value_conversions += layout.merge_conversions()
            self._value_conversions += layout.stack_conversions()
            # (load only: saved apart, as mlx-lm keeps them)
            self._split_stacks = layout.split_conversions(
                layout.to_transformers(k) for k in stored_keys
            )
            self._value_conversions += self._split_stacks
        if vlm_layout is not None:  # Qwen 3.5's norms, stored as 1 + w by mlx-vlm
            self._value_conversions += vlm_layout.offset_conversions(headers)
            # projections mlx-vlm fused (PaddleOCR-VL's qkv), split at load
            fused = (vlm_layout.to_transformers(k) for k in stored_keys)
            self._value_conversions += vlm_layout.split_conversions(fused, model.config)
            self._value_conversions += vlm_layout.concat_conversions()  # sharded tables
        config = _with_model_names(model, self.quantization_config, vlm_layout)
        walk = plan_modules(
            model,
            lambda name, plan: stored_format(
                name, plan.in_features, plan.out_features, headers, config
            ),
            stored=headers,
            collect_errors=True,  # raised in module order below
        )
        replaced: set[str] = set()
        self._moe_experts: set[str] = set()
        for entry in walk.modules:
            name, module = entry.name, entry.module
            if entry.moe is not None:  # MoE experts and routers (integrations/moe_loading.py)
                replaced |= replace_moe_module(model, name, module, entry.moe, headers, config)
                if isinstance(model.get_submodule(name), MoeExperts):
                    self._moe_experts.add(name)
                continue
            split = replace_split_kv_b(model, name, module, headers, config)  # DeepSeek V3
            if split is not None:
                replaced |= split
                continue
            plan, fmt = entry.swap, entry.require_format()
            if fmt is None:
                if plan.transposed and layout is not None and layout.conv1d_as_linear:
                    # a float Conv1D that mlx-lm stored as a linear layer ([out, in])
                    model.set_submodule(name, plan.float_linear(module))
                continue
            weight = getattr(module, "weight", None)
            dtype = weight.dtype if weight is not None and weight.is_floating_point() else None
            new = plan.require().empty(
                fmt.bits, fmt.group_size, dtype or torch.float16, device="meta", mode=fmt.mode
            )
            model.set_submodule(name, new)
            replaced.add(name)
        outside = self._outside = outside_the_base_model(model)
        # (the checkpoint's LM head, where the model has none: not this model's, dropped)
        body = headers if outside is None else {k: v for k, v in headers.items() if not outside(k)}
        check_all_quantized_tensors_used(model, body, replaced)
        refuse_tied_head_tensors(model, headers, walk.head, stored_names)
        if replaced:
            drop_tied_keys(model, replaced)
        tie_quantized_head(model, walk.head)
        if vlm_layout is not None:
            _refuse_missing_tensors(model, headers)
        self.modules_to_not_convert = []
        return model

    def _take_conversion_errors(self, model: nn.Module) -> None:
        """Take the errors of quantizing a layer while loading out of transformers' load report,
        refused after loading by name (:func:`check_quantized_on_load_errors`): transformers
        raises only "look at the CONVERSION entries of the above report", a report that a
        caller who silences its logging (`mlxq convert`, `mlxq generate`) never sees."""
        on_load = self._on_load

        def take(loading_info) -> None:
            if on_load.errors:
                loading_info.conversion_errors.clear()

        _read_load_report(model, take)

    def _record_unexpected_keys(self, model: nn.Module) -> None:
        """Keep the checkpoint tensors transformers finds no place for (its load report's
        unexpected keys, after its own exceptions), refused after loading: transformers tells
        quantizers nothing of them, so the model's hook that adjusts them reports them here."""
        self._unexpected: set[str] = set()
        self._mismatched: set[tuple] = set()

        def record(loading_info) -> None:
            self._unexpected = set(loading_info.unexpected_keys)
            # (before accelerate dispatches the model: an offloaded tensor, meta in the model
            # afterwards, loaded where it is not in here)
            self._not_loaded = set(loading_info.missing_keys)
            # refused after loading, by name: transformers' own refusal follows this hook in a
            # `finally` and would replace an error raised here
            self._mismatched = set(loading_info.mismatched_keys)
            loading_info.mismatched_keys.clear()

        _read_load_report(model, record)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        """The float `weight` of a layer quantized while loading (see :mod:`.quantize_on_load`)."""
        if self.pre_quantized or not param_name.endswith(".weight"):
            return False
        on_load = getattr(self, "_on_load", None)
        return on_load is not None and param_name.removesuffix(".weight") in on_load.layers

    def get_quantize_ops(self):
        return self._on_load

    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        on_load = getattr(self, "_on_load", None)
        if next(model.parameters(), None) is None:  # nanochat: every tensor quantized
            model.__class__ = placed_by_buffers(type(model))
        vlm = not self.pre_quantized and use_mlx_vlm_layout(model)  # as mlx-vlm saves it
        if not self.pre_quantized and not vlm:
            use_mlx_lm_layout(model)  # save as mlx-lm names the tensors (GPT-2, GPT-NeoX)
        if not self.pre_quantized:  # float32 tensors saved as mlx_lm convert writes them
            save_float_dtypes_as_convert(model, self.__dict__.pop("_float_source", None))
        if on_load is not None:
            check_quantized_on_load_errors(on_load)
            check_all_quantized_on_load(on_load)
        # accelerate dispatched the model before this (transformers >= 5.2x): the tensors of the
        # modules it offloads are meta here, their values in its hooks (integrations/offload.py)
        offloaded = offloaded_tensors(model)
        not_loaded = getattr(self, "_not_loaded", set())
        loaded_offloaded = {k for k in offloaded if k not in not_loaded}
        if offloaded:
            refuse_offloaded_tied_embedding(model)
            refuse_offloaded_dtype_routers(model)
        for name, module in model.named_modules():
            if isinstance(module, (AffineLinear, AffineEmbedding, AffineSwitchLinear)) or hasattr(
                module, "_mlxq_name"
            ):
                for tensor_name, tensor in module.named_buffers(recurse=False):
                    if tensor.device.type == "meta" and self._placed_on_meta(name):
                        continue
                    if f"{name}.{tensor_name}" in loaded_offloaded:
                        if tensor_name not in ("scales", "biases", "global_scale"):
                            continue
                        tensor = offloaded[f"{name}.{tensor_name}"]()  # its values checked below
                    if tensor.device.type == "meta":
                        why = on_load.errors.get(name) if on_load is not None else None
                        raise ValueError(
                            f"mlxq: layer {name!r}: {name}.{tensor_name} was not loaded"
                            + (f" (quantizing it failed: {why})" if why else "")
                        )
                    if tensor_name in ("scales", "biases", "global_scale"):
                        key = f"{name}.{tensor_name}"
                        stored = getattr(self, "_stored", {}).get(key)
                        try:
                            check_finite(key, tensor, getattr(module, "mode", "affine"))
                        except ValueError:
                            if tensor.dtype != torch.float16 or stored is None:
                                raise
                            if stored.dtype == "F16":
                                raise
                            # finite as stored, infinite once cast: not a corrupt file
                            raise ValueError(
                                f"mlxq: {key} (stored {stored.dtype}) holds values beyond "
                                "float16's range (65504), which the cast to the model's float16 "
                                "makes infinite; load it with dtype=torch.bfloat16 or "
                                "torch.float32"
                            ) from None
        if self.pre_quantized:
            layout = getattr(self, "_mlx_layout", None)
            if layout is not None:
                refuse_offloaded_fills(model, layout)
                fill_dropped_tensors(model, layout)  # ERNIE 4.5 MoE's router bias
                ignore_dropped_on_save(model, layout)  # (and saved as mlx-lm: without it)
                # conversions for loading only, not reversed on save: mlx-vlm's fused expert
                # stacks (saved apart, as mlx-lm keeps them) and, where the model saves in
                # transformers' names (Gemma 3's text), the layout's renames
                load_only = list(getattr(self, "_split_stacks", []))
                if not layout.save_renamed:
                    load_only += getattr(self, "_layout_renames", [])
                model._weight_conversions = [
                    c
                    for c in getattr(model, "_weight_conversions", None) or []
                    if not any(c is r for r in load_only)
                ]
            check_no_mismatched_shapes(model, getattr(self, "_mismatched", ()))
            unexpected = getattr(self, "_unexpected", ())
            if layout is not None:  # what mlx-lm drops on purpose
                unexpected = [k for k in unexpected if not layout.drops(k)]
            outside = getattr(self, "_outside", None)
            if outside is not None:  # the LM head dropped, another task's head new: said
                say_other_task_head(model, unexpected, not_loaded, outside)
                unexpected = [k for k in unexpected if not outside(k)]
            check_nothing_unexpected(model, unexpected)
            check_nothing_missing(model, loaded_offloaded, new_head=outside)
            check_float_parameters_finite(model, offloaded)
            run_folded_multipliers(model)  # Falcon-H1's muP multipliers, folded by mlx-lm
        check_moe_tensors_loaded(model, skip=self._placed_on_meta, loaded=loaded_offloaded)
        self._all_float = quantized_weight_count(model) == 0  # (is_qat_trainable)
        if self.pre_quantized:  # routers transformers keeps fp32: saved as the file has them
            save_as_read(model, self.__dict__.pop("_stored", {}))  # (not kept: pickling)
        floats = float_where_weight_dtype_is_read(model)  # Mamba's head, V3.2's indexer
        # a checkpoint's entries are in its own names (mlx-vlm's, which save_pretrained
        # writes again); a float model's are renamed below
        saved = {}
        if floats and self.pre_quantized:
            from mlxq.integrations.mlx_vlm_layout import mlx_vlm_module_names

            saved = mlx_vlm_module_names(model, floats)
        for name in floats:
            # saved float: the entry tells mlx-lm so (it would expect this layer's scales)
            config.overrides[saved.get(name, name)] = False
        float_dtype_for_routers(model)  # MiniMax-M2's router
        if not self.pre_quantized and config.overrides:  # entries saved in mlx-(v)lm's names
            from mlxq.integrations.mlx_lm_layout import mlx_lm_entries
            from mlxq.integrations.mlx_vlm_layout import mlx_vlm_module_names

            names = mlx_vlm_module_names(model, config.overrides)
            renamed = (
                {names.get(k, k): v for k, v in config.overrides.items()}
                if names
                else mlx_lm_entries(model, config.overrides)
            )
            if renamed != config.overrides:
                config = _with_overrides(config, renamed)
        model.config.quantization_config = config
        add_mlx_lm_config_keys(model.config)
        if llama4_with_experts(model.config):  # mlx-lm's llama4: under `language_model.`
            save_llama4_as_mlx_lm(model)
        use_mlxq_forwards(model)  # (quantize_model's too)
        return model

    def update_weight_conversions(self, weight_conversions, *model):
        """mlx-lm's tensor names, for the architectures it renames, go first: the model's own
        renamings (e.g. GPT-NeoX `embed_out` -> `lm_head`) then chain after them, and saving
        reverses them last, so that `save_pretrained` writes mlx-lm's layout again."""
        from transformers.core_model_loading import WeightConverter

        layout = getattr(self, "_mlx_layout", None)
        renames = layout.weight_renamings() if layout is not None else []
        # taken out of the model's conversions after loading (not reversed when saving)
        self._layout_renames = (
            [
                r
                for r, pair in zip(renames, layout.renames, strict=True)
                if pair in layout.load_only()
            ]
            if layout is not None
            else []
        )
        vlm_layout = getattr(self, "_vlm_layout", None)
        if vlm_layout is not None:  # mlx-vlm's names, also reversed last when saving
            renames = [*vlm_layout.weight_renamings(), *renames]
        converters = list(getattr(self, "_value_conversions", []))
        experts = getattr(self, "_moe_experts", set())
        # the model's own converters of its fused experts (Qwen3-VL-MoE's transpose of the
        # Hub's [E, in, out]) would run on mlxq's stacked tensors of the same name
        weight_conversions = [
            c
            for c in weight_conversions
            if not (isinstance(c, WeightConverter) and converts_replaced_tensors(c, experts))
        ]
        # mlx-lm's channels-last convolutions: concatenated and permuted instead of the
        # model's own concatenation (one converter per source name)
        conv_concat = getattr(self, "_conv_concat", [])
        targets = {t for c in conv_concat for t in c._original_target_patterns}
        weight_conversions = [
            c
            for c in weight_conversions
            if not (
                isinstance(c, WeightConverter) and targets.intersection(c._original_target_patterns)
            )
        ]
        return [
            *conv_concat,
            *renames,
            # transformers >= 5.2x passes the model too; older 5.x only the conversions
            *super().update_weight_conversions(weight_conversions, *model),
            *converters,
        ]

    def get_weight_conversions(self):
        """Read transformers MetalConfig checkpoints too: their `qbiases` are our `biases`."""
        from transformers.core_model_loading import WeightRenaming

        return [WeightRenaming(source_patterns=r"\.qbiases$", target_patterns=".biases")]

    def is_serializable(self) -> bool:
        return True

    def get_state_dict_and_metadata(self, model):
        """transformers' (no state dict of its own), after :func:`save_dtype_of_most_values`:
        save_pretrained calls it before writing config.json."""
        save_dtype_of_most_values(model)
        return super().get_state_dict_and_metadata(model)

    @property
    def is_trainable(self) -> bool:
        """Gradients flow through the quantized layers to their inputs (the ops' autograd), so
        transformers' Trainer may train adapters (PEFT) on an mlxq model; the packed weights
        themselves stay frozen."""
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """Whether Trainer may train the model without adapters: only where nothing in it is
        quantized (a float checkpoint written by mlx-lm, read through mlxq for its layout)."""
        return getattr(self, "_all_float", False)

    @property
    def is_compileable(self) -> bool:
        """The ops have fake kernels and stay opaque to the compiler, so generate may compile."""
        return True

    def _dequantize(self, model, dtype=None):
        from mlxq.dequantize_model import dequantize_model

        return dequantize_model(model, dtype=dtype)
