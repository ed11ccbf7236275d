"""Timing helpers shared by the benchmark harnesses."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(
    fn: Callable[[], object],
    *,
    warmup: int = 2,
    min_reps: int = 5,
    budget_s: float = 1.0,
    max_reps: int = 200,
) -> float:
    """Median wall time of `fn` in milliseconds, after `warmup` calls.

    Repeats until `budget_s` seconds are spent (at least `min_reps` unless a single call already
    takes longer than the budget, then once), so that slow peers do not dominate a run.
    """
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    first = (time.perf_counter() - t0) / max(warmup, 1)
    reps = max_reps if first == 0 else int(budget_s / first)
    reps = max(1, min(max_reps, max(reps, min_reps if first * min_reps < 4 * budget_s else 1)))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def default_out(name: str):
    """Where a benchmark writes its results without --out: the mlxq user cache (never the
    current folder, which may be anywhere once mlxq is installed)."""
    from mlxq.demo_model import mlxq_cache_dir

    return mlxq_cache_dir() / "bench" / name
