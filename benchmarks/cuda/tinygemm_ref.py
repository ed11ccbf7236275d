"""Times torch's int4 tinygemm (``aten._weight_int4pack_mm``, bf16) at M = 1 on the shapes of
``qmv_harness.cu``, without mlxq, so that the standalone harness's numbers have their peer from
the same machine and run:

    python benchmarks/cuda/tinygemm_ref.py [--shapes 28672x8192 4096x4096] [--gs 128 64 32]

Timing by ``mlxq.bench.ops_cuda.graph_ms``: a CUDA graph over enough weight copies to miss the L2,
replayed between CUDA events (best of 3). Bytes per second count the packed weight (N * K / 2)
and the scale/zero pairs (N * K / gs * 2 * 2 bytes), the same bytes an MLX checkpoint holds.
"""

from __future__ import annotations

import argparse
import math

import torch
from mlxq.bench.ops_cuda import graph_ms  # the benchmark's own timing


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["28672x8192", "4096x4096", "8192x28672"])
    p.add_argument("--gs", type=int, nargs="+", default=[128, 64, 32])
    args = p.parse_args()
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        for gs in args.gs:
            q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
            packed = torch.ops.aten._convert_weight_to_int4pack(q, 8)
            sz = torch.randn(k // gs, n, 2, device="cuda").bfloat16() * 0.01
            nbytes = n * k // 2 + sz.numel() * 2
            copies = max(1, min(64, math.ceil((256 << 20) / nbytes)))
            held = [(packed.clone(), sz.clone()) for _ in range(copies)]
            for m in (1, 2):
                x = torch.randn(m, k, device="cuda").bfloat16()
                calls = [
                    lambda p=p, z=z, x=x, gs=gs: torch.ops.aten._weight_int4pack_mm(x, p, gs, z)
                    for p, z in held
                ]
                ms = graph_ms(calls)
                print(
                    f"tinygemm N={n} K={k} gs={gs} M={m}: {ms * 1e3:8.2f} us "
                    f"{nbytes / (ms * 1e-3) / 1e12:6.3f} TB/s",
                    flush=True,
                )
            del held
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
