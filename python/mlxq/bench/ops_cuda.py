"""Op benchmark on an NVIDIA GPU: mlxq's affine_matmul vs torch's int4 tinygemm vs dense bf16,
and the float modes' decode (fp_matmul, M <= 8) vs their composite op vs dense bf16.

Each row is one (shape, bits, group size, M); columns are milliseconds per call of
- ``mlxq_bf16`` (bf16 x, bf16 scales) and ``mlxq_fp32`` (M = 1 only),
- ``mlxq_prev``: the same call on the path mlxq took before its tensor-core kernels (4 bits:
  the CUDA-core decode for M <= 8, dequantized tiles + cuBLAS above, selected with
  ``MLXQ_CUDA_DECODE=cores`` / ``MLXQ_CUDA_GEMM=0``; 2, 3, 5 and 6 bits at M <= 2: the
  CUDA-core decode, ``MLXQ_CUDA_LOWBIT=0``; read by the op on every call),
- ``tinygemm``: ``torch.ops.aten._weight_int4pack_mm`` (bf16, 4-bit, same group size),
- ``dense_bf16``: cuBLAS ``x @ W.T`` with the dequantized bf16 weight,
plus ``copy_TBps``, the device copy bandwidth (bytes read + written per second) measured in the
same run (and ``read_TBps``, a plain fp32 sum, in the run's info), and the ratios:
``x_vs_tinygemm`` and ``x_vs_dense`` (> 1: mlxq is faster),
``x_vs_dense_paired`` (dense over mlxq again, the median of rounds that time the two graphs
back to back: steadier while the GPU's clock moves; ``paired_range`` its rounds' min-max),
``mlxq_TBps`` (packed weight, scale and bias bytes per second at M = 1) and ``of_copy``
(that bandwidth as a fraction of the copy bandwidth).

Float-mode rows (``--modes mxfp4 nvfp4 mxfp8``, M <= 8) have columns ``mlxq_bf16`` (the
streaming decode kernel, csrc/cuda/fp_qmv.cuh; ``mlxq_fp32`` at M = 1), ``composite`` (the same
call through the composite op: the weight decoded by ATen ops, then cuBLAS, selected with
``MLXQ_CUDA_FP_DECODE=composite``), ``dense_bf16``, ``x_vs_composite`` and ``x_vs_dense_bf16``,
``mlxq_TBps`` (packed code and scale bytes per second) and ``of_copy``, and ``var_b`` ..
``var_d``, the kernel's other shapes (``MLXQ_CUDA_FP_VARIANT``).

Timing: each method is captured in a CUDA graph that calls it on enough copies of its
weights to overflow the L2 cache (a decoding model never finds a layer's weights in L2), and
the graph is replayed between CUDA events, so launch overhead on the CPU is left out for all
methods alike.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

import mlxq

# N x K; Llama-3-8B-class decode (Mistral alike): q / o 4096 x 4096, k / v 1024 x 4096, gate /
# up 14336 x 4096, down 4096 x 14336; any other "NxK" is taken as written (shape_of)
SHAPES = {
    "4096x4096": (4096, 4096),
    "28672x8192": (28672, 8192),
    "8192x28672": (8192, 28672),
    "1024x4096": (1024, 4096),
    "14336x4096": (14336, 4096),
    "4096x14336": (4096, 14336),
}
L2_SPILL_BYTES = 256 << 20  # several times the H100/H200 L2 (50 MB)


def shape_of(name: str) -> tuple[int, int]:
    """(N, K) of a shape name "NxK"."""
    if name in SHAPES:
        return SHAPES[name]
    n, sep, k = name.lower().partition("x")
    if not sep or not n.isdigit() or not k.isdigit():
        raise ValueError(f"shape {name!r} is not NxK")
    return int(n), int(k)


def parse_env_variants(specs: list[str] | None) -> dict[str, dict[str, str]]:
    """``NAME:VAR=VAL[,VAR=VAL]`` -> {NAME: {VAR: VAL}}: columns ``mlxq_NAME`` timed with those
    environment variables set (the op reads its kernel switches on every call)."""
    out: dict[str, dict[str, str]] = {}
    for spec in specs or []:
        name, sep, assigns = spec.partition(":")
        if not sep or not name:
            raise ValueError(f"env variant {spec!r} is not NAME:VAR=VAL[,VAR=VAL]")
        env = {}
        for a in assigns.split(","):
            var, eq, val = a.partition("=")
            if not eq or not var:
                raise ValueError(f"env variant {spec!r}: {a!r} is not VAR=VAL")
            env[var] = val
        out[name] = env
    return out


def _captured(calls: list[Callable[[], object]]) -> torch.cuda.CUDAGraph:
    """`calls` captured in a CUDA graph (warmed up outside the capture), replayed once."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in calls:  # warm up (cuBLAS workspaces, lazy init) outside the capture
            fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            for fn in calls:
                fn()
    torch.cuda.current_stream().wait_stream(side)
    graph.replay()
    torch.cuda.synchronize()
    return graph


def graph_ms(calls: list[Callable[[], object]], replays: int = 20) -> float:
    """Milliseconds per call of `calls`, captured once in a CUDA graph and replayed."""
    graph = _captured(calls)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(3):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (replays * len(calls)))
    return min(times)


def paired_ratio(
    calls: list[Callable[[], object]],
    peer: list[Callable[[], object]],
    rounds: int = 12,
    replays: int = 5,
) -> tuple[float, float, float]:
    """(median, min, max) over `rounds` of the peer's ms per call over that of `calls`, both
    captured in CUDA graphs and timed back to back in each round (which goes first alternates),
    so that both see the GPU at the same clock. Near its power limit an H200 moved its SM clock
    between 1440 and 1980 MHz within one run, and each graph_ms with it by up to 10%, so that
    two graph_ms taken seconds apart can disagree on a ratio by more than a kernel change
    (benchmarks/cuda/graph_probe.py)."""
    mine, theirs = _captured(calls), _captured(peer)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    ratios = []
    for r in range(rounds + 1):  # round 0 warms up
        order = [(mine, len(calls)), (theirs, len(peer))]
        if r % 2:
            order.reverse()
        ev[0].record()
        for i, (graph, _) in enumerate(order):
            for _ in range(replays):
                graph.replay()
            ev[i + 1].record()
        ev[2].synchronize()
        per_call = [ev[i].elapsed_time(ev[i + 1]) / (replays * n) for i, (_, n) in enumerate(order)]
        if r % 2:
            per_call.reverse()
        if r > 0:
            ratios.append(per_call[1] / per_call[0])
    return statistics.median(ratios), min(ratios), max(ratios)


@contextmanager
def _env(name: str, value: str):
    with _envs({name: value}):
        yield


@contextmanager
def _envs(values: dict[str, str]):
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, v in old.items():
            if v is None:
                del os.environ[name]
            else:
                os.environ[name] = v


def _warm_clock(fn: Callable[[], object], seconds: float = 0.5) -> None:
    """Run `fn` for about `seconds`: an idle H200 sits at a few hundred MHz and its first
    timings of a memory-bound loop read well under the sustained rate (2.8 TB/s against ~4)."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        torch.cuda.synchronize()


def copy_tbps(nbytes: int = 2 << 30) -> float:
    """Device copy bandwidth: (bytes read + bytes written) per second, in TB/s (the clock
    warmed first, the best of three graph timings)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    _warm_clock(lambda: dst.copy_(src))
    ms = graph_ms([lambda: dst.copy_(src)], replays=10)
    return 2 * nbytes / (ms * 1e-3) / 1e12


def read_tbps(nbytes: int = 2 << 30) -> float:
    """Device read bandwidth (a sum over `nbytes` of fp32, timed eagerly after a warm-up), in
    TB/s."""
    src = torch.ones(nbytes // 4, device="cuda")
    _warm_clock(src.sum)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        src.sum()
    end.record()
    end.synchronize()
    return nbytes / (start.elapsed_time(end) / 10 * 1e-3) / 1e12


def _copies(nbytes: int) -> int:
    return max(1, min(64, math.ceil(L2_SPILL_BYTES / max(nbytes, 1))))


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_copies(
    n: int, k: int, group_size: int = 128, bits: int = 4, seed: int = 0, device: str = "cuda"
) -> tuple[list[tuple[torch.Tensor, ...]], list[torch.Tensor], torch.Generator]:
    """A random [n, k] weight (std 0.02) quantized with bf16 scales and biases, in as many
    copies (wq, scales, biases) as a timing cycles through to miss the L2, and its dequantized
    bf16 form likewise. Also the seeded generator that drew the weight: x is drawn from it next,
    so that every harness times the same data."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, device=device, generator=gen) * 0.02
    wq, s, b = mlxq.affine_quantize(w, group_size, bits)
    del w
    s, b = s.bfloat16(), b.bfloat16()
    copies = [(wq.clone(), s.clone(), b.clone()) for _ in range(_copies(_nbytes(wq, s, b)))]
    wd = mlxq.affine_dequantize(wq, s, b, group_size, bits)
    dense = [wd.clone() for _ in range(_copies(_nbytes(wd)))]
    return copies, dense, gen


def _tinygemm(n: int, k: int, group_size: int, x: torch.Tensor):
    """Calls of torch's int4 tinygemm on copies of a random int4 weight, or None."""
    op = getattr(torch.ops.aten, "_weight_int4pack_mm", None)
    conv = getattr(torch.ops.aten, "_convert_weight_to_int4pack", None)
    if op is None or conv is None:
        return None
    # torch >= 2.5 takes the weight as uint8 [N, K/2] (two 4-bit values a byte)
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    packed = conv(q, 8)  # 8 inner k tiles, tinygemm's fastest layout
    sz = torch.randn(k // group_size, n, 2, device="cuda").bfloat16() * 0.01
    copies = [(packed.clone(), sz.clone()) for _ in range(_copies(_nbytes(packed, sz)))]
    return [lambda p=p, z=z: op(x, p, group_size, z) for p, z in copies]


def bench_row(
    n: int,
    k: int,
    bits: int,
    group_size: int,
    m: int,
    copy_bw: float,
    variants: dict[str, dict[str, str]] | None = None,
) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    wq, s, b = mlxq.affine_quantize(w, group_size, bits)
    del w
    sb, bb = s.bfloat16(), b.bfloat16()
    x = torch.randn(m, k, device="cuda", generator=gen)
    xb = x.bfloat16()
    row: dict = {"N": n, "K": k, "bits": bits, "group_size": group_size, "M": m}
    packed = _nbytes(wq, sb, bb)
    copies = [(wq.clone(), sb.clone(), bb.clone()) for _ in range(_copies(packed))]
    calls = [lambda c=c: mlxq.affine_matmul(xb, c[0], c[1], c[2], group_size, bits) for c in copies]
    row["mlxq_bf16"] = graph_ms(calls)
    for name, env in (variants or {}).items():  # timed beside the default, in this process
        with _envs(env):
            row[f"mlxq_{name}"] = graph_ms(calls)
        row[f"{name}_vs_default"] = row["mlxq_bf16"] / row[f"mlxq_{name}"]
    if bits == 4:  # the path before the tensor-core kernels (chosen when the graph is captured)
        with _env(*(("MLXQ_CUDA_DECODE", "cores") if m <= 8 else ("MLXQ_CUDA_GEMM", "0"))):
            row["mlxq_prev"] = graph_ms(calls)
    elif m <= 2 and bits != 8:  # the CUDA-core decode before qmv_lowbit's tensor-core kernel
        with _env("MLXQ_CUDA_LOWBIT", "0"):
            row["mlxq_prev"] = graph_ms(calls)
    if m == 1:
        copies32 = [(c[0], c[1].float(), c[2].float()) for c in copies]
        row["mlxq_fp32"] = graph_ms(
            [lambda c=c: mlxq.affine_matmul(x, *c, group_size, bits) for c in copies32]
        )
        del copies32
    if bits == 4 and (tiny := _tinygemm(n, k, group_size, xb)):
        row["tinygemm"] = graph_ms(tiny)
        del tiny
    wd = mlxq.affine_dequantize(wq, sb, bb, group_size, bits)
    dense = [wd.clone() for _ in range(_copies(_nbytes(wd)))]
    dense_calls = [lambda d=d: xb @ d.T for d in dense]
    row["dense_bf16"] = graph_ms(dense_calls)
    ratio, lo, hi = paired_ratio(calls, dense_calls)
    row["x_vs_dense_paired"] = ratio
    row["paired_range"] = f"{lo:.3f}-{hi:.3f}"
    del dense, dense_calls, wd, copies, calls
    best = row["mlxq_bf16"]
    row["packed_MB"] = packed / 1e6
    row["copy_TBps"] = copy_bw
    if m == 1:
        row["mlxq_TBps"] = packed / (best * 1e-3) / 1e12
        row["of_copy"] = row["mlxq_TBps"] / copy_bw
    for peer in ("tinygemm", "dense_bf16"):
        if peer in row:
            row[f"x_vs_{peer}"] = row[peer] / best
    torch.cuda.empty_cache()
    return row


FP_MODES = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}


def bench_fp_row(n: int, k: int, mode: str, m: int, copy_bw: float) -> dict:
    """One float-mode decode row: random codes and scale bytes (the timing does not depend on
    their values), bf16 x."""
    group, bits = FP_MODES[mode]
    gen = torch.Generator(device="cuda").manual_seed(0)
    words = torch.randint(-(2**31), 2**31, (n, k * bits // 32), device="cuda", generator=gen)
    wq = words.to(torch.int32).view(torch.uint32)
    s = torch.randint(118, 122, (n, k // group), device="cuda", generator=gen).to(torch.uint8)
    x = torch.randn(m, k, device="cuda", generator=gen)
    xb = x.bfloat16()
    row: dict = {"N": n, "K": k, "mode": mode, "M": m}
    packed = _nbytes(wq, s)
    copies = [(wq.clone(), s.clone()) for _ in range(_copies(packed))]

    def calls(xx: torch.Tensor, copies: list) -> list[Callable[[], object]]:
        return [
            lambda c=c: mlxq.quantized_matmul(xx, c[0], c[1], None, True, group, bits, mode)
            for c in copies
        ]

    row["mlxq_bf16"] = graph_ms(calls(xb, copies))
    if m == 1:
        row["mlxq_fp32"] = graph_ms(calls(x, copies))
    for v in "bcd":
        with _env("MLXQ_CUDA_FP_VARIANT", v):
            row[f"var_{v}"] = graph_ms(calls(xb, copies))
    with _env("MLXQ_CUDA_FP_DECODE", "composite"):
        row["composite"] = graph_ms(calls(xb, copies), replays=3)
    del copies
    wd = torch.randn(n, k, device="cuda", generator=gen).bfloat16()
    dense = [wd.clone() for _ in range(_copies(_nbytes(wd)))]
    row["dense_bf16"] = graph_ms([lambda d=d: xb @ d.T for d in dense])
    del dense, wd
    best = row["mlxq_bf16"]
    row["packed_MB"] = packed / 1e6
    row["mlxq_TBps"] = packed / (best * 1e-3) / 1e12
    row["of_copy"] = row["mlxq_TBps"] / copy_bw
    for peer in ("composite", "dense_bf16"):
        row[f"x_vs_{peer}"] = row[peer] / best
    torch.cuda.empty_cache()
    return row


def eager_ms(fn: Callable[[], object], calls: int = 50) -> float:
    """Milliseconds per call of `fn`, run eagerly (for ops that read indices on the host)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def bench_fp_gather_row(mode: str, experts: int = 32, n: int = 5760, k: int = 2880) -> dict:
    """MoE decode (gpt-oss-20b's expert MLP up-projection: 32 experts of 5760 x 2880, top 4,
    one token): fp_gather_matmul eagerly (it checks its indices on the host) through the decode
    kernel's gather and through the composite, each on enough expert stacks to miss L2."""
    group, bits = FP_MODES[mode]
    gen = torch.Generator(device="cuda").manual_seed(0)
    words = torch.randint(
        -(2**31), 2**31, (experts, n, k * bits // 32), device="cuda", generator=gen
    )
    wq = words.to(torch.int32).view(torch.uint32)
    del words
    s = torch.randint(118, 122, (experts, n, k // group), device="cuda", generator=gen)
    s = s.to(torch.uint8)
    x = torch.randn(1, 1, k, device="cuda", generator=gen).bfloat16()
    rhs = torch.tensor([[3, 17, 8, 29]], device="cuda")
    stacks = [(wq.clone(), s.clone()) for _ in range(2)]  # 4 experts a call: ~33 MB each
    state = {"i": 0}

    def call() -> object:
        w, sc = stacks[state["i"] % len(stacks)]
        state["i"] += 1
        return mlxq.gather_quantized_matmul(x, w, sc, None, None, rhs, True, group, bits, mode)

    row: dict = {"N": n, "K": k, "mode": mode, "experts": experts, "top_k": 4}
    row["mlxq_bf16"] = eager_ms(call)
    with _env("MLXQ_CUDA_FP_DECODE", "composite"):
        row["composite"] = eager_ms(call, calls=10)
    row["x_vs_composite"] = row["composite"] / row["mlxq_bf16"]
    packed = 4 * _nbytes(wq[0], s[0])
    row["mlxq_TBps"] = packed / (row["mlxq_bf16"] * 1e-3) / 1e12
    del wq, s
    torch.cuda.empty_cache()
    return row


FP_COLUMNS = [
    "shape",
    "mode",
    "M",
    "mlxq_bf16",
    "mlxq_fp32",
    "var_b",
    "var_c",
    "var_d",
    "composite",
    "dense_bf16",
    "x_vs_composite",
    "x_vs_dense_bf16",
    "mlxq_TBps",
    "of_copy",
]

GATHER_COLUMNS = [
    "shape",
    "mode",
    "experts",
    "top_k",
    "mlxq_bf16",
    "composite",
    "x_vs_composite",
    "mlxq_TBps",
]

COLUMNS = [
    "shape",
    "bits",
    "group_size",
    "M",
    "mlxq_bf16",
    "mlxq_fp32",
    "mlxq_prev",
    "tinygemm",
    "dense_bf16",
    "x_vs_tinygemm",
    "x_vs_dense_bf16",
    "x_vs_dense_paired",
    "paired_range",
    "mlxq_TBps",
    "of_copy",
]


def run(
    shapes: list[str],
    bits_list: list[int],
    group_sizes: list[int],
    ms: list[int],
    modes: list[str] | None = None,
    variants: dict[str, dict[str, str]] | None = None,
) -> tuple[dict, list[dict]]:
    """Benchmark every combination (float `modes` at the decode sizes M <= 8 only); returns
    (info, rows). `variants` (parse_env_variants): columns timed with environment variables
    set."""
    copy_bw = copy_tbps()
    info = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
        "copy_TBps": copy_bw,
        "read_TBps": read_tbps(),
    }
    rows = []
    columns = list(COLUMNS)
    for name in variants or {}:
        columns[columns.index("mlxq_prev") : columns.index("mlxq_prev")] = [
            f"mlxq_{name}",
            f"{name}_vs_default",
        ]
    for shape in shapes:
        n, k = shape_of(shape)
        for bits in bits_list:
            for gs in group_sizes:
                # the other widths only at M = 1, where the packed size sets the speed
                for m in ms if bits == 4 else [1]:
                    rows.append(bench_row(n, k, bits, gs, m, copy_bw, variants))
                    print(" | ".join(_cell(rows[-1], c) for c in columns), flush=True)
        for mode in modes or []:
            for m in [m for m in ms if m <= 8]:
                rows.append(bench_fp_row(n, k, mode, m, copy_bw))
                print(" | ".join(_cell(rows[-1], c) for c in FP_COLUMNS), flush=True)
    for mode in modes or []:
        rows.append(bench_fp_gather_row(mode))
        print(" | ".join(_cell(rows[-1], c) for c in GATHER_COLUMNS), flush=True)
    return info, rows


def _cell(row: dict, col: str) -> str:
    v = f"{row['N']}x{row['K']}" if col == "shape" else row.get(col)
    return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def format_table(rows: list[dict]) -> str:
    """The affine rows, then the float-mode rows, as markdown tables."""
    tables = []
    affine = list(COLUMNS)
    names = [c[: -len("_vs_default")] for r in rows for c in r if c.endswith("_vs_default")]
    for name in dict.fromkeys(names):  # the environment variants' columns, in their order
        at = affine.index("mlxq_prev")
        affine[at:at] = [f"mlxq_{name}", f"{name}_vs_default"]
    for columns, kind in (
        (affine, [r for r in rows if "mode" not in r]),
        (FP_COLUMNS, [r for r in rows if "mode" in r and "experts" not in r]),
        (GATHER_COLUMNS, [r for r in rows if "experts" in r]),
    ):
        if kind:
            lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
            lines += [" | ".join(_cell(r, c) for c in columns) for r in kind]
            tables.append("\n".join(lines))
    return "\n\n".join(tables)
