"""The mlxq ops executed by the Metal kernels (metal/*.metal) in the MSL emulator.

Each function has the signature of its `mlxq.ops` counterpart and runs the launch the MPS
backend encodes (`mlxq._C.metal_launch_*`: the dispatch plan, the operands converted and bound
to their buffer indices, the outputs allocated), so the tested path is the shipped one: only
the encoder differs (the emulator's `dispatch` instead of a Metal command encoder). Outputs
start filled with NaN (or all-ones bits for packed weights and scale bytes), so an element a
kernel forgets to write cannot pass a comparison by luck.
"""

from __future__ import annotations

from typing import Any

import torch

from mlxq._native import _C

__all__ = [
    "affine_quantize",
    "affine_dequantize",
    "affine_matmul",
    "affine_gather_matmul",
    "fp_matmul",
    "fp_dequantize",
    "fp_quantize",
    "fp_gather_matmul",
    "run_launch",
]


def _poison(t: torch.Tensor) -> None:
    if t.dtype in (torch.uint32, torch.int32):
        t.view(torch.int32).fill_(-1)
    elif t.dtype == torch.uint8:
        t.fill_(255)
    else:
        t.fill_(float("nan"))


def run_launch(launch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """Dispatches a launch of CPU tensors (``mlxq._C.metal_launch_*``) in the emulator and
    returns its outputs (written in place; poisoned first)."""
    from mlxq.testing import metal_emulator as emu  # the package re-exports this module

    outputs = tuple(launch["outputs"])
    if launch["empty"]:
        return outputs
    for t in outputs:
        _poison(t)
    tgm = dict(launch["threadgroup_memory"]) or None
    grid, threads = launch["grid"], launch["threads"]
    emu.dispatch(launch["kernel"], grid, threads, launch["buffers"], threadgroup_memory=tgm)
    return outputs


def affine_quantize(
    w: torch.Tensor, group_size: int = 64, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mlxq.affine_quantize` run by the `affine_quantize_*` Metal kernel."""
    wq, scales, biases = run_launch(_C.metal_launch_affine_quantize(w, group_size, bits))
    return wq, scales, biases


def affine_dequantize(
    wq: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor,
    group_size: int = 64,
    bits: int = 4,
) -> torch.Tensor:
    """`mlxq.affine_dequantize` run by the `affine_dequantize_*` Metal kernel."""
    launch = _C.metal_launch_affine_dequantize(wq, scales, biases, group_size, bits)
    return run_launch(launch)[0]


def affine_matmul(
    x: torch.Tensor,
    wq: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor,
    group_size: int = 64,
    bits: int = 4,
    transpose: bool = True,
) -> torch.Tensor:
    """`mlxq.affine_matmul` run by the kernel the plan picks (qmv, qvm or qmm); the launch
    converts scales and biases to the dtype of x, as the kernels read them."""
    launch = _C.metal_launch_affine_matmul(x, wq, scales, biases, group_size, bits, transpose)
    return run_launch(launch)[0]


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
    """`mlxq.affine_gather_matmul` run by the gather kernel the plan picks
    (affine_gather_qmv, _qvm, _qmm_t or _qmm_n, or with `sorted_indices` and enough rows
    affine_gather_qmm_rhs_t/_n); the result does not depend on the hint."""
    launch = _C.metal_launch_affine_gather_matmul(
        x, wq, scales, biases, lhs_indices, rhs_indices, group_size, bits, transpose, sorted_indices
    )
    return run_launch(launch)[0]


def fp_matmul(
    x: torch.Tensor,
    wq: torch.Tensor,
    scales: torch.Tensor,
    mode: str,
    group_size: int,
    bits: int,
    transpose: bool = True,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`torch.ops.mlxq.fp_matmul` (mxfp4, nvfp4, mxfp8) run by fp_qmv or fp_qmm."""
    launch = _C.metal_launch_fp_matmul(
        x, wq, scales, mode, group_size, bits, transpose, global_scale
    )
    return run_launch(launch)[0]


def fp_dequantize(
    wq: torch.Tensor,
    scales: torch.Tensor,
    mode: str,
    group_size: int,
    bits: int,
    global_scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`torch.ops.mlxq.fp_dequantize` run by the `fp_dequantize_*` Metal kernel."""
    launch = _C.metal_launch_fp_dequantize(wq, scales, mode, group_size, bits, global_scale, dtype)
    return run_launch(launch)[0]


def fp_quantize(
    w: torch.Tensor,
    mode: str,
    group_size: int,
    bits: int,
    global_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.ops.mlxq.fp_quantize` run by the `fp_quantize_*` Metal kernel."""
    wq, scales = run_launch(_C.metal_launch_fp_quantize(w, mode, group_size, bits, global_scale))
    return wq, scales


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
    """`torch.ops.mlxq.fp_gather_matmul` run by the gather kernel the plan picks (fp_gather_qmv,
    _qmm_t or _qmm_n, or with `sorted_indices` and enough rows fp_gather_qmm_rhs_t/_n)."""
    launch = _C.metal_launch_fp_gather_matmul(
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
    return run_launch(launch)[0]
