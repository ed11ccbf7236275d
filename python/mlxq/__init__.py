"""mlxq: MLX-quantized (affine, 2-8 bit) weights inside PyTorch.

Ops: :func:`affine_quantize`, :func:`affine_dequantize`, :func:`affine_matmul`,
:func:`affine_gather_matmul` (mixture-of-experts layers), also reachable
as ``torch.ops.mlxq.*``.

transformers: after ``import mlxq``, ``AutoModelForCausalLM.from_pretrained(path_or_repo)``
loads MLX checkpoints (mlx-community) into :class:`AffineLinear` / :class:`AffineEmbedding`;
``save_pretrained`` writes MLX checkpoints back; :func:`quantize_model` quantizes a float model.
"""

from __future__ import annotations

from mlxq._threads import set_openmp_wait_policy as _set_openmp_wait_policy

_set_openmp_wait_policy()  # before torch loads OpenMP (see mlxq._threads)

from mlxq.integrations.registration import install as _install_transformers_hook  # noqa: E402
from mlxq.metal.backend import install as _install_metal  # noqa: E402
from mlxq.nn import AffineEmbedding, AffineLinear  # noqa: E402
from mlxq.ops import (  # noqa: E402
    affine_dequantize,
    affine_gather_matmul,
    affine_matmul,
    affine_quantize,
    dequantize,
    fp_gather_matmul,
    gather_quantized_matmul,
    quantize,
    quantized_matmul,
)
from mlxq.quantize_model import quantize_model  # noqa: E402

__version__ = "0.1.0"

__all__ = ["affine_quantize", "affine_dequantize", "affine_matmul", "__version__"]
__all__ += ["AffineLinear", "AffineEmbedding", "quantize_model", "MLXQuantConfig"]
__all__ += ["backend_info", "doctor_report", "quantize", "dequantize", "quantized_matmul"]
__all__ += ["affine_gather_matmul", "fp_gather_matmul", "gather_quantized_matmul"]

# Metal kernels for MPS tensors: prebuilt, runtime-compiled or off (see mlxq.metal.backend)
_install_metal()

# from_pretrained on MLX checkpoints after `import mlxq`; transformers itself loads lazily
_install_transformers_hook()


def __getattr__(name: str):
    if name == "MLXQuantConfig":  # imports transformers, so only on first use
        from mlxq.integrations.config import MLXQuantConfig

        return MLXQuantConfig
    if name in ("backend_info", "doctor_report"):
        # on first use: imported by `import mlxq`, `python -m mlxq.doctor` (the README's) ran
        # the module a second time with runpy's RuntimeWarning
        from mlxq import doctor

        return getattr(doctor, name)
    raise AttributeError(f"module 'mlxq' has no attribute {name!r}")
