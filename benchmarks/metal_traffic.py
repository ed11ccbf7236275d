"""Device-memory traffic of the Metal kernels, measured by the MSL emulator.

For each kernel, one representative dispatch (through the dispatch plan, exactly as the MPS
backend would launch it) and the bytes read per buffer against the minimum (each byte of the
tensor read once). The bounds the tests enforce: qmv/qvm/quantize/dequantize read packed
weights, scales and biases exactly once; qmm reads them once per row-block of x (grid y), with
scales of groups wider than a 32-column tile read once per tile for transpose=False.

A second table is MoE prefill: pairs of one token row each, rhs indices sorted by expert in runs
of equal length, through the sorted gather qmm (sorted_indices=True) and through the per-pair
gather kernel the plan picks without the hint; weight bytes read per token against one expert.

    python benchmarks/metal_traffic.py [--bits 4] [--group-size 64] [--dtype float16]
"""

from __future__ import annotations

import argparse

import mlxq
import torch
from mlxq._native import _C
from mlxq.testing import metal_emulator as emu
from mlxq.testing.metal_emulator import ops as metal_ops

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _row(name: str, plan: dict, rep, tensors: dict[str, torch.Tensor]) -> str:
    cells = []
    for index, role in plan["bindings"]:
        if role in tensors and role in ("wq", "scales", "biases", "x", "w"):
            got, minimum = rep.bytes_read[index], tensors[role].nbytes
            cells.append(f"{role} {got} / {minimum} (x{got / minimum:.2f})")
    tgm = sum(b for _, b in plan["threadgroup_memory"])
    written = sum(rep.bytes_written.values())
    return (
        f"| {name} | {rep.kernel} | {tuple(rep.grid)} | {tuple(rep.threads_per_threadgroup)} "
        f"| {tgm} | {'; '.join(cells)} | {written} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--dtype", choices=DTYPES, default="float16")
    ap.add_argument("--n", type=int, default=256, help="rows of the weight")
    ap.add_argument("--k", type=int, default=1024, help="columns of the weight")
    args = ap.parse_args()
    if not emu.available():
        raise SystemExit("the MSL emulator needs clang (pip install ziglang)")
    gs, bits, dtype, N, K = args.group_size, args.bits, DTYPES[args.dtype], args.n, args.k
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g).to(dtype)
    wq, s, b = mlxq.affine_quantize(w, gs, bits)

    print(f"bits={bits} group_size={gs} dtype={args.dtype} weight [N={N}, K={K}]\n")
    print("| case | kernel | grid | threads | tg mem B | bytes read / minimum | written B |")
    print("|---|---|---|---|---|---|---|")
    cases = [
        ("decode M=1", 1, True),
        ("decode M=8", 8, True),
        ("decode^T M=4", 4, False),
        ("prefill M=64", 64, True),
        ("prefill^T M=64", 64, False),
    ]
    for name, M, transpose in cases:
        x = torch.randn(M, K if transpose else N, generator=g).to(dtype)
        plan = _C.plan_affine_matmul(x, wq, s, b, gs, bits, transpose)
        metal_ops.affine_matmul(x, wq, s, b, gs, bits, transpose)
        rep = emu.last_dispatch_report()
        print(_row(f"{name}", plan, rep, {"x": x, "wq": wq, "scales": s, "biases": b}))
    plan = _C.plan_affine_quantize(w, gs, bits)
    metal_ops.affine_quantize(w, gs, bits)
    print(_row("quantize", plan, emu.last_dispatch_report(), {"w": w}))
    plan = _C.plan_affine_dequantize(wq, s, b, gs, bits)
    metal_ops.affine_dequantize(wq, s, b, gs, bits)
    print(
        _row("dequantize", plan, emu.last_dispatch_report(), {"wq": wq, "scales": s, "biases": b})
    )
    _moe_table(gs, bits, dtype, g)


def _moe_table(gs: int, bits: int, dtype: torch.dtype, g: torch.Generator) -> None:
    experts, n, k, pairs = 32, 64, 256, 128  # 128 rows >= 4 rows per expert: the sorted path
    w = torch.randn(experts, n, k, generator=g).to(dtype)
    wq, s, b = mlxq.affine_quantize(w, gs, bits)
    x = torch.randn(pairs, 1, k, generator=g).to(dtype)
    expert_bytes = n * k * bits // 8
    print(f"\nMoE prefill: {experts} experts [N={n}, K={k}], {pairs} pairs of one row\n")
    print("| run length | kernel | weight bytes / token | fraction of one expert |")
    print("|---|---|---|---|")
    for run in (1, 4, 16, 64, 128):
        rhs = torch.arange(pairs) // run % experts
        for hint in (True, False):
            metal_ops.affine_gather_matmul(x, wq, s, b, None, rhs, gs, bits, True, hint)
            rep = emu.last_dispatch_report()
            per_token = rep.bytes_read[1] / pairs
            print(f"| {run} | {rep.kernel} | {per_token:.0f} | {per_token / expert_bytes:.3f} |")


if __name__ == "__main__":
    main()
