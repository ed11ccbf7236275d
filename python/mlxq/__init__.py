"""mlxq: MLX-quantized (affine, 2-8 bit) weights inside PyTorch.

Ops: :func:`affine_quantize`, :func:`affine_dequantize`, :func:`affine_matmul`, also reachable
as ``torch.ops.mlxq.*``.
"""

from __future__ import annotations

from mlxq.ops import affine_dequantize, affine_matmul, affine_quantize

__version__ = "0.1.0"

__all__ = ["affine_quantize", "affine_dequantize", "affine_matmul", "__version__"]
