"""transformers weight conversions (load, and reversed by `save_pretrained`) that both
checkpoint layouts use: MLX's channels-last convolution weights and mlx-lm's 1 + w norm weights.

Kept apart from mlx_lm_layout and mlx_vlm_layout so that each imports these without importing
the other.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = [
    "CastOnSave",
    "cast_on_save",
    "cast_on_save_converter",
    "cast_on_save_converters",
    "join_casts",
    "save_as_read",
    "convert_cast_dtype",
    "save_as_convert",
    "ChannelsLastToFirst",
    "ScalarShape",
    "UnitOffset",
    "channels_last_converter",
    "permuted",
    "channels_last_perm",
    "scalar_conversions",
    "unit_offset_conversions",
]


def unit_offset_conversions(
    names: Iterable[str], patterns: tuple[str, ...], source: Callable[[str], str] | None = None
) -> list:
    """`WeightConverter`s taking 1 off each of `names` that one of `patterns` matches at load;
    `save_pretrained` adds it back. `source`: the name the converter matches for a model name
    where they differ (the base model's: with the checkpoint's `model.`)."""
    from transformers.core_model_loading import WeightConverter

    source = source or (lambda name: name)  # (`patterns` match its names)
    return [
        WeightConverter(
            source_patterns=f"^{re.escape(source(name))}",  # no `$`: reversed, it would stay
            target_patterns=name,
            operations=[UnitOffset(-1.0)],
        )
        for name in sorted(names)
        if any(re.search(p, source(name)) for p in patterns)
    ]


class UnitOffset:
    """A transformers `ConversionOps` adding `delta` (+-1) to a norm weight, in fp32; exact for
    stored values in [0.5, 2], where mlx-lm's 1 + w lies (its reverse adds -delta)."""

    def __new__(cls, delta: float):
        import torch
        from transformers.core_model_loading import ConversionOps

        class _Op(ConversionOps):
            def __init__(self, delta: float) -> None:
                self.delta = delta

            def __repr__(self) -> str:
                return f"UnitOffset({self.delta:+g})"

            @torch.no_grad()
            def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
                (value,) = input_dict.values()
                tensor = value[0] if isinstance(value, list) else value
                return {target_patterns[0]: (tensor.float() + self.delta).to(tensor.dtype)}

            @property
            def reverse_op(self):
                return _Op(-self.delta)

            def __reduce__(self):  # a local class: pickled as the call that makes it
                return (UnitOffset, (self.delta,))

        return _Op(delta)


def scalar_conversions(
    names: Iterable[str], patterns: tuple[str, ...], source: Callable[[str], str] | None = None
) -> list:
    """`WeightConverter`s giving each of `names` that one of `patterns` matches the shape [1]
    at load (mlx-lm stores it as a scalar); `save_pretrained` writes the scalar back.
    `source`: as for :func:`unit_offset_conversions`."""
    from transformers.core_model_loading import WeightConverter

    source = source or (lambda name: name)  # (`patterns` match its names)
    return [
        WeightConverter(
            source_patterns=f"^{re.escape(source(name))}",  # no `$`: reversed, it would stay
            target_patterns=name,
            operations=[ScalarShape(False)],
        )
        for name in sorted(names)
        if any(re.search(p, source(name)) for p in patterns)
    ]


class ScalarShape:
    """A transformers `ConversionOps`: a one-value tensor as shape [1] (`scalar=False`) or as
    a scalar (its reverse); either way the same value, whatever shape it is stored in."""

    def __new__(cls, scalar: bool):
        from transformers.core_model_loading import ConversionOps

        class _Op(ConversionOps):
            def __init__(self, scalar: bool) -> None:
                self.scalar = scalar

            def __repr__(self) -> str:
                return f"ScalarShape({'[]' if self.scalar else '[1]'})"

            @torch.no_grad()
            def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
                (value,) = input_dict.values()
                tensor = value[0] if isinstance(value, list) else value
                return {target_patterns[0]: tensor.reshape(() if self.scalar else (1,))}

            @property
            def reverse_op(self):
                return _Op(not self.scalar)

            def __reduce__(self):  # a local class: pickled as the call that makes it
                return (ScalarShape, (self.scalar,))

        return _Op(scalar)


def channels_first_perm(ndim: int) -> tuple[int, ...]:
    """Permutation channels-last -> channels-first for a weight of `ndim` dimensions."""
    return (0, ndim - 1, *range(1, ndim - 1))


def channels_last_perm(ndim: int) -> tuple[int, ...]:
    return (0, *range(2, ndim), 1)


def permuted(shape: tuple[int, ...], perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[i] for i in perm)


class ChannelsLastToFirst:
    """A transformers `ConversionOps`: an MLX channels-last convolution weight to PyTorch's
    channels-first layout (its reverse, used by `save_pretrained`, permutes it back)."""

    def __new__(cls, to_first: bool = True):
        from transformers.core_model_loading import ConversionOps

        class _Op(ConversionOps):
            def __init__(self, to_first: bool) -> None:
                self.to_first = to_first

            def __repr__(self) -> str:
                return "ChannelsLastToFirst" if self.to_first else "ChannelsFirstToLast"

            @torch.no_grad()
            def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
                (value,) = input_dict.values()
                tensor = value[0] if isinstance(value, list) else value
                perm = (
                    channels_first_perm(tensor.dim())
                    if self.to_first
                    else channels_last_perm(tensor.dim())
                )
                return {target_patterns[0]: tensor.permute(perm).contiguous()}

            @property
            def reverse_op(self):
                return _Op(not self.to_first)

            def __reduce__(self):  # a local class: pickled as the call that makes it
                return (ChannelsLastToFirst, (self.to_first,))

        return _Op(to_first)


def channels_last_converter(key: str, source_key: str | None = None) -> Any:
    """A `WeightConverter` permuting the convolution weight `key` from MLX's channels-last
    layout when loading, and back when `save_pretrained` reverses it. `source_key`: the name
    it matches where it differs from `key` (the base model's: with the checkpoint's `model.`)."""
    from transformers.core_model_loading import WeightConverter

    return WeightConverter(
        # no `$`: reversed, it would stay
        source_patterns=f"^{re.escape(source_key or key)}",
        target_patterns=key,
        operations=[ChannelsLastToFirst(True)],
    )


class CastOnSave:
    """A transformers `ConversionOps` that loads a tensor as it is and whose reverse, used by
    `save_pretrained`, casts it to `dtype` (a torch dtype's name)."""

    def __new__(cls, dtype: str, saving: bool = False):
        from transformers.core_model_loading import ConversionOps

        class _Op(ConversionOps):
            def __init__(self, dtype: str, saving: bool) -> None:
                self.dtype, self.saving = dtype, saving

            def __repr__(self) -> str:
                return f"CastOnSave({self.dtype})" if self.saving else "AsLoaded"

            @torch.no_grad()
            def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
                (value,) = input_dict.values()
                tensor = value[0] if isinstance(value, list) else value
                if self.saving:
                    tensor = tensor.to(getattr(torch, self.dtype))
                return {target_patterns[0]: tensor}

            @property
            def reverse_op(self):
                return _Op(self.dtype, not self.saving)

            def __reduce__(self):  # a local class: pickled as the call that makes it
                return (CastOnSave, (self.dtype, self.saving))

        return _Op(dtype, saving)


def cast_on_save_converters(model, keep: tuple[str, ...] = ()) -> list:
    """`WeightConverter`s that save the model's float32 tensors (those transformers keeps in
    float32 in a bfloat16 / float16 model: routers' correction biases, `A_log`, `dt_bias`) in
    the model's dtype, as `mlx_lm convert` casts every float tensor to the config's dtype;
    names containing one of `keep` (the model's mlx-lm `cast_predicate`) stay as they are.
    The rule of a model built in memory (no file): one read from a checkpoint is saved as
    `mlx_lm convert` writes that checkpoint (:func:`save_as_convert`)."""
    from transformers.core_model_loading import WeightConverter

    tensors = model.state_dict().items()  # (persistent buffers only)
    sizes: dict[torch.dtype, int] = {}  # the model's dtype: most of its float values
    for _, tensor in tensors:
        if tensor.is_floating_point():
            sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    dtype = max(sizes, key=sizes.get) if sizes else None
    if dtype not in (torch.bfloat16, torch.float16):
        return []
    return [
        WeightConverter(
            source_patterns=f"^{re.escape(key)}",  # (no `$`, as channels_last_converter)
            target_patterns=key,
            operations=[CastOnSave(str(dtype).removeprefix("torch."))],
        )
        for key, tensor in tensors
        if tensor.dtype == torch.float32 and not any(k in key for k in keep)
    ]


def join_casts(conversions: list, casts: list) -> list:
    """The `casts` (:func:`cast_on_save_converters`) of tensors that no converter of
    `conversions` saves; the cast of a tensor that one does (GLM-5-Next's float32 conv1d,
    which mlx-vlm's layout also permutes channels-last) joins that converter's operations:
    transformers saves each tensor through one converter, so a second would be ignored."""
    owners = {
        (tuple(c.source_patterns), tuple(c.target_patterns)): c
        for c in conversions
        if getattr(c, "operations", None)
    }
    out = []
    for cast in casts:
        owner = owners.get((tuple(cast.source_patterns), tuple(cast.target_patterns)))
        if owner is None:
            out.append(cast)
        else:
            owner.operations.extend(cast.operations)
    return out


def cast_on_save_converter(key: str, dtype: torch.dtype) -> Any:
    """A `WeightConverter` that `save_pretrained` reverses into a cast of tensor `key` to
    `dtype` (loading leaves it as it is)."""
    from transformers.core_model_loading import WeightConverter

    return WeightConverter(
        source_patterns=f"^{re.escape(key)}",  # no `$`: reversed, it would stay
        target_patterns=key,
        operations=[CastOnSave(str(dtype).removeprefix("torch."))],
    )


def _is_cast(op: Any) -> bool:
    return type(op).__qualname__.startswith("CastOnSave")


def cast_on_save(model, dtypes: dict[str, torch.dtype]) -> None:
    """`save_pretrained` writes tensor `name` of `model` in `dtypes[name]` (replacing the casts
    asked before: once, where quantize_model follows a load)."""
    kept = []
    for c in getattr(model, "_weight_conversions", None) or []:
        ops = list(getattr(c, "operations", ()))
        if any(_is_cast(op) for op in ops):
            if all(_is_cast(op) for op in ops):
                continue  # a cast's own converter
            c.operations = [op for op in ops if not _is_cast(op)]  # a cast joined to it
        kept.append(c)
    casts = [cast_on_save_converter(name, dtype) for name, dtype in sorted(dtypes.items())]
    model._weight_conversions = [*kept, *join_casts(kept, casts)]


_STORED_FLOATS = {"BF16": torch.bfloat16, "F16": torch.float16}


def save_as_read(model, stored: dict) -> list[str]:
    """A checkpoint read into a bf16 / fp16 model is saved in the dtypes it was read in where
    the model holds a tensor in fp32 that the file stored in bf16 / fp16: those transformers
    keeps fp32 (`_keep_in_fp32_modules_strict`: the routers of GLM-4.5, DeepSeek V3, GLM-4.5V)
    and mlxq's quantized layers built on them (ERNIE 4.5's quantized router's scales). Before,
    saving wrote them fp32. `stored`: the model's state-dict key -> its header's TensorInfo.
    Returns their names."""
    if getattr(getattr(model, "config", None), "dtype", None) not in _STORED_FLOATS.values():
        return []
    dtypes = {}
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        info = stored.get(name)
        if tensor.dtype == torch.float32 and info is not None and info[0] in _STORED_FLOATS:
            dtypes[name] = _STORED_FLOATS[info[0]]
    if dtypes:
        cast_on_save(model, dtypes)
    return sorted(dtypes)


_HEADER_FLOATS = {**_STORED_FLOATS, "F32": torch.float32}
_CONVERT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def convert_cast_dtype(config: dict) -> torch.dtype | None:
    """The dtype `mlx_lm convert` / `mlx_vlm convert` cast a float checkpoint's tensors to (no
    --dtype given), from its config.json: `torch_dtype`, else text_config's `dtype`. None for
    a text model saved by transformers 5, which writes only a top-level `dtype` (not read by
    mlx-lm 0.32): then every tensor keeps the dtype the file stores."""
    name = config.get("torch_dtype")
    if name is None:
        name = (config.get("text_config") or {}).get("dtype")
    return _CONVERT_DTYPES.get(name) if isinstance(name, str) else None


def save_as_convert(
    model, stored: dict, cast: torch.dtype | None, keep: tuple[str, ...] = ()
) -> dict[str, torch.dtype]:
    """A bf16 / fp16 model read from a float checkpoint and quantized saves the tensors it holds
    in fp32 (those transformers keeps fp32: routers' weights and correction biases; mlxq's
    quantized layers built on them: ERNIE 4.5's router) in the dtype `mlx_lm convert -q` writes
    for that checkpoint: `cast` (:func:`convert_cast_dtype`) unless a name holds one of `keep`
    (mlx-lm's `cast_predicate`), else the dtype the file stores. A tensor the file lacks is
    saved in the model's dtype (the rule of a model built in memory,
    :func:`cast_on_save_converters`). `stored`: the model's state-dict key -> its header's
    TensorInfo; a quantized layer's scales and biases follow its stored `weight`.
    Returns the casts asked of save_pretrained (name -> dtype)."""
    tensors = model.state_dict()
    sizes: dict[torch.dtype, int] = {}  # the model's dtype: most of its float values
    for tensor in tensors.values():
        if tensor.is_floating_point():
            sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    dtype = max(sizes, key=sizes.get) if sizes else None
    # an fp32 model of a checkpoint convert casts nothing, loaded without dtype= (the mark
    # of keep_stored_fp32): its 16-bit tensors (bf16 norms), upcast at load, saved as stored
    # (a quantized layer's scales stay as computed, in fp32)
    fp32_as_stored = (
        dtype == torch.float32 and cast is None and getattr(model, "_mlxq_as_stored", False)
    )
    if dtype not in (torch.bfloat16, torch.float16) and not fp32_as_stored:
        return {}
    dtypes = {}
    for name, tensor in tensors.items():
        if tensor.dtype != torch.float32:
            continue
        info = stored.get(name)
        if info is None and name.endswith((".scales", ".biases")) and not fp32_as_stored:
            info = stored.get(f"{name.rpartition('.')[0]}.weight")
        kept = any(k in name for k in keep)
        if info is None or info[0] not in _HEADER_FLOATS:
            if not kept:
                dtypes[name] = dtype
        elif cast is not None and not kept:
            dtypes[name] = cast
        else:
            dtypes[name] = _HEADER_FLOATS[info[0]]
    dtypes = {k: v for k, v in dtypes.items() if v != torch.float32}
    if dtypes:
        if getattr(model, "_weight_conversions", None) is None:  # what transformers reverts
            from transformers.conversion_mapping import get_model_conversion_mapping

            model._weight_conversions = get_model_conversion_mapping(model, add_legacy=False)
        cast_on_save(model, dtypes)
    return dtypes
