"""`mlxq inspect`: per-layer formats, sizes, what mlxq does with each tensor, problems."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlxq.cli.common import CLIError, hub_error, quiet_transformers, resolve_config


def _hub_headers(repo: str) -> tuple[Path, dict | None]:
    """A Hub repo's small files (config, index, tokenizer) and its safetensors headers only."""
    from huggingface_hub import HfApi, snapshot_download

    from mlxq.integrations.checkpoint import TensorInfo

    small = ["*.json", "*.jinja", "*.txt", "*.model", "tokenizer*"]
    try:
        folder = Path(snapshot_download(repo, allow_patterns=small))
        if any(folder.glob("*.safetensors")):
            return folder, None
        api = HfApi()
        files = [
            f
            for f in api.list_repo_files(repo)
            if f.startswith("model") and f.endswith(".safetensors") and "/" not in f  # as mlx-lm
        ]
        headers = {}
        for f in files:
            meta = api.parse_safetensors_file_metadata(repo, f)
            headers[f] = {k: TensorInfo(v.dtype, v.shape) for k, v in meta.tensors.items()}
        return folder, headers
    except CLIError:
        raise
    except Exception as error:  # noqa: BLE001 - every Hub failure becomes one line
        raise hub_error(repo, error) from None


def cmd_inspect(args: argparse.Namespace) -> int:
    source, _ = resolve_config(args.model)
    quiet_transformers()
    from mlxq.inspect_checkpoint import format_report, inspect_checkpoint

    if Path(source).is_dir():
        report = inspect_checkpoint(Path(source), args.model)
    else:
        folder, headers = _hub_headers(source)
        report = inspect_checkpoint(folder, args.model, headers)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(format_report(report, every_module=args.all))
    return 1 if report.errors else 0
