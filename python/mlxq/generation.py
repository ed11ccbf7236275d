"""Timed greedy/sampled generation through transformers' `generate`: the one loop behind
`mlxq generate`, `mlxq demo` and the whole-model benchmark.

A streamer records when the prompt was consumed and when each new token arrived, so prefill
and decode speeds come from the same run that produced the text.
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["token_clock", "timed_generate"]


def token_clock(tokenizer=None, echo: bool = False):
    """A streamer that records token arrival times (`times`) and the prompt length
    (`prompt_tokens`); with a tokenizer and `echo`, it also prints the new text as it comes."""
    from transformers import TextStreamer
    from transformers.generation.streamers import BaseStreamer

    base = TextStreamer if tokenizer is not None else BaseStreamer

    class TokenClock(base):
        def __init__(self) -> None:
            if tokenizer is not None:
                super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.prompt_tokens = 0
            self.times: list[float] = []
            self._prompt_seen = False

        def put(self, value) -> None:
            if not self._prompt_seen:  # generate streams the prompt first
                self._prompt_seen = True
                self.prompt_tokens = int(value.shape[-1])
            else:
                self.times.append(time.perf_counter())
            if tokenizer is not None:
                super().put(value)

        def end(self) -> None:
            if tokenizer is not None:
                super().end()

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if echo:
                super().on_finalized_text(text, stream_end)

    return TokenClock()


# Static caches come in multiples of this many positions, so that one compiled decode step
# serves every prompt and length up to the bucket (a new length would mean a new graph).
CACHE_BUCKET = 256


def compiled_decode_kwargs(model, total_tokens: int) -> dict[str, Any]:
    """`generate` arguments that decode with a compiled step: a static cache of `total_tokens`
    rounded up to CACHE_BUCKET, and transformers' compile config for it.

    The compiled step treats the mlxq ops as opaque calls and fuses the rest of the layer
    (norms, rotary embedding, residuals). Guards on the modules are skipped, so the step is
    checked in microseconds; the weights are inputs of the graph, so changing their values is
    seen, but replacing modules of the model after the first call is not. Compiled code is
    cached on disk (TORCHINDUCTOR_CACHE_DIR, by default in the mlxq cache), so a later process
    compiles in a fraction of the first one's time.
    """
    import os

    from transformers import CompileConfig, StaticCache
    from transformers.generation import utils as generation_utils

    from mlxq.demo_model import mlxq_cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(mlxq_cache_dir() / "inductor"))
    config = CompileConfig(
        fullgraph=True,
        dynamic=False,
        mode=None,  # transformers' default, reduce-overhead, means CUDA graphs
        options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe},
    )
    config._compile_all_devices = True  # transformers compiles only on GPUs unless told
    length = -(-total_tokens // CACHE_BUCKET) * CACHE_BUCKET
    cache = StaticCache(config=model.config, max_cache_len=length)
    # newer transformers name generate's cache `cache` and warn on `past_key_values`
    renamed = "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", ())
    return {"cache" if renamed else "past_key_values": cache, "compile_config": config}


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy jiffies of all CPUs, jiffies of this process) from /proc, or None off Linux."""
    try:
        with open("/proc/stat") as stat, open("/proc/self/stat") as own_stat:
            fields = stat.readline().split()[1:]
            own = own_stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]) - idle, int(own[11]) + int(own[12])  # utime + stime


def threads_for_load(threads: int, window_s: float = 0.1) -> int:
    """How many of `threads` to decode with, given what other processes keep busy now.

    Decode splits every layer between the threads and waits for the slowest: a thread that
    shares its core with a busy process makes each of the few hundred splits of a token wait
    for the scheduler (measured, 2 threads on 2 cores beside one spinning process: 66 -> 6
    tokens/s; with 1 thread: 51). So the CPU time that other processes used over `window_s`
    (Linux /proc/stat, less this process's own) is subtracted from the cores: a busy core is
    left to its process. Elsewhere, or with one thread, `threads` is returned unchanged.
    """
    import os

    if threads <= 1:
        return threads
    before = _cpu_jiffies()
    if before is None:
        return threads
    time.sleep(window_s)
    after = _cpu_jiffies()
    ticks = os.sysconf("SC_CLK_TCK") * window_s
    others = ((after[0] - before[0]) - (after[1] - before[1])) / ticks  # busy cores, others
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(threads, round((cores or 1) - others)))


def _generate(model, input_ids, max_new_tokens, attention_mask, streamer, min_new_tokens,
              pad_token_id, sampling, extra) -> torch.Tensor:  # fmt: skip
    with torch.inference_mode():
        return model.generate(
            input_ids,
            attention_mask=attention_mask
            if attention_mask is not None
            else torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            streamer=streamer,
            pad_token_id=pad_token_id,
            **(sampling or {"do_sample": False}),
            **extra,
        )


def timed_generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    streamer=None,
    min_new_tokens: int | None = None,
    temperature: float = 0.0,
    pad_token_id: int = 0,
    compile: bool = False,
    ignore_eos: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Generate after `input_ids` ([1, T]); return the new token ids and the timings
    (`prompt_tokens`, `generated_tokens`, `prefill_s`, `prefill_tps`, `decode_tps`).

    With `compile`, decoding runs a compiled step on a static cache
    (compiled_decode_kwargs); its first step compiles (or finds the compiled code cached), so
    `first_step_s` reports that step and `decode_tps` counts from the step after it.

    With `ignore_eos`, the end-of-sequence token does not stop generation (llama.cpp's
    `generate` loop, and what a benchmark wants): exactly `max_new_tokens` come out, without
    `min_new_tokens`' per-step scan of the vocabulary for EOS ids (0.4 ms a token here).

    On the CPU the thread count is fitted to the machine's load first (threads_for_load) and
    restored afterwards; `threads` in the stats says how many ran.
    """
    clock = streamer if streamer is not None else token_clock()
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
    extra: dict[str, Any] = {"eos_token_id": None} if ignore_eos else {}
    if compile:
        extra.update(compiled_decode_kwargs(model, input_ids.shape[-1] + max_new_tokens))
    requested = torch.get_num_threads()
    on_cpu = next(model.parameters()).device.type == "cpu"
    threads = threads_for_load(requested) if on_cpu else requested
    torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        out = _generate(model, input_ids, max_new_tokens, attention_mask, clock, min_new_tokens,
                        pad_token_id, sampling, extra)  # fmt: skip
    finally:
        torch.set_num_threads(requested)
    new = out[0, input_ids.shape[-1] :]
    times = clock.times
    stats: dict[str, Any] = {
        "prompt_tokens": clock.prompt_tokens,
        "generated_tokens": int(new.numel()),
        "threads": threads,
    }
    if times:
        stats["prefill_s"] = times[0] - start
        stats["prefill_tps"] = clock.prompt_tokens / max(stats["prefill_s"], 1e-9)
    first = 1 if compile and len(times) > 2 else 0
    if compile and len(times) > 1:
        stats["first_step_s"] = times[1] - times[0]
    if len(times) > first + 1:
        stats["decode_tps"] = (len(times) - first - 1) / max(times[-1] - times[first], 1e-9)
    return new, stats
