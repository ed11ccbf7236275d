"""affine_gather_matmul at decode sizes on CUDA: the decode kernel over the pairs (one launch, each
pair streaming its expert) against the composite (pairs sorted and grouped by expert, one dense
call per selected expert), side by side in one process (MLXQ_CUDA_GATHER=composite is read per
call). A Qwen3-MoE-like layer by default: 128 experts, top-8, hidden 2048, expert width 768,
4 bits, group 64, bf16, one token; each call draws other experts (all experts' weights exceed
the L2, so most selected experts stream from HBM).

  python benchmarks/cuda/bench_gather.py [--experts 128 --top 8 --hidden 2048 --inter 768]

Times, per call (ms), medians of --reps rounds of --iters calls:
- eager: the op as a model calls it, router indices given (their range check reads them back
  once: one synchronization per call on both paths);
- graph: the decode kernel alone, captured in a CUDA graph (absent indices over a stack of the
  selected experts, which nothing reads back) and replayed: a stack small enough to stay in the
  L2 (8 experts of 2048 x 768 at 4 bits: 6.7 MB), so its bandwidth is an upper bound;
- graph_router: the op as a model calls it (all experts, router indices given) captured in a
  CUDA graph, which the device-side index check allows, and replayed (20 calls per replay on the
  same indices, so the selected experts also stay in the L2).

Measured on an H200 (bf16, 4 bits, g64, top-8 of 128, ms per call, one run): eager decode path
0.069-0.076 at M = 1-8 against the composite's 0.356-0.369 (4.7-5.2x); graph replay of the
kernel alone 0.0078 (gate/up, M = 1), 0.0102 (down, M = 1), 0.024-0.031 at M = 8.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from functools import partial

import mlxq
import torch


def timed(fn, iters: int, reps: int) -> float:
    """Median over `reps` of the mean time per call of `iters` calls, in ms."""
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(iters):
            fn(i)
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / iters)
    return statistics.median(out)


def captured_ms(call, reps: int, calls: int = 20) -> float:
    """ms per call of `call` replayed from a CUDA graph of `calls` calls (warmed up eagerly
    on the capturing stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            for _ in range(calls):
                call()
    torch.cuda.current_stream().wait_stream(side)
    return timed(lambda i=0: graph.replay(), 10, reps) / calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--m", type=int, nargs="+", default=[1])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    rows = []
    # gate/up project hidden -> inter (N = inter, K = hidden), down inter -> hidden
    for name, n, k in (("gate/up", args.inter, args.hidden), ("down", args.hidden, args.inter)):
        w = torch.randn(args.experts, n, k, device=dev, dtype=dt) * 0.02
        wq, s, b = mlxq.affine_quantize(w, args.group, args.bits)
        del w
        packed = n * k * args.bits / 8 + 2 * n * (k // args.group) * 2  # per expert, bytes
        choices = [
            torch.randperm(args.experts, device=dev)[: args.top] for _ in range(args.iters + 1)
        ]
        for m in args.m:
            x = torch.randn(1, m, k, device=dev, dtype=dt)
            kw = dict(group_size=args.group, bits=args.bits)

            def eager(i=0, x=x, ops=(wq, s, b), choices=choices, kw=kw):
                return mlxq.affine_gather_matmul(x, *ops, None, choices[i], **kw)

            os.environ.pop("MLXQ_CUDA_GATHER", None)
            t_kernel = timed(eager, args.iters, args.reps)
            y_kernel = eager()
            os.environ["MLXQ_CUDA_GATHER"] = "composite"
            t_comp = timed(eager, args.iters, args.reps)
            y_comp = eager()
            os.environ.pop("MLXQ_CUDA_GATHER", None)
            diff = float((y_kernel.float() - y_comp.float()).abs().max())
            # the kernel alone: a stack of the selected experts, absent indices, in a graph
            sel = choices[0]
            w8, s8, b8 = (
                wq.view(torch.int32)[sel].contiguous().view(torch.uint32),
                s[sel].contiguous(),
                b[sel].contiguous(),
            )
            gather = mlxq.affine_gather_matmul
            t_graph = captured_ms(partial(gather, x, w8, s8, b8, None, None, **kw), args.reps)
            idx = choices[0].clone()
            t_router = captured_ms(partial(gather, x, wq, s, b, None, idx, **kw), args.reps)
            row = dict(
                proj=name,
                N=n,
                K=k,
                M=m,
                kernel_ms=round(t_kernel, 4),
                composite_ms=round(t_comp, 4),
                speedup=round(t_comp / t_kernel, 2),
                graph_kernel_ms=round(t_graph, 4),
                graph_GBps=round(args.top * packed / t_graph / 1e6, 1),
                graph_router_ms=round(t_router, 4),
                max_abs_diff=diff,
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
