"""Cold-weight decode microbenchmark of the floating-point modes (mxfp4, nvfp4, mxfp8) on the CPU.

Many copies of each weight are cycled so that every call streams its weight from DRAM, as a
decode step does; one thread. Prints a JSON object {"mode NxK": [microseconds per call, GB/s]}
(bytes: packed weight plus scales; the time includes the op's call overhead, about 5 us).

    python benchmarks/bench_fp_decode.py [modes, comma-separated] [cpu isa: avx512|avx2|portable]
"""

from __future__ import annotations

import json
import sys
import time

import mlxq
import torch

MODES = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096)]
TOTAL_BYTES = 192 << 20  # weights cycled per shape: far beyond the last-level cache


def bench(mode: str, n: int, k: int, gen: torch.Generator) -> tuple[float, float]:
    """Median over 5 runs of (microseconds per call, GB/s) for x [1, k] bf16 @ W[n, k].T."""
    gs, bits = MODES[mode]
    wbytes = n * k * bits // 8 + n * k // gs
    copies = max(2, TOTAL_BYTES // wbytes)
    ws = [
        torch.randint(0, 2**31 - 1, (n, k * bits // 32), generator=gen, dtype=torch.int32)
        for _ in range(copies)
    ]
    # scale bytes near 2^0 (E8M0) / small positive E4M3: finite results
    ss = [
        torch.randint(120, 130, (n, k // gs), generator=gen, dtype=torch.uint8)
        for _ in range(copies)
    ]
    global_scale = torch.tensor(448.0 * 6) if mode == "nvfp4" else None
    x = torch.randn(1, k, generator=gen, dtype=torch.bfloat16)
    op = torch.ops.mlxq.fp_matmul
    for i in range(copies):
        op(x, ws[i], ss[i], mode, gs, bits, True, global_scale)
    times = []
    reps = max(1, 400 // copies) * copies
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(reps):
            op(x, ws[i % copies], ss[i % copies], mode, gs, bits, True, global_scale)
        times.append((time.perf_counter() - t0) / reps)
    dt = sorted(times)[len(times) // 2]
    return dt * 1e6, wbytes / dt / 1e9


def main() -> None:
    torch.set_num_threads(1)
    modes = sys.argv[1].split(",") if len(sys.argv) > 1 else list(MODES)
    if len(sys.argv) > 2:
        mlxq._C.set_cpu_isa(sys.argv[2])
    gen = torch.Generator().manual_seed(0)
    res = {f"{m} {n}x{k}": bench(m, n, k, gen) for m in modes for n, k in SHAPES}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
