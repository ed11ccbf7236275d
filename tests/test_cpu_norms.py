"""`mlxq.ops.rms_norm` and the native eager forward of transformers' Llama-family RMSNorm.

Oracles: transformers' own LlamaRMSNorm forward (the computation the op restates), and float64
for the normalization; the hook must leave every path it does not take to the class's forward.
"""

from __future__ import annotations

import mlxq
import pytest
import torch
from mlx_models import greedy_tokens, tiny_mlx_checkpoint
from mlxq.integrations.cpu_norms import LLAMA_RMS_NORM_BODY, MAX_ROWS, use_native_rms_norm
from mlxq.ops import rms_norm
from mlxq.swap import forward_body
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _norm(dim: int, dtype: torch.dtype, gen: torch.Generator, eps: float = 1e-5) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(dim, eps=eps).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=gen) * 2)
    return norm


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of t's dtype at |t| (subnormals: the smallest spacing)."""
    info = torch.finfo(t.dtype)
    a = t.double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(a))) * info.eps


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("w_float32", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 7, 64), (5, 1), (2, 130)])
def test_op_matches_transformers_and_float64(x_dtype, w_float32, shape) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    dim = shape[-1]
    norm = _norm(dim, torch.float32 if w_float32 else x_dtype, gen)
    x = (torch.randn(shape, generator=gen) * 3).to(x_dtype)
    with torch.no_grad():
        want = norm(x)
        got = rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.dtype == want.dtype and got.shape == want.shape
    # float64 normalization, rounded as transformers does (to x's dtype, then the product)
    x64 = x.double()
    n64 = x64 / torch.sqrt(x64.square().mean(-1, keepdim=True) + norm.variance_epsilon)
    ref = norm.weight.double() * n64.to(x_dtype).double()
    # The mean may differ from torch's in its last fp32 bit and the fp32 normalization rounds
    # (rsqrt, product: a few fp32 ulps); then the normalized value rounds to x's dtype (an ulp
    # apart at most, at a tie) and the product with weight rounds once more.
    fp32_error = 4 * torch.finfo(torch.float32).eps * (n64 * norm.weight.double()).abs()
    bound = _ulp(n64.to(x_dtype)) * norm.weight.double().abs() + _ulp(want) + fp32_error
    assert ((got.double() - want.double()).abs() <= bound + fp32_error).all()
    assert ((got.double() - ref).abs() <= bound).all()
    if x_dtype != torch.float32:  # the fp32 mean is far below a bf16/fp16 rounding step
        assert (got != want).float().mean() < 1e-3


def test_op_edge_values() -> None:
    w = torch.ones(4)
    zeros = rms_norm(torch.zeros(2, 4), w, 1e-6)
    assert torch.equal(zeros, torch.zeros(2, 4))
    inf_row = rms_norm(torch.tensor([[1.0, float("inf"), 2.0, 3.0]]), w, 1e-6)
    norm = LlamaRMSNorm(4, eps=1e-6)
    with torch.no_grad():
        want = norm(torch.tensor([[1.0, float("inf"), 2.0, 3.0]]))
    torch.testing.assert_close(inf_row, want, equal_nan=True)
    assert rms_norm(torch.empty(0, 8), torch.ones(8), 1e-6).shape == (0, 8)


def test_op_refuses_bad_arguments() -> None:
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(TypeError, match="weight must be float32"):
        rms_norm(x, torch.ones(8, dtype=torch.int32), 1e-6)
    with pytest.raises(TypeError, match="x must be float32"):
        rms_norm(x.to(torch.int64), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        rms_norm(x, torch.ones(8), float("nan"))
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        rms_norm(x, torch.ones(8), -1.0)
    with pytest.raises(ValueError, match="last dimension"):
        rms_norm(torch.randn(2, 0), torch.ones(0), 1e-6)


def test_op_fake_compile_and_no_gradient() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 64, generator=gen).to(torch.bfloat16)
    w = torch.randn(64, generator=gen)
    torch.library.opcheck(torch.ops.mlxq.rms_norm.default, (x, w, 1e-5), test_utils=[
        "test_schema", "test_faketensor", "test_aot_dispatch_static"
    ])  # fmt: skip
    meta = rms_norm(x.to("meta"), w.to("meta"), 1e-5)
    assert meta.dtype == torch.float32 and meta.shape == (3, 64)  # bf16 x, fp32 weight
    compiled = torch.compile(lambda v: rms_norm(v, w, 1e-5), fullgraph=True)
    assert torch.equal(compiled(x), rms_norm(x, w, 1e-5))
    y = rms_norm(x.float().requires_grad_(), w, 1e-5)
    with pytest.raises(RuntimeError, match="no gradient"):
        y.sum().backward()


def test_hook_takes_only_the_llama_body() -> None:
    assert forward_body(LlamaRMSNorm) == LLAMA_RMS_NORM_BODY
    model = torch.nn.ModuleDict(
        {
            "llama": LlamaRMSNorm(16),
            "gemma": GemmaRMSNorm(16),  # 1 + weight
            "olmo2": Olmo2RMSNorm(16),  # rounds after the product
        }
    )
    assert use_native_rms_norm(model) == 1
    assert "forward" in vars(model["llama"])
    assert "forward" not in vars(model["gemma"]) and "forward" not in vars(model["olmo2"])
    assert use_native_rms_norm(model) == 0  # already done


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hook_falls_back_where_the_op_does_not_apply(dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    norm = _norm(64, dtype, gen)
    x = torch.randn(2, 5, 64, generator=gen).to(dtype)
    with torch.no_grad():
        want = norm(x)
    use_native_rms_norm(norm)
    calls = []
    op = torch.ops.mlxq.rms_norm

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (op, op.default):
                calls.append(func)
            return func(*args, **(kwargs or {}))

    with Spy():
        with torch.no_grad():
            got = norm(x)  # the op
        assert len(calls) == 1
        xg = x.clone().requires_grad_()
        out = norm(xg)  # autograd: the class's forward, with its gradient
        assert len(calls) == 1 and out.grad_fn is not None
        out.float().sum().backward()
        assert xg.grad is not None
        _, tangent = torch.func.jvp(norm, (x,), (torch.ones_like(x),))  # forward mode
        assert len(calls) == 1 and tangent.shape == x.shape
        prompt = torch.randn(1, MAX_ROWS + 1, 64, generator=gen).to(dtype)
        with torch.no_grad():
            assert torch.equal(norm(prompt), type(norm).forward(norm, prompt))  # a prompt
        assert len(calls) == 1
    assert torch.equal(out.detach(), want)
    torch.testing.assert_close(got, want, rtol=0, atol=float(_ulp(want).max()) * 4)
    compiled = torch.compile(norm, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_model_uses_the_op_and_decodes_the_same(dtype) -> None:
    """A checkpoint written by `mlx_lm convert` gets its 2 norms a layer and the final norm
    hooked; greedy decode gives the tokens of the class's own forward, logits within rounding."""
    from transformers import AutoModelForCausalLM

    path = tiny_mlx_checkpoint("qwen2", 4, 64)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    # (the decoder layers' flat decode step is an instance forward too: not a norm)
    hooked = [
        m for m in model.modules() if "forward" in vars(m) and not hasattr(m, "_mlxq_flat_plan")
    ]
    assert len(hooked) == 2 * model.config.num_hidden_layers + 1
    prompt = torch.tensor([1, 400, 2000, 31, 7, 99, 1234, 5])
    with torch.no_grad():
        tokens = greedy_tokens(model, prompt, 8)
        logits = model(tokens[None]).logits
        for m in hooked:
            del m.forward
        want_tokens = greedy_tokens(model, prompt, 8)
        want = model(tokens[None]).logits
    assert torch.equal(tokens, want_tokens)
    scale = float(want.abs().max())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(logits, want, rtol=0, atol=tol * scale)
    assert mlxq.ops.rms_norm is rms_norm
