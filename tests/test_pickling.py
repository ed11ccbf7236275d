"""Whole-model pickling (`torch.save(model)` / `torch.load(..., weights_only=False)`, and
`copy.deepcopy`) of models loaded by mlxq: the loaded-back model gives identical logits."""

from __future__ import annotations

import copy
import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

ARCH_CASES = [  # (arch, tied, bits, group, mode): dense, MoE, float mode
    ("llama", True, 4, 64, "affine"),
    ("qwen3_moe", False, 4, 64, "affine"),
    ("llama", False, 4, 16, "nvfp4"),
]
VLM_CASES = ["llava", "qwen3_vl_moe", "gemma4"]


def _features(model) -> list:
    """What mlxq set up on each module: its class, config classes, flat decode plans (with a
    native step), bound forwards, row-serving embeddings; a copy must keep all of it."""
    from transformers import PreTrainedConfig

    configs = [
        model.config,
        *(v for v in vars(model.config).values() if isinstance(v, PreTrainedConfig)),
    ]
    out = [(type(c).__module__, type(c).__qualname__, c.to_dict()) for c in configs]
    for name, module in model.named_modules():
        state = vars(module)
        plan = state.get("_mlxq_flat_plan")
        forward = state.get("forward")
        out.append(
            (
                name,
                type(module).__qualname__,
                plan is not None and plan.native is not None and plan.intact(),
                getattr(forward, "__func__", forward).__name__ if forward else None,
                tuple(sorted(state.get("_row_readers", {}).values())),
            )
        )
    return out


def _round_trip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _arch_model(arch, tied, bits, group, mode):
    from arch_models import Variant, causal_lm_class, tiny_mlx_checkpoint

    path = tiny_mlx_checkpoint(arch, Variant(tied=tied, bits=bits, group_size=group, mode=mode))
    return causal_lm_class(arch).from_pretrained(path, dtype=torch.float32)


TOKENS = torch.tensor([[1, 40, 200, 31, 7, 99, 123, 5]])


def _text_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(TOKENS).logits[0].float().numpy()


def _captured(model) -> list:
    """The outputs transformers captures by hooks it installs at the first forward asking
    for them (local functions), as a forward with every output flag gives them."""
    flags = {"output_hidden_states": True, "output_attentions": True}
    if hasattr(model.config, "output_router_logits"):  # MoE: the routers' logits
        flags["output_router_logits"] = True
    with torch.no_grad():
        out = model(TOKENS, **flags)
    keys = ("hidden_states", "attentions", "router_logits")
    return [t.float().numpy() for k in keys for t in (getattr(out, k, None) or ())]


def _capture_hooks(model) -> int:
    return sum(
        "output_capturing_hook" in getattr(hook, "__code__", _text_logits.__code__).co_name
        for module in model.modules()
        for hook in module._forward_hooks.values()
    )


def _generated(model) -> list:
    with torch.no_grad():
        return model.generate(TOKENS, max_new_tokens=4, do_sample=False)[0].tolist()


def _shared_storages(model) -> int:
    """How many packed buffers share their storage with an earlier one (tied heads)."""
    seen, shared = set(), 0
    for buffer in model.buffers():
        if buffer.dtype == torch.uint32:
            ptr = buffer.untyped_storage().data_ptr()
            shared += ptr in seen
            seen.add(ptr)
    return shared


def _check_copies(model, check) -> None:
    features, hooks, want = _features(model), _capture_hooks(model), check(model)
    # plain pickle too (multiprocessing, Ray): torch's legacy storage format cannot load uint32
    # tensors, so mlxq's modules pickle their packed words as int32 views
    for copied in (_round_trip(model), copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert _shared_storages(copied) == _shared_storages(model)
        assert _features(copied) == features
        assert _capture_hooks(copied) == hooks
        np.testing.assert_equal(check(copied), want)
    np.testing.assert_equal(check(model), want)  # the original is untouched


@pytest.mark.parametrize(("arch", "tied", "bits", "group", "mode"), ARCH_CASES)
def test_text_model_pickles(arch, tied, bits, group, mode) -> None:
    model = _arch_model(arch, tied, bits, group, mode)
    assert any(f[2] for f in _features(model)[1:]) == (arch == "llama" and mode == "affine")
    _check_copies(model, _text_logits)  # fresh


@pytest.mark.parametrize(("arch", "tied", "bits", "group", "mode"), ARCH_CASES)
def test_text_model_pickles_after_forward_and_generate(
    arch, tied, bits, group, mode, monkeypatch
) -> None:
    from mlxq import _pickling

    model = _arch_model(arch, tied, bits, group, mode)
    captured = _captured(model)  # installs the output-capturing hooks
    assert _capture_hooks(model) > 0 and len(captured) > 0
    if arch == "qwen3_moe":  # hooked on mlxq's router (a made class)
        assert len(captured) == 2 * (model.config.num_hidden_layers + 1) - 1
    _check_copies(model, _captured)
    _check_copies(model, _text_logits)
    _generated(model)
    _check_copies(model, _generated)
    # loaded where no hook was named yet (another process), then pickled again
    buffer = io.BytesIO()
    torch.save(model, buffer)
    monkeypatch.setattr(_pickling, "_CAPTURE_HOOKS", {})
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert not {id(h) for m in loaded.modules() for h in m._forward_hooks.values()} & {
        id(h) for m in model.modules() for h in m._forward_hooks.values()
    }
    np.testing.assert_equal(_captured(_round_trip(loaded)), captured)


@pytest.mark.parametrize("name", VLM_CASES)
def test_image_text_model_pickles(name: str) -> None:
    from transformers import AutoModelForImageTextToText
    from vlm_models import mlxq_logits, model_inputs, tiny_mlx_vlm_checkpoint, variant_of

    path: Path = tiny_mlx_vlm_checkpoint(name, variant_of(name))
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    features = _features(model)
    if name == "gemma4":  # its embedding serves rows to the model's code
        assert any(f[4] for f in features if isinstance(f, tuple) and len(f) == 5)
    inputs = model_inputs(path, name, with_image=True)
    fresh = (_round_trip(model), copy.deepcopy(model))
    want = mlxq_logits(path, name, inputs, model=model)
    for copied in fresh:
        assert _features(copied) == features
        np.testing.assert_array_equal(mlxq_logits(path, name, inputs, model=copied), want)
    # after the first forward (LLaVA's asks its vision tower for hidden states: transformers
    # installs its output-capturing hooks there, local functions)
    assert (_capture_hooks(model) > 0) == (name == "llava")
    _check_copies(model, lambda m: mlxq_logits(path, name, inputs, model=m))


def test_loads_in_a_fresh_process(tmp_path: Path) -> None:
    """torch.load where mlxq loaded nothing yet (its attention implementation, the hooks'
    names and the made classes come back from `import mlxq` alone), after a forward."""
    import subprocess
    import sys

    model = _arch_model("llama", True, 4, 64, "affine")
    captured = _captured(model)
    assert model.config._attn_implementation == "mlxq_sdpa"
    torch.save(model, tmp_path / "model.pt")
    np.savez(tmp_path / "want.npz", *captured, logits=_text_logits(model))
    code = f"""
import sys, numpy as np, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_pickling import _captured, _text_logits
model = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
want = np.load({str(tmp_path / "want.npz")!r})
got = _captured(model)
assert len(got) == len(want.files) - 1, (len(got), want.files)
for i, array in enumerate(got):
    np.testing.assert_array_equal(array, want[f"arr_{{i}}"])
np.testing.assert_array_equal(_text_logits(model), want["logits"])
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def _saved(model, out: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    return load_file(out / "model.safetensors"), config


def _same_files(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    assert sorted(a[0]) == sorted(b[0])
    unequal = [
        k for k in a[0] if a[0][k].dtype != b[0][k].dtype or not torch.equal(a[0][k], b[0][k])
    ]
    assert not unequal, unequal[:5]
    assert a[1] == b[1]


@pytest.mark.parametrize(("arch", "tied", "bits", "group", "mode"), ARCH_CASES)
def test_text_model_saved_after_forward_and_generate(tmp_path, arch, tied, bits, group, mode):
    """What a forward, one with every output flag and generate() leave on the model
    (capture hooks, caches, flat decode plans) is not saved: the files are those of the
    freshly loaded model, and mlx-lm runs them as the checkpoint read."""
    from arch_models import Variant, tiny_mlx_checkpoint
    from mlx_models import mlx_lm_logits

    model = _arch_model(arch, tied, bits, group, mode)
    fresh = _saved(model, tmp_path / "fresh")
    _captured(model)
    _generated(model)
    after = _saved(model, tmp_path / "after")
    _same_files(after, fresh)
    source = tiny_mlx_checkpoint(arch, Variant(tied=tied, bits=bits, group_size=group, mode=mode))
    for file in source.glob("tokenizer*"):
        shutil.copy(file, tmp_path / "after")
    tokens = TOKENS[0].tolist()
    np.testing.assert_array_equal(
        mlx_lm_logits(tmp_path / "after", tokens), mlx_lm_logits(source, tokens)
    )


@pytest.mark.parametrize("name", VLM_CASES)
def test_image_text_model_saved_after_forward(tmp_path, name: str) -> None:
    """As above for image-text models (LLaVA's forward installs capture hooks): mlx-vlm runs
    the files saved after a forward as the checkpoint read."""
    from transformers import AutoModelForImageTextToText
    from vlm_models import (
        mlx_vlm_logits,
        mlxq_logits,
        model_inputs,
        tiny_mlx_vlm_checkpoint,
        variant_of,
    )

    path = tiny_mlx_vlm_checkpoint(name, variant_of(name))
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    fresh = _saved(model, tmp_path / "fresh")
    inputs = model_inputs(path, name, with_image=True)
    mlxq_logits(path, name, inputs, model=model)
    after = _saved(model, tmp_path / "after")
    _same_files(after, fresh)
    for file in path.iterdir():  # tokenizer and processor files
        if file.is_file() and not (tmp_path / "after" / file.name).exists():
            shutil.copy(file, tmp_path / "after" / file.name)
    np.testing.assert_array_equal(
        mlx_vlm_logits(tmp_path / "after", name, inputs), mlx_vlm_logits(path, name, inputs)
    )


def test_quantize_model_result_pickles_after_forward(tmp_path: Path) -> None:
    """A float model quantized by mlxq.quantize_model pickles after a forward too."""
    import mlxq
    from arch_models import tiny_float_checkpoint
    from transformers import AutoModelForCausalLM

    float_dir = tiny_float_checkpoint("qwen3_moe", tmp_path / "float", False)
    model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    mlxq.quantize_model(model, bits=4, group_size=64)
    captured = _captured(model)
    assert _capture_hooks(model) > 0
    _check_copies(model, _captured)
    np.testing.assert_equal(_captured(_round_trip(model)), captured)


def test_config_classes_that_edit_what_they_save_pickle() -> None:
    """The config subclasses mlxq makes to write config.json as mlx-lm (mlx-vlm) reads it
    (integrations/quantizer.py): what they serialize is edited, what the model reads is not,
    and a pickled config comes back as the same class, made again by its factory."""
    from mlxq.integrations import quantizer
    from transformers import Qwen3Config

    base = dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    names = {"sliding_attention": "sliding", "full_attention": "full"}
    cases = [  # (class, the key edited, its value saved)
        (quantizer._without_keys(Qwen3Config, ("rope_parameters",)), "rope_parameters", None),
        (quantizer._with_layer_type_names(Qwen3Config, names), "layer_types", ["sliding", "full"]),
        (quantizer._saving_dtype(Qwen3Config, "bfloat16"), "dtype", "bfloat16"),
    ]
    for cls, key, saved in cases:
        config = Qwen3Config(**base, dtype="float32")
        plain = Qwen3Config(**base, dtype="float32")
        config.__class__ = cls
        assert getattr(config, key) == getattr(plain, key)  # in memory: as it was
        for method in ("to_dict", "to_diff_dict"):
            want = getattr(plain, method)()
            if saved is None:
                want.pop(key, None)
            else:
                want[key] = saved
            assert getattr(config, method)() == want, (cls, method)
        copied = pickle.loads(pickle.dumps(config))
        assert type(copied) is cls and copied.to_dict() == config.to_dict()
