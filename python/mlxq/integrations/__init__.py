"""Hugging Face transformers integration: load, run and save MLX checkpoints.

`import mlxq` only installs the lazy hook of :mod:`mlxq.integrations.registration`; the
submodules that import transformers (config, quantizer) load on first use.
"""

from __future__ import annotations

__all__ = ["MLXQuantConfig", "MLXHfQuantizer"]


def __getattr__(name: str):
    if name == "MLXQuantConfig":
        from mlxq.integrations.config import MLXQuantConfig

        return MLXQuantConfig
    if name == "MLXHfQuantizer":
        from mlxq.integrations.quantizer import MLXHfQuantizer

        return MLXHfQuantizer
    raise AttributeError(f"module 'mlxq.integrations' has no attribute {name!r}")
