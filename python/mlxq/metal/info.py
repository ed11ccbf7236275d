"""What the Metal side of mlxq looks like in this process: the part of :func:`mlxq.backend_info`
(and of ``mlxq doctor``) that is about Metal."""

from __future__ import annotations

import os
from typing import Any

import torch

from mlxq._native import _C
from mlxq.metal import backend

__all__ = ["metal_info"]


def metal_info() -> dict[str, Any]:
    """MPS availability, the active Metal path and why, where the metallib and sources are."""
    choice = backend.active()
    metallib = backend.metallib_path()
    sources = backend.metal_source_dir()
    return {
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
    }


def _mps_device_name() -> str | None:
    # torch._C._mps_get_name exists in MPS builds of torch (torch/csrc/mps/Module.cpp).
    if not torch.backends.mps.is_available():
        return None
    get_name = getattr(torch._C, "_mps_get_name", None)
    try:
        return get_name() if get_name else "mps"
    except RuntimeError:
        return "mps"
