"""Tests on tensor sizes that add no guard under torch.compile / torch.export.

A kernel path picked in Python by a plain `if` on a size (decode or prompt attention, sorted or
unsorted expert pairs) makes the tracer add a guard that pins the size to one side of the
threshold: torch.export then refuses a dynamic dimension whose range crosses it, and
torch.compile recompiles there. :func:`known_le` answers such a test only where no guard is
needed; where it cannot, the caller takes a path valid for every size (one computing the same
values, or a `torch.cond` that picks at run time).
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ["known_le"]


def known_le(a: int | torch.SymInt, b: int | torch.SymInt) -> bool | None:
    """`a <= b` where it is decided without a guard: always in eager (plain ints), and under
    tracing where the sizes are static or their ranges settle it (a `Dim` whose bounds lie on
    one side); else None. Not for a test whose answer differs between sizes 1 and 2: tracing
    reasons about a `Dim(min=1)` as if it were at least 2, and the program still runs at 1."""
    # two tests, no negation: torch.sym_not of a plain bool breaks torch.compile's graph, and
    # isinstance(..., bool) is True there for a SymBool too
    if statically_known_true(a <= b):
        return True
    if statically_known_true(a > b):
        return False
    return None
