"""Checkpoints written by mlx-lm's quantization tools other than `convert` (mlx_lm.quant.
dynamic_quant, awq, gptq, dwq; tests/quant_tools.py runs them): each loads in mlxq with the
bits and group size its config gives every layer, and runs mlx-lm's forward in fp32; `mlxq
inspect` and `mlxq generate` read them too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlx_models import TEST_CACHE, mlx_lm_logits
from mlxq.moe import AffineSwitchLinear
from mlxq.nn import AffineEmbedding, AffineLinear
from quant_tools import IMAGE_TEXT_CLASS, MOE_ARCHS, TOOLS, quant_tool_checkpoint

# measured: 6e-6 to 1.2e-5 on logits of ~4.5; Gemma 3 5e-4 (its float difference from mlx-lm:
# `mlx_lm convert` checkpoints show it too, and GPTQ, which folds nothing into the norms)
FP32_LOGIT_ATOL = 1e-3
TOKENS = torch.tensor([1, 502, 3000, 17, 900, 2048, 44, 4000, 12, 77])


def _quantized(model) -> dict[str, tuple[int, int]]:
    return {
        n: (m.bits, m.group_size)
        for n, m in model.named_modules()
        if isinstance(m, (AffineLinear, AffineEmbedding))
    }


def _expected(path: Path, names) -> dict[str, tuple[int, int]]:
    """Each layer's (bits, group size) as mlx-lm reads config.json: its own entry, else the
    top-level one."""
    q = json.loads((path / "config.json").read_text())["quantization"]
    out = {}
    for n in names:
        entry = q.get(n, q)
        assert entry is not False, n  # a module the tool left float is not quantized here
        out[n] = (entry["bits"], entry["group_size"])
    return out


CASES = [(t, "qwen3") for t in TOOLS] + [(t, "deepseek_v2") for t in TOOLS]
# GPTQ's linears at 2 and 8 bits (the embedding at its fallback 6)
CASES += [("gptq2", "qwen3"), ("gptq8", "qwen3")]
# AWQ on Gemma 3's language model: Gemma's (1 + w) norms take the folded scales, names under
# `language_model.`
CASES += [("awq", "gemma3")]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(c))
def case(request) -> tuple[str, str, Path]:
    tool, arch = request.param
    return tool, arch, quant_tool_checkpoint(tool, arch)


def test_loads_with_the_layout_the_tool_wrote_and_matches_mlx_lm(case) -> None:
    from transformers import AutoModelForCausalLM

    name, arch, path = case
    if arch in IMAGE_TEXT_CLASS:
        import transformers

        AutoModelForCausalLM = getattr(transformers, IMAGE_TEXT_CLASS[arch])  # noqa: N806
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # 2 x 7 projections, the embedding and the head (DeepSeek: layer 0 dense, layer 1's
    # shared experts; its routed experts are mlxq MoE modules, not in this count; Gemma 3:
    # tied, the quantized embedding is the head)
    layers = _quantized(model)
    assert len(layers) == (15 if arch == "gemma3" else 16)
    prefix = "language_model." if arch in IMAGE_TEXT_CLASS else ""
    expected = _expected(path, [prefix + n for n in layers])
    assert layers == {n.removeprefix(prefix): v for n, v in expected.items()}
    if name in ("gptq2", "gptq8"):  # every GPTQ'd linear at those bits (the embedding at 6)
        assert set(layers.values()) == {(int(name[4:]), 64), (6, 64)}
    # each expert stack (mlx-lm's `switch_mlp.*`) in the format its entry or the top level gives
    stacks = {
        n.replace(".experts.", ".switch_mlp."): (m.bits, m.group_size)
        for n, m in model.named_modules()
        if isinstance(m, AffineSwitchLinear)
    }
    assert len(stacks) == (3 if arch in MOE_ARCHS else 0)
    assert stacks == _expected(path, stacks)
    tokens = TOKENS % model.config.vocab_size
    with torch.inference_mode():
        ours = model(tokens[None]).logits[0].numpy()
    ref = mlx_lm_logits(path, tokens.numpy())
    diff = float(np.abs(ours - ref).max())
    print(f"\n[{name} {arch}] max |logits - mlx-lm| = {diff:.2e} (|logit| {np.abs(ref).max():.1f})")
    assert diff < FP32_LOGIT_ATOL
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.fixture(scope="module", params=TOOLS)
def tool(request) -> tuple[str, Path]:
    return request.param, quant_tool_checkpoint(request.param)


def test_each_tool_wrote_its_own_layout(tool) -> None:
    """What sets each tool's checkpoint apart from `mlx_lm convert`'s, so that the test above
    covers it (if a new mlx-lm writes otherwise, this says so)."""
    from safetensors import safe_open

    name, path = tool
    config = json.loads((path / "config.json").read_text())
    q = config["quantization"]
    assert config["quantization_config"] == q
    entries = {k: v for k, v in q.items() if isinstance(v, dict)}
    with safe_open(path / "model.safetensors", "np") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    scale_dtypes = {d for k, d in dtypes.items() if k.endswith((".scales", ".biases"))}
    if name == "dynamic_quant":  # the sensitive layers at 8 bits, group 32; the rest 4, 64
        assert {(v["bits"], v["group_size"]) for v in entries.values()} == {(8, 32)}
        assert (q["bits"], q["group_size"]) == (4, 64)
    elif name == "awq":
        # a placeholder top level (4, 64) that no layer uses, an entry for every leaf module
        # (false for norms and rope), no "mode"
        assert (q["bits"], q["group_size"]) == (4, 64) and "mode" not in q
        assert {(v["bits"], v["group_size"]) for v in entries.values()} == {(3, 64), (4, 32)}
        assert q["model.norm"] is False and q["model.layers.0.self_attn.rope"] is False
        # with experts: entries for the SwitchLinear stacks, and false for the router, which
        # AWQ scales (its input's scale folded in) but leaves float
        moe = json.loads((quant_tool_checkpoint("awq", "deepseek_v2") / "config.json").read_text())
        moe = moe["quantization"]
        assert moe["model.layers.1.mlp.switch_mlp.down_proj"] == {"group_size": 64, "bits": 3}
        assert moe["model.layers.1.mlp.gate"] is False
    elif name == "gptq":  # GPTQ'd linears at 4 bits; the embedding at the fallback 6 bits
        assert entries == {"model.embed_tokens": {"bits": 6, "group_size": 64}}
    elif name == "dwq":
        # trained scales and biases in bf16 from a float16 model; its 8-bit layers (not
        # trained) keep float16: two dtypes of scales in one checkpoint
        assert config["torch_dtype"] == "float16"
        assert scale_dtypes == {"BF16", "F16"}
        assert {dtypes[k] for k in dtypes if "v_proj.scales" in k} == {"F16"}
        assert {dtypes[k] for k in dtypes if "q_proj.scales" in k} == {"BF16"}


def test_inspect_and_generate_read_every_tool(capsys) -> None:
    from mlxq.cli import main

    paths = [quant_tool_checkpoint(t) for t in TOOLS]
    for path in paths:
        assert main(["inspect", str(path), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["problems"] == []
        got = {m["name"]: (m["bits"], m["group_size"]) for m in report["modules"] if m["bits"]}
        assert got == _expected(path, got) and len(got) == 16
    env = dict(os.environ, HF_HUB_OFFLINE="1", MLXQ_CACHE=str(TEST_CACHE))
    env.pop("MLXQ_DEBUG", None)
    # generation: one checkpoint (the two-dtype DWQ one), fp32, greedy, as mlx-lm's fp32 argmax
    path = paths[TOOLS.index("dwq")]
    proc = subprocess.run(
        [sys.executable, "-m", "mlxq", "generate", "--model", str(path), "--prompt", "Hi",
         "--ignore-chat-template", "--max-tokens", "4", "--dtype", "float32"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = list(tok("Hi").input_ids)
    for _ in range(4):
        ids.append(int(mlx_lm_logits(path, np.array(ids))[-1].argmax()))
    assert tok.decode(ids[-4:]).strip() in proc.stdout


def test_dwq_two_scale_dtypes_are_named_and_kept_in_float32(caplog) -> None:
    """DWQ's bf16 (trained) and fp16 (8-bit, untrained) scales: a 16-bit load rounds one kind
    (a bf16 load the fp16 ones; an fp16 load bf16 values outside fp16's range), which mlxq says,
    naming float32, where both are kept as stored."""
    import logging

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = quant_tool_checkpoint("dwq")
    for dtype in (torch.bfloat16, torch.float16):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mlxq"):
            AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        warned = [r.getMessage() for r in caplog.records if "rounds them" in r.getMessage()]
        assert len(warned) == 1 and "bfloat16 and float16" in warned[0], warned
        assert "dtype=torch.float32" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mlxq"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert not [r for r in caplog.records if "rounds them" in r.getMessage()]
    stored = load_file(path / "model.safetensors")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
        for part in ("scales", "biases"):
            got = getattr(model.get_submodule(name), part)
            assert torch.equal(got, stored[f"{name}.{part}"].float()), (name, part)


def test_awq_checkpoint_round_trips_through_save_and_mlx_lm(tmp_path: Path) -> None:
    """AWQ's config (an entry for every leaf module, false ones included, and no "mode")
    survives mlxq's save_pretrained: the same tensors, the same entries, mlx-lm's same logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = quant_tool_checkpoint("awq")
    saved = tmp_path / "saved"
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(saved)
    original = json.loads((path / "config.json").read_text())["quantization"]
    written = json.loads((saved / "config.json").read_text())["quantization"]
    assert written == {**original, "mode": "affine"}  # mlx-lm's default mode, now explicit
    a, b = load_file(path / "model.safetensors"), load_file(saved / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (saved / f).write_bytes((path / f).read_bytes())
    np.testing.assert_array_equal(
        mlx_lm_logits(saved, TOKENS.numpy()), mlx_lm_logits(path, TOKENS.numpy())
    )
