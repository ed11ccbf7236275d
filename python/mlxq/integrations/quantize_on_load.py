"""Quantizing a float checkpoint tensor by tensor while transformers loads it.

As transformers' own on-the-fly quantizers do (`requires_calibration = False`): before the
weights load, every layer the config quantizes is replaced on the meta device by its empty
mlxq module (:func:`plan_on_load`, the same walk as :func:`mlxq.quantize_model`); transformers
then asks :meth:`MLXHfQuantizer.param_needs_quantization` for each checkpoint tensor and runs
:class:`QuantizeOnLoad` on each float `weight` of those layers as soon as it is read, so
that the float tensor is dropped right away. The peak memory is about the quantized model
plus one float tensor (transformers loads synchronously while quantizing on the fly), not the
float model. The tensors are bit-for-bit those :func:`mlxq.quantize_model` makes from the
loaded float model (tested in tests/test_quantize_on_load.py).
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps

from mlxq.format import ModuleFormat
from mlxq.model_walk import plan_quantization, tie_head
from mlxq.swap import SwapPlan

__all__ = ["OnLoadLayer", "plan_on_load", "QuantizeOnLoad", "release_file_pages"]


@dataclass(frozen=True)
class OnLoadLayer:
    """A layer quantized while it loads: how it maps onto mlxq, its format, and the float
    dtype the loaded model would have given its weight (quantized in that dtype)."""

    plan: SwapPlan
    format: ModuleFormat
    dtype: torch.dtype


def plan_on_load(model: nn.Module, config) -> tuple[dict[str, OnLoadLayer], set[str]]:
    """Replace the layers `config` (an MLXQuantConfig) quantizes by empty mlxq modules on the
    meta device, and a tied head by a view of the quantized embedding.

    Returns the layers whose float `weight` is to be quantized as it loads, and the names of
    all modules replaced.
    """
    walk = plan_quantization(
        model, config.default_format, config.overrides, config.modules_to_not_convert
    )
    layers: dict[str, OnLoadLayer] = {}
    # the weights transformers loads in fp32 in a bf16 / fp16 model (its dtype plan; mlxq adds
    # the ones the converter keeps as stored, keep_stored_fp32): quantized in fp32, as MLX does
    keep = [k.replace("*", ".*") for k in getattr(model, "_keep_in_fp32_modules_strict", ()) or ()]
    fp32 = re.compile("|".join(keep)) if keep else None
    for entry in walk.modules:
        if entry.moe is not None and (entry.format is not None or any(entry.parts.values())):
            raise NotImplementedError(
                f"mlxq: module {entry.name!r} ({entry.moe.cls_name}) is a MoE "
                f"{entry.moe.kind} that mlxq cannot quantize while it loads yet; load the float "
                "model and call mlxq.quantize_model (mlxq convert does that for MoE models), or "
                f"keep it float: modules_to_not_convert=[{entry.name!r}]"
            )
        fmt = entry.format
        if entry.swap is None or fmt is None:
            continue
        weight = entry.module.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.get_default_dtype()
        if (
            dtype in (torch.bfloat16, torch.float16)
            and fp32
            and fp32.search(f"{entry.name}.weight")
        ):
            dtype = torch.float32
        new = entry.swap.require().empty(fmt.bits, fmt.group_size, dtype, "meta", fmt.mode)
        model.set_submodule(entry.name, new)
        layers[entry.name] = OnLoadLayer(entry.swap, fmt, dtype)
    replaced = set(layers)
    if tie_head(model, walk.head):
        replaced.add(walk.head.head)
    return layers, replaced


class QuantizeOnLoad(ConversionOps):
    """The conversion transformers runs on each float `weight` of a layer in the plan: returns
    the layer's packed `weight`, `scales` (and `biases` in affine mode), bit-exact with
    `mlx.nn.quantize` (:meth:`mlxq.nn.AffineLinear.load_quantized`)."""

    def __init__(self, layers: dict[str, OnLoadLayer], files: list[str] | None = None) -> None:
        self.layers = layers
        self.files = [os.path.realpath(f) for f in files or []]
        self._pending = 0  # float bytes quantized since the file pages were last released
        # transformers logs a conversion's exception and goes on: kept here so that the
        # quantizer's check after loading names the layer and the reason
        self.errors: dict[str, str] = {}
        self.done: set[str] = set()  # the layers quantized (the others found no float weight)

    def convert(self, input_dict: dict, **kwargs: Any) -> dict[str, torch.Tensor]:
        key, value = next(iter(input_dict.items()))
        value = value[0] if isinstance(value, list) else value
        name = key.removesuffix(".weight")
        try:
            out = self._quantize(key, name, value)
        except Exception as error:
            self.errors[name] = str(error).removeprefix("mlxq: ")
            raise
        self.done.add(name)
        # every 16 MiB of float weights: reading /proc/self/smaps costs ~30 ms in a process
        # with torch loaded, and a page of the file stays resident until then anyway
        self._pending += value.numel() * value.element_size()
        if self._pending >= _RELEASE_EVERY:
            release_file_pages(self.files)
            self._pending = 0
        return out

    def _quantize(self, key: str, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        layer = self.layers.get(name)
        if layer is None or key != f"{name}.weight":
            raise ValueError(f"mlxq: {key} is not the float weight of a layer mlxq quantizes")
        plan, fmt = layer.plan, layer.format
        # a Conv1D weight is [in, out]; MLX stores [out, in]
        shape = (plan.in_features, plan.out_features) if plan.transposed else None
        shape = shape or (plan.out_features, plan.in_features)
        if tuple(value.shape) != shape:
            raise ValueError(
                f"mlxq: {key} has shape {list(value.shape)}; layer {name!r} expects {list(shape)}"
            )
        # the loaded model would hold the weight in its own dtype: quantize that, as
        # quantize_model does
        w = value.to(layer.dtype)
        w = w.t() if plan.transposed else w
        module = plan.empty(fmt.bits, fmt.group_size, layer.dtype, w.device, fmt.mode)
        if w.device.type != "meta":  # device_map="meta": the tensors' shapes, no values
            module.load_quantized(w.contiguous())
        return {
            f"{name}.{leaf}": tensor
            for leaf, tensor in module.named_buffers(recurse=False)
            if leaf in ("weight", "scales", "biases")
        }


_MADV_DONTNEED = 4
_RELEASE_EVERY = 16 << 20


def release_file_pages(files: list[str]) -> None:
    """Give back the pages of the memory-mapped checkpoint `files` read so far (Linux).

    transformers reads safetensors through a mapping of each file that stays open until every
    tensor is loaded, so each page read would stay resident: the whole float file by the end.
    A mapping none of whose pages was written (no anonymous copy-on-write pages, as
    /proc/self/smaps reports) holds only the file's contents: dropping its pages is safe, the
    next access reads them again from the page cache or the file. Other mappings are left.
    """
    if not files or not sys.platform.startswith("linux"):
        return
    try:
        with open("/proc/self/smaps") as smaps:
            lines = smaps.read().splitlines()
    except OSError:
        return
    wanted = set(files)
    ranges: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for line in lines:
        parts = line.split(maxsplit=5)
        if parts and "-" in parts[0] and len(parts) >= 5:  # a mapping's header line
            current = None
            if len(parts) == 6 and parts[5] in wanted:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                current = (start, end)
        elif current is not None and parts[:1] == ["Anonymous:"]:
            if parts[1] == "0":  # never written: only the file's pages
                ranges.append(current)
            current = None
    libc = ctypes.CDLL(None, use_errno=True)
    for start, end in ranges:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)
    # the float tensor just freed sits between quantized ones in glibc's heap, which keeps
    # such holes resident (measured: ~1x the float file by the end); give their pages back
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
