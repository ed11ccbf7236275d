"""Instrument LLVM IR: runtime hooks before every load and store; fast-math division.

`__mlxq_ld(ptr, size)` / `__mlxq_st(ptr, size)` / `__mlxq_at(ptr, size)` (atomics) let the runtime
bounds-check, count and race-check every memory access of the kernel code. Done on the textual IR
of the optimised module (locals already live in registers), because clang's own sanitizer
coverage hooks are not available in every clang build (ziglang's lacks them).

Division: Metal compiles with fast math by default (the runtime-compiled library does), where
`a / b` may be computed as `a * (1 / b)` (Metal allows 2.5 ulp). Every float/half `fdiv` of the
kernel code is rewritten to exactly that, two roundings, so a kernel whose result must be exact
fails its bit-exact tests unless it says `precise::divide` (the shim routes that one through the
runtime, correctly rounded). Divisions by a power of two stay exact, as they do on the GPU.
"""

from __future__ import annotations

import re

_PRIM_BITS = {
    "i1": 8,
    "i8": 8,
    "i16": 16,
    "i32": 32,
    "i64": 64,
    "i128": 128,
    "half": 16,
    "bfloat": 16,
    "float": 32,
    "double": 64,
    "ptr": 64,
    "x86_fp80": 80,
    "fp128": 128,
}

_RESULT = r"(?:%[-\w.$]+|%\"[^\"]*\") = "
_LOAD = re.compile(r"^(\s+)(" + _RESULT + r")?load (atomic )?(volatile )?(.*)$")
_STORE = re.compile(r"^(\s+)store (atomic )?(volatile )?(.*)$")
_RMW = re.compile(r"^(\s+)(" + _RESULT + r")?(atomicrmw|cmpxchg) (?:weak )?(?:volatile )?(.*)$")
_MEMINTR = re.compile(
    r"^(\s+)(?:tail |musttail |notail )?call void @llvm\.(memcpy|memmove|memset)"
    r"(?:\.inline)?\.[\w.]+\((.*)\)(?:\s*#\d+)?\s*(?:,.*)?$"
)
_FDIV = re.compile(
    r"^(\s+)(%[-\w.$]+) = fdiv (?:[a-z]+ )*(float|half|<(\d+) x (float|half)>) (.*?)(, !.*)?$"
)
_ONE = {"float": "1.000000e+00", "half": "0xH3C00"}
_EMU_FUNC = re.compile(r"@_ZN[KV]*8mlxq_emu")
_PTR_ATTRS = re.compile(
    r"^(?:(?:align \d+|noundef|nonnull|noalias|nocapture|readonly|writeonly|immarg|"
    r"dereferenceable(?:_or_null)?\(\d+\)|captures\([^)]*\))\s+)*"
)


def _split_top(text: str) -> list[str]:
    parts, depth, cur, in_str = [], 0, [], False
    for c in text:
        if c == '"':
            in_str = not in_str
        elif not in_str:
            if c in "([{<":
                depth += 1
            elif c in ")]}>":
                depth -= 1
            elif c == "," and depth == 0:
                parts.append("".join(cur).strip())
                cur = []
                continue
        cur.append(c)
    parts.append("".join(cur).strip())
    return parts


def _type_prefix(text: str) -> tuple[str, str]:
    """Split `TYPE rest` where TYPE may be <..>, [..], {..} or a token."""
    text = text.strip()
    if text and text[0] in "<[{":
        close = {"<": ">", "[": "]", "{": "}"}[text[0]]
        depth = 0
        for i, c in enumerate(text):
            if c in "<[{":
                depth += 1
            elif c in ">]}":
                depth -= 1
                if depth == 0:
                    assert c == close
                    return text[: i + 1], text[i + 1 :].strip()
    tok, _, rest = text.partition(" ")
    return tok, rest


def _size_expr(ty: str) -> str:
    bits = _type_bits(ty)
    if bits is not None:
        return str((bits + 7) // 8)
    return f"ptrtoint (ptr getelementptr ({ty}, ptr null, i32 1) to i64)"


def _type_bits(ty: str) -> int | None:
    ty = ty.strip()
    if ty in _PRIM_BITS:
        return _PRIM_BITS[ty]
    m = re.fullmatch(r"i(\d+)", ty)
    if m:
        return int(m.group(1))
    m = re.fullmatch(r"<\s*(\d+)\s+x\s+(.+?)\s*>", ty)
    if m:
        eb = _type_bits(m.group(2))
        return None if eb is None else int(m.group(1)) * eb
    m = re.fullmatch(r"\[\s*(\d+)\s+x\s+(.+?)\s*\]", ty)
    if m:
        eb = _type_bits(m.group(2))
        if eb is None or eb % 8:
            return None
        return int(m.group(1)) * eb
    return None


def _ptr_operand(arg: str) -> str | None:
    arg = arg.strip()
    if not arg.startswith("ptr "):
        return None  # other address spaces are not used by emulated kernels
    return _PTR_ATTRS.sub("", arg[4:].strip()).strip()


def instrument(ir: str) -> str:
    """Return `ir` with access hooks inserted before every load, store and mem* intrinsic."""
    out = []
    skip = False
    for line in ir.split("\n"):
        if line.startswith("define "):
            # The shim's own helpers (collective resolvers reading other lanes' operands on
            # their fiber stacks, argument binding) touch no kernel memory: leave them fast.
            skip = bool(_EMU_FUNC.search(line))
        elif line.startswith("  ") and not skip:
            fast = _fast_fdiv(line)
            if fast:
                out.append(fast)
                continue
            hook = _hook(line)
            if hook:
                out.append(hook)
        out.append(line)
    out.append("declare void @__mlxq_ld(ptr, i64)")
    out.append("declare void @__mlxq_st(ptr, i64)")
    out.append("declare void @__mlxq_at(ptr, i64)")
    return "\n".join(out) + "\n"


def _fast_fdiv(line: str) -> str | None:
    """`%r = fdiv T a, b` -> `%r.rcp = fdiv T 1, b` and `%r = fmul T a, %r.rcp` (fast math)."""
    m = _FDIV.match(line)
    if not m:
        return None
    ind, res, ty, lanes, elem, ops, _ = m.groups()
    parts = _split_top(ops)
    if len(parts) != 2:
        return None
    one = _ONE[elem or ty]
    if lanes:
        one = "<" + ", ".join(f"{elem} {one}" for _ in range(int(lanes))) + ">"
    rcp = f"%mlxq.rcp.{res[1:]}"  # a valid name for numbered results (%5) too
    return f"{ind}{rcp} = fdiv {ty} {one}, {parts[1]}\n{ind}{res} = fmul {ty} {parts[0]}, {rcp}"


def _call(indent: str, fn: str, ptr: str, size: str) -> str:
    return f"{indent}call void @{fn}(ptr {ptr}, i64 {size})"


def _hook(line: str) -> str | None:
    m = _LOAD.match(line)
    if m:
        parts = _split_top(m.group(5))
        if len(parts) < 2:
            return None
        ptr = _ptr_operand(parts[1])
        if ptr is None:
            return None
        fn = "__mlxq_at" if m.group(3) else "__mlxq_ld"
        return _call(m.group(1), fn, ptr, _size_expr(parts[0]))
    m = _STORE.match(line)
    if m:
        parts = _split_top(m.group(4))
        if len(parts) < 2:
            return None
        ptr = _ptr_operand(parts[1])
        if ptr is None:
            return None
        ty, _ = _type_prefix(parts[0])
        fn = "__mlxq_at" if m.group(2) else "__mlxq_st"
        return _call(m.group(1), fn, ptr, _size_expr(ty))
    m = _RMW.match(line)
    if m:
        rest = m.group(4)
        if m.group(3) == "atomicrmw":
            rest = rest.split(" ", 1)[1]  # drop the operation keyword
        parts = _split_top(rest)
        ptr = _ptr_operand(parts[0])
        if ptr is None or len(parts) < 2:
            return None
        ty, _ = _type_prefix(parts[1])
        return _call(m.group(1), "__mlxq_at", ptr, _size_expr(ty))
    if "@llvm.mem" in line:
        m = _MEMINTR.match(line)
        if m:
            args = _split_top(m.group(3))
            n = args[2].split(" ", 1)[1].strip() if len(args) > 2 else "0"
            size = n if n.lstrip("-").isdigit() else f"{n}"
            ind = m.group(1)
            hooks = []
            dst = _ptr_operand(args[0])
            if m.group(2) != "memset":
                src = _ptr_operand(args[1])
                if src is not None:
                    hooks.append(_call(ind, "__mlxq_ld", src, size))
            if dst is not None:
                hooks.append(_call(ind, "__mlxq_st", dst, size))
            return "\n".join(hooks) if hooks else None
    return None
