"""`MLXQuantConfig`: the `quantization` block of an MLX config.json, as a transformers config.

mlx-lm writes ``{"group_size": 32, "bits": 4, "mode": "affine"}`` plus, for mixed recipes,
one entry per module path (``{"group_size": 64, "bits": 8}``, or ``false`` for a module kept in
float). That dict is read and written back unchanged; ``quant_method: "mlx"`` is added so that
transformers can dispatch it.
"""

from __future__ import annotations

import contextvars
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from mlxq.format import (
    CONFIG_JSON,
    KNOWN_MODES,
    RUNNABLE_MODES,
    Block,
    ModuleFormat,
    check_quantization,
    configured_format,
    entry_format,
    is_mlx_quantization,
    require_top_level_keys,
    top_level_format,
)

__all__ = [
    "MLXQuantConfig",
    "ModuleFormat",
    "QUANT_METHOD",
    "RUNNABLE_MODES",
    "KNOWN_MODES",
    "is_mlx_quantization",
]

QUANT_METHOD = "mlx"

# what an MLXQuantConfig's errors name as the source of its values: config.json's block while
# from_dict builds one (a checkpoint's config), the constructor's arguments otherwise; its
# attributes once built (validated then: only a value set after that can fail)
_SOURCE = contextvars.ContextVar("mlxq_quant_config_source", default="MLXQuantConfig arguments")
_ATTRIBUTES = "MLXQuantConfig attributes"
# a dict passed as from_pretrained(quantization_config=...), read as a block (its entries are keys)
ARGUMENT_BLOCK = Block("from_pretrained quantization_config")


def config_and_text_config(config: Any) -> list[Any]:
    """`config`, plus its text (decoder) sub-config when it has a distinct one (image-text
    models keep quantization and rope settings there)."""
    configs = [config]
    if hasattr(config, "get_text_config"):
        text = config.get_text_config(decoder=True)
        if text is not config:
            configs.append(text)
    return configs


class MLXQuantConfig(QuantizationConfigMixin):
    """Quantization config of an MLX checkpoint (affine: uint32 weight, scales, biases).

    Args:
        bits: default bits of quantized modules (1, 2, 3, 4, 5, 6, 8).
        group_size: default group size (32, 64, 128).
        mode: ``"affine"`` or one of MLX's float modes ``mxfp4``/``nvfp4``/``mxfp8``.
        overrides: per-module entries, module path -> ``{"bits": .., "group_size": ..}`` or
            ``False`` (kept in float), as in mlx-lm's mixed recipes.
        modules_to_not_convert: module paths kept in float when quantizing a float model.
    """

    def __init__(
        self,
        bits: int | None = 4,
        group_size: int | None = 64,
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
            if not isinstance(value, (dict, bool)):
                raise ValueError(
                    f"mlxq: MLXQuantConfig: unknown argument {key!r} = {value!r} (neither bits, "
                    "group_size, mode, overrides, modules_to_not_convert nor a per-module entry)"
                )
            self.overrides[key] = value
        self.post_init()

    def post_init(self) -> None:
        """Validate every key and value (an error names the one at fault)."""
        top = check_quantization(
            {"group_size": self.group_size, "bits": self.bits, "mode": self.mode},
            source=_SOURCE.get(),
        )
        for name, entry in self.overrides.items():
            entry_format(name, entry, top, _SOURCE.get())

    @property
    def default_format(self) -> ModuleFormat:
        """The top-level format, `None` bits or group size resolved to the mode's default."""
        return top_level_format(self.mlx_dict(), _ATTRIBUTES)

    def module_format(self, name: str) -> ModuleFormat | None:
        """The configured format of module `name`, or None where the config keeps it float.

        A per-module entry is read as mlx-lm reads it (:mod:`mlxq.format`); a module without
        one gets the top-level format.
        """
        return configured_format(
            name, self.default_format, self.overrides, self.modules_to_not_convert, _ATTRIBUTES
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
        """Build from a config.json block; `kwargs` that are not attributes are returned unused
        (with `return_unused_kwargs`), as transformers' own configs do."""
        return cls.from_block(config_dict, CONFIG_JSON, return_unused_kwargs, **kwargs)

    @classmethod
    def from_block(
        cls,
        config_dict: dict[str, Any],
        source: Block,
        return_unused_kwargs: bool = False,
        **kwargs,
    ):
        """:meth:`from_dict` for a block that errors name as `source` (:data:`ARGUMENT_BLOCK`
        for a dict the caller passed to from_pretrained, not a checkpoint's)."""
        require_top_level_keys(config_dict, source)
        data = {k: v for k, v in config_dict.items() if k != "quant_method"}
        token = _SOURCE.set(source)
        try:
            config = cls(**data)
        finally:
            _SOURCE.reset(token)
        unused = {}
        for key, value in kwargs.items():
            if hasattr(config, key):
                setattr(config, key, value)
            else:
                unused[key] = value
        if unused and not return_unused_kwargs:
            raise ValueError(f"mlxq: MLXQuantConfig.from_dict: unknown arguments {sorted(unused)}")
        return (config, unused) if return_unused_kwargs else config
