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
- any other module is quantized as its tensors say (bits and group size read off the shapes,
  and the mode too: float scales are affine, uint8 ones the float mode of those bits and group
  size; mlx-lm's ``infer_quant_config``), whatever the top-level mode.

:func:`stored_format` reads one module's format off its safetensors header entries (checked
against the config); :func:`configured_format` is the format a config gives a module when a
float model is quantized.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

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
    "Block",
    "CONFIG_JSON",
    "require_top_level_keys",
    "check_quantization",
    "top_level_format",
    "entry_format",
    "is_skipped",
    "configured_format",
    "top_level_disagreements",
    "fits",
    "stored_format",
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
    """True for an MLX `quantization` dict: no foreign `quant_method`, and MLX's own keys.

    A block missing `bits` or `group_size` is still MLX's (mlx-lm fails on it with a bare
    KeyError); it is taken as MLX's so that :func:`require_top_level_keys` names the missing key,
    instead of transformers' complaint about a `quant_method`. So is an empty block (`{}`, both
    keys gone): no quantizer reads it, and `mlxq inspect` used to call it a foreign one."""
    if not isinstance(q, dict) or q.get("quant_method") not in (None, "mlx"):
        return False
    return q.get("quant_method") == "mlx" or not q or any(k in q for k in _TOP_KEYS)


class Block(str):
    """An error source that is a whole quantization block, whose per-module entries are its own
    keys (`block['name']`); any other source is a call's arguments, whose entries are its
    overrides (`source, overrides['name']`)."""


CONFIG_JSON = Block("config.json quantization")


def _at(source: str, name: str | None = None) -> str:
    """Where a value came from, for an error: `source` is a block such as config.json's (entries
    are its keys) or the arguments of a call such as quantize_model (entries are its overrides)."""
    if name is None:
        return source
    return f"{source}[{name!r}]" if isinstance(source, Block) else f"{source}, overrides[{name!r}]"


def require_top_level_keys(q: dict, source: str = CONFIG_JSON) -> None:
    """mlx-lm reads `quantization["group_size"]` and `["bits"]` (a `null` value means the
    mode's default, a missing key is its KeyError): refuse a block without them by name."""
    for key in ("group_size", "bits"):
        if key not in q:
            fix = "restore the block mlx-lm wrote" if source == CONFIG_JSON else "give both"
            raise ValueError(
                f"mlxq: {source} lacks {key!r} (it has "
                f"{sorted(k for k in q if k not in _WRAPPER_KEYS)}); mlx-lm needs both "
                f"group_size and bits (null for the mode's default): {fix}"
            )


def _int_or_null(value: Any, key: str, at: str) -> int | None:
    if value is None:
        return None
    # 0 is refused too: it used to read as null (the mode's default) through `value or
    # default`, so quantize_model(group_size=0) quantized at 64; MLX itself divides by it
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"mlxq: {at}: {key!r} must be a positive integer or "
            f"null, got {value!r} ({type(value).__name__})"
        )
    return value


def _mode(value: Any, at: str) -> str:
    if value not in KNOWN_MODES:
        raise ValueError(
            f"mlxq: {at}: unknown MLX quantization mode {value!r} "
            f"(MLX modes: {', '.join(KNOWN_MODES)})"
        )
    return value


def _resolve(mode: str, group_size: int | None, bits: int | None) -> ModuleFormat:
    default_group, default_bits = MODE_DEFAULTS[mode]
    return ModuleFormat(bits or default_bits, group_size or default_group, mode)


def top_level_format(q: dict, source: str = CONFIG_JSON) -> ModuleFormat:
    """The top-level format of an MLX quantization block, `null` values resolved per mode
    (`source`, named by errors: where the block came from, see :func:`_at`)."""
    mode = _mode(q.get("mode", "affine"), source)
    return _resolve(
        mode,
        _int_or_null(q.get("group_size"), "group_size", source),
        _int_or_null(q.get("bits"), "bits", source),
    )


def entry_format(
    name: str, entry: Any, top: ModuleFormat, source: str = CONFIG_JSON
) -> ModuleFormat | None:
    """The format of module `name` from its per-module entry (see the module docstring);
    None where the entry keeps it float. Raises ValueError naming the module and key for an
    entry of the wrong type."""
    at = _at(source, name)
    if entry is False:
        return None
    if entry is True:
        return top
    if not isinstance(entry, dict):
        raise ValueError(
            f"mlxq: {at} must be an object, true or false, got {entry!r} ({type(entry).__name__})"
        )
    unknown = sorted(set(entry) - set(_ENTRY_KEYS))
    if unknown:
        raise ValueError(
            f"mlxq: {at}: unknown key {unknown[0]!r} "
            f"(mlxq reads {', '.join(_ENTRY_KEYS)}); refusing to guess what it changes"
        )
    if entry.get("quantize_input"):
        raise NotImplementedError(
            f"mlxq: layer {name!r}: quantize_input=true (quantized activations) is not run by mlxq"
        )
    mode = _mode(entry.get("mode", "affine"), at)
    return _resolve(
        mode,
        _int_or_null(entry.get("group_size"), "group_size", at),
        _int_or_null(entry.get("bits"), "bits", at),
    )


def check_quantization(
    q: Any, extra_keys: tuple[str, ...] = (), source: str = CONFIG_JSON
) -> ModuleFormat:
    """Validate a whole MLX quantization block; return its top-level format.

    Every key must be a top-level key, a per-module entry (an object, true or false) or one
    of `extra_keys`; values of the wrong type raise ValueError naming the key and `source`
    (:data:`CONFIG_JSON`, or the call whose arguments `q` holds: "quantize_model arguments").
    """
    if not isinstance(q, dict):
        raise ValueError(f"mlxq: {source} must be an object, got {type(q).__name__}")
    top = top_level_format(q, source)
    for key, value in q.items():
        if key in _TOP_KEYS or key in _WRAPPER_KEYS or key in extra_keys:
            continue
        if isinstance(value, (dict, bool)):
            entry_format(key, value, top, source)
            continue
        raise ValueError(
            f"mlxq: {source}: unknown key {key!r} = {value!r} (neither "
            f"{', '.join(_TOP_KEYS)} nor a per-module entry); refusing to guess what it means"
        )
    return top


def top_level_disagreements(q: dict, stored: Iterable[ModuleFormat]) -> list[str]:
    """The top-level values (bits, group_size, mode) of an MLX quantization block that no
    quantized module is stored in, each with what the modules' tensors say instead.

    mlx-lm 0.32 reads each module's format off its tensors (or its per-module entry) and uses
    the top-level values for none of them, so `{"bits": 7}` over 4-bit tensors loads, in
    mlx-lm as in mlxq; only tools that trust the block are misled. `stored`: the formats of
    the quantized modules without a per-module entry (empty: nothing to compare)."""
    stored = list(stored)
    if not stored:
        return []
    top = top_level_format(q)
    out = []
    for key in ("bits", "group_size", "mode"):
        said = getattr(top, key)
        counts = Counter(getattr(fmt, key) for fmt in stored)
        if said in counts:
            continue
        raw = q.get(key, "affine") if key == "mode" else q.get(key)
        stated = f"{key}={raw!r}" + ("" if raw == said else f" ({said!r} for mode {top.mode})")
        found = ", ".join(f"{v!r} ({n} module{'s' * (n > 1)})" for v, n in counts.most_common())
        out.append(
            f"config.json quantization says {stated}, but no quantized module without an entry "
            f"of its own is stored so: their tensors say {key} {found}; mlx-lm 0.32 and mlxq "
            "read each module's format from its tensors, so this value is unused (tools "
            "trusting it are misled)"
        )
    return out


def is_skipped(name: str, skip: list[str] | tuple[str, ...]) -> bool:
    """The one skip rule: `name` is one of `skip`, or inside one of them."""
    return any(name == s or name.startswith(s + ".") for s in skip)


def configured_format(
    name: str,
    top: ModuleFormat,
    overrides: Mapping[str, dict | bool],
    skip: list[str] | tuple[str, ...] = (),
    source: str = CONFIG_JSON,
) -> ModuleFormat | None:
    """The format a quantization config gives module `name`: None where it is skipped or its
    entry keeps it float, its per-module entry where it has one, else the top-level format."""
    if is_skipped(name, skip):
        return None
    if name not in overrides:
        return top
    return entry_format(name, overrides[name], top, source)


def fits(in_features: int, fmt: ModuleFormat) -> bool:
    """Whether a layer of input width `in_features` can be stored in `fmt`: mlx-lm quantizes
    only layers whose width is a multiple of the group size (and packs into whole uint32s),
    and leaves the others float without an entry."""
    return in_features % fmt.group_size == 0 and (in_features * fmt.bits) % 32 == 0


# --- reading a module's format off the safetensors headers ---------------------------------------

_PACKED_DTYPES = ("U32", "I32")
_SCALE_DTYPES = ("F16", "BF16", "F32")


class _Header(Protocol):
    """One tensor of a safetensors header (``mlxq.integrations.checkpoint.TensorInfo``)."""

    dtype: str
    shape: Any


class _Formats(Protocol):
    """What :func:`stored_format` reads of a quantization config (``MLXQuantConfig``)."""

    overrides: Mapping[str, dict | bool]
    default_format: ModuleFormat

    def module_format(self, name: str) -> ModuleFormat | None: ...


def stored_format(
    name: str,
    in_features: int,
    out_features: int,
    headers: Mapping[str, _Header],
    config: _Formats,
) -> ModuleFormat | None:
    """The format module `name` is stored in, from its tensors; None if it is float.

    Bits and group size are read off the shapes (as mlx-lm does for modules without an entry);
    a per-module config entry must agree with them. Raises a ValueError naming the layer, the
    tensor or config key and both values for a missing, mis-shaped or contradicted tensor,
    NotImplementedError for a mode mlxq does not run.
    """
    weight, scales = headers.get(f"{name}.weight"), headers.get(f"{name}.scales")
    if scales is None:
        if weight is not None and weight.dtype in _PACKED_DTYPES:
            raise ValueError(
                f"mlxq: layer {name!r}: {name}.weight is packed ({weight.dtype}, "
                f"{list(weight.shape)}) but {name}.scales is missing from the checkpoint"
            )
        return None
    has_entry = name in config.overrides
    want = config.module_format(name) if has_entry else None
    if has_entry and want is None:
        raise ValueError(
            f"mlxq: layer {name!r}: config.json keeps it float ({name!r}: false) but the "
            f"checkpoint has {name}.scales"
        )
    if want is not None:
        mode = want.mode
    else:
        mode = _mode_of_tensors(in_features, weight, scales, config.default_format.mode)
    if mode not in RUNNABLE_MODES:
        raise NotImplementedError(
            f"mlxq: layer {name!r} is quantized with mode {mode!r}, which mlxq does not run yet "
            f"(it runs {', '.join(RUNNABLE_MODES)})"
        )
    if weight is None:
        raise ValueError(f"mlxq: layer {name!r}: {name}.scales exists but {name}.weight is missing")
    if mode != "affine":
        return _stored_fp_format(name, mode, in_features, out_features, headers, want)
    # transformers' MetalConfig checkpoints name the biases `qbiases` (renamed when loading)
    biases = headers.get(f"{name}.biases", headers.get(f"{name}.qbiases"))
    if biases is None:
        raise ValueError(
            f"mlxq: layer {name!r}: affine mode needs {name}.biases, missing from the checkpoint"
        )
    for tensor, info in ((f"{name}.scales", scales), (f"{name}.biases", biases)):
        if info.dtype not in _SCALE_DTYPES:
            raise ValueError(
                f"mlxq: layer {name!r}: {tensor} is {info.dtype}; affine scales and biases must "
                f"be one of {', '.join(_SCALE_DTYPES)}"
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
    if want is not None and bits is not None and group_size is not None:
        for key, stored, configured in (
            ("bits", bits, want.bits),
            ("group_size", group_size, want.group_size),
        ):
            if stored != configured:
                raise ValueError(
                    f"mlxq: layer {name!r}: config.json quantization[{name!r}] says "
                    f"{key}={configured}, but the tensors are stored with {key}={stored} "
                    f"({name}.weight {list(weight.shape)}, {name}.scales {list(scales.shape)}, "
                    f"in_features {in_features})"
                )
    shape_ok = (
        rows == out_features
        and bits in SUPPORTED_BITS
        and group_size in SUPPORTED_GROUP_SIZES
        and tuple(biases.shape) == tuple(scales.shape)
        and scales.shape[0] == rows
    )
    if not shape_ok:
        fmt = want or config.default_format
        want_w = [out_features, in_features * fmt.bits // 32]
        want_s = [out_features, in_features // fmt.group_size]
        raise ValueError(
            f"mlxq: layer {name!r} ({out_features}x{in_features}): mis-shaped tensors: "
            f"{name}.weight {list(weight.shape)}, {name}.scales {list(scales.shape)}, "
            f"{name}.biases {list(biases.shape)}; for bits={fmt.bits} group_size="
            f"{fmt.group_size} expected weight {want_w} and scales/biases {want_s}"
        )
    return ModuleFormat(bits, group_size, mode)


# (bits, group size) -> the one floating-point mode stored with them (uint8 scales)
_FP_MODE_OF = {(bits, group): mode for mode, (group, bits) in MODE_DEFAULTS.items()}


def _mode_of_tensors(
    in_features: int, weight: _Header | None, scales: _Header, top_mode: str
) -> str:
    """The mode of a module without a per-module entry, read off its tensors as mlx-lm 0.32
    does (``infer_quant_config``), not taken from the top level: float scales are affine,
    uint8 ones belong to the float mode of the bits and group size the shapes show. Tensors
    that fit no mode keep the top-level mode, whose checks then name what is wrong."""
    if scales.dtype != "U8":
        return "affine"
    if weight is None or not weight.shape or not scales.shape or not scales.shape[-1]:
        return top_mode
    group, bits = in_features // scales.shape[-1], weight.shape[-1] * 32 // in_features
    mode = _FP_MODE_OF.get((bits, group))
    return mode if mode is not None and mode != "affine" else top_mode


def _stored_fp_format(
    name: str,
    mode: str,
    in_features: int,
    out_features: int,
    headers: Mapping[str, _Header],
    want: ModuleFormat | None,
) -> ModuleFormat:
    """The format of a module stored in a floating-point mode (uint32 weight, uint8 scales, no
    biases), checked against the mode's own group size and bits."""
    weight, scales = headers[f"{name}.weight"], headers[f"{name}.scales"]
    group_size, bits = MODE_DEFAULTS[mode]
    if want is not None and (want.group_size, want.bits) != (group_size, bits):
        raise ValueError(
            f"mlxq: layer {name!r}: config.json quantization[{name!r}] says mode {mode!r} with "
            f"group_size={want.group_size} bits={want.bits}, but {mode} has group_size="
            f"{group_size} and bits={bits} only"
        )
    for extra in ("biases", "qbiases", "global_scale"):
        if f"{name}.{extra}" in headers:
            raise ValueError(
                f"mlxq: layer {name!r}: mode {mode!r} has no {extra} for a linear or embedding "
                f"layer, but the checkpoint has {name}.{extra}; refusing to ignore it"
            )
    want_w = [out_features, in_features * bits // 32]
    want_s = [out_features, in_features // group_size]
    if (
        weight.dtype not in _PACKED_DTYPES
        or scales.dtype != "U8"
        or in_features % group_size
        or list(weight.shape) != want_w
        or list(scales.shape) != want_s
    ):
        raise ValueError(
            f"mlxq: layer {name!r} ({out_features}x{in_features}): mode {mode!r} expects a uint32 "
            f"{name}.weight {want_w} and uint8 {name}.scales {want_s}, got {weight.dtype} "
            f"{list(weight.shape)} and {scales.dtype} {list(scales.shape)}"
        )
    return ModuleFormat(bits, group_size, mode)
