"""Whole models on CUDA against the CPU: SmolLM2 greedy tokens and bf16 logits, `mlxq generate
--device cuda`, and transformers' `device_map="auto"` across two GPUs and with CPU offload.

The SmolLM2 checkpoint is the test suite's cached mlx-lm conversion (4 bits, group 32); a GPU
machine without mlx-lm and the GGUF can point MLXQ_TEST_SMOLLM2 at a prebuilt MLX checkpoint
folder instead. Tests that need a GPU skip with the reason where there is none (or only one for
the two-GPU test) or mlxq was built without its CUDA kernels.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from mlxq._native import cuda_unavailable_reason
from mlxq.cli import main as cli_main
from mlxq.cli.common import CLIError, pick_device

WHY = cuda_unavailable_reason()
needs_cuda = pytest.mark.skipif(WHY is not None, reason=str(WHY))


def _smollm2() -> Path:
    if env := os.environ.get("MLXQ_TEST_SMOLLM2"):
        return Path(env)
    from mlx_models import smollm2

    return smollm2(4, 32)


def _load(path: Path, dtype: torch.dtype, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(
            ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
        )
    return out[0].cpu()


def _stepwise_logits(model, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """fp32 logits of every position: one pass over the prompt, then one token at a time with
    the cache (the decode kernels, M = 1), as generation runs."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    tokens = tokens.to(device)[None]
    cache = DynamicCache()
    with torch.no_grad():
        out = [model(tokens[:, :prompt_len], past_key_values=cache, use_cache=True).logits]
        for i in range(prompt_len, tokens.shape[1]):
            out.append(model(tokens[:, i : i + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, dim=1)[0].float().cpu()


def test_pick_device_cuda_follows_availability() -> None:
    # runs everywhere: an explicit cuda is refused with the reason where mlxq cannot use it
    if WHY is None:
        assert pick_device("cuda") == "cuda"
    else:
        with pytest.raises(CLIError, match="--device cuda: "):
            pick_device("cuda")
    if not (torch.backends.mps.is_available()):
        assert pick_device("auto") == ("cuda" if WHY is None else "cpu")


@needs_cuda
def test_smollm2_greedy_on_cuda_equals_cpu() -> None:
    path = _smollm2()
    cpu, tok = _load(path, torch.float32)
    gpu, _ = _load(path, torch.float32, device_map="cuda")
    assert next(gpu.parameters()).is_cuda
    for prompt in ("The capital of France is", "def fibonacci(n):"):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        want = _greedy(cpu, ids, 32)
        assert torch.equal(_greedy(gpu, ids, 32), want), prompt
    # bf16 on the GPU (prompt pass, then M = 1 steps) is no further from the fp32 logits than
    # mlxq's own bf16 CPU run: the 135M model is fragile in bf16, so tokens are not compared
    ref = _stepwise_logits(cpu, want, ids.shape[1])
    cpu16, _ = _load(path, torch.bfloat16)
    gpu16, _ = _load(path, torch.bfloat16, device_map="cuda")
    err_cpu = float((_stepwise_logits(cpu16, want, ids.shape[1]) - ref).pow(2).mean().sqrt())
    err_gpu = float((_stepwise_logits(gpu16, want, ids.shape[1]) - ref).pow(2).mean().sqrt())
    assert err_gpu <= 1.5 * err_cpu + 1e-3, (err_gpu, err_cpu)


@needs_cuda
def test_cli_generate_on_cuda(capsys) -> None:
    path = _smollm2()
    args = ["generate", "--model", str(path), "--prompt", "The sea is", "--max-tokens", "16"]
    args += ["--dtype", "float32", "--ignore-chat-template"]
    assert cli_main([*args, "--device", "cpu"]) == 0
    cpu_out = capsys.readouterr().out
    assert cli_main([*args, "--device", "cuda"]) == 0
    gpu_out = capsys.readouterr().out
    text = [out.split("\n-- ")[0] for out in (cpu_out, gpu_out)]
    assert text[0] == text[1] and len(text[0].strip()) > 0
    assert "cuda float32" in gpu_out and "CUDA peak" in gpu_out


@pytest.mark.skipif(
    WHY is not None or torch.cuda.device_count() < 2,
    reason=str(WHY) if WHY is not None else "needs two CUDA GPUs (device_map='auto' split)",
)
def test_device_map_auto_across_two_gpus() -> None:
    # accelerate places the layers (no code of ours): a memory cap on GPU 0 pushes half of
    # them to GPU 1; the greedy tokens must still be the CPU's
    path = _smollm2()
    cpu, tok = _load(path, torch.float32)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    split, _ = _load(
        path, torch.float32, device_map="auto", max_memory={0: int(size * 0.6), 1: "20GiB"}
    )
    placement = getattr(split, "hf_device_map", None)
    assert placement is not None, "device_map='auto' was not placed by accelerate"
    devices = {str(d) for d in placement.values()}
    assert {"0", "1"} <= devices, placement
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert torch.equal(_greedy(split, ids, 24), _greedy(cpu, ids, 24))


@needs_cuda
def test_device_map_auto_gpu_with_cpu_offload() -> None:
    # a GPU too small for the model: accelerate keeps the layers past the memory cap on the CPU
    # and moves their packed weights, scales and biases to the GPU at each forward (its offload
    # hooks, no code of ours); the greedy tokens must still be the CPU's
    path = _smollm2()
    cpu, tok = _load(path, torch.float32)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    split, _ = _load(
        path, torch.float32, device_map="auto", max_memory={0: int(size * 0.6), "cpu": "20GiB"}
    )
    placement = getattr(split, "hf_device_map", None)
    assert placement is not None, "device_map='auto' was not placed by accelerate"
    devices = {str(d) for d in placement.values()}
    assert {"0", "cpu"} <= devices, placement
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert torch.equal(_greedy(split, ids, 24), _greedy(cpu, ids, 24))
