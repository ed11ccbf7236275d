"""LoRA fine-tuning of mlxq models with PEFT, and the way back to mlx-lm.

- :class:`AffineLoraLinear` is PEFT's LoRA layer for :class:`mlxq.nn.AffineLinear`: the packed
  base stays frozen and packed (its forward is the quantized matmul, whose gradient w.r.t. the
  input flows to earlier adapters), the adapter is a float ``x @ A.T @ B.T * scaling``.
  It plugs in through PEFT's extension point for custom layers
  (``LoraConfig._register_custom_module``); :func:`register` does that for a config, and
  :func:`lora_config` builds a registered config.
- :func:`save_mlx_lm_adapters` writes ``adapters.safetensors`` + ``adapter_config.json`` as
  mlx-lm's trainer does, so that ``mlx_lm.load(path, adapter_path=...)`` and
  ``mlx_lm generate --adapter-path`` use them; :func:`load_mlx_lm_adapters` reads such a
  directory (e.g. trained by ``mlx_lm lora``) into a PEFT model.
- Merging (``peft_model.merge_and_unload()``, or :func:`fuse`) dequantizes the base, adds the
  adapter's delta and re-quantizes to the same bits and group size, as ``mlx_lm fuse`` does
  (same roundings in the same dtypes), so the fused model is an MLX checkpoint again.

mlx-lm's adapter format, and what it cannot express (refused by name rather than dropped):
one rank and one scale for every adapted layer; the same layer-relative ``keys`` in each of the
last ``num_layers`` decoder layers; tensors ``{module}.lora_a`` ``[in, r]`` and
``{module}.lora_b`` ``[r, out]``; output ``y + scale * (x @ lora_a) @ lora_b``. No LoRA
bias, no DoRA through this module, no ``modules_to_save``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlxq.nn import AffineLinear
from mlxq.ops import dequantize, quantize

try:
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import check_adapters_to_merge
except ImportError as exc:  # pragma: no cover - peft is an optional dependency
    raise ImportError("mlxq.integrations.peft needs `peft` (pip install peft)") from exc

__all__ = [
    "AffineLoraLinear",
    "register",
    "lora_config",
    "save_mlx_lm_adapters",
    "load_mlx_lm_adapters",
    "fuse",
]


class AffineLoraLinear(nn.Module, LoraLayer):
    """PEFT LoRA layer around an :class:`AffineLinear` (packed, frozen base).

    The adapter weights live in their own dtype (PEFT keeps them in fp32 by default, also for a
    bf16 model); the input is cast to it and the adapter output back to the base output's dtype.
    :meth:`merge` re-quantizes the base in place (see :func:`fuse`); it cannot be undone exactly,
    so :meth:`unmerge` refuses.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        for field, what in (
            ("use_dora", "DoRA"),
            ("lora_bias", "a LoRA bias"),
            ("fan_in_fan_out", "fan_in_fan_out"),
        ):
            if getattr(config, field, False):
                raise ValueError(f"mlxq: AffineLoraLinear does not support {what} ({field}=True)")
        for field in ("velora_config", "arrow_config", "monteclora_config", "kasa_config"):
            if getattr(config, field, None) is not None:
                raise ValueError(f"mlxq: AffineLoraLinear supports plain LoRA only ({field} set)")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("mlxq: AffineLoraLinear does not support mixed-adapter batches")
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            if self.disable_adapters and self.merged:
                raise RuntimeError(
                    "mlxq: adapters were merged into the re-quantized weights; they cannot be "
                    "disabled again"
                )
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            h = self._cast_input_dtype(x, lora_a.weight.dtype)
            out = lora_b(lora_a(self.lora_dropout[name](h))) * self.scaling[name]
            result = result + out.to(result.dtype)
        return result

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """`scaling * B @ A` `[out, in]` in the adapter's dtype, as mlx-lm's fuse computes it
        (`(scale * lora_b.T) @ lora_a.T`) on MLX's CPU.

        The rank-r sum runs k in order, each product and running sum rounded to fp32, with no
        fused multiply-add: the order of MLX's CPU GEMM (reference BLAS). A torch matmul fuses
        and differs in the last bit for ~5% of entries, enough to flip a re-quantized word now
        and then."""
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        acc_dtype = torch.promote_types(a.dtype, torch.float32)
        sb = (self.scaling[adapter] * b).to(acc_dtype)
        a = a.to(acc_dtype)
        delta = sb[:, :1] * a[0]
        for k in range(1, a.shape[0]):
            delta = delta + sb[:, k : k + 1] * a[k]
        return delta.to(b.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters into the base: dequantize (the dtype of the scales; bfloat16 for
        the floating-point modes, MLX's default there), add each delta rounded to that dtype,
        re-quantize with the same bits, group size and mode. `safe_merge` checks the merged
        weight for NaN/Inf before it replaces the base."""
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lora_A]
        if not names:
            return
        base = self.get_base_layer()
        fmt = (base.group_size, base.bits, base.mode)
        with torch.no_grad():
            w = dequantize(base.weight, base.scales, base.biases, *fmt)
            for name in names:
                w = w + self.get_delta_weight(name).to(w.dtype)
            if not torch.isfinite(w).all():
                # quantizing NaN/Inf gives garbage scales; refuse whether or not safe_merge
                raise ValueError(f"mlxq: merging adapter(s) {names} gives non-finite weights")
            packed = quantize(w, *fmt)  # (weight, scales, biases) affine, (weight, scales) else
            buffers = (base.weight, base.scales, base.biases)[: len(packed)]
            for buffer, value in zip(buffers, packed, strict=True):
                buffer.copy_(value)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        raise RuntimeError(
            "mlxq: a LoRA adapter merged into quantized weights cannot be unmerged exactly "
            "(the merge re-quantizes); keep an unmerged copy instead"
        )

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register(config: LoraConfig) -> LoraConfig:
    """Register :class:`AffineLoraLinear` for :class:`AffineLinear` targets in `config` (PEFT's
    custom-module extension point) and return it."""
    config._register_custom_module({AffineLinear: AffineLoraLinear})
    return config


def lora_config(**kwargs: Any) -> LoraConfig:
    """`peft.LoraConfig(**kwargs)` with mlxq's layers registered: pass it to
    `peft.get_peft_model`."""
    return register(LoraConfig(**kwargs))


# -- mlx-lm's adapter format ----------------------------------------------------------------


def _check_layout(model: nn.Module) -> None:
    from mlxq.integrations.mlx_lm_layout import LAYOUTS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layout = LAYOUTS.get(model_type or "")
    if layout is not None and layout.save_renamed:  # else mlx-lm names modules as transformers
        raise ValueError(
            f"mlxq: model_type {model_type!r} has different module names in mlx-lm; adapters "
            "for it are not translated yet"
        )


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The one ModuleList named `...layers` (mlx-lm's `model.layers`), with its name."""
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers"
    ]
    if len(found) != 1:
        names = [n for n, _ in found]
        raise ValueError(f"mlxq: expected one decoder layer list `*.layers`, found {names}")
    return found[0]


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def save_mlx_lm_adapters(model: PeftModel, path: str | Path, adapter_name: str = "default") -> Path:
    """Write adapter `adapter_name` of `model` in mlx-lm's format into directory `path`.

    Tensors are written in the adapter's dtype. Raises ValueError naming what mlx-lm's format
    cannot hold (differing ranks or scales, LoRA biases, DoRA, adapters outside the decoder
    layers, per-layer target sets that differ, embedding adapters, modules_to_save).
    """
    from safetensors.torch import save_file

    base = _base(model)
    _check_layout(base)
    cfg = model.peft_config[adapter_name]
    if getattr(cfg, "modules_to_save", None):
        raise ValueError(f"mlxq: modules_to_save={cfg.modules_to_save} has no mlx-lm form")
    layers_name, layers = _decoder_layers(base)
    prefix = layers_name + "."
    tensors: dict[str, torch.Tensor] = {}
    per_layer: dict[int, set[str]] = {}
    ranks, scales = set(), set()
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.r:
            continue
        if adapter_name not in module.lora_A or not isinstance(
            module.lora_A[adapter_name], nn.Linear
        ):
            raise ValueError(f"mlxq: {name}: only linear LoRA adapters have an mlx-lm form")
        if module.lora_bias.get(adapter_name) or adapter_name in module.lora_variant:
            raise ValueError(f"mlxq: {name}: LoRA bias / DoRA / variants have no mlx-lm form")
        m = re.fullmatch(re.escape(prefix) + r"(\d+)\.(.+)", name)
        if m is None:
            raise ValueError(f"mlxq: {name}: mlx-lm adapts only modules inside {layers_name}")
        per_layer.setdefault(int(m.group(1)), set()).add(m.group(2))
        ranks.add(module.r[adapter_name])
        scales.add(float(module.scaling[adapter_name]))
        a = module.lora_A[adapter_name].weight.detach()
        b = module.lora_B[adapter_name].weight.detach()
        tensors[f"{name}.lora_a"] = a.t().contiguous().cpu()  # [in, r]
        tensors[f"{name}.lora_b"] = b.t().contiguous().cpu()  # [r, out]
    if not tensors:
        raise ValueError(f"mlxq: the model has no LoRA adapter named {adapter_name!r}")
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(
            f"mlxq: mlx-lm needs one rank and one scale for all layers, got ranks "
            f"{sorted(ranks)} and scales {sorted(scales)}"
        )
    n = len(layers)
    num_layers = len(per_layer)
    keys = next(iter(per_layer.values()))
    expected = set(range(n - num_layers, n))
    if set(per_layer) != expected or any(k != keys for k in per_layer.values()):
        raise ValueError(
            "mlxq: mlx-lm adapts the same modules in each of the last num_layers layers; "
            f"this adapter covers layers {sorted(per_layer)} of {n} with modules "
            f"{ {i: sorted(k) for i, k in sorted(per_layer.items())} }"
        )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapters.safetensors"))
    config = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {
            "rank": ranks.pop(),
            "scale": scales.pop(),
            "dropout": float(cfg.lora_dropout),
            "keys": sorted(keys),
        },
        "model": getattr(getattr(base, "config", None), "_name_or_path", None),
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=4))
    return out


def load_mlx_lm_adapters(
    model: nn.Module, path: str | Path, adapter_name: str = "default", is_trainable: bool = False
) -> PeftModel:
    """Wrap `model` (an mlxq-loaded transformers model) in a PEFT model carrying the mlx-lm
    adapters in directory `path` (`adapters.safetensors` + `adapter_config.json`).

    Every tensor of the file must land on a module and every adapted module must get both of
    its tensors, with mlx-lm's shapes; anything else is an error naming the key.
    """
    from safetensors.torch import load_file

    _check_layout(model)
    path = Path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise ValueError(f"mlxq: {path}: fine_tune_type {kind!r} is not supported (only 'lora')")
    params = config["lora_parameters"]
    layers_name, layers = _decoder_layers(model)
    n = len(layers)
    num_layers = int(config["num_layers"])
    first = n - num_layers if 0 < num_layers < n else 0  # mlx-lm: layers[-max(num_layers, 0):]
    keys = params.get("keys")
    if keys is None:  # mlx-lm's default: every linear layer (and embedding) inside the layers
        keys = sorted(
            k
            for k, m in layers[first].named_modules()
            if k and isinstance(m, (nn.Linear, AffineLinear, nn.Embedding))
        )
    targets = [f"{layers_name}.{i}.{k}" for i in range(first, n) for k in keys]
    rank, scale = int(params["rank"]), float(params["scale"])
    cfg = lora_config(
        r=rank,
        lora_alpha=scale * rank,
        lora_dropout=float(params.get("dropout", 0.0)),
        # a string is matched against the whole module name: exactly these modules
        target_modules="|".join(re.escape(t) for t in targets),
        inference_mode=not is_trainable,
    )
    peft_model = get_peft_model(model, cfg, adapter_name=adapter_name)
    weights = load_file(str(path / "adapters.safetensors"))
    base = peft_model.get_base_model()
    modules = dict(base.named_modules())
    unused = set(weights)
    with torch.no_grad():
        for t in targets:
            module = modules.get(t)
            if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
                raise ValueError(f"mlxq: {path}: adapter target {t} is not a linear layer")
            for leaf, lin in (("lora_a", module.lora_A), ("lora_b", module.lora_B)):
                key = f"{t}.{leaf}"
                if key not in weights:
                    raise ValueError(f"mlxq: {path}: adapters.safetensors lacks {key}")
                w = weights[key].t()
                dst = lin[adapter_name].weight
                if w.shape != dst.shape:
                    raise ValueError(
                        f"mlxq: {path}: {key} has shape {list(weights[key].shape)}, expected "
                        f"{list(dst.t().shape)}"
                    )
                dst.copy_(w.to(dst.dtype))
                unused.discard(key)
            module.scaling[adapter_name] = scale  # exactly mlx-lm's scale, not alpha / r
    if unused:
        raise ValueError(f"mlxq: {path}: tensors not used by any adapted module: {sorted(unused)}")
    return peft_model


def fuse(model: PeftModel) -> nn.Module:
    """Merge the active adapters into the quantized weights and drop the PEFT wrappers: the
    result holds re-quantized :class:`AffineLinear` layers, bit-exact with `mlx_lm fuse` on the
    same base and adapters, and `save_pretrained` writes it as an MLX checkpoint."""
    return model.merge_and_unload()
