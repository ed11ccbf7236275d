"""Shared fixtures for the mlxq tests.

Random data is fresh on every run: the session seed comes from MLXQ_TEST_SEED when set (to
replay a failure) and is printed in pytest's header; each test derives its own generator from
that seed and its node id, so a test's data does not depend on which other tests ran.
"""

from __future__ import annotations

import os
import random
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/oracles.py importable as `oracles`

import mlxq  # noqa: E402

SESSION_SEED = int(os.environ.get("MLXQ_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"mlxq: MLXQ_TEST_SEED={SESSION_SEED} (set it to replay this run's random data); "
        f"cpu isa {mlxq._C.cpu_isa()}"
    ]


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A torch generator seeded from the session seed and this test's node id."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(f"{SESSION_SEED}:{request.node.nodeid}".encode()))
    return g


@pytest.fixture(autouse=True)
def _seed_global_rng(request: pytest.FixtureRequest) -> None:
    """Seeds torch's global generator per test too, so code that draws from it (transformers'
    weight init, unseeded helpers) replays under MLXQ_TEST_SEED and ignores test order."""
    torch.manual_seed(zlib.crc32(f"{SESSION_SEED}:global:{request.node.nodeid}".encode()))


def _available_isas() -> list[str]:
    """Every CPU kernel set this machine can run (the best one is what "auto" picks)."""
    found = []
    for name in ("avx512", "avx2", "portable"):
        try:
            mlxq._C.set_cpu_isa(name)
            found.append(name)
        except ValueError:
            pass
    mlxq._C.set_cpu_isa("auto")
    return found


@pytest.fixture(params=_available_isas())
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs the test once with each CPU kernel set this machine can run."""
    mlxq._C.set_cpu_isa(request.param)
    try:
        yield mlxq._C.cpu_isa()
    finally:
        mlxq._C.set_cpu_isa("auto")


def random_weight(
    shape: tuple[int, ...] | list[int], dtype: torch.dtype, gen: torch.Generator
) -> torch.Tensor:
    """Weights like a real layer's, plus the corner cases of the quantizer.

    Rows get different magnitudes and offsets (so some groups are all-positive, which makes
    mlx pick a negative scale), and a few groups are constant or all zero.
    """
    shape = tuple(shape)
    w = torch.randn(shape, generator=gen)
    if len(shape) >= 2 or shape[-1] >= 64:
        rows = shape[:-1] + (1,)
        w = w * torch.exp(torch.randn(rows, generator=gen)) + torch.randn(rows, generator=gen)
    flat = w.reshape(-1, 32)  # every supported K is a multiple of 32
    n = flat.shape[0]
    if n >= 4:
        pick = torch.randperm(n, generator=gen)[:2]
        flat[pick[0]] = 0.0
        flat[pick[1]] = flat[pick[1], 0]
    return flat.reshape(shape).to(dtype)


# --- MLX checkpoints for the transformers integration tests (tests/mlx_models.py) -------------


@pytest.fixture(scope="session")
def smollm2_4bit_g32() -> Path:
    """SmolLM2-135M-Instruct, 4-bit group 32, converted by mlx-lm (cached across sessions)."""
    from mlx_models import smollm2

    return smollm2(4, 32)
