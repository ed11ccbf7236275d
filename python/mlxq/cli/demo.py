"""`mlxq demo`: answer a question with a real MLX 4-bit model built locally (no download)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlxq.cli.common import CLIError, load_model, mlxq_version, print_stats, quiet_transformers
from mlxq.cli.generate import generate

DEMO_PROMPT = "What is the capital of France?"
DEMO_BITS, DEMO_GROUP_SIZE = 4, 32  # group 32 reproduces the GGUF's Q4_1 grid; 64 does not answer


def demo_checkpoint(cache_dir: str | None = None) -> Path:
    """The demo's MLX 4-bit g32 SmolLM2-135M-Instruct, built once into the user cache.

    Built by mlxq itself (GGUF -> float checkpoint via transformers -> :mod:`mlxq.convert`),
    so the demo needs neither mlx nor mlx-lm.
    """
    import hashlib
    from importlib.metadata import version

    from mlxq import demo_model
    from mlxq.convert import convert_checkpoint

    key = f"{DEMO_BITS}-{DEMO_GROUP_SIZE}-{version('transformers')}-{mlxq_version()}"
    tag = f"smollm2-135m-{DEMO_BITS}bit-g{DEMO_GROUP_SIZE}-mlxq-"
    tag += hashlib.sha256(key.encode()).hexdigest()[:8]
    root = Path(cache_dir) if cache_dir else demo_model.mlxq_cache_dir()
    final = root / "models" / tag
    if (final / "config.json").is_file():
        return final
    demo_model.smollm2_gguf_path()  # fails early, with the install hint, without the package
    from tqdm.auto import tqdm

    print(f"Preparing the demo model once (cached in {final})", file=sys.stderr, flush=True)
    steps = ["reading GGUF", "loading", "quantizing", "saving"]
    bar = tqdm(total=len(steps), desc="SmolLM2-135M 4-bit", unit="step", file=sys.stderr)

    def progress(message: str) -> None:
        bar.set_postfix_str(message[:60])
        bar.update(1)

    quiet_transformers()
    try:

        def build(out: Path) -> None:
            float_dir = demo_model.cached_smollm2_float_checkpoint(progress, cache_dir)
            convert_checkpoint(
                float_dir, out, DEMO_BITS, DEMO_GROUP_SIZE, dtype="auto", progress=progress
            )

        path = demo_model._cached_build(tag, build, root)
        bar.update(bar.total - bar.n)
    finally:
        bar.close()
    return path


def cmd_demo(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise CLIError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.threads is not None and args.threads < 1:  # before building the demo model
        raise CLIError(f"--threads must be at least 1, got {args.threads}")
    import importlib.util

    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing and not _demo_cached(args.cache_dir):
        raise CLIError(
            f"building the demo model once needs {' and '.join(missing)} to read the GGUF: "
            'pip install "mlxq[demo]" (or: pip install gguf accelerate)'
        )
    path = demo_checkpoint(args.cache_dir)
    model, tokenizer, info = load_model(str(path), args.device, args.dtype, args.threads)
    print(
        f"SmolLM2-135M-Instruct, MLX {DEMO_BITS}-bit group {DEMO_GROUP_SIZE}, through "
        f"transformers + mlxq on {info['device']} ({path})",
        flush=True,
    )
    print(f"> {args.prompt}", flush=True)
    stats = generate(
        model, tokenizer, args.prompt, args.max_tokens, chat=True, compile=args.compile
    )
    print_stats(info, stats)
    return 0


def _demo_cached(cache_dir: str | None) -> bool:
    from mlxq import demo_model

    root = Path(cache_dir) if cache_dir else demo_model.mlxq_cache_dir()
    return any(
        (p / "config.json").is_file() for p in (root / "models").glob("smollm2-135m-*mlxq-*")
    )
