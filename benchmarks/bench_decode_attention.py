"""Decode-attention microbenchmark: mlxq.decode_attention against the fp32-widening path it
replaced (q, k, v widened to fp32, transformers' sdpa, output rounded back), on the CPU; with
--device cuda, the CUDA kernel against the ATen composite it replaced and torch's own bf16 SDPA.

One call per layer of a 30-layer model, each layer with its own cache (as in a decode step), so
caches are not all hot in L1/L2. Shape of SmolLM2-135M: B=1, Hq=9, Hkv=3, D=64, one query,
bf16, no mask (what transformers passes for one query without padding). Prints a JSON object
{"threads=T Lk=L": {"op": us, "integration": us, "widen_fp32_sdpa": us}}, microseconds per
call, the median of 5 runs.

    python benchmarks/bench_decode_attention.py [threads, e.g. 1,2] [key lengths, e.g. 512,2048]
    python benchmarks/bench_decode_attention.py --device cuda [key lengths]

On CUDA: bf16, one query, no mask and a static cache's bool mask (the first quarter of the
positions attended); shapes (B, Hq, Hkv, D) of SmolLM2-135M (1, 9, 3, 64), Llama-3-8B
(1, 32, 8, 128) and the latter at batch 8. Microseconds per call of each path, eager (a loop of
calls over 30 layers' caches, timed with CUDA events: launch costs included) and replayed from a
CUDA graph of the 30 calls (the GPU's time alone). The peer, torch's SDPA, computes in bf16 (not
the op's fp32 contract) and takes no mask here.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import mlxq  # noqa: F401  (registers torch.ops.mlxq)
import torch

LAYERS = 30
B, HQ, HKV, D = 1, 9, 3, 64


def _module() -> torch.nn.Module:
    m = torch.nn.Module()
    m.num_key_value_groups, m.is_causal = HQ // HKV, True
    return m.eval()


def _widen(module, q, k, v, mask):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # CPU paths only

    out, _ = sdpa_attention_forward(
        module, q.float(), k.float(), v.float(), mask, scaling=D**-0.5, dropout=0.0
    )
    return out.to(q.dtype)


def _op(module, q, k, v, mask):
    return torch.ops.mlxq.decode_attention(q, k, v, mask, D**-0.5)


def _integration(module, q, k, v, mask):
    from mlxq.integrations import cpu_attention

    return cpu_attention._attention(module, q, k, v, mask, scaling=D**-0.5, dropout=0.0)[0]


PATHS = {"op": _op, "integration": _integration, "widen_fp32_sdpa": _widen}


def _time(fn, module, qs, ks, vs) -> float:
    for i in range(LAYERS):
        fn(module, qs[i], ks[i], vs[i], None)
    times = []
    for _ in range(5):
        reps = 10
        t0 = time.perf_counter()
        for _ in range(reps):
            for i in range(LAYERS):
                fn(module, qs[i], ks[i], vs[i], None)
        times.append((time.perf_counter() - t0) / (reps * LAYERS))
    return sorted(times)[2] * 1e6


CUDA_SHAPES = [(1, 9, 3, 64), (1, 32, 8, 128), (8, 32, 8, 128)]


def _cuda_time(fn: Callable[[int], object], layers: int) -> tuple[float, float]:
    """(eager, graph) microseconds per call of fn(layer), the median of 5 runs of 10 x layers."""
    for i in range(layers):
        fn(i)
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(body) -> float:
        times = []
        for _ in range(5):
            start.record()
            body()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) * 1e3 / (10 * layers))
        return sorted(times)[2]

    eager = timed(lambda: [fn(i) for _ in range(10) for i in range(layers)])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            for i in range(layers):
                fn(i)
    torch.cuda.current_stream().wait_stream(side)
    return eager, timed(lambda: [graph.replay() for _ in range(10)])


def _cuda_case(b: int, hq: int, hkv: int, d: int, lk: int, gen: torch.Generator) -> dict:
    from mlxq import _C

    layers = max(2, min(LAYERS, (2 << 30) // (4 * b * hkv * lk * d)))  # caches <= 2 GiB

    def rand(*size):
        return [torch.randn(size, device="cuda", generator=gen).bfloat16() for _ in range(layers)]

    qs, ks, vs = rand(b, hq, 1, d), rand(b, hkv, lk, d), rand(b, hkv, lk, d)
    static = torch.zeros(b, 1, 1, lk, dtype=torch.bool, device="cuda")
    static[..., : lk // 4] = True
    sdpa = torch.nn.functional.scaled_dot_product_attention
    paths = {
        "kernel": lambda i: torch.ops.mlxq.decode_attention(qs[i], ks[i], vs[i]),
        "composite": lambda i: _C.composite_decode_attention(qs[i], ks[i], vs[i]),
        "kernel_static_mask": lambda i: torch.ops.mlxq.decode_attention(
            qs[i], ks[i], vs[i], static
        ),
        "composite_static_mask": lambda i: _C.composite_decode_attention(
            qs[i], ks[i], vs[i], static
        ),
        "torch_sdpa_bf16": lambda i: sdpa(qs[i], ks[i], vs[i], enable_gqa=True),
    }
    row = {}
    for name, fn in paths.items():
        eager, graph = _cuda_time(fn, layers)
        row[name] = {"eager": round(eager, 1), "graph": round(graph, 1)}
    return row


def main_cuda(lengths: list[int]) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    res = {}
    with torch.no_grad():
        for b, hq, hkv, d in CUDA_SHAPES:
            for lk in lengths:
                key = f"B={b} Hq={hq} Hkv={hkv} D={d} Lk={lk}"
                res[key] = _cuda_case(b, hq, hkv, d, lk, gen)
                print(key, res[key], file=sys.stderr)
    print(json.dumps(res, indent=1))


def main() -> None:
    if "--device" in sys.argv:
        at = sys.argv.index("--device")
        device = sys.argv[at + 1]
        rest = sys.argv[1:at] + sys.argv[at + 2 :]
        if device == "cuda":
            main_cuda([int(n) for n in (rest[0] if rest else "512,4096,32768").split(",")])
            return
        sys.argv = [sys.argv[0], *rest]
    threads = [int(t) for t in (sys.argv[1] if len(sys.argv) > 1 else "1,2").split(",")]
    lengths_arg = sys.argv[2] if len(sys.argv) > 2 else "64,512,1024,2048"
    lengths = [int(n) for n in lengths_arg.split(",")]
    gen = torch.Generator().manual_seed(0)
    module = _module()
    res = {}
    with torch.no_grad():
        for lk in lengths:
            qs = [torch.randn(B, HQ, 1, D, generator=gen).bfloat16() for _ in range(LAYERS)]
            ks = [torch.randn(B, HKV, lk, D, generator=gen).bfloat16() for _ in range(LAYERS)]
            vs = [torch.randn(B, HKV, lk, D, generator=gen).bfloat16() for _ in range(LAYERS)]
            for t in threads:
                torch.set_num_threads(t)
                res[f"threads={t} Lk={lk}"] = {
                    name: round(_time(fn, module, qs, ks, vs), 1) for name, fn in PATHS.items()
                }
                print(f"threads={t} Lk={lk}", res[f"threads={t} Lk={lk}"], file=sys.stderr)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
