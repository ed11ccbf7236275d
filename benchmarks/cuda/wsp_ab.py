"""The fused prefill's warp-specialized kernels side by side through the op (issue #20): dense
bf16 cuBLAS and each MLXQ_CUDA_GEMM_WS_RING (read when a graph is captured) captured as
bench_ops captures them (copies of the weight past the L2, the pairs packed in each call where
the kernel reads pairs), then timed in rounds that replay every graph back to back (the order
rotating), so that all see the same SM clock; per ring the median and range over the rounds of
dense's ms per call over its.

    python benchmarks/cuda/wsp_ab.py [--rings 43l 43lt pt] [--m 512] [--rounds 12]
"""

from __future__ import annotations

import argparse
import statistics

import mlxq
import torch
from mlxq.bench.ops_cuda import _captured, _env, weight_copies


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rings", nargs="+", default=["43l", "43lt", "pt"])
    ap.add_argument("--shapes", nargs="+", default=["28672x8192", "8192x28672"])
    ap.add_argument("--m", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--replays", type=int, default=5)
    args = ap.parse_args()
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        copies, dense, gen = weight_copies(n, k, args.group_size, 4)
        x = torch.randn(args.m, k, device="cuda", generator=gen).bfloat16()
        calls = [lambda c=c, x=x: mlxq.affine_matmul(x, *c, args.group_size, 4) for c in copies]
        graphs = {"dense": (_captured([lambda d=d, x=x: x @ d.T for d in dense]), len(dense))}
        ref = None
        for ring in args.rings:
            with _env("MLXQ_CUDA_GEMM_WS_RING", ring):
                graphs[ring] = (_captured(calls), len(calls))
                y = mlxq.affine_matmul(x, *copies[0], args.group_size, 4)
            same = ref is None or torch.equal(y, ref)
            ref = y if ref is None else ref
            print(
                f"{shape} ring {ring}: y {'equal to' if same else 'DIFFERS from'} the first ring's"
            )
        names = list(graphs)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(len(names) + 1)]
        per: dict[str, list[float]] = {nm: [] for nm in names}
        for r in range(args.rounds + 1):  # round 0 warms up
            order = names[r % len(names) :] + names[: r % len(names)]
            ev[0].record()
            for i, nm in enumerate(order):
                graph, cnt = graphs[nm]
                for _ in range(args.replays):
                    graph.replay()
                ev[i + 1].record()
            ev[-1].synchronize()
            if r > 0:
                for i, nm in enumerate(order):
                    per[nm].append(ev[i].elapsed_time(ev[i + 1]) / (args.replays * graphs[nm][1]))
        print(f"{shape} M={args.m} dense ms {statistics.median(per['dense']):.4f}")
        for nm in names[1:]:
            ratios = [t / d for t, d in zip(per[nm], per["dense"], strict=True)]
            print(
                f"{shape} M={args.m} {nm}: ms {statistics.median(per[nm]):.4f} "
                f"({min(per[nm]):.4f}-{max(per[nm]):.4f}), over dense "
                f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f})"
            )
        del graphs, copies, calls, dense


if __name__ == "__main__":
    main()
