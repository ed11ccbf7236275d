"""Loads the native op library, which registers `torch.ops.mlxq.*` and its CPU kernels."""

from __future__ import annotations

import torch  # noqa: F401  (the extension links against libtorch)

try:
    from mlxq import _C  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "mlxq's native library (mlxq._C) is missing or was built against another torch. "
        "Reinstall with: pip install --no-build-isolation -e . "
        f"(torch {torch.__version__}); original error: {exc}"
    ) from exc

__all__ = ["_C", "cuda_unavailable_reason"]


def cuda_unavailable_reason() -> str | None:
    """Why mlxq's ops cannot run on CUDA here (no GPU, or mlxq was built without its CUDA
    kernels), or None where they can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is available to torch here"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("mlxq::affine_matmul", "CUDA"):
        return (
            "mlxq was built without its CUDA kernels (they need a torch with CUDA and nvcc at "
            "build time; `mlxq doctor` says more)"
        )
    return None
