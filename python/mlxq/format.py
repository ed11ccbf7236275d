"""The MLX quantization format: modes, bits, group sizes, and the `quantization` block of a
config.json, read exactly as MLX and mlx-lm read it.

No transformers import: the CLI, `inspect`, `convert` and the transformers quantizer all read
configs through this module.

How mlx-lm 0.32 resolves the format of one module (``mlx_lm.utils.load_model``, then
``mlx.nn.quantize`` and ``to_quantized``):

- an entry named after the module (mixed recipes) wins: ``false`` keeps it float, ``true``
  takes the top-level values, and a dict is passed to ``to_quantized`` as it is, so a missing
  or ``null`` ``group_size``/``bits`` means the default of the entry's *mode* (not the
  top-level value), and a missing ``mode`` means ``"affine"``;
- any other module is quantized as its tensors say (bits and group size read off the shapes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "MODE_DEFAULTS",
    "KNOWN_MODES",
    "RUNNABLE_MODES",
    "SUPPORTED_BITS",
    "METAL_BITS",
    "SUPPORTED_GROUP_SIZES",
    "ModuleFormat",
    "find_quantization",
    "is_mlx_quantization",
    "check_quantization",
    "top_level_format",
    "entry_format",
    "is_skipped",
]

# mode -> (default group size, default bits), as mlx.nn's quantized layers resolve `None`
MODE_DEFAULTS: dict[str, tuple[int, int]] = {
    "affine": (64, 4),
    "mxfp4": (32, 4),
    "nvfp4": (16, 4),
    "mxfp8": (32, 8),
}
KNOWN_MODES = tuple(MODE_DEFAULTS)
# every op of these modes runs on the CPU and on Metal
RUNNABLE_MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")
SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 8)  # affine
METAL_BITS = (1, 2, 3, 4, 5, 6, 8)  # affine bits the metallib has kernels for
SUPPORTED_GROUP_SIZES = (32, 64, 128)

_TOP_KEYS = ("group_size", "bits", "mode")
# keys of a per-module entry that mlxq understands; `quantize_input: false` changes nothing
_ENTRY_KEYS = ("group_size", "bits", "mode", "quantize_input", "global_scale")
# keys transformers or mlxq add around the MLX block
_WRAPPER_KEYS = ("quant_method", "modules_to_not_convert")


@dataclass(frozen=True)
class ModuleFormat:
    """How one module is stored: its bits, group size and mode."""

    bits: int
    group_size: int
    mode: str = "affine"


def find_quantization(config: dict) -> Any:
    """The quantization block of a config.json dict (top level first, then `text_config`,
    where image-text models may keep it), or None."""
    for cfg in (config, config.get("text_config") or {}):
        if not isinstance(cfg, dict):
            continue
        q = cfg.get("quantization_config") or cfg.get("quantization")
        if q is not None:
            return q
    return None


def is_mlx_quantization(q: Any) -> bool:
    """True for an MLX `quantization` dict: `bits` and `group_size`, no foreign `quant_method`."""
    if not isinstance(q, dict) or "bits" not in q or "group_size" not in q:
        return False
    return q.get("quant_method") in (None, "mlx")


def _int_or_null(value: Any, key: str, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"mlxq: config.json quantization{where}: {key!r} must be a non-negative integer or "
            f"null, got {value!r} ({type(value).__name__})"
        )
    return value


def _mode(value: Any, where: str) -> str:
    if value not in KNOWN_MODES:
        raise ValueError(
            f"mlxq: config.json quantization{where}: unknown MLX quantization mode {value!r} "
            f"(MLX modes: {', '.join(KNOWN_MODES)})"
        )
    return value


def _resolve(mode: str, group_size: int | None, bits: int | None) -> ModuleFormat:
    default_group, default_bits = MODE_DEFAULTS[mode]
    return ModuleFormat(bits or default_bits, group_size or default_group, mode)


def top_level_format(q: dict) -> ModuleFormat:
    """The top-level format of an MLX quantization block, `null` values resolved per mode."""
    mode = _mode(q.get("mode", "affine"), "")
    return _resolve(
        mode,
        _int_or_null(q.get("group_size"), "group_size", ""),
        _int_or_null(q.get("bits"), "bits", ""),
    )


def entry_format(name: str, entry: Any, top: ModuleFormat) -> ModuleFormat | None:
    """The format of module `name` from its per-module entry (see the module docstring);
    None where the entry keeps it float. Raises ValueError naming the module and key for an
    entry of the wrong type."""
    where = f"[{name!r}]"
    if entry is False:
        return None
    if entry is True:
        return top
    if not isinstance(entry, dict):
        raise ValueError(
            f"mlxq: config.json quantization{where} must be an object, true or false, "
            f"got {entry!r} ({type(entry).__name__})"
        )
    unknown = sorted(set(entry) - set(_ENTRY_KEYS))
    if unknown:
        raise ValueError(
            f"mlxq: config.json quantization{where}: unknown key {unknown[0]!r} "
            f"(mlxq reads {', '.join(_ENTRY_KEYS)}); refusing to guess what it changes"
        )
    if entry.get("quantize_input"):
        raise NotImplementedError(
            f"mlxq: layer {name!r}: quantize_input=true (quantized activations) is not run by mlxq"
        )
    mode = _mode(entry.get("mode", "affine"), where)
    return _resolve(
        mode,
        _int_or_null(entry.get("group_size"), "group_size", where),
        _int_or_null(entry.get("bits"), "bits", where),
    )


def check_quantization(q: Any, extra_keys: tuple[str, ...] = ()) -> ModuleFormat:
    """Validate a whole MLX quantization block; return its top-level format.

    Every key must be a top-level key, a per-module entry (an object, true or false) or one
    of `extra_keys`; values of the wrong type raise ValueError naming the key.
    """
    if not isinstance(q, dict):
        raise ValueError(
            f"mlxq: config.json quantization must be an object, got {type(q).__name__}"
        )
    top = top_level_format(q)
    for key, value in q.items():
        if key in _TOP_KEYS or key in _WRAPPER_KEYS or key in extra_keys:
            continue
        if isinstance(value, (dict, bool)):
            entry_format(key, value, top)
            continue
        raise ValueError(
            f"mlxq: config.json quantization: unknown key {key!r} = {value!r} (neither "
            f"{', '.join(_TOP_KEYS)} nor a per-module entry); refusing to guess what it means"
        )
    return top


def is_skipped(name: str, skip: list[str] | tuple[str, ...]) -> bool:
    """The one skip rule: `name` is one of `skip`, or inside one of them."""
    return any(name == s or name.startswith(s + ".") for s in skip)
