"""The run-time fallback of the Metal kernels: the same ``metal/*.metal`` text compiled on first
use with ``torch.mps.compile_shader``, and each op's launch (``mlxq._C.metal_launch_*``: the plan,
the bound tensors and the outputs that the native backend would encode) dispatched on it.

Used when the prebuilt ``mlxq.metallib`` is missing, stale or fails to load (see
:mod:`mlxq.metal.backend`, which chooses the path).
"""

from __future__ import annotations

import logging
import re
import struct
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from mlxq._native import _C

__all__ = ["OPS", "RuntimeKernels", "instantiated_kernels", "register_runtime_kernels",
           "runtime_source"]  # fmt: skip

logger = logging.getLogger("mlxq")

# The ops that have Metal kernels: one MPS kernel is registered for each (see mlxq.metal.backend).
OPS = (
    "affine_quantize",
    "affine_dequantize",
    "affine_matmul",
    "affine_gather_matmul",
    "fp_matmul",
    "fp_dequantize",
    "fp_quantize",
    "fp_gather_matmul",
)


_INSTANTIATE = re.compile(r'^[ \t]*MLXQ_INSTANTIATE\([ \t]*"([^"]+)"', re.M)


def instantiated_kernels(metal_dir: Path) -> dict[str, Path]:
    """Host name -> the ``.metal`` file whose ``MLXQ_INSTANTIATE`` line defines it."""
    found: dict[str, Path] = {}
    for path in sorted(Path(metal_dir).glob("*.metal")):
        for name in _INSTANTIATE.findall(path.read_text()):
            found[name] = path
    return found


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
        """Dispatches a launch of ``mlxq._C.metal_launch_*`` (outputs are written in place)."""
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


def register_runtime_kernels(runner: RuntimeKernels, lib: Any = None) -> None:
    def quantize(w, group_size=64, bits=4):
        launch = _C.metal_launch_affine_quantize(w, group_size, bits)
        runner.run(launch)
        return tuple(launch["outputs"])

    def dequantize(wq, scales, biases, group_size=64, bits=4):
        launch = _C.metal_launch_affine_dequantize(wq, scales, biases, group_size, bits)
        runner.run(launch)
        return launch["outputs"][0]

    def matmul(x, wq, scales, biases, group_size=64, bits=4, transpose=True):
        launch = _C.metal_launch_affine_matmul(x, wq, scales, biases, group_size, bits, transpose)
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
        launch = _C.metal_launch_affine_gather_matmul(
            x,
            wq,
            scales,
            biases,
            lhs_indices,
            rhs_indices,
            group_size,
            bits,
            transpose,
            sorted_indices,
        )
        runner.run(launch)
        return launch["outputs"][0]

    def fp_matmul(x, wq, scales, mode, group_size, bits, transpose=True, global_scale=None):
        launch = _C.metal_launch_fp_matmul(
            x, wq, scales, mode, group_size, bits, transpose, global_scale
        )
        runner.run(launch)
        return launch["outputs"][0]

    def fp_dequantize(wq, scales, mode, group_size, bits, global_scale=None, dtype=None):
        launch = _C.metal_launch_fp_dequantize(
            wq, scales, mode, group_size, bits, global_scale, dtype
        )
        runner.run(launch)
        return launch["outputs"][0]

    def fp_quantize(w, mode, group_size, bits, global_scale=None):
        launch = _C.metal_launch_fp_quantize(w, mode, group_size, bits, global_scale)
        runner.run(launch)
        return tuple(launch["outputs"])

    def fp_gather_matmul(
        x,
        wq,
        scales,
        mode,
        group_size,
        bits,
        lhs_indices=None,
        rhs_indices=None,
        transpose=True,
        global_scale=None,
        sorted_indices=False,
    ):
        launch = _C.metal_launch_fp_gather_matmul(
            x,
            wq,
            scales,
            mode,
            group_size,
            bits,
            lhs_indices,
            rhs_indices,
            transpose,
            global_scale,
            sorted_indices,
        )
        runner.run(launch)
        return launch["outputs"][0]

    kernels = (
        quantize,
        dequantize,
        matmul,
        gather_matmul,
        fp_matmul,
        fp_dequantize,
        fp_quantize,
        fp_gather_matmul,
    )
    for op, fn in zip(OPS, kernels, strict=True):
        torch.library.register_kernel(f"mlxq::{op}", "mps", fn, lib=lib)
