"""mlxq.generation: the thread count fitted to the machine's load, and compiled decode giving
the eager tokens."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

import torch
from mlxq import generation


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def test_busy_cores_are_left_to_their_processes():
    cores = _cores()
    expected = 1 if os.path.exists("/proc/stat") else cores  # elsewhere: threads as asked
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.5)
        assert generation.threads_for_load(cores, window_s=0.3) == expected
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()


def test_one_thread_and_no_proc_stay_as_asked(monkeypatch):
    assert generation.threads_for_load(1) == 1
    monkeypatch.setattr(generation, "_cpu_jiffies", lambda: None)
    assert generation.threads_for_load(7) == 7


def test_own_work_does_not_count_as_load(monkeypatch):
    """The process's own CPU time is subtracted: busy jiffies that are all ours leave every
    core to us."""
    ticks = iter([(1000, 500), (1000 + 2 * 10, 500 + 2 * 10)])  # 2 cores busy, all ours
    monkeypatch.setattr(generation, "_cpu_jiffies", lambda: next(ticks))
    monkeypatch.setattr(os, "sysconf", lambda name: 100)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert generation.threads_for_load(2, window_s=0.1) == 2


def test_compiled_decode_gives_the_eager_tokens(tmp_path, monkeypatch):
    from mlx_models import tiny_mlx_checkpoint
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(
        tiny_mlx_checkpoint("qwen3", 4, 64), dtype=torch.float32
    ).eval()
    prompt = torch.tensor([[1, 400, 2000, 31, 7, 99, 1234, 5]])
    eager, _ = generation.timed_generate(model, prompt, 6, min_new_tokens=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled, stats = generation.timed_generate(
            model, prompt, 6, min_new_tokens=6, compile=True
        )
    assert torch.equal(compiled, eager)
    # mlxq's own arguments to generate are current ones (`mlxq generate --compile` printed
    # transformers' FutureWarning on `past_key_values`), and /proc is read with closed files
    ours = [
        str(w.message)
        for w in caught
        if "past_key_values" in str(w.message) or issubclass(w.category, ResourceWarning)
    ]
    assert not ours, ours
    assert stats["first_step_s"] > 0 and stats["decode_tps"] > 0


def test_ignore_eos_generates_through_the_end_token():
    from mlx_models import tiny_mlx_checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_mlx_checkpoint("qwen3", 4, 64), dtype=torch.float32
    ).eval()
    prompt = torch.tensor([[1, 400, 2000, 31, 7, 99, 1234, 5]])
    model.generation_config.eos_token_id = None
    free, _ = generation.timed_generate(model, prompt, 6)
    # a later token of the greedy continuation (the first one not seen before it, else the
    # first token) becomes the model's end token: generation stops there unless told otherwise
    ids = free.tolist()
    end = next((i for i in range(1, len(ids)) if ids[i] not in ids[:i]), 0)
    model.generation_config.eos_token_id = ids[end]
    stopped, _ = generation.timed_generate(model, prompt, 6)
    assert torch.equal(stopped, free[: end + 1])
    through, stats = generation.timed_generate(model, prompt, 6, ignore_eos=True)
    assert torch.equal(through, free) and stats["generated_tokens"] == 6
