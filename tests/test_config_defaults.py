"""A key absent from an MLX checkpoint's config.json is read with mlx-lm's default, not
transformers' (or refused by name): tiny models converted by `mlx_lm.convert`, the key deleted
from the converted config.json, must give mlx-lm's fp32 logits in mlxq.

The keys and defaults come from tests/config_default_audit.py (run it for the whole table).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from arch_models import TOKENS, VARIANTS, Variant, mlxq_logits, tiny_mlx_checkpoint
from mlx_models import mlx_lm_logits

TOLERANCE = 1e-3  # as test_arch_coverage
TIED, UNTIED = VARIANTS[0], VARIANTS[1]
PLAIN_UNTIED = Variant(tied=False, bits=3, group_size=32)  # (phi has no mixed recipe's keys)


def _checkpoint_without(
    arch: str, variant, tmp_path: Path, keys: tuple[str, ...], extra: dict | None = None
) -> Path:
    """A copy of the converted tiny `arch` whose config.json lacks `keys` (top level, or
    "text_config.key"; and inside rope_parameters), plus `extra`. Each key must have been
    there (else the test proves nothing)."""
    folder = tmp_path / arch
    shutil.copytree(tiny_mlx_checkpoint(arch, variant), folder)
    top = json.loads((folder / "config.json").read_text())
    for name in keys:
        where, _, key = name.rpartition(".")  # "text_config.key": in the text config
        config = top[where] if where else top
        rope = config.get("rope_parameters")
        found = key in config or key in (rope or {})
        config.pop(key, None)
        if isinstance(rope, dict):
            rope.pop(key, None)
        assert found, f"{arch}'s converted config.json has no {name}"
        if rope == {} or (isinstance(rope, dict) and set(rope) <= {"rope_type"}):
            config.pop("rope_parameters", None)  # (only its type left: absent, as the key is)
    top.update(extra or {})
    (folder / "config.json").write_text(json.dumps(top, indent=2))
    return folder


@pytest.mark.parametrize(
    ("arch", "variant", "keys"),
    [
        # rope_theta: mlx-lm's qwen2 1e6, transformers' 1e4
        ("qwen2", TIED, ("rope_theta",)),
        # partial_rotary_factor: mlx-lm's phi 0.4, transformers' 0.5
        ("phi", PLAIN_UNTIED, ("partial_rotary_factor",)),
        # query_pre_attn_scalar: mlx-lm's gemma2 144, transformers' 256
        ("gemma2", TIED, ("query_pre_attn_scalar",)),
        # tie_word_embeddings: mlx-lm's llama True (its converted checkpoint has no lm_head),
        # transformers' False (it would want one)
        ("llama", TIED, ("tie_word_embeddings",)),
        # moe_k: mlx-lm's ERNIE 4.5 MoE 1 expert per token, transformers' 6 (of 4 here)
        ("ernie4_5_moe", TIED, ("moe_k",)),
        # routed_scaling_factor: mlx-lm's DeepSeek V3 1.0, transformers' 2.5
        ("deepseek_v3", UNTIED, ("routed_scaling_factor",)),
        # norm_topk_prob: mlx-lm's Qwen3-Next False, transformers' True
        ("qwen3_next", TIED, ("norm_topk_prob",)),
        # final_logit_softcapping: mlx-lm's (and mlx-vlm's) Gemma 4 30, transformers' None
        ("gemma4", TIED, ("text_config.final_logit_softcapping",)),
        # rope_parameters: mlx-lm's Laguna theta 10000 and the whole head rotated on every
        # layer type, transformers' 500000 and half the head on full-attention layers
        ("laguna", TIED, ("rope_parameters",)),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_absent_key_runs_mlx_lm_default(arch: str, variant, keys, tmp_path: Path) -> None:
    path = _checkpoint_without(arch, variant, tmp_path, keys)
    ref = mlx_lm_logits(path, TOKENS)
    got = mlxq_logits(path, TOKENS)
    diff = float(np.abs(got - ref).max())
    assert diff <= TOLERANCE, f"{arch} without {keys}: max|diff| {diff:.2e}"


def test_alias_mlx_lm_does_not_read_is_refused(tmp_path: Path) -> None:
    # ERNIE 4.5 MoE saying `num_experts_per_tok: 2` and no `moe_k`: transformers reads the
    # alias (2 experts a token), mlx-lm its moe_k default (1): refused, naming both
    from transformers import AutoModelForCausalLM

    path = _checkpoint_without(
        "ernie4_5_moe", TIED, tmp_path, ("moe_k",), {"num_experts_per_tok": 2}
    )
    with pytest.raises(ValueError, match=r"num_experts_per_tok: 2 and no moe_k.*default 1"):
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_rope_scaling_mlx_lm_lacks_is_refused(tmp_path: Path) -> None:
    # GPT-OSS without rope_scaling: mlx-lm runs plain RoPE, transformers' default is yarn
    from transformers import AutoModelForCausalLM

    path = _checkpoint_without("gpt_oss", UNTIED, tmp_path, ("rope_parameters",))
    with pytest.raises(ValueError, match=r"'gpt_oss' has no rope_scaling.*'yarn'"):
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_audit_rows_are_decided() -> None:
    # every forward-changing difference the audit finds for mlx-lm's models is either given
    # mlx-lm's default at load (MLX_LM_DEFAULTS, or derived: MLX_LM_DERIVED) or listed with the
    # reason it is not; and every listed reason is of a difference the audit still finds
    from config_default_audit import NOT_FORWARD, UNVERIFIED, _same, mlx_lm_rows
    from mlxq.integrations.config_defaults import (
        MLX_LM_DEFAULTS,
        MLX_LM_DERIVED,
        MLX_LM_PLAIN_ROPE,
    )

    rows = mlx_lm_rows()
    found = {(model_type, key) for model_type, key, *_ in rows}
    assert not [k for k in {**NOT_FORWARD, **UNVERIFIED} if k not in found]
    undecided = []
    for model_type, key, mlx_default, _ in rows:
        decided = MLX_LM_DEFAULTS.get(model_type, {})
        if key in MLX_LM_DERIVED.get(model_type, ()):
            continue
        if key in decided:
            # (mlx-lm's None where it tests the value's truth: False)
            same = _same(mlx_default, decided[key]) or (mlx_default, decided[key]) == (None, False)
            assert same, (model_type, key, decided[key], mlx_default)
        elif (model_type, key) in {**NOT_FORWARD, **UNVERIFIED} or (
            key in ("rope_scaling", "rope_parameters") and model_type in MLX_LM_PLAIN_ROPE
        ):
            continue
        else:
            undecided.append((model_type, key))
    assert not undecided, undecided


def test_mlx_vlm_audit_rows_are_decided() -> None:
    # the same for mlx-vlm's rows of the image-text families mlxq maps: each text_config key
    # given mlx-vlm's default, refused, derived, or listed with the reason (none stale)
    from config_default_audit import VLM_NOT_FORWARD, VLM_UNVERIFIED, mlx_vlm_rows
    from mlxq.integrations.config_defaults import (
        MLX_TEXT_CONFIG_DEFAULTS,
        MLX_TEXT_CONFIG_DERIVED,
        MLX_TEXT_CONFIG_REFUSED,
    )
    from mlxq.integrations.mlx_vlm_layout import VLM_LAYOUTS

    rows = [(where, key) for where, key, *_ in mlx_vlm_rows()]
    listed = {**VLM_NOT_FORWARD, **VLM_UNVERIFIED}
    assert not [k for k in listed if k not in rows]
    undecided = []
    for where, key in rows:
        family, _, sub = where.partition(".")
        if family not in VLM_LAYOUTS or (where, key) in listed:
            continue
        decided = [
            table.get(family, ())
            for table in (
                MLX_TEXT_CONFIG_DEFAULTS,
                MLX_TEXT_CONFIG_REFUSED,
                MLX_TEXT_CONFIG_DERIVED,
            )
        ]
        if sub != "text_config" or not any(key in d for d in decided):
            undecided.append((where, key))
    assert not undecided, undecided


def _omni_thinker_on_meta(raw: dict):
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    with torch.device("meta"):  # (no memory: only the routers are looked at)
        return Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig.from_dict(raw))


def test_qwen3_omni_moe_nested_text_config_is_checked() -> None:
    # Qwen3-Omni-MoE keeps its language model's expert settings in
    # thinker_config.text_config, which mlx-vlm reads (its TextConfig): checked against the
    # thinker's routers, a value other than the one transformers built refused naming the
    # nested key (the check read the top level alone, found no expert count and passed)
    import copy

    from mlxq.integrations.moe_config import check_expert_counts
    from transformers import AutoConfig

    thinker = {  # one layer of each tower (the routers are what counts)
        "text_config": {"num_hidden_layers": 1, "num_experts": 16, "num_experts_per_tok": 8},
        "vision_config": {"depth": 1},
        "audio_config": {"encoder_layers": 1},
    }
    raw = AutoConfig.for_model(
        "qwen3_omni_moe", enable_audio_output=False, thinker_config=thinker
    ).to_dict()
    model = _omni_thinker_on_meta(raw)
    check_expert_counts(model, raw)  # read alike: nothing to refuse
    other = copy.deepcopy(raw)
    other["thinker_config"]["text_config"]["num_experts_per_tok"] = 4
    with pytest.raises(
        ValueError,
        match=r"transformers builds 8 .*thinker_config\.text_config\.num_experts_per_tok",
    ):
        check_expert_counts(model, other)
    other = copy.deepcopy(raw)
    other["thinker_config"]["text_config"]["num_experts"] = 32
    with pytest.raises(ValueError, match=r"thinker_config\.text_config\.num_experts \(32\)"):
        check_expert_counts(model, other)


def test_text_config_key_the_oracles_default_apart_is_refused(tmp_path: Path) -> None:
    # Gemma 3's text_config without sliding_window: mlx-lm's language model 512, mlx-vlm's
    # 1024, transformers' 4096; config.json does not say which oracle converted it: refused
    from mlxq.integrations.config_defaults import with_mlx_lm_defaults

    config = {"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}}
    with pytest.raises(ValueError, match=r"'gemma3' has no text_config.sliding_window.*512.*1024"):
        with_mlx_lm_defaults(config)
    given = {"model_type": "gemma3", "text_config": {"sliding_window": 1024}}
    assert with_mlx_lm_defaults(given) == given
    # Gemma 4's text_config without rope_parameters: mlx-vlm rotates the whole head of its
    # full-attention layers (0.41 off mlx-lm's tiny model), mlx-lm and transformers a quarter
    config = {"model_type": "gemma4", "text_config": {"num_kv_shared_layers": 0}}
    with pytest.raises(ValueError, match=r"no text_config.rope_parameters.*0.25, mlx-vlm .*1.0"):
        with_mlx_lm_defaults(config)


def test_cohere_compass_window_of_sliding_layers_is_refused() -> None:
    # Command A Vision's text_config with sliding layers and no sliding_window: mlx-vlm runs
    # them without a window (its None), transformers with 4096: refused; without sliding
    # layers the window is not read
    from mlxq.integrations.config_defaults import with_mlx_lm_defaults

    text = {"layer_types": [_SLIDING, _FULL]}
    config = {"model_type": "cohere_compass", "text_config": text}
    with pytest.raises(ValueError, match=r"no text_config.sliding_window: mlx-vlm .* None"):
        with_mlx_lm_defaults(config)
    full = {"model_type": "cohere_compass", "text_config": {"layer_types": [_FULL, _FULL]}}
    assert with_mlx_lm_defaults(full) == full


def test_glm4v_mrope_sections_mlx_vlm_does_not_read_are_refused(tmp_path: Path) -> None:
    # GLM-4.1V's text_config with no rope_scaling: mlx-vlm runs its default mrope sections
    # [8, 12, 12] whatever rope_parameters says (0.06 off the tiny model's [2, 3, 3] on an
    # image prompt), transformers reads rope_parameters: refused; the same sections pass
    from mlxq.integrations.config_defaults import with_mlx_lm_defaults
    from transformers import AutoModelForImageTextToText
    from vlm_models import tiny_mlx_vlm_checkpoint

    folder = tmp_path / "glm4v"
    shutil.copytree(tiny_mlx_vlm_checkpoint("glm4v"), folder)
    config = json.loads((folder / "config.json").read_text())
    del config["text_config"]["rope_scaling"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    with pytest.raises(ValueError, match=r"no text_config.rope_scaling .*\[2, 3, 3\]"):
        AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    same = {
        "model_type": "glm4v",
        "text_config": {"rope_parameters": {"mrope_section": [8, 12, 12]}},
    }
    rope = with_mlx_lm_defaults(same)["text_config"]["rope_parameters"]
    assert rope["mrope_section"] == [8, 12, 12]


def test_laguna_top_level_partial_rotary_factor(tmp_path: Path) -> None:
    # a layer type's rope without partial_rotary_factor: mlx-lm's Laguna takes config.json's
    # top-level one (half the head here), transformers' the whole head
    path = _checkpoint_without("laguna", TIED, tmp_path, (), {"partial_rotary_factor": 0.5})
    ref = mlx_lm_logits(path, TOKENS)
    diff = float(np.abs(mlxq_logits(path, TOKENS) - ref).max())
    assert diff <= TOLERANCE, f"laguna with partial_rotary_factor 0.5: max|diff| {diff:.2e}"


_SLIDING, _FULL = "sliding_attention", "full_attention"


def _gemma4_kv_shared(monkeypatch) -> Path:
    """Gemma 4's language model with 22 layers (alternating), the last 20 reusing the keys and
    values of layers 0 and 1 (mlx-lm's default num_kv_shared_layers is 20), converted by
    mlx_lm.convert (cached)."""
    import arch_models

    overrides, top = arch_models.ARCHS["gemma4_text"]
    layers = {"num_hidden_layers": 22, "layer_types": [_SLIDING, _FULL] * 11}
    monkeypatch.setitem(
        arch_models.ARCHS, "gemma4_text", ({**overrides, **layers, "num_kv_shared_layers": 20}, top)
    )
    key = arch_models._cache_key("gemma4_text", TIED) + "-kv-shared-22"
    return arch_models._cached_conversion(key, "gemma4_text", TIED, lambda folder: None)


@pytest.mark.parametrize(
    ("keys", "extra"),
    [
        # num_kv_shared_layers: mlx-lm's 20 (layers 2.. reuse the keys and values of 0 and 1,
        # and the checkpoint has no key/value projections for them), transformers' 0
        (("num_kv_shared_layers",), {}),
        # and layer_types: mlx-lm derives one full-attention layer in sliding_window_pattern
        # (read from config.json: 2 here), transformers one in 6 whatever the key says
        (("num_kv_shared_layers", "layer_types"), {"sliding_window_pattern": 2}),
    ],
    ids=["num_kv_shared_layers", "and-layer_types"],
)
def test_gemma4_derived_defaults_run_mlx_lm_model(keys, extra, tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "gemma4_text"
    shutil.copytree(_gemma4_kv_shared(monkeypatch), folder)
    config = json.loads((folder / "config.json").read_text())
    for key in keys:
        del config[key]
    (folder / "config.json").write_text(json.dumps({**config, **extra}, indent=2))
    ref = mlx_lm_logits(folder, TOKENS)
    diff = float(np.abs(mlxq_logits(folder, TOKENS) - ref).max())
    assert diff <= TOLERANCE, f"gemma4_text without {keys}: max|diff| {diff:.2e}"


def test_gemma4_defaults_mlx_lm_cannot_run_are_refused(tmp_path: Path) -> None:
    # 2 layers without num_kv_shared_layers: mlx-lm's 20 leaves no layer computing keys and
    # values (mlx-lm fails to build it), transformers' 0 runs another model: refused. Without
    # layer_types: mlx-lm derives [sliding, sliding], transformers makes the last layer full
    # attention: refused
    from mlx_models import _mlx_model
    from transformers import AutoModelForCausalLM

    path = _checkpoint_without("gemma4_text", TIED, tmp_path, ("num_kv_shared_layers",))
    with pytest.raises((IndexError, KeyError)):  # (it indexes layers from -18)
        _mlx_model(str(path), "float32")
    with pytest.raises(
        ValueError, match=r"no num_kv_shared_layers: mlx-lm 0.32's 20 \(transformers' 0\)"
    ):
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    path = _checkpoint_without("gemma4_text", TIED, tmp_path / "2", ("layer_types",))
    with pytest.raises(ValueError, match=r"derives .*layer_types ending in 'sliding_attention'"):
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # (the same given: transformers would run the last layer as full attention, with a log line)
    from mlxq.integrations.config_defaults import with_mlx_lm_defaults

    given = {"model_type": "gemma4_text", "num_kv_shared_layers": 0, "num_hidden_layers": 2}
    with pytest.raises(ValueError, match=r"gives layer_types ending in 'sliding_attention'"):
        with_mlx_lm_defaults({**given, "layer_types": [_FULL, _SLIDING]})


@pytest.mark.parametrize("model_type", ["gemma4_text", "gemma4", "gemma4_unified"])
@pytest.mark.parametrize("layers", [4, 10, 30])
@pytest.mark.parametrize("pattern", [None, 2])
def test_gemma4_layer_types_derived_as_the_oracles(model_type, layers, pattern) -> None:
    # the layer_types given for an absent key are those mlx-lm's ModelArgs (and mlx-vlm's
    # TextConfig, for the image-text types) derive, or refused where they differ from each
    # other or end in a sliding layer (transformers' Gemma 4 runs the last layer as full)
    import mlx_lm.models.gemma4_text as lm
    from mlxq.integrations.config_defaults import with_mlx_lm_defaults

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    text = {
        "num_hidden_layers": layers,
        "num_kv_shared_layers": 0,
        "rope_parameters": {_FULL: rope, _SLIDING: rope},
    }
    if pattern is not None:
        text["sliding_window_pattern"] = pattern
    derived = [lm.ModelArgs.from_dict(text).layer_types]
    if model_type != "gemma4_text":
        import importlib

        vlm = importlib.import_module(f"mlx_vlm.models.{model_type}.config")
        derived.append(vlm.TextConfig.from_dict(text).layer_types)
    config = (
        {"model_type": model_type, **text}
        if model_type == "gemma4_text"
        else {"model_type": model_type, "text_config": text}
    )
    exact = all(d == derived[0] for d in derived) and derived[0][-1] == _FULL
    if not exact:
        with pytest.raises(ValueError, match=r"layer_types"):
            with_mlx_lm_defaults(config)
        return
    out = with_mlx_lm_defaults(config)
    got = out["layer_types"] if model_type == "gemma4_text" else out["text_config"]["layer_types"]
    assert got == derived[0]


def test_gemma4_unified_kv_sharing_the_oracles_default_apart_is_refused() -> None:
    # Gemma 4 Unified's text_config without num_kv_shared_layers: mlx-lm runs it with its
    # gemma4_text default 20, mlx-vlm with 0 (as transformers): refused, naming both
    from mlxq.integrations.config_defaults import with_mlx_lm_defaults

    config = {"model_type": "gemma4_unified", "text_config": {"num_hidden_layers": 30}}
    with pytest.raises(
        ValueError, match=r"no text_config.num_kv_shared_layers.*mlx-lm 0.32's 20, mlx-vlm .*'s 0"
    ):
        with_mlx_lm_defaults(config)


def _mlx_vlm_text_without(arch: str, tmp_path: Path, key: str) -> Path:
    """A copy of the tiny text model `arch` converted by mlx-vlm whose config.json lacks `key`
    (top level, and in rope_parameters)."""
    from arch_models import tiny_mlx_vlm_checkpoint

    folder = tmp_path / f"{arch}-vlm"
    shutil.copytree(tiny_mlx_vlm_checkpoint(arch, TIED), folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["vision_config"] == {} and key in config, f"{arch}: {config}"
    del config[key]
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        rope.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.mark.parametrize(
    ("arch", "key"), [("qwen2", "rope_theta"), ("gemma2", "query_pre_attn_scalar")]
)
def test_mlx_vlm_text_checkpoint_runs_mlx_lm_default(arch: str, key: str, tmp_path) -> None:
    # a text model converted by mlx-vlm: its port of mlx-lm's model defaults the key as
    # mlx-lm (qwen2's rope_theta 1e6, transformers' 1e4; gemma2's query_pre_attn_scalar 144,
    # transformers' 256), so mlx-lm's defaults give mlx-vlm's logits
    from arch_models import mlx_vlm_text_logits

    path = _mlx_vlm_text_without(arch, tmp_path, key)
    diff = float(np.abs(mlxq_logits(path, TOKENS) - mlx_vlm_text_logits(path, TOKENS)).max())
    assert diff <= TOLERANCE, f"{arch} converted by mlx-vlm without {key}: max|diff| {diff:.2e}"


def test_mlx_vlm_text_checkpoint_key_its_port_defaults_apart_is_refused(tmp_path) -> None:
    # Laguna converted by mlx-vlm without sliding_window: mlx-vlm's Laguna runs its sliding
    # layers without a window (its default None; 1.9 off mlx-lm's 512 over 700 tokens), which
    # transformers' Laguna cannot be told: refused (it ran 512). Gemma 3's text model: mlx-vlm
    # 1024, mlx-lm 512 (given before); an mlx-lm conversion keeps mlx-lm's default
    from mlxq.integrations.config_defaults import with_mlx_lm_defaults
    from transformers import AutoModelForCausalLM

    path = _mlx_vlm_text_without("laguna", tmp_path, "sliding_window")
    with pytest.raises(
        ValueError, match=r"'laguna' converted by mlx-vlm .* no sliding_window.*None"
    ):
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = {"model_type": "gemma3_text", "vision_config": {}}
    with pytest.raises(ValueError, match=r"no sliding_window: .*mlx-vlm 0.7.10's 1024"):
        with_mlx_lm_defaults(config)
    assert with_mlx_lm_defaults({"model_type": "gemma3_text"})["sliding_window"] == 512


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        # partial_rotary_factor: mlx-vlm's GLM-4.1V 0.5, transformers' 1.0 (mlxq failed in
        # the rotary embedding: the mrope sections fit half the head)
        ("glm4v", ("partial_rotary_factor",)),
        # rms_norm_eps and rope_theta: mlx-vlm's Llama 3.2 Vision 1e-6 and 10000,
        # transformers' 1e-5 and 500000
        ("mllama", ("rms_norm_eps", "rope_theta")),
        # Granite 4 Vision's muP multipliers, theta and eps: mlx-vlm's those of the released
        # model (embedding 12, attention 1/64, residual 0.22, logits 10, theta 1e7, eps 1e-5),
        # transformers' 1.0, 10000 and 1e-6
        (
            "granite4_vision",
            (
                "embedding_multiplier",
                "attention_multiplier",
                "residual_multiplier",
                "logits_scaling",
                "rope_theta",
                "rms_norm_eps",
            ),
        ),
        # rope_parameters: mlx-vlm's (and mlx-lm's) Qwen 3.5 theta 100000, transformers' 10000
        ("qwen3_5", ("rope_parameters",)),
        # Qwen4-Exp: mlx-vlm's sigmoid output gate and theta 1e7, transformers' silu and 10000
        ("qwen4_exp", ("output_gate_type", "rope_parameters")),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_absent_text_config_key_runs_mlx_vlm_default(name: str, keys, tmp_path: Path) -> None:
    # an image-text checkpoint converted by mlx-vlm whose text_config lacks the keys: mlx-vlm's
    # TextConfig defaults them otherwise than transformers' text config (no mlx-lm model of
    # these types reads them otherwise), so mlxq gives mlx-vlm's text-only logits
    from vlm_models import mlx_vlm_logits, model_inputs, tiny_mlx_vlm_checkpoint
    from vlm_models import mlxq_logits as vlm_mlxq_logits

    folder = tmp_path / name
    shutil.copytree(tiny_mlx_vlm_checkpoint(name), folder)
    config = json.loads((folder / "config.json").read_text())
    text = config["text_config"]
    for key in keys:
        rope = text.get("rope_parameters")
        assert key in text or key in (rope or {}), f"{name}'s text_config has no {key}"
        text.pop(key, None)
        if isinstance(rope, dict):
            rope.pop(key, None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    inputs = model_inputs(folder, name, with_image=False)
    ref = mlx_vlm_logits(folder, name, inputs)
    diff = float(np.abs(vlm_mlxq_logits(folder, name, inputs) - ref).max())
    assert diff <= TOLERANCE, f"{name} without text_config {keys}: max|diff| {diff:.2e}"
