"""Find clang, compile MSL sources into emulated kernel libraries, cache them on disk."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from . import _ir, _source

PKG_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = PKG_DIR / "include"
RUNTIME_SRC = PKG_DIR / "runtime" / "runtime.cpp"
FORMAT_VERSION = "1"

CXXFLAGS = [
    "-std=c++20",
    "-fPIC",
    "-fno-exceptions",
    "-fno-rtti",
    "-fno-threadsafe-statics",
    "-ffp-contract=off",
    "-fno-fast-math",
    "-Xclang",
    "-ffloat16-excess-precision=none",
    "-Xclang",
    "-fbfloat16-excess-precision=none",
    "-flax-vector-conversions=none",
    "-Wno-unused-command-line-argument",
    "-Wno-ignored-attributes",
    "-ferror-limit=8",
]
# array-bounds and object-size: fixed-size (thread-private) arrays, indexed directly or through a
# pointer the optimiser traces back to them, are checked through the runtime's UBSan handlers;
# signed-integer-overflow: 32-bit index arithmetic that passes 2^31 (see `only_threadgroup`).
KERNEL_OPT = [
    "-O2",
    "-fno-vectorize",
    "-fno-slp-vectorize",
    "-fsanitize=array-bounds,object-size,signed-integer-overflow",
    # Inline like the Metal compiler does, so that object-size sees a thread-private array
    # through the `thread T*` parameters of the helpers it is handed to.
    "-mllvm",
    "-inline-threshold=1000",
]


class EmulatorError(RuntimeError):
    """A kernel could not be compiled, or misbehaved while being emulated."""


def cache_dir() -> Path:
    """Compiled libraries: $MLXQ_EMU_CACHE, else ~/.cache/mlxq/metal_emulator (else a temp dir)."""
    root = os.environ.get("MLXQ_EMU_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "mlxq" / "metal_emulator"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    path = Path(tempfile.gettempdir()) / f"mlxq-metal-emulator-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@lru_cache(maxsize=1)
def find_compiler() -> tuple[tuple[str, ...], str] | None:
    """(command, version line) of a usable clang: ziglang's, or a system clang >= 17."""
    candidates: list[list[str]] = []
    if os.environ.get("MLXQ_EMU_CXX"):
        candidates.append(os.environ["MLXQ_EMU_CXX"].split())
    if importlib.util.find_spec("ziglang") is not None:
        candidates.append([sys.executable, "-m", "ziglang", "c++"])
    for v in range(25, 16, -1):
        if shutil.which(f"clang++-{v}"):
            candidates.append([f"clang++-{v}"])
    if shutil.which("clang++"):
        candidates.append(["clang++"])
    for cmd in candidates:
        try:
            out = subprocess.run(
                [*cmd, "--version"], capture_output=True, text=True, timeout=60
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        m = re.search(r"clang version (\d+)", out)
        if m and int(m.group(1)) >= 17:
            return tuple(cmd), out.splitlines()[0]
    return None


def compiler() -> tuple[str, ...]:
    found = find_compiler()
    if found is None:
        raise EmulatorError(
            "the MSL emulator needs clang >= 17: `pip install ziglang` (provides "
            "`python -m ziglang c++`) or install a system clang++ >= 17"
        )
    return found[0]


def _env(scratch: Path | None) -> dict[str, str] | None:
    """Compile steps get a private zig cache in the scratch dir: zig would otherwise keep every
    object file it produces in ~/.cache/zig (gigabytes over time) and parallel compiles race
    on it. Linking keeps the shared cache, where zig's libc stubs are built once."""
    if scratch is None or not any("ziglang" in part for part in compiler()):
        return None
    cache = str(scratch / "zig-cache")
    return {**os.environ, "ZIG_GLOBAL_CACHE_DIR": cache, "ZIG_LOCAL_CACHE_DIR": cache}


def _run(cmd: list[str], what: str, scratch: Path | None = None) -> str:
    for attempt in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(scratch))
        if proc.returncode == 0:
            return proc.stdout
        # zig's shared cache occasionally loses a rename race between parallel compiles.
        if attempt == 0 and "failed to rename" in proc.stderr:
            continue
        break
    msg = proc.stderr.strip()
    if len(msg) > 20000:
        msg = msg[:20000] + "\n... (truncated)"
    raise EmulatorError(f"{what} failed:\n{msg}")


def _hash(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:24]


def _shim_hash() -> str:
    # This file itself is not hashed (cosmetic edits must not invalidate every cached library):
    # bump FORMAT_VERSION when the way libraries are built changes.
    files = sorted(INCLUDE_DIR.iterdir()) + [RUNTIME_SRC, Path(_ir.__file__)]
    return _hash(
        FORMAT_VERSION,
        repr((CXXFLAGS, KERNEL_OPT)),
        " ".join(compiler()),
        find_compiler()[1],
        *[f.name for f in files],
        *[f.read_bytes() for f in files],
        Path(_source.__file__).read_bytes(),
    )


def _deps_hash(metal_file: Path, include_dirs: list[Path]) -> str:
    parts: list[bytes | str] = [str(metal_file), metal_file.read_bytes()]
    for d in include_dirs:
        for f in sorted(d.glob("*")):
            if f.suffix in (".h", ".metal", ".hpp") and f.is_file():
                parts += [str(f), f.read_bytes()]
    return _hash(*parts)


def _prune(pattern: str, keep: int = 6) -> None:
    """Drop all but the `keep` newest cache entries matching `pattern` (old shim/source versions).

    A library already loaded by another process stays valid after its file is unlinked.
    """
    entries = sorted(cache_dir().glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def preprocess(metal_file: Path, include_dirs: list[Path], scratch: Path | None = None) -> str:
    """`clang -E` with the shim in preprocess mode: macros expanded, MSL tokens kept."""
    cmd = [
        *compiler(),
        "-E",
        "-x",
        "c++",
        "-std=c++20",
        "-DMLXQ_EMU_PREPROCESS",
        "-D__METAL_VERSION__=310",
        f"-I{INCLUDE_DIR}",
        *[f"-I{d}" for d in include_dirs],
        "-nostdinc++",
        str(metal_file),
    ]
    return _run(cmd, f"preprocessing {metal_file}", scratch)


def _runtime_object(work: Path) -> Path:
    key = _shim_hash()
    obj = cache_dir() / f"runtime-{key}.o"
    if not obj.exists():
        tmp = work / "runtime.o"
        _run(
            [
                *compiler(),
                *CXXFLAGS,
                "-O2",
                "-fvisibility=hidden",
                f"-I{INCLUDE_DIR}",
                "-c",
                str(RUNTIME_SRC),
                "-o",
                str(tmp),
            ],
            "compiling the emulator runtime",
            work,
        )
        _atomic_write(obj, tmp.read_bytes())
        _prune("runtime-*.o")
    return obj


def build(metal_file: Path, include_dirs: list[Path] | None = None) -> tuple[Path, list[dict]]:
    """Compile one .metal file into a shared library; returns (path, kernel descriptions)."""
    metal_file = Path(metal_file).resolve()
    dirs = [metal_file.parent] + [Path(d).resolve() for d in include_dirs or []]
    key = _hash(_shim_hash(), _deps_hash(metal_file, dirs))
    out_dir = cache_dir() / f"{metal_file.stem}-{key}"
    lib = out_dir / "kernels.so"
    meta = out_dir / "kernels.json"
    if lib.exists() and meta.exists():
        return lib, json.loads(meta.read_text())
    with tempfile.TemporaryDirectory(prefix="mlxq-emu-") as tmpd:
        work = Path(tmpd)
        pp = preprocess(metal_file, dirs, work)
        try:
            kernels = _source.find_kernels(pp)
            code = _source.rewrite(pp) + _source.wrappers(kernels)
        except _source.SourceError as e:
            raise EmulatorError(f"{metal_file}: {e}") from None
        gen = work / "kernels.cpp"
        gen.write_text(code)
        ll = work / "kernels.ll"
        _run(
            [
                *compiler(),
                *CXXFLAGS,
                *KERNEL_OPT,
                "-include",
                str(INCLUDE_DIR / "mlxq_emu_shim.h"),
                f"-I{INCLUDE_DIR}",
                "-nostdinc++",
                "-S",
                "-emit-llvm",
                str(gen),
                "-o",
                str(ll),
            ],
            f"compiling {metal_file.name} for the emulator",
            work,
        )
        ll_i = work / "kernels_i.ll"
        ll_i.write_text(_ir.instrument(ll.read_text()))
        obj = work / "kernels.o"
        # The IR is optimised already: -O0 only generates code (3x faster than -O1).
        _run(
            [*compiler(), "-O0", "-fPIC", "-Wno-override-module", "-c", str(ll_i), "-o", str(obj)],
            f"compiling instrumented {metal_file.name}",
            work,
        )
        so = work / "kernels.so"
        link = list(compiler())
        if link[-1] == "c++" and "ziglang" in link:
            link[-1] = "cc"  # no C++ runtime needed; avoids building zig's libc++
        _run(
            [
                *link,
                "-shared",
                "-Wl,-Bsymbolic",
                str(obj),
                str(_runtime_object(work)),
                "-o",
                str(so),
            ],
            f"linking {metal_file.name}",
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        desc = [
            {
                "name": k.name,
                "function": k.function,
                "source": str(metal_file),
                "params": [[p.kind, p.index, p.name, p.decl] for p in k.params],
            }
            for k in kernels
        ]
        _atomic_write(lib, so.read_bytes())
        _atomic_write(meta, json.dumps(desc).encode())
    _prune(f"{metal_file.stem}-*")
    return lib, desc


def check_strict(metal_file: Path, include_dirs: list[Path] | None = None) -> None:
    """Syntax-only compile with distinct address spaces for device/constant/threadgroup."""
    metal_file = Path(metal_file).resolve()
    dirs = [metal_file.parent] + [Path(d).resolve() for d in include_dirs or []]
    key = _hash("strict", _shim_hash(), _deps_hash(metal_file, dirs))
    ok = cache_dir() / f"strict-{metal_file.stem}-{key}.ok"
    if ok.exists():
        return
    with tempfile.TemporaryDirectory(prefix="mlxq-emu-") as tmpd:
        pp = preprocess(metal_file, dirs, Path(tmpd))
        try:
            code = _source.rewrite(pp)
        except _source.SourceError as e:
            raise EmulatorError(f"{metal_file}: {e}") from None
        gen = Path(tmpd) / "strict.cpp"
        gen.write_text(code)
        cmd = [
            *compiler(),
            *CXXFLAGS,
            "-Wno-duplicate-decl-specifier",  # `const constant T*` -> const const
            "-DMLXQ_EMU_STRICT",
            "-include",
            str(INCLUDE_DIR / "mlxq_emu_shim.h"),
            f"-I{INCLUDE_DIR}",
            "-nostdinc++",
            "-c",  # without it ziglang's driver also links, building libc++ on a cold cache
            "-fsyntax-only",
            str(gen),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(Path(tmpd)))
        errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
        # ziglang's driver reports a bogus "failed to rename <output>" after a clean
        # -fsyntax-only run (there is no output to rename); only real errors count.
        if proc.returncode != 0 and not all("failed to rename" in ln for ln in errors):
            msg = proc.stderr.strip().replace(str(gen), str(metal_file) + " (preprocessed)")
            raise EmulatorError(f"strict address-space check of {metal_file} failed:\n{msg}")
    ok.write_text("ok\n")
    _prune(f"strict-{metal_file.stem}-*")
