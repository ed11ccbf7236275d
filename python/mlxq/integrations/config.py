"""`MLXQuantConfig`: the `quantization` block of an MLX config.json, as a transformers config.

mlx-lm writes ``{"group_size": 32, "bits": 4, "mode": "affine"}`` plus, for mixed recipes,
one entry per module path (``{"group_size": 64, "bits": 8}``, or ``false`` for a module kept in
float). That dict is read and written back unchanged; ``quant_method: "mlx"`` is added so that
transformers can dispatch it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

__all__ = [
    "MLXQuantConfig",
    "ModuleFormat",
    "QUANT_METHOD",
    "RUNNABLE_MODES",
    "is_mlx_quantization",
]

QUANT_METHOD = "mlx"
RUNNABLE_MODES = ("affine",)
KNOWN_MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")
_GLOBAL_KEYS = ("group_size", "bits", "mode")


@dataclass(frozen=True)
class ModuleFormat:
    """How one module is stored: its bits, group size and mode."""

    bits: int
    group_size: int
    mode: str = "affine"


def config_and_text_config(config: Any) -> list[Any]:
    """`config`, plus its text (decoder) sub-config when it has a distinct one (image-text
    models keep quantization and rope settings there)."""
    configs = [config]
    if hasattr(config, "get_text_config"):
        text = config.get_text_config(decoder=True)
        if text is not config:
            configs.append(text)
    return configs


def is_mlx_quantization(q: Any) -> bool:
    """True for an MLX `quantization` dict: `bits` and `group_size`, no foreign `quant_method`."""
    if not isinstance(q, dict) or "bits" not in q or "group_size" not in q:
        return False
    return q.get("quant_method") in (None, QUANT_METHOD)


class MLXQuantConfig(QuantizationConfigMixin):
    """Quantization config of an MLX checkpoint (affine: uint32 weight, scales, biases).

    Args:
        bits: default bits of quantized modules (2, 3, 4, 5, 6, 8).
        group_size: default group size (32, 64, 128).
        mode: ``"affine"``; the float modes ``mxfp4``/``nvfp4``/``mxfp8`` are recognised but
            mlxq does not run them yet (loading raises an error naming the layer).
        overrides: per-module entries, module path -> ``{"bits": .., "group_size": ..}`` or
            ``False`` (kept in float), as in mlx-lm's mixed recipes.
        modules_to_not_convert: module paths kept in float when quantizing a float model.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 64,
        mode: str = "affine",
        overrides: dict[str, dict | bool] | None = None,
        modules_to_not_convert: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.bits, self.group_size, self.mode = bits, group_size, mode
        self.overrides: dict[str, dict | bool] = dict(overrides or {})
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        for key, value in kwargs.items():  # per-module entries of a config.json
            if isinstance(value, dict) or value is False:
                self.overrides[key] = value
        self.post_init()

    def post_init(self) -> None:
        if self.mode not in KNOWN_MODES:
            raise ValueError(f"mlxq: unknown MLX quantization mode {self.mode!r} ({KNOWN_MODES})")
        for name, entry in self.overrides.items():
            if not (entry is False or isinstance(entry, dict)):
                raise ValueError(
                    f"mlxq: quantization entry for {name!r} must be a dict or false, got {entry!r}"
                )

    def module_format(self, name: str) -> ModuleFormat | None:
        """The configured format of module `name`, or None where the config keeps it float."""
        if name in self.modules_to_not_convert:
            return None
        entry = self.overrides.get(name)
        if entry is False:
            return None
        entry = entry if isinstance(entry, dict) else {}
        return ModuleFormat(
            bits=int(entry.get("bits", self.bits)),
            group_size=int(entry.get("group_size", self.group_size)),
            mode=entry.get("mode", self.mode),
        )

    def mlx_dict(self) -> dict[str, Any]:
        """The `quantization` block mlx-lm reads (no `quant_method`)."""
        out: dict[str, Any] = {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}
        out.update(self.overrides)
        return out

    def to_dict(self) -> dict[str, Any]:
        out = self.mlx_dict()
        out["quant_method"] = QUANT_METHOD
        if self.modules_to_not_convert:
            out["modules_to_not_convert"] = list(self.modules_to_not_convert)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        data = {k: v for k, v in config_dict.items() if k != "quant_method"}
        config = cls(**data)
        for key, value in kwargs.items():
            if hasattr(config, key):
                setattr(config, key, value)
        return (config, {}) if return_unused_kwargs else config
