"""mlxq.convert called directly: tiny float models to MLX checkpoints (compared with mlx-lm's
convert), and no half-written output when it is interrupted."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from mlx_models import TEST_CACHE, tiny_float_model
from mlxq import demo_model
from mlxq.convert import convert_checkpoint, recipe_overrides
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def tiny_float(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_float_model("qwen3", tmp_path_factory.mktemp("float") / "qwen3")


def test_convert_matches_mlx_lm_convert(tiny_float: Path, tmp_path: Path) -> None:
    from mlx_lm import convert

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    summary = convert_checkpoint(tiny_float, ours, bits=3, group_size=32)
    convert(str(tiny_float), str(theirs), quantize=True, q_group_size=32, q_bits=3)
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert sorted(a) == sorted(b)
    for key in b:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    q = json.loads((ours / "config.json").read_text())["quantization"]
    assert q == json.loads((theirs / "config.json").read_text())["quantization"]
    assert (
        summary.quantized > 0
        and summary.bytes_written == (ours / "model.safetensors").stat().st_size
    )


def test_recipe_entries_with_null_group_size(tiny_float: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_float)
    entries = recipe_overrides(model, "mixed_3_6", None)
    assert entries and all(e["group_size"] is None for e in entries.values())
    assert {e["bits"] for e in entries.values()} == {3, 6}


def test_interrupted_convert_leaves_no_output(
    tiny_float: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained

    def save_then_die(self, folder, *args, **kwargs):
        original(self, folder, *args, **kwargs)
        raise KeyboardInterrupt  # as a kill right after the weights were written

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_die)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(tiny_float, out, bits=4, group_size=64)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left either


def test_stale_staging_folders_of_the_model_cache_are_removed(tmp_path: Path) -> None:
    models = tmp_path / "models"
    stale, fresh = models / ".tag-abc123", models / ".tag-def456"
    for folder in (stale, fresh):
        (folder / "model").mkdir(parents=True)
    old = time.time() - 7 * 3600
    os.utime(stale, (old, old))

    def build(out: Path) -> None:
        out.mkdir()
        (out / "config.json").write_text("{}")

    final = demo_model._cached_build("tag", build, tmp_path)
    assert (final / "config.json").is_file()
    assert not stale.exists() and fresh.exists()  # a recent one may be a concurrent build


def test_test_cache_is_under_the_mlxq_cache() -> None:
    if "MLXQ_TEST_CACHE" not in os.environ:
        assert TEST_CACHE == demo_model.mlxq_cache_dir() / "tests"


_CAST_PROBES = [
    f"model.layers.0.{leaf}"
    for leaf in (
        "mlp.gate.e_score_correction_bias", "mixer.A_log", "linear_attn.dt_bias",
        "mlp.expert_bias", "mlp.router_bias", "attn_hc.fn", "ffn_hc.fn", "self_attn.sinks",
        "attn.compressor.wkv", "a_alpha", "a_beta", "self_attn.q_proj.weight", "mlp.gate.weight",
    )
]  # fmt: skip


def test_cast_keep_tables_follow_the_converters_cast_predicates() -> None:
    """MLX_LM_CAST_KEEP / MLX_VLM_CAST_KEEP say which float tensors `mlx_lm convert` /
    `mlx_vlm convert` leave uncast: each model class's cast_predicate (that needs no instance)
    keeps the same probe names (nemotron_h's A_log and glm_moe_dsa's bias were missing)."""
    import importlib
    import pkgutil

    from mlxq.integrations.mlx_lm_layout import MLX_LM_CAST_KEEP
    from mlxq.integrations.mlx_vlm_layout import MLX_VLM_CAST_KEEP, VLM_LAYOUTS

    def kept_by(model_class) -> list[str] | None:
        prop = getattr(model_class, "cast_predicate", None)
        if prop is None:
            return []
        try:  # most build their predicate without touching self
            predicate = prop.fget(None)
            return [p for p in _CAST_PROBES if not predicate(p)]
        except AttributeError:  # delegates to its language model (an instance)
            return None

    mlx_lm_models = pytest.importorskip("mlx_lm.models")
    checked, wrong = 0, []
    for info in pkgutil.iter_modules(mlx_lm_models.__path__):
        try:
            module = importlib.import_module(f"mlx_lm.models.{info.name}")
        except (ImportError, SystemExit):  # olmo exits without its package
            continue
        kept = kept_by(getattr(module, "Model", None))
        if kept is None:
            continue
        ours = MLX_LM_CAST_KEEP.get(info.name, ())
        checked += 1
        if kept != [p for p in _CAST_PROBES if any(k in p for k in ours)]:
            wrong.append((info.name, kept))
    for model_type in VLM_LAYOUTS:
        try:
            module = importlib.import_module(f"mlx_vlm.models.{model_type}")
        except ImportError:
            continue
        model_class = getattr(module, "Model", None)
        kept = kept_by(model_class)
        if kept is None:  # Model.cast_predicate returns its language model's
            kept = kept_by(getattr(module, "LanguageModel", None))
        ours = MLX_VLM_CAST_KEEP.get(model_type, ())
        checked += 1
        if kept != [p for p in _CAST_PROBES if any(k in p for k in ours)]:
            wrong.append((model_type, kept))
    assert checked > 20 and not wrong, wrong


def _float_with_stored_dtypes(
    folder: Path, arch: str, dtype: torch.dtype, base: torch.dtype = torch.bfloat16, head=True
) -> Path:
    """A tiny `base` float checkpoint whose norms (and head) are stored in `dtype` (values
    bf16 does not hold), its config.json without `dtype` (mlx_lm convert casts nothing)."""
    from arch_models import tiny_float_checkpoint
    from safetensors.torch import save_file

    src = tiny_float_checkpoint(arch, folder, tied=False)
    tensors = load_file(src / "model.safetensors")
    generator = torch.Generator().manual_seed(3)
    for name, t in tensors.items():
        if "norm" in name or (head and name == "lm_head.weight"):
            noise = 1e-3 * torch.rand(t.shape, generator=generator)
            tensors[name] = (t.float() + noise).to(dtype)
        else:
            tensors[name] = t.to(base)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.pop("dtype", None)
    (src / "config.json").write_text(json.dumps(config))
    return src


def _ours_and_mlx_lm_convert(src: Path, tmp_path: Path, **dtype: str) -> dict[str, dict]:
    """mlxq convert and mlx_lm convert of `src` (4-bit g32, `dtype=` to both where given):
    asserts the same tensors (names, dtypes, values); returns mlx_lm's."""
    from mlx_lm import convert

    convert_checkpoint(src, tmp_path / "ours", bits=4, group_size=32, **dtype)
    convert(str(src), str(tmp_path / "theirs"), quantize=True, q_group_size=32, q_bits=4, **dtype)
    a = load_file(tmp_path / "ours" / "model.safetensors")
    b = load_file(tmp_path / "theirs" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for key in b:
        assert (a[key].dtype, a[key].shape) == (b[key].dtype, b[key].shape), key
        assert torch.equal(a[key], b[key]), key
    return b


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])  # quantized while it loads / whole
@pytest.mark.parametrize("base", [torch.bfloat16, torch.float32])
def test_convert_keeps_stored_dtypes_without_torch_dtype(
    arch: str, base: torch.dtype, tmp_path: Path
) -> None:
    """A float checkpoint with fp32 norms and head beside bf16 weights and no `dtype` in its
    config.json: mlx_lm convert casts nothing, so every tensor keeps its stored dtype (the
    fp32 head quantizes to fp32 scales). mlxq wrote bf16 norms (transformers' one dtype).
    Likewise bf16 norms beside fp32 weights (mlxq wrote fp32 norms); a bf16 head there, which
    MLX quantizes in bf16, is refused by name."""
    other = torch.float32 if base == torch.bfloat16 else torch.bfloat16
    if base == torch.float32:
        src = _float_with_stored_dtypes(tmp_path / "head", arch, other, base)
        with pytest.raises(ValueError, match=r"lm_head.weight stored in bfloat16 beside a float32"):
            convert_checkpoint(src, tmp_path / "refused", bits=4, group_size=32)
    src = _float_with_stored_dtypes(
        tmp_path / "float", arch, other, base, head=base == torch.bfloat16
    )
    theirs = _ours_and_mlx_lm_convert(src, tmp_path)
    assert theirs["model.norm.weight"].dtype == other  # the case under test


def test_saved_dtype_is_the_one_mlx_lm_convert_keeps(tmp_path: Path) -> None:
    """A float checkpoint of bf16 weights beside fp32 norms and head under transformers 5's
    `dtype: bfloat16` (which mlx_lm convert keeps in config.json, casting nothing): mlxq
    convert, and a save after quantizing while it loads, write that dtype too. Before:
    float32 (transformers writes its first float parameter's dtype, an fp32 norm's)."""
    from arch_models import causal_lm_class
    from mlxq import MLXQuantConfig

    src = _float_with_stored_dtypes(tmp_path / "float", "qwen3", torch.float32)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    _ours_and_mlx_lm_convert(src, tmp_path)  # (the same tensors, fp32 norms and head kept)
    saved = lambda folder: json.loads((folder / "config.json").read_text())["dtype"]  # noqa: E731
    assert saved(tmp_path / "theirs") == "bfloat16"
    assert saved(tmp_path / "ours") == "bfloat16"
    model = causal_lm_class("qwen3").from_pretrained(src, quantization_config=MLXQuantConfig(4, 32))
    assert model.model.norm.weight.dtype == torch.float32  # the case under test
    model.save_pretrained(tmp_path / "saved")
    assert saved(tmp_path / "saved") == "bfloat16"


def test_device_map_meta_quantizing_on_load_gives_a_real_loads_tensors(tmp_path: Path) -> None:
    """device_map="meta" while a float checkpoint quantizes on load (fp32 norms and head kept
    as stored): every tensor on meta with the shape and dtype of a real load's. Before: each
    layer's quantization failed ('Tensor.item() cannot be called on meta tensors')."""
    from arch_models import causal_lm_class
    from mlxq import MLXQuantConfig

    src = _float_with_stored_dtypes(tmp_path / "float", "qwen3", torch.float32)
    load = lambda **kw: causal_lm_class("qwen3").from_pretrained(  # noqa: E731
        src, quantization_config=MLXQuantConfig(4, 32), **kw
    )
    meta, real = load(device_map="meta").state_dict(), load().state_dict()
    assert {t.device.type for t in meta.values()} == {"meta"}
    assert real["lm_head.scales"].dtype == real["model.norm.weight"].dtype == torch.float32
    assert {k: (t.shape, t.dtype) for k, t in meta.items()} == {
        k: (t.shape, t.dtype) for k, t in real.items()
    }


def test_convert_with_a_dtype_casts_every_tensor(tmp_path: Path) -> None:
    # --dtype bfloat16 (from_pretrained's dtype=): every float tensor cast, as mlx_lm convert
    # --dtype bfloat16 does; and without one, a float16 tensor beside the bf16 model (which
    # mlx-lm would keep float16) is refused by name
    src = _float_with_stored_dtypes(tmp_path / "float", "qwen3", torch.float16)
    with pytest.raises(ValueError, match=r"lm_head.weight, model.layers.0.*stored in float16"):
        convert_checkpoint(src, tmp_path / "refused", bits=4, group_size=32)
    theirs = _ours_and_mlx_lm_convert(src, tmp_path, dtype="bfloat16")
    assert theirs["model.norm.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])  # quantized while it loads / whole
def test_convert_to_float32_casts_bf16_norms(arch: str, tmp_path: Path) -> None:
    # --dtype float32 of a bf16 checkpoint without torch_dtype: every tensor float32, as
    # mlx_lm convert --dtype float32 writes (the stored dtypes are kept only without --dtype)
    src = _float_with_stored_dtypes(tmp_path / "float", arch, torch.bfloat16)
    theirs = _ours_and_mlx_lm_convert(src, tmp_path, dtype="float32")
    assert theirs["model.norm.weight"].dtype == torch.float32
