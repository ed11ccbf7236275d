"""Decode-attention microbenchmark on the CPU: mlxq.decode_attention against the fp32-widening
path it replaced (q, k, v widened to fp32, transformers' sdpa, output rounded back).

One call per layer of a 30-layer model, each layer with its own cache (as in a decode step), so
caches are not all hot in L1/L2. Shape of SmolLM2-135M: B=1, Hq=9, Hkv=3, D=64, one query,
bf16, no mask (what transformers passes for one query without padding). Prints a JSON object
{"threads=T Lk=L": {"op": us, "integration": us, "widen_fp32_sdpa": us}}, microseconds per
call, the median of 5 runs.

    python benchmarks/bench_decode_attention.py [threads, e.g. 1,2] [key lengths, e.g. 512,2048]
"""

from __future__ import annotations

import json
import sys
import time

import mlxq  # noqa: F401  (registers torch.ops.mlxq)
import torch
from mlxq.integrations import cpu_attention
from transformers.integrations.sdpa_attention import sdpa_attention_forward

LAYERS = 30
B, HQ, HKV, D = 1, 9, 3, 64


def _module() -> torch.nn.Module:
    m = torch.nn.Module()
    m.num_key_value_groups, m.is_causal = HQ // HKV, True
    return m.eval()


def _widen(module, q, k, v, mask):
    out, _ = sdpa_attention_forward(
        module, q.float(), k.float(), v.float(), mask, scaling=D**-0.5, dropout=0.0
    )
    return out.to(q.dtype)


def _op(module, q, k, v, mask):
    return torch.ops.mlxq.decode_attention(q, k, v, mask, D**-0.5)


def _integration(module, q, k, v, mask):
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


def main() -> None:
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
