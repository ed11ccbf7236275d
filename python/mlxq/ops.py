"""The mlxq ops as Python functions, with their fake (meta) kernels and autograd.

The math lives in the native kernels (`torch.ops.mlxq.*`); this module adds what torch needs
around them: fake kernels that compute output shapes for `torch.compile`, and the gradient of
`affine_matmul` with respect to `x`.
"""

from __future__ import annotations

import torch

from mlxq._native import _C  # noqa: F401  (registers torch.ops.mlxq)

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
    """
    return torch.ops.mlxq.affine_matmul(x, wq, scales, biases, group_size, bits, transpose)


# --- fake kernels: output shapes only (the native checks run when the op executes) ----------


@torch.library.register_fake("mlxq::affine_quantize")
def _quantize_fake(w: torch.Tensor, group_size: int = 64, bits: int = 4):
    _check_bits_group(bits, group_size)
    torch._check_value(w.dim() >= 1, lambda: "mlxq: w must have at least one dimension")
    k = w.shape[-1]
    torch._check_value(
        k % group_size == 0,
        lambda: f"mlxq: w last dimension {k} must be divisible by group_size {group_size}",
    )
    lead = list(w.shape[:-1])
    wq = w.new_empty([*lead, k * bits // 32], dtype=torch.uint32)
    scales = w.new_empty([*lead, k // group_size])
    return wq, scales, torch.empty_like(scales)


def _check_bits_group(bits: int, group_size: int) -> None:
    # Only what the output shapes need (no division by a zero group size); the native kernels
    # run the full checks of csrc/checks.cpp when the op executes.
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"mlxq: bits must be one of 2, 3, 4, 5, 6, 8, got {bits}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"mlxq: group_size must be one of 32, 64, 128, got {group_size}")


def _check_one_device(**tensors: torch.Tensor) -> None:
    # These fake kernels also serve the Meta dispatch key, which wins when one operand is on
    # "meta" and another on a real device: without this check such a call would return
    # uninitialised memory instead of the native kernel's device error.
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"mlxq: all operands must be on one device, got {listed}")


@torch.library.register_fake("mlxq::affine_dequantize")
def _dequantize_fake(wq, scales, biases, group_size: int = 64, bits: int = 4):
    _check_bits_group(bits, group_size)
    _check_one_device(wq=wq, scales=scales, biases=biases)
    return scales.new_empty([*wq.shape[:-1], scales.shape[-1] * group_size])


@torch.library.register_fake("mlxq::affine_matmul")
def _matmul_fake(x, wq, scales, biases, group_size: int = 64, bits: int = 4, transpose=True):
    _check_bits_group(bits, group_size)
    _check_one_device(x=x, wq=wq, scales=scales, biases=biases)
    rows, cols = wq.shape[-2], scales.shape[-1] * group_size
    out_features = rows if transpose else cols
    if wq.dim() == 2:
        return x.new_empty([*x.shape[:-1], out_features])
    batch = torch.broadcast_shapes(x.shape[:-2], wq.shape[:-2])
    return x.new_empty([*batch, x.shape[-2], out_features])


# --- autograd: d/dx of x @ W.T is grad @ W, and vice versa -----------------------------------


def _raise_constant_weight(op: str, scales: bool, biases: bool) -> None:
    names = " and ".join(n for n, wanted in (("scales", scales), ("biases", biases)) if wanted)
    raise RuntimeError(
        f"mlxq.{op}: the quantized weight is a constant; gradients with respect to {names} "
        "are not supported (call .requires_grad_(False) on them, or train a float copy)"
    )


def _matmul_setup_context(ctx, inputs, output) -> None:
    x, wq, scales, biases, group_size, bits, transpose = inputs
    ctx.save_for_backward(wq, scales, biases)
    ctx.x_shape = x.shape
    ctx.args = (group_size, bits, transpose)


def _matmul_backward(ctx, grad):
    wq, scales, biases = ctx.saved_tensors
    group_size, bits, transpose = ctx.args
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        _raise_constant_weight("affine_matmul", ctx.needs_input_grad[2], ctx.needs_input_grad[3])
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.mlxq.affine_matmul(
            grad, wq, scales, biases, group_size, bits, not transpose
        )
        if grad_x.shape != ctx.x_shape:  # x was broadcast against a batched weight
            grad_x = grad_x.sum_to_size(ctx.x_shape)
    return grad_x, None, None, None, None, None, None


torch.library.register_autograd(
    "mlxq::affine_matmul", _matmul_backward, setup_context=_matmul_setup_context
)


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


# --- affine_gather_matmul: MLX's gather_qmm (mixture-of-experts layers) ------------------------

__all__ += ["affine_gather_matmul"]


def affine_gather_matmul(
    x: torch.Tensor,
    wq: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor,
    lhs_indices: torch.Tensor | None = None,
    rhs_indices: torch.Tensor | None = None,
    group_size: int = 64,
    bits: int = 4,
    transpose: bool = True,
    sorted_indices: bool = False,
) -> torch.Tensor:
    """Quantized matmul with a gather over matrices, like `mx.gather_qmm`.

    `x` is `[..., M, in]` (a batch of matrices), `wq` `[..., rows, K*bits/32]` (e.g. one matrix
    per expert). `lhs_indices` and `rhs_indices` hold flat indices into the batch dimensions of
    `x` and `wq` (absent: an arange over that batch, reshaped to it); they broadcast together to
    a shape `I`, and the output `[*I, M, out]` holds `x[lhs[i]] @ W[rhs[i]].T` (or `@ W` with
    transpose=False). Same numerics as :func:`affine_matmul` (fp32 dequantize and accumulate,
    output in the dtype of `x`); each selected matrix is read once per call, however many pairs
    use it. `sorted_indices` is a hint that `rhs_indices` is sorted; results do not depend on it.
    """
    return torch.ops.mlxq.affine_gather_matmul(
        x, wq, scales, biases, lhs_indices, rhs_indices, group_size, bits, transpose, sorted_indices
    )


def _index_shape(indices: torch.Tensor | None, batch) -> list[int]:
    return list(indices.shape) if indices is not None else list(batch)


@torch.library.register_fake("mlxq::affine_gather_matmul")
def _gather_matmul_fake(
    x,
    wq,
    scales,
    biases,
    lhs_indices=None,
    rhs_indices=None,
    group_size: int = 64,
    bits: int = 4,
    transpose: bool = True,
    sorted_indices: bool = False,
):
    _check_bits_group(bits, group_size)
    tensors = dict(x=x, wq=wq, scales=scales, biases=biases)
    tensors.update({k: v for k, v in (("lhs_indices", lhs_indices), ("rhs_indices", rhs_indices))})
    _check_one_device(**{k: v for k, v in tensors.items() if v is not None})
    torch._check_value(x.dim() >= 2, lambda: "mlxq: x must have at least 2 dimensions [..., M, K]")
    torch._check_value(wq.dim() >= 2, lambda: "mlxq: wq must have at least 2 dimensions")
    rows, cols = wq.shape[-2], scales.shape[-1] * group_size
    out_features = rows if transpose else cols
    index_shape = torch.broadcast_shapes(
        _index_shape(lhs_indices, x.shape[:-2]), _index_shape(rhs_indices, wq.shape[:-2])
    )
    return x.new_empty([*index_shape, x.shape[-2], out_features])


def _gather_setup_context(ctx, inputs, output) -> None:
    x, wq, scales, biases, lhs, rhs, group_size, bits, transpose, sorted_indices = inputs
    ctx.save_for_backward(wq, scales, biases, lhs, rhs)
    ctx.x_shape = x.shape
    ctx.args = (group_size, bits, transpose)


def _gather_backward(ctx, grad):
    # y[i] = x[lhs[i]] @ op(W[rhs[i]]): dx[l] = sum over i with lhs[i] = l of grad[i] @ op(W)^T,
    # i.e. the same gather with the other transpose, scattered back onto x's batch.
    wq, scales, biases, lhs, rhs = ctx.saved_tensors
    group_size, bits, transpose = ctx.args
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        _raise_constant_weight(
            "affine_gather_matmul", ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        )
    if not ctx.needs_input_grad[0]:
        return (None,) * 10
    x_shape = ctx.x_shape
    index_shape = grad.shape[:-2]
    x_batch = x_shape[:-2]
    if lhs is None:
        lhs = torch.arange(x_shape[:-2].numel(), device=grad.device).reshape(x_batch)
    if rhs is None:
        rhs = torch.arange(wq.shape[:-2].numel(), device=grad.device).reshape(wq.shape[:-2])
    lhs_flat = lhs.long().expand(index_shape).reshape(-1)
    rhs_flat = rhs.expand(index_shape).reshape(-1)
    pairs = lhs_flat.numel()
    g = grad.reshape(pairs, grad.shape[-2], grad.shape[-1])
    part = torch.ops.mlxq.affine_gather_matmul(
        g, wq, scales, biases, None, rhs_flat, group_size, bits, not transpose, False
    )
    grad_x = part.new_zeros(x_batch.numel(), x_shape[-2], x_shape[-1])
    grad_x.index_add_(0, lhs_flat, part)
    return (grad_x.reshape(x_shape),) + (None,) * 9


torch.library.register_autograd(
    "mlxq::affine_gather_matmul", _gather_backward, setup_context=_gather_setup_context
)
