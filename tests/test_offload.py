"""accelerate's offload of MLX checkpoints (CPU): a device_map with "disk" entries, and
`device_map="auto"` with a `max_memory` too small for the model, give the plain CPU load's
greedy tokens while the offloaded layers' packed weights, scales and biases stay off the model
(meta between forwards, read from the offload folder or the checkpoint at each forward).
mlxq's load checks still read the offloaded tensors' values, and what mlxq cannot offload is
refused by name. (The GPU variant, "cpu" beside a GPU: tests/test_cuda_models.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from arch_models import TOKENS, Variant, causal_lm_class
from arch_models import tiny_mlx_checkpoint as tiny_arch
from mlxq.integrations.offload import offload_hooks
from mlxq.nn import AffineLinear
from safetensors.torch import load_file, save_file

IDS = torch.tensor([TOKENS[:6]])
NEW_TOKENS = 6
# the tiny models' two layers: the first stays on the CPU, the second goes to disk
HALF_ON_DISK = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def _load(arch: str, path: Path, dtype: torch.dtype, **kwargs):
    return causal_lm_class(arch).from_pretrained(path, dtype=dtype, **kwargs).eval()


def _greedy(model) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(
            IDS,
            attention_mask=torch.ones_like(IDS),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    return out[0, IDS.shape[1] :]


def _assert_held_off(model, layer: str) -> None:
    """Every tensor of `layer` (its quantized buffers included) is meta in the model and
    read from disk by accelerate's hooks: nothing of it is held in memory between forwards."""
    module = model.get_submodule(layer)
    state = module.state_dict(keep_vars=True)
    assert {t.device.type for t in state.values()} == {"meta"}, layer
    quantized = [m for m in module.modules() if isinstance(m, AffineLinear)]
    assert quantized, layer
    for m in quantized:
        (hook,) = offload_hooks(m)
        assert hook.offload_buffers
        loader = hook.weights_map.dataset
        for leaf in ("weight", "scales", "biases"):
            key = f"{hook.weights_map.prefix}{leaf}"
            # on disk: in the offload index, not among the loader's in-memory tensors
            assert key in loader.index and key not in loader.state_dict, key


@pytest.fixture(scope="module")
def qwen3() -> Path:
    return tiny_arch("qwen3", Variant(tied=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_disk_offload_of_half_the_layers_gives_the_cpu_tokens(
    qwen3: Path, dtype: torch.dtype, tmp_path: Path
) -> None:
    want = _greedy(_load("qwen3", qwen3, dtype))
    model = _load("qwen3", qwen3, dtype, device_map=HALF_ON_DISK, offload_folder=str(tmp_path))
    assert model.hf_device_map["model.layers.1"] == "disk"
    _assert_held_off(model, "model.layers.1")
    assert torch.equal(_greedy(model), want)
    _assert_held_off(model, "model.layers.1")  # dropped again after each forward
    # the layer kept on the CPU holds its tensors
    layer0 = model.model.layers[0].state_dict().values()
    assert {t.device.type for t in layer0} == {"cpu"}


def test_device_map_auto_with_a_small_cpu_budget_offloads_to_disk(
    qwen3: Path, tmp_path: Path
) -> None:
    want = _greedy(_load("qwen3", qwen3, torch.float32))
    size = sum(f.stat().st_size for f in qwen3.glob("*.safetensors"))
    model = _load(
        "qwen3",
        qwen3,
        torch.float32,
        device_map="auto",
        max_memory={"cpu": size},  # the file's size: the model loads larger (fp32 scales)
        offload_folder=str(tmp_path),
    )
    placement = model.hf_device_map
    assert "disk" in placement.values() and "cpu" in placement.values(), placement

    def placed(name: str) -> str:
        owner = max((k for k in placement if name == k or name.startswith(f"{k}.")), key=len)
        return placement[owner]

    on_disk = [f"model.layers.{i}" for i in range(2) if placed(f"model.layers.{i}") == "disk"]
    assert on_disk, placement
    for name in on_disk:
        _assert_held_off(model, name)
    assert torch.equal(_greedy(model), want)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_disk_offload_of_moe_experts_gives_the_cpu_tokens(arch: str, tmp_path: Path) -> None:
    path = tiny_arch(arch, Variant(tied=False))
    want = _greedy(_load(arch, path, torch.float32))
    model = _load(arch, path, torch.float32, device_map=HALF_ON_DISK, offload_folder=str(tmp_path))
    layer = model.get_submodule("model.layers.1")
    assert {t.device.type for t in layer.state_dict().values()} == {"meta"}
    assert torch.equal(_greedy(model), want)
    assert {t.device.type for t in layer.state_dict().values()} == {"meta"}


def _edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    (file,) = dst.glob("*.safetensors")
    weights = load_file(file)
    edit(weights)
    save_file(weights, file, metadata={"format": "mlx"})
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)
    return dst


def test_a_missing_tensor_of_an_offloaded_layer_is_named(qwen3: Path, tmp_path: Path) -> None:
    key = "model.layers.1.post_attention_layernorm.weight"
    path = _edited(qwen3, tmp_path / "ckpt", lambda w: w.pop(key))
    with pytest.raises(ValueError, match=f"lacks {key}"):
        _load("qwen3", path, torch.float32, device_map=HALF_ON_DISK, offload_folder=str(tmp_path))


@pytest.mark.parametrize("key", ["mlp.gate_proj.scales", "input_layernorm.weight"])
def test_non_finite_values_of_an_offloaded_layer_are_refused(
    qwen3: Path, tmp_path: Path, key: str
) -> None:
    key = f"model.layers.1.{key}"

    def poison(w: dict) -> None:
        w[key] = w[key].clone()
        w[key].view(-1)[3] = float("nan")

    path = _edited(qwen3, tmp_path / "ckpt", poison)
    with pytest.raises(ValueError, match=rf"{key} has 1 non-finite values"):
        _load("qwen3", path, torch.float32, device_map=HALF_ON_DISK, offload_folder=str(tmp_path))


def test_offloading_a_quantized_embedding_tied_to_the_head_is_refused(tmp_path: Path) -> None:
    path = tiny_arch("qwen3", Variant(tied=True))
    device_map = {**HALF_ON_DISK, "model.embed_tokens": "disk"}
    with pytest.raises(NotImplementedError, match="offloads model.embed_tokens, whose quantized"):
        _load("qwen3", path, torch.float32, device_map=device_map, offload_folder=str(tmp_path))


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        # its router's forward reads the weight's dtype: accelerate would cast the packed words
        ("minimax_m2", "offloads the quantized router 'model.layers.1.mlp.gate', whose forward"),
        # mlx-lm drops the router's correction bias; mlxq fills it after loading
        ("ernie4_5_moe", "offloads model.layers.1.mlp.gate.moe_statics.e_score_correction_bias"),
    ],
)
def test_moe_parts_mlxq_cannot_offload_are_refused(arch: str, message: str, tmp_path: Path):
    path = tiny_arch(arch, Variant(tied=False))
    with pytest.raises(NotImplementedError, match=message):
        _load(arch, path, torch.float32, device_map=HALF_ON_DISK, offload_folder=str(tmp_path))


def test_quantizing_while_loading_refuses_disk_offload(tmp_path: Path) -> None:
    from mlx_models import tiny_float_model
    from mlxq import MLXQuantConfig

    floats = tiny_float_model("qwen3", tmp_path / "float")
    with pytest.raises(NotImplementedError, match="cannot offload to disk .*model.layers.1"):
        causal_lm_class("qwen3").from_pretrained(
            floats,
            dtype=torch.float32,
            quantization_config=MLXQuantConfig(bits=4, group_size=64),
            device_map=HALF_ON_DISK,
            offload_folder=str(tmp_path / "offload"),
        )
