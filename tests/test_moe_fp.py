"""Mixture-of-experts checkpoints in MLX's floating-point modes (mxfp4 / nvfp4 / mxfp8, e.g.
gpt-oss and other mlx-community MoE models): tiny random MoE models converted by
`mlx_lm convert --q-mode` load through from_pretrained with their experts packed (the stacks run
mlxq.fp_gather_matmul), give mlx-lm's fp32 logits, save back to mlx-lm's tensors bit for bit;
`mlxq.quantize_model(mode=)` / `mlxq convert --q-mode` on a float MoE model write the tensors of
`mlx_lm convert --q-mode` bit for bit.

Oracle: mlx-lm's forward pass (tests/arch_models.py's tiny models).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from arch_models import (
    TOKENS,
    Variant,
    mlxq_logits,
    run_arch,
    tiny_float_checkpoint,
    tiny_mlx_checkpoint,
)
from mlx_models import assert_logits_match_mlx_lm, greedy_tokens, mlx_lm_logits
from mlxq.moe import AffineSwitchLinear, AffineWeight, MoeExperts
from oracles import assert_product_within
from safetensors.torch import load_file

TOLERANCE = 1e-3
MODES = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}


def _variant(mode: str, tied: bool = False) -> Variant:
    group_size, bits = MODES[mode]
    return Variant(tied=tied, bits=bits, group_size=group_size, mode=mode)


def _load(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_float_mode_moe_matches_mlx_lm(arch: str, mode: str) -> None:
    """fp32 logits against mlx-lm's; the stacks hold the checkpoint's packed tensors (uint8
    scales, no biases); Qwen3-MoE's router is affine 8-bit (mlx-lm's predicate), Mixtral's is
    in the top mode."""
    path = tiny_mlx_checkpoint(arch, _variant(mode))
    ref = mlx_lm_logits(path, TOKENS)
    model = _load(path)
    with torch.no_grad():
        got = model(torch.tensor([TOKENS])).logits[0].numpy()
    diff = float(np.abs(got - ref).max())
    print(f"\n{arch} {mode}: max|diff| {diff:.2e}")
    assert diff <= TOLERANCE
    mlp = model.model.layers[0].mlp
    experts = mlp.experts
    assert isinstance(experts, MoeExperts)
    group_size, bits = MODES[mode]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        stack = getattr(experts, proj)
        assert isinstance(stack, AffineSwitchLinear), proj
        assert (stack.mode, stack.bits, stack.group_size) == (mode, bits, group_size)
        assert stack.scales.dtype == torch.uint8 and stack.biases is None
        assert stack.weight.dtype == torch.uint32 and stack.weight.shape[0] == 4
    assert not any(p.dim() == 3 for p in model.parameters())  # no dense expert copy
    router = mlp.gate
    assert isinstance(router.weight, AffineWeight)
    assert router.mode == ("affine" if arch == "qwen3_moe" else mode)


@pytest.mark.parametrize(
    ("arch", "mode"),
    [
        ("olmoe", "mxfp4"),
        ("qwen2_moe", "nvfp4"),
        ("phimoe", "mxfp8"),
        ("deepseek_v2", "mxfp4"),
        ("deepseek_v3", "nvfp4"),
        ("glm4_moe", "mxfp8"),
    ],
)
def test_other_moe_architectures(arch: str, mode: str) -> None:
    """The other MoE architectures mlx-lm and transformers share, one float mode each (DeepSeek
    V3's per-head embed_q / unembed_out in that mode too); measured <= 6.8e-6 in every mode."""
    outcome = run_arch(arch, _variant(mode))
    print(f"\n{outcome.line()}")
    assert outcome.status == "loads", outcome.line()
    assert outcome.max_diff <= TOLERANCE, outcome.line()


def test_float_mode_moe_greedy_decode_matches_mlx_lm() -> None:
    """12 greedy tokens with the KV cache (one token, top-2 experts a step: the streaming
    kernels) are mlx-lm's argmax under teacher forcing."""
    path = tiny_mlx_checkpoint("qwen3_moe", _variant("mxfp4"))
    model = _load(path)
    prompt = TOKENS[:5]
    out = greedy_tokens(model, prompt, 12)
    ref = assert_logits_match_mlx_lm(model, path, out, TOLERANCE)
    assert np.array_equal(ref.argmax(-1)[len(prompt) - 1 : -1], out[len(prompt) :].numpy())


@pytest.mark.parametrize(
    ("arch", "mode"), [("qwen3_moe", "mxfp4"), ("mixtral", "nvfp4"), ("deepseek_v3", "mxfp8")]
)
def test_save_pretrained_round_trip(tmp_path: Path, arch: str, mode: str) -> None:
    """save_pretrained writes the checkpoint's tensors back bit for bit (mlx-lm's switch_mlp
    names) and the same quantization block; mlx-lm runs the saved folder as the original."""
    path = tiny_mlx_checkpoint(arch, _variant(mode))
    model = _load(path, torch.bfloat16)  # as stored
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    before, after = _tensors(path), _tensors(saved)
    assert sorted(before) == sorted(after), sorted(set(before) ^ set(after))[:5]
    assert any(k.endswith("switch_mlp.down_proj.scales") for k in after)
    for key, tensor in before.items():
        if tensor.is_floating_point() and after[key].dtype != tensor.dtype:
            # transformers keeps some float buffers in fp32 (DeepSeek V3's
            # e_score_correction_bias): the same values, another dtype (as for affine models)
            assert torch.equal(after[key].to(tensor.dtype), tensor), key
            continue
        assert after[key].dtype == tensor.dtype, key
        assert torch.equal(after[key].view(torch.uint8), tensor.view(torch.uint8)), key
    block = json.loads((saved / "config.json").read_text())["quantization"]
    assert block == json.loads((path / "config.json").read_text())["quantization"]
    for file in path.iterdir():  # the tokenizer's files
        if not (saved / file.name).exists():
            (saved / file.name).write_bytes(file.read_bytes())
    np.testing.assert_allclose(
        mlx_lm_logits(saved, TOKENS), mlx_lm_logits(path, TOKENS), rtol=0, atol=0
    )


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_convert_float_moe_matches_mlx_lm_convert(tmp_path: Path, arch: str, mode: str) -> None:
    """`mlxq convert --q-mode` (quantize_model on the loaded float model) writes the tensors of
    `mlx_lm convert --q-mode` bit for bit (stacks, routers) and the same quantization block;
    the result matches mlx-lm's fp32 logits."""
    from mlx_lm import convert
    from mlxq.convert import convert_checkpoint

    src = tiny_float_checkpoint(arch, tmp_path / "float", tied=False)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    convert_checkpoint(src, ours, bits=None, mode=mode)
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(src), str(theirs), quantize=True, q_mode=mode)
    a, b = _tensors(ours), _tensors(theirs)
    assert sorted(a) == sorted(b), (sorted(set(a) - set(b))[:4], sorted(set(b) - set(a))[:4])
    assert any(k.endswith("switch_mlp.gate_proj.scales") for k in b)
    for key in b:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key
    q = json.loads((ours / "config.json").read_text())["quantization"]
    assert q == json.loads((theirs / "config.json").read_text())["quantization"]
    ref = mlx_lm_logits(theirs, TOKENS)
    assert float(np.abs(mlxq_logits(ours, TOKENS) - ref).max()) <= TOLERANCE


def test_dequantize_float_mode_experts(tmp_path: Path) -> None:
    """model.dequantize() turns float-mode stacks into float ones with the same outputs."""
    path = tiny_mlx_checkpoint("mixtral", _variant("mxfp8"))
    model = _load(path)
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        before = model(ids).logits
        model.dequantize()
        after = model(ids).logits
    assert not any(b.dtype in (torch.uint32, torch.uint8) for b in model.buffers())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def _global_scale_checkpoint(float_dir: Path, out: Path) -> Path:
    """mlx-lm's nvfp4 with one tensor scale per expert on the switch layers
    (`quantize_model(..., global_scale=True)`, which `mlx_lm convert` does not expose)."""
    from mlx_lm.utils import load, quantize_model, save

    model, tokenizer, config = load(str(float_dir), return_config=True, lazy=True)
    with contextlib.redirect_stdout(io.StringIO()):
        model, config = quantize_model(model, config, None, None, "nvfp4", global_scale=True)
    save(out, float_dir, model, tokenizer, config)
    return out


def _mlx_lm_logits_dequantized_stacks(path: Path) -> np.ndarray:
    """mlx-lm's fp32 forward with each global-scale stack replaced by its float weights from
    mx.dequantize (MLX runs gather_qmm with a global scale on its GPU only)."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm import load
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    model, _ = load(str(path))
    replaced = []
    for name, m in model.named_modules():
        if isinstance(m, QuantizedSwitchLinear) and m.global_scale is not None:
            w = mx.stack(
                [
                    mx.dequantize(
                        m.weight[e], m.scales[e], None, m.group_size, m.bits, mode=m.mode,
                        global_scale=m.global_scale[e], dtype=mx.float32,
                    )
                    for e in range(m.num_experts)
                ]
            )  # fmt: skip
            stack = SwitchLinear(m.input_dims, m.output_dims, m.num_experts, bias=False)
            stack.weight = w
            replaced.append((name, stack))
    assert replaced
    model.update_modules(tree_unflatten(replaced))
    model.set_dtype(mx.float32)
    logits = model(mx.array(np.asarray(TOKENS, dtype=np.int32)[None]))[0]
    return np.array(logits.astype(mx.float32))


def test_nvfp4_per_expert_global_scale(tmp_path: Path) -> None:
    """Stacks with mlx-lm's per-expert nvfp4 global_scale [E] load (fp_gather_matmul's
    global_scale), match mlx-lm's forward over mx.dequantize'd stacks in fp32, and save back."""
    src = tiny_float_checkpoint("qwen3_moe", tmp_path / "float", tied=False)
    path = _global_scale_checkpoint(src, tmp_path / "gs")
    stored = _tensors(path)
    key = "model.layers.0.mlp.switch_mlp.up_proj.global_scale"
    assert stored[key].dtype == torch.float32 and stored[key].shape == (4,)
    ref = _mlx_lm_logits_dequantized_stacks(path)
    model = _load(path)
    stack = model.model.layers[0].mlp.experts.up_proj
    assert stack.mode == "nvfp4" and torch.equal(stack.global_scale, stored[key])
    with torch.no_grad():
        got = model(torch.tensor([TOKENS])).logits[0].numpy()
    diff = float(np.abs(got - ref).max())
    print(f"\nqwen3_moe nvfp4 per-expert global_scale: max|diff| {diff:.2e}")
    assert diff <= TOLERANCE
    model = _load(path, torch.bfloat16)
    model.save_pretrained(tmp_path / "saved")
    after = _tensors(tmp_path / "saved")
    assert sorted(after) == sorted(stored)
    for k, tensor in stored.items():
        assert torch.equal(after[k].view(torch.uint8), tensor.view(torch.uint8)), k
    block = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization"]
    assert block == json.loads((path / "config.json").read_text())["quantization"]
    assert block["model.layers.0.mlp.switch_mlp.up_proj"]["global_scale"] is True


@pytest.mark.parametrize("mode", list(MODES))
def test_switch_linear_in_float_modes(mode: str) -> None:
    """AffineSwitchLinear.from_float(mode=) holds mx.quantize's tensors and its forward is the
    gather over them (float64 reference from the dequantized stack); bad formats are refused
    naming the module and the expected values."""
    gen = torch.Generator().manual_seed(0)
    group_size, bits = MODES[mode]
    w = torch.randn(4, 32, 64, generator=gen)
    stack = AffineSwitchLinear.from_float(w, bits, group_size, mode)
    assert stack.scales.dtype == torch.uint8 and stack.biases is None
    assert set(stack.state_dict()) == {"weight", "scales"}
    x, idx = torch.randn(3, 1, 1, 64, generator=gen), torch.tensor([[3, 0], [1, 1], [2, 3]])
    w = stack.dequantize_weight()[idx].transpose(-1, -2)  # exact in fp32
    assert_product_within(stack(x, idx), x, w, f"{mode} stack")
    with pytest.raises(ValueError, match=rf"mode '{mode}' needs \(group_size, bits\)"):
        AffineSwitchLinear(4, 64, 32, 3, 64, mode=mode)
    with pytest.raises(ValueError, match="mode='fp4' is not one of affine, mxfp4"):
        AffineSwitchLinear(4, 64, 32, bits, group_size, mode="fp4")
    if mode != "nvfp4":
        with pytest.raises(ValueError, match="global_scale is only used by mode 'nvfp4'"):
            AffineSwitchLinear(4, 64, 32, bits, group_size, mode=mode, global_scale=True)
