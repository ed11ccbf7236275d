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

__all__ = ["_C"]
