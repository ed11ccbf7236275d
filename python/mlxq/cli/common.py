"""What the commands share: user errors, finding a checkpoint (folder or Hub repo), choosing
the device and dtype, loading a model through transformers, and printing run statistics."""

from __future__ import annotations

import functools
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from mlxq.format import find_quantization, is_mlx_quantization

__all__ = [
    "CLIError",
    "hub_error",
    "resolve_config",
    "pick_device",
    "load_model",
    "peak_memory_bytes",
    "print_stats",
    "quiet_transformers",
    "mlxq_version",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class CLIError(Exception):
    """A user error: printed as one line, exit status 1."""


def hub_error(name: str, error: Exception) -> CLIError:
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


def looks_like_path(name: str) -> bool:
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
            return str(path), _config_object(config, json.loads(config.read_text()))
        except json.JSONDecodeError as error:
            raise CLIError(f"{config} is not valid JSON ({error})") from None
    if looks_like_path(name):
        raise CLIError(f"no such folder: {name}")
    from huggingface_hub import hf_hub_download

    try:
        config = hf_hub_download(name, "config.json")
    except Exception as error:  # noqa: BLE001 - every Hub failure becomes one line
        raise hub_error(name, error) from None
    return name, _config_object(config, json.loads(Path(config).read_text()))


def _config_object(path, config: Any) -> dict:
    if not isinstance(config, dict):
        raise CLIError(f"{path} must be a JSON object, got {type(config).__name__}")
    return config


def _require_quantized(name: str, config: dict) -> dict:
    q = find_quantization(config)
    if q is None and _packed_weight(name) is not None:
        raise CLIError(
            f"{name}: {_packed_weight(name)} is a packed (uint32) weight but config.json has no "
            "MLX `quantization` block (was it removed?); restore the block mlx-lm wrote"
        )
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


def _packed_weight(name: str) -> str | None:
    """The first packed `*.weight` in a local checkpoint's safetensors headers, else None."""
    from mlxq.integrations.checkpoint import read_header

    path = Path(name).expanduser()
    for file in sorted(path.glob("*.safetensors")) if path.is_dir() else []:
        for key, info in read_header(file).items():
            if key.endswith(".weight") and info.dtype in ("U32", "I32"):
                return key
    return None


def _tensor_names(source: str) -> set[str]:
    """The checkpoint's tensor names: local safetensors headers, or a Hub repo's safetensors
    metadata (headers only, no weights downloaded); empty where they cannot be read."""
    path = Path(source)
    if path.is_dir():
        from mlxq.integrations.checkpoint import read_headers

        return set(read_headers(path.glob("*.safetensors")))
    from huggingface_hub import get_safetensors_metadata

    try:
        return set(get_safetensors_metadata(source).weight_map)
    except Exception:  # noqa: BLE001 - from_pretrained reports Hub failures itself
        return set()


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def pick_device(name: str) -> str:
    """`auto` -> mps when available, else cuda where mlxq runs on a GPU, else cpu; an explicit
    mps or cuda on a machine without it fails with the reason."""
    from mlxq._native import cuda_unavailable_reason

    if name == "auto":
        if _mps_available():
            return "mps"
        return "cuda" if cuda_unavailable_reason() is None else "cpu"
    if name == "mps" and not _mps_available():
        raise CLIError("--device mps: MPS is not available here (Apple GPU with macOS 12.3+)")
    if name == "cuda" and (why := cuda_unavailable_reason()) is not None:
        raise CLIError(f"--device cuda: {why}")
    return name


def _pick_dtype(name: str, device: str, config: dict):
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device == "cpu":
        # bf16 where the CPU has bf16 dot products (the avx512 kernels need AVX512-BF16): bf16
        # GEMMs for the prompt and one bf16 piece of x per decode dot product. Elsewhere bf16
        # GEMMs are emulated, and fp32 (which the kernels compute in anyway) is faster.
        from mlxq import _C

        return torch.bfloat16 if _C.cpu_isa() == "avx512" else torch.float32
    # mps and cuda: the checkpoint's own dtype (fp16/bf16 kernels on the GPU)
    saved = config.get("dtype") or config.get("torch_dtype") or "float16"
    return getattr(torch, saved, torch.float16)


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(name: str, device: str, dtype_name: str = "auto", threads: int | None = None):
    """Load an MLX checkpoint through transformers + mlxq. Returns (model, tokenizer, info)."""
    if threads is not None and threads < 1:  # 0 was ignored, a negative one a torch error
        raise CLIError(f"--threads must be at least 1, got {threads}")
    source, config = resolve_config(name)
    _require_quantized(name, config)
    import torch

    import mlxq  # noqa: F401  (registers the "mlx" quantizer with transformers)

    device = pick_device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    dtype = _pick_dtype(dtype_name, device, config)
    quiet_transformers()
    from transformers import AutoConfig, AutoTokenizer

    from mlxq.integrations.model_class import auto_model_class, text_model_class

    start = time.perf_counter()
    # mlx-lm's conversion of an image-text model to its language model: the text model's
    # class; else the config's auto class (image-text where transformers has no causal LM)
    names = functools.cache(lambda: _tensor_names(source))
    cls = text_model_class(config, names)
    cls = cls or auto_model_class(AutoConfig.from_pretrained(source), names)
    model = cls.from_pretrained(source, dtype=dtype)
    if device != "cpu":
        model = model.to(device)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        files = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
        if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in files):
            # transformers' own words name no file ("... from one of: ")
            raise CLIError(
                f"{name}: cannot load its tokenizer: the folder has none of {', '.join(files)} "
                "(copy the tokenizer files of the model it was converted from)"
            ) from None
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
    """Peak resident memory of this process, plus the MPS driver's allocation on MPS and the
    peak of torch's CUDA allocator on CUDA."""
    from mlxq.bench.model import peak_rss_bytes

    out: dict[str, int] = {}
    if (rss := peak_rss_bytes()) is not None:
        out["peak_rss"] = rss
    if device == "mps":
        import torch

        out["mps_driver"] = torch.mps.driver_allocated_memory()
    if device == "cuda":
        import torch

        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    return out


def print_stats(info: dict, stats: dict) -> None:
    memory = peak_memory_bytes(info["device"])
    parts = [f"load {info['load_s']:.2f} s"]
    if "prefill_tps" in stats:
        parts.append(f"prefill {stats['prompt_tokens']} tokens at {stats['prefill_tps']:.1f} tok/s")
    if "decode_tps" in stats:
        parts.append(
            f"decode {stats['generated_tokens']} tokens at {stats['decode_tps']:.1f} tok/s"
        )
    if "first_step_s" in stats:
        parts.append(f"compiled step ready in {stats['first_step_s']:.1f} s")
    if "peak_rss" in memory:
        parts.append(f"peak memory {memory['peak_rss'] / 1e6:.0f} MB")
    if "mps_driver" in memory:
        parts.append(f"MPS {memory['mps_driver'] / 1e6:.0f} MB")
    if "cuda_peak" in memory:
        parts.append(f"CUDA peak {memory['cuda_peak'] / 1e6:.0f} MB")
    threads = stats.get("threads", info["threads"])
    parts.append(f"{info['device']} {info['dtype']}, {threads} thread{'s' * (threads != 1)}")
    print("-- " + " | ".join(parts), flush=True)


def mlxq_version() -> str:
    import mlxq

    return mlxq.__version__
