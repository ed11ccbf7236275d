"""torch.export and torch.compile of loaded models with a dynamic sequence length (and batch).

The eager kernel paths are picked by size (bf16/fp16 CPU attention: the native op for a few
queries or a prompt of few scores, else sdpa; MoE: expert pairs sorted from SORT_MIN_PAIRS on).
Under tracing such a test must not become a guard: torch.export refused any `Dim` across a
threshold (bf16 attention: lengths over 16, MoE: over 31), torch.compile recompiled there.
Oracle: the eager model at each length (every path is held to mlx-lm / float64 elsewhere).
"""

from __future__ import annotations

import pytest
import torch
from arch_models import VARIANTS
from arch_models import tiny_mlx_checkpoint as tiny_arch_checkpoint
from mlx_models import tiny_mlx_checkpoint
from mlxq.integrations import cpu_attention
from mlxq.moe import SORT_MIN_PAIRS
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

# (batch, length): the batch is dynamic too
SHAPES = ((1, 1), (1, 17), (1, 33), (1, 100), (3, 17))


def _ids(length: int, batch: int = 1) -> torch.Tensor:
    return (torch.arange(batch * length).reshape(batch, length) * 37 + 11) % 200


class _Logits(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids, use_cache=False).logits


def _export(model):
    length = torch.export.Dim("length", min=1, max=128)
    batch = torch.export.Dim("batch", min=1, max=8)
    return torch.export.export(
        _Logits(model), (_ids(5, 2),), dynamic_shapes=({0: batch, 1: length},)
    )


@pytest.fixture(scope="module")
def llama_bf16():
    return AutoModelForCausalLM.from_pretrained(
        tiny_mlx_checkpoint("llama", 4, 64), dtype=torch.bfloat16
    ).eval()


@pytest.fixture(scope="module")
def moe_fp32():
    return AutoModelForCausalLM.from_pretrained(
        tiny_arch_checkpoint("qwen3_moe", VARIANTS[0]), dtype=torch.float32
    ).eval()


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_bf16_attention_exports_for_every_length(llama_bf16, grad, monkeypatch) -> None:
    """A bf16 model's attention under torch.export with a dynamic length: a `torch.cond` on the
    eager rule, so every length takes eager's path. With a smaller prompt bound, both sides run
    at these lengths on every CPU (17 and 33 or 100 over it). Without no_grad (q requires a
    gradient: no native op) the cond is between the fp32 widening and sdpa. Logits equal eager
    bit for bit (the paths differ by ~0.05 in bf16 logits)."""
    monkeypatch.setattr(cpu_attention, "MAX_PROMPT_SCORES", 300)
    with torch.set_grad_enabled(grad):
        program = _export(llama_bf16)
        conds = [n for n in program.graph.nodes if n.target is torch.ops.higher_order.cond]
        assert len(conds) == llama_bf16.config.num_hidden_layers
        for batch, length in SHAPES if not grad else ((1, 1), (3, 17)):  # (16 is the bound)
            ids = _ids(length, batch)
            got, want = program.module()(ids), llama_bf16(ids).logits
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{batch} x {length}")


def test_moe_exports_for_every_length(moe_fp32) -> None:
    """A MoE model under torch.export with a dynamic length: the pairs take the sorted path at
    every length (eager sorts from SORT_MIN_PAIRS on), which gives the unsorted rows bit for bit
    (length 17: eager unsorted); length 1 within fp32 summation order (eager's native norm and
    rotary paths for few rows)."""
    top_k = moe_fp32.config.num_experts_per_tok
    assert 17 * top_k < SORT_MIN_PAIRS <= 33 * top_k
    program = _export(moe_fp32)
    with torch.no_grad():
        for batch, length in SHAPES:
            ids = _ids(length, batch)
            got, want = program.module()(ids), moe_fp32(ids).logits
            atol = 5e-5 if length == 1 else 0
            torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=f"{batch} x {length}")


@pytest.mark.parametrize("which", ["llama_bf16", "moe_fp32"])
def test_compile_over_prompt_lengths_breaks_and_recompiles_once(which, request) -> None:
    """torch.compile over prompts of 5, 17, 33 and 100 tokens: no graph break (bf16 attention
    broke at `_C.cpu_isa` in every layer: 22 breaks, 16 graphs) and one recompile, the one to
    dynamic shapes (MoE recompiled again past 31 tokens), with eager's logits."""
    model = request.getfixturevalue(which)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda ids: model(ids, use_cache=False).logits, backend="eager")
    with torch.no_grad():
        for length in (5, 17, 33, 100):
            got, want = compiled(_ids(length)), model(_ids(length)).logits
            torch.testing.assert_close(got, want, rtol=0, atol=5e-5, msg=f"length {length}")
    breaks = dict(counters["graph_break"])
    assert not breaks, breaks
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


def test_attention_call_exports_for_any_query_and_key_lengths() -> None:
    """The attention interface alone, queries and keys of independent dynamic lengths (their
    scores stay under the prompt bound: the op at every length), no mask (sdpa's `is_causal`
    rule): one query attends every key (the traced causal mask is all-true for it, where a
    plain tril would keep the first key only), several are causal from the first key.
    Equal to eager."""
    attention = torch.nn.Module()
    attention.num_key_value_groups, attention.is_causal, attention.training = 3, True, False

    class Call(torch.nn.Module):
        def forward(self, q, k, v):
            return cpu_attention._attention(attention, q, k, v, None, scaling=0.2)[0]

    def qkv(lq: int, lk: int):
        g = torch.Generator().manual_seed(lq * 1000 + lk)
        q, k, v = (torch.randn(1, h, n, 32, generator=g) for h, n in ((6, lq), (2, lk), (2, lk)))
        return q.bfloat16(), k.bfloat16(), v.bfloat16()

    lq, lk = torch.export.Dim("lq", min=1, max=256), torch.export.Dim("lk", min=1, max=256)
    with torch.no_grad():
        program = torch.export.export(Call(), qkv(5, 7), dynamic_shapes=({2: lq}, {2: lk}, {2: lk}))
        for shape in ((1, 1), (1, 40), (3, 9), (17, 17), (200, 200)):
            args = qkv(*shape)
            torch.testing.assert_close(
                program.module()(*args), Call()(*args), rtol=0, atol=0, msg=f"{shape}"
            )


def test_llama4_routed_experts_export() -> None:
    """Llama 4's experts (DenseRoutedExperts: only the rows the router gave a weight, found by
    `torch.nonzero`) under torch.export: their count is data, so the traced call computes the
    empty case too instead of testing it (the test failed export: a guard on a data-dependent
    size). Static length: transformers' Llama 4 MoE block itself guards on a dynamic one."""
    from test_moe import _tiny_llama4_checkpoint

    model = AutoModelForCausalLM.from_pretrained(
        _tiny_llama4_checkpoint(), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        program = torch.export.export(_Logits(model), (_ids(7),))
        torch.testing.assert_close(program.module()(_ids(7)), model(_ids(7)).logits, rtol=0, atol=0)
