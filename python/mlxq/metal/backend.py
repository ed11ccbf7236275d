"""How mlxq runs its Metal kernels on MPS tensors: the choice of path.

Paths (``MLXQ_METAL`` forces one; the default ``auto`` tries them in this order):

``prebuilt``
    The Objective-C++ kernels linked into ``mlxq._C`` encode the kernels of ``mlxq.metallib``
    (built from ``metal/*.metal`` when the package was installed on macOS).
``runtime``
    The same ``metal/*.metal`` text compiled on first use with ``torch.mps.compile_shader`` and
    dispatched from Python with the same launch (``mlxq._C.metal_launch_*``: plan, bound tensors
    and outputs; :mod:`mlxq.metal.runtime`), for when the metallib is missing, stale, or fails
    to load (e.g. built for a newer MSL than the running macOS accepts).
``off``
    No Metal kernels: mlxq ops on MPS tensors raise an error that says so.

The path is chosen once, by :func:`install` at ``import mlxq``, said once in the ``mlxq``
logger (INFO; WARNING when a forced path or every path fails), and reported by
:func:`mlxq.backend_info`. Failed loads are caught and reported as text, never printed.

Dispatch precedence: exactly one kernel is registered for the MPS dispatch key of each mlxq op,
so nothing is ever overridden: the native kernels (``mlxq._C.mps_native_register``) on the
prebuilt path, the Python kernels of :mod:`mlxq.metal.runtime` (``torch.library.register_kernel(...,
"mps")``) on the runtime path, and kernels that raise on ``off`` or when no path works. CPU,
Meta (fake) and Autograd kernels are registered elsewhere and are unaffected; autograd
redispatches to whichever MPS kernel is registered.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlxq._native import _C
from mlxq.format import METAL_BITS, MODE_DEFAULTS, SUPPORTED_GROUP_SIZES
from mlxq.metal.runtime import OPS, RuntimeKernels, instantiated_kernels, register_runtime_kernels

__all__ = [
    "MetalChoice",
    "MetalEnv",
    "active",
    "choose_path",
    "expected_kernel_names",
    "install",
    "metal_source_dir",
    "metallib_path",
]

logger = logging.getLogger("mlxq")

PATHS = ("auto", "prebuilt", "runtime", "off")
_PKG_DIR = Path(__file__).resolve().parents[1]  # the mlxq package
# MLX's floating-point modes -> (group size, bits): every fp_* op has Metal kernels for each
FP_MODES = {mode: MODE_DEFAULTS[mode] for mode in ("mxfp4", "nvfp4", "mxfp8")}


# --- where things are -------------------------------------------------------------------------


def metallib_path(package_dir: Path = _PKG_DIR) -> Path:
    """The prebuilt library, next to the extension (``MLXQ_METALLIB`` overrides)."""
    env = os.environ.get("MLXQ_METALLIB")
    return Path(env) if env else Path(package_dir) / "mlxq.metallib"


def metal_source_dir(package_dir: Path = _PKG_DIR) -> Path | None:
    """The ``.metal`` sources: ``mlxq/metal`` in a wheel, the repository's ``metal/`` in an
    editable install (``MLXQ_METAL_DIR`` overrides); None when neither has any."""
    env = os.environ.get("MLXQ_METAL_DIR")
    candidates = [Path(env)] if env else [package_dir / "metal", package_dir.parents[1] / "metal"]
    for d in candidates:
        if d.is_dir() and any(d.glob("*.metal")):
            return d
    return None


def expected_kernel_names() -> set[str]:
    """Every kernel the dispatch plan can ask for, found by planning each op, dtype, group size,
    bits (or floating-point mode) and matmul shape (decode/GEMM, transposed or not) on meta
    tensors."""
    names: set[str] = set()
    meta = {"device": "meta"}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for gs in SUPPORTED_GROUP_SIZES:
            for bits in METAL_BITS:
                k, n = gs, 8
                wq = torch.empty(n, k * bits // 32, dtype=torch.uint32, **meta)
                s = torch.empty(n, 1, dtype=dtype, **meta)
                w = torch.empty(n, k, dtype=dtype, **meta)
                names.add(_C.plan_affine_quantize(w, gs, bits)["kernel"])
                names.add(_C.plan_affine_dequantize(wq, s, s, gs, bits)["kernel"])
                for m in (1, 64):
                    for transpose, width in ((True, k), (False, n)):
                        x = torch.empty(m, width, dtype=dtype, **meta)
                        plan = _C.plan_affine_matmul(x, wq, s, s, gs, bits, transpose)
                        names.add(plan["kernel"])
                        plan = _C.plan_affine_gather_matmul(
                            x, wq, s, s, None, None, gs, bits, transpose
                        )
                        names.add(plan["kernel"])
                for transpose, width in ((True, k), (False, n)):
                    # sorted indices over enough one-row pairs: the sorted gather qmm
                    x = torch.empty(64, 1, width, dtype=dtype, **meta)
                    plan = _C.plan_affine_gather_matmul(
                        x, wq, s, s, None, None, gs, bits, transpose, True
                    )
                    names.add(plan["kernel"])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for mode, (gs, bits) in FP_MODES.items():
            k, n = 2 * gs, 8
            wq = torch.empty(n, k * bits // 32, dtype=torch.uint32, **meta)
            s = torch.empty(n, k // gs, dtype=torch.uint8, **meta)
            for m in (1, 64):
                for transpose, width in ((True, k), (False, n)):
                    x = torch.empty(m, width, dtype=dtype, **meta)
                    names.add(_C.plan_fp_matmul(x, wq, s, mode, gs, bits, transpose)["kernel"])
                    plan = _C.plan_fp_gather_matmul(x, wq, s, mode, gs, bits, None, None, transpose)
                    names.add(plan["kernel"])
            for transpose, width in ((True, k), (False, n)):
                # sorted indices over enough one-row pairs: the sorted gather qmm
                x = torch.empty(64, 1, width, dtype=dtype, **meta)
                plan = _C.plan_fp_gather_matmul(
                    x, wq, s, mode, gs, bits, None, None, transpose, None, True
                )
                names.add(plan["kernel"])
            for g in (None, torch.ones(1, **meta)) if mode == "nvfp4" else (None,):
                names.add(_C.plan_fp_dequantize(wq, s, mode, gs, bits, g, dtype)["kernel"])
            w = torch.empty(n, k, dtype=dtype, **meta)
            names.add(_C.plan_fp_quantize(w, mode, gs, bits)["kernel"])
    return names


def _register_error_kernels(message: str, lib: Any = None) -> None:
    def fail(*args: Any, **kwargs: Any):
        raise RuntimeError(f"mlxq: no Metal kernels for MPS tensors: {message}")

    for op in OPS:
        torch.library.register_kernel(f"mlxq::{op}", "mps", fail, lib=lib)


# --- choosing a path ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MetalEnv:
    """What the choice looks at; tests pass fakes."""

    mps_available: bool
    native: Any  # mlxq._C (mps_native_compiled, mps_native_load, mps_native_function_names)
    metallib: Path
    sources: Path | None
    compile_shader: Callable[[str], Any] | None
    expected: Callable[[], set[str]] = expected_kernel_names


@dataclass
class MetalChoice:
    """The Metal path in use: prebuilt, runtime, off, failed (forced or every path failed) or
    unavailable (no MPS device), with why."""

    path: str
    reason: str
    requested: str = "auto"
    attempts: list[str] = field(default_factory=list)
    metallib: Path | None = None
    sources: Path | None = None


def _first(names: Iterable[str], n: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _try_prebuilt(env: MetalEnv) -> tuple[bool, str]:
    if not getattr(env.native, "mps_native_compiled", False):
        return False, (
            "mlxq._C was built without the Objective-C++ MPS backend (not built on macOS, or "
            "torch without MPS at build time)"
        )
    if not env.metallib.is_file():
        return False, f"{env.metallib} does not exist (the Metal toolchain was missing at build?)"
    error = env.native.mps_native_load(str(env.metallib))
    if error:
        return False, f"loading {env.metallib} failed: {error}"
    missing = env.expected() - set(env.native.mps_native_function_names())
    if missing:
        return False, f"{env.metallib} lacks kernels {_first(missing)} (stale build)"
    return True, f"loaded {env.metallib}"


def _try_runtime(env: MetalEnv) -> tuple[bool, str]:
    if env.compile_shader is None:
        return False, f"torch {torch.__version__} has no torch.mps.compile_shader"
    if env.sources is None:
        return False, "the metal/*.metal sources are not installed with the package"
    missing = env.expected() - set(instantiated_kernels(env.sources))
    if missing:
        return False, f"{env.sources} lacks kernels {_first(missing)}"
    return True, f"compiling {env.sources}/*.metal with torch.mps.compile_shader on first use"


def choose_path(requested: str, env: MetalEnv) -> MetalChoice:
    """The Metal path for ``MLXQ_METAL=requested`` in `env` (no side effects but loading the
    metallib into the native backend)."""
    req = (requested or "auto").strip().lower()
    note = []
    if req not in PATHS:
        note.append(f"MLXQ_METAL={requested!r} is not one of {', '.join(PATHS)}; using auto")
        req = "auto"
    choice = MetalChoice("unavailable", "", req, note, env.metallib, env.sources)
    if not env.mps_available:
        choice.reason = "no MPS device (Metal kernels run only on Apple GPUs)"
        return choice
    if req == "off":
        choice.path, choice.reason = "off", "MLXQ_METAL=off"
        return choice
    if req in ("auto", "prebuilt"):
        ok, why = _try_prebuilt(env)
        if ok:
            choice.path, choice.reason = "prebuilt", why
            return choice
        choice.attempts.append(f"prebuilt: {why}")
        if req == "prebuilt":
            choice.path, choice.reason = "failed", f"MLXQ_METAL=prebuilt, but {why}"
            return choice
    ok, why = _try_runtime(env)
    if ok:
        choice.path, choice.reason = "runtime", why
        return choice
    choice.attempts.append(f"runtime: {why}")
    choice.path = "failed"
    choice.reason = (
        f"MLXQ_METAL=runtime, but {why}" if req == "runtime" else "; ".join(choice.attempts)
    )
    return choice


def _apply(choice: MetalChoice, env: MetalEnv, lib: Any = None) -> None:
    # Registers exactly one MPS kernel per op (see the module docstring on precedence).
    if choice.path == "prebuilt":
        env.native.mps_native_register()
    elif choice.path == "runtime":
        register_runtime_kernels(RuntimeKernels(env.compile_shader, env.sources), lib)
    elif choice.path in ("off", "failed"):
        _register_error_kernels(choice.reason, lib)


def current_env() -> MetalEnv:
    """The real environment of this process."""
    mps = torch.backends.mps.is_available()
    compile_shader = getattr(torch.mps, "compile_shader", None) if mps else None
    return MetalEnv(mps, _C, metallib_path(), metal_source_dir(), compile_shader)


_lock = threading.Lock()
_choice: MetalChoice | None = None


def install(
    env: MetalEnv | None = None, requested: str | None = None, lib: Any = None
) -> MetalChoice:
    """Chooses the Metal path once per process, registers its MPS kernels and logs it once.

    `env` and `requested` default to this process's environment and ``MLXQ_METAL``; `lib` (a
    ``torch.library.Library``) scopes the Python registrations, for tests."""
    global _choice
    with _lock:
        if _choice is not None:
            return _choice
        env = env or current_env()
        requested = os.environ.get("MLXQ_METAL", "auto") if requested is None else requested
        choice = choose_path(requested, env)
        _apply(choice, env, lib)
        _choice = choice
    level = logging.WARNING if choice.path == "failed" else logging.INFO
    if choice.path != "unavailable" or choice.attempts:
        logger.log(level, "mlxq: Metal path: %s (%s)", choice.path, choice.reason)
    return choice


def active() -> MetalChoice:
    """The Metal path in use (chosen now if :func:`install` has not run yet)."""
    return _choice if _choice is not None else install()
