"""`mlxq convert`: a float transformers checkpoint to an MLX checkpoint, in PyTorch."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mlxq.cli.common import CLIError, quiet_transformers, resolve_config
from mlxq.format import MODE_DEFAULTS, find_quantization


def cmd_convert(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"{args.out} already exists and is not empty; pass a new folder")
    # before reading the model (which can take minutes), not at the write: "[Errno 17] File
    # exists" naming the parent
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise CLIError(f"{parent} is a file, so {args.out} cannot be created; pass a folder")
    source, config = resolve_config(args.hf_path)
    if find_quantization(config) is not None:
        raise CLIError(
            f"{args.hf_path} is already quantized ({json.dumps(find_quantization(config))[:80]}); "
            "convert takes a float checkpoint"
        )
    if args.recipe and args.q_mode != "affine":
        raise CLIError(
            f"--recipe works with --q-mode affine only (as in mlx_lm), got {args.q_mode}"
        )
    quiet_transformers()
    from mlxq.convert import convert_checkpoint

    start = time.perf_counter()
    summary = convert_checkpoint(
        source,
        out,
        args.bits,
        args.group_size,
        recipe=args.recipe,
        dtype=args.dtype,
        progress=lambda message: print(f"[mlxq] {message}", flush=True),
        mode=args.q_mode,
    )
    default_group, default_bits = MODE_DEFAULTS[args.q_mode]
    mode = "" if args.q_mode == "affine" else f"{args.q_mode} "
    kept = f", kept float: {', '.join(summary.kept_float)}" if summary.kept_float else ""
    print(
        f"[mlxq] wrote {summary.out}: {summary.quantized} layers quantized "
        f"({mode}{args.recipe or f'{args.bits or default_bits}-bit'} group "
        f"{args.group_size or f'default ({default_group})'}){kept}; "
        f"{summary.bytes_written / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    return 0
