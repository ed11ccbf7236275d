"""The `mlxq` command line (also `python -m mlxq`).

    mlxq demo                      answer a question with a real MLX 4-bit model, built locally
    mlxq generate --model PATH     generate text with an MLX checkpoint (folder or Hub repo)
    mlxq inspect PATH              per-layer format, sizes, what mlxq does, problems found
    mlxq convert SRC OUT --bits B  float transformers checkpoint -> MLX checkpoint
    mlxq bench ops|model ...       op and whole-model benchmarks
    mlxq doctor                    what this machine and install can run

User errors (bad paths, repos, flags, models) end with one line on stderr and a non-zero exit;
MLXQ_DEBUG=1 shows the traceback of unexpected ones.
"""

from __future__ import annotations

import argparse
import os
import sys

from mlxq.cli.common import CLIError, mlxq_version
from mlxq.cli.convert import cmd_convert
from mlxq.cli.demo import DEMO_PROMPT, cmd_demo, demo_checkpoint
from mlxq.cli.generate import cmd_generate
from mlxq.cli.inspect import cmd_inspect
from mlxq.cli.tools import cmd_bench, cmd_doctor
from mlxq.format import MODE_DEFAULTS, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

__all__ = ["main", "CLIError", "build_parser", "demo_checkpoint"]


def _add_run_options(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "mps", "cuda"],
        default="auto",
        help="auto: mps where available, else cuda where mlxq has its CUDA kernels and a GPU, "
        "else cpu",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="activation dtype (auto: bfloat16 on CPUs with AVX512-BF16, else float32; the "
        "checkpoint's on mps and cuda)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode with a compiled step on a static cache: faster tokens after a one-time "
        "compile (cached on disk, so later runs start sooner); pays off for long outputs",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxq", description="Run MLX-quantized models inside PyTorch and transformers."
    )
    parser.add_argument("--version", action="version", version=f"mlxq {mlxq_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="answer a question with a real MLX 4-bit model (no download)")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--cache-dir", default=None, help="default: $MLXQ_CACHE or the user cache")
    _add_run_options(p, 64)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="generate text with an MLX checkpoint")
    p.add_argument("--model", required=True, help="local folder or Hub repo id")
    p.add_argument("--prompt", default="Hello, my name is")
    p.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="send the prompt as it is; by default it is wrapped in the tokenizer's chat "
        "template when the tokenizer has one (as mlx_lm.generate does)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    _add_run_options(p, 128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="per-layer formats, sizes, what mlxq does, problems")
    p.add_argument("model", help="local folder or Hub repo id")
    p.add_argument("--all", action="store_true", help="one row per module (no merging of layers)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_inspect)

    from mlxq.convert import VLM_RECIPES

    p = sub.add_parser("convert", help="float transformers checkpoint -> MLX checkpoint")
    p.add_argument("hf_path", metavar="HF_PATH", help="float checkpoint: folder or Hub repo id")
    p.add_argument("out", metavar="OUT", help="new folder for the MLX checkpoint")
    p.add_argument(
        "--bits", type=int, choices=SUPPORTED_BITS, default=None, help="default: the mode's (4)"
    )
    p.add_argument(
        "--group-size",
        type=int,
        choices=(16, *SUPPORTED_GROUP_SIZES),
        default=None,
        help="default: the mode's default (affine 64, mxfp4/mxfp8 32, nvfp4 16), written as "
        "null in mixed-recipe entries, as mlx_lm convert does without --q-group-size",
    )
    p.add_argument(
        "--q-mode",
        choices=list(MODE_DEFAULTS),
        default="affine",
        help="MLX quantization mode, as mlx_lm convert --q-mode (recipes: affine only)",
    )
    p.add_argument(
        "--recipe",
        choices=list(VLM_RECIPES),
        default=None,
        help="mixed recipe: mlx-lm's for a text model (mixed_2_6, mixed_3_4, mixed_3_6, "
        "mixed_4_6), mlx-vlm's for an image-text model (all of these)",
    )
    p.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "bench", help="benchmarks: `ops` (kernels) or `model` (whole model vs peers)"
    )
    p.add_argument("what", choices=["ops", "model"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (-h)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("doctor", help="what this machine and install can run")
    p.set_defaults(func=cmd_doctor)
    return parser


def _one_line(error: BaseException, limit: int = 1000) -> str:
    """The error's message on one line: every line of it, joined (the first line alone can be
    a heading, as pydantic-style validation errors give: "Validation error for field 'x':"),
    cut at `limit` characters where a multi-line message is longer."""
    text = str(error).strip() or type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = " ".join(lines)
    if len(lines) > 1 and len(text) > limit:
        text = text[:limit].rstrip() + " ..."
    return text.removeprefix("mlxq: ").removeprefix("mlxq.")


def _fail(args: argparse.Namespace, message: str) -> int:
    """Report a failed command: one line on stderr, and with --json also a JSON object on
    stdout carrying the error (in the report's `problems` shape), so that scripts reading the
    JSON see why instead of nothing. Returns the exit status (1)."""
    print(f"mlxq: error: {message}", file=sys.stderr)
    if getattr(args, "json", False) is True:  # only inspect has the flag (bench passes its own)
        import json

        source = getattr(args, "model", None)
        problem = {"severity": "error", "message": message}
        print(json.dumps({"source": source, "error": message, "problems": [problem]}, indent=1))
    return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mlxq` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    debug = os.environ.get("MLXQ_DEBUG", "") not in ("", "0")
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("\nmlxq: interrupted", file=sys.stderr)
        return 130
    except CLIError as error:
        return _fail(args, str(error))
    except BrokenPipeError:
        return 1
    except Exception as error:  # noqa: BLE001 - one line, not a traceback, for users
        if debug:
            raise
        from mlxq.inspect_checkpoint import config_validation_errors

        known = (OSError, ValueError, NotImplementedError, ImportError, TypeError, RuntimeError)
        prefix = "" if isinstance(error, known) else f"{type(error).__name__}: "
        hint = "" if isinstance(error, known) else " (MLXQ_DEBUG=1 shows the traceback)"
        if isinstance(error, config_validation_errors()):  # the user's config, not a bug
            prefix, hint = "the model's config.json is invalid: ", ""
        return _fail(args, f"{prefix}{_one_line(error)}{hint}")
