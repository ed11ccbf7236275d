"""Loading edge cases: stale shard indexes (local folder, mocked Hub listing), the registration
hook, config variants, and every error path naming the layer at fault."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlxq
import numpy as np
import pytest
import torch
from mlx_models import tiny_mlx_checkpoint
from mlxq.integrations import checkpoint as ckpt
from mlxq.nn import AffineLinear
from safetensors.torch import load_file, save_file

LAYER = "model.layers.0.self_attn.q_proj"
TOKENS = torch.tensor([[5, 60, 700, 8000]])


def _load(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_mlx_checkpoint("qwen3", 4, 128)


@pytest.fixture(scope="module")
def tiny_logits(tiny: Path) -> torch.Tensor:
    return _logits(_load(tiny))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(folder: Path, tensors=None, config=None) -> Path:
    """Rewrite a checkpoint copy: `tensors(dict)` edits the weights, `config(dict)` config.json."""
    if tensors is not None:
        weights = load_file(folder / "model.safetensors")
        tensors(weights)
        save_file(weights, folder / "model.safetensors", metadata={"format": "mlx"})
        (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    if config is not None:
        data = json.loads((folder / "config.json").read_text())
        config(data)
        (folder / "config.json").write_text(json.dumps(data))
    return folder


def _shard(folder: Path) -> dict[str, str]:
    """Split model.safetensors into two shards (no index); returns the true weight map."""
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    keys = sorted(weights)
    true_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: weights[k] for k in part}, folder / name, metadata={"format": "mlx"})
        true_map.update(dict.fromkeys(part, name))
    return true_map


def _stale_index(folder: Path, true_map: dict[str, str]) -> None:
    """The original float model's index: other shard names, no scales/biases entries."""
    weight_map = {k: "model-00001-of-00003.safetensors" for k in true_map if k.endswith("weight")}
    weight_map["lm_head.weight"] = "model-00003-of-00003.safetensors"
    index = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


# --- stale shard indexes -------------------------------------------------------------------


def test_stale_index_in_a_local_folder_is_rebuilt_from_the_shards(
    tiny: Path, tiny_logits: torch.Tensor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _copy(tiny, tmp_path / "ckpt")
    _stale_index(folder, _shard(folder))
    with caplog.at_level(logging.WARNING, logger="mlxq"):
        model = _load(folder)
        _load(folder)
    stale = [r for r in caplog.records if "stale" in r.getMessage()]
    assert len(stale) == 1 and str(folder) in stale[0].getMessage()  # warned once
    assert torch.equal(_logits(model), tiny_logits)


def test_index_naming_the_right_shards_but_wrong_tensors_is_rebuilt(
    tiny: Path, tiny_logits: torch.Tensor, tmp_path: Path
) -> None:
    folder = _copy(tiny, tmp_path / "ckpt")
    true_map = _shard(folder)
    wrong = {k: v for k, v in true_map.items() if not k.endswith(".biases")}  # drops tensors
    index = {"metadata": {}, "weight_map": wrong}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    files, metadata = ckpt.repair_shard_index(folder, folder / "model.safetensors.index.json")
    assert metadata["weight_map"] == true_map
    assert sorted(Path(f).name for f in files) == sorted(set(true_map.values()))
    assert torch.equal(_logits(_load(folder)), tiny_logits)


def test_correct_index_is_left_alone(tiny: Path, tmp_path: Path) -> None:
    folder = _copy(tiny, tmp_path / "ckpt")
    true_map = _shard(folder)
    index = {"metadata": {}, "weight_map": true_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert ckpt.repair_shard_index(folder, folder / "model.safetensors.index.json") is None


def test_stale_index_on_a_mocked_hub_repo(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    import transformers.modeling_utils as modeling_utils

    repo = _copy(tiny, tmp_path / "repo")  # stands in for the Hub repo's files
    true_map = _shard(repo)
    _stale_index(repo, true_map)
    listing = sorted(p.name for p in repo.iterdir()) + ["README.md", "sub/other.safetensors"]
    downloads: list[str] = []

    def list_repo_files(self, repo_id, revision=None, token=None, **kwargs):
        assert repo_id == "mlx-community/tiny-qwen3-4bit"
        return listing

    def hf_hub_download(repo_id, filename, subfolder=None, **kwargs):
        downloads.append(filename)
        return str(repo / filename)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    from mlxq.integrations import registration

    # through the hook transformers calls (the index was fetched by transformers already),
    # as during the load of an MLX checkpoint
    token = registration._loading_mlx.set(True)
    try:
        files, metadata = modeling_utils.get_checkpoint_shard_files(
            "mlx-community/tiny-qwen3-4bit", str(repo / "model.safetensors.index.json")
        )
    finally:
        registration._loading_mlx.reset(token)
    assert sorted(downloads) == sorted(set(true_map.values()))  # only real shards fetched
    assert [Path(f).parent for f in files] == [repo, repo]
    assert metadata["weight_map"] == true_map
    assert sorted(metadata["all_checkpoint_keys"]) == sorted(true_map)


# --- shards as mlx-lm reads them: every model*.safetensors, no index needed ---------------


def _split(folder: Path, names: list[str]) -> dict[str, str]:
    """Spread model.safetensors over `names` (round robin), index removed; the weight map."""
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    keys = sorted(weights)
    weight_map = {}
    for i, name in enumerate(names):
        part = keys[i :: len(names)]
        save_file({k: weights[k] for k in part}, folder / name, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(part, name))
    return weight_map


def _mlx_lm_and_mlxq_logits(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    from mlx_models import mlx_lm_logits

    return mlx_lm_logits(folder, TOKENS[0].numpy()), _logits(_load(folder))[0].numpy()


SHARDS_WITHOUT_INDEX = {
    "two-shards": ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"],
    "model-and-extra": ["model.safetensors", "model-extra.safetensors"],
}


@pytest.mark.parametrize("case", list(SHARDS_WITHOUT_INDEX))
def test_shards_without_an_index_load_as_mlx_lm_loads_them(
    tiny: Path, tiny_logits: torch.Tensor, tmp_path: Path, case: str, capsys
) -> None:
    # mlx-lm loads every model*.safetensors; transformers alone reads model.safetensors only
    # (a missing layer) or nothing (no model.safetensors)
    from mlxq.cli import main

    folder = _copy(tiny, tmp_path / case)
    _split(folder, SHARDS_WITHOUT_INDEX[case])
    ref, got = _mlx_lm_and_mlxq_logits(folder)
    assert float(np.abs(got - ref).max()) <= 1e-3
    assert torch.equal(_logits(_load(folder)), tiny_logits)
    assert main(["inspect", str(folder)]) == 0, capsys.readouterr().out[-1500:]


def test_index_with_a_shard_more_on_disk_loads_it_too(
    tiny: Path, tiny_logits: torch.Tensor, tmp_path: Path
) -> None:
    # an index naming one of two files: mlx-lm ignores the index and loads both
    folder = _copy(tiny, tmp_path / "ckpt")
    weight_map = _split(folder, ["model-00001-of-00002.safetensors", "model-extra.safetensors"])
    first = {k: v for k, v in weight_map.items() if v.startswith("model-00001")}
    index = {"metadata": {}, "weight_map": first}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    ref, got = _mlx_lm_and_mlxq_logits(folder)
    assert float(np.abs(got - ref).max()) <= 1e-3
    assert torch.equal(_logits(_load(folder)), tiny_logits)


def test_index_naming_a_missing_shard_names_the_file(tiny: Path, tmp_path: Path, capsys) -> None:
    from mlx_models import mlx_lm_logits
    from mlxq.cli import main

    folder = _copy(tiny, tmp_path / "ckpt")
    weight_map = _split(
        folder, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    )
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(KeyError):  # mlx-lm: a tensor its sanitize or load looks for
        mlx_lm_logits(folder, TOKENS[0].numpy())
    words = ["model.safetensors.index.json", "model-00002-of-00002.safetensors", "missing"]
    with pytest.raises(ValueError) as error:
        _load(folder)
    for word in words:
        assert word in str(error.value), (word, str(error.value))
    assert main(["inspect", str(folder)]) == 1
    assert main(["generate", "--model", str(folder), "--max-tokens", "2"]) == 1
    text = capsys.readouterr()
    for word in words:
        assert word in text.out and word in text.err.splitlines()[-1], word


def test_tensor_in_two_files_is_refused_by_name(tiny: Path, tmp_path: Path, capsys) -> None:
    # mlx-lm keeps the copy of whichever file its directory listing gives last
    from mlxq.cli import main

    folder = _copy(tiny, tmp_path / "ckpt")
    _split(folder, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    extra = load_file(folder / "model-00001-of-00002.safetensors")
    key = sorted(extra)[0]
    save_file({key: extra[key]}, folder / "model-extra.safetensors", metadata={"format": "mlx"})
    with pytest.raises(ValueError, match=rf"{re.escape(key)}.*model-00001-of-00002.*model-extra"):
        _load(folder)
    assert main(["inspect", str(folder)]) == 1
    assert "model-extra.safetensors" in capsys.readouterr().out


# --- registration and config variants -----------------------------------------------------


def test_older_transformers_is_refused_naming_both_versions(monkeypatch) -> None:
    """A transformers below the supported floor is refused when mlxq registers (on `import
    mlxq`, or right after transformers.modeling_utils loads), not deep inside a load."""
    import transformers
    from mlxq._transformers_version import MIN_TRANSFORMERS
    from mlxq.integrations import registration

    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    want = rf"transformers>={re.escape(MIN_TRANSFORMERS)}, but transformers 5\.17\.0 is installed"
    with pytest.raises(ImportError, match=want):
        registration.register()
    monkeypatch.setattr(transformers, "__version__", MIN_TRANSFORMERS)
    registration.register()


def test_registration_is_idempotent_and_keeps_metal() -> None:
    from mlxq.integrations import registration
    from transformers.quantizers import auto
    from transformers.quantizers.quantizer_metal import MetalHfQuantizer
    from transformers.utils.quantization_config import MetalConfig

    registration.register()
    registration.install()
    assert registration.is_registered()
    assert auto.AUTO_QUANTIZER_MAPPING["mlx"] is mlxq.integrations.MLXHfQuantizer
    assert auto.AUTO_QUANTIZER_MAPPING["metal"] is MetalHfQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["metal"] is MetalConfig
    import transformers.modeling_utils as modeling_utils

    fn = modeling_utils.get_hf_quantizer
    assert not getattr(fn.__wrapped__, "__mlxq_wrapped__", False)  # wrapped exactly once

    class Config:
        quantization_config = {"quant_method": "metal", "bits": 4, "group_size": 64}

    cfg = Config()
    registration._tag_mlx_quantization(cfg)
    assert cfg.quantization_config == {"quant_method": "metal", "bits": 4, "group_size": 64}


@pytest.mark.parametrize("order", ["mlxq-first", "hf-first", "reloaded"])
def test_only_import_mlxq_in_a_fresh_process(tiny: Path, order: str) -> None:
    if order == "hf-first":  # registers at `import mlxq`, as modeling_utils is there already
        head = "import transformers.modeling_utils, mlxq\n"
    elif order == "reloaded":  # as IPython's autoreload does: one hook, not two asking each
        # other for transformers' modules without end (RecursionError at `AutoConfig`)
        head = (
            "import importlib, mlxq, mlxq.integrations.registration as r\n"
            "importlib.reload(r).install()\n"
        )
    else:  # registers when transformers loads modeling_utils, after a fast `import mlxq`
        head = (
            "import sys, mlxq\n"
            "assert 'transformers' not in sys.modules, 'import mlxq must not import transformers'\n"
            # as slow to import as torch itself (@torch.compiler.disable at import did)
            "assert 'torch._dynamo' not in sys.modules, 'import mlxq must not import dynamo'\n"
        )
    code = head + (
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tiny)!r})\n"
        "print(type(m.model.layers[0].self_attn.q_proj).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("AffineLinear")


def test_config_with_only_the_quantization_key(
    tiny: Path, tiny_logits: torch.Tensor, tmp_path: Path
) -> None:
    folder = _edit(_copy(tiny, tmp_path / "ckpt"), config=lambda c: c.pop("quantization_config"))
    model = _load(folder, device_map="cpu")
    assert isinstance(model.model.layers[0].self_attn.q_proj, AffineLinear)
    assert torch.equal(_logits(model), tiny_logits)


def test_explicit_config_on_an_mlx_checkpoint(tiny: Path, tiny_logits: torch.Tensor) -> None:
    model = _load(tiny, quantization_config=mlxq.MLXQuantConfig(bits=4, group_size=128))
    assert torch.equal(_logits(model), tiny_logits)


def test_config_round_trip() -> None:
    raw = {"group_size": 64, "bits": 4, "mode": "affine", "a.b": {"bits": 8, "group_size": 32}}
    raw["c"] = False
    config = mlxq.MLXQuantConfig.from_dict(raw)
    assert config.mlx_dict() == raw
    assert config.to_dict() == {**raw, "quant_method": "mlx"}
    assert config.module_format("c") is None
    assert (config.module_format("a.b").bits, config.module_format("x").bits) == (8, 4)


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_affine_tensors_under_a_float_mode_load_as_mlx_lm_reads_them(
    tiny: Path, tiny_logits: torch.Tensor, tmp_path: Path, mode: str
) -> None:
    """A top-level floating-point mode over affine tensors (float scales, biases) and no
    per-module entries: mlx-lm 0.32 reads each such module's mode off its tensors
    (`infer_quant_config`: float scales are affine), and so does mlxq (it refused them)."""
    from mlx_models import mlx_lm_logits

    def to_mode(c: dict) -> None:
        c["quantization"]["mode"] = c["quantization_config"]["mode"] = mode

    folder = _edit(_copy(tiny, tmp_path / "ckpt"), config=to_mode)
    logits = _logits(_load(folder))
    assert torch.equal(logits, tiny_logits)
    ref = mlx_lm_logits(folder, TOKENS[0].numpy())
    assert float((logits[0] - torch.from_numpy(ref)).abs().max()) < 1e-3


def _drop(key: str):
    return lambda w: w.pop(key)


def _truncate(key: str):
    def edit(w: dict) -> None:
        w[key] = w[key][:, :-1].contiguous()

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop(f"{LAYER}.scales"), rf"{LAYER}.weight is packed .* {LAYER}.scales is missing"),
        (_drop(f"{LAYER}.biases"), rf"{LAYER}.biases, missing"),
        (_drop(f"{LAYER}.weight"), rf"{LAYER}.weight is missing"),
        (_truncate(f"{LAYER}.scales"), rf"layer '{LAYER}' .*mis-shaped.*scales \[128, 0\]"),
        (_truncate(f"{LAYER}.weight"), rf"layer '{LAYER}' .*mis-shaped.*weight \[128, 15\]"),
    ],
    ids=["no-scales", "no-biases", "no-weight", "short-scales", "short-weight"],
)
def test_missing_or_misshaped_tensors_name_the_layer(
    tiny: Path, tmp_path: Path, edit, message: str
) -> None:
    folder = _edit(_copy(tiny, tmp_path / "ckpt"), tensors=edit)
    with pytest.raises(ValueError, match=message):
        _load(folder)


def test_config_entry_disagreeing_with_tensors_names_the_layer(tiny: Path, tmp_path: Path):
    def entry(c: dict) -> None:
        c["quantization"][LAYER] = c["quantization_config"][LAYER] = {"bits": 8, "group_size": 128}

    folder = _edit(_copy(tiny, tmp_path / "ckpt"), config=entry)
    # names the layer, the config key and both values
    said = rf"quantization\['{LAYER}'\] says bits=8, but the tensors are stored with bits=4"
    with pytest.raises(ValueError, match=rf"layer '{LAYER}'.*{said}"):
        _load(folder)


def test_metal_checkpoints_stay_metal_unless_mlxq_is_asked(
    tiny: Path, tiny_logits: torch.Tensor, tmp_path: Path
) -> None:
    """transformers' MetalConfig format: same packing, `qbiases`, quant_method "metal"."""

    def rename(w: dict) -> None:
        for key in [k for k in w if k.endswith(".biases")]:
            w[key[: -len("biases")] + "qbiases"] = w.pop(key)

    def metal(c: dict) -> None:
        c.pop("quantization")
        c["quantization_config"] = {"quant_method": "metal", "bits": 4, "group_size": 128}

    folder = _edit(_copy(tiny, tmp_path / "ckpt"), tensors=rename, config=metal)
    # by default transformers' own MetalHfQuantizer handles it (on CPU: dequantized to float;
    # without device_map it would ask for "mps")
    default = _load(folder, device_map="cpu")
    assert not isinstance(getattr(default, "hf_quantizer", None), mlxq.integrations.MLXHfQuantizer)
    assert not any(isinstance(m, AffineLinear) for m in default.modules())
    # transformers' own dequantizer agrees with mlxq's kernels (an independent check; it rounds
    # the dequantized weights to the checkpoint's bf16, hence the looser tolerance)
    theirs = _logits(default).float()
    torch.testing.assert_close(theirs, tiny_logits, rtol=0, atol=0.02 * tiny_logits.abs().max())
    # asked for, mlxq runs it quantized on any device, with the same results as the MLX original
    model = _load(folder, quantization_config=mlxq.MLXQuantConfig())
    assert isinstance(model.model.layers[0].self_attn.q_proj, AffineLinear)
    assert torch.equal(_logits(model), tiny_logits)


def test_unsupported_device_and_mode_values(tiny: Path) -> None:
    with pytest.raises(ValueError, match="device 'cuda(:0)?' in device_map is not supported"):
        _load(tiny, device_map="cuda")
    with pytest.raises(ValueError, match="unknown MLX quantization mode 'int3'"):
        mlxq.MLXQuantConfig(mode="int3")
    with pytest.raises(ValueError, match=r"\['a'\] must be an object, true or false, got 3"):
        mlxq.MLXQuantConfig(overrides={"a": 3})
    with pytest.raises(ValueError, match="bits=7"):
        mlxq.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 8)), bits=7)


def test_header_reader_rejects_non_safetensors(tmp_path: Path) -> None:
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a safetensors file"):
        ckpt.read_header(bad)
    bad.write_bytes((10**12).to_bytes(8, "little"))
    with pytest.raises(ValueError, match="not plausible"):
        ckpt.read_header(bad)


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


# what the safetensors library refuses without naming the file ("file not fully covered",
# "invalid type: integer"), and a shape whose negative sizes multiply to the right byte count
@pytest.mark.parametrize(
    ("header", "data", "words"),
    [
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            bytes(12),
            ["cover 8", "12"],
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            bytes(12),
            ["cover 8", "12"],
        ),
        (
            {
                "__metadata__": {"format": 5},
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            },
            bytes(4),
            ["__metadata__", "'format': 5"],
        ),
        (
            {"a": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}},
            bytes(8),
            ["'a'", "[-1, -2]"],
        ),
        ({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), ["'Q4'"]),
    ],
    ids=["trailing-bytes", "gap", "metadata-not-strings", "negative-shape", "unknown-dtype"],
)
def test_header_reader_names_the_file_where_safetensors_would_not(
    tmp_path: Path, header: dict, data: bytes, words: list[str]
) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(_safetensors_bytes(header, data))
    with pytest.raises(ValueError) as error:
        ckpt.read_header(bad)
    for word in [str(bad), *words]:
        assert word in str(error.value), str(error.value)


@pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}])
def test_device_map_places_buffers(tiny: Path, device_map) -> None:
    model = _load(tiny, device_map=device_map)
    # a placement strategy means the one device mlxq runs on: mps where present, else cpu
    want = "mps" if device_map == "auto" and torch.backends.mps.is_available() else "cpu"
    assert {b.device.type for b in model.buffers()} == {want}
    model.to("cpu")
    assert np.isfinite(_logits(model).numpy()).all()


@pytest.mark.parametrize("device_map", ["meta", {"": "meta"}, torch.device("meta")])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_device_map_meta_gives_the_model_without_its_weights(tiny: Path, device_map, moe) -> None:
    """As for a float model: every tensor on the meta device with the shape and dtype a real
    load gives it (quantized layers and packed experts included), a forward of shapes, and,
    materialized (`to_empty`) and filled from a real load's state dict, mlx-lm's logits."""
    from arch_models import TOKENS as ids
    from arch_models import Variant, causal_lm_class
    from arch_models import tiny_mlx_checkpoint as tiny_arch
    from mlx_models import mlx_lm_logits

    path = tiny_arch("qwen3_moe", Variant(tied=False)) if moe else tiny
    cls = causal_lm_class("qwen3_moe" if moe else "qwen3")
    model = cls.from_pretrained(path, device_map=device_map, dtype=torch.float32)
    loaded = cls.from_pretrained(path, dtype=torch.float32)
    assert {t.device.type for t in model.state_dict().values()} == {"meta"}
    shapes = lambda m: {k: (t.shape, t.dtype) for k, t in m.state_dict().items()}  # noqa: E731
    assert shapes(model) == shapes(loaded)
    forward = lambda m, device="cpu": m(torch.tensor([ids], device=device)).logits  # noqa: E731
    with torch.no_grad():
        logits, want_shape = forward(model, "meta"), forward(loaded).shape
    assert logits.device.type == "meta" and logits.shape == want_shape
    model.to_empty(device="cpu")
    model.load_state_dict(loaded.state_dict())
    for name, buffer in loaded.named_buffers():  # not in a state dict: the rotary frequencies
        if name not in loaded.state_dict():
            model.get_submodule(name.rpartition(".")[0]).register_buffer(
                name.rpartition(".")[2], buffer.clone(), persistent=False
            )
    with torch.no_grad():
        got = forward(model)[0].numpy()
    np.testing.assert_allclose(got, mlx_lm_logits(path, ids), atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="needs an Apple GPU (MPS)")
def test_device_map_mps_and_to_match_cpu(tiny: Path, tiny_logits: torch.Tensor) -> None:
    model = _load(tiny, device_map="mps")
    assert {b.device.type for b in model.buffers()} == {"mps"}
    with torch.no_grad():
        got = model(TOKENS.to("mps")).logits.cpu()
    torch.testing.assert_close(got, tiny_logits, rtol=1e-4, atol=1e-4)
    model.to("cpu")
    assert torch.equal(_logits(model), tiny_logits)


def test_stale_index_of_a_cached_hub_repo_loads_offline(
    tiny: Path, tiny_logits: torch.Tensor, tmp_path: Path
) -> None:
    """from_pretrained("org/name", local_files_only=True) on a Hub cache whose snapshot has a
    stale index: the whole path through transformers' Hub resolution, without network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--mlx-community--tiny-qwen3-4bit"
    snapshot = _copy(tiny, repo / "snapshots" / commit)
    _stale_index(snapshot, _shard(snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = _load(
        "mlx-community/tiny-qwen3-4bit", cache_dir=str(tmp_path / "hub"), local_files_only=True
    )
    assert isinstance(model.model.layers[0].self_attn.q_proj, AffineLinear)
    assert torch.equal(_logits(model), tiny_logits)


def test_quantized_tensors_of_an_unsupported_module_are_refused(tiny: Path, tmp_path: Path):
    def quantize_norm(w: dict) -> None:  # as if a module mlxq cannot replace were quantized
        norm = "model.layers.0.input_layernorm"
        w[f"{norm}.scales"] = torch.ones(1, 4, dtype=torch.bfloat16)
        w[f"{norm}.biases"] = torch.zeros(1, 4, dtype=torch.bfloat16)

    folder = _edit(_copy(tiny, tmp_path / "ckpt"), tensors=quantize_norm)
    with pytest.raises(NotImplementedError, match=r"input_layernorm.scales: .*Qwen3RMSNorm"):
        _load(folder)


def test_scales_stored_finer_than_the_model_dtype_are_not_rounded_silently(
    tiny: Path, tmp_path: Path, caplog
) -> None:
    # `mlx_lm convert --dtype float16` stores fp16 scales and leaves the config's bfloat16: a
    # bf16 load rounds them, which mlxq says, naming the dtype that keeps them
    from transformers import AutoModelForCausalLM

    def to_fp16(weights: dict) -> None:
        for key, tensor in weights.items():
            if key.endswith((".scales", ".biases")):
                weights[key] = tensor.to(torch.float16)

    folder = _edit(_copy(tiny, tmp_path / "fp16"), tensors=to_fp16)
    with caplog.at_level(logging.WARNING, logger="mlxq"):
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    warned = [r.getMessage() for r in caplog.records if "rounds them" in r.getMessage()]
    assert len(warned) == 1 and "float16" in warned[0] and "bfloat16" in warned[0], warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mlxq"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16)
    assert not [r for r in caplog.records if "rounds them" in r.getMessage()]
    stored = load_file(folder / "model.safetensors")[f"{LAYER}.scales"]
    assert torch.equal(model.get_submodule(LAYER).scales, stored)  # kept as stored


def test_half_and_float_cast_an_mlx_model_as_to_does(tiny: Path, tiny_logits) -> None:
    """transformers' `.half()` / `.float()` refused every quantized model ("not supported for
    quantized model") while `.to(torch.float16)` casts it; an MLX model takes both now."""
    import copy

    model = _load(tiny)
    by_to = _logits(copy.deepcopy(model).to(torch.float16))
    half = model.half()
    assert half is model and model.dtype == torch.float16
    assert torch.equal(_logits(model), by_to)
    assert model.float().dtype == torch.float32
    # fp16 scales widened back to fp32 (exact), so close to the fp32 model's logits
    torch.testing.assert_close(_logits(model), tiny_logits, rtol=0, atol=2e-2)


def test_scales_beyond_float16_are_refused_at_load_and_cast(tiny: Path, tmp_path: Path) -> None:
    """A bias stored finite in bf16 but beyond float16's range: loading in float16 said "the
    checkpoint is corrupt", and `.half()` made it Inf without a word (NaN logits), after the
    layers before it were cast. Now each names the tensor or layer, and nothing is cast."""
    from transformers import AutoModelForCausalLM

    def big(w: dict) -> None:
        w[f"{LAYER}.biases"] = w[f"{LAYER}.biases"].clone()
        w[f"{LAYER}.biases"].view(-1)[5] = 1e5

    folder = _edit(_copy(tiny, tmp_path / "ckpt"), tensors=big)
    with pytest.raises(ValueError, match=rf"{LAYER}.biases \(stored BF16\) .* float16's range"):
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16)
    model = _load(folder)
    before = {k: t.dtype for k, t in model.state_dict().items()}
    with pytest.raises(TypeError, match=rf"\({LAYER}, AffineLinear.*biases .*float16's range"):
        model.half()
    assert {k: t.dtype for k, t in model.state_dict().items()} == before
    assert torch.isfinite(_logits(model.bfloat16())).all()


def test_a_cast_the_kernels_cannot_run_is_refused_at_cast_time(tiny: Path) -> None:
    """`.double()` / `.to(torch.float64)` cast an MLX model silently and its forward failed
    later ("scales must be float32, ...", no layer named); `.type(torch.float16)` cast the
    packed words too. Each is refused at the cast, naming the dtype and the first quantized
    module, with nothing cast; so is `dtype=torch.float64` at load."""
    model = _load(tiny)
    before = {k: (t.dtype, t.clone()) for k, t in model.state_dict().items()}
    for cast, what in (
        (lambda m: m.double(), "torch.float64"),
        (lambda m: m.to(torch.float64), "torch.float64"),
        (lambda m: m.to("cpu", torch.float64), "torch.float64"),
        (lambda m: m.type(torch.float16), "packed uint32 words to torch.float16"),
    ):
        with pytest.raises(TypeError, match=f"model.embed_tokens.*{what}.*nothing was cast"):
            cast(model)
    after = model.state_dict()
    assert all(after[k].dtype == d and torch.equal(after[k], t) for k, (d, t) in before.items())
    from transformers import AutoModelForCausalLM

    with pytest.raises(TypeError, match="cannot load in torch.float64"):
        AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float64)
    # a layer outside transformers refuses it too, before its own tensors are cast
    layer = AffineLinear(64, 32, bits=4, group_size=32, dtype=torch.float32)
    with pytest.raises(TypeError, match="quantized AffineLinear: .*torch.float64"):
        layer.double()
    assert layer.scales.dtype == torch.float32 and layer.weight.dtype == torch.uint32
    assert layer.bfloat16().scales.dtype == torch.bfloat16  # the kernels' dtypes still cast
