"""The mlxq ops as Python functions, with their fake (meta) kernels and autograd.

The math lives in the native kernels (`torch.ops.mlxq.*`); this module adds what torch needs
around them: fake kernels that compute output shapes for `torch.compile` (through the native
argument checks), and the gradient of `affine_matmul` with respect to `x`.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from mlxq._native import _C  # registers torch.ops.mlxq; its checks serve the fake kernels

__all__ = ["affine_quantize", "affine_dequantize", "affine_matmul"]


def affine_quantize(
    w: torch.Tensor, group_size: int = 64, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `w` [..., K] exactly as `mlx.core.quantize` does.

    Returns the packed weight (uint32, [..., K*bits/32]) and the scales and biases
    ([..., K/group_size], dtype of `w`).
    """
    return torch.ops.mlxq.affine_quantize(w, group_size, bits)


def affine_dequantize(
    wq: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor,
    group_size: int = 64,
    bits: int = 4,
) -> torch.Tensor:
    """Unpack `wq` to `scales * q + biases`, in the dtype of `scales` (computed in fp32)."""
    return torch.ops.mlxq.affine_dequantize(wq, scales, biases, group_size, bits)


def affine_matmul(
    x: torch.Tensor,
    wq: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor,
    group_size: int = 64,
    bits: int = 4,
    transpose: bool = True,
) -> torch.Tensor:
    """`x @ W.T` (transpose=True) or `x @ W` for the quantized W, like `mx.quantized_matmul`.

    Dequantizes and accumulates in fp32 and rounds only the output, in the dtype of `x`.
    Differentiable with respect to `x` in reverse mode and in forward mode (`torch.func.jvp`,
    `torch.autograd.forward_ad`); the weight is a constant.
    """
    if _forward_mode_active():
        _check_constant_in_forward_mode(scales, biases)
        return _AffineMatmulFunction.apply(x, wq, scales, biases, group_size, bits, transpose)
    return torch.ops.mlxq.affine_matmul(x, wq, scales, biases, group_size, bits, transpose)


# --- fake kernels: output shapes from the native argument checks -------------------------------
# Each fake kernel runs the same C++ check as the real kernels (csrc/checks.cpp, exposed as
# mlxq._C.*_out_shape), so meta tensors and torch.compile refuse exactly the calls the real op
# refuses, with the same message. The checks read sizes as SymInts: under dynamic shapes a
# condition that cannot be decided while tracing becomes a run-time assertion of the graph.
# These fake kernels also serve the Meta dispatch key, which wins when one operand is on "meta"
# and another on a real device: the check's one-device rule refuses such a call.


@torch.library.register_fake("mlxq::affine_quantize")
def _quantize_fake(w: torch.Tensor, group_size: int = 64, bits: int = 4):
    qshape, sshape, bshape = _C.quantize_out_shapes(w, group_size, bits)
    return (
        w.new_empty(qshape, dtype=torch.uint32),
        w.new_empty(sshape),
        w.new_empty(bshape),
    )


@torch.library.register_fake("mlxq::affine_dequantize")
def _dequantize_fake(wq, scales, biases, group_size: int = 64, bits: int = 4):
    return scales.new_empty(_C.dequantize_out_shape(wq, scales, biases, group_size, bits))


@torch.library.register_fake("mlxq::affine_matmul")
def _matmul_fake(x, wq, scales, biases, group_size: int = 64, bits: int = 4, transpose=True):
    return x.new_empty(_C.matmul_out_shape(x, wq, scales, biases, group_size, bits, transpose))


# --- autograd: d/dx of x @ W.T is grad @ W, and vice versa -----------------------------------


def _raise_constant_weight(op: str, scales: bool, biases: bool) -> None:
    names = " and ".join(n for n, wanted in (("scales", scales), ("biases", biases)) if wanted)
    raise RuntimeError(
        f"mlxq.{op}: the quantized weight is a constant; gradients with respect to {names} "
        "are not supported (call .requires_grad_(False) on them, or train a float copy)"
    )


class _AffineMatmulFunction(torch.autograd.Function):
    generate_vmap_rule = True  # forward and jvp are ops that vmap can batch
    """The derivatives of affine_matmul: it is linear in x, so the vjp (grad @ W) and the jvp
    (tangent @ W.T) are affine_matmul itself; the weight is a constant. Its backward is the
    op's registered autograd; `mlxq.affine_matmul` applies the whole Function only in forward
    mode (`torch.library.register_autograd` has none), so the common path pays nothing."""

    @staticmethod
    def forward(x, wq, scales, biases, group_size, bits, transpose):
        return torch.ops.mlxq.affine_matmul(x, wq, scales, biases, group_size, bits, transpose)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, wq, scales, biases, group_size, bits, transpose = inputs
        ctx.save_for_backward(wq, scales, biases)
        ctx.save_for_forward(wq, scales, biases)
        ctx.x_shape = x.shape
        ctx.args = (group_size, bits, transpose)

    @staticmethod
    def backward(ctx, grad):
        wq, scales, biases = ctx.saved_tensors
        group_size, bits, transpose = ctx.args
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            _raise_constant_weight(
                "affine_matmul", ctx.needs_input_grad[2], ctx.needs_input_grad[3]
            )
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.mlxq.affine_matmul(
                grad, wq, scales, biases, group_size, bits, not transpose
            )
            if grad_x.shape != ctx.x_shape:  # x was broadcast against a batched weight
                grad_x = grad_x.sum_to_size(ctx.x_shape)
        return grad_x, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, x_t, *_):
        # tangents of scales/biases are zero here: _check_constant_in_forward_mode refused the
        # calls where they are not (functorch passes zero tensors for them all the same)
        wq, scales, biases = ctx.saved_tensors
        return torch.ops.mlxq.affine_matmul(x_t, wq, scales, biases, *ctx.args)


torch.library.register_autograd(
    "mlxq::affine_matmul",
    _AffineMatmulFunction.backward,
    setup_context=_AffineMatmulFunction.setup_context,
)


def _check_constant_in_forward_mode(scales: torch.Tensor, biases: torch.Tensor) -> None:
    def has_tangent(t: torch.Tensor) -> bool:
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor(t)
        return wrapped or (fwAD._current_level >= 0 and fwAD.unpack_dual(t).tangent is not None)

    s, b = has_tangent(scales), has_tangent(biases)
    if s or b:
        _raise_constant_weight("affine_matmul", s, b)


def _forward_mode_active() -> bool:
    """True inside torch.func.jvp / a torch.autograd.forward_ad dual level, where the op's
    registered autograd (reverse mode only) would drop the tangent without a word."""
    return torch._C._are_functorch_transforms_active() or fwAD._current_level >= 0


# --- the other ops are not differentiable: say so at backward time instead of torch's silent
# "no autograd kernel" fallback, which returns no gradient at all.


def _no_grad_setup_context(ctx, inputs, output) -> None:
    pass


def _dequantize_backward(ctx, grad):
    _raise_constant_weight("affine_dequantize", *ctx.needs_input_grad[1:3])


def _quantize_backward(ctx, *grads):
    raise RuntimeError(
        "mlxq.affine_quantize: quantization (rounding to integers) has no useful gradient; "
        "w must not require one here (quantize w.detach())"
    )


torch.library.register_autograd(
    "mlxq::affine_dequantize", _dequantize_backward, setup_context=_no_grad_setup_context
)
torch.library.register_autograd(
    "mlxq::affine_quantize", _quantize_backward, setup_context=_no_grad_setup_context
)
