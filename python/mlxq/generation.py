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
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Generate after `input_ids` ([1, T]); return the new token ids and the timings
    (`prompt_tokens`, `generated_tokens`, `prefill_s`, `prefill_tps`, `decode_tps`)."""
    clock = streamer if streamer is not None else token_clock()
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=attention_mask
            if attention_mask is not None
            else torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            streamer=clock,
            pad_token_id=pad_token_id,
            **(sampling or {"do_sample": False}),
        )
    new = out[0, input_ids.shape[-1] :]
    times = clock.times
    stats: dict[str, Any] = {
        "prompt_tokens": clock.prompt_tokens,
        "generated_tokens": int(new.numel()),
    }
    if times:
        stats["prefill_s"] = times[0] - start
        stats["prefill_tps"] = clock.prompt_tokens / max(stats["prefill_s"], 1e-9)
    if len(times) > 1:
        stats["decode_tps"] = (len(times) - 1) / max(times[-1] - times[0], 1e-9)
    return new, stats
