"""The one place where mlxq plugs into transformers. Idempotent; runs on `import mlxq`.

What it does, and why each piece is needed:

1. Registers :class:`MLXQuantConfig` and :class:`MLXHfQuantizer` as quant_method ``"mlx"``
   through transformers' public API (`register_quantization_config`, `register_quantizer`).
2. Config detection (the unavoidable hook): MLX config.json files carry ``quantization`` /
   ``quantization_config`` *without* a ``quant_method``, which transformers rejects. A wrapper
   around ``transformers.modeling_utils.get_hf_quantizer`` tags such a dict with
   ``quant_method: "mlx"`` (on a copy) before transformers reads it. Any dict that already has
   a quant_method (e.g. ``"metal"`` for transformers' own MetalConfig) is left alone, unless
   the caller passes ``quantization_config=MLXQuantConfig()``: then a MetalConfig checkpoint
   (same packing, ``qbiases`` for ``biases``) runs on mlxq's kernels on every device.
3. Stale shard indexes: a wrapper around ``transformers.modeling_utils.get_checkpoint_shard_files``
   checks the index against the safetensors files present and, when it is stale, returns a
   weight map rebuilt from their headers (:func:`mlxq.integrations.checkpoint.repair_shard_index`).
   Local folders are always checked; Hub repos only while an MLX checkpoint loads (the check
   lists the repo's files).
4. Shards without an index: mlx-lm loads every `model*.safetensors` of a folder; transformers
   reads `model.safetensors` alone, or fails without one. While an MLX checkpoint loads from a
   local folder that has several such files and no index, a wrapper around
   ``transformers.modeling_utils._get_resolved_checkpoint_files`` returns them all, with a
   weight map from their headers (:func:`mlxq.integrations.checkpoint.unindexed_shards`).
5. Text configs read from an image-text config.json: `Gemma3ForCausalLM.from_pretrained` on a
   `gemma3` checkpoint reads only `text_config`, and transformers drops the top-level
   quantization block with the rest, so the quantized tensors would meet a float model that
   finds none of its weights (random weights, a warning at most). A wrapper around
   ``PreTrainedConfig.get_config_dict`` copies an MLX quantization block into the sub-config
   that the requesting config class is about to read; and reads the model types mlx-lm runs
   as DeepSeek V3 (`kimi_k2`, `joyai_llm_flash`) as `deepseek_v3`. Installed as soon as
   ``transformers.configuration_utils`` loads (`AutoConfig` may read a config first).
6. Casts: transformers' ``PreTrainedModel.half`` / ``float`` refuse every quantized model (its
   ``.to(dtype)`` and ``.bfloat16()`` cast it); for an MLX model they cast as ``nn.Module``'s do.
   ``num_parameters`` counts each quantized layer's weight as its float weight would count
   (transformers sees only parameters, and mlxq's packed weights are buffers).
7. The default dtype: without ``dtype=``, transformers loads in config.json's ``dtype``; mlx-lm
   runs each tensor as its file stores it. A wrapper around ``transformers.modeling_utils.
   _get_dtype`` replaces "auto" for an MLX load by the dtype mlx-lm runs the checkpoint in
   (:func:`mlxq.integrations.quantizer.mlx_lm_dtype`); an explicit ``dtype=`` is left alone.

8. Hub kernels: transformers >= 5.25 runs ``kernelize`` on every model that ``from_pretrained``
   loads while `kernels` is installed; where it has no kernel for the device it puts back the
   class's own forward of each hub-kernel layer, which would drop mlxq's native CPU norms
   (:mod:`mlxq.integrations.cpu_norms`) and the flat decode step that relies on them. The
   quantizer undoes it before giving its forwards (from_pretrained kernelizes first), and a
   wrapper around ``transformers.modeling_utils.kernelize`` after later calls (`train()` /
   `eval()`): :mod:`mlxq.integrations.kernelize_guard`; a hub kernel it installs stays.

9. Offload: mlxq's quantized tensors are buffers, which transformers offloads (a device_map
   with "disk", or "cpu" beside a GPU) only with ``offload_buffers=True``. For an MLX model it is
   always on: a subclass of ``transformers.modeling_utils.LoadStateDictConfig`` sets it for the
   load (tensors placed on "disk" are read from the checkpoint or the offload folder at each
   forward, never held in memory) and a wrapper around
   ``transformers.modeling_utils.accelerate_dispatch`` for accelerate's hooks
   (:mod:`mlxq.integrations.offload`).

Importing transformers takes seconds, so `import mlxq` does not: if
``transformers.modeling_utils`` is not imported yet, a finder on `sys.meta_path` runs
:func:`register` right after it is.
"""

from __future__ import annotations

import contextvars
import importlib.abc
import os
import sys
from typing import Any

__all__ = ["install", "register", "is_registered"]

_TARGET = "transformers.modeling_utils"
_CONFIG_TARGET = "transformers.configuration_utils"
_MARK = "__mlxq_wrapped__"
# set by each from_pretrained's quantizer lookup: Hub repos are checked for a stale index only
# while an MLX checkpoint loads (local folders always: it costs a directory listing)
_loading_mlx: contextvars.ContextVar[bool] = contextvars.ContextVar("mlxq_loading", default=False)


# Wrapped where transformers has them (private functions that a release may rename).
_OPTIONAL_WRAPPED = (
    "_get_resolved_checkpoint_files",
    "_get_dtype",
    "kernelize",
    "LoadStateDictConfig",
    "accelerate_dispatch",
)


def is_registered() -> bool:
    """True once the quantizer and the wrappers are installed in the loaded transformers."""
    modeling_utils = sys.modules.get(_TARGET)
    if modeling_utils is None:
        return False
    from transformers.configuration_utils import PreTrainedConfig

    return all(
        getattr(getattr(modeling_utils, fn, None), _MARK, False)
        for fn in ("get_hf_quantizer", "get_checkpoint_shard_files", *_OPTIONAL_WRAPPED)
        if fn not in _OPTIONAL_WRAPPED or hasattr(modeling_utils, fn)
    ) and getattr(PreTrainedConfig.__dict__["get_config_dict"].__func__, _MARK, False)


def _tag_mlx_quantization(config: Any, requested: Any = None) -> None:
    """Give an MLX quantization block of `config` (or its text config) quant_method "mlx".

    A transformers MetalConfig checkpoint (same packing, `qbiases` naming) is taken over only
    when the caller asked for it by passing an `MLXQuantConfig`; otherwise it stays Metal's.
    """
    from mlxq.integrations.checkpoint import FloatMlxBlock
    from mlxq.integrations.config import (
        QUANT_METHOD,
        MLXQuantConfig,
        config_and_text_config,
        is_mlx_quantization,
    )

    for cfg in config_and_text_config(config):
        q = getattr(cfg, "quantization_config", None)
        if q is None or q == {}:
            # older mlx-lm wrote only this key; an empty quantization_config beside it is no
            # block (mlx-lm reads `quantization` first, as find_quantization does)
            q = getattr(cfg, "quantization", None)
        if isinstance(q, FloatMlxBlock) and requested is not None:
            continue  # a float MLX checkpoint, quantized on load as the caller asks
        if isinstance(q, dict) and "quant_method" not in q and is_mlx_quantization(q):
            cfg.quantization_config = {**q, "quant_method": QUANT_METHOD}
        elif isinstance(requested, MLXQuantConfig) and _is_metal(q):
            q = q if isinstance(q, dict) else q.to_dict()
            cfg.quantization_config = {
                "bits": q["bits"],
                "group_size": q["group_size"],
                "modules_to_not_convert": q.get("modules_to_not_convert") or [],
                "quant_method": QUANT_METHOD,
            }


def _argument_config(requested: Any) -> Any:
    """A dict with quant_method "mlx" passed as from_pretrained(quantization_config=...), as an
    MLXQuantConfig whose errors name that argument (transformers would build it with
    `from_dict`, whose errors name config.json); anything else unchanged."""
    from mlxq.integrations.config import ARGUMENT_BLOCK, QUANT_METHOD, MLXQuantConfig

    if isinstance(requested, dict) and requested.get("quant_method") == QUANT_METHOD:
        return MLXQuantConfig.from_block(requested, ARGUMENT_BLOCK)
    return requested


def _with_quantization_in_sub_config(cls: Any, config_dict: dict) -> dict:
    """`config_dict` with its top-level MLX quantization block copied into the sub-config that
    `cls` reads instead of the whole dict (as ``PreTrainedConfig.from_pretrained`` picks it: its
    `base_config_key`, else the one sub-dict of `cls.model_type`); unchanged otherwise."""
    from mlxq.format import is_mlx_quantization

    q = config_dict.get("quantization_config", config_dict.get("quantization"))
    if not is_mlx_quantization(q) or not getattr(cls, "model_type", ""):
        return config_dict
    key = getattr(cls, "base_config_key", "")
    if not (key and isinstance(config_dict.get(key), dict)):
        if config_dict.get("model_type") == cls.model_type:
            return config_dict
        keys = [
            k
            for k, v in config_dict.items()
            if isinstance(v, dict) and v.get("model_type") == cls.model_type
        ]
        if len(keys) != 1:
            return config_dict
        key = keys[0]
    sub = config_dict[key]
    if "quantization_config" in sub or "quantization" in sub:
        return config_dict
    return {**config_dict, key: {**sub, "quantization_config": q}}


# model types mlx-lm 0.32 runs as another (its MODEL_REMAPPING) that transformers 5.24 does not
# know, whose config.json has the same keys meaning the same: Kimi K2 and JoyAI-LLM-Flash ship
# DeepSeek V3's config class and model (`architectures: DeepseekV3ForCausalLM`, remote code)
_MLX_LM_REMAPPED = {"kimi_k2": "deepseek_v3", "joyai_llm_flash": "deepseek_v3"}
# keys mlx-lm's DeepSeek V3 reads that transformers' ignores, and the one value both agree on
_DEEPSEEK_V3_FIXED = {"moe_layer_freq": 1, "topk_method": "noaux_tc"}
# image-text model types whose language model in mlx-vlm 0.7.10 reads keys of text_config that
# transformers' ignores: Kimi K2.5's is mlx-vlm's DeepSeek V3; GLM-4.5V's asserts noaux_tc
_MLX_VLM_TEXT_FIXED = {"kimi_k25": _DEEPSEEK_V3_FIXED, "glm4v_moe": {"topk_method": "noaux_tc"}}


def _refuse_other_values(model_type: str, config: dict, fixed: dict, where: str) -> None:
    """ValueError naming the first key of `fixed` that `config` (config.json's part `where`:
    "" or "text_config.") sets to another value than the one transformers' model is."""
    oracle = "mlx-vlm" if where else "mlx-lm"
    reader = "mlx-vlm's language model" if where else "mlx-lm's DeepSeek V3"
    for key, value in fixed.items():
        if config.get(key, value) != value:
            raise ValueError(
                f"mlxq: config.json of model type {model_type!r} sets {where}{key}: "
                f"{config[key]!r}; {reader} reads it, transformers' does not (its model is "
                f"that of {key}: {value!r}), so no model here matches {oracle}'s"
            )


def _model_type_as_mlx_lm_reads(config_dict: dict) -> dict:
    """An MLX checkpoint's config.json of a model type mlx-lm runs as DeepSeek V3 (Kimi K2,
    JoyAI-LLM-Flash) as transformers' DeepSeek V3 reads it (a copy; unchanged otherwise).

    Refused (ValueError naming key and value) where a key mlx-lm reads and transformers'
    DeepSeek V3 does not (`moe_layer_freq`: MoE every n-th layer; `topk_method`) holds other
    than the one value both models agree on; DeepSeek V3 checkpoints likewise, and the
    text_config of image-text ones whose mlx-vlm language model reads such keys (Kimi K2.5's
    DeepSeek V3, GLM-4.5V's `topk_method`).

    Keys it lacks whose mlx-lm default is not transformers' get mlx-lm's, or are refused
    (:mod:`mlxq.integrations.config_defaults`)."""
    from mlxq.format import find_quantization, is_mlx_quantization

    model_type = config_dict.get("model_type")
    target = _MLX_LM_REMAPPED.get(model_type, model_type)
    if not is_mlx_quantization(find_quantization(config_dict)):
        return config_dict
    config_dict = _with_mlx_lm_defaults(config_dict, target)
    text = config_dict.get("text_config")
    if model_type in _MLX_VLM_TEXT_FIXED and isinstance(text, dict):
        _refuse_other_values(model_type, text, _MLX_VLM_TEXT_FIXED[model_type], "text_config.")
    if target != "deepseek_v3":
        return config_dict
    _refuse_other_values(model_type, config_dict, _DEEPSEEK_V3_FIXED, "")
    if target == model_type:
        return config_dict
    return {**config_dict, "model_type": target}


def _with_mlx_lm_defaults(config_dict: dict, model_type: Any) -> dict:
    """`config_dict` read as mlx-lm reads it as `model_type` (the model type mlx-lm runs): its
    defaults for the keys it lacks (:func:`mlxq.integrations.config_defaults.
    with_mlx_lm_defaults`), keeping config.json's own `model_type`."""
    from mlxq.integrations.config_defaults import with_mlx_lm_defaults

    out = with_mlx_lm_defaults({**config_dict, "model_type": model_type})  # (a copy)
    out["model_type"] = config_dict.get("model_type")
    return out


def _float_mlx_checkpoint_as_mlx(config_dict: dict, path: Any, subfolder: str) -> dict:
    """`config_dict` with :data:`mlxq.integrations.checkpoint.FLOAT_MLX_BLOCK` as its
    quantization block when it has none and `path` is a local folder of a float checkpoint
    written by mlx-lm (:func:`~mlxq.integrations.checkpoint.is_float_mlx_checkpoint`): read as
    an MLX checkpoint, whose layout mlxq maps back as it does for quantized ones, every module
    float. Unchanged otherwise (a copy where it changes)."""
    from mlxq.format import find_quantization
    from mlxq.integrations.checkpoint import (
        FLOAT_MLX_BLOCK,
        FloatMlxBlock,
        is_float_mlx_checkpoint,
    )

    if find_quantization(config_dict) is not None or not isinstance(path, (str, os.PathLike)):
        return config_dict
    if not is_float_mlx_checkpoint(os.path.join(os.fspath(path), subfolder)):
        return config_dict
    return {**config_dict, "quantization": FloatMlxBlock(FLOAT_MLX_BLOCK)}


def _is_metal(q: Any) -> bool:
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return str(getattr(method, "value", method)) == "metal"


def register() -> None:
    """Register the "mlx" quantizer and install the wrappers (idempotent); an
    ImportError first on a transformers older than mlxq supports."""
    from mlxq._transformers_version import require_supported_transformers

    require_supported_transformers()
    import torch
    import transformers.modeling_utils as modeling_utils
    from transformers.quantizers import auto

    from mlxq.integrations.checkpoint import repair_shard_index, unindexed_shards
    from mlxq.integrations.config import QUANT_METHOD, MLXQuantConfig
    from mlxq.integrations.cpu_attention import register_attention
    from mlxq.integrations.quantizer import MLXHfQuantizer, quantized_weight_count

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(MLXQuantConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(MLXHfQuantizer)
    # the attention implementation mlxq gives text models, for models that come back from
    # torch.load in a process that loaded none (`import mlxq` runs on unpickling)
    register_attention()

    original_get_hf_quantizer = modeling_utils.get_hf_quantizer
    if not getattr(original_get_hf_quantizer, _MARK, False):

        def get_hf_quantizer(config, quantization_config, *args, **kwargs):
            quantization_config = _argument_config(quantization_config)
            _tag_mlx_quantization(config, quantization_config)
            result = original_get_hf_quantizer(config, quantization_config, *args, **kwargs)
            _loading_mlx.set(isinstance(result[0], MLXHfQuantizer))
            return result

        setattr(get_hf_quantizer, _MARK, True)
        get_hf_quantizer.__wrapped__ = original_get_hf_quantizer
        modeling_utils.get_hf_quantizer = get_hf_quantizer

    original_shard_files = modeling_utils.get_checkpoint_shard_files
    if not getattr(original_shard_files, _MARK, False):

        def get_checkpoint_shard_files(pretrained_model_name_or_path, index_filename, **kwargs):
            if not (_loading_mlx.get() or os.path.isdir(pretrained_model_name_or_path)):
                return original_shard_files(pretrained_model_name_or_path, index_filename, **kwargs)
            download = {k: kwargs.get(k) for k in ("cache_dir", "force_download", "token")}
            download.update(
                revision=kwargs.get("revision"), local_files_only=kwargs.get("local_files_only")
            )
            repaired = repair_shard_index(
                pretrained_model_name_or_path,
                index_filename,
                subfolder=kwargs.get("subfolder") or "",
                **download,
            )
            if repaired is not None:
                return repaired
            return original_shard_files(pretrained_model_name_or_path, index_filename, **kwargs)

        setattr(get_checkpoint_shard_files, _MARK, True)
        get_checkpoint_shard_files.__wrapped__ = original_shard_files
        modeling_utils.get_checkpoint_shard_files = get_checkpoint_shard_files

    # private in transformers: where a release drops it (or renames its arguments), a load
    # without dtype= takes config.json's dtype as before
    original_get_dtype = getattr(modeling_utils, "_get_dtype", None)
    if original_get_dtype is not None and not getattr(original_get_dtype, _MARK, False):
        import inspect

        signature = inspect.signature(original_get_dtype)

        def _get_dtype(*args, **kwargs):
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                return original_get_dtype(*args, **kwargs)
            quantizer = bound.arguments.get("hf_quantizer")
            if isinstance(quantizer, MLXHfQuantizer):  # an explicit dtype= casts every tensor
                quantizer.dtype_was_auto = bound.arguments.get("dtype") == "auto"
            if bound.arguments.get("dtype") == "auto" and isinstance(quantizer, MLXHfQuantizer):
                from mlxq.integrations.quantizer import mlx_lm_dtype

                dtype = mlx_lm_dtype(
                    bound.arguments.get("checkpoint_files"),
                    bound.arguments.get("config"),
                    quantizer.pre_quantized,
                )
                if dtype is not None:
                    bound.arguments["dtype"] = dtype
            return original_get_dtype(*bound.args, **bound.kwargs)

        setattr(_get_dtype, _MARK, True)
        _get_dtype.__wrapped__ = original_get_dtype
        modeling_utils._get_dtype = _get_dtype

    # private in transformers: where a release drops it, folders of unindexed shards fail to load
    # as before (transformers' error), and nothing else changes
    original_resolved = getattr(modeling_utils, "_get_resolved_checkpoint_files", None)
    if original_resolved is not None and not getattr(original_resolved, _MARK, False):

        def _get_resolved_checkpoint_files(*args, **kwargs):
            source = kwargs.get("pretrained_model_name_or_path", args[0] if args else None)
            download = kwargs.get("download_kwargs") or {}
            if _loading_mlx.get() and source is not None and kwargs.get("gguf_file") is None:
                found = unindexed_shards(source, download.get("subfolder") or "")
                if found is not None:  # several model*.safetensors, no index: mlx-lm's files
                    return found
            return original_resolved(*args, **kwargs)

        setattr(_get_resolved_checkpoint_files, _MARK, True)
        _get_resolved_checkpoint_files.__wrapped__ = original_resolved
        modeling_utils._get_resolved_checkpoint_files = _get_resolved_checkpoint_files

    # accelerate's offload: mlxq's packed weights, scales and biases are buffers, which
    # transformers offloads (to "disk" while loading, to "cpu"/"disk" when dispatching) only with
    # `offload_buffers=True`; without it they stay in memory where the device_map planned them
    # away, or, on "disk", are never loaded. For an MLX model it is always on: a module's other
    # buffers that the checkpoint does not hold (rotary `inv_freq`) stay on its device as before.
    original_load_config = getattr(modeling_utils, "LoadStateDictConfig", None)
    if original_load_config is not None and not vars(original_load_config).get(_MARK, False):
        # (an __init__, replacing the argument: the dataclass is frozen, calls no __post_init__
        # it did not define, and from_pretrained passes each argument by name)
        def __init__(self, *args, **kwargs) -> None:
            if isinstance(kwargs.get("hf_quantizer"), MLXHfQuantizer):
                kwargs["offload_buffers"] = True
            original_load_config.__init__(self, *args, **kwargs)

        load_config = type(
            original_load_config.__name__,
            (original_load_config,),
            {"__init__": __init__, _MARK: True, "__module__": _TARGET},
        )
        load_config.__wrapped__ = original_load_config
        modeling_utils.LoadStateDictConfig = load_config

    original_dispatch = getattr(modeling_utils, "accelerate_dispatch", None)
    if original_dispatch is not None and not getattr(original_dispatch, _MARK, False):

        def accelerate_dispatch(model, hf_quantizer, *args, **kwargs):
            if isinstance(hf_quantizer, MLXHfQuantizer):
                if "offload_buffers" in kwargs:
                    kwargs["offload_buffers"] = True
                elif len(args) >= 4:  # (device_map, offload_folder, offload_index, offload_buffers)
                    args = (*args[:3], True, *args[4:])
                else:
                    kwargs["offload_buffers"] = True
            return original_dispatch(model, hf_quantizer, *args, **kwargs)

        setattr(accelerate_dispatch, _MARK, True)
        accelerate_dispatch.__wrapped__ = original_dispatch
        modeling_utils.accelerate_dispatch = accelerate_dispatch

    # transformers refuses `.half()` / `.float()` on every quantized model, while `.to(dtype)`
    # and `.bfloat16()` cast it: mlxq's layers run in any float dtype (their scales and biases
    # follow the cast, the packed words stay), so an MLX model takes them as any model does
    for method in ("half", "float"):
        original_cast = getattr(modeling_utils.PreTrainedModel, method)
        if getattr(original_cast, _MARK, False):
            continue

        def cast(self, *args, _original=original_cast, _method=method):
            if isinstance(getattr(self, "hf_quantizer", None), MLXHfQuantizer):
                return getattr(torch.nn.Module, _method)(self, *args)
            return _original(self, *args)

        setattr(cast, _MARK, True)
        cast.__wrapped__ = original_cast
        cast.__name__ = cast.__qualname__ = method
        setattr(modeling_utils.PreTrainedModel, method, cast)

    # transformers counts parameters only, and mlxq's packed weights are buffers: an MLX model
    # of 135M weights said it had 50k. Each quantized layer counts as its float weight would
    # (frozen: never trainable), as transformers counts bitsandbytes' 4-bit weights
    original_count = modeling_utils.PreTrainedModel.num_parameters
    if not getattr(original_count, _MARK, False):

        def num_parameters(
            self, only_trainable: bool = False, exclude_embeddings: bool = False
        ) -> int:
            count = original_count(self, only_trainable, exclude_embeddings)
            if isinstance(getattr(self, "hf_quantizer", None), MLXHfQuantizer):
                if not only_trainable:
                    count += quantized_weight_count(self, exclude_embeddings)
            return count

        setattr(num_parameters, _MARK, True)
        num_parameters.__wrapped__ = original_count
        num_parameters.__doc__ = original_count.__doc__
        modeling_utils.PreTrainedModel.num_parameters = num_parameters

    # a cast the quantized layers cannot take (model.double(), .to(torch.float64)) is refused
    # before any tensor of the model is cast, naming the first quantized module; each layer
    # refuses it too (mlxq._casts), but only after the modules before it were cast
    original_apply = modeling_utils.PreTrainedModel._apply
    if not getattr(original_apply, _MARK, False):

        def _apply(self, fn, *args, **kwargs):
            if isinstance(getattr(self, "hf_quantizer", None), MLXHfQuantizer):
                from mlxq._casts import RefusesUnsupportedCasts, cast_refusal

                try:  # to float16, each module's scales must fit it: ask every one
                    to_half = fn(torch.empty(0)).dtype == torch.float16
                except Exception:  # noqa: BLE001 - a cast that fails says why itself
                    to_half = False
                for name, module in self.named_modules():
                    if isinstance(module, RefusesUnsupportedCasts):
                        why = cast_refusal(module, fn)
                        if why is not None:
                            raise TypeError(
                                f"mlxq: cannot cast this MLX model ({name}, "
                                f"{type(module).__name__}, is quantized): {why}; nothing was cast"
                            )
                        if not to_half:
                            break  # one quantized module answers for all
            return original_apply(self, fn, *args, **kwargs)

        setattr(_apply, _MARK, True)
        _apply.__wrapped__ = original_apply
        modeling_utils.PreTrainedModel._apply = _apply

    # transformers >= 5.25 kernelizes every model from_pretrained loads when `kernels` is
    # installed (a dependency of 5.25), and again on train() / eval(): where no hub kernel
    # exists for the device (every layer on the CPU) it binds each hub-kernel layer's class
    # forward to it, dropping mlxq's native norms and with them the flat decode step
    original_kernelize = getattr(modeling_utils, "kernelize", None)
    if original_kernelize is not None and not getattr(original_kernelize, _MARK, False):
        from mlxq.integrations.kernelize_guard import fast_paths_kept

        def kernelize(model, *args, **kwargs):
            with fast_paths_kept(model):
                # (read at call time: the tests stand in for `kernels`, which may be missing)
                return kernelize.__wrapped__(model, *args, **kwargs)

        setattr(kernelize, _MARK, True)
        kernelize.__wrapped__ = original_kernelize
        kernelize.__doc__ = original_kernelize.__doc__
        modeling_utils.kernelize = kernelize

    _install_config_hook()


def _install_config_hook() -> None:
    """Wrap ``PreTrainedConfig.get_config_dict`` (idempotent): installed as soon as
    transformers' configuration module loads, since `AutoConfig.from_pretrained` may read an
    MLX config.json before any model module is imported."""
    from transformers.configuration_utils import PreTrainedConfig

    base = PreTrainedConfig.__dict__["get_config_dict"]  # a classmethod
    if not getattr(base.__func__, _MARK, False):
        original_get_config_dict = base.__func__

        def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
            config_dict, kwargs = original_get_config_dict(
                cls, pretrained_model_name_or_path, **kwargs
            )
            config_dict = _float_mlx_checkpoint_as_mlx(
                config_dict, pretrained_model_name_or_path, kwargs.get("subfolder") or ""
            )
            config_dict = _model_type_as_mlx_lm_reads(config_dict)
            return _with_quantization_in_sub_config(cls, config_dict), kwargs

        setattr(get_config_dict, _MARK, True)
        get_config_dict.__wrapped__ = original_get_config_dict
        PreTrainedConfig.get_config_dict = classmethod(get_config_dict)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds `transformers.modeling_utils` through the other finders, then registers after it
    (and `transformers.configuration_utils`, then wraps its config reading: item 5)."""

    # known by this mark, not by class: a reloaded module (IPython's autoreload) defines a new
    # class, and two such finders asking each other would recurse without end
    __mlxq_wrapped__ = True

    def find_spec(self, fullname, path, target=None):
        if fullname not in (_TARGET, _CONFIG_TARGET):
            return None
        then = register if fullname == _TARGET else _install_config_hook
        for finder in sys.meta_path:
            if getattr(finder, _MARK, False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                loader = spec.loader
                exec_module = loader.exec_module

                def exec_then_register(module, _exec=exec_module, _then=then):
                    _exec(module)
                    _then()

                spec.loader = _LoaderProxy(loader, exec_then_register)
                return spec
        return None


class _LoaderProxy(importlib.abc.Loader):
    def __init__(self, loader, exec_module) -> None:
        self._loader, self._exec = loader, exec_module

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._exec(module)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


def install() -> None:
    """Register now if transformers is loaded, else right after it loads (idempotent)."""
    if _TARGET in sys.modules:
        register()
        return
    if _CONFIG_TARGET in sys.modules:
        _install_config_hook()
    if not any(getattr(f, _MARK, False) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
