"""Times the op's M >= 256 prefill kernels side by side, 4 bits / group 128, bf16, in one run:
dense bf16 cuBLAS, the register-A kernel (MLXQ_CUDA_GEMM_WS=0) and the warp-specialized kernel
(gemm_sm90_ws.cuh, the half-tile last wave) with each ring of MLXQ_CUDA_GEMM_WS_RING, as ratios
to cuBLAS; each in CUDA graphs over weight copies that miss the L2 (bench_ops' timing), for
`--rounds` interleaved rounds. Then the pieces of one call, from the profiler: the device time
of the (scale, bias) packing kernel and of the GEMM kernel, per kernel choice.

    python benchmarks/cuda/prefill_rings.py [--m 256 512 768] [--shapes 28672x8192 ...]
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack

import mlxq
import torch
from mlxq.bench.ops_cuda import _env, graph_ms, weight_copies
from torch.profiler import ProfilerActivity, profile

RINGS = ["52", "43l"]


def kernels(calls, n: int = 24) -> dict[str, float]:
    """Device microseconds per call of each kernel `calls` launch (eager, profiled)."""
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            calls[i % len(calls)]()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if total > 0 and e.count >= n:
            out[e.key[:40]] = total / n
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, nargs="+", default=[256, 512, 768])
    p.add_argument("--shapes", nargs="+", default=["28672x8192", "8192x28672"])
    p.add_argument("--rings", nargs="+", default=RINGS)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    gs, bits = 128, 4
    configs = [("regA", {"MLXQ_CUDA_GEMM_WS": "0"})] + [
        (f"ws{r}", {"MLXQ_CUDA_GEMM_WS": "3", "MLXQ_CUDA_GEMM_WS_RING": r}) for r in args.rings
    ]
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        copies, dense, gen = weight_copies(n, k, gs, bits)
        for m in args.m:
            x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
            calls = [lambda c=c, x=x: mlxq.affine_matmul(x, *c, gs, bits) for c in copies]
            dense_calls = [lambda d=d, x=x: x @ d.T for d in dense]
            for rnd in range(args.rounds):
                dense_ms = graph_ms(dense_calls)
                cells = [f"{shape} M={m} r{rnd}: dense {dense_ms:.4f}"]
                for name, env in configs:
                    with ExitStack() as st:
                        for key, val in env.items():
                            st.enter_context(_env(key, val))
                        ms = graph_ms(calls)
                    cells.append(f"{name} {ms:.4f} ({ms / dense_ms:.3f}x)")
                print(" | ".join(cells), flush=True)
            if m == 512:  # the pieces of a call
                for name, env in configs:
                    with ExitStack() as st:
                        for key, val in env.items():
                            st.enter_context(_env(key, val))
                        parts = kernels(calls)
                    cells = [f"{key} {us:.1f} us" for key, us in sorted(parts.items())]
                    print(f"  pieces {shape} M={m} {name}: " + " | ".join(cells), flush=True)
        del copies, dense
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
