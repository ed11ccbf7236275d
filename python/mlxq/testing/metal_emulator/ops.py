"""The mlxq ops executed by the Metal kernels (metal/*.metal) in the MSL emulator.

Each function has the signature of its `mlxq.ops` counterpart. It asks the native dispatch plan
(`mlxq._C.plan_affine_*`, the plan the MPS backend executes) for the kernel, grid, threadgroup
size, buffer bindings, threadgroup memory and params bytes, and runs exactly that on CPU tensors
through the emulator's `dispatch`. Outputs start filled with NaN (or all-ones bits for packed
weights), so an element a kernel forgets to write cannot pass a comparison by luck.
"""

from __future__ import annotations

import torch

from mlxq._native import _C

__all__ = ["affine_quantize", "affine_dequantize", "affine_matmul", "run_plan"]


def _poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if dtype in (torch.uint32, torch.int32):
        return torch.full(shape, -1, dtype=torch.int64).to(dtype)
    return torch.full(shape, float("nan"), dtype=dtype)


def run_plan(plan: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Dispatches `plan` with each binding's role looked up in `tensors` (params come from
    the plan). Tensors must be contiguous CPU tensors; outputs are written in place."""
    from mlxq.testing import metal_emulator as emu  # the package re-exports this module

    buffers: dict[int, torch.Tensor | bytes] = {}
    for index, role in plan["bindings"]:
        buffers[index] = plan["params"] if role == "params" else tensors[role]
    tgm = {index: nbytes for index, nbytes in plan["threadgroup_memory"]} or None
    emu.dispatch(plan["kernel"], plan["grid"], plan["threads"], buffers, threadgroup_memory=tgm)


def _packed(wq: torch.Tensor) -> torch.Tensor:
    """The packed weight as contiguous uint32 (int32 holds the same bits)."""
    wq = wq.contiguous()
    return wq.view(torch.uint32) if wq.dtype == torch.int32 else wq


def affine_quantize(
    w: torch.Tensor, group_size: int = 64, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mlxq.affine_quantize` run by the `affine_quantize_*` Metal kernel."""
    plan = _C.plan_affine_quantize(w, group_size, bits)
    qshape, sshape, _ = plan["out_shapes"]
    wq = _poisoned(qshape, torch.uint32)
    scales = _poisoned(sshape, w.dtype)
    biases = _poisoned(sshape, w.dtype)
    if not plan["empty"]:
        run_plan(plan, {"w": w.contiguous(), "wq": wq, "scales": scales, "biases": biases})
    return wq, scales, biases


def affine_dequantize(
    wq: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor,
    group_size: int = 64,
    bits: int = 4,
) -> torch.Tensor:
    """`mlxq.affine_dequantize` run by the `affine_dequantize_*` Metal kernel."""
    plan = _C.plan_affine_dequantize(wq, scales, biases, group_size, bits)
    out = _poisoned(plan["out_shapes"][0], scales.dtype)
    if not plan["empty"]:
        run_plan(
            plan,
            {
                "wq": _packed(wq),
                "scales": scales.contiguous(),
                "biases": biases.contiguous(),
                "out": out,
            },
        )
    return out


def affine_matmul(
    x: torch.Tensor,
    wq: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor,
    group_size: int = 64,
    bits: int = 4,
    transpose: bool = True,
) -> torch.Tensor:
    """`mlxq.affine_matmul` run by the kernel the plan picks (qmv, qvm or qmm).

    The kernels take scales and biases in the dtype of x; other dtypes are converted first.
    """
    plan = _C.plan_affine_matmul(x, wq, scales, biases, group_size, bits, transpose)
    out = _poisoned(plan["out_shapes"][0], x.dtype)
    if not plan["empty"]:
        run_plan(
            plan,
            {
                "x": x.contiguous(),
                "wq": _packed(wq),
                "scales": scales.to(x.dtype).contiguous(),
                "biases": biases.to(x.dtype).contiguous(),
                "out": out,
            },
        )
    return out


__all__ += ["affine_gather_matmul"]


def _flat_indices(indices, batch, shape, limit: int, name: str) -> torch.Tensor:
    """The indices (an arange over `batch` when absent) broadcast to `shape`, flattened, as the
    contiguous uint32 tensor the gather kernels read; values outside [0, limit) are refused."""
    if indices is None:
        indices = torch.arange(max(1, int(torch.Size(batch).numel()))).reshape(batch)
    flat = indices.to(torch.int64).broadcast_to(shape).reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= limit):
        raise IndexError(f"mlxq: {name} values must lie in [0, {limit})")
    return flat.to(torch.int32).contiguous().view(torch.uint32)


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
    (affine_gather_qmv, _qvm, _qmm_t or _qmm_n); `sorted_indices` is only a hint."""
    plan = _C.plan_affine_gather_matmul(
        x, wq, scales, biases, lhs_indices, rhs_indices, group_size, bits, transpose
    )
    out = _poisoned(plan["out_shapes"][0], x.dtype)
    if not plan["empty"]:
        shape = out.shape[:-2]
        x_batch, w_batch = x.shape[:-2], wq.shape[:-2]
        run_plan(
            plan,
            {
                "x": x.contiguous(),
                "wq": _packed(wq),
                "scales": scales.to(x.dtype).contiguous(),
                "biases": biases.to(x.dtype).contiguous(),
                "out": out,
                "lhs_indices": _flat_indices(
                    lhs_indices, x_batch, shape, x_batch.numel(), "lhs_indices"
                ),
                "rhs_indices": _flat_indices(
                    rhs_indices, w_batch, shape, w_batch.numel(), "rhs_indices"
                ),
            },
        )
    return out
