"""The mlxq ops as Python functions, with their fake (meta) kernels and autograd.

The math lives in the native kernels (`torch.ops.mlxq.*`); this module adds what torch needs
around them: fake kernels that compute output shapes for `torch.compile` (through the native
argument checks), and the gradient of `affine_matmul` with respect to `x`.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from mlxq._native import _C  # registers torch.ops.mlxq; its checks serve the fake kernels
from mlxq.format import MODE_DEFAULTS

__all__ = [
    "affine_quantize",
    "affine_dequantize",
    "affine_matmul",
    "affine_matmul_many",
    "quantize",
    "dequantize",
    "quantized_matmul",
    "decode_attention",
    "rms_norm",
    "rotary_embedding",
]


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


def affine_matmul_many(
    x: torch.Tensor,
    wq: list[torch.Tensor],
    scales: list[torch.Tensor],
    biases: list[torch.Tensor],
    group_size: int = 64,
    bits: int = 4,
) -> list[torch.Tensor]:
    """`[affine_matmul(x, wq[i], scales[i], biases[i], group_size, bits) for i]` in one call.

    For sibling projections that read one input (q/k/v, gate/up): the outputs are bit for bit
    those of `affine_matmul` (and differentiable like them), and on the CPU a decode step's
    weights share one parallel region and one preparation of `x`. Weights are 2-D
    ([N_i, K*bits/32]); other backends run one `affine_matmul` per weight.
    """
    if _forward_mode_active():  # the one-call op has reverse mode only; affine_matmul has both
        _C.matmul_many_out_shapes(x, wq, scales, biases, group_size, bits)
        weights = zip(wq, scales, biases, strict=True)
        return [affine_matmul(x, w, s, b, group_size, bits) for w, s, b in weights]
    return torch.ops.mlxq.affine_matmul_many(x, wq, scales, biases, group_size, bits)


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


@torch.library.register_fake("mlxq::affine_matmul_many")
def _matmul_many_fake(x, wq, scales, biases, group_size: int = 64, bits: int = 4):
    shapes = _C.matmul_many_out_shapes(x, wq, scales, biases, group_size, bits)
    return [x.new_empty(shape) for shape in shapes]


# --- autograd: d/dx of x @ W.T is grad @ W, and vice versa -----------------------------------


def _raise_constant_weight(op: str, scales: bool, biases: bool) -> None:
    names = " and ".join(n for n, wanted in (("scales", scales), ("biases", biases)) if wanted)
    raise RuntimeError(
        f"mlxq.{op}: the quantized weight is a constant; gradients with respect to {names} "
        "are not supported (call .requires_grad_(False) on them, or train a float copy)"
    )


class _AffineMatmulFunction(torch.autograd.Function):
    """The derivatives of affine_matmul: it is linear in x, so the vjp (grad @ W) and the jvp
    (tangent @ W.T) are affine_matmul itself; the weight is a constant. The op's reverse mode
    is registered in C++ (csrc/autograd.cpp, so that inference calls skip Python);
    `mlxq.affine_matmul` applies this Function only in forward mode, which that has not."""

    generate_vmap_rule = True  # forward and jvp are ops that vmap can batch

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


# --- MLX's floating-point modes (mxfp4, nvfp4, mxfp8) and the mode-generic functions ----------
#
# The native library has one op family per kind of operands: `affine_*` (packed integers,
# float scales and biases) and `fp_*` (FP4/FP8 values, uint8 scales, no biases, nvfp4's
# optional float32 global scale). The functions below take MLX's `mode` argument and its
# defaults, as `mx.quantize` / `mx.dequantize` / `mx.quantized_matmul` do, and call the family
# the mode belongs to.


def _mode_params(mode: str, group_size: int | None, bits: int | None) -> tuple[int, int]:
    if mode not in MODE_DEFAULTS:
        raise ValueError(
            f"mlxq: mode must be one of {', '.join(repr(m) for m in MODE_DEFAULTS)}, got {mode!r}"
        )
    default_group, default_bits = MODE_DEFAULTS[mode]
    return (
        default_group if group_size is None else group_size,
        default_bits if bits is None else bits,
    )


def _check_biases(mode: str, biases: torch.Tensor | None) -> None:
    if mode == "affine" and biases is None:
        raise ValueError("mlxq: biases must be given for mode 'affine', got None")
    if mode != "affine" and biases is not None:
        raise ValueError(f"mlxq: biases must be None for mode {mode!r}, got a tensor")


def _check_no_global_scale(mode: str, global_scale: torch.Tensor | None) -> None:
    if global_scale is not None and not isinstance(global_scale, torch.Tensor):
        # (the op's schema said only "Expected a value of type 'Optional[Tensor]'", a
        # RuntimeError); MLX takes an array too
        raise TypeError(
            "mlxq: global_scale must be a float32 tensor (e.g. torch.tensor(2.0); for a gather, "
            f"one value per matrix), got {type(global_scale).__name__} {global_scale!r:.40}"
        )
    if mode == "affine" and global_scale is not None:
        raise ValueError("mlxq: global_scale is only used by mode 'nvfp4', got mode 'affine'")


def quantize(
    w: torch.Tensor,
    group_size: int | None = None,
    bits: int | None = None,
    mode: str = "affine",
    *,
    global_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Quantize `w` [..., K] exactly as `mlx.core.quantize(w, group_size, bits, mode=mode)` does
    on the CPU; `None` group size / bits take the mode's defaults.

    Returns (wq, scales, biases) for mode "affine" and (wq, scales) for "mxfp4", "nvfp4" and
    "mxfp8" (uint8 scales). `global_scale` (float32, one value) is nvfp4's optional tensor scale.
    """
    group_size, bits = _mode_params(mode, group_size, bits)
    _check_no_global_scale(mode, global_scale)
    if mode == "affine":
        return torch.ops.mlxq.affine_quantize(w, group_size, bits)
    return torch.ops.mlxq.fp_quantize(w, mode, group_size, bits, global_scale)


def dequantize(
    wq: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor | None = None,
    group_size: int | None = None,
    bits: int | None = None,
    mode: str = "affine",
    *,
    global_scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The float weight of a quantized one, bit for bit `mlx.core.dequantize` on the CPU.

    The result's dtype is `dtype`, else the scales' dtype for "affine" and bfloat16 for the
    floating-point modes (MLX's defaults); with nvfp4's `global_scale` it is float32, as in MLX
    (the float32 global scale promotes the product).
    """
    group_size, bits = _mode_params(mode, group_size, bits)
    _check_biases(mode, biases)
    _check_no_global_scale(mode, global_scale)
    if mode == "affine":
        out = torch.ops.mlxq.affine_dequantize(wq, scales, biases, group_size, bits)
        return out if dtype is None else out.to(dtype)
    return torch.ops.mlxq.fp_dequantize(wq, scales, mode, group_size, bits, global_scale, dtype)


def quantized_matmul(
    x: torch.Tensor,
    wq: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor | None = None,
    transpose: bool = True,
    group_size: int | None = None,
    bits: int | None = None,
    mode: str = "affine",
    *,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ W.T` (transpose=True) or `x @ W` for a weight quantized in any MLX mode, like
    `mlx.core.quantized_matmul`; fp32 dequantize and accumulate, output in the dtype of `x`.

    `global_scale` (nvfp4 only; MLX takes it in `gather_qmm`) multiplies every weight by
    global_scale / (448*6), as `dequantize` does.
    """
    group_size, bits = _mode_params(mode, group_size, bits)
    _check_biases(mode, biases)
    _check_no_global_scale(mode, global_scale)
    if mode == "affine":
        return torch.ops.mlxq.affine_matmul(x, wq, scales, biases, group_size, bits, transpose)
    return torch.ops.mlxq.fp_matmul(x, wq, scales, mode, group_size, bits, transpose, global_scale)


def _check_fp_mode_fake(mode: str, group_size: int, bits: int) -> None:
    # What the output shapes need; the native checks (csrc/checks.cpp) run with the op.
    if mode not in ("mxfp4", "nvfp4", "mxfp8"):
        raise ValueError(f"mlxq: mode must be one of 'mxfp4', 'nvfp4', 'mxfp8' here, got {mode!r}")
    want_group, want_bits = MODE_DEFAULTS[mode]
    if group_size != want_group:
        raise ValueError(
            f"mlxq: group_size must be {want_group} for mode {mode!r}, got {group_size}"
        )
    if bits != want_bits:
        raise ValueError(f"mlxq: bits must be {want_bits} for mode {mode!r}, got {bits}")


def _check_one_device(**tensors: torch.Tensor) -> None:
    # The fp fake kernels also serve the Meta dispatch key, which wins when one operand is on
    # "meta" and another on a real device: refuse that as the native kernel would.
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"mlxq: all operands must be on one device, got {listed}")


@torch.library.register_fake("mlxq::fp_quantize")
def _fp_quantize_fake(w, mode: str, group_size: int, bits: int, global_scale=None):
    _check_fp_mode_fake(mode, group_size, bits)
    torch._check_value(w.dim() >= 1, lambda: "mlxq: w must have at least one dimension")
    k = w.shape[-1]
    torch._check_value(
        k % group_size == 0,
        lambda: f"mlxq: w last dimension {k} must be divisible by group_size {group_size}",
    )
    lead = list(w.shape[:-1])
    wq = w.new_empty([*lead, k * bits // 32], dtype=torch.uint32)
    return wq, w.new_empty([*lead, k // group_size], dtype=torch.uint8)


@torch.library.register_fake("mlxq::fp_dequantize")
def _fp_dequantize_fake(
    wq, scales, mode: str, group_size: int, bits: int, global_scale=None, dtype=None
):
    _check_fp_mode_fake(mode, group_size, bits)
    _check_one_device(wq=wq, scales=scales)
    out_dtype = torch.float32 if global_scale is not None else (dtype or torch.bfloat16)
    return wq.new_empty([*wq.shape[:-1], scales.shape[-1] * group_size], dtype=out_dtype)


@torch.library.register_fake("mlxq::fp_matmul")
def _fp_matmul_fake(
    x, wq, scales, mode: str, group_size: int, bits: int, transpose=True, global_scale=None
):
    _check_fp_mode_fake(mode, group_size, bits)
    _check_one_device(x=x, wq=wq, scales=scales)
    rows, cols = wq.shape[-2], scales.shape[-1] * group_size
    out_features = rows if transpose else cols
    if wq.dim() == 2:
        return x.new_empty([*x.shape[:-1], out_features])
    batch = torch.broadcast_shapes(x.shape[:-2], wq.shape[:-2])
    return x.new_empty([*batch, x.shape[-2], out_features])


def _raise_constant_weight_names(op: str, names: str) -> None:
    raise RuntimeError(
        f"mlxq.{op}: the quantized weight is a constant; gradients with respect to {names} "
        "are not supported (call .requires_grad_(False) on it, or train a float copy)"
    )


def _fp_dequantize_backward(ctx, grad):
    _raise_constant_weight_names("fp_dequantize", "global_scale")


def _fp_quantize_backward(ctx, *grads):
    raise RuntimeError(
        "mlxq.fp_quantize: quantization (rounding to FP4/FP8) has no useful gradient; "
        "w must not require one here (quantize w.detach())"
    )


torch.library.register_autograd(
    "mlxq::fp_dequantize", _fp_dequantize_backward, setup_context=_no_grad_setup_context
)
torch.library.register_autograd(
    "mlxq::fp_quantize", _fp_quantize_backward, setup_context=_no_grad_setup_context
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


def _concrete_sizes(*tensors: torch.Tensor | None) -> bool:
    """Whether no size of `tensors` is symbolic: the gather fake kernels then run the real
    kernels' native check (which reads concrete sizes), so that meta and fake tensors refuse
    exactly what the real op refuses, with its message; under dynamic shapes they compute the
    output shape themselves and the real op checks the rest when it runs."""
    return all(isinstance(d, int) for t in tensors if t is not None for d in t.shape)


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
    tensors = dict(x=x, wq=wq, scales=scales, biases=biases)
    tensors.update({k: v for k, v in (("lhs_indices", lhs_indices), ("rhs_indices", rhs_indices))})
    _check_one_device(**{k: v for k, v in tensors.items() if v is not None})
    if _concrete_sizes(*tensors.values()):
        shape = _C.gather_matmul_out_shape(
            x, wq, scales, biases, lhs_indices, rhs_indices, group_size, bits, transpose
        )
        return x.new_empty(shape)
    torch._check_value(group_size > 0, lambda: f"mlxq: group_size must be > 0, got {group_size}")
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


# --- fp_gather_matmul: mx.gather_qmm in the floating-point modes --------------------------------
#
# A separate op beside affine_gather_matmul, as fp_matmul is beside affine_matmul: its operands
# are fp_matmul's (uint8 scales, no biases, nvfp4's global scale) plus the gather indices.
# `gather_quantized_matmul` below is the mode-generic function with mx.gather_qmm's signature.

__all__ += ["fp_gather_matmul", "gather_quantized_matmul"]


def fp_gather_matmul(
    x: torch.Tensor,
    wq: torch.Tensor,
    scales: torch.Tensor,
    mode: str,
    group_size: int,
    bits: int,
    lhs_indices: torch.Tensor | None = None,
    rhs_indices: torch.Tensor | None = None,
    transpose: bool = True,
    global_scale: torch.Tensor | None = None,
    sorted_indices: bool = False,
) -> torch.Tensor:
    """:func:`affine_gather_matmul` for weights in MLX's floating-point modes ("mxfp4" group 32
    4 bits, "nvfp4" group 16 4 bits, "mxfp8" group 32 8 bits), like
    `mx.gather_qmm(..., mode=mode)`.

    `wq` `[..., rows, K*bits/32]` with uint8 `scales` `[..., rows, K/group_size]` holds a batch
    of matrices (e.g. one per expert); the indices pick the pairs as in
    :func:`affine_gather_matmul`, output `[*I, M, out]` in the dtype of `x`. Numerics are those
    of :func:`quantized_matmul` (exact fp32 weights, fp32 accumulation, one output rounding).
    `global_scale` (nvfp4 only) is mx.gather_qmm's: float32 with one value per matrix of `wq`
    (shape `wq.shape[:-2]`), matrix e's weights multiplied by global_scale[e] / (448*6).
    Differentiable with respect to `x` (reverse mode).
    """
    _check_no_global_scale(mode, global_scale)
    return torch.ops.mlxq.fp_gather_matmul(
        x,
        wq,
        scales,
        mode,
        group_size,
        bits,
        lhs_indices,
        rhs_indices,
        transpose,
        global_scale,
        sorted_indices,
    )


def gather_quantized_matmul(
    x: torch.Tensor,
    wq: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor | None = None,
    lhs_indices: torch.Tensor | None = None,
    rhs_indices: torch.Tensor | None = None,
    transpose: bool = True,
    group_size: int | None = None,
    bits: int | None = None,
    mode: str = "affine",
    global_scale: torch.Tensor | None = None,
    *,
    sorted_indices: bool = False,
) -> torch.Tensor:
    """`mlx.core.gather_qmm` for a weight stack quantized in any MLX mode: argument order and
    per-mode defaults as MLX's; calls :func:`affine_gather_matmul` or :func:`fp_gather_matmul`.
    """
    group_size, bits = _mode_params(mode, group_size, bits)
    _check_biases(mode, biases)
    _check_no_global_scale(mode, global_scale)
    if mode == "affine":
        return affine_gather_matmul(
            x, wq, scales, biases, lhs_indices, rhs_indices, group_size, bits, transpose,
            sorted_indices,
        )  # fmt: skip
    return fp_gather_matmul(
        x, wq, scales, mode, group_size, bits, lhs_indices, rhs_indices, transpose, global_scale,
        sorted_indices,
    )  # fmt: skip


@torch.library.register_fake("mlxq::fp_gather_matmul")
def _fp_gather_matmul_fake(
    x,
    wq,
    scales,
    mode: str,
    group_size: int,
    bits: int,
    lhs_indices=None,
    rhs_indices=None,
    transpose: bool = True,
    global_scale=None,
    sorted_indices: bool = False,
):
    tensors = dict(x=x, wq=wq, scales=scales, lhs_indices=lhs_indices, rhs_indices=rhs_indices)
    tensors["global_scale"] = global_scale
    _check_one_device(**{k: v for k, v in tensors.items() if v is not None})
    if _concrete_sizes(*tensors.values()):
        shape = _C.fp_gather_matmul_out_shape(
            x, wq, scales, mode, group_size, bits, lhs_indices, rhs_indices, transpose, global_scale
        )
        return x.new_empty(shape)
    _check_fp_mode_fake(mode, group_size, bits)
    torch._check_value(x.dim() >= 2, lambda: "mlxq: x must have at least 2 dimensions [..., M, K]")
    torch._check_value(wq.dim() >= 2, lambda: "mlxq: wq must have at least 2 dimensions")
    if global_scale is not None:
        torch._check_value(
            list(global_scale.shape) == list(wq.shape[:-2]),
            lambda: (
                "mlxq: global_scale must hold one value per matrix of wq, shape "
                f"{list(wq.shape[:-2])}, got shape {list(global_scale.shape)}"
            ),
        )
    rows, cols = wq.shape[-2], scales.shape[-1] * group_size
    out_features = rows if transpose else cols
    index_shape = torch.broadcast_shapes(
        _index_shape(lhs_indices, x.shape[:-2]), _index_shape(rhs_indices, wq.shape[:-2])
    )
    return x.new_empty([*index_shape, x.shape[-2], out_features])


def _fp_gather_setup_context(ctx, inputs, output) -> None:
    defaults = (None, None, True, None, False)  # arguments a caller of torch.ops may leave out
    x, wq, scales, mode, group_size, bits, lhs, rhs, transpose, global_scale, _ = (
        *inputs,
        *defaults[len(inputs) - 6 :],
    )
    ctx.save_for_backward(wq, scales, lhs, rhs, global_scale)
    ctx.x_shape = x.shape
    ctx.args = (mode, group_size, bits, transpose)


def _fp_gather_backward(ctx, grad):
    # As _gather_backward: the same gather with the other transpose, scattered back onto x.
    wq, scales, lhs, rhs, global_scale = ctx.saved_tensors
    mode, group_size, bits, transpose = ctx.args
    needs = ctx.needs_input_grad  # no entries for arguments that were left out
    if needs[2] or (len(needs) > 9 and needs[9]):
        _raise_constant_weight_names("fp_gather_matmul", "scales and global_scale")
    if not needs[0]:
        return (None,) * len(needs)
    x_shape = ctx.x_shape
    index_shape, x_batch = grad.shape[:-2], x_shape[:-2]
    if lhs is None:
        lhs = torch.arange(x_batch.numel(), device=grad.device).reshape(x_batch)
    if rhs is None:
        rhs = torch.arange(wq.shape[:-2].numel(), device=grad.device).reshape(wq.shape[:-2])
    lhs_flat = lhs.long().expand(index_shape).reshape(-1)
    rhs_flat = rhs.expand(index_shape).reshape(-1)
    g = grad.reshape(lhs_flat.numel(), grad.shape[-2], grad.shape[-1])
    part = torch.ops.mlxq.fp_gather_matmul(
        g, wq, scales, mode, group_size, bits, None, rhs_flat, not transpose, global_scale, False
    )
    grad_x = part.new_zeros(x_batch.numel(), x_shape[-2], x_shape[-1])
    grad_x.index_add_(0, lhs_flat, part)
    return (grad_x.reshape(x_shape),) + (None,) * (len(needs) - 1)


torch.library.register_autograd(
    "mlxq::fp_gather_matmul", _fp_gather_backward, setup_context=_fp_gather_setup_context
)


# --- decode attention ----------------------------------------------------------------------------


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of a few queries against a KV cache, in fp32 (CPU and CUDA).

    `q` [B, Hq, Lq, D], `k` and `v` [B, Hkv, Lk, D] of one dtype (float32, float16, bfloat16)
    with Hkv dividing Hq (query head h reads kv head h // (Hq // Hkv)), any strides with a
    unit-stride last dimension. `mask`: bool (True attends) or float (added to the scores),
    broadcastable to [B, Hq, Lq, Lk]. `scale` defaults to 1/sqrt(D). Scores, softmax and the
    weighted sum of `v` are fp32; the output [B, Hq, Lq, D] (contiguous) is rounded once to the
    dtype of `q`. A row that attends no key gives 0, as torch's scaled_dot_product_attention.
    Built for decode (Lq up to ~16) and correct for any Lq; not differentiable. On CPUs with
    AVX512-BF16, bf16 `q . k` uses bf16 dot products (exact products, fp32 sums), which read
    subnormal bf16 values (below 1.2e-38) as zero. The CPU kernel reads the cache in place; on
    CUDA the op is composed of ATen ops (the cache widened to fp32, each kv head's query rows
    one batched product; fp32 matmuls follow torch's TF32 setting, off by default).
    """
    return torch.ops.mlxq.decode_attention(q, k, v, mask, scale)


# Not differentiable: csrc/autograd.cpp refuses a gradient at backward time (in C++, so that
# decode calls run no Python autograd kernel).
@torch.library.register_fake("mlxq::decode_attention")
def _decode_attention_fake(q, k, v, mask=None, scale=None):
    return q.new_empty(_C.decode_attention_out_shape(q, k, v, mask, scale))


# --- RMSNorm -------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama-family RMSNorm in one call (CPU and CUDA):
    `weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype)`, normalized in fp32 (on the CPU the
    mean of the fp32 squares summed in double; on CUDA an fp32 mean of ATen ops), rounded to the
    dtype of `x`, then multiplied by `weight` in the promoted dtype of the two. Not
    differentiable (inference kernel).
    """
    return torch.ops.mlxq.rms_norm(x, weight, eps)


# Not differentiable: csrc/autograd.cpp refuses a gradient at backward time.
@torch.library.register_fake("mlxq::rms_norm")
def _rms_norm_fake(x, weight, eps):
    _C.check_rms_norm(x, weight, eps)
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


# --- rotary embedding ----------------------------------------------------------------------------


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' rotate-half rotary embedding of q and k in one call (CPU and CUDA):
    `x * cos + rotate_half(x) * sin` for x in (q, k), where rotate_half(x) is
    `cat(-x[..., D/2:], x[..., :D/2])`. Each product is rounded to the dtype of x, then their
    sum, as the separate tensor ops do, so the outputs equal the Llama family's
    `apply_rotary_pos_emb(q, k, cos, sin)` bit for bit.

    q [B, Hq, L, D] and k [B, Hk, L, D], cos and sin [1 or B, L, D] (before transformers'
    unsqueeze), all of one float dtype; the outputs keep the layouts of q and k. Not
    differentiable (inference kernel).
    """
    return torch.ops.mlxq.rotary_embedding(q, k, cos, sin)


# Not differentiable: csrc/autograd.cpp refuses a gradient at backward time.
@torch.library.register_fake("mlxq::rotary_embedding")
def _rotary_embedding_fake(q, k, cos, sin):
    _C.check_rotary_embedding(q, k, cos, sin)
    return torch.empty_like(q), torch.empty_like(k)
