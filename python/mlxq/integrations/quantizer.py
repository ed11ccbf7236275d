"""`MLXHfQuantizer`: how transformers builds a model from an MLX checkpoint.

Before the weights load (the model is still on the meta device), every `nn.Linear` and
`nn.Embedding` whose checkpoint tensors are quantized is replaced by :class:`mlxq.nn.AffineLinear`
or :class:`mlxq.nn.AffineEmbedding`, with buffers of exactly the checkpoint's shapes; transformers
then copies the MLX tensors in unchanged. Which modules are quantized, and how, is read from the
safetensors headers first and the config second: mlx-lm leaves modules in float without saying
so (a K not divisible by the group size), so the config alone is not enough.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from mlxq.integrations.checkpoint import TensorInfo, read_headers
from mlxq.integrations.config import (
    RUNNABLE_MODES,
    MLXQuantConfig,
    ModuleFormat,
    config_and_text_config,
)
from mlxq.nn import (
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    AffineEmbedding,
    AffineLinear,
    TiedAffineHead,
)

__all__ = ["MLXHfQuantizer", "stored_format", "tie_quantized_head", "add_mlx_lm_config_keys"]

_PACKED_DTYPES = ("U32", "I32")
_PLACEMENT_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def stored_format(
    name: str,
    in_features: int,
    out_features: int,
    headers: dict[str, TensorInfo],
    config,
) -> ModuleFormat | None:
    """The format module `name` is stored in, from its tensors; None if it is float.

    A per-module config entry must agree with the tensors; otherwise bits and group size are
    read off the shapes (as mlx-lm does). Raises a ValueError naming the layer and tensor for a
    missing or mis-shaped tensor, NotImplementedError for a mode mlxq does not run.
    """
    weight, scales = headers.get(f"{name}.weight"), headers.get(f"{name}.scales")
    if scales is None:
        if weight is not None and weight.dtype in _PACKED_DTYPES:
            raise ValueError(
                f"mlxq: layer {name!r}: {name}.weight is packed ({weight.dtype}, "
                f"{list(weight.shape)}) but {name}.scales is missing from the checkpoint"
            )
        return None
    entry = config.overrides.get(name)
    mode = entry.get("mode", config.mode) if isinstance(entry, dict) else config.mode
    if mode not in RUNNABLE_MODES:
        raise NotImplementedError(
            f"mlxq: layer {name!r} is quantized with mode {mode!r}, which mlxq does not run yet "
            f"(it runs {', '.join(RUNNABLE_MODES)})"
        )
    if weight is None:
        raise ValueError(f"mlxq: layer {name!r}: {name}.scales exists but {name}.weight is missing")
    # transformers' MetalConfig checkpoints name the biases `qbiases` (renamed when loading)
    biases = headers.get(f"{name}.biases", headers.get(f"{name}.qbiases"))
    if biases is None:
        raise ValueError(
            f"mlxq: layer {name!r}: affine mode needs {name}.biases, missing from the checkpoint"
        )
    if weight.dtype not in _PACKED_DTYPES or len(weight.shape) != 2 or len(scales.shape) != 2:
        raise ValueError(
            f"mlxq: layer {name!r}: expected a 2-D uint32 {name}.weight and 2-D {name}.scales, "
            f"got {weight.dtype} {list(weight.shape)} and {list(scales.shape)}"
        )
    rows, packed = weight.shape
    groups = scales.shape[1]
    bits = packed * 32 // in_features if (packed * 32) % in_features == 0 else None
    group_size = in_features // groups if groups and in_features % groups == 0 else None
    if isinstance(entry, dict):  # the recipe's own entry: the shapes must match it
        want = ModuleFormat(
            int(entry.get("bits", config.bits)),
            int(entry.get("group_size", config.group_size)),
            mode,
        )
        if (bits, group_size) != (want.bits, want.group_size):
            bits = group_size = None
    shape_ok = (
        rows == out_features
        and bits in SUPPORTED_BITS
        and group_size in SUPPORTED_GROUP_SIZES
        and tuple(biases.shape) == tuple(scales.shape)
        and scales.shape[0] == rows
    )
    if not shape_ok:
        fmt = config.module_format(name) or ModuleFormat(config.bits, config.group_size)
        want_w = [out_features, in_features * fmt.bits // 32]
        want_s = [out_features, in_features // fmt.group_size]
        raise ValueError(
            f"mlxq: layer {name!r} ({out_features}x{in_features}): mis-shaped tensors: "
            f"{name}.weight {list(weight.shape)}, {name}.scales {list(scales.shape)}, "
            f"{name}.biases {list(biases.shape)}; for bits={fmt.bits} group_size="
            f"{fmt.group_size} expected weight {want_w} and scales/biases {want_s}"
        )
    return ModuleFormat(bits, group_size, mode)


def add_mlx_lm_config_keys(config) -> None:
    """Make a saved config.json read the same in mlx-lm: its `quantization` block, and a
    top-level `rope_theta` (transformers 5 keeps it only in `rope_parameters`; mlx-lm 0.32
    reads the top-level key and silently falls back to a default otherwise)."""
    for cfg in config_and_text_config(config):
        rope = getattr(cfg, "rope_parameters", None)
        if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in vars(cfg):
            cfg.rope_theta = rope["rope_theta"]
    q = getattr(config, "quantization_config", None)
    if hasattr(q, "mlx_dict"):
        config.quantization = q.mlx_dict()


def checkpoint_keys_as_model_keys(model: nn.Module, headers: dict[str, TensorInfo]):
    """Rename checkpoint tensor names the way transformers will when loading them.

    Image-text checkpoints (mlx-vlm, older transformers) name tensors `language_model.model.*`
    where transformers 5 modules are `model.language_model.*`; the model's own renamings (and
    the base-model prefix) are applied per module, so `scales`/`biases` follow their `weight`.
    """
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
        if module not in modules:
            renamed, _ = rename_source_key(f"{module}.weight", renamings, [], prefix, meta)
            modules[module] = renamed.removesuffix(".weight")
        out[f"{modules[module]}.{leaf}" if modules[module] else leaf] = info
    return out


def _check_all_quantized_tensors_used(model, headers: dict[str, TensorInfo], used: set[str]):
    """Quantized tensors of modules mlxq cannot replace would load as garbage: refuse them."""
    for key in headers:
        if not key.endswith(".scales") or key[: -len(".scales")] in used:
            continue
        name = key[: -len(".scales")]
        try:
            kind = type(model.get_submodule(name)).__name__
        except AttributeError:
            kind = "no such module"
        raise NotImplementedError(
            f"mlxq: {key}: module {name!r} ({kind}) of {type(model).__name__} is quantized in the "
            "checkpoint, but mlxq runs quantized nn.Linear and nn.Embedding modules only "
            "(e.g. not fused MoE experts yet)"
        )


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _ties_embeddings(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None:
        return False
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))


def _drop_tied_keys(model: nn.Module, module_names: set[str]) -> None:
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


def tie_quantized_head(model: nn.Module, head_in_checkpoint: bool) -> str | None:
    """With tied embeddings and a quantized input embedding, make the head use it (as MLX does).

    Returns the head's module name when it was replaced.
    """
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None or head_in_checkpoint or not _ties_embeddings(model):
        return None
    embedding, head = get_in(), get_out()
    if not isinstance(embedding, AffineEmbedding) or head is None:
        return None
    head_name = _module_name(model, head)
    if head_name is None:
        return None
    model.set_submodule(head_name, TiedAffineHead(embedding))
    _drop_tied_keys(model, {head_name, _module_name(model, embedding) or ""})
    return head_name


def _has_cuda_kernels() -> bool:
    """Whether this build of mlxq registered CUDA kernels (csrc/cuda/, built only with CUDA)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("mlxq::affine_matmul", "CUDA")


class MLXHfQuantizer(HfQuantizer):
    """Loads MLX affine checkpoints into :mod:`mlxq.nn` modules (quant_method ``"mlx"``).

    With a float checkpoint and an explicit ``quantization_config=MLXQuantConfig(...)``, the
    model is loaded in float and quantized afterwards (as :func:`mlxq.quantize_model` does).
    """

    requires_calibration = False
    quantization_config: MLXQuantConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        devices = device_map.values() if isinstance(device_map, dict) else [device_map]
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

    def update_device_map(self, device_map):
        """A placement strategy ("auto", ...) means the one device mlxq runs on here."""
        if isinstance(device_map, str) and device_map in _PLACEMENT_STRATEGIES:
            if torch.cuda.is_available() and _has_cuda_kernels():
                return {"": "cuda"}
            return {"": "mps" if torch.backends.mps.is_available() else "cpu"}
        return device_map

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            return model
        headers = checkpoint_keys_as_model_keys(model, read_headers(checkpoint_files or []))
        config = self.quantization_config
        replaced: set[str] = set()
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear):
                dims = (module.in_features, module.out_features)
            elif isinstance(module, nn.Embedding):
                dims = (module.embedding_dim, module.num_embeddings)
            else:
                continue
            fmt = stored_format(name, *dims, headers, config)
            if fmt is None:
                continue
            dtype = module.weight.dtype if module.weight.is_floating_point() else torch.float16
            if isinstance(module, nn.Linear):
                new = AffineLinear(
                    *dims,
                    bias=module.bias is not None,
                    bits=fmt.bits,
                    group_size=fmt.group_size,
                    dtype=dtype,
                    device="meta",
                )
            else:
                new = AffineEmbedding(
                    module.num_embeddings,
                    module.embedding_dim,
                    bits=fmt.bits,
                    group_size=fmt.group_size,
                    padding_idx=module.padding_idx,
                    dtype=dtype,
                    device="meta",
                )
            model.set_submodule(name, new)
            replaced.add(name)
        _check_all_quantized_tensors_used(model, headers, replaced)
        if replaced:
            _drop_tied_keys(model, replaced)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head_name = _module_name(model, head)
        in_checkpoint = head_name is not None and f"{head_name}.weight" in headers
        tie_quantized_head(model, head_in_checkpoint=in_checkpoint)
        self.modules_to_not_convert = []
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        if not self.pre_quantized:
            from mlxq.quantize_model import quantize_model

            quantize_model(
                model,
                bits=config.bits,
                group_size=config.group_size,
                overrides=config.overrides,
                modules_to_not_convert=config.modules_to_not_convert,
            )
        for name, module in model.named_modules():
            if isinstance(module, (AffineLinear, AffineEmbedding)):
                for tensor_name, tensor in module.named_buffers(recurse=False):
                    if tensor.device.type == "meta":
                        raise ValueError(
                            f"mlxq: layer {name!r}: {name}.{tensor_name} was not loaded"
                        )
        model.config.quantization_config = config
        add_mlx_lm_config_keys(model.config)
        return model

    def get_weight_conversions(self):
        """Read transformers MetalConfig checkpoints too: their `qbiases` are our `biases`."""
        from transformers.core_model_loading import WeightRenaming

        return [WeightRenaming(source_patterns=r"\.qbiases$", target_patterns=".biases")]

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    def _dequantize(self, model, dtype=None):
        from mlxq.quantize_model import dequantize_model

        return dequantize_model(model, dtype=dtype)
