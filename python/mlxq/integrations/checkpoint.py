"""Safetensors headers and the repair of stale shard indexes.

Many mlx-community repos carry the `model.safetensors.index.json` of the original model: it
names shards or tensors that the MLX checkpoint does not have. The repair rebuilds the weight
map from the safetensors files that are actually there (their headers only, no tensor data),
for local folders and for Hub repos (listed through huggingface_hub).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["TensorInfo", "read_header", "read_headers", "check_shard_index", "repair_shard_index"]

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


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of a safetensors file, read from its header only."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"mlxq: {path} is not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise ValueError(f"mlxq: {path}: safetensors header of {size} bytes is not plausible")
        header = json.loads(f.read(size))
    return {
        name: TensorInfo(info["dtype"], info["shape"])
        for name, info in header.items()
        if name != "__metadata__"
    }


def read_headers(paths: Iterable[str | os.PathLike]) -> dict[str, TensorInfo]:
    """The union of the headers of several shards (safetensors files only)."""
    out: dict[str, TensorInfo] = {}
    for path in paths:
        if str(path).endswith(".safetensors"):
            out.update(read_header(path))
    return out


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
        if f.startswith(prefix) and f.endswith(".safetensors") and "/" not in f[len(prefix) :]
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
    index = json.loads(Path(index_filename).read_text(encoding="utf-8"))
    weight_map: dict[str, str] = index.get("weight_map", {})
    named = sorted(set(weight_map.values()))
    source = str(pretrained_model_name_or_path)
    if os.path.isdir(source):
        folder = Path(source) / subfolder
        present = sorted(p.name for p in folder.glob("*.safetensors"))

        def local(name: str) -> str:
            return str(folder / name)
    elif download_kwargs.get("local_files_only") or _hub_offline():
        # offline: the repo's files are the ones in the cached snapshot next to the index
        folder = Path(index_filename).parent
        present = sorted(p.name for p in folder.glob("*.safetensors"))

        def local(name: str) -> str:
            return str(folder / name)
    else:
        token = download_kwargs.get("token")
        present = _list_hub_safetensors(source, subfolder, download_kwargs.get("revision"), token)

        def local(name: str) -> str:
            return _download(source, name, subfolder, **download_kwargs)

    if not present:
        return None  # nothing to rebuild from: let transformers report what is missing
    if set(named) <= set(present):
        # the shards exist: are their tensors the ones the index names?
        paths = {name: local(name) for name in named}
        headers = {name: read_header(path) for name, path in paths.items()}
        actual = {key: name for name, header in headers.items() for key in header}
        if all(actual.get(key) == name for key, name in weight_map.items()) and set(actual) == set(
            weight_map
        ):
            return None
    paths = {name: local(name) for name in present}
    new_map = {key: name for name, path in paths.items() for key in read_header(path)}
    missing = sorted(set(named) - set(present))
    reason = (
        f"the shard index of {source} is stale (it names {len(weight_map)} tensors in "
        f"{len(named)} shards{', missing: ' + ', '.join(missing[:3]) if missing else ''}); "
        f"using the {len(new_map)} tensors of the {len(present)} safetensors files present"
    )
    metadata = dict(index.get("metadata") or {})
    metadata["weight_map"] = new_map
    metadata["all_checkpoint_keys"] = list(new_map)
    return [paths[name] for name in present], metadata, reason
