"""Architectures beyond Llama: tiny random models converted by `mlx_lm.convert` must give
mlx-lm's fp32 logits in mlxq, or be refused by name; saving writes what mlx-lm reads.

The whole matrix runs as `python benchmarks/arch_coverage.py`; here a fast subset, plus the
swap rules (scaled embeddings, padding_idx, Conv1D, subclasses that override forward).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlxq
import numpy as np
import pytest
import torch
from arch_models import (
    ARCHS,
    FAST,
    MLX_LM_INPUT_LAYOUT,
    TOKENS,
    VARIANTS,
    Variant,
    assert_matches_mlx_lm,
    mlxq_logits,
    run_arch,
    tiny_float_checkpoint,
    tiny_mlx_checkpoint,
)
from arch_models import _config as _float_config
from mlx_models import mlx_lm_logits
from mlxq.nn import AffineEmbedding, AffineLinear, ScaledAffineEmbedding
from mlxq.swap import swap_plan
from torch import nn

TOLERANCE = 1e-3  # fp32 logits of ~1-10; transformers and mlx-lm float models differ < 1e-3


@pytest.mark.parametrize("arch", FAST)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.tag)
def test_matches_mlx_lm(arch: str, variant) -> None:
    assert_matches_mlx_lm(arch, variant, TOLERANCE)


@pytest.mark.parametrize(
    ("arch", "cls"), [("mamba", "Mamba"), ("mamba2", "Mamba2"), ("falcon_mamba", "FalconMamba")]
)
def test_mamba_head_read_for_its_dtype(arch: str, cls: str) -> None:
    # MambaForCausalLM.forward (Mamba2's and FalconMamba's too) casts by
    # `self.lm_head.weight.dtype`: an untied quantized head runs as a float layer holding its
    # dequantized weight; a tied one, a view of the quantized embedding, has no weight to
    # serve and is refused by name
    untied = run_arch(arch, VARIANTS[1])
    assert untied.status == "loads", untied.line()
    assert untied.max_diff <= TOLERANCE, untied.line()
    tied = run_arch(arch, VARIANTS[0])
    assert tied.status == "refused", tied.line()
    assert "'lm_head'" in tied.reason and f"{cls}ForCausalLM.forward" in tied.reason


def test_model_type_mlx_lm_builds_otherwise_is_refused_by_name(tmp_path: Path) -> None:
    # bailing_hybrid: mlx-lm's own model (lightning linear attention) is not transformers'
    # (KDA): no oracle from transformers' tiny model, and mlx-lm's checkpoint is refused by
    # name, not after a shape mismatch (or worse, loaded)
    import mlx.core as mx
    from mlx import nn as mlx_nn
    from mlx.utils import tree_map
    from mlx_lm.models import bailing_hybrid
    from mlx_lm.utils import save_config, save_model
    from transformers import AutoModelForCausalLM

    assert run_arch("bailing_hybrid", VARIANTS[0]).status == "mlx-lm fails"
    config = json.loads(_float_config("bailing_hybrid", False).to_json_string())
    config |= ARCHS["bailing_hybrid"][1]
    model = bailing_hybrid.Model(bailing_hybrid.ModelArgs.from_dict(config))
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.08, model.parameters()))
    quantizable = lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0  # noqa: E731
    mlx_nn.quantize(model, 64, 4, class_predicate=quantizable)
    save_model(tmp_path, model)
    save_config({**config, "quantization": {"group_size": 64, "bits": 4}}, tmp_path / "config.json")
    with pytest.raises(NotImplementedError, match="model type 'bailing_hybrid': mlx-lm 0.32's"):
        AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)


def test_model_type_mlx_lm_runs_on_metal_only_is_refused_by_name() -> None:
    # Muse Spark: mlx-lm converts the tiny image-text model but runs it with Metal kernels
    # only; its checkpoint (tensors of mlx-lm's own) is refused by name
    from transformers import AutoModelForImageTextToText

    outcome = run_arch("muse_spark", VARIANTS[0])
    assert outcome.status == "mlx-lm fails" and "Metal" in outcome.reason, outcome.line()
    path = tiny_mlx_checkpoint("muse_spark", VARIANTS[0])
    with pytest.raises(NotImplementedError, match="model type 'muse_spark': .*Metal kernels"):
        AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)


def test_gemma4_unified_loads_as_its_text_model() -> None:
    # mlx-lm converts Gemma 4 Unified's language model only (its gemma4 drops the patch
    # embedders): AutoModelForCausalLM builds the image-text model and is refused naming the
    # text class, which `mlxq generate` and `mlxq inspect` use
    from mlxq.cli.common import load_model
    from mlxq.inspect_checkpoint import inspect_checkpoint
    from transformers import AutoModelForCausalLM

    path = tiny_mlx_checkpoint("gemma4_unified", VARIANTS[0])
    with pytest.raises(ValueError, match="Gemma4UnifiedForCausalLM"):
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    loaded, _, _ = load_model(str(path), "cpu", "float32")
    assert type(loaded).__name__ == "Gemma4UnifiedForCausalLM"
    report = inspect_checkpoint(path, str(path))
    assert not report.errors and any(m.bits == 4 for m in report.modules)


def test_gemma3n_text_model_generates_as_mlx_lm(tmp_path: Path) -> None:
    # mlx-lm keeps Gemma 3n's Hub names (`model.language_model.*`) and the key/value
    # projections of its KV-shared layers, which it does not use when it runs with its cache
    # and transformers does not build: `mlxq generate` loads Gemma3nForCausalLM (the image-text
    # model needs timm), holds those projections without calling them, generates mlx-lm's
    # greedy tokens past the sliding window (8) from the shared caches, and saves mlx-lm's
    # checkpoint back
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_models import _mlx_model, greedy_tokens
    from mlxq.cli.common import load_model
    from mlxq.inspect_checkpoint import inspect_checkpoint
    from safetensors import safe_open

    path = tiny_mlx_checkpoint("gemma3n", VARIANTS[0])
    with safe_open(str(path / "model.safetensors"), "np") as f:
        assert "model.language_model.layers.3.self_attn.k_proj.scales" in f.keys()
    model, _, _ = load_model(str(path), "cpu", "float32")
    assert type(model).__name__ == "Gemma3nForCausalLM"
    shared = model.model.layers[3].self_attn
    assert shared.is_kv_shared_layer and isinstance(shared.k_proj, AffineLinear)
    prompt = TOKENS[:5]
    ours = greedy_tokens(model, prompt, 16)[len(prompt) :].tolist()
    steps = generate_step(mx.array(prompt), _mlx_model(str(path), "float32"), max_tokens=16)
    assert ours == [int(token) for token, _ in steps]
    report = inspect_checkpoint(path, str(path))
    assert not report.errors and any(m.bits == 4 for m in report.modules)
    model.save_pretrained(tmp_path)
    for file in path.glob("tokenizer*"):
        shutil.copy(file, tmp_path / file.name)
    with safe_open(str(path / "model.safetensors"), "pt") as a:
        with safe_open(str(tmp_path / "model.safetensors"), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma3n"
    ref = mlx_lm_logits(path, TOKENS, cached=True)
    np.testing.assert_array_equal(mlx_lm_logits(tmp_path, TOKENS, cached=True), ref)


def test_minicpm3_tied_head_is_scaled_as_transformers_scales_it() -> None:
    # MiniCPM3 divides the hidden states by hidden_size / dim_model_base before its head;
    # mlx-lm 0.32 does so before an untied head only, and skips it before its tied one (its
    # logits are then that factor smaller, same argmax). mlxq runs transformers' model:
    # mlx-lm's logits untied, mlx-lm's times dim_model_base / hidden_size tied
    outcome = run_arch("minicpm3", VARIANTS[1])
    assert outcome.status == "loads" and outcome.max_diff <= TOLERANCE, outcome.line()
    path = tiny_mlx_checkpoint("minicpm3", VARIANTS[0])
    config = json.loads((path / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["dim_model_base"] != config["hidden_size"]
    ours, ref = mlxq_logits(path, TOKENS), mlx_lm_logits(path, TOKENS)
    factor = config["dim_model_base"] / config["hidden_size"]
    assert float(np.abs(ours - ref).max()) > 1  # not mlx-lm's logits
    np.testing.assert_allclose(ours, ref * factor, rtol=0, atol=TOLERANCE)


def test_nanochat_quantized_whole_generates_and_pickles() -> None:
    # nanochat has no norm weights: loaded from mlx-lm's checkpoint (its own names), every
    # tensor is quantized and the model has no parameter, where transformers' `device` and
    # `dtype` (which its generate reads) look; mlxq reads them from the buffers
    import copy
    import io

    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_models import _mlx_model, greedy_tokens
    from mlxq.cli.common import load_model

    path = tiny_mlx_checkpoint("nanochat", Variant(tied=False, bits=3, group_size=32))
    model, _, _ = load_model(str(path), "cpu", "float32")
    assert next(model.parameters(), None) is None
    assert (model.device.type, model.dtype) == ("cpu", torch.float32)
    prompt = TOKENS[:5]
    ours = greedy_tokens(model, prompt, 16)[len(prompt) :].tolist()
    steps = generate_step(mx.array(prompt), _mlx_model(str(path), "float32"), max_tokens=16)
    assert ours == [int(token) for token, _ in steps]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for again in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert type(again).__name__ == type(model).__name__ and again.device.type == "cpu"
        with torch.no_grad():
            torch.testing.assert_close(
                again(torch.tensor([TOKENS])).logits, model(torch.tensor([TOKENS])).logits
            )


def test_gemma_embedding_keeps_its_scale() -> None:
    """The quantized Gemma embedding multiplies by sqrt(hidden) as transformers' does."""
    from transformers import AutoModelForCausalLM

    path = tiny_mlx_checkpoint("gemma", VARIANTS[0])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    emb = model.model.embed_tokens
    assert isinstance(emb, ScaledAffineEmbedding)
    assert emb.embed_scale == pytest.approx(128**0.5, rel=1e-6)
    assert isinstance(model.lm_head, nn.Module) and not isinstance(model.lm_head, AffineLinear)
    ids = torch.tensor([[1, 2, 3]])
    table = AffineEmbedding.forward(emb, ids)  # unscaled rows
    torch.testing.assert_close(emb(ids), table * torch.tensor(128**0.5, dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_embeddings_reproduce_transformers_rounding(dtype: torch.dtype) -> None:
    """Gemma scales with a tensor cast to the weight dtype, BART with a Python float: the
    quantized module gives bit-identical results to the float module on the same table."""
    from transformers.models.bart.modeling_bart import BartScaledWordEmbedding
    from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding

    torch.manual_seed(0)
    ids = torch.randint(0, 64, (3, 5))
    for float_module in (
        GemmaTextScaledWordEmbedding(64, 128, padding_idx=0, embed_scale=2048**0.5),
        BartScaledWordEmbedding(64, 128, padding_idx=0, embed_scale=2048**0.5),
    ):
        float_module = float_module.to(dtype)
        quantized = swap_plan("embed", float_module).require().quantize(float_module, 4, 64)
        assert isinstance(quantized, ScaledAffineEmbedding) and quantized.padding_idx == 0
        with torch.no_grad():  # the float module on the quantized table: the same function
            float_module.weight.copy_(AffineEmbedding.forward(quantized, torch.arange(64)))
            want = float_module(ids)
        assert torch.equal(quantized(ids), want), type(float_module).__name__


def test_padding_idx_row_is_looked_up_like_nn_embedding() -> None:
    """padding_idx only affects gradients: its row is looked up like any other."""
    torch.manual_seed(0)
    emb = nn.Embedding(32, 64, padding_idx=3)
    with torch.no_grad():
        emb.weight[3] = torch.randn(64)  # a loaded checkpoint may hold anything there
    quantized = swap_plan("e", emb).quantize(emb, 8, 32)
    assert quantized.padding_idx == 3
    rows = quantized(torch.tensor([3, 4]))
    assert rows[0].abs().sum() > 0
    torch.testing.assert_close(rows, emb(torch.tensor([3, 4])), atol=0.05, rtol=0)


class _Doubling(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class _Renamed(nn.Embedding):  # a subclass that keeps nn.Embedding's forward is fine
    pass


def test_swap_refuses_subclasses_that_override_forward() -> None:
    with pytest.raises(NotImplementedError, match=r"'mlp\.up' \(_Doubling\).*overrides forward"):
        swap_plan("mlp.up", _Doubling(64, 64)).require()
    with pytest.raises(NotImplementedError, match=r"'emb' \(Embedding\): max_norm=1\.0"):
        swap_plan("emb", nn.Embedding(8, 64, max_norm=1.0)).require()
    assert swap_plan("emb", _Renamed(8, 64)).refusal is None
    assert swap_plan("norm", nn.LayerNorm(64)) is None

    model = nn.Sequential(nn.Linear(64, 64), _Doubling(64, 64))
    with pytest.raises(NotImplementedError, match=r"'1' \(_Doubling\)"):
        mlxq.quantize_model(model, 4, 64)
    mlxq.quantize_model(model, 4, 64, modules_to_not_convert=["1"])  # kept float: exact
    assert isinstance(model[0], AffineLinear) and type(model[1]) is _Doubling


def test_loading_refuses_a_quantized_module_whose_forward_is_unknown(monkeypatch) -> None:
    """A transformers model whose quantized layer is an unknown nn.Linear subclass is refused
    at load with the module's name and class, instead of being replaced."""
    from transformers.models.llama import modeling_llama

    class _ScaledMLP(modeling_llama.LlamaMLP):
        def __init__(self, config):
            super().__init__(config)
            self.up_proj = _Doubling(config.hidden_size, config.intermediate_size, bias=False)

    monkeypatch.setattr(modeling_llama, "LlamaMLP", _ScaledMLP)
    with pytest.raises(
        NotImplementedError, match=r"'model\.layers\.0\.mlp\.up_proj' \(_Doubling\)"
    ):
        mlxq_logits(tiny_mlx_checkpoint("llama", VARIANTS[0]), TOKENS)


def test_dequantize_keeps_the_embedding_scale() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_mlx_checkpoint("gemma", VARIANTS[0]), dtype=torch.float32
    )
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        before = model(ids).logits
        model.dequantize()
        after = model(ids).logits
    assert not any(isinstance(m, AffineEmbedding) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


# Saving: a float checkpoint whose config.json has only what transformers 5 writes (no
# top-level rope keys), quantized by mlxq and saved, must load in mlx-lm as the same model.
@pytest.mark.parametrize(
    ("arch", "tied"),
    [
        ("phi", False),
        ("stablelm", False),
        ("gpt_neox", False),
        ("gpt2", True),
        ("gemma3_text", True),
    ],
)
def test_save_pretrained_writes_what_mlx_lm_reads(tmp_path: Path, arch: str, tied: bool) -> None:
    from transformers import AutoModelForCausalLM

    float_dir = tiny_float_checkpoint(arch, tmp_path / "float", tied)
    config = json.loads((float_dir / "config.json").read_text())
    for key in ARCHS[arch][1]:  # as transformers 5 saved it: rope settings nested only
        config.pop(key, None)
    (float_dir / "config.json").write_text(json.dumps(config))

    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    # a square Conv1D kept float: saved as mlx-lm's [out, in] linear (a transposed square weight
    # would load without any shape error)
    keep_float = ["transformer.h.0.attn.c_proj"] if arch == "gpt2" else []
    mlxq.quantize_model(model, bits=4, group_size=64, modules_to_not_convert=keep_float)
    saved = tmp_path / "mlx"
    model.save_pretrained(saved)
    for file in float_dir.iterdir():  # the tokenizer's files
        if not (saved / file.name).exists():
            (saved / file.name).write_bytes(file.read_bytes())
    written = json.loads((saved / "config.json").read_text())
    for key, value in ARCHS[arch][1].items():
        assert written.get(key) == value, (key, written.get(key))

    with torch.no_grad():
        ours = model(torch.tensor([TOKENS])).logits[0].numpy()
    ref = mlx_lm_logits(saved, TOKENS)
    assert float(np.abs(ours - ref).max()) <= TOLERANCE
    # and transformers + mlxq read mlx-lm's layout back (GPT-2, GPT-NeoX names)
    np.testing.assert_allclose(mlxq_logits(saved, TOKENS), ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "recipe", "text_class"),
    [
        ("gemma3", None, "Gemma3ForCausalLM"),
        ("gemma3", "mixed_3_6", "Gemma3ForCausalLM"),
        ("mistral3", None, "MistralForCausalLM"),
        ("llava", None, "LlamaForCausalLM"),
    ],
)
def test_language_model_of_image_text_checkpoint(
    tmp_path: Path, family: str, recipe: str | None, text_class: str
) -> None:
    # mlx-lm converts some image-text models (Gemma 3 4B and up, Mistral 3, LLaVA) to their
    # language model only, under `language_model.`, with the quantization block at the top of
    # config.json; transformers gives the text class only `text_config`, so mlxq carries the
    # block there, and reads the text model's tensors from under the prefix
    import shutil

    import transformers
    from mlx_lm import convert
    from mlxq.cli.common import load_model
    from vlm_models import tiny_float_checkpoint as tiny_image_text_checkpoint

    float_dir = tiny_image_text_checkpoint(family, tmp_path / "float", tied=family == "gemma3")
    config = json.loads((float_dir / "config.json").read_text())
    config["vocab_size"] = config["text_config"]["vocab_size"]  # mlx-lm's gemma3 reads it here
    (float_dir / "config.json").write_text(json.dumps(config))
    mlx_dir = tmp_path / "mlx"
    options = {"quant_predicate": recipe} if recipe else {"q_bits": 4, "q_group_size": 64}
    convert(str(float_dir), mlx_path=str(mlx_dir), quantize=True, **options)
    ref = mlx_lm_logits(mlx_dir, TOKENS)

    cls = getattr(transformers, text_class)
    model = cls.from_pretrained(mlx_dir, dtype=torch.float32)
    assert isinstance(model.model.layers[0].mlp.down_proj, AffineLinear)
    if recipe:  # mixed_3_6: per-module entries under mlx-lm's names
        bits = {model.model.layers[i].mlp.down_proj.bits for i in range(2)}
        assert bits == {3, 6}
    with torch.no_grad():
        ours = model(torch.tensor([TOKENS])).logits[0].numpy()
    assert float(np.abs(ours - ref).max()) <= TOLERANCE  # gemma3_text's float difference

    # saved as the text model, in the names of mlx-lm's text model (Gemma 3 1B's layout)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    for file in mlx_dir.glob("tokenizer*"):
        shutil.copy(file, saved)
    assert (
        json.loads((saved / "config.json").read_text())["model_type"]
        == (config["text_config"]["model_type"])
    )
    np.testing.assert_array_equal(mlx_lm_logits(saved, TOKENS), ref)

    # AutoModelForCausalLM builds the image-text model (Gemma 3; transformers has no causal LM
    # for the others' configs): refused, naming the class to use
    with pytest.raises(ValueError, match=text_class if family == "gemma3" else "AutoModel"):
        transformers.AutoModelForCausalLM.from_pretrained(mlx_dir, dtype=torch.float32)
    # `mlxq generate` loads it with that class
    loaded, _, _ = load_model(str(mlx_dir), "cpu", "float32")
    assert type(loaded).__name__ == text_class


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next", "qwen3_5_moe"])
def test_quantized_float_model_saves_what_mlx_lm_convert_writes(tmp_path: Path, arch: str) -> None:
    # a float Qwen 3.5 (Hub prefix `model.language_model.`) or Qwen3-Next quantized by mlxq
    # and saved must be `mlx_lm convert`'s checkpoint, tensor for tensor: the text model
    # under `language_model.` once, conv1d weights channels-last (mlx-lm's sanitize reads a
    # channels-first one as a Hub checkpoint and adds 1 to the norms a second time). Qwen 3.5
    # MoE (the Hub's image-text checkpoint read as Qwen3_5MoeForCausalLM) takes mlxq's own
    # entries for mlx-lm's rule: routers and shared-expert gates at 8 bits
    from mlx_lm import convert
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    float_dir = tiny_float_checkpoint(arch, tmp_path / "float", False)
    if arch in MLX_LM_INPUT_LAYOUT:  # Qwen 3.5 MoE: the Hub's fused experts, which mlx-lm reads
        MLX_LM_INPUT_LAYOUT[arch](float_dir)
    ref_dir = tmp_path / "ref"
    convert(str(float_dir), mlx_path=str(ref_dir), quantize=True, q_bits=4, q_group_size=64)
    if arch == "qwen3_5":  # quantized while loading
        model = AutoModelForCausalLM.from_pretrained(
            float_dir,
            dtype=torch.bfloat16,
            quantization_config=mlxq.MLXQuantConfig(bits=4, group_size=64),
        )
    elif arch == "qwen3_5_moe":  # mlxq's entries (model_walk), as mlxq convert quantizes
        model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.bfloat16)
        assert type(model).__name__ == "Qwen3_5MoeForCausalLM"
        mlxq.quantize_model(model, bits=4, group_size=64)
    else:  # MoE routers are quantized by quantize_model (mlxq convert's path)
        model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.bfloat16)
        eight_bit = {"bits": 8, "group_size": 64}  # mlx-lm's rule for Qwen3-Next's gates
        overrides = {
            name: eight_bit
            for name, _ in model.named_modules()
            if name.endswith(("mlp.gate", "shared_expert_gate"))
        }
        mlxq.quantize_model(model, bits=4, group_size=64, overrides=overrides)
    model.save_pretrained(tmp_path / "saved")
    ref = {}
    for file in ref_dir.glob("*.safetensors"):
        ref.update(load_file(file))
    ours = load_file(tmp_path / "saved" / "model.safetensors")
    assert sorted(ours) == sorted(ref)
    unequal = [k for k in ref if ours[k].dtype != ref[k].dtype or not torch.equal(ours[k], ref[k])]
    assert not unequal, unequal[:5]
    if arch == "qwen3_5_moe":  # the entries, in mlx-lm's names (before: transformers')
        written = json.loads((tmp_path / "saved" / "config.json").read_text())
        reference = json.loads((ref_dir / "config.json").read_text())
        assert written["quantization"] == reference["quantization"]
        # (mlxq's quant_method: transformers reads the block with it)
        assert written["quantization_config"].pop("quant_method") == "mlx"
        assert written["quantization_config"] == reference["quantization_config"]
    # and config.json reads as mlx-lm reads convert's (mlx-lm 0.32 has no `qwen3_5_text`): the
    # same model in mlx-lm, and mlxq reads it back as mlx-lm does
    saved = tmp_path / "saved"
    for file in ref_dir.iterdir():  # the tokenizer, which mlx-lm loads with the model
        if file.is_file() and not (saved / file.name).exists():
            shutil.copy(file, saved / file.name)
    assert json.loads((saved / "config.json").read_text())["model_type"] == arch
    ref_logits = mlx_lm_logits(ref_dir, TOKENS)
    np.testing.assert_array_equal(mlx_lm_logits(saved, TOKENS), ref_logits)
    assert float(np.abs(mlxq_logits(saved, TOKENS) - ref_logits).max()) <= TOLERANCE


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe"])
def test_qwen3_5_checkpoint_saved_again_loads_in_mlx_lm(tmp_path: Path, arch: str) -> None:
    # mlx-lm's conversion loads as transformers' text model (`qwen3_5_text`, a model type
    # mlx-lm 0.32 does not have); saved again, config.json nests it as convert wrote it
    from transformers import AutoModelForCausalLM

    source = tiny_mlx_checkpoint(arch, VARIANTS[1])
    saved = tmp_path / "saved"
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).save_pretrained(saved)
    for file in source.iterdir():  # the tokenizer, which mlx-lm loads with the model
        if file.is_file() and not (saved / file.name).exists():
            shutil.copy(file, saved / file.name)
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == arch and config["text_config"]["model_type"] == f"{arch}_text"
    ref = mlx_lm_logits(source, TOKENS)
    np.testing.assert_array_equal(mlx_lm_logits(saved, TOKENS), ref)
    assert float(np.abs(mlxq_logits(saved, TOKENS) - ref).max()) <= TOLERANCE


def test_entries_name_the_saved_tensors_under_mlx_lm_prefix(tmp_path: Path) -> None:
    # a float Qwen 3.5 quantized while loading with a per-module entry: saved under mlx-lm's
    # `language_model.`, the entry names the module there too (before: transformers' name,
    # which mlx-lm does not look up, reading the 8-bit layer as 4-bit)
    from transformers import AutoModelForCausalLM

    float_dir = tiny_float_checkpoint("qwen3_5", tmp_path / "float", False)
    eight = {"bits": 8, "group_size": 64}
    model = AutoModelForCausalLM.from_pretrained(
        float_dir,
        dtype=torch.bfloat16,
        quantization_config=mlxq.MLXQuantConfig(
            bits=4, group_size=64, overrides={"model.layers.0.mlp.down_proj": eight}
        ),
    )
    assert model.model.layers[0].mlp.down_proj.bits == 8
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    for file in float_dir.glob("tokenizer*"):
        shutil.copy(file, saved)
    block = json.loads((saved / "config.json").read_text())["quantization"]
    assert block == {
        "bits": 4,
        "group_size": 64,
        "mode": "affine",
        "language_model.model.layers.0.mlp.down_proj": eight,
    }
    ours = mlxq_logits(saved, TOKENS)
    assert float(np.abs(mlx_lm_logits(saved, TOKENS) - ours).max()) <= TOLERANCE


@pytest.mark.parametrize(
    ("arch", "variant"), [("glm4_moe", 1), ("deepseek_v3", 1), ("ernie4_5_moe", 0)]
)
def test_bf16_checkpoint_saved_again_keeps_the_stored_dtypes(
    tmp_path: Path, arch: str, variant: int
) -> None:
    # mlx-lm's bf16 checkpoint loaded in bf16 and saved: every tensor as stored, dtype
    # included. transformers keeps GLM-4.5's / DeepSeek V3's routers (weight, correction
    # bias) in fp32, and ERNIE 4.5's quantized router is built on its fp32 weight (fp32
    # scales): saving wrote those fp32 before
    from arch_models import causal_lm_class
    from safetensors.torch import load_file

    source = tiny_mlx_checkpoint(arch, VARIANTS[variant])
    model = causal_lm_class(arch).from_pretrained(source, dtype=torch.bfloat16)
    gate = model.model.layers[1].mlp.gate
    assert any(t.dtype == torch.float32 for t in (*gate.parameters(), *gate.buffers()))
    model.save_pretrained(tmp_path / "saved")
    ref = {}
    for file in source.glob("*.safetensors"):
        ref.update(load_file(file))
    ours = load_file(tmp_path / "saved" / "model.safetensors")
    # (ERNIE: the correction bias mlx-lm drops and mlxq fills with zeros is left out, as
    # mlx-lm's checkpoint has it; before, it was written)
    assert sorted(ours) == sorted(ref)
    unequal = [k for k in ref if ours[k].dtype != ref[k].dtype or not torch.equal(ours[k], ref[k])]
    assert not unequal, unequal[:5]


def test_language_model_of_kimi_k25_checkpoint(tmp_path: Path) -> None:
    # mlx-lm converts Kimi K2.5 to its language model (DeepSeek V3's) only, under
    # `language_model.`, the experts stacked per projection (switch_mlp): mlxq reads them with
    # DeepSeek V3's renames after the prefix's (before: the stacked experts were not found),
    # and saves the text model as mlx-lm's DeepSeek V3 (Llama 4's mlx-lm conversion: test_moe)
    from mlxq.cli.common import load_model
    from mlxq.moe import AffineSwitchLinear, MoeExperts
    from vlm_models import tiny_mlx_lm_checkpoint

    path = tiny_mlx_lm_checkpoint("kimi_k25")
    model, _, _ = load_model(str(path), "cpu", "float32")
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    experts = [m for m in model.modules() if isinstance(m, MoeExperts)]
    assert experts and all(isinstance(e.down_proj, AffineSwitchLinear) for e in experts)
    assert {e.down_proj.bits for e in experts} == {4}
    ref = mlx_lm_logits(path, TOKENS)
    with torch.no_grad():
        ours = model(torch.tensor([TOKENS])).logits[0].numpy()
    assert float(np.abs(ours - ref).max()) <= TOLERANCE
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepseek_v3"
    for file in path.glob("tokenizer*"):
        shutil.copy(file, tmp_path / file.name)
    np.testing.assert_allclose(mlx_lm_logits(tmp_path, TOKENS), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", ["kimi_k2", "joyai_llm_flash"])
def test_model_types_mlx_lm_runs_as_deepseek_v3(tmp_path: Path, model_type: str) -> None:
    # mlx-lm 0.32 runs Kimi K2 and JoyAI-LLM-Flash as DeepSeek V3 (MODEL_REMAPPING), whose
    # config keys they share; transformers 5.24 refused the model type. A tiny DeepSeek V3
    # converted by mlx-lm under that model type loads as transformers' DeepSeek V3 with
    # mlx-lm's logits (saved back as deepseek_v3, which mlx-lm reads as the same model); a key
    # only mlx-lm reads (moe_layer_freq) at another value is refused by name
    from arch_models import _cache_key, _cached_conversion
    from mlxq.cli.common import load_model
    from mlxq.inspect_checkpoint import inspect_checkpoint

    variant = VARIANTS[1]

    def rename(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))

    key = f"{_cache_key('deepseek_v3', variant)}-as-{model_type}"
    path = _cached_conversion(key, "deepseek_v3", variant, rename)
    assert json.loads((path / "config.json").read_text())["model_type"] == model_type
    model, _, _ = load_model(str(path), "cpu", "float32")
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    ref = mlx_lm_logits(path, TOKENS)
    assert float(np.abs(mlxq_logits(path, TOKENS) - ref).max()) <= TOLERANCE
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3"
    report = inspect_checkpoint(path, str(path))  # `mlxq inspect` reads it the same
    assert not report.errors, report.errors

    other = tmp_path / "freq2"
    shutil.copytree(path, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "moe_layer_freq": 2}))
    with pytest.raises(ValueError, match=f"model type '{model_type}' sets moe_layer_freq: 2"):
        load_model(str(other), "cpu", "float32")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_language_model_without_a_causal_lm_is_refused_by_name(family: str) -> None:
    # mlx-lm's conversion of Qwen2-VL / Qwen3-VL (-MoE) holds the language model only; transformers
    # 5.24 has no causal LM for its text model, and the image-text model it builds has a
    # vision tower nothing fills (before: refused for missing vision tensors, or for a
    # quantized `model.embed_tokens` it has no such module for)
    from mlxq.cli.common import load_model
    from mlxq.inspect_checkpoint import inspect_checkpoint
    from transformers import AutoModelForImageTextToText
    from vlm_models import tiny_mlx_lm_checkpoint

    path = tiny_mlx_lm_checkpoint(family)
    match = f"model type '{family}': this checkpoint holds the language model only"
    with pytest.raises(NotImplementedError, match=match):
        load_model(str(path), "cpu", "float32")
    with pytest.raises(NotImplementedError, match=match):
        AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    report = inspect_checkpoint(path, str(path))  # `mlxq inspect` says the same
    assert len(report.errors) == 1 and match in report.errors[0].message


def test_mlx_lm_conversion_of_minimax_m3_vl_is_refused_by_name() -> None:
    # mlx-lm converts MiniMax-M3-VL's language model; transformers' experts module (the shared
    # expert packed in) runs the experts loop mlxq knows (GLM-5-Next's form) with a gate
    # (_apply_gate) mlxq does not reproduce: refused naming the module and the function
    from mlxq.cli.common import load_model
    from vlm_models import tiny_mlx_lm_checkpoint

    path = tiny_mlx_lm_checkpoint("minimax_m3_vl")
    match = r"\(MiniMaxM3VLExperts\): its _apply_gate is not the one mlxq reproduces"
    with pytest.raises(NotImplementedError, match=match):
        load_model(str(path), "cpu", "float32")


def test_model_types_only_mlx_lm_or_mlx_vlm_run_are_refused_by_name(tmp_path: Path) -> None:
    # every model type mlx-lm 0.32 (its modules, MODEL_REMAPPING) or mlx-vlm 0.7.10 (its model
    # packages, MODEL_REMAPPING) runs that transformers 5.24 does not know: a checkpoint of
    # one is refused naming its type, never loaded as another
    import os

    import mlx_lm.utils
    import mlx_vlm.utils
    from mlxq.cli.common import load_model
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    folder = Path(mlx_lm.utils.__file__).parent / "models"
    modules = {name.removesuffix(".py") for name in os.listdir(folder)}
    types = sorted((modules | set(mlx_lm.utils.MODEL_REMAPPING)) - set(CONFIG_MAPPING_NAMES))
    types = [t for t in types if hasattr(_mlx_lm_module(t), "ModelArgs")]
    assert {"plamo2", "internlm2", "kimi_k2", "rwkv7"} <= set(types)
    folder = Path(mlx_vlm.utils.__file__).parent / "models"
    packages = {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
    vlm_types = (packages | set(mlx_vlm.utils.MODEL_REMAPPING)) - set(CONFIG_MAPPING_NAMES)
    vlm_types = sorted(vlm_types - set(types))
    assert {"deepseekocr", "moondream2", "phi4mm", "internvl_chat"} <= set(vlm_types)
    # but those mlx-lm runs as DeepSeek V3, which load as it (the test above)
    as_deepseek_v3 = ("kimi_k2", "joyai_llm_flash")
    for model_type in [t for t in types + vlm_types if t not in as_deepseek_v3]:
        path = _bare_checkpoint(tmp_path / model_type, model_type)
        match = f"model type `{re.escape(model_type)}`"
        if model_type in types:
            with pytest.raises(ValueError, match=match):
                AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with pytest.raises(ValueError, match=match):
            load_model(str(path), "cpu", "float32")
    # and those whose config transformers knows without a model that generates from it: Step
    # 3.5's text config (of its image-text step3p7), Pixtral's vision tower
    for model_type, config_class in (("step3p5", "Step3p7TextConfig"), ("pixtral", "Pixtral")):
        path = _bare_checkpoint(tmp_path / model_type, model_type)
        with pytest.raises(ValueError, match=f"Unrecognized configuration class .*{config_class}"):
            load_model(str(path), "cpu", "float32")


def _bare_checkpoint(path: Path, model_type: str) -> Path:
    """A folder with a 4-bit MLX config.json of `model_type` and one packed tensor."""
    from safetensors.torch import save_file

    path.mkdir()
    block = {"group_size": 64, "bits": 4}
    config = {"model_type": model_type, "quantization": block, "quantization_config": block}
    (path / "config.json").write_text(json.dumps(config))
    tensor = {"model.embed_tokens.weight": torch.zeros(8, 8, dtype=torch.int32)}
    save_file(tensor, path / "model.safetensors", metadata={"format": "mlx"})
    return path


def _mlx_lm_module(model_type: str):
    import importlib

    import mlx_lm.utils

    name = mlx_lm.utils.MODEL_REMAPPING.get(model_type, model_type)
    try:
        return importlib.import_module(f"mlx_lm.models.{name}")
    except ImportError:
        return None


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_bigcode", "mamba", "internlm3", "laguna"])
def test_mlx_vlm_conversion_of_a_text_model(tmp_path: Path, arch: str) -> None:
    # mlx-vlm 0.7 converts text models too: mlx-lm's tensors under `language_model.` (whatever
    # their top-level name: GPT-BigCode's `transformer.`, Mamba's `backbone.`) and an empty
    # vision_config. mlxq reads them as the text model (before: Qwen3-MoE refused as an
    # image-text model, the others for modules `language_model.transformer...` it lacks),
    # with the logits of mlx-lm's conversion of the same model, tensor for tensor the same.
    # mlx-vlm's own InternLM3 departs from the model (2.4 off in these logits; mlx-lm's agrees).
    # mlx-vlm's Laguna fuses the experts' gate and up stacks (`switch_mlp.gate_up_proj`): cut
    # in two at load (before: refused, experts not found), saved as mlx-lm's separate stacks
    from arch_models import mlx_vlm_text_logits, tiny_mlx_vlm_checkpoint
    from safetensors.torch import load_file

    variant = Variant(tied=False)
    path = tiny_mlx_vlm_checkpoint(arch, variant)
    assert json.loads((path / "config.json").read_text())["vision_config"] == {}
    ours = mlxq_logits(path, TOKENS)
    if arch != "internlm3":
        assert float(np.abs(ours - mlx_vlm_text_logits(path, TOKENS)).max()) <= TOLERANCE
    reference = tiny_mlx_checkpoint(arch, variant)
    theirs, own = load_file(path / "model.safetensors"), load_file(reference / "model.safetensors")
    if arch == "laguna":  # each fused stack: mlx-lm's gate stack, then its up stack
        fused = {k: v for k, v in theirs.items() if ".switch_mlp.gate_up_proj." in k}
        assert fused
        for key, value in fused.items():
            parts = [
                own[key.removeprefix("language_model.").replace("gate_up", p)]
                for p in ("gate", "up")
            ]
            assert torch.equal(value, torch.cat(parts, dim=1))
            del theirs[key]
        own = {
            k: v
            for k, v in own.items()
            if ".switch_mlp.gate_proj." not in k and ".switch_mlp.up_proj." not in k
        }
    assert sorted(theirs) == sorted(f"language_model.{k}" for k in own)
    assert all(torch.equal(theirs[f"language_model.{k}"], v) for k, v in own.items())
    np.testing.assert_array_equal(ours, mlxq_logits(reference, TOKENS))
    ref = mlx_lm_logits(reference, TOKENS)
    assert float(np.abs(ours - ref).max()) <= TOLERANCE
    if arch == "laguna":  # saved in mlx-lm's names: mlx-lm's model, the same logits
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.save_pretrained(tmp_path)
        for file in reference.glob("tokenizer*"):
            shutil.copy(file, tmp_path / file.name)
        saved = load_file(tmp_path / "model.safetensors")
        assert sorted(saved) == sorted(load_file(reference / "model.safetensors"))
        np.testing.assert_array_equal(mlx_lm_logits(tmp_path, TOKENS), ref)


# every width and group size mlx_lm convert writes, beyond the matrix's 4-bit g64 and mixed_3_6
# (measured: 5e-6 to 1.2e-5 from mlx-lm's logits), and a MoE at 5 bits whose greedy tokens are
# mlx-lm's own
WIDTHS = [
    ("llama", Variant(tied=True, bits=2, group_size=128)),
    ("llama", Variant(tied=True, bits=5, group_size=32)),
    ("llama", Variant(tied=True, bits=6, group_size=128)),
    ("llama", Variant(tied=True, bits=8, group_size=128)),
    ("qwen3_moe", Variant(tied=False, bits=4, recipe="mixed_2_6")),
    ("qwen3_moe", Variant(tied=True, bits=5, group_size=32)),
]


@pytest.mark.parametrize(("arch", "variant"), WIDTHS, ids=lambda v: getattr(v, "tag", v))
def test_every_width_matches_mlx_lm(arch: str, variant: Variant) -> None:
    assert_matches_mlx_lm(arch, variant, 5e-5)
    if arch == "qwen3_moe" and variant.bits == 5:
        import mlx.core as mx
        from arch_models import causal_lm_class
        from mlx_lm.generate import generate_step
        from mlx_models import _mlx_model, greedy_tokens

        path = tiny_mlx_checkpoint(arch, variant)
        prompt = [5, 17, 300, 42, 8, 99]
        model = causal_lm_class(arch).from_pretrained(path, dtype=torch.float32)
        ours = greedy_tokens(model, prompt, 16)[len(prompt) :].tolist()
        steps = generate_step(mx.array(prompt), _mlx_model(str(path), "float32"), max_tokens=16)
        assert ours == [int(token) for token, _ in steps]


# `mlx_lm convert --dtype`: scales, biases and float layers stored in float16 or float32 (the
# config keeps its torch_dtype), loaded in that dtype
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_convert_dtype_matches_mlx_lm(dtype: str) -> None:
    from arch_models import _cache_key, _cached_conversion

    variant = Variant(tied=True)
    path = _cached_conversion(
        f"{_cache_key('llama', variant)}-dtype-{dtype}",
        "llama",
        variant,
        lambda f: None,
        dtype=dtype,
    )
    ref = mlx_lm_logits(path, TOKENS)
    got = mlxq_logits(path, TOKENS)
    assert float(np.abs(got - ref).max()) <= 5e-5


@pytest.mark.parametrize("arch", ["cohere", "cohere2"])
def test_cohere_logit_scale_is_read_as_mlx_lm_reads(tmp_path: Path, arch: str) -> None:
    # mlx-lm's Cohere and Cohere 2 multiply the logits by config.json's logit_scale (default
    # 0.0625), as transformers' do: a value of neither default nor 1 (0.5), and none (both
    # default to 0.0625), give mlx-lm's logits; the oracle's own logits at 0.5 are those at
    # the default times 8, so a scale read otherwise (or not at all) would show
    src = tiny_mlx_checkpoint(arch, VARIANTS[0])
    refs = {}
    for scale in (0.5, None):
        path = tmp_path / f"scale-{scale}"
        shutil.copytree(src, path)
        config = json.loads((path / "config.json").read_text())
        config.pop("logit_scale", None)
        if scale is not None:
            config["logit_scale"] = scale
        (path / "config.json").write_text(json.dumps(config))
        refs[scale] = mlx_lm_logits(path, TOKENS)
        # (measured: 2.7e-6 and 3.4e-7 apart, of logits up to 1.9 and 0.23)
        assert float(np.abs(mlxq_logits(path, TOKENS) - refs[scale]).max()) <= TOLERANCE
    np.testing.assert_allclose(refs[0.5], 8 * refs[None], rtol=1e-4, atol=1e-4)
