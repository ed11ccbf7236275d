"""Which MLX quantizer the Metal affine_quantize kernel reproduces: MLX's own Metal kernel (what
mx.quantize does on a Mac's GPU, so what `mlx_lm convert` writes there), not MLX's CPU path.

The two differ in two places: the GPU starts the group maximum at 0 (an all-negative group
spans [min, 0]) and rounds half away from zero (`round`), where the CPU takes the plain
maximum and rounds half to even (`rint`). The oracle is a float64 numpy restatement of each
rule (tests/oracles.py affine_quantize_ref), independent of our kernels; the CPU flavour of it
is first held bit for bit to mx.quantize on this machine, which checks its arithmetic and
packing. The kernel runs in the MSL emulator for every Metal bit width, group size and dtype on
random and adversarial groups (exact .5 ties, all-negative groups, constant groups, groups
within the 1e-7 floor, all-positive groups), and the adversarial set is checked to tell the
two rules apart. 1 bit has no MLX GPU kernel and keeps the CPU rule (plain min/max).
"""

from __future__ import annotations

import mlx.core as mx
import mlxq
import pytest
import torch
from mlxq.testing import metal_emulator as emu
from mlxq.testing.metal_emulator import ops as metal_ops
from oracles import BITS, DTYPES, GROUP_SIZES, affine_quantize_ref, to_mx, to_torch, words

pytestmark = pytest.mark.skipif(
    not emu.available(), reason="no clang for the MSL emulator (pip install ziglang)"
)

COMBOS = [(b, g, d) for d in DTYPES for g in GROUP_SIZES for b in BITS]
COMBO_IDS = [f"b{b}-gs{g}-{str(d).split('.')[-1]}" for b, g, d in COMBOS]


@pytest.fixture(scope="module", autouse=True)
def library() -> emu.Library:
    return emu.load_library()


def _adversarial(gen: torch.Generator, gs: int, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Groups [rows, 2 * gs] that separate the two rules, in `dtype`."""
    n = (1 << bits) - 1
    u = 2.0**-4  # a power of two: scale u and every (j + 0.5) u below are exact
    j = torch.arange(gs) % n
    tie = (j + 0.5) * u  # (w - bias) / scale lands exactly on .5
    groups = [
        # [0, n u] with ties inside: the scale is -u exactly, q = n - j - 0.5.
        torch.cat([torch.tensor([0.0, n * u]), tie[: gs - 2]]),
        # all negative with ties: the GPU range is [-n u, 0] (scale u, q = n - j - 0.5);
        # the CPU range ends at the group's own maximum.
        torch.cat([torch.tensor([-n * u]), -tie[: gs - 1]]),
        -(torch.rand(gs, generator=gen) + 0.01),  # all negative, random
        -(torch.rand(gs, generator=gen) * 1e-3 + 5.0),  # all negative, narrow, far from 0
        torch.rand(gs, generator=gen) + 0.01,  # all positive: the minimum is not clamped
        torch.full((gs,), 0.75),  # constant groups: positive, negative, zero, -0.0
        torch.full((gs,), -0.75),
        torch.zeros(gs),
        torch.full((gs,), -0.0),
        torch.full((gs,), -3e-8),  # inside the 1e-7 floor, all negative
        (torch.rand(gs, generator=gen) - 0.5) * 1e-8,  # q0 rounds to 0: bias 0
        torch.randn(gs, generator=gen) * 1e3,
    ]
    w = torch.stack(groups)  # [rows, gs]
    w = torch.cat([w, w.flip(0) * -1.0], dim=1)  # two groups per row; the mirror too
    return w.to(dtype)


def _random(gen: torch.Generator, gs: int, dtype: torch.dtype) -> torch.Tensor:
    w = torch.randn(6, 4 * gs, generator=gen)
    w = w * torch.exp(2 * torch.randn(6, 1, generator=gen)) + 0.3 * torch.randn(6, 1, generator=gen)
    return w.to(dtype).reshape(2, 3, 4 * gs)  # leading dims are flattened by the plan


def _assert_same(got, want, what: str) -> None:
    for name, g, r in zip(("wq", "scales", "biases"), got, want, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype, f"{what}: {name}"
        if name == "wq":
            same = (words(g) == words(r)).all()
        else:
            same = torch.equal(
                g.view(torch.int16) if g.dtype != torch.float32 else g.view(torch.int32),
                r.view(torch.int16) if r.dtype != torch.float32 else r.view(torch.int32),
            )
        assert same, f"{what}: {name} differs"


def _mx_cpu(w: torch.Tensor, gs: int, bits: int):
    return [to_torch(a) for a in mx.quantize(to_mx(w), group_size=gs, bits=bits)]


@pytest.mark.parametrize(("bits", "gs", "dtype"), COMBOS, ids=COMBO_IDS)
def test_cpu_rule_oracle_is_mx_quantize(bits, gs, dtype, gen) -> None:
    """The oracle's machinery (fp32 rounding, edge, packing) agrees with MLX on its CPU rule."""
    for w in (_random(gen, gs, dtype), _adversarial(gen, gs, bits, dtype)):
        _assert_same(affine_quantize_ref(w, gs, bits, "cpu"), _mx_cpu(w, gs, bits), "cpu oracle")
        _assert_same(mlxq.affine_quantize(w, gs, bits), _mx_cpu(w, gs, bits), "CPU op")


@pytest.mark.parametrize(("bits", "gs", "dtype"), COMBOS, ids=COMBO_IDS)
def test_metal_quantize_is_mlx_gpu_rule(bits, gs, dtype, gen) -> None:
    adv = _adversarial(gen, gs, bits, dtype)
    gpu, cpu = affine_quantize_ref(adv, gs, bits, "gpu"), affine_quantize_ref(adv, gs, bits, "cpu")
    # The adversarial groups tell the rules apart (so this test could fail).
    assert not (words(gpu[0]) == words(cpu[0])).all() or not torch.equal(gpu[2], cpu[2])
    for name, w in (("adversarial", adv), ("random", _random(gen, gs, dtype))):
        got = metal_ops.affine_quantize(w, gs, bits)
        assert emu.last_dispatch_report().kernel.endswith(f"_gs{gs}_b{bits}")
        _assert_same(got, affine_quantize_ref(w, gs, bits, "gpu"), f"{name} vs MLX's GPU rule")


@pytest.mark.parametrize("gs", GROUP_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_one_bit_keeps_the_cpu_rule(gs, dtype, gen) -> None:
    """MLX has no 1-bit GPU quantizer: 1 bit stays mx.quantize's (plain min/max, rint)."""
    w = _adversarial(gen, gs, 2, dtype)
    _assert_same(metal_ops.affine_quantize(w, gs, 1), _mx_cpu(w, gs, 1), "1 bit vs mx.quantize")
