"""mlxq.inspect_checkpoint called directly: it takes the loader's decisions from the loader's
own code, and leaves the loader's warnings to the loader."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from arch_models import Variant, tiny_mlx_checkpoint
from mlxq.inspect_checkpoint import inspect_checkpoint


def _loads(path: Path) -> str | None:
    """None when from_pretrained loads `path`, else its error."""
    from transformers import AutoModelForCausalLM

    try:
        AutoModelForCausalLM.from_pretrained(path)
    except (ValueError, NotImplementedError) as error:
        return str(error)
    return None


@pytest.mark.parametrize(
    ("arch", "variant"),
    [
        ("qwen3_moe", Variant(tied=False)),
        ("gemma", Variant(tied=True)),
        ("llama", Variant(False)),
        ("gpt2", Variant(tied=True)),  # Conv1D projections
        ("phi", Variant(tied=False, bits=3, group_size=32)),
        ("mamba", Variant(tied=True)),  # refused: the forward reads the tied head's dtype
        ("mamba", Variant(tied=False, bits=3, group_size=32)),  # that head runs in float
        # q/k/v convolutions mlx-lm keeps apart, concatenated at load
        ("olmo_hybrid", Variant(tied=False, bits=3, recipe="mixed_3_6")),
        ("kimi_linear", Variant(tied=False, bits=3, recipe="mixed_3_6")),
        ("kimi_linear", Variant(tied=True)),  # tied by the walk; transformers declares no tying
        # Falcon Mamba: mlx-lm's mamba (B, C, dt normalized), transformers' own class
        ("falcon_mamba", Variant(tied=True)),
        ("falcon_mamba", Variant(tied=False, bits=3, group_size=32)),
        ("qwen3_5", Variant(tied=False)),  # mlx-lm's language_model. prefix, 1 + w norms
        # mlx-lm's kv_b_proj split into embed_q / unembed_out (SplitKvB)
        ("deepseek_v3", Variant(tied=False, bits=3, recipe="mixed_3_6")),
        ("glm4_moe_lite", Variant(tied=False, bits=3, recipe="mixed_3_6")),
        # a tensor that transformers renames alone (attention_sink_bias -> sinks)
        ("mimo_v2_flash", Variant(tied=False, bits=3, recipe="mixed_3_6")),
    ],
)
def test_inspect_and_from_pretrained_take_the_same_decision(arch: str, variant: Variant) -> None:
    path = tiny_mlx_checkpoint(arch, variant)
    report = inspect_checkpoint(path, str(path))
    error = _loads(path)
    errors = [p.message for p in report.errors]
    assert bool(errors) == (error is not None), (errors, error)
    if error is not None:  # the same reason, in the same words
        assert any(message in error for message in errors), (errors, error)
    else:  # every module the loader quantizes is reported with its format
        assert any(m.bits for m in report.modules)


@pytest.mark.parametrize(("arch", "warned"), [("llama", True), ("qwen3_5", False)])
def test_rope_theta_only_in_rope_parameters(tmp_path: Path, arch: str, warned: bool) -> None:
    # mlx-lm's llama reads a top-level rope_theta (else its default); its qwen3_5 reads
    # rope_parameters itself
    model = tmp_path / "model"
    shutil.copytree(tiny_mlx_checkpoint(arch, Variant(tied=False)), model)
    config = json.loads((model / "config.json").read_text())
    for cfg in (config, config.get("text_config", {})):
        cfg.pop("rope_theta", None)
    (model / "config.json").write_text(json.dumps(config))
    report = inspect_checkpoint(model, str(model))
    warnings = [p.message for p in report.problems if p.severity == "warning"]
    assert any("only in rope_parameters" in m for m in warnings) == warned, warnings


def test_inspect_leaves_the_stale_index_warning_to_the_loader(
    smollm2_4bit_g32: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tmp_path / "model"
    shutil.copytree(smollm2_4bit_g32, model)
    # sharded, so that transformers reads the index (it names a shard that is not there)
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-0001.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    report = inspect_checkpoint(model, str(model))
    assert any("stale" in p.message for p in report.problems if p.severity == "warning")
    with caplog.at_level(logging.WARNING, logger="mlxq"):
        assert _loads(model) is None
    assert any("stale" in r.getMessage() for r in caplog.records)  # still said, once


@pytest.mark.parametrize("content", ["", "[]"], ids=["empty", "list"])
def test_unreadable_index_beside_model_safetensors_is_a_warning(tmp_path: Path, content) -> None:
    # transformers reads model.safetensors alone (mlx-lm every model*.safetensors): the index is
    # never opened and the model loads; before, inspect called it an error (exit 1)
    model = tmp_path / "model"
    shutil.copytree(tiny_mlx_checkpoint("llama", Variant(tied=True)), model)
    (model / "model.safetensors.index.json").write_text(content)
    report = inspect_checkpoint(model, str(model))
    assert not report.errors, report.errors
    assert any("index.json" in p.message for p in report.problems if p.severity == "warning")
    assert _loads(model) is None


@pytest.mark.parametrize(
    ("arch", "variant"),
    [("llama", Variant(tied=True)), ("llama", Variant(tied=False)), ("gpt2", Variant(tied=True))],
)
def test_inspect_rows_are_the_modules_the_loader_builds(arch: str, variant: Variant) -> None:
    """Row by row, the format inspect reports is the one of the module from_pretrained builds,
    the tied-head decision included (one walk: mlxq.model_walk)."""
    from mlxq.nn import AffineEmbedding, AffineLinear, TiedAffineHead
    from transformers import AutoModelForCausalLM

    path = tiny_mlx_checkpoint(arch, variant)
    report = inspect_checkpoint(path, str(path))
    assert not report.errors
    model = AutoModelForCausalLM.from_pretrained(path)
    rows = {m.name: m for m in report.modules}
    modules = dict(model.named_modules())
    checked = 0
    for name, row in rows.items():
        module = modules[name]
        if isinstance(module, TiedAffineHead):
            assert "TiedAffineHead" in row.action and row.params == 0
            assert (row.bits, row.group_size) == (
                module.embedding.bits,
                module.embedding.group_size,
            )
        elif isinstance(module, (AffineLinear, AffineEmbedding)):
            assert (row.bits, row.group_size, row.mode) == (
                module.bits,
                module.group_size,
                module.mode,
            ), name
        else:
            assert row.bits is None, name
        checked += 1
    head = model.get_output_embeddings()
    assert isinstance(head, TiedAffineHead) == variant.tied
    quantized = [
        n
        for n, m in modules.items()
        if isinstance(m, (AffineLinear, AffineEmbedding, TiedAffineHead))
    ]
    assert quantized and set(quantized) <= set(rows)
    assert checked == len(rows)


@pytest.mark.parametrize(
    ("edit", "key", "said", "stored"),
    [
        ({"bits": 7}, "bits", "bits=7", "bits 4"),
        ({"group_size": 48}, "group_size", "group_size=48", "group_size 128"),
        ({"mode": "mxfp4"}, "mode", "mode='mxfp4'", "mode 'affine'"),
    ],
)
def test_a_top_level_value_no_module_is_stored_in_is_flagged(
    tmp_path: Path, edit: dict, key: str, said: str, stored: str
) -> None:
    """A top-level bits / group_size / mode that disagrees with every module's tensors loads
    (mlx-lm 0.32 reads each module's format off its tensors: checked here), and inspect
    said nothing; it warns, naming the key, the stated value and what the tensors say."""
    import torch
    from mlx_models import tiny_mlx_checkpoint as tiny_qwen3
    from transformers import AutoModelForCausalLM

    original = tiny_qwen3("qwen3", 4, 128)
    model = tmp_path / "model"
    shutil.copytree(original, model)
    config = json.loads((model / "config.json").read_text())
    for block in ("quantization", "quantization_config"):
        config[block].update(edit)
    (model / "config.json").write_text(json.dumps(config))
    before = [p.message for p in inspect_checkpoint(original, str(original)).problems]
    assert not [m for m in before if "config.json quantization says" in m]
    warnings = [p.message for p in inspect_checkpoint(model, str(model)).problems]
    assert len(warnings) == 1 and warnings[0].startswith(f"config.json quantization says {said},")
    assert f"their tensors say {stored} (14 modules)" in warnings[0]
    # loading stays as mlx-lm's: the same model as the original
    tokens = torch.tensor([[5, 60, 700]])
    logits = [
        AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)(tokens).logits
        for p in (original, model)
    ]
    assert torch.equal(*logits)
    mlx_lm = pytest.importorskip("mlx_lm")
    mlx_lm.load(str(model))  # mlx-lm loads it too (it would raise on a refusal)
