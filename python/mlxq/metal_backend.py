"""How mlxq runs its Metal kernels on MPS tensors: the choice of path, and the run-time fallback.

Paths (``MLXQ_METAL`` forces one; the default ``auto`` tries them in this order):

``prebuilt``
    The Objective-C++ kernels linked into ``mlxq._C`` encode the kernels of ``mlxq.metallib``
    (built from ``metal/*.metal`` when the package was installed on macOS).
``runtime``
    The same ``metal/*.metal`` text compiled on first use with ``torch.mps.compile_shader`` and
    dispatched from Python with the same launch (``mlxq._C.mps_launch_*``: plan, bound tensors
    and outputs), for when the metallib is missing, stale, or fails to load (e.g. built for a
    newer MSL than the running macOS accepts).
``off``
    No Metal kernels: mlxq ops on MPS tensors raise an error that says so.

The path is chosen once, by :func:`install` at ``import mlxq``, said once in the ``mlxq``
logger (INFO; WARNING when a forced path or every path fails), and reported by
:func:`mlxq.backend_info`. Failed loads are caught and reported as text, never printed.

Dispatch precedence: exactly one kernel is registered for the MPS dispatch key of each mlxq op,
so nothing is ever overridden: the native kernels (``mlxq._C.mps_native_register``) on the
prebuilt path, the Python kernels of this module (``torch.library.register_kernel(...,
"mps")``) on the runtime path, and kernels that raise on ``off`` or when no path works. CPU,
Meta (fake) and Autograd kernels are registered elsewhere and are unaffected; autograd
redispatches to whichever MPS kernel is registered.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlxq._native import _C
from mlxq.format import METAL_BITS, SUPPORTED_GROUP_SIZES

__all__ = [
    "MetalChoice",
    "MetalEnv",
    "active",
    "choose_path",
    "expected_kernel_names",
    "install",
    "metal_source_dir",
    "metallib_path",
    "runtime_source",
    "RuntimeKernels",
]

logger = logging.getLogger("mlxq")

PATHS = ("auto", "prebuilt", "runtime", "off")
OPS = ("affine_quantize", "affine_dequantize", "affine_matmul", "affine_gather_matmul")
_PKG_DIR = Path(__file__).resolve().parent


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


_INSTANTIATE = re.compile(r'^[ \t]*MLXQ_INSTANTIATE\([ \t]*"([^"]+)"', re.M)


def instantiated_kernels(metal_dir: Path) -> dict[str, Path]:
    """Host name -> the ``.metal`` file whose ``MLXQ_INSTANTIATE`` line defines it."""
    found: dict[str, Path] = {}
    for path in sorted(Path(metal_dir).glob("*.metal")):
        for name in _INSTANTIATE.findall(path.read_text()):
            found[name] = path
    return found


def expected_kernel_names() -> set[str]:
    """Every kernel the dispatch plan can ask for, found by planning each op, dtype, group size,
    bits and matmul shape (decode/GEMM, transposed or not) on meta tensors."""
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
    return names


# --- the run-time fallback ----------------------------------------------------------------------

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.M)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.M)
_TG_PARAM = re.compile(
    r",\s*threadgroup\s+([A-Za-z_]\w*)\s*\*\s*([A-Za-z_]\w*)\s*\[\[\s*threadgroup\s*\(\s*(\d+)\s*\)\s*\]\]"
)
_TG_ELEMENT_BYTES = {"float": 4, "half": 2, "bfloat": 2, "int": 4, "uint": 4, "short": 2,
                     "ushort": 2, "char": 1, "uchar": 1}  # fmt: skip


def _inline_includes(path: Path, seen: set[Path]) -> str:
    # torch.mps.compile_shader takes one source text: quoted includes are pasted in (once each).
    text = _PRAGMA_ONCE.sub("", path.read_text())

    def paste(m: re.Match[str]) -> str:
        inc = (path.parent / m.group(1)).resolve()
        if inc in seen:
            return ""
        if not inc.is_file():
            raise FileNotFoundError(f"{path}: included file {m.group(1)} not found")
        seen.add(inc)
        return _inline_includes(inc, seen)

    return _INCLUDE.sub(paste, text)


def runtime_source(
    kernel_name: str, metal_dir: Path, threadgroup_memory: Mapping[int, int] | None = None
) -> str:
    """The MSL text that ``torch.mps.compile_shader`` compiles for one kernel.

    It is the kernel's ``.metal`` file with its headers pasted in, keeping only the
    ``MLXQ_INSTANTIATE`` line of this kernel (one instantiation compiles in a fraction of the
    time of a whole file). ``compile_shader`` cannot bind threadgroup memory, so each
    ``threadgroup T* p [[threadgroup(i)]]`` parameter of the entry point becomes an array of
    ``threadgroup_memory[i]`` bytes declared in the kernel body (the plan's size). Comments with
    non-ASCII characters are made ASCII, because torch reads the source as ASCII.
    """
    files = instantiated_kernels(metal_dir)
    if kernel_name not in files:
        raise RuntimeError(
            f"mlxq: no MLXQ_INSTANTIATE line defines Metal kernel {kernel_name} in {metal_dir}"
        )
    path = files[kernel_name].resolve()
    text = _inline_includes(path, {path})
    text = _INSTANTIATE.sub(lambda m: m.group(0) if m.group(1) == kernel_name else "//", text)
    tgm = dict(threadgroup_memory or {})
    while (m := _TG_PARAM.search(text)) is not None:
        elem, name, index = m.group(1), m.group(2), int(m.group(3))
        if index not in tgm:
            raise RuntimeError(f"mlxq: {kernel_name}: no size for threadgroup({index}) `{name}`")
        if elem not in _TG_ELEMENT_BYTES or tgm[index] % _TG_ELEMENT_BYTES[elem]:
            raise RuntimeError(
                f"mlxq: {kernel_name}: cannot declare {tgm[index]} bytes of `threadgroup {elem}`"
            )
        count = tgm[index] // _TG_ELEMENT_BYTES[elem]
        # The parameter list ends at the ')' that closes it; the body starts at the next '{'.
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        body = text.index("{", i) + 1
        decl = (
            f"\n  threadgroup {elem} {name}_storage[{count}];"
            f"\n  threadgroup {elem}* {name} = {name}_storage;"
        )
        text = text[: m.start()] + text[m.end() : body] + decl + text[body:]
    return text.encode("ascii", "replace").decode("ascii")


def _call_takes_arg_casts(kernel: Any) -> bool:
    # torch >= 2.8 accepts arg_casts (pybind11 lists it in the generated docstring); older
    # releases bind Python int lists as int64, so the params go in an int32 tensor instead.
    return "arg_casts" in (getattr(type(kernel).__call__, "__doc__", None) or "")


class RuntimeKernels:
    """Compiles kernels with `compile_shader` on first use and dispatches launches on them."""

    def __init__(self, compile_shader: Callable[[str], Any], metal_dir: Path):
        self.compile_shader = compile_shader
        self.metal_dir = Path(metal_dir)
        self._kernels: dict[tuple[str, tuple[tuple[int, int], ...]], Any] = {}
        self._lock = threading.Lock()

    def kernel(self, name: str, threadgroup_memory: Mapping[int, int]) -> Any:
        """The compiled kernel object (cached per name and threadgroup memory sizes)."""
        key = (name, tuple(sorted(threadgroup_memory.items())))
        with self._lock:
            if key not in self._kernels:
                source = runtime_source(name, self.metal_dir, threadgroup_memory)
                try:
                    lib = self.compile_shader(source)
                    self._kernels[key] = getattr(lib, name)
                except Exception as exc:  # SyntaxError (compile) or RuntimeError (pipeline)
                    raise RuntimeError(
                        f"mlxq: compiling Metal kernel {name} at run time failed "
                        f"(sources: {self.metal_dir}): {exc}"
                    ) from exc
                logger.debug("mlxq: compiled Metal kernel %s at run time", name)
            return self._kernels[key]

    def run(self, launch: Mapping[str, Any]) -> None:
        """Dispatches a launch of ``mlxq._C.mps_launch_*`` (outputs are written in place)."""
        if launch["empty"]:
            return
        buffers = launch["buffers"]
        if sorted(buffers) != list(range(len(buffers))):
            # compile_shader binds argument i to [[buffer(i)]]: the indices must be 0..n-1.
            raise RuntimeError(
                f"mlxq: {launch['kernel']}: buffer indices {sorted(buffers)} are not 0..n-1"
            )
        kernel = self.kernel(launch["kernel"], dict(launch["threadgroup_memory"]))
        params_index = launch["params_index"]
        raw = buffers[params_index]
        words = list(struct.unpack(f"<{len(raw) // 4}i", raw))  # the params are int32 fields
        args: list[Any] = [buffers[i] for i in range(len(buffers))]
        kwargs: dict[str, Any] = {}
        if _call_takes_arg_casts(kernel):
            args[params_index] = words
            kwargs["arg_casts"] = {params_index: "int32"}
        else:
            device = next(t.device for t in args if isinstance(t, torch.Tensor))
            args[params_index] = torch.tensor(words, dtype=torch.int32, device=device)
        group = [int(t) for t in launch["threads"]]
        # compile_shader dispatches `threads` threads in all (dispatchThreads), in threadgroups
        # of `group_size`: whole threadgroups, as many as the plan's grid.
        threads = [int(g) * t for g, t in zip(launch["grid"], group, strict=True)]
        kernel(*args, threads=threads, group_size=group, **kwargs)


def _register_runtime_kernels(runner: RuntimeKernels, lib: Any = None) -> None:
    def quantize(w, group_size=64, bits=4):
        launch = _C.mps_launch_affine_quantize(w, group_size, bits)
        runner.run(launch)
        return tuple(launch["outputs"])

    def dequantize(wq, scales, biases, group_size=64, bits=4):
        launch = _C.mps_launch_affine_dequantize(wq, scales, biases, group_size, bits)
        runner.run(launch)
        return launch["outputs"][0]

    def matmul(x, wq, scales, biases, group_size=64, bits=4, transpose=True):
        launch = _C.mps_launch_affine_matmul(x, wq, scales, biases, group_size, bits, transpose)
        runner.run(launch)
        return launch["outputs"][0]

    def gather_matmul(
        x,
        wq,
        scales,
        biases,
        lhs_indices=None,
        rhs_indices=None,
        group_size=64,
        bits=4,
        transpose=True,
        sorted_indices=False,
    ):
        launch = _C.mps_launch_affine_gather_matmul(
            x, wq, scales, biases, lhs_indices, rhs_indices, group_size, bits, transpose
        )
        runner.run(launch)
        return launch["outputs"][0]

    for op, fn in zip(OPS, (quantize, dequantize, matmul, gather_matmul), strict=True):
        torch.library.register_kernel(f"mlxq::{op}", "mps", fn, lib=lib)


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
        _register_runtime_kernels(RuntimeKernels(env.compile_shader, env.sources), lib)
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
