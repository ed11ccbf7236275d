"""MSL source handling: find the entry points of preprocessed MSL and rewrite it into C++.

The rewrites are token-level and keep line numbers: `[[...]]` attributes are blanked,
`threadgroup T buf[N];` declarations become shared (static) arrays, vector constructors such as
`float4(h)` become element-wise conversions, and `1.0h` half literals become casts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

BUILTINS = {
    "thread_position_in_grid": 0,
    "thread_position_in_threadgroup": 1,
    "threadgroup_position_in_grid": 2,
    "threads_per_threadgroup": 3,
    "threadgroups_per_grid": 4,
    "thread_index_in_threadgroup": 5,
    "thread_index_in_simdgroup": 6,
    "simdgroup_index_in_threadgroup": 7,
    "threads_per_simdgroup": 8,
    "simdgroups_per_threadgroup": 9,
    "threads_per_grid": 10,
    "thread_index_in_quadgroup": 11,
    "quadgroup_index_in_threadgroup": 12,
}

KIND_BUFFER, KIND_THREADGROUP, KIND_BUILTIN = 0, 1, 2


class SourceError(ValueError):
    """The MSL source does not follow the conventions the emulator understands."""


@dataclass(frozen=True)
class Param:
    """One kernel parameter: kind (buffer/threadgroup/builtin), binding index, declaration."""

    kind: int
    index: int
    name: str
    decl: str


@dataclass
class KernelInfo:
    """An entry point: host name, the C++ expression naming it, its parameters."""

    name: str
    function: str
    params: list[Param] = field(default_factory=list)
    source: str = ""

    @property
    def buffer_indices(self) -> list[int]:
        return [p.index for p in self.params if p.kind == KIND_BUFFER]

    @property
    def threadgroup_indices(self) -> list[int]:
        return [p.index for p in self.params if p.kind == KIND_THREADGROUP]


_LINEMARKER = re.compile(r"^#\s*\d+\s+\"[^\"]*\".*$|^#(?:line|pragma).*$", re.M)


def _blank(text: str) -> str:
    """Spaces for every character except newlines (keeps line numbers and offsets)."""
    return re.sub(r"[^\n]", " ", text)


def _mask_linemarkers(text: str) -> str:
    return _LINEMARKER.sub(lambda m: _blank(m.group(0)), text)


def _match_close(text: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index just past the bracket that closes text[start] (== open_ch)."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == open_ch:
            depth += 1
        elif c == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
    raise SourceError(f"unbalanced {open_ch!r} at offset {start}")


def _attribute_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    i = text.find("[[")
    while i >= 0:
        # Attributes may contain calls with brackets; find the closing ]] at depth 0.
        depth = 0
        j = i
        while j < len(text):
            if text[j] == "[":
                depth += 1
            elif text[j] == "]":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        end = j + 1
        spans.append((i, end))
        i = text.find("[[", end)
    return spans


def strip_attributes(text: str) -> str:
    """Blank every `[[...]]` attribute (C++ reserves `[[` for attributes, so this is safe)."""
    out = []
    last = 0
    for a, b in _attribute_spans(text):
        out.append(text[last:a])
        out.append(_blank(text[a:b]))
        last = b
    out.append(text[last:])
    return "".join(out)


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    parts, depth, cur = [], 0, []
    for c in text:
        if c in "([{<":
            depth += 1
        elif c in ")]}>":
            depth -= 1
        if c == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


_ATTR = re.compile(r"\[\[\s*(\w+)\s*(?:\(\s*(\d+)\s*\))?\s*\]\]")


def _parse_params(name: str, text: str) -> list[Param]:
    params = []
    for raw in _split_top_level(text):
        decl = " ".join(raw.split())
        if not decl or decl == "void":
            continue
        attrs = _ATTR.findall(decl)
        if len(attrs) != 1:
            raise SourceError(
                f"kernel {name}: parameter `{decl}` needs exactly one [[...]] attribute"
            )
        attr, idx = attrs[0]
        plain = _ATTR.sub("", decl).strip()
        pname = re.findall(r"(\w+)\s*$", plain)
        pname = pname[0] if pname else "?"
        spaces = set(re.findall(r"\b(device|constant|threadgroup)\b", plain))
        if attr == "buffer" and not spaces & {"device", "constant"}:
            raise SourceError(
                f"kernel {name}: buffer parameter `{plain}` needs the device or constant "
                "address space"
            )
        if attr == "threadgroup" and spaces != {"threadgroup"}:
            raise SourceError(
                f"kernel {name}: threadgroup parameter `{plain}` needs the threadgroup "
                "address space"
            )
        if attr == "buffer":
            params.append(Param(KIND_BUFFER, int(idx), pname, plain))
        elif attr == "threadgroup":
            params.append(Param(KIND_THREADGROUP, int(idx), pname, plain))
        elif attr in BUILTINS:
            params.append(Param(KIND_BUILTIN, BUILTINS[attr], pname, plain))
        else:
            raise SourceError(f"kernel {name}: unsupported parameter attribute [[{attr}]]")
        if attr in ("buffer", "threadgroup") and not 0 <= int(idx) < 32:
            raise SourceError(f"kernel {name}: binding index {idx} out of range 0..31")
    return params


_KERNEL_DEF = re.compile(
    r"(?:\[\[\s*kernel\s*\]\]|\bkernel\b)\s*(?:\[\[[^\]]*\]\]\s*)*void\s+(\w+)\s*\("
)
_INSTANCE = re.compile(
    r"template\s*\[\[\s*host_name\s*\(\s*((?:\"(?:[^\"\\]|\\.)*\"\s*)+)\)\s*\]\]\s*"
    r"\[\[\s*kernel\s*\]\]\s*decltype\s*\("
)


def find_kernels(pp_text: str) -> list[KernelInfo]:
    """Entry points of preprocessed MSL text (attributes still present)."""
    text = _mask_linemarkers(pp_text)
    templates: dict[str, list[Param]] = {}
    plain: list[KernelInfo] = []
    instance_spans = []
    instances = []
    for m in _INSTANCE.finditer(text):
        name = "".join(re.findall(r"\"((?:[^\"\\]|\\.)*)\"", m.group(1)))
        open_paren = m.end() - 1
        close = _match_close(text, open_paren, "(", ")")
        func = " ".join(text[open_paren + 1 : close - 1].split())
        instances.append((name, func))
        instance_spans.append((m.start(), close))
    for m in _KERNEL_DEF.finditer(text):
        if any(a <= m.start() < b for a, b in instance_spans):
            continue
        fname = m.group(1)
        open_paren = m.end() - 1
        close = _match_close(text, open_paren, "(", ")")
        params = _parse_params(fname, text[open_paren + 1 : close - 1])
        before = text[: m.start()].rstrip()
        if before.endswith(">"):
            templates[fname] = params
        else:
            plain.append(KernelInfo(fname, fname, params))
    kernels = list(plain)
    for name, func in instances:
        base = re.match(r"\s*(?:::)?([\w:]+?)\s*<", func)
        base_name = base.group(1).split("::")[-1] if base else func
        if base_name not in templates:
            raise SourceError(f"{name}: no [[kernel]] template named {base_name}")
        kernels.append(KernelInfo(name, func, templates[base_name]))
    seen = set()
    for k in kernels:
        if k.name in seen:
            raise SourceError(f"duplicate kernel host name {k.name}")
        seen.add(k.name)
    return kernels


_VEC_NAMES = r"(?:float|half|bfloat|int|uint|short|ushort|char|uchar|long|ulong|bool)(?:2|3|4|8|16)"
_VEC_CTOR = re.compile(r"(?<![\w.])(?:metal::)?(" + _VEC_NAMES + r"|half|bfloat)\s*\(")
_VEC_TEMPLATE_CTOR = re.compile(r"(?<![\w.])(?:metal::)?vec\s*<([^<>;(){}]*)>\s*\(")
_STATIC_CAST = re.compile(
    r"\bstatic_cast\s*<\s*((?:metal::)?(?:"
    + _VEC_NAMES
    + r"|half|bfloat)|(?:metal::)?vec\s*<[^<>;(){}]*>)\s*>\s*\("
)
_HALF_LITERAL = re.compile(r"(?<![\w.])((?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)[hH]\b")
_TG_WORD = re.compile(r"\bthreadgroup\b")
_NAME_OR_NUMBER = re.compile(
    r"(?:::)?[A-Za-z_]\w*(?:::\w+)*"
    r"|(?:0[xX][0-9a-fA-F]+|\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)[fFhHuUlL]*"
)
_C_CAST = re.compile(r"\(\s*((?:metal::)?(?:" + _VEC_NAMES + r"|half|bfloat))\s*\)(?=\s*[\w(.])")
_KERNEL_KW = re.compile(r"\bkernel(\s+void\b)")


def rewrite(pp_text: str) -> str:
    """Preprocessed MSL (attributes present) to C++ for the emulator's shim."""
    marks = [(m.start(), m.end()) for m in _LINEMARKER.finditer(pp_text)]
    # Rewrite only the code between line markers.
    out = []
    last = 0
    for a, b in marks + [(len(pp_text), len(pp_text))]:
        out.append(_rewrite_code(pp_text[last:a]))
        out.append(pp_text[a:b])
        last = b
    return "".join(out)


def _rewrite_code(text: str) -> str:
    text = strip_attributes(text)
    text = _KERNEL_KW.sub(r"      \1", text)

    def ctor(m: re.Match) -> str:
        head = text[max(0, m.start() - 20) : m.start()]
        if re.search(r"\boperator\s*$", head):
            return m.group(0)
        return f"::mlxq_emu::make_vec<{m.group(1)}>("

    text = _rewrite_c_casts(text)
    text = _STATIC_CAST.sub(lambda m: f"::mlxq_emu::make_vec<{m.group(1)}>(", text)
    text = _VEC_CTOR.sub(ctor, text)
    text = _VEC_TEMPLATE_CTOR.sub(
        lambda m: f"::mlxq_emu::make_vec<metal::vec<{m.group(1)}>>(", text
    )
    text = _HALF_LITERAL.sub(lambda m: f"((half){m.group(1)}f)", text)
    return _mark_threadgroup_variables(text)


def _operand_end(text: str, i: int) -> int:
    """End of the cast operand starting at text[i]: a parenthesised expression or a name/literal,
    each with postfix `.member`, `->member`, `[...]` and `(...)`; -1 if it is neither."""
    n = len(text)
    while i < n and text[i].isspace():
        i += 1
    nested = _C_CAST.match(text, i)
    if nested:
        return _operand_end(text, nested.end())
    if i < n and text[i] == "(":
        i = _match_close(text, i, "(", ")")
    else:
        m = _NAME_OR_NUMBER.match(text, i)
        if not m:
            return -1
        i = m.end()
    while i < n:
        if text[i] == "[":
            i = _match_close(text, i, "[", "]")
        elif text[i] == "(":
            i = _match_close(text, i, "(", ")")
        elif text.startswith("->", i) or text[i] == ".":
            m = re.match(r"(?:->|\.)\s*\w+", text[i:])
            if not m:
                break
            i += m.end()
        else:
            break
    return i


def _rewrite_c_casts(text: str) -> str:
    """`(float4)x` converts element-wise in MSL but bit-casts same-size vectors in clang."""
    out, last = [], 0
    for m in _C_CAST.finditer(text):
        if m.start() < last:
            continue
        end = _operand_end(text, m.end())
        if end < 0:
            raise SourceError(f"unsupported C-style cast `{text[m.start() : m.end() + 20]}`")
        out.append(text[last : m.start()])
        out.append(f"::mlxq_emu::make_vec<{m.group(1)}>({_rewrite_c_casts(text[m.end() : end])})")
        last = end
    out.append(text[last:])
    return "".join(out)


def _is_variable_declaration(text: str, start: int) -> bool:
    """Whether the `threadgroup` ending at `start` begins a variable declaration (ends in `;`,
    no pointer/reference declarator, no function parameter or cast)."""
    depth = 0
    for c in text[start:]:
        if depth == 0 and c in "*&(":
            return False  # pointer, reference or function declarator
        if c in "[(<":
            depth += 1
        elif c in "])>":
            depth -= 1
            if depth < 0:
                return False  # closes a parameter list or a cast
        elif c in "{}":
            return False
        elif c == ";":
            return depth == 0
    return False


def _mark_threadgroup_variables(text: str) -> str:
    """`threadgroup T buf[N];` -> one array shared by the threadgroup (MLXQ_TG_VAR)."""
    out, last = [], 0
    for m in _TG_WORD.finditer(text):
        if _is_variable_declaration(text, m.end()):
            out.append(text[last : m.start()])
            out.append("MLXQ_TG_VAR")
            last = m.end()
    out.append(text[last:])
    return "".join(out)


def wrappers(kernels: list[KernelInfo]) -> str:
    """C++ entry wrappers binding buffers/threadgroup memory/builtins, plus the kernel table."""
    lines = ['\n# 1 "<mlxq-emulator-entry-points>"']
    for i, k in enumerate(kernels):
        specs = ", ".join(f"{{{p.kind}, {p.index}}}" for p in k.params) or "{0, 0}"
        lines.append(f"static const ::mlxq_emu::ArgSpec mlxq_spec_{i}[] = {{{specs}}};")
        lines.append(
            f"static void mlxq_entry_{i}(const ::mlxq_emu::ThreadArgs* t) "
            f"{{ ::mlxq_emu::invoke(&{k.function}, t, mlxq_spec_{i}); }}"
        )
    table = ", ".join(f'{{"{k.name}", mlxq_entry_{i}}}' for i, k in enumerate(kernels))
    hidden = '__attribute__((visibility("hidden")))'
    lines.append(
        f'extern "C" {hidden} const ::mlxq_emu::KernelEntry mlxq_emu_kernels[] = '
        f"{{{table or '{nullptr, nullptr}'}}};"
    )
    lines.append(f'extern "C" {hidden} const int mlxq_emu_nkernels = {len(kernels)};')
    return "\n".join(lines) + "\n"
