"""MoeExperts sorts prefill-sized calls by expert, as mlx-lm's SwitchGLU does.

From 64 (token, expert) pairs on (mlx-lm's `indices.size >= 64`), the pairs are sorted by
expert, the gather ops run with `sorted_indices=True` (on Metal: the sorted gather qmm) and the
rows go back to token order. Oracle: the same layer run unsorted (the sort threshold raised),
bit for bit, in affine and float modes; the ops' own arguments are recorded with a
TorchDispatchMode, and a decode-sized call is checked to run no sort at all.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mlxq import moe
from mlxq.moe import AffineSwitchLinear, ClampedSwiGLU, MoeExperts
from torch.utils._python_dispatch import TorchDispatchMode

E, H, INTER = 8, 64, 128  # experts, hidden, intermediate (multiples of every group size)
GATHER_OPS = ("affine_gather_matmul", "fp_gather_matmul")


class _Recorder(TorchDispatchMode):
    """Records every op run below it: (name, sorted_indices of the gather ops)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, bool | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        flag = None
        if name in GATHER_OPS:
            names = [a.name for a in func._schema.arguments]
            i = names.index("sorted_indices")
            flag = kwargs.get("sorted_indices", args[i] if len(args) > i else False)
        self.calls.append((name, flag))
        return func(*args, **kwargs)


def _layer(mode: str, gen: torch.Generator, dtype: torch.dtype) -> MoeExperts:
    bits, gs = {"affine": (4, 64), "mxfp4": (4, 32), "nvfp4": (4, 16)}[mode]
    bias = mode == "mxfp4"  # gpt-oss: mxfp4 stacks with float biases and its clamped gate

    def stack(out_f: int, in_f: int) -> AffineSwitchLinear:
        w = (torch.randn(E, out_f, in_f, generator=gen) * 0.2).to(dtype)
        b = (torch.randn(E, out_f, generator=gen) * 0.1).to(dtype) if bias else None
        return AffineSwitchLinear.from_float(w, bits, gs, mode, bias=b)

    gate = {"glu": ClampedSwiGLU(1.702, 7.0)} if bias else {"act_fn": F.silu}
    return MoeExperts(stack(INTER, H), stack(INTER, H), stack(H, INTER), **gate)


def _route(tokens: int, k: int, gen: torch.Generator, dtype: torch.dtype):
    x = torch.randn(tokens, H, generator=gen).to(dtype)
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(tokens)])
    w = torch.softmax(torch.randn(tokens, k, generator=gen), -1).to(dtype)
    return x, idx, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("mode", ["affine", "mxfp4", "nvfp4"])
def test_sorted_prefill_is_bit_equal_to_unsorted(mode, dtype, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(7)
    layer = _layer(mode, gen, dtype)
    x, idx, w = _route(37, 2, gen, dtype)  # 74 pairs: sorted
    with torch.no_grad(), _Recorder() as rec:
        got = layer(x, idx, w)
    flags = [f for name, f in rec.calls if name in GATHER_OPS]
    assert flags == [True, True, True], rec.calls  # gate, up, down: all sorted
    assert any(name == "sort" for name, _ in rec.calls)
    monkeypatch.setattr(moe, "SORT_MIN_PAIRS", 10**9)
    with torch.no_grad(), _Recorder() as rec:
        want = layer(x, idx, w)
    assert [f for name, f in rec.calls if name in GATHER_OPS] == [False] * 3
    assert got.shape == want.shape == x.shape and got.dtype == dtype
    assert torch.equal(got, want)
    assert got.abs().sum() > 0


def test_decode_does_not_sort() -> None:
    """Fewer than 64 pairs (here 31 tokens x top-2 = 62): no sort, no index_copy, unsorted
    gather ops; 64 pairs exactly take the sorted path (mlx-lm's `>=`)."""
    gen = torch.Generator().manual_seed(3)
    layer = _layer("affine", gen, torch.float32)
    for tokens, sorted_ in ((1, False), (31, False), (32, True)):
        x, idx, w = _route(tokens, 2, gen, torch.float32)
        with torch.no_grad(), _Recorder() as rec:
            layer(x, idx, w)
        names = [name for name, _ in rec.calls]
        flags = [f for name, f in rec.calls if name in GATHER_OPS]
        assert flags == [sorted_] * 3, (tokens, rec.calls)
        assert ("sort" in names) == sorted_ and ("index_copy" in names) == sorted_, names
