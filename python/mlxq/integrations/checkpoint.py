"""Safetensors headers, the repair of stale shard indexes, and shards without an index.

Many mlx-community repos carry the `model.safetensors.index.json` of the original model: it
names shards or tensors that the MLX checkpoint does not have. The repair rebuilds the weight
map from the safetensors files that are actually there (their headers only, no tensor data),
for local folders and for Hub repos (listed through huggingface_hub).

mlx-lm reads no index at all: it loads every `model*.safetensors` file of the folder. A folder
with several such files and no index (which transformers reads as `model.safetensors` alone,
or not at all) loads the same files here (:func:`unindexed_shards`).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "TensorInfo",
    "DTYPE_BYTES",
    "read_header",
    "read_headers",
    "written_by_mlx",
    "FLOAT_MLX_BLOCK",
    "FloatMlxBlock",
    "is_float_mlx_checkpoint",
    "read_index",
    "check_shard_index",
    "repair_shard_index",
    "weight_map_of",
    "unindexed_shards",
]

logger = logging.getLogger("mlxq")
_warned: set[str] = set()


class TensorInfo(tuple):
    """(dtype, shape) of one tensor in a safetensors header, e.g. ("U32", (576, 72))."""

    __slots__ = ()

    def __new__(cls, dtype: str, shape: Iterable[int]):
        return super().__new__(cls, (dtype, tuple(shape)))

    @property
    def dtype(self) -> str:
        return self[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return self[1]


# bytes per element of the safetensors dtypes
DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
    "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}  # fmt: skip


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of a safetensors file, read from its header only.

    The header is checked against the file before anything trusts it: valid JSON, known
    dtypes, each tensor's byte range inside the file, of the size its shape needs, and no two
    ranges overlapping (a truncated or half-written file fails here, naming the file).
    """
    size_on_disk = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"mlxq: {path} is not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000 or 8 + size > size_on_disk:
            raise ValueError(
                f"mlxq: {path}: safetensors header of {size} bytes is not plausible "
                f"(the file has {size_on_disk} bytes; truncated, or not a safetensors file)"
            )
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"mlxq: {path}: safetensors header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"mlxq: {path}: safetensors header must be an object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):  # the safetensors library refuses it without naming the file
        raise ValueError(
            f"mlxq: {path}: safetensors __metadata__ must map strings to strings, got "
            f"{metadata!r:.200}"
        )
    data_size = size_on_disk - 8 - size
    out: dict[str, TensorInfo] = {}
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            if dtype not in DTYPE_BYTES:
                raise ValueError(f"unknown dtype {dtype!r}")
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"shape {shape!r} is not a list of sizes >= 0")
            if not all(isinstance(o, int) for o in (begin, end)):
                raise ValueError(f"data_offsets {[begin, end]!r} are not integers")
            nbytes = DTYPE_BYTES[dtype]
            for d in shape:
                nbytes *= d
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"mlxq: {path}: tensor {name!r} has a malformed header entry {info!r:.300} "
                f"({error})"
            ) from None
        if not (0 <= begin <= end <= data_size) or end - begin != nbytes:
            raise ValueError(
                f"mlxq: {path}: tensor {name!r} ({dtype} {list(shape)}, {nbytes} bytes) has data "
                f"offsets [{begin}, {end}] outside the {data_size} data bytes of the file or of "
                "the wrong length (truncated or half-written file?)"
            )
        ranges.append((begin, end, name))
        out[name] = TensorInfo(dtype, shape)
    ranges.sort()
    for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:], strict=False):
        if begin < end:
            raise ValueError(f"mlxq: {path}: tensors {first!r} and {second!r} overlap in the file")
    # the safetensors library also wants the tensors to fill the data exactly (its "file not
    # fully covered", which names no file): no gap, no bytes after the last tensor
    covered = sum(end - begin for begin, end, _ in ranges)
    if covered != data_size:
        raise ValueError(
            f"mlxq: {path}: its tensors cover {covered} of the file's {data_size} data bytes "
            "(bytes appended to the file, or a gap between tensors: a corrupt file)"
        )
    return out


def written_by_mlx(paths: Iterable[str | os.PathLike]) -> bool:
    """Whether a safetensors file among `paths` says it was written by MLX (its header's
    `__metadata__` has `format: mlx`, as mlx-lm and mlx-vlm write; transformers writes `pt`)."""
    for path in paths:
        if not str(path).endswith(".safetensors"):
            continue
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                continue
            (size,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(min(size, 100_000_000)))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
        metadata = header.get("__metadata__") if isinstance(header, dict) else None
        if isinstance(metadata, dict) and metadata.get("format") == "mlx":
            return True
    return False


# the quantization block a float checkpoint written by mlx-lm is read with (no module takes it:
# each module's format is read off its tensors, and these have no `scales`): mlx-lm's defaults
FLOAT_MLX_BLOCK = {"group_size": 64, "bits": 4, "mode": "affine"}


class FloatMlxBlock(dict):
    """:data:`FLOAT_MLX_BLOCK` as given to a float MLX checkpoint's config (a dict, saved as
    one), known by its class: a `quantization_config=` passed to from_pretrained quantizes such
    a checkpoint on load instead of yielding to it."""


def is_float_mlx_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether local `folder` holds a float checkpoint written by MLX: safetensors that MLX wrote
    (`mlx_lm convert` without `-q`, `convert -d`, `fuse --dequantize`: no quantization block),
    none with quantized tensors (`*.scales`; packed weights without a block stay refused). Such
    a checkpoint keeps mlx-lm's tensor layout (stacked experts `switch_mlp.*`, DeepSeek's
    `embed_q`/`unembed_out`, GPT-2's `model.*` names, channels-last convolutions, ...), which
    transformers' own loader takes for missing and unexpected keys and fills with random
    weights, a warning at most: read with :data:`FLOAT_MLX_BLOCK` (the caller checks that
    config.json has no block), mlxq maps it back as for quantized checkpoints."""
    import glob

    if not os.path.isdir(folder):
        return False
    pattern = os.path.join(glob.escape(os.fspath(folder)), "*.safetensors")
    files = sorted(glob.glob(pattern))
    if not written_by_mlx(files):
        return False
    try:
        keys = read_headers(files)
    except (OSError, ValueError):  # the loader names what is wrong with the file
        return False
    return not any(k.endswith(".scales") for k in keys)


def read_headers(paths: Iterable[str | os.PathLike]) -> dict[str, TensorInfo]:
    """The union of the headers of several shards (safetensors files only)."""
    out: dict[str, TensorInfo] = {}
    for path in paths:
        if str(path).endswith(".safetensors"):
            out.update(read_header(path))
    return out


def weight_map_of(headers_by_file: dict[str, Iterable[str]]) -> dict[str, str]:
    """Tensor name -> file name over several files; a tensor held by two files is refused by
    name (mlx-lm would keep the copy of whichever file its directory listing gives last)."""
    out: dict[str, str] = {}
    for name, keys in headers_by_file.items():
        for key in keys:
            if key in out:
                raise ValueError(
                    f"mlxq: tensor {key!r} is in two files, {out[key]} and {name}: which one "
                    "mlx-lm loads depends on the order of the directory listing; delete one"
                )
            out[key] = name
    return out


def _is_mlx_lm_weight_file(name: str) -> bool:
    """The files mlx-lm loads: `model*.safetensors` (its glob)."""
    return name.startswith("model") and name.endswith(".safetensors")


def unindexed_shards(
    source: str | os.PathLike, subfolder: str = ""
) -> tuple[list[str], dict[str, Any]] | None:
    """The files mlx-lm loads from a local folder that has several `model*.safetensors` files
    and no shard index (or one beside a `model.safetensors`), with their weight map (as
    `get_checkpoint_shard_files` returns them); None where transformers reads the same files
    itself (one `model.safetensors`, an index and its shards).
    """
    if not os.path.isdir(source):
        return None
    folder = Path(source) / subfolder
    files = sorted(p for p in folder.glob("model*.safetensors") if p.is_file())
    if not files or [p.name for p in files] == ["model.safetensors"]:
        return None
    if (folder / "model.safetensors.index.json").is_file() and not (
        folder / "model.safetensors"
    ).is_file():
        return None  # the index's shards: get_checkpoint_shard_files checks them
    # model.safetensors beside other shards (a sharded save over a single-file one, which
    # save_pretrained leaves): transformers would read model.safetensors alone, even with an
    # index naming the others, so the files are read here, as mlx-lm reads them (a tensor in
    # two files is refused by name)
    weight_map = weight_map_of({p.name: read_header(p) for p in files})
    metadata = {"weight_map": weight_map, "all_checkpoint_keys": list(weight_map)}
    return [str(p) for p in files], metadata


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _list_hub_safetensors(repo_id: str, subfolder: str, revision: str | None, token) -> list[str]:
    from huggingface_hub import HfApi

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    files = HfApi().list_repo_files(repo_id, revision=revision, token=token)
    return sorted(
        f[len(prefix) :]
        for f in files
        if f.startswith(prefix)
        and "/" not in f[len(prefix) :]
        and _is_mlx_lm_weight_file(f[len(prefix) :])
    )


def _download(repo_id: str, filename: str, subfolder: str, **kwargs: Any) -> str:
    from huggingface_hub import hf_hub_download

    allowed = ("revision", "cache_dir", "force_download", "local_files_only", "token")
    return hf_hub_download(
        repo_id,
        filename,
        subfolder=subfolder or None,
        **{k: v for k, v in kwargs.items() if k in allowed and v is not None},
    )


def read_index(path: str | os.PathLike) -> dict[str, Any]:
    """A `model.safetensors.index.json`, checked: an object whose `weight_map` maps tensor
    names to file names (a ValueError names the file and what is wrong)."""
    try:
        index = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"mlxq: {path}: not a JSON shard index ({error})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ValueError(
            f'mlxq: {path}: a shard index must be an object whose "weight_map" maps tensor '
            f"names to file names, got {json.dumps(index)[:120]}"
        )
    return index


def repair_shard_index(
    pretrained_model_name_or_path: str | os.PathLike,
    index_filename: str | os.PathLike,
    subfolder: str = "",
    **download_kwargs: Any,
) -> tuple[list[str], dict[str, Any]] | None:
    """:func:`check_shard_index`, warning once per checkpoint when the index is stale."""
    result = check_shard_index(
        pretrained_model_name_or_path, index_filename, subfolder, **download_kwargs
    )
    if result is None:
        return None
    paths, metadata, reason = result
    _warn_once(str(pretrained_model_name_or_path), f"mlxq: {reason}")
    return paths, metadata


def check_shard_index(
    pretrained_model_name_or_path: str | os.PathLike,
    index_filename: str | os.PathLike,
    subfolder: str = "",
    **download_kwargs: Any,
) -> tuple[list[str], dict[str, Any], str] | None:
    """Check a shard index against the checkpoint; rebuild it when stale. Logs nothing.

    Returns None when the index is right (the caller then proceeds as usual), else the list of
    local shard paths, the sharded metadata (`weight_map`, `all_checkpoint_keys`) built from
    the headers of the safetensors files present, and the reason, in words.
    """
    index = read_index(index_filename)
    weight_map: dict[str, str] = index["weight_map"]
    named = sorted(set(weight_map.values()))
    source = str(pretrained_model_name_or_path)
    if os.path.isdir(source):
        folder = Path(source) / subfolder
        present = sorted(p.name for p in folder.glob("model*.safetensors"))

        def local(name: str) -> str:
            return str(folder / name)
    elif download_kwargs.get("local_files_only") or _hub_offline():
        # offline: the repo's files are the ones in the cached snapshot next to the index
        folder = Path(index_filename).parent
        present = sorted(p.name for p in folder.glob("model*.safetensors"))

        def local(name: str) -> str:
            return str(folder / name)
    else:
        token = download_kwargs.get("token")
        present = _list_hub_safetensors(source, subfolder, download_kwargs.get("revision"), token)

        def local(name: str) -> str:
            return _download(source, name, subfolder, **download_kwargs)

    if not present:
        if not os.path.isdir(source):
            return None  # a Hub repo or cache without them: transformers' download reports it
        # a local folder: transformers would hand the absent paths on and fail in a bare
        # FileNotFoundError while reading them
        raise ValueError(
            f"mlxq: {index_filename} names {', '.join(named[:3])}"
            f"{' ...' if len(named) > 3 else ''}, but {Path(index_filename).parent} holds no "
            "model*.safetensors file: an incomplete download or copy?"
        )
    if set(named) == set(present):
        # the shards exist (and no other file that mlx-lm, reading every `model*.safetensors`,
        # would load too): are their tensors the ones the index names?
        paths = {name: local(name) for name in named}
        headers = {name: read_header(path) for name, path in paths.items()}
        actual = {key: name for name, header in headers.items() for key in header}
        if all(actual.get(key) == name for key, name in weight_map.items()) and set(actual) == set(
            weight_map
        ):
            return None
    paths = {name: local(name) for name in present}
    new_map = weight_map_of({name: read_header(path) for name, path in paths.items()})
    missing = sorted(set(named) - set(present))
    lost = sorted(k for k, name in weight_map.items() if name in missing and k not in new_map)
    if lost and any(k.endswith(".scales") for k in weight_map):
        # an MLX index (it names quantized tensors: not a float original's, left stale in the
        # repo) whose shard is gone: the checkpoint is incomplete, not its index stale
        raise ValueError(
            f"mlxq: {index_filename} names tensors in {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} missing from {source} (e.g. "
            f"{', '.join(lost[:3])}{' ...' if len(lost) > 3 else ''}; {len(lost)} tensors in no "
            "file present): an incomplete download or copy?"
        )
    reason = (
        f"the shard index of {source} is stale (it names {len(weight_map)} tensors in "
        f"{len(named)} shards{', missing: ' + ', '.join(missing[:3]) if missing else ''}); "
        f"using the {len(new_map)} tensors of the {len(present)} safetensors files present"
    )
    metadata = dict(index.get("metadata") or {})
    metadata["weight_map"] = new_map
    metadata["all_checkpoint_keys"] = list(new_map)
    return [paths[name] for name in present], metadata, reason
