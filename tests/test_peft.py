"""LoRA fine-tuning of mlxq models with PEFT (mlxq.integrations.peft), against float64 for the
gradients and against mlx-lm for adapters (both directions) and for `mlx_lm fuse`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlx_models import tiny_mlx_checkpoint, write_mlx_lm_adapters
from mlxq.nn import AffineLinear
from oracles import assert_within, dequantize_ref, matmul_tolerance
from safetensors import safe_open
from torch import nn

peft = pytest.importorskip("peft")
mlxq_peft = pytest.importorskip("mlxq.integrations.peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def one_thread():
    """Training steps of a tiny model: one thread is several times faster on a loaded 2-core
    machine (OpenMP spin-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt() -> Path:
    return tiny_mlx_checkpoint("qwen3", 4, 64)


def _load(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def _random_adapters(model: nn.Module, gen: torch.Generator, std: float = 0.05) -> None:
    """Non-zero A and B (PEFT starts B at zero), so that the adapter changes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std)


def _mlx_lm(path: Path, adapter_path: Path | None = None, float32: bool = True):
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(path), adapter_path=None if adapter_path is None else str(adapter_path))
    if float32:
        model.set_dtype(mx.float32)
    return model


def _mlx_logits(model, tokens: torch.Tensor) -> np.ndarray:
    import mlx.core as mx

    out = model(mx.array(tokens.numpy().astype(np.int32))[None])[0]
    return np.array(out.astype(mx.float32))


def _logits(model, tokens: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(tokens[None]).logits[0].float().numpy()


class _One(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj
        # PEFT reads the device off the first parameter; real models have norms
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.gain


@pytest.mark.parametrize("bits,group_size", [(4, 64), (3, 32), (8, 128)])
def test_adapter_gradients_match_float64(gen, bits, group_size):
    import mlx.core as mx

    k, n, r, scale = 256, 96, 8, 2.5
    dense = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(n, k, generator=gen) * 0.1)
    layer = AffineLinear.from_float(dense, bits=bits, group_size=group_size)
    cfg = mlxq_peft.lora_config(r=r, lora_alpha=scale * r, target_modules=["proj"])
    model = peft.get_peft_model(_One(layer), cfg)
    _random_adapters(model, gen)
    lora = model.base_model.model.proj
    assert isinstance(lora, mlxq_peft.AffineLoraLinear)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "base_model.model.proj.lora_A.default.weight",
        "base_model.model.proj.lora_B.default.weight",
    ]
    assert layer.weight.dtype == torch.uint32  # still packed

    x = torch.randn(3, 5, k, generator=gen, requires_grad=True)
    g = torch.randn(3, 5, n, generator=gen)
    (model(x) * g).sum().backward()

    # float64 oracle: mlx's own dequantization of the same packed tensors
    w64 = torch.from_numpy(
        np.array(
            mx.dequantize(
                mx.array(layer.weight.numpy()),
                mx.array(layer.scales.numpy()),
                mx.array(layer.biases.numpy()),
                group_size=group_size,
                bits=bits,
            )
        )
    ).double()
    a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight

    def grads(x, g, w, a, b):  # d/dA, d/dB, d/dx of sum(g * y), in float64
        a64, b64, x64 = (t.detach().double().requires_grad_() for t in (a, b, x))
        y64 = x64 @ w.T + scale * (x64 @ a64.T) @ b64.T
        (y64 * g.double()).sum().backward()
        return a64.grad, b64.grad, x64.grad

    # Each gradient is a sum of products of x, g, W, A and B, so the same float64 autograd on
    # their magnitudes (|s|q + |b| for W) gives the sum of its terms' magnitudes; a term passes
    # through at most the contraction lengths of the chain (k, n, r, the 15 tokens) in fp32
    # additions, plus a few single roundings (the scale, the sum of the two paths, and MLX's
    # fp32 dequantize of w64, twice): the derived bound of matmul_tolerance.
    w_abs = dequantize_ref(layer.weight, layer.scales.abs(), layer.biases.abs(), group_size, bits)
    refs = grads(x, g, w64, a, b)
    refs_abs = grads(x.abs(), g.abs(), w_abs, a.abs(), b.abs())
    chain = k + n + r + x.shape[:-1].numel() + 4
    grads_got = (a.grad, b.grad, x.grad)
    for name, got, ref, ref_abs in zip("ABx", grads_got, refs, refs_abs, strict=True):
        tol = matmul_tolerance(ref_abs, ref, chain, got.dtype)
        assert_within(got, ref, tol, f"d/d{name}")


def _batch(gen: torch.Generator, n: int = 4, t: int = 16) -> torch.Tensor:
    return torch.randint(0, 2000, (n, t), generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_lowers_loss(ckpt, gen, dtype, one_thread):
    model = _load(ckpt, dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    packed = {n: b.clone() for n, b in model.named_buffers() if b.dtype == torch.uint32}
    cfg = mlxq_peft.lora_config(r=8, lora_alpha=16, target_modules=TARGETS)
    model = peft.get_peft_model(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(TARGETS) * 2  # A and B, 7 modules, 2 layers
    assert all(p.dtype == torch.float32 for p in trainable)  # PEFT's fp32 adapters
    data = _batch(gen, 2, 12)
    opt = torch.optim.AdamW(trainable, lr=3e-2)
    model.train()
    losses = []
    for _ in range(10):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    # ln(49152) = 10.8 at the start; bf16 steps may bounce, so the best of the last three
    assert min(losses[-3:]) < 0.6 * losses[0], losses
    for name, b in model.named_buffers():  # the base stayed frozen and packed
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if key in packed:
            assert torch.equal(b, packed[key]), name


def test_transformers_trainer_trains_adapters(ckpt, gen, tmp_path, one_thread):
    """transformers' Trainer takes a PEFT model on an mlxq model (the quantizer says it is
    trainable), trains the adapters, and leaves the packed base as it was; a bare quantized
    model without adapters is still refused by Trainer."""
    from transformers import Trainer, TrainingArguments

    model = _load(ckpt)
    packed = {n: b.clone() for n, b in model.named_buffers() if b.dtype == torch.uint32}
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        max_steps=6,
        learning_rate=3e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    data = [{"input_ids": row, "labels": row} for row in _batch(gen, 4, 12)]
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=model, args=args, train_dataset=data)
    peft_model = peft.get_peft_model(model, mlxq_peft.lora_config(r=8, target_modules=TARGETS))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    result = Trainer(model=peft_model, args=args, train_dataset=data).train()
    assert result.global_step == 6
    changed = [n for n, p in peft_model.named_parameters() if n in before and "lora_B" in n]
    assert changed and all(
        not torch.equal(p, before[n]) for n, p in peft_model.named_parameters() if n in changed
    )
    for name, b in peft_model.named_buffers():
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if key in packed:
            assert torch.equal(b, packed[key]), name


def test_gradient_checkpointing_same_gradients(ckpt, gen, one_thread):
    data = _batch(gen, 2, 12)
    grads = []
    for checkpointing in (False, True):
        model = _load(ckpt)
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model = peft.get_peft_model(
            model, mlxq_peft.lora_config(r=4, lora_alpha=8, target_modules=TARGETS)
        )
        _random_adapters(model, torch.Generator().manual_seed(1))
        model.train()
        model(input_ids=data, labels=data).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads, strict=True))


def test_export_to_mlx_lm_logits_match(ckpt, gen, tmp_path):
    model = _load(ckpt)
    cfg = mlxq_peft.lora_config(
        r=8, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    model = peft.get_peft_model(model, cfg)
    _random_adapters(model, gen)
    out = mlxq_peft.save_mlx_lm_adapters(model, tmp_path / "adapters")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["num_layers"] == 2
    assert config["lora_parameters"]["rank"] == 8
    assert config["lora_parameters"]["scale"] == 1.5
    with safe_open(out / "adapters.safetensors", "pt") as f:
        assert list(f.get_tensor("model.layers.0.self_attn.q_proj.lora_a").shape) == [128, 8]
        assert list(f.get_tensor("model.layers.0.self_attn.q_proj.lora_b").shape) == [8, 128]

    tokens = _batch(gen, 1, 24)[0]
    ours = _logits(model, tokens)
    theirs = _mlx_logits(_mlx_lm(ckpt, out), tokens)
    base = _mlx_logits(_mlx_lm(ckpt), tokens)
    assert np.abs(theirs - base).max() > 0.05  # the adapter matters
    assert np.abs(ours - theirs).max() < 1e-4, np.abs(ours - theirs).max()


def test_import_from_mlx_lm_logits_match(ckpt, gen, tmp_path):
    adapters = tmp_path / "mlx_adapters"
    write_mlx_lm_adapters(ckpt, adapters, 1, ["self_attn.o_proj", "mlp.up_proj"], 7.0, 3)
    model = mlxq_peft.load_mlx_lm_adapters(_load(ckpt), adapters)
    adapted = [n for n, m in model.named_modules() if isinstance(m, mlxq_peft.AffineLoraLinear)]
    assert [n.split("model.layers.")[1] for n in adapted] == ["1.self_attn.o_proj", "1.mlp.up_proj"]
    tokens = _batch(gen, 1, 24)[0]
    ours = _logits(model, tokens)
    theirs = _mlx_logits(_mlx_lm(ckpt, adapters), tokens)
    assert np.abs(theirs - _mlx_logits(_mlx_lm(ckpt), tokens)).max() > 0.05
    assert np.abs(ours - theirs).max() < 1e-4, np.abs(ours - theirs).max()


@pytest.mark.parametrize("rank", [1, 8, 64])
def test_delta_weight_bit_exact_with_mlx(rank, gen):
    """The merged delta is MLX's `(scale * lora_b.T) @ lora_a.T` to the bit (a fused
    multiply-add order differs in ~5% of entries and flips a re-quantized word now and then)."""
    import mlx.core as mx

    lora = mlxq_peft.AffineLoraLinear.__new__(mlxq_peft.AffineLoraLinear)
    nn.Module.__init__(lora)
    a = torch.randn(rank, 300, generator=gen) * 0.1
    b = torch.randn(200, rank, generator=gen) * 0.1
    lora.lora_A = nn.ModuleDict({"x": nn.Linear(300, rank, bias=False)})
    lora.lora_B = nn.ModuleDict({"x": nn.Linear(rank, 200, bias=False)})
    lora.lora_A["x"].weight.data.copy_(a)
    lora.lora_B["x"].weight.data.copy_(b)
    lora.scaling = {"x": 16 / rank}
    theirs = (16 / rank * mx.array(b.T.numpy()).T) @ mx.array(a.T.numpy()).T
    assert torch.equal(lora.get_delta_weight("x"), torch.from_numpy(np.array(theirs)))


def test_fuse_bit_exact_with_mlx_lm_fuse(ckpt, gen, tmp_path, monkeypatch):
    _assert_fuse_bit_exact_with_mlx_lm_fuse(ckpt, gen, tmp_path, monkeypatch, layers=2)


# mlx-lm fuses float-mode layers too: dequantize (bfloat16, MLX's default for these modes), add
# the delta in that dtype, re-quantize in the layer's mode
FP_VARIANTS = {
    "mxfp4": dict(tied=True, bits=4, group_size=32, mode="mxfp4"),
    "nvfp4": dict(tied=False, bits=4, group_size=16, mode="nvfp4"),
    "mxfp8": dict(tied=True, bits=8, group_size=32, mode="mxfp8"),
}


@pytest.mark.parametrize("mode", list(FP_VARIANTS))
def test_fuse_float_modes_bit_exact_with_mlx_lm_fuse(mode, gen, tmp_path, monkeypatch):
    from arch_models import Variant
    from arch_models import tiny_mlx_checkpoint as arch_checkpoint

    path = arch_checkpoint("qwen3", Variant(**FP_VARIANTS[mode]))
    _assert_fuse_bit_exact_with_mlx_lm_fuse(path, gen, tmp_path, monkeypatch, layers=2)


def _assert_fuse_bit_exact_with_mlx_lm_fuse(ckpt, gen, tmp_path, monkeypatch, layers):
    from mlx_lm import fuse as mlx_fuse

    model = _load(ckpt, torch.bfloat16)  # the checkpoint's own dtype, as mlx_lm fuse keeps it
    model = peft.get_peft_model(
        model, mlxq_peft.lora_config(r=8, lora_alpha=16, target_modules=TARGETS)
    )
    _random_adapters(model, gen, std=0.1)
    adapters = mlxq_peft.save_mlx_lm_adapters(model, tmp_path / "adapters")
    fused = mlxq_peft.fuse(model)
    assert not any(isinstance(m, mlxq_peft.AffineLoraLinear) for m in fused.modules())
    fused.save_pretrained(tmp_path / "ours")

    argv = ["mlx_lm.fuse", "--model", str(ckpt), "--adapter-path", str(adapters)]
    monkeypatch.setattr(sys, "argv", argv + ["--save-path", str(tmp_path / "theirs")])
    mlx_fuse.main()

    def tensors(d: Path) -> dict[str, torch.Tensor]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        return out

    ours, theirs, base = tensors(tmp_path / "ours"), tensors(tmp_path / "theirs"), tensors(ckpt)
    assert sorted(ours) == sorted(theirs) == sorted(base)
    for k, t in theirs.items():
        assert ours[k].dtype == t.dtype, k
        assert torch.equal(ours[k], t), k
    changed = {k for k, t in theirs.items() if not torch.equal(t, base[k])}
    # every adapted layer's packed weight and scales (and biases) moved; nothing else did
    affine = any(k.endswith(".biases") for k in base)
    leaves = ("weight", "scales", "biases") if affine else ("weight", "scales")
    assert changed == {
        f"model.layers.{i}.{blk}.{m}.{leaf}"
        for i in range(layers)
        for blk, mods in (("self_attn", TARGETS[:4]), ("mlp", TARGETS[4:]))
        for m in mods
        for leaf in leaves
    }


def test_refusals(ckpt, tmp_path):
    model = _load(ckpt)
    cfg = mlxq_peft.lora_config(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 8}
    )
    model = peft.get_peft_model(model, cfg)
    with pytest.raises(ValueError, match="one rank and one scale"):
        mlxq_peft.save_mlx_lm_adapters(model, tmp_path / "a")
    model = peft.get_peft_model(
        _load(ckpt),
        mlxq_peft.lora_config(r=4, target_modules=["q_proj"], layers_to_transform=[0]),
    )
    with pytest.raises(ValueError, match="last num_layers layers"):
        mlxq_peft.save_mlx_lm_adapters(model, tmp_path / "b")
    with pytest.raises(ValueError, match="DoRA"):
        peft.get_peft_model(
            _load(ckpt), mlxq_peft.lora_config(r=4, target_modules=["q_proj"], use_dora=True)
        )
    model.merge_adapter()
    lora = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(RuntimeError, match="cannot be unmerged"):
        lora.unmerge()
