"""Op benchmark: mlxq's affine_matmul against its peers on the CPU (``--device cuda``: on an
NVIDIA GPU against torch's int4 tinygemm and dense bf16, see mlxq.bench.ops_cuda).

Each row is one (shape, bits, M); columns are median milliseconds of
- ``mlxq`` fp32 and bf16 activations,
- ``mlx`` ``mx.quantized_matmul`` in fp32 (the same packed weights),
- ``int4pack``: ``torch._weight_int4pack_mm_for_cpu`` with bf16 activations (4-bit only),
- ``dense_fp32`` / ``dense_bf16``: torch matmul with the float weight (no quantization),
- ``deq+mm``: mlxq.affine_dequantize then a torch matmul (the naive route),
plus ratios against mlxq fp32 and, for M=1, the packed-weight bandwidth in GB/s.
With ``--modes mxfp4 nvfp4 mxfp8``, rows for MLX's floating-point modes follow (same shapes and
M; ``bits`` names the mode), with ``x_vs_affine4``: their time against affine 4-bit's.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch

import mlxq
from mlxq.bench.timing import default_out, median_ms

SHAPES = {"4096x4096": (4096, 4096), "llama8b_mlp_up": (14336, 4096)}


def _mlx_peer(wq, scales, biases, x, group_size, bits) -> Callable[[], object] | None:
    try:
        import mlx.core as mx
    except ImportError:
        return None
    mw = mx.array(wq.numpy())
    ms, mb = mx.array(scales.float().numpy()), mx.array(biases.float().numpy())
    mxx = mx.array(x.float().numpy())
    mx.eval(mw, ms, mb, mxx)

    def run():
        y = mx.quantized_matmul(mxx, mw, ms, mb, transpose=True, group_size=group_size, bits=bits)
        mx.eval(y)

    return run


def _int4pack_peer(n: int, k: int, x_bf16: torch.Tensor, group_size: int):
    fn = getattr(torch, "_weight_int4pack_mm_for_cpu", None)
    conv = getattr(torch, "_convert_weight_to_int4pack_for_cpu", None)
    if fn is None or conv is None:
        return None
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = conv(q, 1)
    scales_zeros = torch.randn(k // group_size, n, 2, dtype=torch.bfloat16)
    return lambda: fn(x_bf16, packed, group_size, scales_zeros)


def bench_row(
    n: int, k: int, bits: int, m: int, group_size: int, budget_s: float, peers: set[str]
) -> dict:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * 0.02
    wq, scales, biases = mlxq.affine_quantize(w, group_size, bits)
    x = torch.randn(m, k, generator=gen)
    xb = x.bfloat16()
    sb, bb = scales.bfloat16(), biases.bfloat16()
    row: dict = {"N": n, "K": k, "bits": bits, "group_size": group_size, "M": m}

    def t(fn):
        return median_ms(fn, budget_s=budget_s)

    row["mlxq_fp32"] = t(lambda: mlxq.affine_matmul(x, wq, scales, biases, group_size, bits))
    row["mlxq_bf16"] = t(lambda: mlxq.affine_matmul(xb, wq, sb, bb, group_size, bits))
    if "mlx" in peers and (peer := _mlx_peer(wq, scales, biases, x, group_size, bits)):
        row["mlx_fp32"] = t(peer)
    if "int4pack" in peers and bits == 4 and (peer := _int4pack_peer(n, k, xb, group_size)):
        row["int4pack_bf16"] = t(peer)
    if "dense" in peers:
        wd = mlxq.affine_dequantize(wq, scales, biases, group_size, bits)
        wdb = wd.bfloat16()
        row["dense_fp32"] = t(lambda: x @ wd.T)
        row["dense_bf16"] = t(lambda: xb @ wdb.T)
    if "deq" in peers:
        row["deq_mm_fp32"] = t(
            lambda: x @ mlxq.affine_dequantize(wq, scales, biases, group_size, bits).T
        )
    packed_bytes = sum(t_.numel() * t_.element_size() for t_ in (wq, scales, biases))
    row["packed_MB"] = packed_bytes / 1e6
    best = min(row["mlxq_fp32"], row["mlxq_bf16"])
    if m == 1:
        row["mlxq_GBps"] = packed_bytes / (best * 1e-3) / 1e9
    for peer in ("mlx_fp32", "int4pack_bf16", "dense_fp32", "dense_bf16", "deq_mm_fp32"):
        if peer in row:
            row[f"x_vs_{peer}"] = row[peer] / best  # >1: mlxq is faster
    return row


def _mlx_mode_peer(wq, scales, x, mode: str) -> Callable[[], object] | None:
    try:
        import mlx.core as mx
    except ImportError:
        return None
    mw = mx.array(wq.view(torch.int32).numpy()).view(mx.uint32)
    ms, mxx = mx.array(scales.numpy()), mx.array(x.float().numpy())
    mx.eval(mw, ms, mxx)

    def run():
        mx.eval(mx.quantized_matmul(mxx, mw, ms, transpose=True, mode=mode))

    return run


def bench_mode_row(n: int, k: int, mode: str, m: int, budget_s: float, peers: set[str]) -> dict:
    """One row for a floating-point mode (mxfp4, nvfp4, mxfp8), as bench_row does for affine."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * 0.02
    wq, scales = mlxq.quantize(w, mode=mode)
    x = torch.randn(m, k, generator=gen)
    xb = x.bfloat16()
    row: dict = {
        "N": n,
        "K": k,
        "bits": mode,
        "group_size": k // scales.shape[-1],
        "M": m,
    }

    def t(fn):
        return median_ms(fn, budget_s=budget_s)

    row["mlxq_fp32"] = t(lambda: mlxq.quantized_matmul(x, wq, scales, mode=mode))
    row["mlxq_bf16"] = t(lambda: mlxq.quantized_matmul(xb, wq, scales, mode=mode))
    if "mlx" in peers and (peer := _mlx_mode_peer(wq, scales, x, mode)):
        row["mlx_fp32"] = t(peer)
    if "dense" in peers:
        wd = mlxq.dequantize(wq, scales, mode=mode, dtype=torch.float32)
        wdb = wd.bfloat16()
        row["dense_fp32"] = t(lambda: x @ wd.T)
        row["dense_bf16"] = t(lambda: xb @ wdb.T)
    packed_bytes = wq.numel() * 4 + scales.numel()
    row["packed_MB"] = packed_bytes / 1e6
    best = min(row["mlxq_fp32"], row["mlxq_bf16"])
    if m == 1:
        row["mlxq_GBps"] = packed_bytes / (best * 1e-3) / 1e9
    for peer in ("mlx_fp32", "dense_fp32", "dense_bf16"):
        if peer in row:
            row[f"x_vs_{peer}"] = row[peer] / best
    return row


def format_table(rows: list[dict]) -> str:
    cols = [
        "shape",
        "bits",
        "M",
        "mlxq_fp32",
        "mlxq_bf16",
        "mlx_fp32",
        "int4pack_bf16",
        "dense_fp32",
        "dense_bf16",
        "deq_mm_fp32",
        "x_vs_mlx_fp32",
        "x_vs_int4pack_bf16",
        "x_vs_dense_fp32",
        "mlxq_GBps",
        "x_vs_affine4",
    ]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = f"{r['N']}x{r['K']}" if c == "shape" else r.get(c)
            cells.append("" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 5))
    for bits in sorted({r["bits"] for r in rows if isinstance(r["bits"], int)}):
        sel = [r for r in rows if r["bits"] == bits and r["N"] == r["K"]]
        if sel:
            ax.plot(
                [r["M"] for r in sel],
                [r.get("x_vs_dense_fp32", 0) for r in sel],
                marker="o",
                label=f"{bits}-bit vs dense fp32",
            )
    ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("M (rows of x)")
    ax.set_ylabel("speed-up of mlxq (higher is better)")
    ax.set_title("mlxq affine_matmul vs torch dense fp32 matmul")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def build_parser() -> argparse.ArgumentParser:
    """The options of `mlxq bench ops` (also read by the README's tests)."""
    p = argparse.ArgumentParser(
        prog="mlxq bench ops", description=" ".join(__doc__.split("\n\n")[0].split())
    )
    p.add_argument("--m", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument(
        "--modes",
        nargs="*",
        default=[],
        choices=["mxfp4", "nvfp4", "mxfp8"],
        help="also benchmark these floating-point modes (rows beside affine 4-bit)",
    )
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--peers", nargs="+", default=["mlx", "int4pack", "dense", "deq"])
    p.add_argument("--budget", type=float, default=0.5, help="seconds of timing per cell")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results path without suffix (.json, .png); default: the mlxq cache's bench/ops",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--cuda-shapes", nargs="+", default=["4096x4096", "28672x8192"], help="with --device cuda"
    )
    p.add_argument(
        "--cuda-group-sizes", type=int, nargs="+", default=[128, 64], help="with --device cuda"
    )
    p.add_argument(
        "--cuda-env",
        nargs="*",
        default=[],
        metavar="NAME:VAR=VAL[,VAR=VAL]",
        help="with --device cuda: a column mlxq_NAME timed with these environment variables set",
    )
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    p = build_parser()
    args = p.parse_args(argv)
    if args.device == "cuda":
        return _main_cuda(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes:
        n, k = SHAPES[shape]
        # The large MLP shape only at 4 bits: it exists to show a real model's proportions.
        for bits in args.bits if shape == "4096x4096" else [4]:
            for m in args.m:
                row = bench_row(n, k, bits, m, args.group_size, args.budget, set(args.peers))
                rows.append(row)
                print(format_table([row]).splitlines()[-1], flush=True)
        for mode in args.modes:
            for m in args.m:
                row = bench_mode_row(n, k, mode, m, args.budget, set(args.peers))
                affine4 = [r for r in rows if r["bits"] == 4 and r["M"] == m and r["N"] == n]
                if affine4:  # >1: the mode is faster than affine 4-bit at this group size
                    row["x_vs_affine4"] = affine4[0]["mlxq_fp32"] / row["mlxq_fp32"]
                rows.append(row)
                print(format_table([row]).splitlines()[-1], flush=True)
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_isa": mlxq._native._C.cpu_isa(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
    print()
    print(f"# mlxq op benchmark ({info})")
    print(format_table(rows))
    args.out = args.out or default_out("ops")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    if plot(rows, args.out.with_suffix(".png")):
        print(f"plot: {args.out.with_suffix('.png')}")
    print(f"json: {args.out.with_suffix('.json')}")
    return rows


def _main_cuda(args: argparse.Namespace) -> list[dict]:
    from mlxq.bench import ops_cuda

    info, rows = ops_cuda.run(
        args.cuda_shapes,
        args.bits,
        args.cuda_group_sizes,
        args.m,
        args.modes,
        ops_cuda.parse_env_variants(args.cuda_env),
    )
    print()
    print(f"# mlxq op benchmark on CUDA ({info})")
    print(ops_cuda.format_table(rows))
    out = args.out.with_name(args.out.name + "_cuda").with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print(f"json: {out}")
    return rows


if __name__ == "__main__":
    main()
