"""MoE layer benchmark: the experts of one mixture-of-experts layer, mlxq vs its peers.

A layer of E experts (SwiGLU, hidden H, expert width I), top-k routing, MLX 4-bit group 64.
For a decode step (1 token) and a short prefill, median ms of:

    mlxq            MoeExperts: the packed experts through affine_gather_matmul
    mlx             mlx-lm's SwitchGLU (mx.gather_qmm) on the CPU, same packed tensors
    hf eager        transformers' own experts module (eager loop over the experts hit) with
                    the dequantized (dense) weights, fp32 and bf16
    hf batched_mm   transformers' batched_mm experts implementation, dense fp32 weights

and, for mlxq, the decode step at other top-k and expert counts: the work must follow the
experts selected (top-k), not the experts stored.

Float-mode rows (`modes`): the same layer (same float weights) quantized in mxfp4 / nvfp4 /
mxfp8, mlxq's MoeExperts through fp_gather_matmul and mlx-lm's SwitchGLU with that mode, each
with its ratio to mlxq's affine row of the same dtype and tokens.

Usage: python benchmarks/bench_moe.py [--experts 64] [--top-k 8] [--hidden 2048]
       [--inter 768] [--bits 4] [--prefill 32] [--threads N] [--modes mxfp4,nvfp4,mxfp8]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import mlxq
import torch
from mlxq.bench.timing import median_ms
from mlxq.moe import AffineSwitchLinear, MoeExperts


def _layer(e: int, hidden: int, inter: int, bits: int, group_size: int, gen, mode: str = "affine"):
    """Random experts quantized by mlxq (== mx.quantize), as MoeExperts and as dense weights.
    The same generator state gives the same float weights in every mode."""
    projections = {}
    for name, (rows, cols) in {
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }.items():
        w = torch.randn(e, rows, cols, generator=gen) * cols**-0.5
        projections[name] = AffineSwitchLinear.from_float(w.bfloat16(), bits, group_size, mode)
    experts = MoeExperts(**projections, act_fn=torch.nn.SiLU())
    dense = {n: p.dequantize_weight().float() for n, p in projections.items()}
    return experts, dense


def _hf_experts(dense: dict, e: int, hidden: int, inter: int, dtype, implementation: str):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(
        hidden_size=hidden, moe_intermediate_size=inter, num_experts=e, hidden_act="silu"
    )
    config._experts_implementation = implementation
    module = Qwen3MoeExperts(config)
    with torch.no_grad():
        module.gate_up_proj.copy_(torch.cat([dense["gate_proj"], dense["up_proj"]], dim=1))
        module.down_proj.copy_(dense["down_proj"])
    return module.to(dtype)


def _mlx_switch_glu(experts: MoeExperts, bits: int, group_size: int, mode: str = "affine"):
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx_lm.models.switch_layers import SwitchGLU

    p = experts.gate_proj
    glu = SwitchGLU(p.in_features, p.out_features, p.num_experts)
    # quantized by MLX, then overwritten with mlxq's tensors
    nn.quantize(glu, group_size=group_size, bits=bits, mode=mode)

    def arr(t):
        if t.dtype == torch.uint32:
            return mx.array(t.view(torch.int32).numpy().view(np.uint32))
        if t.dtype == torch.uint8:
            return mx.array(t.numpy())
        return mx.array(t.float().numpy())

    for name in ("gate_proj", "up_proj", "down_proj"):
        src, dst = getattr(experts, name), getattr(glu, name)
        dst.weight, dst.scales = arr(src.weight), arr(src.scales)
        if mode == "affine":
            dst.biases = arr(src.biases)
    return glu


def _ms(fn, *args, budget_s: float = 1.0) -> float:
    with torch.no_grad():
        return median_ms(lambda: fn(*args), budget_s=budget_s)


def _routing(tokens: int, e: int, k: int, gen):
    logits = torch.randn(tokens, e, generator=gen)
    weights, index = torch.topk(logits.softmax(-1), k, dim=-1)
    return index, weights / weights.sum(-1, keepdim=True)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    e, k, hidden, inter = args.experts, args.top_k, args.hidden, args.inter
    experts, dense = _layer(e, hidden, inter, args.bits, args.group_size, gen)
    results: dict = {
        "shape": dict(experts=e, top_k=k, hidden=hidden, inter=inter, bits=args.bits),
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "cpu_isa": mlxq._C.cpu_isa(),
        "rows": [],
    }
    peers = {}
    for dtype in (torch.float32, torch.bfloat16):
        peers[f"hf eager {str(dtype)[6:]}"] = (
            _hf_experts(dense, e, hidden, inter, dtype, "eager"),
            dtype,
        )
    peers["hf batched_mm float32"] = (
        _hf_experts(dense, e, hidden, inter, torch.float32, "batched_mm"),
        torch.float32,
    )
    try:
        glu = _mlx_switch_glu(experts, args.bits, args.group_size)
    except Exception as err:  # noqa: BLE001 - mlx is an optional peer
        print(f"mlx peer unavailable: {err}", file=sys.stderr)
        glu = None
    for tokens in (1, args.prefill):
        index, weights = _routing(tokens, e, k, gen)
        x = torch.randn(tokens, hidden, generator=gen)
        row = {"tokens": tokens}
        for dtype in (torch.float32, torch.bfloat16):
            row[f"mlxq {str(dtype)[6:]}"] = _ms(experts, x.to(dtype), index, weights.to(dtype))
        for name, (module, dtype) in peers.items():
            row[name] = _ms(module, x.to(dtype), index, weights.to(dtype), budget_s=2.0)
        if glu is not None:
            import mlx.core as mx

            xm, im = mx.array(x.numpy()), mx.array(index.numpy().astype("uint32"))
            row["mlx float32"] = _ms(lambda a, b: mx.eval(glu(a, b)), xm, im, budget_s=2.0)
        results["rows"].append(row)
        print(json.dumps(row))
    # work follows the selected experts: decode step at other top-k and expert counts
    scaling = []
    for e2 in (e, 2 * e):
        big = experts if e2 == e else _layer(e2, hidden, inter, args.bits, args.group_size, gen)[0]
        for k2 in (1, 2, 4, 8):
            index, weights = _routing(1, e2, k2, gen)
            x = torch.randn(1, hidden, generator=gen)
            ms = _ms(big, x, index, weights)
            scaling.append({"experts": e2, "top_k": k2, "mlxq float32 ms": ms})
            print(json.dumps(scaling[-1]))
        del big
    results["scaling"] = scaling
    results["modes"] = _mode_rows(args, experts)
    return results


def _mode_rows(args, affine: MoeExperts) -> list[dict]:
    """The layer in each float mode (same float weights as the affine layer), with ratios to
    mlxq's affine layer timed right before it on the same input (> 1: slower than affine; back
    to back, so that a machine shared with other jobs shifts both alike)."""
    import mlx.core as mx
    from mlxq.format import MODE_DEFAULTS

    rows = []
    e, k, hidden, inter = args.experts, args.top_k, args.hidden, args.inter
    for mode in [m for m in args.modes.split(",") if m]:
        group_size, bits = MODE_DEFAULTS[mode]
        gen = torch.Generator().manual_seed(0)  # the affine layer's weights
        experts, _ = _layer(e, hidden, inter, bits, group_size, gen, mode)
        glu = _mlx_switch_glu(experts, bits, group_size, mode)
        route = torch.Generator().manual_seed(1)
        for tokens in (1, args.prefill):
            index, weights = _routing(tokens, e, k, route)
            x = torch.randn(tokens, hidden, generator=route)
            row = {"mode": mode, "tokens": tokens}
            for dtype in (torch.float32, torch.bfloat16):
                name = f"mlxq {str(dtype)[6:]}"
                inputs = (x.to(dtype), index, weights.to(dtype))
                base = _ms(affine, *inputs)
                row[name] = _ms(experts, *inputs)
                row[f"{name} / affine"] = round(row[name] / base, 3)
            xm, im = mx.array(x.numpy()), mx.array(index.numpy().astype("uint32"))
            row["mlx float32"] = _ms(lambda a, b, f=glu: mx.eval(f(a, b)), xm, im, budget_s=2.0)
            row["mlx float32 / mlxq float32"] = round(row["mlx float32"] / row["mlxq float32"], 2)
            rows.append(row)
            print(json.dumps(row))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--modes", default="mxfp4,nvfp4,mxfp8", help="float modes ('' for none)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_moe.json"))
    args = parser.parse_args(argv)
    results = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
