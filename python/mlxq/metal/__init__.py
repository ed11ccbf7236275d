"""The Python side of mlxq's Metal path (the kernels are in the repository's ``metal/``; the
portable host code that plans and binds their launches is in ``csrc/metal_host/``, the
Objective-C++ that encodes them on PyTorch's MPS stream in ``csrc/mps/``).

- :mod:`mlxq.metal.backend`: which path runs the kernels on MPS tensors (prebuilt metallib,
  run-time compiled, off), chosen once at ``import mlxq``;
- :mod:`mlxq.metal.runtime`: the run-time fallback (``torch.mps.compile_shader``);
- :mod:`mlxq.metal.info`: the Metal part of :func:`mlxq.backend_info`.

In a wheel this folder also holds the ``.metal`` and ``.h`` sources (the fallback compiles them).
"""

from __future__ import annotations

from mlxq.metal.backend import MetalChoice, MetalEnv, active, choose_path, install
from mlxq.metal.info import metal_info

__all__ = ["MetalChoice", "MetalEnv", "active", "choose_path", "install", "metal_info"]
