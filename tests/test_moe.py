"""Mixture-of-experts checkpoints: tiny random MoE models converted by `mlx_lm.convert` give
mlx-lm's fp32 logits and greedy tokens through transformers' from_pretrained; experts stay
packed; routers keep their own forward; what mlxq does not reproduce is refused by name;
save_pretrained writes mlx-lm's layout back.

The whole MoE matrix (more architectures) runs in `python benchmarks/arch_coverage.py`.
"""

from __future__ import annotations

from pathlib import Path

import mlxq
import numpy as np
import pytest
import torch
from arch_models import (
    MLX_LM_INPUT_LAYOUT,
    MOE_FAST,
    TOKENS,
    VARIANTS,
    Variant,
    assert_matches_mlx_lm,
    causal_lm_class,
    mlxq_logits,
    run_arch,
    tiny_mlx_checkpoint,
)
from mlx_models import assert_logits_match_mlx_lm, greedy_tokens, mlx_lm_logits
from mlxq.moe import AffineSwitchLinear, AffineWeight, MoeExperts, quantized_router
from mlxq.swap import moe_plan
from oracles import assert_product_within, weight_refs
from torch import nn
from torch.nn import functional as F

TOLERANCE = 1e-3


@pytest.mark.parametrize("arch", MOE_FAST)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.tag)
def test_moe_matches_mlx_lm(arch: str, variant) -> None:
    assert_matches_mlx_lm(arch, variant, TOLERANCE)


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_experts_stay_packed_and_routers_keep_their_forward() -> None:
    path = tiny_mlx_checkpoint("qwen3_moe", VARIANTS[0])
    model = _load(path)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.experts, MoeExperts)
    for proj, rows, cols in (
        ("gate_proj", 128, 128),
        ("up_proj", 128, 128),
        ("down_proj", 128, 128),
    ):
        module = getattr(mlp.experts, proj)
        assert isinstance(module, AffineSwitchLinear) and module.bits == 4
        assert module.weight.dtype == torch.uint32
        assert tuple(module.weight.shape) == (4, rows, cols * 4 // 32)
    assert not any(p.dim() == 3 for p in model.parameters())  # no dense expert copy
    # mlx-lm quantizes the router at 8 bits; its class keeps transformers' forward
    gate = mlp.gate
    assert type(gate)._mlxq_router_of.__name__ == "Qwen3MoeTopKRouter" and gate.bits == 8
    assert isinstance(gate.weight, AffineWeight)
    x = torch.randn(3, 128)
    logits, scores, idx = gate(x)
    assert idx.shape == (3, 2) and scores.shape == (3, 2)
    # the quantized matmul in fp32: within the derived bound of the float64 product
    w, w_abs = weight_refs(gate.weight_packed, gate.scales, gate.biases, gate.group_size, gate.bits)
    assert_product_within(logits, x, w.T, "router logits", b_abs=w_abs.T)


def test_loader_can_size_an_accelerator_placement() -> None:
    # transformers sizes its allocator warm-up for a device map on an accelerator from every
    # loaded tensor's element_size() and numel(), the routers' quantized weight included (on an
    # H200, device_map="cuda" failed there until AffineWeight answered them for its buffer)
    from transformers.modeling_utils import get_total_byte_count

    model = _load(tiny_mlx_checkpoint("qwen3_moe", VARIANTS[0]))
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    gate = model.model.layers[0].mlp.gate
    assert gate.weight.element_size() == 4 and gate.weight.numel() == gate.weight_packed.numel()
    total = get_total_byte_count(model, dict.fromkeys(names, "cuda:0"), model.hf_quantizer)
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert total["cuda:0"] >= stored > 0


def test_greedy_generation_matches_mlx_lm() -> None:
    """16 greedy tokens decoded with the KV cache (one token, top-2 experts per step: the
    streaming path) are mlx-lm's argmax under teacher forcing, and the logits match."""
    path = tiny_mlx_checkpoint("qwen3_moe", VARIANTS[1])
    model = _load(path)
    prompt = TOKENS[:5]
    out = greedy_tokens(model, prompt, 16)
    ref = assert_logits_match_mlx_lm(model, path, out, TOLERANCE)
    assert np.array_equal(ref.argmax(-1)[len(prompt) - 1 : -1], out[len(prompt) :].numpy())


@pytest.mark.parametrize(
    "arch", ["nemotron_h", "granitemoehybrid", "kimi_linear", "olmo_hybrid", "mistral4"]
)
def test_hybrid_greedy_generation_matches_mlx_lm(arch: str) -> None:
    """Greedy decoding through transformers' caches of the hybrid layers (Mamba-2 states,
    KDA / gated-delta recurrences, compressed MLA) is mlx-lm's argmax under teacher forcing."""
    path = tiny_mlx_checkpoint(arch, VARIANTS[1])
    model = causal_lm_class(arch).from_pretrained(path, dtype=torch.float32)
    prompt = TOKENS[:5]
    out = greedy_tokens(model, prompt, 16)
    ref = assert_logits_match_mlx_lm(model, path, out, TOLERANCE)
    assert np.array_equal(ref.argmax(-1)[len(prompt) - 1 : -1], out[len(prompt) :].numpy())


@pytest.mark.parametrize(
    ("arch", "variant"),
    [
        ("mixtral", 0),
        ("phimoe", 1),
        ("granitemoe", 0),
        ("deepseek_v3", 1),
        ("gpt_oss", 1),
        ("jamba", 1),
        ("qwen3_next", 0),
        ("lfm2_moe", 0),
    ],
)
def test_save_pretrained_writes_mlx_lm_layout(tmp_path: Path, arch: str, variant: int) -> None:
    """The saved tensors have mlx-lm's names (switch_mlp, PhiMoE's gate, GraniteMoE's
    router.layer, DeepSeek V3's embed_q/unembed_out, gpt-oss's experts with their biases,
    Jamba's feed_forward.switch_mlp, Qwen3-Next's norms as 1 + w, LFM2-MoE's gate_proj/up_proj/
    down_proj for w1/w3/w2) and
    mlx-lm runs the saved checkpoint as the original one."""
    from safetensors import safe_open

    path = tiny_mlx_checkpoint(arch, VARIANTS[variant])
    model = _load(path)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    for file in path.iterdir():  # the tokenizer's files
        if not (saved / file.name).exists():
            (saved / file.name).write_bytes(file.read_bytes())
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        original = set(f.keys())
    assert keys == original, (sorted(keys - original)[:5], sorted(original - keys)[:5])
    np.testing.assert_allclose(
        mlx_lm_logits(saved, TOKENS), mlx_lm_logits(path, TOKENS), rtol=0, atol=0
    )
    np.testing.assert_allclose(mlxq_logits(saved, TOKENS), mlxq_logits(path, TOKENS), atol=1e-6)


class _SquaredRouter(nn.Module):
    """A router that uses its weight outside F.linear: cannot be quantized by mlxq."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.weight * self.weight).T


class _LinearRouter(nn.Module):
    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 64, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight).softmax(-1)


def test_router_rules(gen) -> None:
    plan = moe_plan("mlp.gate", _SquaredRouter())
    assert plan.kind == "router" and "other than in F.linear" in plan.refusal
    with pytest.raises(NotImplementedError, match=r"'mlp\.gate' \(_SquaredRouter\)"):
        plan.require()
    router = _LinearRouter(gen)
    assert moe_plan("r", router).refusal is None
    quantized = quantized_router("r", router, 8, 64, torch.float32, "cpu", weight=router.weight)
    x = torch.randn(5, 64, generator=gen)
    # the router's own forward on the quantized weight: F.linear runs the quantized matmul, so
    # the result is bit-equal to softmax over mlxq's op (a dequantize-then-F.linear oracle
    # differs in summation order, and softmax of logits near 10 magnifies that past 1e-6)
    packed = quantized.state_dict()
    logits = mlxq.affine_matmul(x, packed["weight"], packed["scales"], packed["biases"], 64, 8)
    torch.testing.assert_close(quantized(x), logits.softmax(-1), rtol=0, atol=0)
    w, w_abs = weight_refs(packed["weight"], packed["scales"], packed["biases"], 64, 8)
    assert_product_within(logits, x, w.T, "quantized router logits", b_abs=w_abs.T)
    # any other use of the quantized weight is refused by name, never run on packed integers
    with pytest.raises(NotImplementedError, match=r"'r' \(_LinearRouter\).*`add`"):
        torch.add(quantized.weight, 1)
    assert set(quantized.state_dict()) == {"weight", "scales", "biases"}


def _gpt_oss_experts(limit: float = 7.0):
    from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    config = GptOssConfig(
        hidden_size=64, intermediate_size=64, num_local_experts=4, swiglu_limit=limit
    )
    return GptOssExperts(config)


def test_dbrx_experts_stored_apart_must_be_every_expert(tmp_path: Path) -> None:
    """mlx-lm keeps DBRX's experts as one layer each; mlxq stacks experts 0..E-1 of one
    format, and refuses a checkpoint with an expert missing by name (not a shape error).
    `mlxq inspect` reports the stacks, and no rope warning (mlx-lm's dbrx reads rope_theta
    from attn_config, as transformers' does)."""
    import shutil

    from mlxq.inspect_checkpoint import inspect_checkpoint
    from safetensors.torch import load_file, save_file

    source = tiny_mlx_checkpoint("dbrx", Variant(tied=False, bits=3, group_size=32))
    report = inspect_checkpoint(source, str(source))
    assert not report.problems, [p.message for p in report.problems]
    stacks = [m for m in report.modules if m.name.endswith("ffn.experts.down_proj")]
    assert len(stacks) == 2 and all(m.bits == 3 for m in stacks)
    model = _load(source)
    experts = model.transformer.blocks[1].ffn.experts
    assert isinstance(experts, MoeExperts) and isinstance(experts.down_proj, AffineSwitchLinear)
    assert experts.down_proj.weight.shape[:2] == (4, 128)  # [E, H, I packed]: w2 transposed
    shutil.copytree(source, tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    tensors = {k: v for k, v in tensors.items() if ".blocks.1.ffn.experts.1.w1." not in k}
    save_file(tensors, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "m" / "model.safetensors.index.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.experts\.\*\.w1 .*experts \[0, 2, 3\]"):
        _load(tmp_path / "m")


def test_longcat_flash_zero_experts_are_refused_by_name() -> None:
    """LongCat-Flash's zero (identity) experts come after the routed ones. Up to transformers
    5.24 its experts module runs them, a forward mlxq does not reproduce; from 5.25 the MoE
    block does, its experts are the common eager loop, and its router reads its classifier's
    weight directly, which a quantized classifier cannot serve. Either is refused naming the
    module (mlx-lm's checkpoint, made from the float model without the unused zero-expert
    tensors, is the oracle); with mlx-lm's tensor names read (switch_mlp, embed_q/unembed_out),
    never a tensor said to be missing."""
    outcome = run_arch("longcat_flash", VARIANTS[1])
    assert outcome.status == "refused", outcome.line()
    assert (
        "'model.layers.0.mlp.experts' (LongcatFlashExperts)" in outcome.reason
        or "'model.layers.0.mlp.router.classifier' is quantized" in outcome.reason
    ), outcome.reason


def test_experts_with_another_forward_are_refused() -> None:
    """Experts are recognised by their source (forward, and gpt-oss's _apply_gate), not by
    their class: gpt-oss's own experts are accepted, a subclass that changes either is refused
    with its name."""
    import transformers
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    plan = moe_plan("mlp.experts", _gpt_oss_experts())
    assert plan.refusal is None and plan.variant == "gpt_oss" and plan.bias
    assert (plan.num_experts, plan.in_features, plan.out_features) == (4, 64, 64)

    class LeakyGate(GptOssExperts):
        def _apply_gate(self, gate_up):
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
            return (up + 1) * torch.nn.functional.leaky_relu(gate)

    config = _gpt_oss_experts().config
    plan = moe_plan("mlp.experts", LeakyGate(config))
    with pytest.raises(NotImplementedError, match=r"'mlp\.experts' \(LeakyGate\).*_apply_gate"):
        plan.require()

    class Doubled(Qwen3MoeExperts):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return 2 * super().forward(hidden_states, top_k_index, top_k_weights)

    config = Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=64, num_experts=4)
    plan = moe_plan("mlp.experts", Doubled(config))
    with pytest.raises(
        NotImplementedError, match=r"'mlp\.experts' \(Doubled\).*eager experts"
    ) as e:
        plan.require()
    assert f"(installed: {transformers.__version__})" in str(e.value)  # which release wrote it


def test_gpt_oss_experts_module_matches_transformers() -> None:
    """MoeExperts over mlx-lm's stacks (float, and 8-bit affine from the same weights) is
    transformers' GptOssExperts: biases, interleaved gate/up, clamp (reached here), alpha."""
    from mlxq.moe import ClampedSwiGLU, SwitchLinear, experts_gate, fused_expert_stacks

    torch.manual_seed(0)
    experts = _gpt_oss_experts(limit=2.0)  # a low limit: many values are clamped
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(9, 64)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(9)])
    w = torch.softmax(torch.randn(9, 2), -1)
    with torch.no_grad():
        ref = experts(x, idx, w)
        gate_up = torch.einsum("th,thi->ti", x, experts.gate_up_proj[idx[:, 0]])
    assert (gate_up.abs() > 2.0).float().mean() > 0.3  # the clamp matters
    stacks = fused_expert_stacks(experts, "gpt_oss")
    gate = experts_gate(experts, "gpt_oss")
    assert isinstance(gate["glu"], ClampedSwiGLU) and gate["glu"].limit == 2.0
    floats = {}
    for proj, (weight, bias) in stacks.items():
        e, n, k = weight.shape
        floats[proj] = SwitchLinear(e, k, n, bias=True)
        floats[proj].weight.data.copy_(weight)
        floats[proj].bias.data.copy_(bias)
    with torch.no_grad():
        got = MoeExperts(**floats, **gate)(x, idx, w)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    packed = {
        p: AffineSwitchLinear.from_float(wb[0], 8, 32, bias=wb[1]) for p, wb in stacks.items()
    }
    with torch.no_grad():
        got8 = MoeExperts(**packed, **gate)(x, idx, w)
    assert 0 < float((got8 - ref).abs().max()) < 0.05 * float(ref.abs().max())


GPT_OSS_VARIANTS = (
    Variant(tied=False),  # 4-bit g64, routers 8-bit g64 by mlx-lm's gpt_oss rule
    VARIANTS[1],  # untied mixed_3_6: down_proj stacks at 6 bits in some layers, routers 3-bit
)


@pytest.mark.parametrize("variant", GPT_OSS_VARIANTS, ids=lambda v: v.tag)
def test_gpt_oss_matches_mlx_lm(variant) -> None:
    """A tiny gpt-oss (experts with biases and the clamped gate, attention sinks, a sliding
    window shorter than the sequence) converted by mlx-lm from the Hub layout: fp32 logits."""
    outcome = run_arch("gpt_oss", variant)
    print(f"\n{outcome.line()}")
    assert outcome.status == "loads" and outcome.max_diff <= TOLERANCE, outcome.line()
    model = _load(tiny_mlx_checkpoint("gpt_oss", variant))
    mlp = model.model.layers[1].mlp
    assert isinstance(mlp.experts, MoeExperts) and mlp.experts.act_fn is None
    for proj in ("gate_proj", "up_proj", "down_proj"):
        module = getattr(mlp.experts, proj)
        assert isinstance(module, AffineSwitchLinear) and module.bias.shape == (4, 128)
    assert type(mlp.router)._mlxq_router_of.__name__ == "GptOssTopKRouter"
    assert mlp.router.bits == (8 if variant.recipe is None else 3)
    assert not any(p.dim() == 3 for p in model.parameters())  # no dense expert copy


def test_gpt_oss_missing_expert_bias_is_refused_by_name(tmp_path: Path) -> None:
    """An expert bias the checkpoint lacks is an error naming the tensor (transformers would
    initialise it and only log it)."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_mlx_checkpoint("gpt_oss", GPT_OSS_VARIANTS[0])
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.up_proj.bias"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "mlx"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.up_proj\.bias"):
        _load(broken)


FP_MODES = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}


@pytest.mark.parametrize("mode", list(FP_MODES))
def test_gpt_oss_float_modes_match_mlx_lm(tmp_path: Path, mode: str) -> None:
    """`mlx_lm convert --q-mode mxfp4` (what mlx-community's gpt-oss checkpoints are: experts in
    mxfp4) and the other float modes: the stacks run fp_gather_matmul plus their float biases,
    routers stay affine 8-bit (mlx-lm's gpt_oss rule has no mode); fp32 logits against mlx-lm,
    and mlx-lm runs mlxq's save_pretrained as the original."""
    import shutil

    from mlxq.inspect_checkpoint import inspect_checkpoint

    group_size, bits = FP_MODES[mode]
    variant = Variant(tied=False, bits=bits, group_size=group_size, mode=mode)
    outcome = run_arch("gpt_oss", variant)
    print(f"\n{outcome.line()}")
    assert outcome.status == "loads" and outcome.max_diff <= TOLERANCE, outcome.line()
    path = tiny_mlx_checkpoint("gpt_oss", variant)
    model = _load(path)
    mlp = model.model.layers[0].mlp
    for proj in ("gate_proj", "up_proj", "down_proj"):
        stack = getattr(mlp.experts, proj)
        assert isinstance(stack, AffineSwitchLinear) and stack.mode == mode
        assert stack.scales.dtype == torch.uint8 and stack.bias.shape == (4, 128)
    assert (mlp.router.mode, mlp.router.bits, mlp.router.group_size) == ("affine", 8, 64)
    report = inspect_checkpoint(path, str(path))
    assert not [p for p in report.problems if p.severity == "error"], report.problems
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    for file in path.iterdir():  # the tokenizer's files
        if not (saved / file.name).exists():
            shutil.copy(file, saved / file.name)
    np.testing.assert_array_equal(mlx_lm_logits(saved, TOKENS), mlx_lm_logits(path, TOKENS))


def test_gpt_oss_mxfp4_convert_matches_mlx_lm_convert(tmp_path: Path) -> None:
    """`mlxq convert --q-mode mxfp4` of the float gpt-oss writes `mlx_lm convert --q-mode mxfp4`'s
    tensors (of the Hub layout of the same model) bit for bit: mxfp4 stacks with float biases,
    affine 8-bit routers, the same quantization block."""
    import contextlib
    import io
    import json
    import shutil

    from mlx_lm import convert
    from mlxq.convert import convert_checkpoint
    from safetensors.torch import load_file

    src = _tiny_float_moe("gpt_oss", tmp_path / "float")
    ours, theirs, hub = tmp_path / "ours", tmp_path / "theirs", tmp_path / "hub"
    convert_checkpoint(src, ours, bits=4, group_size=32, mode="mxfp4")
    shutil.copytree(src, hub)
    MLX_LM_INPUT_LAYOUT["gpt_oss"](hub)
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(hub), str(theirs), quantize=True, q_group_size=32, q_bits=4, q_mode="mxfp4")
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert sorted(a) == sorted(b), (sorted(set(a) - set(b))[:4], sorted(set(b) - set(a))[:4])
    for key in b:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    q = json.loads((ours / "config.json").read_text())["quantization"]
    assert q == json.loads((theirs / "config.json").read_text())["quantization"]
    ref = mlx_lm_logits(theirs, TOKENS)
    assert float(np.abs(mlxq_logits(ours, TOKENS) - ref).max()) <= TOLERANCE


def test_tied_gpt_oss_is_no_oracle() -> None:
    """mlx-lm's gpt_oss always has its own head: a tied checkpoint is not an mlx-lm model."""
    assert run_arch("gpt_oss", VARIANTS[0]).status == "mlx-lm fails"


@pytest.mark.parametrize(
    "variant",
    [GPT_OSS_VARIANTS[0], Variant(tied=False, bits=4, group_size=32, mode="mxfp4")],
    ids=lambda v: v.tag,
)
def test_gpt_oss_greedy_generation_matches_mlx_lm(variant) -> None:
    """16 greedy tokens from mlxq (transformers' generate, KV cache, the sliding window of 8
    passed) are mlx-lm's own greedy tokens (generate_step: its rotating cache), fp32."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_models import _mlx_model

    path = tiny_mlx_checkpoint("gpt_oss", variant)
    model = _load(path)
    prompt = TOKENS[:5]
    out = greedy_tokens(model, prompt, 16)
    mlx_model = _mlx_model(str(path), "float32")
    steps = generate_step(mx.array(prompt), mlx_model, max_tokens=16)
    theirs = [int(token) for token, _ in steps]
    assert out[len(prompt) :].tolist() == theirs
    assert_logits_match_mlx_lm(model, path, out, TOLERANCE)


def test_deepseek_v3_latent_attention_from_mlx_lm_split() -> None:
    """mlx-lm splits kv_b_proj into embed_q (float here: qk_nope 16 < group 64) and a
    quantized unembed_out; mlxq runs kv_b_proj on the two and matches mlx-lm."""
    from mlxq.mla import AffineMultiLinear, MultiLinear, SplitKvB

    variant = VARIANTS[1]
    outcome = run_arch("deepseek_v3", variant)
    assert outcome.status == "loads" and outcome.max_diff <= TOLERANCE, outcome.line()
    model = _load(tiny_mlx_checkpoint("deepseek_v3", variant))
    kv_b = model.model.layers[0].self_attn.kv_b_proj
    assert isinstance(kv_b, SplitKvB)
    assert isinstance(kv_b.embed_q, MultiLinear) and isinstance(kv_b.unembed_out, AffineMultiLinear)
    assert isinstance(model.model.layers[1].mlp.experts, MoeExperts)


@pytest.mark.parametrize(
    ("arch", "variant", "router", "router_cls"),
    [
        ("qwen3_moe", VARIANTS[0], "gate", "Qwen3MoeTopKRouter"),
        ("gpt_oss", GPT_OSS_VARIANTS[0], "router", "GptOssTopKRouter"),
    ],
)
def test_dequantize_gives_float_moe_with_the_same_logits(arch, variant, router, router_cls) -> None:
    from mlxq.moe import SwitchLinear

    model = _load(tiny_mlx_checkpoint(arch, variant))
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        before = model(ids).logits
        model.dequantize()
        after = model(ids).logits
    experts = model.model.layers[0].mlp.experts
    assert (
        isinstance(experts.gate_proj, SwitchLinear) and experts.gate_proj.weight.is_floating_point()
    )
    if arch == "gpt_oss":  # the experts' biases come along
        assert experts.down_proj.bias is not None and experts.down_proj.bias.shape == (4, 128)
    gate = getattr(model.model.layers[0].mlp, router)
    assert type(gate).__name__ == router_cls and isinstance(gate.weight, nn.Parameter)
    assert not any(b.dtype == torch.uint32 for b in model.buffers())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def _tiny_float_moe(arch: str, folder: Path) -> Path:
    from arch_models import tiny_float_checkpoint

    return tiny_float_checkpoint(arch, folder, tied=False)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "phimoe", "gpt_oss", "dbrx"])
def test_convert_float_moe_matches_mlx_lm_convert(tmp_path: Path, arch: str) -> None:
    """`mlxq convert` (quantize_model on the loaded float model) writes the tensors of
    `mlx_lm convert -q` bit for bit (switch_mlp stacks, gpt-oss's experts split from the
    interleaved fused weight with their biases, DBRX's one layer per expert with w2
    transposed, routers: Qwen3-MoE's and gpt-oss's at 8 bits)
    and the same quantization block; the result loads back and matches mlx-lm's fp32 logits.
    mlx-lm converts the Hub layout of the same float model where it cannot read transformers
    5's (gpt-oss)."""
    import contextlib
    import io
    import json

    from mlx_lm import convert
    from mlxq.convert import convert_checkpoint
    from safetensors.torch import load_file

    src = _tiny_float_moe(arch, tmp_path / "float")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    summary = convert_checkpoint(src, ours, bits=4, group_size=64)
    if arch in MLX_LM_INPUT_LAYOUT:
        import shutil

        shutil.copytree(src, tmp_path / "hub")
        src = tmp_path / "hub"
        MLX_LM_INPUT_LAYOUT[arch](src)
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(src), str(theirs), quantize=True, q_group_size=64, q_bits=4)
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert sorted(a) == sorted(b), (sorted(set(a) - set(b))[:4], sorted(set(b) - set(a))[:4])
    # mlx-lm's names: gpt-oss's stacks, DBRX's experts one by one
    down = {"gpt_oss": ".experts.down_proj", "dbrx": ".experts.3.w2"}
    assert any(f"{down.get(arch, '.switch_mlp.down_proj')}.scales" in k for k in b)
    for key in b:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    q = json.loads((ours / "config.json").read_text())["quantization"]
    assert q == json.loads((theirs / "config.json").read_text())["quantization"]
    if arch == "qwen3_moe":
        assert q["model.layers.0.mlp.gate"] == {"group_size": 64, "bits": 8}
    if arch == "gpt_oss":
        assert q["model.layers.0.mlp.router"] == {"group_size": 64, "bits": 8}
        assert "model.layers.0.mlp.experts.gate_proj.bias" in b
    assert summary.quantized > 0
    ref = mlx_lm_logits(theirs, TOKENS)
    assert float(np.abs(mlxq_logits(ours, TOKENS) - ref).max()) <= TOLERANCE
    # mlx-lm reads mlxq's config.json as its own (num_experts written for qwen3_moe)
    np.testing.assert_array_equal(mlx_lm_logits(ours, TOKENS), ref)


def test_quantize_model_on_float_moe(tmp_path: Path) -> None:
    """quantize_model in memory: experts packed as stacks bit-exact with `mx.quantize` of the
    fused weight's gate/up/down parts (a projection can stay float by a per-module entry),
    routers quantized at the top format when no per-module entry is given."""
    import mlx.core as mx
    import mlxq
    from mlxq.moe import SwitchLinear

    model = _load(_tiny_float_moe("qwen3_moe", tmp_path / "float"))
    fused = model.model.layers[1].mlp.experts
    inter = fused.gate_up_proj.shape[1] // 2
    stacks = {
        "gate_proj": fused.gate_up_proj[:, :inter],
        "up_proj": fused.gate_up_proj[:, inter:],
        "down_proj": fused.down_proj,
    }
    stacks = {k: v.detach().clone() for k, v in stacks.items()}
    kept = model.model.layers[0].mlp.experts.down_proj.detach().clone()
    mlxq.quantize_model(model, 8, 32, overrides={"model.layers.0.mlp.experts.down_proj": False})
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, MoeExperts)
    for proj, w in stacks.items():
        module = getattr(experts, proj)
        assert isinstance(module, AffineSwitchLinear) and module.bits == 8
        ref = mx.quantize(mx.array(w.numpy()), group_size=32, bits=8)
        for got, want in zip((module.weight, module.scales, module.biases), ref, strict=True):
            assert np.array_equal(got.numpy(), np.array(want)), proj
    first = model.model.layers[0].mlp.experts
    assert isinstance(first.down_proj, SwitchLinear) and torch.equal(first.down_proj.weight, kept)
    assert isinstance(first.gate_proj, AffineSwitchLinear)
    gate = model.model.layers[0].mlp.gate
    assert isinstance(gate.weight, AffineWeight) and (gate.bits, gate.group_size) == (8, 32)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([TOKENS])).logits).all()


def test_moe_recipe_convert_is_mlx_lm_convert(tmp_path: Path) -> None:
    """`mlxq convert --recipe mixed_3_6` of a MoE model writes `mlx_lm convert
    --quant-predicate mixed_3_6`'s checkpoint: the recipe also picks the router's and each
    switch_mlp stack's bits (before: refused). (Float-mode MoE: tests/test_moe_fp.py.)"""
    import contextlib
    import io
    import json

    from mlx_lm import convert
    from mlxq.convert import convert_checkpoint
    from safetensors.torch import load_file

    src = _tiny_float_moe("qwen3_moe", tmp_path / "float")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    convert_checkpoint(src, ours, bits=3, recipe="mixed_3_6")
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(src), str(theirs), quantize=True, q_bits=3, quant_predicate="mixed_3_6")
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert sorted(a) == sorted(b)
    for key in b:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    q = json.loads((ours / "config.json").read_text())["quantization"]
    assert q == json.loads((theirs / "config.json").read_text())["quantization"]
    assert q["model.layers.1.mlp.switch_mlp.down_proj"]["bits"] == 6  # (the last eighth)


def test_granitemoe_rule_refused_explicit_entries_match_mlx_lm(tmp_path: Path) -> None:
    """mlx-lm's GraniteMoE class picks 8 bits for some modules by its own rule (reproduced
    without entries: tests/test_quantize_like_convert.py). With explicit entries ({}: the top format
    everywhere) the saved tensors are those of `mlx_lm convert` given the same choice (its
    router under `router.layer`, stacks under `switch_mlp`), and mlx-lm's logits match."""
    import contextlib
    import io

    import mlxq
    from mlx_lm import convert
    from safetensors.torch import load_file

    src = _tiny_float_moe("granitemoe", tmp_path / "float")
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    with contextlib.redirect_stdout(io.StringIO()):
        convert(
            str(src),
            str(theirs),
            quantize=True,
            q_group_size=64,
            q_bits=4,
            quant_predicate=lambda path, module: True,
        )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)  # as mlx-lm loads it
    mlxq.quantize_model(model, 4, 64, overrides={})
    model.save_pretrained(ours)
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert sorted(a) == sorted(b), (sorted(set(a) - set(b))[:4], sorted(set(b) - set(a))[:4])
    for key in b:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    for file in src.iterdir():  # the tokenizer's files
        if not (ours / file.name).exists():
            (ours / file.name).write_bytes(file.read_bytes())
    np.testing.assert_array_equal(mlx_lm_logits(ours, TOKENS), mlx_lm_logits(theirs, TOKENS))


def test_glm4_moe_lite_loads_mlx_lm_layout() -> None:
    """GLM-4.7-Flash in mlx-lm's layout (DeepSeek V3's: switch_mlp stacks, kv_b_proj split
    into embed_q/unembed_out) loads and matches mlx-lm (mlx-lm has no tied head for it)."""
    from mlxq.mla import SplitKvB

    assert run_arch("glm4_moe_lite", VARIANTS[0]).status == "mlx-lm fails"
    outcome = run_arch("glm4_moe_lite", VARIANTS[1])
    assert outcome.status == "loads" and outcome.max_diff <= TOLERANCE, outcome.line()
    model = _load(tiny_mlx_checkpoint("glm4_moe_lite", VARIANTS[1]))
    assert isinstance(model.model.layers[0].self_attn.kv_b_proj, SplitKvB)
    assert isinstance(model.model.layers[1].mlp.experts, MoeExperts)


def test_ernie4_5_moe_float32_router_and_dropped_bias() -> None:
    """ERNIE 4.5 MoE: the router runs `F.linear(x.float(), self.weight.float())` on its
    quantized weight, and mlx-lm's checkpoint lacks the router's e_score_correction_bias
    (mlx-lm's sanitize drops it): it loads as zeros, which is mlx-lm's model."""
    variant = VARIANTS[0]
    outcome = run_arch("ernie4_5_moe", variant)
    assert outcome.status == "loads" and outcome.max_diff <= TOLERANCE, outcome.line()
    gate = _load(tiny_mlx_checkpoint("ernie4_5_moe", variant)).model.layers[1].mlp.gate
    assert isinstance(gate.weight, AffineWeight) and gate.bits == 4
    assert torch.count_nonzero(gate.moe_statics.e_score_correction_bias) == 0
    x = torch.randn(3, 128)
    packed = gate.state_dict()
    want = mlxq.affine_matmul(x, packed["weight"], packed["scales"], packed["biases"], 64, 4)
    torch.testing.assert_close(F.linear(x, gate.weight.float()), want, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="float32 weight"):  # as torch refuses mixed dtypes
        F.linear(x.bfloat16(), gate.weight.float())


def test_deepseek_v32_indexer_weights_proj_runs_float() -> None:
    """DeepSeek V3.2's indexer casts its input to `weights_proj.weight.dtype`: the quantized
    weights_proj is loaded dequantized (an nn.Linear, same values), the rest stays packed."""
    from mlxq.nn import AffineLinear

    variant = VARIANTS[1]
    outcome = run_arch("deepseek_v32", variant)
    assert outcome.status == "loads" and outcome.max_diff <= TOLERANCE, outcome.line()
    path = tiny_mlx_checkpoint("deepseek_v32", variant)
    indexer = _load(path).model.layers[1].self_attn.indexer
    assert type(indexer.weights_proj) is nn.Linear
    assert indexer.weights_proj.weight.dtype == torch.float32
    assert isinstance(indexer.wk, AffineLinear)  # its dtype is never read: stays quantized
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        key = "model.layers.1.self_attn.indexer.weights_proj"
        packed = f.get_tensor(f"{key}.weight")
        scales, biases = f.get_tensor(f"{key}.scales"), f.get_tensor(f"{key}.biases")
    bits = packed.shape[1] * 32 // 128
    want = mlxq.dequantize(packed, scales.float(), biases.float(), 128 // scales.shape[1], bits)
    torch.testing.assert_close(indexer.weights_proj.weight, want, rtol=0, atol=0)


def test_minimax_m2_router_reads_its_float_dtype(tmp_path: Path) -> None:
    """MiniMax-M2's router casts its input to `self.weight.dtype`: loaded from MLX it stays
    quantized and answers the float dtype; saving writes it quantized again, as mlx-lm reads.
    Quantizing such a router is refused by name, with or without entries (mlx-lm's rule for
    minimax_m2 would put it at 8 bits)."""
    variant = VARIANTS[1]
    outcome = run_arch("minimax_m2", variant)
    assert outcome.status == "loads" and outcome.max_diff <= TOLERANCE, outcome.line()
    path = tiny_mlx_checkpoint("minimax_m2", variant)
    model = _load(path)
    gate = model.model.layers[0].mlp.gate
    assert isinstance(gate.weight, AffineWeight) and gate.weight.dtype == torch.float32
    assert gate.state_dict()["weight"].dtype == torch.uint32
    model.save_pretrained(tmp_path)
    for file in path.glob("*token*"):
        (tmp_path / file.name).write_bytes(file.read_bytes())
    with torch.no_grad():
        ours = model(torch.tensor([TOKENS])).logits[0].numpy()
    assert float(np.abs(ours - mlx_lm_logits(tmp_path, TOKENS)).max()) <= TOLERANCE
    from transformers import AutoConfig, AutoModelForCausalLM

    float_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    with pytest.raises(NotImplementedError, match=r"router 'model\.layers\.0\.mlp\.gate'"):
        mlxq.quantize_model(float_model, 4, 64)
    with pytest.raises(NotImplementedError, match=r"router 'model\.layers\.0\.mlp\.gate'"):
        mlxq.quantize_model(float_model, 4, 64, overrides={})


def test_nemotron_h_quantized_is_mlx_lm_convert(tmp_path: Path) -> None:
    """Nemotron-H's experts have no gate (up/down stacks, mlx-lm's `switch_mlp.fc1`/`fc2`); its
    router stays float, as in mlx-lm (whose router is no linear layer): `save_pretrained`
    writes `mlx_lm convert`'s tensors bit for bit, and mlx-lm reads them as its own."""
    import contextlib
    import io

    from mlx_lm import convert
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src = _tiny_float_moe("nemotron_h", tmp_path / "float")
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(src), str(theirs), quantize=True, q_group_size=64, q_bits=4)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)  # as mlx-lm reads it
    mlxq.quantize_model(model, 4, 64)
    experts = model.model.layers[1].mixer.experts
    assert isinstance(experts, MoeExperts) and experts.gate_proj is None
    assert type(model.model.layers[1].mixer.gate.weight) is nn.Parameter
    model.save_pretrained(ours)
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert "backbone.layers.1.mixer.switch_mlp.fc1.scales" in b
    for key, value in b.items():  # (the router's float32 tensors saved in bf16, as mlx-lm)
        assert a[key].dtype == value.dtype and torch.equal(a[key], value), key
    for file in src.glob("*token*"):
        (ours / file.name).write_bytes(file.read_bytes())
    np.testing.assert_array_equal(mlx_lm_logits(ours, TOKENS), mlx_lm_logits(theirs, TOKENS))


def test_router_cast_by_type_float32(tmp_path: Path) -> None:
    """Routers that run `F.linear(x.type(torch.float32), self.weight.type(torch.float32))`
    (Kimi Linear, DeepSeek V3's family, Nemotron-H) run quantized as a float32 quantized
    matmul; quantizing one takes an explicit entry (mlx-lm keeps most of them float)."""
    model = _load(_tiny_float_moe("kimi_linear", tmp_path / "float"))
    router = "model.layers.1.mlp.gate"
    with pytest.raises(NotImplementedError, match=r"router 'model\.layers\.1\.mlp\.gate'"):
        mlxq.quantize_model(model, 4, 64, overrides={})
    mlxq.quantize_model(model, 4, 64, overrides={router: {"bits": 8, "group_size": 64}})
    gate = model.get_submodule(router)
    assert isinstance(gate.weight, AffineWeight) and gate.bits == 8
    x = torch.randn(3, 128)
    packed = gate.state_dict()
    want = mlxq.affine_matmul(x, packed["weight"], packed["scales"], packed["biases"], 64, 8)
    torch.testing.assert_close(gate(x)[0], want, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="float16"):
        gate.weight.type(torch.float16)


# mlx-lm layouts mapped for these (switch_mlp / switch_glu stacks, laguna's gate.proj,
# nemotron_h's ungated fc1/fc2 experts, dense Granite 4.0's split shared MLP, olmo_hybrid's and
# kimi_linear's separate channels-last q/k/v convolutions, kimi_linear's router quantized and
# read through `.type(torch.float32)`,
# llama4_text's `output` head, mistral4 through its own class): untied only, the variant every
# one of them has in mlx-lm
MLX_LM_LAYOUTS = (
    "exaone_moe",
    "solar_open",
    "laguna",
    "gemma4_text",
    "llama4_text",
    "mimo_v2_flash",
    "nemotron_h",
    "granitemoehybrid",
    "granitemoehybrid_dense",
    "olmo_hybrid",
    "kimi_linear",
    "mistral4",
    "dbrx",  # one linear layer per expert in mlx-lm, stacked by mlxq at load
    "nanochat",  # nanochat's own names (transformer.h.*.attn.c_q, ...)
    "apertus",  # xIELU's alpha_p/alpha_n stored as scalars
)


@pytest.mark.parametrize("arch", MLX_LM_LAYOUTS)
def test_mlx_lm_layouts_load_and_save_back(tmp_path: Path, arch: str) -> None:
    """Loads within the tolerance, and save_pretrained writes what mlx-lm reads: the same
    tensor names and shapes as mlx-lm's checkpoint, and mlx-lm's logits from the saved one."""
    from safetensors import safe_open

    variant = VARIANTS[1]
    outcome = run_arch(arch, variant)
    assert outcome.status == "loads" and outcome.max_diff <= TOLERANCE, outcome.line()
    path = tiny_mlx_checkpoint(arch, outcome.variant)  # (3-bit g32 without `down_proj`)
    model = causal_lm_class(arch).from_pretrained(path, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    for file in path.glob("*token*"):
        (tmp_path / file.name).write_bytes(file.read_bytes())

    def shapes(folder: Path) -> dict:
        with safe_open(folder / "model.safetensors", "np") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    assert shapes(tmp_path) == shapes(path)
    with torch.no_grad():
        ours = model(torch.tensor([TOKENS])).logits[0].numpy()
    assert float(np.abs(ours - mlx_lm_logits(tmp_path, TOKENS)).max()) <= TOLERANCE


def _tiny_llama4_checkpoint() -> Path:
    """A tiny Llama 4 (image-text config, 4 layers: mlx-lm's llama4 hard-codes a NoPE layer
    every 4th, MoE on odd layers, one expert per token as mlx-lm requires) converted by
    mlx_lm.convert (4-bit g64), which writes the text model only (cached)."""
    import json

    from arch_models import tiny_tokenizer
    from mlx_lm import convert
    from mlx_models import cached_checkpoint
    from mlxq.demo_model import _versions
    from transformers import AutoConfig, Llama4ForConditionalGeneration

    text = dict(
        hidden_size=128,
        intermediate_size=64,
        intermediate_size_mlp=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=512,
        max_position_embeddings=256,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        no_rope_layers=[1, 1, 1, 0],
        use_qk_norm=True,  # 3.5e-05 from mlx-lm with it, 8.3e-06 without (eps 1e-6 there)
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    vision |= dict(num_attention_heads=2, image_size=28, patch_size=14, vision_output_dim=64)
    vision |= dict(projector_input_dim=64, projector_output_dim=64)

    def build(float_dir: Path, out: Path) -> None:
        config = AutoConfig.for_model("llama4", text_config=text, vision_config=vision)
        torch.manual_seed(0)
        model = Llama4ForConditionalGeneration(config).to(torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.08) if p.dim() >= 2 else p.add_(torch.randn_like(p) * 0.05)
        model.save_pretrained(float_dir)
        tiny_tokenizer(float_dir)
        cfg = json.loads((float_dir / "config.json").read_text())
        cfg["text_config"] |= {"rope_theta": 5000.0, "rope_scaling": None}  # what mlx-lm reads
        (float_dir / "config.json").write_text(json.dumps(cfg))
        convert(str(float_dir), str(out), quantize=True, q_group_size=64, q_bits=4)

    return cached_checkpoint(f"llama4-moe-{_versions('transformers', 'mlx-lm')}-v2", build)


def test_llama4_moe_from_mlx_lm() -> None:
    """Llama 4 converted by mlx-lm loads through AutoModelForCausalLM (the text model): its
    experts (every expert on its block of router-weighted rows) run as DenseRoutedExperts, the
    same function as transformers' Llama4TextExperts, and the logits are mlx-lm's."""
    from mlxq.moe import DenseRoutedExperts
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    path = _tiny_llama4_checkpoint()
    model = _load(path)
    ff = model.model.layers[1].feed_forward
    assert isinstance(ff.experts, DenseRoutedExperts)
    assert_logits_match_mlx_lm(model, path, torch.tensor(TOKENS), TOLERANCE)
    model.dequantize()  # the same float weights in transformers' own experts module
    x = torch.randn(1, 7, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = ff(x)[0]
        e = ff.experts
        ref = Llama4TextExperts(model.config)
        gate_up = torch.cat([e.gate_proj.weight, e.up_proj.weight], 1)
        ref.gate_up_proj.copy_(gate_up.transpose(1, 2))
        ref.down_proj.copy_(e.down_proj.weight.transpose(1, 2))
        ff.experts = ref
        torch.testing.assert_close(ours, ff(x)[0], rtol=0, atol=1e-5)


def test_llama4_moe_saved_as_mlx_lm_llama4(tmp_path: Path) -> None:
    """Llama 4 with experts saved back is mlx-lm's `llama4` (model_type llama4, the text
    config nested, every tensor under `language_model.`): mlx_lm.load gives the original's
    logits. Before: `llama4_text` with transformers' names, which mlx-lm reads as its dense
    llama4_text and refuses (45 parameters not in the model)."""
    import json
    import shutil

    path = _tiny_llama4_checkpoint()
    model = _load(path)
    model.save_pretrained(tmp_path)
    for file in path.glob("tokenizer*"):
        shutil.copy(file, tmp_path / file.name)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama4" and config["text_config"]["num_local_experts"] == 4
    ref = mlx_lm_logits(path, TOKENS)
    np.testing.assert_allclose(mlx_lm_logits(tmp_path, TOKENS), ref, rtol=0, atol=1e-5)
    assert_logits_match_mlx_lm(_load(tmp_path), path, torch.tensor(TOKENS), TOLERANCE)


@pytest.mark.parametrize(
    ("arch", "edit", "match"),
    [
        # before: loaded, then torch.topk failed in the forward ("selected index k out of range")
        ("qwen3_moe", {"num_experts_per_tok": 5}, "sets num_experts_per_tok: 5, more experts"),
        ("deepseek_v3", {"num_experts_per_tok": 5}, "sets num_experts_per_tok: 5, more experts"),
        # transformers' Qwen3-MoE reads num_local_experts (4), mlx-lm's num_experts (2)
        ("qwen3_moe", {"num_experts": 2}, r"transformers builds 4 experts, mlx-lm reads num_exp"),
        # transformers' Mixtral reads num_experts (its alias, 2), mlx-lm's num_local_experts (4)
        ("mixtral", {"num_experts": 2}, r"builds 2 experts, mlx-lm reads num_local_experts \(4"),
        # transformers' ERNIE 4.5 MoE reads the alias num_experts_per_tok (2), mlx-lm moe_k (3):
        # before, loaded and ran 2 experts per token where mlx-lm runs 3
        ("ernie4_5_moe", {"moe_k": 3, "num_experts_per_tok": 2}, r"builds 2 experts per tok"),
        # mlx-lm's moe_k (6) beyond the 4 experts, transformers' routers within them (2): the
        # one case where "more per token than experts" on mlx-lm's keys differed from the
        # routers' (before: refused by that second check); now the disagreement is refused
        ("ernie4_5_moe", {"moe_k": 6, "num_experts_per_tok": 2}, r"mlx-lm reads moe_k \(6\)"),
        # Gemma 4's router reads top_k_experts from its config (no top_k attribute): before,
        # loaded, then torch.topk failed in the forward
        ("gemma4_text", {"top_k_experts": 6}, "sets top_k_experts: 6, more experts per token"),
    ],
)
def test_moe_config_read_otherwise_is_refused_at_load(
    tmp_path: Path, arch: str, edit: dict, match: str
) -> None:
    # a tiny MoE model with 4 experts, 2 per token, converted by mlx-lm; its config.json edited
    import json
    import shutil

    from mlxq.cli.common import load_model

    path = tmp_path / arch
    shutil.copytree(tiny_mlx_checkpoint(arch, VARIANTS[1]), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=match):
        load_model(str(path), "cpu", "float32")


def test_moe_config_read_otherwise_is_refused_by_convert(tmp_path: Path) -> None:
    # mlxq convert of a float MoE checkpoint (loaded whole, then quantized) runs the checks of
    # a load; before: 6 experts per token of 4 converted, the checkpoint failing in the forward
    import json

    from arch_models import tiny_float_checkpoint
    from mlxq.convert import convert_checkpoint

    src = tiny_float_checkpoint("qwen3_moe", tmp_path / "float", tied=False)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 6}))
    with pytest.raises(ValueError, match="sets num_experts_per_tok: 6, more experts per token"):
        convert_checkpoint(src, tmp_path / "out", bits=4, group_size=32)


def test_glm5_next_experts_clamp_as_transformers_and_mlx_vlm() -> None:
    """GLM-5-Next's experts (transformers' Glm5NextTextExperts: the eager loop through an
    `_apply_gate` that clamps the gate from above and the up part both ways at swiglu_limit)
    are recognised and run as MoeExperts with LimitedSwiGLU: transformers' output on values
    that the clamp reaches, and mlx-vlm's `_limited_swiglu` on the gate itself."""
    import mlx.core as mx
    from mlx_vlm.models.glm5_next.language import _limited_swiglu
    from mlxq.moe import LimitedSwiGLU, SwitchLinear, experts_gate, fused_expert_stacks
    from mlxq.swap import moe_plan
    from transformers.models.glm5_next.configuration_glm5_next import Glm5NextTextConfig
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextExperts

    config = Glm5NextTextConfig(
        hidden_size=64, moe_intermediate_size=32, n_routed_experts=4, swiglu_limit=2.0
    )
    torch.manual_seed(0)
    experts = Glm5NextTextExperts(config)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.5)
    plan = moe_plan("mlp.experts", experts)
    assert plan is not None and plan.refusal is None and plan.variant == "limited_swiglu"
    x = torch.randn(9, 64)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(9)])
    w = torch.softmax(torch.randn(9, 2), -1)
    with torch.no_grad():
        ref = experts(x, idx, w)
        gate_up = torch.einsum("th,tih->ti", x, experts.gate_up_proj[idx[:, 0]])
    assert (gate_up.abs() > 2.0).float().mean() > 0.3  # the clamp matters
    gate = experts_gate(experts, plan.variant)
    assert isinstance(gate["glu"], LimitedSwiGLU) and gate["glu"].limit == 2.0
    floats = {}
    for proj, (weight, _) in fused_expert_stacks(experts, plan.variant).items():
        e, n, k = weight.shape
        floats[proj] = SwitchLinear(e, k, n)
        floats[proj].weight.data.copy_(weight)
    with torch.no_grad():
        got = MoeExperts(**floats, **gate)(x, idx, w)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    g, u = (torch.linspace(-6, 6, 97) * s for s in (1.0, -1.3))
    want = np.array(_limited_swiglu(mx.array(g.numpy()), mx.array(u.numpy()), 2.0))
    np.testing.assert_allclose(gate["glu"](g, u).numpy(), want, rtol=1e-6, atol=1e-6)
