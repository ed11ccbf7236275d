"""Malformed MLX checkpoints: from_pretrained, `mlxq inspect` and `mlxq generate` each say which
file, tensor or key is wrong (never random weights, garbage output or a bare traceback)."""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlx_models import tiny_mlx_checkpoint
from safetensors.torch import load_file, save_file

LAYER = "model.layers.1.mlp.down_proj"
UNEXPECTED_BIAS = "model.layers.0.self_attn.q_proj.bias"  # Qwen3's attention has no bias


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_mlx_checkpoint("qwen3", 4, 64)


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _tensors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        weights = load_file(folder / "model.safetensors")
        edit(weights)
        save_file(weights, folder / "model.safetensors", metadata={"format": "mlx"})

    return apply


def _drop(*keys: str):
    return _tensors(lambda w: [w.pop(k) for k in keys])


def _poison(key: str, value: float):
    def edit(w: dict) -> None:
        w[key] = w[key].clone()
        w[key].view(-1)[3] = value

    return _tensors(edit)


def _add(key: str, shape: tuple[int, ...]):
    """A float tensor the model has no place for (bf16, as the checkpoint's float tensors)."""
    return _tensors(lambda w: w.update({key: torch.ones(shape, dtype=torch.bfloat16)}))


def _as_int32(key: str):
    return _tensors(lambda w: w.update({key: w[key].to(torch.int32)}))


def _raw(edit: Callable[[bytearray], bytes]):
    def apply(folder: Path) -> None:
        file = folder / "model.safetensors"
        file.write_bytes(edit(bytearray(file.read_bytes())))

    return apply


def _header_edit(change: Callable[[dict], None]):
    def edit(data: bytearray) -> bytes:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
        change(header)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + bytes(data[8 + size :])

    return edit


def _overlap(header: dict) -> None:
    """The second tensor in the file starts where the first does."""
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )
    (a_begin, _), (b_begin, b_end) = (header[k]["data_offsets"] for k in names[:2])
    header[names[1]]["data_offsets"] = [a_begin, a_begin + b_end - b_begin]


def _config(change: Callable[[dict], object]):
    def apply(folder: Path) -> None:
        data = json.loads((folder / "config.json").read_text())
        data = change(data) or data
        (folder / "config.json").write_text(json.dumps(data))

    return apply


def _index(content) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps(content))

    return apply


def _index_without_shards(folder: Path) -> None:
    """A right index whose only shard is gone (a copy of the small files only)."""
    names = load_file(folder / "model.safetensors")
    weight_map = dict.fromkeys(names, "model.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "model.safetensors").unlink()


def _sharded_save_over_single(folder: Path) -> None:
    """What a sharded save_pretrained leaves over a single-file one: model.safetensors stays
    beside the new shards and their index (transformers reads model.safetensors alone)."""
    names = load_file(folder / "model.safetensors")
    shutil.copy(folder / "model.safetensors", folder / "model-00001-of-00001.safetensors")
    weight_map = dict.fromkeys(names, "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


_QUANTIZATION_KEYS = ("quantization", "quantization_config")


def _bits_four(data: dict) -> None:
    for key in _QUANTIZATION_KEYS:
        data[key][LAYER] = {"bits": "four"}


def _without(key: str) -> Callable[[dict], None]:
    """The quantization block less one of the keys mlx-lm requires (it raises KeyError)."""

    def change(data: dict) -> None:
        for block in _QUANTIZATION_KEYS:
            data[block].pop(key)

    return change


def _one_layer(data: dict) -> None:
    """config.json of the first layer only (the checkpoint holds two)."""
    data.update(num_hidden_layers=1, layer_types=data["layer_types"][:1])


def _no_quantization(data: dict) -> None:
    data.pop("quantization", None)
    data.pop("quantization_config", None)


# case -> (edit, words the error must contain)
CASES = {
    "missing-layer": (
        _drop(f"{LAYER}.weight", f"{LAYER}.scales", f"{LAYER}.biases"),
        [f"{LAYER}.weight", "lacks"],
    ),
    "missing-norm": (_drop("model.norm.weight"), ["model.norm.weight", "lacks"]),
    # float tensors the model has no place for: transformers drops them without a word,
    # mlx-lm's strict load refuses them (a bias the config turns off changes the logits)
    "unexpected-bias": (
        _add(f"{UNEXPECTED_BIAS}", (128,)),
        [UNEXPECTED_BIAS, "no place for"],
    ),
    "stray-tensor": (_add("model.extra_scale", (3,)), ["model.extra_scale", "no place for"]),
    "nan-scales": (_poison(f"{LAYER}.scales", float("nan")), [f"{LAYER}.scales", "non-finite"]),
    "inf-biases": (_poison(f"{LAYER}.biases", float("inf")), [f"{LAYER}.biases", "non-finite"]),
    "int32-scales": (_as_int32(f"{LAYER}.scales"), [f"{LAYER}.scales", "I32"]),
    "header-not-json": (
        _raw(lambda d: d[:8] + b"{not json" + bytes(d[17:])),
        ["model.safetensors", "not JSON"],
    ),
    "truncated": (_raw(lambda d: bytes(d[: len(d) - 1000])), ["model.safetensors", "offsets"]),
    "overlapping": (_raw(_header_edit(_overlap)), ["model.safetensors", "overlap"]),
    "bits-four": (
        _config(_bits_four),
        [LAYER, "'bits'", "'four'"],
    ),
    "config-list": (_config(lambda c: [c]), ["config.json", "list"]),
    "index-list": (_index([]), ["model.safetensors.index.json", "weight_map"]),
    "index-weight-map-list": (_index({"weight_map": []}), ["index.json", "weight_map"]),
    "index-int-values": (_index({"weight_map": {"a": 1}}), ["index.json", "weight_map"]),
    # before: a bare FileNotFoundError from reading the header of the absent shard
    "index-without-shards": (_index_without_shards, ["no model*.safetensors"]),
    # before: loaded model.safetensors alone, the older model (silently)
    "sharded-save-over-single": (_sharded_save_over_single, ["in two files", "model.safetensors"]),
    "no-quantization-block": (_config(_no_quantization), ["packed", "quantization"]),
    "quantization-list": (
        _config(lambda c: c.update(quantization=[4], quantization_config=[4])),
        ["config.json quantization must be an object"],
    ),
    "no-bits": (_config(_without("bits")), ["quantization", "lacks 'bits'"]),
    "no-group-size": (_config(_without("group_size")), ["quantization", "lacks 'group_size'"]),
    # before: from_pretrained raised "look at the above report", a report `mlxq generate` does
    # not show, and `mlxq inspect` found no problem
    "float-misshaped": (
        _tensors(lambda w: w.update({"model.norm.weight": w["model.norm.weight"][:-1].clone()})),
        ["model.norm.weight", "[127]", "[128]"],
    ),
    # before: loaded, and every logit was NaN (NaN in scales and biases was refused already)
    "nan-norm": (_poison("model.norm.weight", float("nan")), ["model.norm.weight", "non-finite"]),
    # before: `mlxq generate` printed only the first line of transformers' validation error,
    # "Validation error for field 'hidden_size':", and `mlxq inspect` a traceback's last line
    "config-wrong-type": (
        _config(lambda c: c.update(hidden_size="128")),
        ["config.json", "hidden_size", "got str"],
    ),
    # before: from_pretrained and `mlxq generate` said mlxq runs quantized nn.Linear and
    # nn.Embedding modules only, "module 'model.layers.1.mlp.down_proj' (no such module)"
    "fewer-layers": (
        _config(_one_layer),
        [f"{LAYER}.scales", "Qwen3ForCausalLM has no", "does config.json describe"],
    ),
    # before: transformers' "has no `quant_method` attribute" from from_pretrained and `mlxq
    # generate` ("quantized with quant_method None, not MLX affine"), and `mlxq inspect` found no
    # error ("not an MLX checkpoint")
    "quantization-empty": (
        _config(lambda c: c.update(quantization={}, quantization_config={})),
        ["config.json quantization lacks 'group_size' (it has [])"],
    ),
}


def _broken(tiny: Path, tmp_path: Path, case: str) -> Path:
    folder = tmp_path / case
    shutil.copytree(tiny, folder)
    edit, _ = CASES[case]
    edit(folder)
    return folder


# transformers' own config loading fails on these before mlxq is asked (a list as the config,
# or as its quantization_config: AttributeError in transformers' config repr; a field of the
# wrong type: huggingface_hub's validation error)
@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c not in ("config-list", "quantization-list", "config-wrong-type")],
)
def test_from_pretrained_names_what_is_wrong(tiny: Path, tmp_path: Path, case: str) -> None:
    folder = _broken(tiny, tmp_path, case)
    words = CASES[case][1]
    if case == "no-quantization-block":  # a float load of packed weights: transformers' error
        words = []
    with pytest.raises((ValueError, NotImplementedError, RuntimeError, OSError)) as error:
        _load(folder)
    for word in words:
        assert word in str(error.value), (word, str(error.value)[:500])


# the loader's own refusals (`mlxq generate` loads through from_pretrained; inspect reported
# these folders already): left out here, where each case costs two CLI runs
LOADER_ONLY = ("index-without-shards", "sharded-save-over-single")
CLI_CASES = [c for c in CASES if c not in LOADER_ONLY]


@pytest.fixture(scope="module")
def cli_runs(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`mlxq inspect` and `mlxq generate` of every broken folder, all in one new process
    (tests/cli_batch.py: a process each imported torch and transformers 2 x 23 times)."""
    from cli_batch import run_cli_batch

    argvs = {}
    for case in CLI_CASES:
        folder = _broken(tiny, tmp_path_factory.mktemp("cli"), case)
        argvs[f"{case}:inspect"] = ["inspect", str(folder)]
        argvs[f"{case}:generate"] = ["generate", "--model", str(folder), "--max-tokens", "2"]
    return run_cli_batch(argvs)


@pytest.mark.parametrize("case", CLI_CASES)
def test_inspect_and_generate_name_what_is_wrong(cli_runs: dict, case: str) -> None:
    words = CASES[case][1]
    report = cli_runs[f"{case}:inspect"]
    assert report.returncode == 1, report.stdout + report.stderr
    text = report.stdout + report.stderr
    for word in words:
        assert word in text, (word, text[-2000:])
    gen = cli_runs[f"{case}:generate"]
    assert gen.returncode == 1 and "Traceback" not in gen.stderr, gen.stderr[-2000:]
    line = gen.stderr.strip().splitlines()[-1]
    assert line.startswith("mlxq: error:")
    for word in words:
        assert word in line, (word, line)


# --- floating-point modes: scale bytes that decode to NaN or Inf -------------------------------

# (mode, the stored scale byte): E8M0 0xFF is 2^128 (Inf in fp32; NaN in the OCP spec), E4M3
# 0x7F and 0xFF are NaN. mlx-lm loads these and computes NaN logits.
FP_NAN_SCALES = [("mxfp4", 0xFF), ("mxfp8", 0xFF), ("nvfp4", 0x7F), ("nvfp4", 0xFF)]


def _fp_checkpoint(mode: str) -> Path:
    from arch_models import Variant
    from arch_models import tiny_mlx_checkpoint as arch_checkpoint

    group_size, bits = {"mxfp4": (32, 4), "mxfp8": (32, 8), "nvfp4": (16, 4)}[mode]
    return arch_checkpoint(
        "llama", Variant(tied=mode != "nvfp4", bits=bits, group_size=group_size, mode=mode)
    )


@pytest.mark.parametrize(("mode", "code"), FP_NAN_SCALES, ids=lambda v: str(v))
def test_float_mode_scale_that_is_not_finite_is_named(
    tmp_path: Path, mode: str, code: int, capsys
) -> None:
    from mlxq.cli import main

    folder = tmp_path / "ckpt"
    shutil.copytree(_fp_checkpoint(mode), folder)
    key = f"{LAYER}.scales"

    def edit(w: dict) -> None:
        w[key] = w[key].clone()
        w[key].view(-1)[5] = code

    _tensors(edit)(folder)
    with pytest.raises(ValueError, match=rf"{key} has 1 non-finite .*{mode}.*index \[0, 5\]"):
        _load(folder)
    assert main(["inspect", str(folder)]) == 1
    out = capsys.readouterr().out
    assert key in out and "non-finite" in out, out[-2000:]


# --- a tied config whose checkpoint holds head tensors -----------------------------------------

# a model's own head beside a tied config: mlx-lm's model for most has no head of its own
# (its strict load refuses the stored one), and mlxq refuses it by name instead of loading an
# untied head; some build the head whatever the config says and run the stored one (mlxq's
# MLX_LM_KEEPS_STORED_HEAD), as mlxq does. Each case asserts both halves against mlx-lm.
TIED_HEAD_ARCHS = {
    "llama": "lm_head",
    "qwen3_moe": "lm_head",
    "gemma4_text": "lm_head",
    "qwen3_5": "language_model.lm_head",
    "phi": None,  # None: mlx-lm keeps the stored head
    "gemma3_text": None,
    "gpt_neox": None,
    "qwen2_moe": None,
    "solar_open": None,
}


def _untied_with_tied_config(arch: str, folder: Path) -> Path:
    """mlx-lm's conversion of the tiny untied `arch` model, config.json then saying tied."""
    from arch_models import VARIANTS, Variant
    from arch_models import tiny_mlx_checkpoint as arch_checkpoint

    try:
        path = arch_checkpoint(arch, VARIANTS[1])
    except ValueError as error:  # no down_proj for the mixed recipe (as run_arch falls back)
        if "expected keys for mixed quant" not in str(error):
            raise
        path = arch_checkpoint(arch, Variant(tied=False, bits=3, group_size=32))
    shutil.copytree(path, folder)

    def tie(config: dict) -> None:
        for cfg in (config, config.get("text_config") or {}):
            cfg["tie_word_embeddings"] = True

    _config(tie)(folder)
    return folder


@pytest.mark.parametrize("arch", list(TIED_HEAD_ARCHS))
def test_tied_config_with_stored_head_does_what_mlx_lm_does(
    tmp_path: Path, arch: str, capsys
) -> None:
    from arch_models import TOKENS, mlxq_logits
    from mlx_models import mlx_lm_logits
    from mlxq.cli import main

    folder = _untied_with_tied_config(arch, tmp_path / arch)
    head = TIED_HEAD_ARCHS[arch]
    if head is None:
        ref = mlx_lm_logits(folder, TOKENS)
        got = mlxq_logits(folder, TOKENS)
        assert float(abs(got - ref).max()) <= 1e-3
        assert main(["inspect", str(folder)]) == 0
        return
    with pytest.raises(ValueError, match=rf"(?s)not in model:.*{head}\.scales"):
        mlx_lm_logits(folder, TOKENS)
    words = ["tie_word_embeddings: true", f"{head}.scales", f"{head}.biases", f"{head}.weight"]
    with pytest.raises(ValueError) as error:
        _load(folder)
    for word in words:
        assert word in str(error.value), (word, str(error.value))
    assert main(["inspect", str(folder)]) == 1
    assert main(["generate", "--model", str(folder), "--max-tokens", "2"]) == 1
    text = capsys.readouterr()
    for word in words:
        assert text.out.count(word) == 1 and word in text.err.splitlines()[-1], word


@pytest.mark.parametrize("case", ["unexpected-bias", "stray-tensor"])
def test_mlx_lm_refuses_tensors_the_model_has_no_place_for(
    tiny: Path, tmp_path: Path, case: str
) -> None:
    from mlx_models import mlx_lm_logits

    folder = _broken(tiny, tmp_path, case)
    with pytest.raises(ValueError, match=rf"(?s)not in model:.*{re.escape(CASES[case][1][0])}"):
        mlx_lm_logits(folder, [1, 5, 77])


def test_rotary_inv_freq_is_dropped_as_mlx_lm_drops_it(tmp_path: Path, capsys) -> None:
    # an older checkpoint's rotary buffer: mlx-lm's Llama sanitize drops it on purpose, and
    # transformers too (its own rule), so both load it
    from arch_models import TOKENS, Variant, mlxq_logits
    from arch_models import tiny_mlx_checkpoint as arch_checkpoint
    from mlx_models import mlx_lm_logits
    from mlxq.cli import main

    folder = tmp_path / "ckpt"
    shutil.copytree(arch_checkpoint("llama", Variant(tied=False)), folder)
    key = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _tensors(lambda w: w.update({key: torch.rand(16)}))(folder)
    ref = mlx_lm_logits(folder, TOKENS)
    assert float(abs(mlxq_logits(folder, TOKENS) - ref).max()) <= 1e-3
    assert main(["inspect", str(folder)]) == 0, capsys.readouterr().out[-1500:]


def test_empty_quantization_config_beside_quantization_loads_as_mlx_lm(
    tiny: Path, tmp_path: Path
) -> None:
    # mlx-lm reads `quantization` and never an empty `quantization_config` beside it; before,
    # transformers read the empty one and refused the checkpoint ("no `quant_method`")
    from mlx_models import mlx_lm_logits
    from mlxq.cli import main

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny, folder)
    _config(lambda c: c.update(quantization_config={}))(folder)
    tokens = [1, 5, 77, 300]
    with torch.no_grad():
        got = _load(folder)(torch.tensor([tokens])).logits[0].numpy()
    assert float(abs(got - mlx_lm_logits(folder, tokens)).max()) <= 1e-3
    assert main(["inspect", str(folder)]) == 0
