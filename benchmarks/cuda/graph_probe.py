"""Where the M = 512 fused prefill's time goes through the op (issue #20), in one run:

- rounds of bench_ops' CUDA-graph timing (graph_ms) of dense bf16 cuBLAS, the register-A kernel
  (MLXQ_CUDA_GEMM_WS=0), the warp-specialized kernel (default) and the same with the (scale,
  bias) pairs cached (MLXQ_CUDA_GEMM_SB_CACHE=2), interleaved, the first round before anything
  else ran on the GPU, with its SM clock and power after each round (NVML);
- the same calls launched eagerly (no graph), timed with CUDA events (device time per call:
  the host stays ahead of a 0.4 ms kernel);
- the profiler's device time of each kernel and the idle gap before it, for graph replays and
  for eager calls: whether the graph makes a kernel slower or adds work or gaps;
- 4096 x 4096 at M = 512 with the fused kernel's shapes forced (MLXQ_CUDA_GEMM=2).

    python benchmarks/cuda/graph_probe.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import ExitStack

import mlxq
import torch
from mlxq.bench.ops_cuda import _env, graph_ms, weight_copies
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

try:
    import pynvml

    pynvml.nvmlInit()
    _NVML = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
except Exception:  # noqa: BLE001 - the clocks are informative only
    _NVML = None


def clocks() -> str:
    if _NVML is None:
        return ""
    sm = pynvml.nvmlDeviceGetClockInfo(_NVML, pynvml.NVML_CLOCK_SM)
    watts = pynvml.nvmlDeviceGetPowerUsage(_NVML) / 1000
    return f"[{sm} MHz {watts:.0f} W]"


def envs(env: dict[str, str]) -> ExitStack:
    st = ExitStack()
    for key, val in env.items():
        st.enter_context(_env(key, val))
    return st


def eager_ms(calls, reps: int = 20) -> float:
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        a.record()
        for _ in range(reps):
            for fn in calls:
                fn()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / (reps * len(calls)))
    return best


def trace(run) -> dict[str, tuple[int, float, float]]:
    """Per kernel name: (count, mean device us, mean idle us before it) over one `run`."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    evs = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA
    )
    out: dict[str, list] = {}
    for i, (t0, t1, name) in enumerate(evs):
        key = name.split("<")[0].split("(")[0][:34]
        gap = t0 - evs[i - 1][1] if i > 0 else float("nan")
        out.setdefault(key, []).append((t1 - t0, gap))
    res = {}
    for key, v in out.items():
        gaps = [g for _, g in v if g == g]
        res[key] = (len(v), statistics.mean(d for d, _ in v), statistics.mean(gaps or [0.0]))
    return res


def fmt(tr: dict) -> str:
    return " | ".join(f"{k} n={n} {d:.1f} us (gap {g:.1f})" for k, (n, d, g) in sorted(tr.items()))


def probe_shape(n: int, k: int, m: int, rounds: int, configs) -> None:
    gs, bits = 128, 4
    copies, dense, gen = weight_copies(n, k, gs, bits)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    calls = [lambda c=c: mlxq.affine_matmul(x, *c, gs, bits) for c in copies]
    dense_calls = [lambda d=d: x @ d.T for d in dense]
    tag = f"{n}x{k} M={m}"
    print(f"{tag}: {len(copies)} weight copies, {len(dense)} dense copies", flush=True)
    table: dict[str, list[float]] = {"dense": []}
    for name, _ in configs:
        table[name] = []
    for rnd in range(rounds):
        table["dense"].append(graph_ms(dense_calls))
        cells = [f"dense {table['dense'][-1]:.4f} {clocks()}"]
        for name, env in configs:
            with envs(env):
                table[name].append(graph_ms(calls))
            cells.append(
                f"{name} {table[name][-1]:.4f} ({table[name][-1] / table['dense'][-1]:.3f}x)"
            )
        print(f"  graph r{rnd}: " + " | ".join(cells) + f" {clocks()}", flush=True)
    for name, v in table.items():
        ratio = [t / d for t, d in zip(v, table["dense"], strict=True)]
        print(
            f"  graph {tag} {name}: min {min(v):.4f} median {statistics.median(v):.4f} "
            f"max {max(v):.4f} ms; vs dense min {min(ratio):.3f}x median "
            f"{statistics.median(ratio):.3f}x max {max(ratio):.3f}x",
            flush=True,
        )
    for name, env in [("dense", {})] + list(configs):
        fns = dense_calls if name == "dense" else calls
        with envs(env):
            e1 = eager_ms(fns)
            e2 = eager_ms(fns)
            g = graph_ms(fns)
        print(
            f"  eager vs graph {tag} {name}: eager {e1:.4f} / {e2:.4f}, graph {g:.4f} ms"
            f" {clocks()}",
            flush=True,
        )
    for name, env in list(configs):
        with envs(env):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for fn in calls:
                    fn()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=side):
                    for fn in calls:
                        fn()
            torch.cuda.current_stream().wait_stream(side)
            graph.replay()
            torch.cuda.synchronize()

            def replays(graph=graph) -> None:
                for _ in range(8):
                    graph.replay()

            def eager() -> None:
                for _ in range(8):
                    for fn in calls:
                        fn()

            print(f"  trace graph {tag} {name}: {fmt(trace(replays))}", flush=True)
            print(f"  trace eager {tag} {name}: {fmt(trace(eager))}", flush=True)
            del graph
    del copies, dense
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--shapes", nargs="+", default=["28672x8192", "8192x28672"])
    p.add_argument("--small", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args()
    print(f"start {clocks()}", flush=True)
    configs = [
        ("regA", {"MLXQ_CUDA_GEMM_WS": "0"}),
        ("ws", {}),
        ("ws_cache", {"MLXQ_CUDA_GEMM_SB_CACHE": "2"}),
    ]
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        probe_shape(n, k, 512, args.rounds, configs)
    if args.small:  # 64 tiles of 256 x 128: the op takes dequantized tiles + cuBLAS by default
        f = {"MLXQ_CUDA_GEMM": "2"}
        small = [
            ("default", {}),
            ("ws_half", {**f, "MLXQ_CUDA_GEMM_WS": "2"}),
            ("ws_whole", {**f, "MLXQ_CUDA_GEMM_WS": "1"}),
            ("regA256", {**f, "MLXQ_CUDA_GEMM_WS": "0"}),
            ("128x2", {**f, "MLXQ_CUDA_GEMM_TILE": "128x2"}),
            ("128w4", {**f, "MLXQ_CUDA_GEMM_TILE": "128w4"}),
            ("64", {**f, "MLXQ_CUDA_GEMM_TILE": "64"}),
            ("ws_half_cache", {**f, "MLXQ_CUDA_GEMM_WS": "2", "MLXQ_CUDA_GEMM_SB_CACHE": "2"}),
        ]
        probe_small(small)


def probe_small(configs) -> None:
    n = k = 4096
    gs, bits, m = 128, 4, 512
    copies, dense, gen = weight_copies(n, k, gs, bits, seed=1)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    calls = [lambda c=c: mlxq.affine_matmul(x, *c, gs, bits) for c in copies]
    ref = (x.double() @ dense[0].double().T).float()
    for rnd in range(3):
        d = graph_ms([lambda dd=dd: x @ dd.T for dd in dense])
        cells = [f"dense {d:.4f}"]
        for name, env in configs:
            with envs(env):
                t = graph_ms(calls)
                if rnd == 0:  # each shape computes the same product
                    err = (calls[0]().float() - ref).norm() / ref.norm()
                    assert err < 1e-2, (name, float(err))
            cells.append(f"{name} {t:.4f} ({t / d:.3f}x)")
        print(f"  4096x4096 M=512 r{rnd}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
