"""`mlxq generate`: stream a completion with an MLX checkpoint."""

from __future__ import annotations

import argparse
import math
from typing import Any

from mlxq.cli.common import CLIError, load_model, print_stats

# config keys holding the number of positions a model was built for
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
# modules holding one learned embedding per position: no position past their rows exists
_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")


def fit_context(model, prompt_tokens: int, max_tokens: int) -> int:
    """`max_tokens` where the prompt and the completion fit the model's context length, else
    never silently: a warning on stderr, and the count capped where the model has learned
    position embeddings (GPT-2's `wpe`: positions past its rows do not exist, the forward
    would fail on them); a rotary model runs past its length, as `mlx_lm generate` does (it
    does not check), out of the positions it was trained on. Raises CLIError where the prompt
    alone fills a table of positions."""
    import sys

    config = model.config.get_text_config()
    key = next((k for k in _CONTEXT_KEYS if isinstance(getattr(config, k, None), int)), None)
    total = prompt_tokens + max_tokens
    if key is None or total <= getattr(config, key):
        return max_tokens
    length = getattr(config, key)
    table = next(
        (n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in _POSITION_TABLES), None
    )
    said = (
        f"the prompt ({prompt_tokens} tokens) and --max-tokens {max_tokens} make {total} "
        f"tokens, past the model's context length ({key}: {length})"
    )
    if table is None:
        print(
            f"mlxq: warning: {said}; generating all the same, as mlx_lm generate does: the "
            "positions past it were not trained on, the text may degrade",
            file=sys.stderr,
        )
        return max_tokens
    if prompt_tokens >= length:
        raise CLIError(f"{said}, and the prompt alone fills the learned positions of {table}")
    print(
        f"mlxq: warning: {said}; {table} holds one learned embedding per position: "
        f"generating {length - prompt_tokens} tokens",
        file=sys.stderr,
    )
    return length - prompt_tokens


def generate(
    model,
    tokenizer,
    prompt: str,
    max_tokens: int,
    chat: bool = True,
    temperature: float = 0.0,
    echo: bool = True,
    compile: bool = False,
) -> dict[str, Any]:
    """Stream a completion of `prompt` to stdout; return its text and timings.

    As `mlx_lm.generate` does, the prompt is wrapped in the tokenizer's chat template when it
    has one (an instruct model given the raw prompt often ends at once); `chat=False` sends the
    prompt as it is. `compile` decodes with a compiled step (mlxq.generation.timed_generate).
    """
    import torch

    from mlxq.generation import timed_generate, token_clock

    device = next(model.parameters(), torch.empty(0)).device
    if chat and getattr(tokenizer, "chat_template", None):
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    if inputs["input_ids"].shape[-1] == 0:  # the model would fail on an empty sequence
        raise CLIError(
            f"the prompt {prompt!r} encodes to no tokens with {type(tokenizer).__name__}; "
            "give a prompt the tokenizer knows (or drop --ignore-chat-template)"
        )
    max_tokens = fit_context(model, inputs["input_ids"].shape[-1], max_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    new, stats = timed_generate(
        model,
        inputs["input_ids"].to(device),
        max_tokens,
        attention_mask=inputs["attention_mask"].to(device),
        streamer=token_clock(tokenizer, echo),
        temperature=temperature,
        pad_token_id=pad,
        compile=compile,
    )
    return {"text": tokenizer.decode(new, skip_special_tokens=True), **stats}


def cmd_generate(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise CLIError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if not 0 <= args.temperature < math.inf:  # a negative or NaN one decoded greedily
        raise CLIError(f"--temperature must be finite and >= 0 (0: greedy), got {args.temperature}")
    model, tokenizer, info = load_model(args.model, args.device, args.dtype, args.threads)
    chat = not args.ignore_chat_template
    stats = generate(
        model, tokenizer, args.prompt, args.max_tokens, chat, args.temperature, compile=args.compile
    )
    print_stats(info, stats)
    return 0
