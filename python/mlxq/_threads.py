"""OpenMP's wait policy for mlxq's processes, set before torch loads its OpenMP runtime.

After each parallel region, libgomp's workers spin for about 300,000 iterations before they
sleep. On a machine where another process is busy, a spinning worker takes the core that the
main thread (or the other process) needs, and every one of the few hundred parallel regions of
a decoded token then waits for the scheduler: 2-thread decode fell from ~50 to ~5 tokens/s
with the other core busy. A short spin keeps the quiet speed (regions of one token follow each
other within microseconds) and lets a busy machine share fairly.

Only the environment is changed, and only where the user has not set it and torch is not
imported yet (the OpenMP runtime reads it once, when it loads): the `mlxq` command line always;
a program that imports mlxq before torch; never a program that imported torch first (set
GOMP_SPINCOUNT yourself there, see the README).
"""

from __future__ import annotations

import os
import sys

__all__ = ["SPIN_COUNT", "set_openmp_wait_policy"]

SPIN_COUNT = "20000"


def set_openmp_wait_policy() -> bool:
    """Set GOMP_SPINCOUNT (libgomp, torch's OpenMP on Linux) unless the user chose a wait
    policy or torch is already loaded; returns whether it did."""
    if "torch" in sys.modules:
        return False
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True
