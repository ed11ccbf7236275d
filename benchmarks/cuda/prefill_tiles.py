"""Times the fused sm_90a prefill's block shapes (MLXQ_CUDA_GEMM_TILE) against dense bf16
cuBLAS and the dequantized tiles + cuBLAS path, at 4 bits / group 128, in one run.

    python benchmarks/cuda/prefill_tiles.py [--m 32 128 512 768] [--shapes 28672x8192 ...]
"""

from __future__ import annotations

import argparse
import os

import mlxq
import torch
from mlxq.bench.ops_cuda import _env, graph_ms, weight_copies


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, nargs="+", default=[32, 128, 512, 768])
    p.add_argument("--shapes", nargs="+", default=["28672x8192", "8192x28672", "4096x4096"])
    p.add_argument("--tiles", nargs="+", default=["", "64", "128x2", "128w4", "256"])
    args = p.parse_args()
    gs, bits = 128, 4
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        copies, dense, gen = weight_copies(n, k, gs, bits)
        for m in args.m:
            x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
            dense_ms = graph_ms([lambda d=d, x=x: x @ d.T for d in dense])
            calls = [lambda c=c, x=x: mlxq.affine_matmul(x, *c, gs, bits) for c in copies]
            cells = [f"{shape} M={m}: dense {dense_ms:.4f}"]
            ref = x.float() @ dense[0].float().T
            for tile in args.tiles:
                with _env("MLXQ_CUDA_GEMM", "2"), _env("MLXQ_CUDA_GEMM_TILE", tile):
                    y = mlxq.affine_matmul(x, *copies[0], gs, bits).float()
                    err = float((y - ref).abs().max() / ref.abs().max())
                    ms = graph_ms(calls)
                name = tile or "auto"
                cells.append(f"fused[{name}] {ms:.4f} ({ms / dense_ms:.2f}x, err {err:.1e})")
            with _env("MLXQ_CUDA_GEMM", "0"):
                ms = graph_ms(calls)
            cells.append(f"tiles+cuBLAS {ms:.4f} ({ms / dense_ms:.2f}x)")
            with _env("MLXQ_CUDA_GEMM", os.environ.get("MLXQ_CUDA_GEMM", "1")):
                ms = graph_ms(calls)
            cells.append(f"default {ms:.4f} ({ms / dense_ms:.2f}x)")
            print(" | ".join(cells), flush=True)
        del copies, dense
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
