"""mlxq.format: reading the `quantization` block exactly as MLX and mlx-lm read it."""

from __future__ import annotations

import mlx.nn as mxnn
import pytest
import torch
from mlxq.format import (
    KNOWN_MODES,
    ModuleFormat,
    check_quantization,
    entry_format,
    find_quantization,
    is_skipped,
    top_level_format,
)
from mlxq.integrations.config import MLXQuantConfig

TOP = ModuleFormat(bits=3, group_size=32, mode="affine")


@pytest.mark.parametrize("mode", KNOWN_MODES)
@pytest.mark.parametrize("entry", [{}, {"group_size": None}, {"bits": None, "group_size": None}])
def test_null_or_missing_values_mean_the_mode_default_as_in_mlx(mode: str, entry: dict) -> None:
    # the oracle: what MLX's own quantized layer resolves for the same arguments
    kwargs = {k: entry.get(k) for k in ("group_size", "bits")}
    layer = mxnn.QuantizedLinear(64, 8, mode=mode, **kwargs)
    got = entry_format("m", {**entry, "mode": mode}, TOP)
    assert (got.group_size, got.bits, got.mode) == (layer.group_size, layer.bits, mode)
    # never the top-level value: mlx-lm passes the entry to to_quantized as it is
    assert got != TOP


def test_entry_without_mode_is_affine_and_true_or_false_follow_mlx_lm() -> None:
    assert entry_format("m", {"bits": 8}, ModuleFormat(4, 32, "mxfp4")) == ModuleFormat(8, 64)
    assert entry_format("m", True, TOP) == TOP
    assert entry_format("m", False, TOP) is None


def test_top_level_nulls_resolve_per_mode() -> None:
    assert top_level_format({"group_size": None, "bits": None}) == ModuleFormat(4, 64)
    assert top_level_format({"group_size": 32, "bits": 4, "mode": "mxfp4"}).mode == "mxfp4"


@pytest.mark.parametrize(
    ("block", "words"),
    [
        ({"bits": "four", "group_size": 64}, ["'bits'", "'four'", "str"]),
        ({"bits": 4, "group_size": 64.0}, ["'group_size'", "64.0", "float"]),
        # 0 read as null (the default): quantize_model(group_size=0) quantized at 64
        ({"bits": 4, "group_size": 0}, ["'group_size'", "positive", "got 0"]),
        ({"bits": 0, "group_size": 64}, ["'bits'", "positive", "got 0"]),
        ({"bits": 4, "group_size": 64, "a.b": {"group_size": 0}}, ["'a.b'", "got 0"]),
        (
            {"bits": 4, "group_size": 64, "mode": "int4"},
            ["unknown MLX quantization mode", "'int4'"],
        ),
        ({"bits": 4, "group_size": 64, "a.b": {"bits": "four"}}, ["'a.b'", "'bits'", "'four'"]),
        ({"bits": 4, "group_size": 64, "a.b": {"bits": True}}, ["'a.b'", "'bits'", "bool"]),
        ({"bits": 4, "group_size": 64, "a.b": {"bits": 4, "zero": 1}}, ["'a.b'", "'zero'"]),
        ({"bits": 4, "group_size": 64, "a.b": 8}, ["'a.b'", "8"]),
        ({"bits": 4, "group_size": 64, "scale_dtype": "fp8"}, ["'scale_dtype'", "fp8"]),
    ],
)
def test_wrong_keys_and_types_are_named(block: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as error:
        check_quantization(block)
    for word in words:
        assert word in str(error.value)
    with pytest.raises(ValueError):
        MLXQuantConfig.from_dict(block)
    top = {k: block[k] for k in ("bits", "group_size") if k in block}
    if len(block) == 2:  # quantize_model's arguments go through the same check
        from mlxq.quantize_model import quantize_model

        with pytest.raises(ValueError):
            quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 8)), **top)


def test_quantize_input_is_refused_by_name() -> None:
    with pytest.raises(NotImplementedError, match="'a.b'.*quantize_input"):
        check_quantization({"bits": 4, "group_size": 64, "a.b": {"quantize_input": True}})


def test_config_keeps_entries_unchanged_and_reports_unused_kwargs() -> None:
    block = {"group_size": 64, "bits": 4, "mode": "affine", "x.q": {"group_size": None, "bits": 6}}
    config, unused = MLXQuantConfig.from_dict(block, return_unused_kwargs=True, no_such=1)
    assert unused == {"no_such": 1}
    assert config.mlx_dict() == block  # null written back as null
    assert config.module_format("x.q") == ModuleFormat(6, 64)
    assert config.module_format("x.k") == ModuleFormat(4, 64)
    with pytest.raises(ValueError, match="no_such"):
        MLXQuantConfig(bits=4, group_size=64, no_such=1)


def test_find_quantization_and_skip_rule() -> None:
    q = {"bits": 4, "group_size": 64}
    assert find_quantization({"quantization": q}) == q
    assert find_quantization({"text_config": {"quantization_config": q}}) == q
    assert find_quantization({"model_type": "llama"}) is None
    assert is_skipped("model.visual.blocks.0", ["model.visual"])
    assert is_skipped("lm_head", ["lm_head"]) and not is_skipped("lm_head2", ["lm_head"])


def test_errors_name_the_source_of_the_bad_value() -> None:
    """Bad quantize_model / MLXQuantConfig arguments were reported as "config.json
    quantization: ..." with no config.json involved; each error names its real source."""
    import mlxq
    import torch
    from mlxq.integrations.config import MLXQuantConfig

    cases = [
        (
            lambda: mlxq.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 8)), group_size=0),
            "mlxq: quantize_model arguments: 'group_size'",
        ),
        (
            lambda: mlxq.quantize_model(
                torch.nn.Sequential(torch.nn.Linear(64, 8)), overrides={"0": {"bits": "x"}}
            ),
            "mlxq: quantize_model arguments, overrides['0']: 'bits'",
        ),
        (lambda: MLXQuantConfig(mode="int3"), "mlxq: MLXQuantConfig arguments: unknown MLX"),
        (
            lambda: MLXQuantConfig(overrides={"a": 3}),
            "mlxq: MLXQuantConfig arguments, overrides['a']",
        ),
        (  # a checkpoint's block, as transformers reads it
            lambda: MLXQuantConfig.from_dict({"bits": 4, "group_size": 64, "a": {"bits": 0}}),
            "mlxq: config.json quantization['a']: 'bits'",
        ),
    ]
    for make, prefix in cases:
        with pytest.raises(ValueError) as error:
            make()
        assert str(error.value).startswith(prefix), str(error.value)
    # the source is reset after from_dict: a later constructor call names its arguments again
    with pytest.raises(ValueError, match="^mlxq: MLXQuantConfig arguments: 'bits'"):
        MLXQuantConfig(bits=0)
