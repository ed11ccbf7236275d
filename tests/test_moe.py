"""Mixture-of-experts checkpoints: tiny random MoE models converted by `mlx_lm.convert` give
mlx-lm's fp32 logits and greedy tokens through transformers' from_pretrained; experts stay
packed; routers keep their own forward; what mlxq does not reproduce is refused by name;
save_pretrained writes mlx-lm's layout back.

The whole MoE matrix (more architectures) runs in `python benchmarks/arch_coverage.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from arch_models import (
    MOE_FAST,
    TOKENS,
    VARIANTS,
    mlxq_logits,
    run_arch,
    tiny_mlx_checkpoint,
)
from mlx_models import mlx_lm_logits
from mlxq.moe import AffineSwitchLinear, AffineWeight, MoeExperts, quantized_router
from mlxq.swap import moe_plan
from torch import nn

TOLERANCE = 1e-3
MLX_LM_UNTIED_ONLY = {"qwen2_moe"}  # mlx-lm's qwen2_moe has no tied head


@pytest.mark.parametrize("arch", MOE_FAST)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.tag)
def test_moe_matches_mlx_lm(arch: str, variant) -> None:
    outcome = run_arch(arch, variant)
    print(f"\n{outcome.line()}")
    if variant.tied and arch in MLX_LM_UNTIED_ONLY:
        assert outcome.status == "mlx-lm fails", outcome.line()
        return
    assert outcome.status == "loads", outcome.line()
    assert outcome.max_diff <= TOLERANCE, outcome.line()


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
    assert type(gate).__mro__[2].__name__ == "Qwen3MoeTopKRouter" and gate.bits == 8
    assert isinstance(gate.weight, AffineWeight)
    x = torch.randn(3, 128)
    logits, scores, idx = gate(x)
    assert idx.shape == (3, 2) and scores.shape == (3, 2)
    w = torch.ops.mlxq.affine_dequantize(
        gate.weight_packed, gate.scales, gate.biases, gate.group_size, gate.bits
    )
    torch.testing.assert_close(logits, x @ w.float().T, rtol=1e-5, atol=1e-5)


def test_greedy_generation_matches_mlx_lm() -> None:
    """16 greedy tokens decoded with the KV cache (one token, top-2 experts per step: the
    streaming path) are mlx-lm's argmax under teacher forcing, and the logits match."""
    path = tiny_mlx_checkpoint("qwen3_moe", VARIANTS[1])
    model = _load(path)
    prompt = torch.tensor(TOKENS[:5])
    with torch.no_grad():
        out = model.generate(
            prompt[None],
            attention_mask=torch.ones_like(prompt[None]),
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
        )[0]
    ref = mlx_lm_logits(path, out.numpy())
    with torch.no_grad():
        got = model(out[None]).logits[0].numpy()
    assert float(np.abs(got - ref).max()) <= TOLERANCE
    assert np.array_equal(ref.argmax(-1)[len(prompt) - 1 : -1], out[len(prompt) :].numpy())


@pytest.mark.parametrize(
    ("arch", "variant"), [("mixtral", 0), ("phimoe", 1), ("granitemoe", 0), ("deepseek_v3", 1)]
)
def test_save_pretrained_writes_mlx_lm_layout(tmp_path: Path, arch: str, variant: int) -> None:
    """The saved tensors have mlx-lm's names (switch_mlp, PhiMoE's gate, GraniteMoE's
    router.layer, DeepSeek V3's embed_q/unembed_out) and mlx-lm runs the saved checkpoint as
    the original one."""
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
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight).softmax(-1)


def test_router_rules() -> None:
    plan = moe_plan("mlp.gate", _SquaredRouter())
    assert plan.kind == "router" and "other than in F.linear" in plan.refusal
    with pytest.raises(NotImplementedError, match=r"'mlp\.gate' \(_SquaredRouter\)"):
        plan.require()
    router = _LinearRouter()
    assert moe_plan("r", router).refusal is None
    quantized = quantized_router("r", router, 8, 64, torch.float32, "cpu", weight=router.weight)
    x = torch.randn(5, 64)
    torch.testing.assert_close(quantized(x), router(x), rtol=0, atol=2e-2)
    # any other use of the quantized weight is refused by name, never run on packed integers
    with pytest.raises(NotImplementedError, match=r"'r' \(_LinearRouter\).*`add`"):
        torch.add(quantized.weight, 1)
    assert set(quantized.state_dict()) == {"weight", "scales", "biases"}


def test_experts_with_another_forward_are_refused() -> None:
    from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    config = GptOssConfig(hidden_size=64, intermediate_size=64, num_local_experts=4)
    plan = moe_plan("mlp.experts", GptOssExperts(config))
    with pytest.raises(NotImplementedError, match=r"'mlp\.experts' \(GptOssExperts\)"):
        plan.require()


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


def test_dequantize_gives_float_moe_with_the_same_logits() -> None:
    from mlxq.moe import SwitchLinear

    model = _load(tiny_mlx_checkpoint("qwen3_moe", VARIANTS[0]))
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        before = model(ids).logits
        model.dequantize()
        after = model(ids).logits
    experts = model.model.layers[0].mlp.experts
    assert (
        isinstance(experts.gate_proj, SwitchLinear) and experts.gate_proj.weight.is_floating_point()
    )
    gate = model.model.layers[0].mlp.gate
    assert type(gate).__name__ == "Qwen3MoeTopKRouter" and isinstance(gate.weight, nn.Parameter)
    assert not any(b.dtype == torch.uint32 for b in model.buffers())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_quantize_model_refuses_fused_experts_by_name() -> None:
    import mlxq
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_experts=4,
        vocab_size=64,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(NotImplementedError, match=r"'model\.layers\.0\.mlp\.experts'"):
        mlxq.quantize_model(model, 4, 64)
