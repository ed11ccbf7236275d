"""Float transformers checkpoint -> MLX checkpoint (what `mlx_lm.convert -q` writes, or
`mlx_vlm.convert -q` for an image-text model), in torch.

The float model is loaded by transformers with an :class:`~mlxq.integrations.MLXQuantConfig`,
which quantizes each layer as its weight is read (bit-exact with `mlx.nn.quantize`, and the
same tensors as :func:`mlxq.quantize_model`; the float model is never whole in memory), and
saved with `save_pretrained`, which writes the MLX tensors and the
`quantization` block mlx-lm reads. A mixture-of-experts model is loaded in float and then
quantized whole by :func:`mlxq.quantize_model` (transformers fuses the per-expert tensors as it
reads them, which the streaming path cannot quantize yet). mlx-lm's mixed recipes
(``mixed_3_6`` ...) are reproduced module by module, so the per-module entries in config.json
are the ones mlx-lm would write (MoE models too: routers, and each stacked projection).

An image-text model (a config with a vision_config) is loaded by transformers' image-text
class and written as `mlx_vlm convert -q` writes it: vision tower and projectors float,
mlx-vlm's names, its model class's rule, the source's JSON files and processor beside it;
mlx-vlm's mixed recipes (its own rule, :func:`mlx_vlm_recipe_overrides`) likewise.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from mlxq.format import MODE_DEFAULTS, check_quantization, find_quantization
from mlxq.model_walk import mlx_lm_float_modules, mlx_lm_model_entries, plan_modules
from mlxq.quantize_model import latent_kv_b_parts, quantize_model

__all__ = [
    "RECIPES",
    "VLM_RECIPES",
    "recipe_overrides",
    "mlx_vlm_recipe_overrides",
    "recipe_arguments",
    "convert_checkpoint",
    "ConvertSummary",
]

# recipe -> (low bits, high bits), as in mlx-lm 0.32 (mlx_lm/convert.py)
RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6)}
# and for image-text models, as in mlx-vlm 0.7.10 (mlx_vlm/convert.py QUANT_RECIPES)
VLM_RECIPES = {
    "mixed_2_6": (2, 6),
    "mixed_3_4": (3, 4),
    "mixed_3_5": (3, 5),
    "mixed_3_6": (3, 6),
    "mixed_3_8": (3, 8),
    "mixed_4_6": (4, 6),
    "mixed_4_8": (4, 8),
}
_DTYPES = ("float16", "bfloat16", "float32")


def _recipe_modules(model: nn.Module) -> list[tuple[str, int, int]]:
    """(name, input width, width along MLX's weight axis 1) of each layer an MLX converter
    may quantize, named as mlxq's entries name them: latent attention's `kv_b_proj` as its
    two per-head parts, fused experts as one stack per projection (`[E, out, in]` in MLX, so
    axis 1 is the output width), routers mlx-lm holds in no linear layer left out."""
    from mlxq.integrations.mlx_vlm_layout import tied_head_mlx_vlm_writes

    # a tied head is not listed: in MLX it is the embedding itself (no module, no entry)
    walk = plan_modules(model, lambda name, plan: None)
    float_routers = set(mlx_lm_float_modules(model))
    latent = latent_kv_b_parts(model)  # stored by the converters as two per-head layers
    modules: list[tuple[str, int, int]] = []
    for m in walk.modules:
        if m.name in latent:  # MultiLinear weights [heads, out, in]
            _, nope, v, rank = latent[m.name]
            modules += [(f"{m.name}.embed_q", nope, rank), (f"{m.name}.unembed_out", rank, v)]
        elif m.swap is not None:
            modules.append((m.name, m.swap.in_features, m.swap.in_features))
        elif m.moe.kind == "router":
            if m.name not in float_routers:
                modules.append((m.name, m.moe.in_features, m.moe.in_features))
        else:  # gate/up read the hidden size, down the intermediate size
            hidden, inner = m.moe.in_features, m.moe.out_features
            for p in m.moe.projections:
                down = p == "down_proj"
                modules.append(
                    (f"{m.name}.{p}", inner if down else hidden, hidden if down else inner)
                )
    head = tied_head_mlx_vlm_writes(model)  # Gemma 3's: a layer of its own in mlx-vlm
    if head is not None:
        width = model.get_submodule(head).weight.shape[-1]
        modules.append((head, width, width))
    return modules


def recipe_overrides(
    model: nn.Module, recipe: str, group_size: int | None
) -> dict[str, dict | bool]:
    """Per-module formats of one of mlx-lm's mixed recipes (llama.cpp Q*_K_M-like choices), or
    of mlx-vlm's for an image-text model (:func:`mlx_vlm_recipe_overrides`).

    The first and last eighth of the layers, and every third layer between, keep `v_proj` and
    `down_proj` at the high bit width; `lm_head` always gets the high width; everything else
    the low one. The names are read as mlx-lm names the modules (Llama 4's head is `output`:
    low bits; MoE experts' `switch_mlp.down_proj`: high bits in those layers). Only modules
    mlx-lm would quantize get an entry (input width a multiple of the group size; routers
    mlx-lm holds in a linear layer; each stacked projection of fused experts, under
    `<experts>.gate_proj` ...). A `group_size` of None is written as null, as mlx-lm writes it
    when no group size was asked for (and read as the mode's default, 64).
    """
    from mlxq.integrations.mlx_lm_layout import mlx_lm_module_names
    from mlxq.integrations.mlx_vlm_layout import is_image_text

    if is_image_text(getattr(model, "config", None)):
        return mlx_vlm_recipe_overrides(model, recipe, group_size)
    if recipe not in RECIPES:
        hint = " (an mlx-vlm recipe: image-text models only)" if recipe in VLM_RECIPES else ""
        raise ValueError(
            f"mlxq: unknown recipe {recipe!r}{hint}; choose one of {', '.join(RECIPES)}"
        )
    low, high = RECIPES[recipe]
    width_group = group_size or MODE_DEFAULTS["affine"][0]
    modules = [(name, width) for name, width, _ in _recipe_modules(model)]
    mlx = mlx_lm_module_names(model, [name for name, _ in modules])
    down = [mlx[name] for name, _ in modules if "down_proj" in mlx[name]]
    if not down:
        raise ValueError(f"mlxq: recipe {recipe!r} needs a model with down_proj layers")
    parts = down[0].split(".")
    where = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts))
    layers = len(
        {
            mlx[n].split(".")[where]
            for n, _ in modules
            if len(mlx[n].split(".")) > where and mlx[n].split(".")[where].isdigit()
        }
    )

    out: dict[str, dict] = {}
    for name, width in modules:
        if width % width_group:
            continue
        path = mlx[name]
        parts = path.split(".")
        index = int(parts[where]) if len(parts) > where and parts[where].isdigit() else 0
        more = index < layers // 8 or index >= 7 * layers // 8 or (index - layers // 8) % 3 == 2
        high_here = ("lm_head" in path) or (
            more and any(k in path for k in ("v_proj", "v_a_proj", "v_b_proj", "down_proj"))
        )
        out[name] = {"group_size": group_size, "bits": high if high_here else low, "mode": "affine"}
    return out


# image-text families whose mixed recipe mlx-vlm 0.7.10 does not write: why
_VLM_RECIPE_FAILS = {
    "idefics2": "mlx-vlm 0.7.10's Idefics 2 model has no `layers`, which its recipe counts "
    "(mlx_vlm convert --quant-predicate raises AttributeError)",
}


def mlx_vlm_recipe_overrides(
    model: nn.Module, recipe: str, group_size: int | None = None
) -> dict[str, dict | bool]:
    """Per-module formats of mlx-vlm 0.7.10's mixed recipe `recipe` for an image-text model
    (`mlx_vlm convert -q --quant-predicate mixed_3_6`: its mixed_quant_predicate_builder).

    mlx-vlm's rule, not mlx-lm's: every entry has group 64 whatever `group_size`; `v_proj`
    and `down_proj` (LFM2: `feed_forward.w2`) get the high width in the first and last eighth
    of the layers and every third between, `lm_head` and `embed_tokens` always; everything
    else the low width. The layer index is read at the place of the first digit in the
    language model's `down_proj` name (mlx-vlm takes the first such module in its module
    order, which is the language model's in every family, or Gemma 4's tower at the same
    place), out of `len(model.layers)` (the language model's). The recipe replaces the
    model's own rule (Mistral 3's head, Gemma 4's routers, MiniCPM-V's float modules get
    entries too), but the vision tower, projector and audio tower stay float
    (`skip_multimodal_module`). A module gets no entry, and stays float, where its MLX weight's
    axis 1 (the output width of stacked experts and per-head layers) is not a multiple of 64,
    or its input width not one of 64 and of the top-level group size (`group_size`, default
    64): its entry is False (:func:`recipe_arguments` passes those as modules_to_not_convert,
    so that no entry is written for them, as mlx-vlm writes none). The entries name the
    modules as the model does (quantize_model reads either naming).
    Raises NotImplementedError where mlx-vlm writes no such checkpoint or mlxq does not map
    the family's names.
    """
    from mlxq.integrations.mlx_vlm_layout import _MLX_VLM_MULTIMODAL, mlx_vlm_module_names

    if recipe not in VLM_RECIPES:
        raise ValueError(
            f"mlxq: unknown mlx-vlm recipe {recipe!r}; choose one of {', '.join(VLM_RECIPES)}"
        )
    model_type = getattr(model.config, "model_type", None)
    if model_type in _VLM_RECIPE_FAILS:
        raise NotImplementedError(f"mlxq: recipe {recipe!r}: {_VLM_RECIPE_FAILS[model_type]}")
    low, high = VLM_RECIPES[recipe]
    group = 64  # mlx-vlm's recipe ignores --q-group-size
    top_group = group_size or MODE_DEFAULTS["affine"][0]
    modules = _recipe_modules(model)
    mlx = mlx_vlm_module_names(model, [name for name, _, _ in modules])
    if not mlx:
        raise NotImplementedError(
            f"mlxq: recipe {recipe!r} for {model_type!r}: mlxq does not map this family's "
            "names to mlx-vlm's, which its recipe reads; give the per-module entries yourself"
        )
    text = [m for m in modules if not any(k in mlx[m[0]] for k in _MLX_VLM_MULTIMODAL)]

    def is_down(path: str) -> bool:
        return "down_proj" in path or "feed_forward.w2" in path

    def digit_at(path: str) -> int:
        parts = path.split(".")
        return next((i for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1)

    places = {digit_at(mlx[name]) for name, _, _ in text if is_down(mlx[name])}
    if len(places) != 1:
        raise NotImplementedError(
            f"mlxq: recipe {recipe!r} for {model_type!r}: the language model's down_proj "
            f"layers ({len(places)} layouts) do not give mlx-vlm's layer index"
        )
    where = places.pop()
    splits = [mlx[name].split(".") for name, _, _ in text]
    layers = len({p[where] for p in splits if len(p) > where and p[where].isdigit()})
    out: dict[str, dict | bool] = {}
    for name, width, rows in text:
        if rows % group or width % group or width % top_group:
            out[name] = False  # the recipe's predicate says no: float, without an entry
            continue
        path = mlx[name]
        parts = path.split(".")
        index = int(parts[where]) if len(parts) > where and parts[where].isdigit() else 0
        more = index < layers // 8 or index >= 7 * layers // 8 or (index - layers // 8) % 3 == 2
        high_here = (more and ("v_proj" in path or is_down(path))) or (
            "lm_head" in path or "embed_tokens" in path
        )
        out[name] = {"group_size": group, "bits": high if high_here else low}
    return out


def recipe_arguments(model: nn.Module, recipe: str, group_size: int | None) -> dict:
    """:func:`~mlxq.quantize_model`'s keyword arguments for a mixed recipe, `overrides` and
    `modules_to_not_convert`: ``quantize_model(model, bits, group_size, **recipe_arguments(
    model, "mixed_3_6", group_size))`` writes what the converter writes (mlx-lm's recipe for a
    text model, mlx-vlm's for an image-text one, where the layers its recipe keeps float get
    no entry)."""
    entries = recipe_overrides(model, recipe, group_size)
    return {
        "overrides": {name: e for name, e in entries.items() if e is not False},
        "modules_to_not_convert": [name for name, e in entries.items() if e is False],
    }


@dataclass
class ConvertSummary:
    """What :func:`convert_checkpoint` wrote."""

    out: Path
    quantized: int
    kept_float: list[str]
    bytes_written: int


def _read_config(src: str) -> dict:
    path = Path(src) / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(src, "config.json")).read_text())


def _model_class(image_text: bool):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if image_text else AutoModelForCausalLM


def _meta_model(src: str, image_text: bool = False) -> nn.Module:
    """The model of checkpoint `src` on the meta device (names and shapes, no weights)."""
    import torch
    from transformers import AutoConfig

    with torch.device("meta"):
        return _model_class(image_text).from_config(AutoConfig.from_pretrained(src))


def _copy_side_files(src: str, out: Path) -> None:
    """What `mlx_vlm convert` copies next to the weights: the source's JSON and Python files
    (config.json and the index excepted: written here), then the processor (tokenizer
    included) as transformers saves it. Not the source's folders, which mlx-vlm copies too:
    a local checkpoint's may hold the original weights."""
    from transformers import AutoProcessor, AutoTokenizer

    folder = Path(src)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(src, allow_patterns=["*.json", "*.py"]))
    written = {"config.json", "model.safetensors.index.json"}
    for file in sorted(folder.iterdir()):
        if file.is_file() and file.suffix in (".json", ".py") and file.name not in written:
            shutil.copy(file, out / file.name)
    for auto in (AutoProcessor, AutoTokenizer):
        try:
            auto.from_pretrained(src).save_pretrained(out)
            return
        except (OSError, ValueError, TypeError, ImportError):  # no processor (or torchvision)
            continue


def _refuse_what_mlx_vlm_misreads(model: nn.Module, src: str) -> None:
    """An image-text model `mlx_vlm convert` writes wrong, and whose right checkpoint mlx-vlm
    would misread: Gemma 3 with its own head (mlx-vlm 0.7.10's sanitize replaces
    `language_model.lm_head.weight` by the embedding whatever the checkpoint holds; its
    tests look for `lm_head.weight`)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    untied = head is not None and head.weight is not embedding.weight
    if model.config.model_type == "gemma3" and untied:
        raise NotImplementedError(
            f"mlxq: {src} is a Gemma 3 image-text model with an untied head: mlx-vlm 0.7.10 "
            "runs the embedding as its head whatever the checkpoint holds (its Gemma 3 "
            "sanitize overwrites `language_model.lm_head.weight`), so no checkpoint of it "
            "runs right in mlx-vlm; convert its language model with `mlx_lm convert -q`"
        )


def _load_float_whole(auto, src: str, dtype, meta: nn.Module) -> nn.Module:
    """The float model of `src` loaded whole by `auto`, in `dtype`; with "auto", in the dtype
    `mlx_lm convert` quantizes it in and with the tensors it keeps in fp32 held in fp32 (the
    rules of a float checkpoint quantized while it loads: mlx_lm_dtype, keep_stored_fp32),
    not in transformers' pick (config.json's `dtype`, else the first float tensor's)."""
    import torch

    from mlxq.integrations.moe_config import check_expert_counts
    from mlxq.integrations.quantizer import (
        float_checkpoint_files,
        keep_stored_fp32,
        mlx_lm_dtype,
        read_float_checkpoint,
    )

    files = float_checkpoint_files(meta)
    source = read_float_checkpoint(meta, files)
    if source is not None:  # the MoE config checks of a load with the quantizer
        check_expert_counts(meta, source[1])
    if source is None or dtype != "auto":
        return auto.from_pretrained(src, dtype=dtype)
    dtype = mlx_lm_dtype(files, meta.config, pre_quantized=False) or "auto"
    if isinstance(dtype, torch.dtype):
        meta = meta.to(dtype)
    keep_stored_fp32(meta, *source)
    # transformers reads the markers from the class as it builds the model: set for this load
    cls = type(meta)
    before = cls.__dict__.get("_keep_in_fp32_modules_strict", _UNSET)
    cls._keep_in_fp32_modules_strict = meta._keep_in_fp32_modules_strict
    try:
        model = auto.from_pretrained(src, dtype=dtype)
        model._mlxq_as_stored = getattr(meta, "_mlxq_as_stored", False)  # (keep_stored_fp32)
        return model
    finally:
        if before is _UNSET:
            del cls._keep_in_fp32_modules_strict
        else:
            cls._keep_in_fp32_modules_strict = before


_UNSET = object()


def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    bits: int | None = 4,
    group_size: int | None = None,
    recipe: str | None = None,
    dtype: str = "auto",
    progress: Callable[[str], None] = lambda message: None,
    mode: str = "affine",
) -> ConvertSummary:
    """Quantize the float transformers checkpoint `src` (folder or Hub repo) into `out`.

    A text model is written as `mlx_lm convert -q` writes it; an image-text model (one with a
    vision_config) as `mlx_vlm convert -q` does: loaded by transformers' image-text class,
    its vision tower and projectors float, in mlx-vlm's names and layout, with the source's
    JSON files and its processor next to it; `recipe` is then one of mlx-vlm's
    (:data:`VLM_RECIPES`, its own rule: :func:`mlx_vlm_recipe_overrides`).
    `dtype` is the float type of the saved scales, biases and unquantized layers: "auto" keeps
    the checkpoint's own (as mlx-lm does), or one of float16, bfloat16, float32. `out` must not
    exist or be empty. `bits`/`group_size` None are the mode's defaults (affine: 4 and 64).
    `mode` is MLX's quantization mode (mlx_lm convert --q-mode); recipes are affine only, as in
    mlx-lm. Raises ValueError for an already quantized `src`.
    """
    import torch
    from transformers import AutoTokenizer

    from mlxq.integrations.config import MLXQuantConfig

    src = str(src)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"mlxq: {out} already exists and is not empty; pass a new folder")
    config = _read_config(src)
    q = find_quantization(config)
    if q is not None:
        raise ValueError(
            f"mlxq: {src} is already quantized ({q}); convert takes a float checkpoint"
        )
    image_text = isinstance(config.get("vision_config"), dict)
    if dtype != "auto" and dtype not in _DTYPES:
        raise ValueError(f"mlxq: dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    if recipe and mode != "affine":
        raise ValueError(f"mlxq: recipes work with mode 'affine' only (as in mlx-lm), got {mode!r}")
    meta = _meta_model(src, image_text)
    if image_text:
        _refuse_what_mlx_vlm_misreads(meta, src)
    moe = [m.name for m in plan_modules(meta, lambda name, plan: None).modules if m.moe]
    top = check_quantization(
        {"group_size": group_size, "bits": bits, "mode": mode}, source="convert arguments"
    )
    # without a recipe, mlx-lm / mlx-vlm apply their model class's own per-module rule
    # (quantize_model and the quantizer loading a float checkpoint apply it when given no
    # entries); a recipe's layers kept float get no entry (modules_to_not_convert)
    arguments = recipe_arguments(meta, recipe, group_size) if recipe else {}
    overrides = arguments.get("overrides")
    keep_float = arguments.get("modules_to_not_convert")
    from mlxq.integrations.mlx_vlm_layout import saved_module_names, tied_head_mlx_vlm_writes

    if not recipe:  # refused here, before loading, for a rule mlxq does not reproduce
        mlx_lm_model_entries(meta, top, lambda modules: saved_module_names(meta, modules))
    # the top level is written resolved (64, not null), as mlx_lm convert writes it
    qconfig = MLXQuantConfig(
        bits=bits or top.bits,
        group_size=group_size or top.group_size,
        mode=mode,
        overrides=overrides,
        modules_to_not_convert=keep_float,
    )
    progress(
        f"loading {src}, quantizing each layer as it loads: mode={mode} bits={bits} "
        f"group_size={group_size} recipe={recipe}"
    )
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    auto = _model_class(image_text)
    if moe or tied_head_mlx_vlm_writes(meta):
        # MoE experts cannot be quantized while they load yet (transformers fuses the
        # per-expert tensors as it reads them), nor a tied head mlx-vlm writes as its own
        # layer (Gemma 3's): the float model is loaded whole, then quantized
        model = _load_float_whole(auto, src, torch_dtype, meta)
        quantize_model(model, bits, group_size, mode=mode, **arguments)
    else:
        # quantized tensor by tensor while loading: the float model is never whole in memory
        model = auto.from_pretrained(src, dtype=torch_dtype, quantization_config=qconfig)
    from mlxq.moe import AffineSwitchLinear
    from mlxq.nn import AffineEmbedding, AffineLinear

    kinds = (AffineLinear, AffineEmbedding, AffineSwitchLinear)
    quantized = sum(isinstance(m, kinds) or hasattr(m, "_mlxq_name") for m in model.modules())
    kept = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    progress(f"saving to {out}")
    # written into a staging folder beside OUT and renamed at the end: a kill mid-write leaves
    # no half checkpoint under OUT's name
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        if image_text:
            _copy_side_files(src, staging)
        else:
            try:
                tokenizer = AutoTokenizer.from_pretrained(src)
            except (OSError, ValueError):  # a model without tokenizer files converts all the same
                tokenizer = None
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return ConvertSummary(out, quantized, kept, written)
