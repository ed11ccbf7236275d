"""MSL emulator: runs the exact `metal/*.metal` kernels on the CPU.

The MSL text is compiled as C++ by clang (ziglang's or a system clang >= 17) against a shim of
the Metal standard library; every GPU thread runs as a fiber, so that threadgroup barriers,
simdgroup collectives and `simdgroup_matrix` operations have their Metal semantics. Every device
and threadgroup memory access is checked: out-of-bounds accesses, reads of never-written
threadgroup memory, threadgroup races and divergent collectives raise :class:`EmulatorError`.
Device bytes read and written per buffer are counted (:func:`last_dispatch_report`).

Semantics and limits:

- Threadgroups run one after the other in grid order (x fastest); the threads of a threadgroup
  run as fibers in thread-index order and switch only at barriers and collectives. SIMD-groups
  have 32 lanes; `simdgroup_matrix` (8x8 only) spreads elements over lanes as Apple GPUs do.
- Collectives act on the active lanes. Lanes may return before their SIMD-group's first
  collective (`if (gid >= n) return;`); any other divergence (lanes at different collectives or
  barriers, lanes leaving after a collective, threads leaving before a barrier) is an error.
- Barriers order only the memory their `mem_flags` name: `threadgroup_barrier(mem_none)` (or
  `mem_texture`) synchronises execution and orders nothing, `mem_threadgroup` orders
  threadgroup memory, `mem_device` device memory; `simdgroup_barrier` likewise for the lanes of
  one SIMD-group (collectives order both for their lanes).
- Races inside a threadgroup: read/write or write/write pairs of different threads on the same
  threadgroup or device byte with no barrier ordering that memory in between are errors, as is
  reading threadgroup bytes no thread wrote in this threadgroup. Device memory: every access is
  bounds-checked and counted; bytes written by one threadgroup must not be read or written by
  another (threadgroups are not ordered). Threadgroup memory is limited to 32 KiB.
- Fixed-size arrays (thread-private ones included) are bounds-checked when indexed directly and,
  through clang's object-size checks after Metal-like inlining, through pointers to them.
  Signed 32-bit integer arithmetic that overflows is an error (index math past 2^31);
  `only_threadgroup` runs the last threadgroup of a huge grid to reach such indices. Unsigned
  (`uint`) wrap-around is not detected.
- Arithmetic is IEEE with per-operation rounding for half/bfloat. Division is fast math, as in
  the runtime-compiled library: a plain float/half `/` is `a * (1 / b)` (two roundings, within
  Metal's 2.5 ulp), `precise::divide` is correctly rounded. `exp`, `rsqrt` and the other math
  functions are exact (fast-math approximations of those are not modelled).
- Atomics run as plain read-modify-writes (threads run one at a time) and skip race checks.
- Not supported: textures, samplers, imageblocks, function constants, argument buffers,
  `[[stage_in]]`, `simd_shuffle_and_fill_*`, conversions between half and bfloat through a
  template parameter (`T(h)` with T = bfloat; `bfloat(h)`, `(bfloat)h` and `static_cast`
  work). A kernel that loops forever hangs the dispatch.

Example (the op-level `affine_quantize` / `affine_dequantize` / `affine_matmul` of `.ops` wrap
this with the dispatch plan)::

    from mlxq.testing import metal_emulator as emu
    plan = mlxq._C.plan_affine_matmul(x, wq, scales, biases, 64, 4, True)
    rep = emu.dispatch(plan["kernel"], plan["grid"], plan["threads"],
                       {0: x, 1: wq, 2: scales, 3: biases, 4: out, 5: bytes(plan["params"])},
                       dict(plan["threadgroup_memory"]))
    rep.bytes_read[1]  # device bytes the kernel read from buffer(1)
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _build, _source
from ._build import EmulatorError

__all__ = [
    "EmulatorError",
    "DispatchReport",
    "Library",
    "available",
    "load_library",
    "dispatch",
    "last_dispatch_report",
    "check_syntax_strict",
    "default_metal_dir",
]


@dataclass(frozen=True)
class DispatchReport:
    """What one dispatch did: kernel, launch geometry, device bytes per buffer index."""

    kernel: str
    grid: tuple[int, int, int]
    threads_per_threadgroup: tuple[int, int, int]
    bytes_read: dict[int, int] = field(default_factory=dict)
    bytes_written: dict[int, int] = field(default_factory=dict)
    # Threadgroup memory of one threadgroup: host-bound blocks + fixed-size arrays written.
    threadgroup_bytes: int = 0


@dataclass
class _Kernel:
    info: _source.KernelInfo
    lib: ctypes.CDLL
    index: int


class Library:
    """Emulated kernels compiled from a set of `.metal` files (``.kernels``: name -> info)."""

    def __init__(self, sources: list[Path]):
        self.sources = sources
        self._kernels: dict[str, _Kernel] = {}
        self._libs: list[ctypes.CDLL] = []
        with ThreadPoolExecutor(max_workers=min(len(sources), os.cpu_count() or 1) or 1) as pool:
            built = list(pool.map(_build.build, sources))
        for path, desc in built:
            lib = ctypes.CDLL(str(path))
            lib.mlxq_emu_run.restype = ctypes.c_int
            lib.mlxq_emu_kernel_name.restype = ctypes.c_char_p
            self._libs.append(lib)
            names = [
                lib.mlxq_emu_kernel_name(i).decode() for i in range(lib.mlxq_emu_num_kernels())
            ]
            for i, (name, d) in enumerate(zip(names, desc, strict=True)):
                assert name == d["name"], (name, d["name"])
                params = [_source.Param(*p) for p in d["params"]]
                info = _source.KernelInfo(name, d["function"], params, d["source"])
                if name in self._kernels:
                    raise EmulatorError(
                        f"kernel {name} is defined in both {self._kernels[name].info.source} "
                        f"and {d['source']}"
                    )
                self._kernels[name] = _Kernel(info, lib, i)

    @property
    def kernels(self) -> dict[str, _source.KernelInfo]:
        return {k: v.info for k, v in self._kernels.items()}

    def dispatch(
        self,
        kernel_name: str,
        grid: Iterable[int] | int,
        threads_per_threadgroup: Iterable[int] | int,
        buffers: Mapping[int, Any],
        threadgroup_memory: Mapping[int, int] | None = None,
        only_threadgroup: Iterable[int] | None = None,
    ) -> DispatchReport:
        """Run `kernel_name` over `grid` threadgroups; see :func:`dispatch`."""
        k = self._kernels.get(kernel_name)
        if k is None:
            raise EmulatorError(_unknown(kernel_name, self._kernels))
        with _lock:  # the runtime is single-threaded (and ctypes releases the GIL)
            return _run(
                k,
                grid,
                threads_per_threadgroup,
                buffers,
                threadgroup_memory or {},
                only_threadgroup,
            )


_lock = threading.RLock()
_libraries: list[Library] = []
_default_loaded = False
_last_report: DispatchReport | None = None


def available() -> bool:
    """True when a clang >= 17 was found (ziglang's or the system's)."""
    return _build.find_compiler() is not None


def default_metal_dir() -> Path:
    """The directory of the package's `.metal` sources (MLXQ_METAL_DIR overrides)."""
    if os.environ.get("MLXQ_METAL_DIR"):
        return Path(os.environ["MLXQ_METAL_DIR"])
    pkg = Path(__file__).resolve().parents[2]  # python/mlxq
    for cand in (pkg / "metal", pkg.parents[1] / "metal"):
        if cand.is_dir() and any(cand.glob("*.metal")):
            return cand
    return pkg.parents[1] / "metal"


def load_library(sources: Iterable[str | os.PathLike] | str | os.PathLike | None = None) -> Library:
    """Compile (or load from the on-disk cache) the given `.metal` files or directories.

    With no argument, all `metal/*.metal` of the package. The kernels become available to
    :func:`dispatch`; later loads replace kernels of the same name.
    """
    global _default_loaded
    if sources is None:
        paths = sorted(default_metal_dir().glob("*.metal"))
        if not paths:
            raise EmulatorError(f"no .metal sources in {default_metal_dir()}")
    else:
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        paths = []
        for s in sources:
            p = Path(s)
            paths += sorted(p.glob("*.metal")) if p.is_dir() else [p]
    for p in paths:
        if not p.is_file():
            raise EmulatorError(f"no such MSL source: {p}")
    with _lock:
        lib = Library([p.resolve() for p in paths])
        _libraries.append(lib)
        if sources is None:
            _default_loaded = True
    return lib


def _find(kernel_name: str) -> _Kernel | None:
    for lib in reversed(_libraries):
        k = lib._kernels.get(kernel_name)
        if k is not None:
            return k
    return None


def _unknown(name: str, kernels: Mapping[str, Any]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(kernels), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown kernel {name!r} ({len(kernels)} kernels loaded){hint}"


def dispatch(
    kernel_name: str,
    grid: Iterable[int] | int,
    threads_per_threadgroup: Iterable[int] | int,
    buffers: Mapping[int, Any],
    threadgroup_memory: Mapping[int, int] | None = None,
    only_threadgroup: Iterable[int] | None = None,
) -> DispatchReport:
    """Run a kernel on the CPU with Metal semantics.

    grid: threadgroups per grid (x, y, z); threads_per_threadgroup: (x, y, z) (at most 1024).
    buffers: {index: CPU contiguous torch.Tensor (written back in place) | bytes (read-only) |
    bytearray (written back)}. threadgroup_memory: {index: bytes} for `[[threadgroup(i)]]`.
    Raises EmulatorError on unknown kernels, missing bindings, out-of-bounds accesses, reads of
    never-written threadgroup memory, threadgroup races and divergent collectives.
    only_threadgroup: run just the threadgroup at that grid position (x, y, z), e.g. the last
    one of a grid too large to emulate whole, with params claiming huge shapes and tiny buffers:
    32-bit index arithmetic that passes 2^31 is then reported as a signed integer overflow.
    """
    with _lock:
        k = _find(kernel_name)
        if k is None and not _default_loaded:
            load_library()
            k = _find(kernel_name)
        if k is None:
            names = {n: 1 for lib in _libraries for n in lib._kernels}
            raise EmulatorError(_unknown(kernel_name, names))
        return _run(
            k, grid, threads_per_threadgroup, buffers, threadgroup_memory or {}, only_threadgroup
        )


def last_dispatch_report() -> DispatchReport:
    """Report of the latest successful :func:`dispatch`."""
    if _last_report is None:
        raise EmulatorError("no kernel has been dispatched yet")
    return _last_report


def check_syntax_strict(path: str | os.PathLike) -> None:
    """Compile `path` with device/constant/threadgroup as distinct address spaces (syntax only).

    Raises EmulatorError with the compiler output when an address-space mistake (or any other
    compile error) would make the Metal compiler reject the file.
    """
    p = Path(path)
    if not p.is_file():
        raise EmulatorError(f"no such MSL source: {p}")
    _build.check_strict(p)


def _dims(v: Iterable[int] | int, what: str) -> tuple[int, int, int]:
    t = (int(v),) if isinstance(v, int) else tuple(int(x) for x in v)
    if not 1 <= len(t) <= 3 or any(x < 1 for x in t):
        raise EmulatorError(f"{what} must be 1-3 positive sizes, got {v!r}")
    return (t + (1, 1))[:3]  # type: ignore[return-value]


def _run(
    k: _Kernel,
    grid: Iterable[int] | int,
    tptg: Iterable[int] | int,
    buffers: Mapping[int, Any],
    tgmem: Mapping[int, int],
    only: Iterable[int] | None = None,
) -> DispatchReport:
    global _last_report
    name = k.info.name
    g = _dims(grid, "grid")
    t = _dims(tptg, "threads_per_threadgroup")
    only_arg = None
    if only is not None:
        o = _dims(tuple(int(v) + 1 for v in only), "only_threadgroup")
        if any(o[d] > g[d] for d in range(3)):
            raise EmulatorError(f"{name}: only_threadgroup {tuple(only)} is outside the grid {g}")
        only_arg = (ctypes.c_uint32 * 3)(*(v - 1 for v in o))
    if t[0] * t[1] * t[2] > 1024:
        raise EmulatorError(f"{name}: threads_per_threadgroup {t} exceeds 1024 threads")
    for p in k.info.params:
        if p.kind == _source.KIND_BUFFER and p.index not in buffers:
            raise EmulatorError(f"{name}: buffer({p.index}) (`{p.decl}`) is not bound")
        if p.kind == _source.KIND_THREADGROUP and p.index not in tgmem:
            raise EmulatorError(f"{name}: threadgroup({p.index}) (`{p.decl}`) has no size")
    ptrs = (ctypes.c_void_p * 32)()
    sizes = (ctypes.c_int64 * 32)(*([-1] * 32))
    writable = (ctypes.c_int * 32)()
    tg_sizes = (ctypes.c_int64 * 32)(*([-1] * 32))
    keep = []
    for idx, buf in buffers.items():
        if not 0 <= int(idx) < 32:
            raise EmulatorError(f"{name}: buffer index {idx} out of range 0..31")
        ptr, size, w, holder = _buffer(name, int(idx), buf)
        keep.append(holder)
        ptrs[idx], sizes[idx], writable[idx] = ptr, size, w
    for idx, n in tgmem.items():
        if not 0 <= int(idx) < 32 or int(n) < 0:
            raise EmulatorError(f"{name}: bad threadgroup memory binding {idx}: {n}")
        tg_sizes[idx] = int(n)
    read = (ctypes.c_int64 * 32)()
    written = (ctypes.c_int64 * 32)()
    tg_bytes = ctypes.c_int64()
    err = ctypes.create_string_buffer(4096)
    rc = k.lib.mlxq_emu_run(
        ctypes.c_int(k.index),
        (ctypes.c_uint32 * 3)(*g),
        (ctypes.c_uint32 * 3)(*t),
        ptrs,
        sizes,
        writable,
        tg_sizes,
        read,
        written,
        ctypes.byref(tg_bytes),
        err,
        ctypes.c_int(len(err)),
        only_arg,
    )
    if rc != 0:
        raise EmulatorError(f"{name}: {err.value.decode(errors='replace')}")
    _check_aliasing(name, ptrs, sizes, written)
    report = DispatchReport(
        name,
        g,
        t,
        {i: int(read[i]) for i in sorted(buffers)},
        {i: int(written[i]) for i in sorted(buffers)},
        int(tg_bytes.value),
    )
    _last_report = report
    return report


def _check_aliasing(name: str, ptrs: Any, sizes: Any, written: Any) -> None:
    """Buffers are copied into separate emulator memory: no written buffer may overlap another."""
    spans = [(i, ptrs[i] or 0, sizes[i]) for i in range(32) if sizes[i] > 0]
    for i, a, na in spans:
        for j, b, nb in spans:
            if i < j and a < b + nb and b < a + na and (written[i] or written[j]):
                raise EmulatorError(
                    f"{name}: buffer({i}) and buffer({j}) share memory and one of them is written; "
                    "the emulator does not support aliased buffers"
                )


def _buffer(name: str, idx: int, buf: Any) -> tuple[int, int, int, Any]:
    if isinstance(buf, bytes):
        holder = ctypes.create_string_buffer(buf, len(buf))
        return ctypes.addressof(holder), len(buf), 0, holder
    if isinstance(buf, bytearray):
        holder = (ctypes.c_char * len(buf)).from_buffer(buf) if buf else None
        return (ctypes.addressof(holder) if holder else 0), len(buf), 1, holder
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(buf, torch.Tensor):
        if buf.device.type != "cpu":
            raise EmulatorError(f"{name}: buffer({idx}) must be a CPU tensor, got {buf.device}")
        if not buf.is_contiguous():
            raise EmulatorError(f"{name}: buffer({idx}) must be contiguous")
        return buf.data_ptr(), buf.numel() * buf.element_size(), 1, buf
    raise EmulatorError(
        f"{name}: buffer({idx}) must be a torch.Tensor, bytes or bytearray, got {type(buf)}"
    )


try:  # op-level functions (written with the kernels), when present
    from .ops import affine_dequantize, affine_matmul, affine_quantize  # noqa: F401

    __all__ += ["affine_quantize", "affine_dequantize", "affine_matmul"]
except ModuleNotFoundError as _e:  # pragma: no cover - ops.py not written yet
    if _e.name != f"{__name__}.ops":
        raise
