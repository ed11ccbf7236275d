"""Whole-model benchmark: an MLX checkpoint (SmolLM2-135M-Instruct 4-bit unless `--model` names
another) through transformers + mlxq vs its peers.

Peers (each in its own process, so that load time and peak memory are its own):
- ``mlxq``: the MLX 4-bit checkpoint through transformers + mlxq (fp32 activations on CPU);
- ``mlxq_bf16``: the same with bf16 activations;
- ``mlxq_compiled``: bf16, decoding with a compiled step on a static cache (`--compile` of
  `mlxq generate`); its ``compile s`` column is its first step, compile included;
- ``dense_bf16`` / ``dense_fp32``: transformers with the dense float model (the GGUF dequantized);
- ``mlx_lm``: mlx-lm on the same machine with the same MLX checkpoint;
- ``llama_cpp``: llama.cpp (llama-cpp-python, the `bench` extra) on the Q4_1 GGUF that the
  default checkpoint was made from, with the same token ids;
- ``limit``: not a peer but a row: the decode rate that memory bandwidth allows, the bytes of
  the tensors read per token over the read bandwidth measured here with the same threads.

With ``--device cuda`` the torch peers run on the GPU (mlxq, mlxq_bf16, dense_bf16, dense_fp32;
mlx-lm and llama.cpp are CPU peers and are refused there); without ``--float-model`` the dense
peers are the MLX checkpoint dequantized to dense float modules (`mlxq.dequantize_model`), the
same float weights a dense checkpoint of those values would hold. The ``limit`` row then uses
the GPU's read bandwidth. The target ratios (met or not) are the CPU's: a CUDA run prints none,
and says why.

With ``--interleave ROUNDS``, two peers (``--interleave-peers``, mlxq_bf16 and llama_cpp by
default) are also loaded in one process and decode alternating, ROUNDS rounds: on a machine
whose speed drifts between minutes (a shared VM), their ratio per round is the comparison that
holds; the line after the table gives it, and the JSON its runs.

With ``--busy N``, every peer decodes a second time while N other processes spin on the CPU
(the ``loaded`` column), so the table shows what a busy machine costs each of them.

Measured: load time (from_pretrained / mlx_lm.load), prefill tokens/s (one forward pass over a
`--prompt-tokens` prompt with an empty cache, logits of the last position only, median of
`--reps`), decode tokens/s (greedy, batch 1, `--decode-tokens` new tokens after that prompt,
timed from the first new token to the last, so prefill is excluded; median of `--reps` runs)
and peak RSS. mlx-lm's CPU
backend is very slow, so it runs a shorter prompt and fewer tokens (`--mlx-prompt-tokens`,
`--mlx-decode-tokens`); the table says how many tokens each number is over.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mlxq.bench.timing import default_out

__all__ = ["main", "PEERS", "ratios", "verdict_lines", "model_label", "peak_rss_bytes"]

PEERS = ("mlxq", "mlxq_bf16", "mlxq_compiled", "dense_bf16", "dense_fp32", "mlx_lm", "llama_cpp")
DEFAULT_PEERS = ["mlxq", "mlxq_bf16", "mlxq_compiled", "dense_bf16", "llama_cpp"]
CPU_ONLY_PEERS = ("mlx_lm", "llama_cpp")
DEFAULT_CUDA_PEERS = ["mlxq", "mlxq_bf16", "dense_bf16"]
# The targets, all of them for the CPU: (numerator, denominator, metric, minimum)
TARGETS = {
    "decode_vs_llama_cpp": ("mlxq_bf16", "llama_cpp", "decode_tps", 1.0),
    "compiled_decode_vs_llama_cpp": ("mlxq_compiled", "llama_cpp", "decode_tps", 1.0),
    "decode_vs_limit": ("mlxq_bf16", "limit", "decode_tps", 0.5),
    "prefill_vs_dense_bf16": ("mlxq_bf16", "dense_bf16", "prefill_tps", 1.0),
    "prefill_vs_llama_cpp": ("mlxq_bf16", "llama_cpp", "prefill_tps", 1.5),
    "loaded_vs_quiet_decode": ("mlxq_bf16", "mlxq_bf16", "loaded_decode_tps/decode_tps", 0.5),
    "decode_vs_dense_bf16": ("mlxq", "dense_bf16", "decode_tps", 1.5),
    "decode_vs_mlx_lm": ("mlxq", "mlx_lm", "decode_tps", 20.0),
}
# Why a CUDA run prints no verdict (measured on an H200, README: SmolLM2-135M decodes at
# 18-43 tok/s against a `limit` row of 100k, mlxq bf16 and dense bf16 alike)
NO_CUDA_TARGETS = (
    "none on CUDA: the targets are the CPU's (llama.cpp and mlx-lm run on the CPU only; a "
    "model this size decodes at the GPU's launch and framework overhead, far below the "
    "bandwidth limit, where 4-bit weights save nothing over dense bf16 and a busy CPU core "
    "is no contention)"
)
_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a wooden screw press into a "
    "system that could produce books faster and more cheaply than scribes. Within fifty years "
    "printing shops had spread across Europe, and the number of books in circulation grew "
    "from thousands to millions. Scholars argue about how much this changed the world: some "
    "credit the press with the Reformation, the scientific revolution and the rise of "
    "literacy, while others point out that manuscripts remained common for a long time. "
)


def peak_rss_bytes() -> int | None:
    """Peak resident set of this process in bytes (None where it cannot be read).

    Linux: VmHWM, because ru_maxrss survives exec and so would report the parent's RSS at fork
    time for a worker started by a large parent. macOS: ru_maxrss (bytes there). Windows: psutil.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024
    except ImportError:
        try:
            import psutil

            info = psutil.Process().memory_info()
            return getattr(info, "peak_wset", info.rss)
        except ImportError:
            return None


def _torch_model(spec: dict):
    """The peer's transformers model, loaded as the benchmark does, and its load time."""
    import torch

    import mlxq  # noqa: F401  (registers the MLX quantizer)

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dtype = getattr(torch, spec["dtype"])
    device = spec.get("device", "cpu")
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype).eval()
    if spec.get("dequantize"):  # the dense peer from the MLX checkpoint's own values
        from mlxq.dequantize_model import dequantize_model

        dequantize_model(model, dtype)
    model = model.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    return model, time.perf_counter() - start


def _torch_decoder(model, spec: dict) -> Callable[[], dict]:
    """One timed greedy decode of the peer (`decode_tokens` after `decode_context` tokens)."""
    import torch

    from mlxq.generation import timed_generate

    device = spec.get("device", "cpu")
    decode_ids = torch.tensor([spec["prompt_ids"][: spec["decode_context"]]], device=device)
    n, compile = spec["decode_tokens"], spec.get("compile", False)

    def decode() -> dict:
        _, stats = timed_generate(model, decode_ids, n, ignore_eos=True, compile=compile)
        return {"tokens": stats["generated_tokens"], "tps": stats["decode_tps"]}

    return decode


def _torch_worker(spec: dict) -> dict:
    import torch

    model, load_s = _torch_model(spec)
    device = spec.get("device", "cpu")
    cuda = device == "cuda"
    prompt = torch.tensor([spec["prompt_ids"]], device=device)
    out: dict = {"load_s": load_s, "threads": torch.get_num_threads()}

    if spec["prefill"]:
        times = []
        with torch.inference_mode():
            for i in range(spec["reps"] + 1):  # the first one warms up
                t = time.perf_counter()
                model(prompt, use_cache=True, logits_to_keep=1)
                if cuda:
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - t)
        out["prefill_tokens"] = prompt.shape[1]
        out["prefill_tps"] = prompt.shape[1] / statistics.median(times)

    from mlxq.generation import timed_generate

    decode = _torch_decoder(model, spec)
    warm_ids = prompt[:, : spec["decode_context"]]
    _, warm = timed_generate(
        model, warm_ids, 4, ignore_eos=True, compile=spec.get("compile", False)
    )
    if spec.get("compile", False):
        out["compile_s"] = warm["first_step_s"]
    out.update(_decode_quiet_and_loaded(decode, spec))
    out["decode_context"] = warm_ids.shape[1]
    out["peak_rss"] = peak_rss_bytes() or 0
    if cuda:
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    return out


def _decode_quiet_and_loaded(decode: Callable[[], dict], spec: dict) -> dict:
    """Runs `decode` `reps` times on a quiet machine (the median rate is the peer's: a single
    run moved by 10-20% on the 2-core VM, the first after a compile most) and, with `busy` > 0,
    once more while that many other processes spin on the CPU; returns the decode rates."""
    runs = [decode() for _ in range(max(1, spec.get("reps", 1)))]
    out = {
        "decode_tokens": runs[0]["tokens"],
        "decode_tps": statistics.median(r["tps"] for r in runs),
        "decode_tps_runs": [r["tps"] for r in runs],
    }
    if spec.get("busy"):
        spinners = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(spec["busy"])
        ]
        try:
            time.sleep(0.5)  # let the scheduler see them as busy
            out["loaded_decode_tps"] = decode()["tps"]
        finally:
            for proc in spinners:
                proc.kill()
                proc.wait()
    return out


def _llama_cpp_model(spec: dict):
    """llama.cpp on the peer's GGUF with the benchmark's threads and context, and its load time."""
    from llama_cpp import Llama

    threads = spec.get("threads") or os.cpu_count() or 1
    start = time.perf_counter()
    llm = Llama(
        model_path=spec["path"],
        n_ctx=len(spec["prompt_ids"]) + spec["decode_tokens"] + 8,
        n_batch=len(spec["prompt_ids"]),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    return llm, time.perf_counter() - start


def _llama_cpp_decoder(llm, spec: dict) -> Callable[[], dict]:
    decode_ids = spec["prompt_ids"][: spec["decode_context"]]

    def decode() -> dict:
        # Greedy, as timed_generate: the first token follows the prompt's evaluation, so the
        # rate runs from the first new token to the last.
        stamps = []
        for _ in llm.generate(decode_ids, top_k=1, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == spec["decode_tokens"]:
                break
        return {"tokens": len(stamps), "tps": (len(stamps) - 1) / (stamps[-1] - stamps[0])}

    return decode


def _llama_cpp_worker(spec: dict) -> dict:
    llm, load_s = _llama_cpp_model(spec)
    out: dict = {"load_s": load_s, "threads": spec.get("threads") or os.cpu_count() or 1}
    prompt = spec["prompt_ids"]
    if spec["prefill"]:
        times = []
        for i in range(spec["reps"] + 1):
            llm.reset()
            t = time.perf_counter()
            llm.eval(prompt)
            if i:
                times.append(time.perf_counter() - t)
        out["prefill_tokens"] = len(prompt)
        out["prefill_tps"] = len(prompt) / statistics.median(times)
    out.update(_decode_quiet_and_loaded(_llama_cpp_decoder(llm, spec), spec))
    out["decode_context"] = min(len(prompt), spec["decode_context"])
    out["peak_rss"] = peak_rss_bytes() or 0
    return out


def _interleave_worker(spec: dict) -> dict:
    """Two peers loaded in one process, their decodes alternating for `rounds` rounds (the
    first peer first in even rounds, second in odd ones): rates that a drifting machine moves
    alike, so their ratio per round holds where rounds of separate processes do not."""
    decoders = {}
    for peer_spec in spec["pair"]:
        if peer_spec["peer"] == "llama_cpp":
            decoders[peer_spec["peer"]] = _llama_cpp_decoder(
                _llama_cpp_model(peer_spec)[0], peer_spec
            )
        else:
            decoders[peer_spec["peer"]] = _torch_decoder(_torch_model(peer_spec)[0], peer_spec)
    for decode in decoders.values():  # warm both
        decode()
    names = list(decoders)
    runs: dict[str, list[float]] = {name: [] for name in names}
    for r in range(spec["rounds"]):
        for name in names if r % 2 == 0 else reversed(names):
            runs[name].append(decoders[name]()["tps"])
    return {"peers": names, "decode_tps_runs": runs}


def interleaved_summary(result: dict) -> dict:
    """The first peer's decode rate over the second's, from `_interleave_worker`'s runs: the
    ratio of the medians and the lowest and highest ratio within a round."""
    first, second = result["peers"]
    a, b = result["decode_tps_runs"][first], result["decode_tps_runs"][second]
    per_round = [x / y for x, y in zip(a, b, strict=True)]
    return {
        "peers": [first, second],
        "median_tps": [statistics.median(a), statistics.median(b)],
        "ratio": statistics.median(a) / statistics.median(b),
        "round_ratio_min": min(per_round),
        "round_ratio_max": max(per_round),
        "rounds": len(per_round),
    }


def _mlx_worker(spec: dict) -> dict:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    start = time.perf_counter()
    model, _ = load(spec["path"])
    load_s = time.perf_counter() - start
    out: dict = {"load_s": load_s}
    prompt = mx.array(spec["prompt_ids"])
    if spec["prefill"]:
        times = []
        for i in range(spec["reps"] + 1):
            cache = make_prompt_cache(model)
            t = time.perf_counter()
            logits = model(prompt[None], cache=cache)
            mx.eval(logits[:, -1, :], [c.state for c in cache])
            if i:
                times.append(time.perf_counter() - t)
        out["prefill_tokens"] = int(prompt.shape[0])
        out["prefill_tps"] = prompt.shape[0] / statistics.median(times)
    decode_prompt = prompt[: spec["decode_context"]]

    def decode() -> dict:
        times = []
        for _ in generate_step(decode_prompt, model, max_tokens=spec["decode_tokens"]):
            times.append(time.perf_counter())
        return {"tokens": len(times), "tps": (len(times) - 1) / (times[-1] - times[0])}

    out.update(_decode_quiet_and_loaded(decode, spec))
    out["decode_context"] = int(decode_prompt.shape[0])
    out["peak_rss"] = peak_rss_bytes() or 0
    return out


def _worker(spec: dict) -> dict:
    if spec["peer"] == "interleave":
        return _interleave_worker(spec)
    if spec["peer"] == "mlx_lm":
        return _mlx_worker(spec)
    if spec["peer"] == "llama_cpp":
        return _llama_cpp_worker(spec)
    return _torch_worker(spec)


def bytes_per_token(model_dir: Path) -> int:
    """Bytes of the checkpoint's tensors that one decoded token reads: all of them, less an
    untied input embedding (a token reads one row of it)."""
    import math

    from mlxq.integrations.checkpoint import DTYPE_BYTES, read_header

    total = embedding = 0
    for shard in sorted(model_dir.glob("*.safetensors")):
        for name, info in read_header(shard).items():
            size = DTYPE_BYTES[info.dtype] * math.prod(info.shape)
            total += size
            if "embed_tokens" in name:
                embedding += size
    config = json.loads((model_dir / "config.json").read_text())
    text = config.get("text_config", {})
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings"))
    return total if tied else total - embedding


def read_bandwidth(threads: int | None, device: str = "cpu") -> float:
    """Bytes per second that torch reads (a sum over 512 MiB, best of 5) with `threads`; on
    CUDA a sum over 2 GiB on the GPU."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    cuda = device == "cuda"
    data = torch.ones((512 if cuda else 128) << 20, device=device)
    best = float("inf")
    for _ in range(5):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        data.sum()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return data.numel() * data.element_size() / best


def prompt_ids(tokenizer_dir: Path, n: int) -> list[int]:
    """`n` token ids of a fixed English text (repeated as needed), the same for every peer."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(_TEXT).ids
    return ids[:n]


def _default_checkpoints(group_size: int) -> tuple[Path, Path]:
    from mlxq import demo_model

    quant = demo_model.cached_smollm2_checkpoint(4, group_size)
    return quant, demo_model.cached_smollm2_float_checkpoint()


def _default_gguf() -> Path:
    from mlxq import demo_model

    return demo_model.smollm2_gguf_path()


def ratios(results: dict[str, dict], device: str = "cpu") -> dict[str, dict]:
    """The targets of the issue, from one run's results; none for a run on CUDA, where they
    do not apply (:data:`NO_CUDA_TARGETS`)."""
    if device != "cpu":
        return {}
    out = {}
    for name, (num, den, metric, minimum) in TARGETS.items():
        top, bottom = metric.split("/") if "/" in metric else (metric, metric)
        a, b = results.get(num, {}).get(top), results.get(den, {}).get(bottom)
        if a and b:
            out[name] = {"ratio": a / b, "target": minimum, "met": a / b >= minimum}
    return out


def verdict_lines(targets: dict[str, dict], device: str = "cpu") -> list[str]:
    """The lines that report `targets` (:func:`ratios`), met or not; on CUDA the one line
    saying why there are none."""
    if device != "cpu":
        return [f"targets: {NO_CUDA_TARGETS}"]
    return [
        f"{name}: {t['ratio']:.2f}x (target >= {t['target']}x) {'met' if t['met'] else 'NOT met'}"
        for name, t in targets.items()
    ]


def model_label(model_dir: Path, default: bool = False) -> str:
    """What the table's title calls the checkpoint benchmarked: SmolLM2-135M-Instruct for the
    default one, else its folder's name, with its model type and quantization as its
    config.json gives them (e.g. `qwen3-2bit (qwen3, 2-bit affine, group 64)`)."""
    name = "SmolLM2-135M-Instruct" if default else model_dir.name
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return name
    quant = config.get("quantization") or config.get("quantization_config") or {}
    parts = [config["model_type"]] if config.get("model_type") else []
    if isinstance(quant, dict) and "bits" in quant:
        parts.append(f"{quant['bits']}-bit {quant.get('mode') or 'affine'}")
        if "group_size" in quant:
            parts.append(f"group {quant['group_size']}")
        if any(isinstance(v, (dict, bool)) for v in quant.values()):
            parts.append("mixed")  # per-module entries
    return f"{name} ({', '.join(parts)})" if parts else name


def format_table(results: dict[str, dict]) -> str:
    cols = ["peer", "load s", "prefill tok/s", "(tokens)", "decode tok/s", "(tokens)"]
    cols += ["decode, busy CPU", "compile s", "peak MB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for peer, r in results.items():
        if "error" in r:
            lines.append(f"| {peer} | failed: {r['error']} |" + " |" * (len(cols) - 2))
            continue
        if peer == "limit":
            cells = [peer, "", "", "", f"{r['decode_tps']:.1f}", r["note"], "", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells = [
            peer,
            f"{r['load_s']:.2f}",
            f"{r['prefill_tps']:.1f}" if "prefill_tps" in r else "",
            str(r.get("prefill_tokens", "")),
            f"{r['decode_tps']:.2f}",
            f"{r['decode_tokens']} after {r['decode_context']}",
            f"{r['loaded_decode_tps']:.2f}" if "loaded_decode_tps" in r else "",
            f"{r['compile_s']:.1f}" if "compile_s" in r else "",
            f"{r['peak_rss'] / 1e6:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_interleaved(summary: dict, tokens: int, context: int) -> str:
    """The line that reports `interleaved_summary` (or its error)."""
    if "error" in summary:
        return f"decode alternating in one process: failed: {summary['error']}"
    (first, second), (a, b) = summary["peers"], summary["median_tps"]
    return (
        f"decode alternating in one process ({summary['rounds']} rounds, {tokens} tokens after "
        f"{context}): {first} {a:.1f} tok/s, {second} {b:.1f} (medians): {summary['ratio']:.2f}x, "
        f"per round {summary['round_ratio_min']:.2f}-{summary['round_ratio_max']:.2f}x"
    )


def plot(results: dict[str, dict], path: Path, label: str = "SmolLM2-135M-Instruct") -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = {p: r for p, r in results.items() if "error" not in r and p != "limit"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in zip(
        axes, ("prefill_tps", "decode_tps"), ("prefill tokens/s", "decode tokens/s"), strict=True
    ):
        peers = [p for p in ok if metric in ok[p]]
        ax.bar(peers, [ok[p][metric] for p in peers], color="tab:blue")
        ax.set_title(title)
        ax.set_yscale("log")
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{label}: mlxq vs peers (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _peer_spec(peer: str, args, ids: list[int], context: int, dequantize: bool) -> dict:
    """What a worker needs to measure `peer`."""
    mlx = peer == "mlx_lm"
    n_prompt = args.mlx_prompt_tokens if mlx else args.prompt_tokens
    if peer == "llama_cpp":
        path = args.gguf or _default_gguf()
    else:
        dense = peer.startswith("dense") and not dequantize
        path = args.float_model if dense else args.model
    return {
        "peer": peer,
        "path": str(path),
        "dtype": "float32" if peer in ("mlxq", "dense_fp32", "mlx_lm") else "bfloat16",
        "prompt_ids": ids[:n_prompt],
        "prefill": True,
        "reps": args.reps,
        "decode_tokens": args.mlx_decode_tokens if mlx else args.decode_tokens,
        "decode_context": min(context, n_prompt),
        "threads": args.threads,
        "busy": args.busy,
        "compile": peer == "mlxq_compiled",
        "device": args.device,
        "dequantize": dequantize and peer.startswith("dense"),
    }


def _spawn(spec: dict, tmp: Path) -> dict:
    """Runs `spec` in a worker process of its own; its result, or {"error": ...}."""
    name = spec["peer"]
    spec_file = Path(tmp) / f"{name}.json"
    spec_file.write_text(json.dumps(spec))
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "mlxq.bench.model", "--worker", str(spec_file)],
        capture_output=True,
        text=True,
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("MLXQ_RESULT ")]
    if proc.returncode or not line:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"[bench] {name} failed: {tail}", file=sys.stderr, flush=True)
        return {"error": tail[:200]}
    return json.loads(line[-1].removeprefix("MLXQ_RESULT "))


def _run_peer(peer: str, args, ids: list[int], context: int, dequantize: bool, tmp: Path) -> dict:
    """One peer's measurements, in a worker process of its own."""
    return _spawn(_peer_spec(peer, args, ids, context, dequantize), tmp)


def merge_rounds(runs: list[dict]) -> dict:
    """One peer's result from its `--rounds` runs: every quiet decode run pooled (the rate is
    their median), the median of the other rates and times, the largest peak memory; the
    first error, if a round failed."""
    if errors := [r for r in runs if "error" in r]:
        return errors[0]
    out = dict(runs[0])
    out["decode_tps_runs"] = [t for r in runs for t in r["decode_tps_runs"]]
    out["decode_tps"] = statistics.median(out["decode_tps_runs"])
    for key in ("prefill_tps", "loaded_decode_tps", "load_s", "compile_s"):
        if all(key in r for r in runs):
            out[key] = statistics.median(r[key] for r in runs)
    out["peak_rss"] = max(r.get("peak_rss", 0) for r in runs)
    out["rounds"] = len(runs)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The options of `mlxq bench model` (also read by the README's tests)."""
    p = argparse.ArgumentParser(
        prog="mlxq bench model", description=" ".join(__doc__.split("\n\n")[0].split())
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help="MLX checkpoint (default: SmolLM2 4-bit, cached)")
    p.add_argument("--float-model", type=Path, help="float checkpoint for the dense peers")
    p.add_argument("--group-size", type=int, default=32, help="of the default 4-bit checkpoint")
    p.add_argument("--peers", nargs="+", default=None, choices=PEERS)
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the torch peers run (cuda: mlxq's CUDA kernels vs dense float on the GPU)",
    )
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument(
        "--decode-context",
        type=int,
        default=None,
        help="prompt before decode (default: the whole prompt)",
    )
    p.add_argument("--mlx-prompt-tokens", type=int, default=64)
    p.add_argument("--mlx-decode-tokens", type=int, default=8)
    p.add_argument(
        "--reps", type=int, default=3, help="prefill and quiet decode repetitions (median)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every peer this many times, every other round in reverse order (its runs are "
        "pooled): ratios that a drifting machine moves less",
    )
    p.add_argument(
        "--interleave",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="also decode two peers (--interleave-peers) alternating in one process for ROUNDS "
        "rounds: their ratio per round, which a drifting machine moves less",
    )
    p.add_argument(
        "--interleave-peers",
        nargs=2,
        default=["mlxq_bf16", "llama_cpp"],
        choices=[peer for peer in PEERS if peer not in ("mlx_lm", "mlxq_compiled")],
        metavar="PEER",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--busy",
        type=int,
        default=1,
        help="other busy processes during a second decode run (0: quiet only)",
    )
    p.add_argument("--gguf", type=Path, help="GGUF for llama_cpp (default: the demo's Q4_1)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results path without suffix (.json, .png); default: the mlxq cache's bench/model",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    p = build_parser()
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        print("MLXQ_RESULT " + json.dumps(_worker(spec)), flush=True)
        return {}
    for flag in ("prompt_tokens", "decode_tokens", "mlx_prompt_tokens", "mlx_decode_tokens"):
        if getattr(args, flag) < 2:
            p.error(f"--{flag.replace('_', '-')} must be at least 2")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    cuda = args.device == "cuda"
    if args.peers is None:
        args.peers = DEFAULT_CUDA_PEERS if cuda else DEFAULT_PEERS
    if cuda and (cpu_only := [peer for peer in args.peers if peer in CPU_ONLY_PEERS]):
        p.error(f"--device cuda: {', '.join(cpu_only)} run on the CPU only")
    if cuda and args.interleave and "llama_cpp" in args.interleave_peers:
        p.error("--device cuda: --interleave-peers llama_cpp runs on the CPU only")
    if args.interleave < 0:
        p.error("--interleave must be 0 (off) or a number of rounds")
    if args.interleave and args.interleave_peers[0] == args.interleave_peers[1]:
        p.error("--interleave-peers: two different peers (their runs are kept by name)")
    if cuda:
        from mlxq._native import cuda_unavailable_reason

        if (why := cuda_unavailable_reason()) is not None:
            p.error(f"--device cuda: {why}")
    # on CUDA the dense peers can be the MLX checkpoint dequantized (no float checkpoint needed)
    dequantize = cuda and args.float_model is None and args.model is not None
    label = model_label(args.model) if args.model is not None else None
    if args.model is None or (
        args.float_model is None
        and not dequantize
        and set(args.peers) & {"dense_bf16", "dense_fp32"}
    ):
        quant, dense = _default_checkpoints(args.group_size)
        args.model = args.model or quant
        args.float_model = args.float_model or dense
    label = label or model_label(args.model, default=True)
    for path in (args.model, args.float_model):
        if path is not None and not (path / "config.json").is_file():
            p.error(f"{path} is not a model folder (no config.json)")
    ids = prompt_ids(args.model, max(args.prompt_tokens, args.mlx_prompt_tokens))
    context = args.decode_context or args.prompt_tokens
    rounds: dict[str, list[dict]] = {peer: [] for peer in args.peers}
    with tempfile.TemporaryDirectory(prefix="mlxq-bench-") as tmp:
        for r in range(args.rounds):
            # every other round in reverse order: a machine that drifts during the run moves
            # the first and the last peers alike
            for peer in args.peers if r % 2 == 0 else reversed(args.peers):
                rounds[peer].append(_run_peer(peer, args, ids, context, dequantize, Path(tmp)))
        interleaved = None
        if args.interleave > 0:
            pair = [_peer_spec(p, args, ids, context, dequantize) for p in args.interleave_peers]
            spec = {"peer": "interleave", "pair": pair, "rounds": args.interleave}
            interleaved = _spawn(spec, Path(tmp))
            if "error" not in interleaved:  # the summary, and the runs it comes from
                interleaved = {**interleaved_summary(interleaved), **interleaved}
    results = {peer: merge_rounds(runs) for peer, runs in rounds.items()}
    import torch

    import mlxq

    per_token = bytes_per_token(args.model)
    bandwidth = read_bandwidth(args.threads, args.device)
    results["limit"] = {
        "decode_tps": bandwidth / per_token,
        "note": f"{per_token / 1e6:.1f} MB/token at {bandwidth / 1e9:.1f} GB/s",
    }
    info = {
        "model": str(args.model),
        "label": label,
        "float_model": str(args.float_model),
        "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "cpu_isa": mlxq._C.cpu_isa(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    targets = ratios(results, args.device)
    if interleaved is not None and interleaved.get("peers") == ["mlxq_bf16", "llama_cpp"]:
        target = TARGETS["decode_vs_llama_cpp"][3]
        ratio = interleaved["ratio"]
        targets["decode_vs_llama_cpp_interleaved"] = {
            "ratio": ratio,
            "target": target,
            "met": ratio >= target,
        }
    where = info["device"] if cuda else f"{info['cpu_isa']}, {info['threads']} threads"
    print(f"\n# {label} whole-model benchmark ({where})")
    print(format_table(results))
    if interleaved is not None:
        print(format_interleaved(interleaved, args.decode_tokens, context))
    for line in verdict_lines(targets, args.device):
        print(line)
    args.out = args.out or default_out("model")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"info": info, "results": results, "targets": targets}
    if interleaved is not None:
        payload["interleaved"] = interleaved
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    if plot(results, args.out.with_suffix(".png"), label):
        print(f"plot: {args.out.with_suffix('.png')}")
    print(f"json: {args.out.with_suffix('.json')}")
    return payload


if __name__ == "__main__":
    main()
