"""The Python package keeps one direction of dependency (design.md "Layers"): no module imports
one of a higher layer, also not inside a function, and there is no import circle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "python" / "mlxq"

# top-level module or package -> layer (a module uses only its own layer and lower ones);
# modules not listed (new packages, build helpers) are not checked
LAYERS = {
    "format": 0,
    "_native": 0,
    "_threads": 0,
    "_transformers_version": 0,
    "_sizes": 0,
    "ops": 1,
    "nn": 2,
    "moe": 2,
    "mla": 2,
    "swap": 2,
    "model_walk": 2,
    "dequantize_model": 2,
    "integrations": 3,
    "quantize_model": 4,
    "convert": 4,
    "inspect_checkpoint": 4,
    "demo_model": 4,
    "generation": 4,  # the generation loop of the CLI and the benchmark
    "bench": 5,
    "cli": 5,
}
# known, owned elsewhere: doctor reads the cache folder from demo_model
ALLOWED = {("backend_info", "demo_model"), ("doctor", "demo_model")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> list[tuple[str, str, int]]:
    edges = []
    for path in ROOT.rglob("*.py"):
        source = _module_name(path)
        package = source if path.name == "__init__.py" else source.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - node.level + 1]
                targets = [".".join([*base, node.module] if node.module else base)]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlxq"):
                module = node.module.removeprefix("mlxq").removeprefix(".")
                targets = [module] if module else [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name[5:] for a in node.names if a.name.startswith("mlxq.")]
            edges.extend((source, t, node.lineno) for t in targets if t and t != source)
    return edges


def _layer(module: str) -> int | None:
    return LAYERS.get(module.split(".")[0])


def test_no_import_from_a_lower_layer_up() -> None:
    upward = [
        f"{a}:{line} imports {b}"
        for a, b, line in _imports()
        if _layer(a) is not None
        and _layer(b) is not None
        and _layer(b) > _layer(a)
        and (a.split(".")[0], b.split(".")[0]) not in ALLOWED
    ]
    assert not upward, upward


def test_no_import_circle_between_modules() -> None:
    graph: dict[str, set[str]] = {}
    for a, b, _ in _imports():
        if b.startswith(a + ".") or a.startswith(b + "."):
            continue  # a package and its own parts (its __init__ re-exports them)
        graph.setdefault(a, set()).add(b)
    circles = []
    for start in graph:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    circles.append(" -> ".join([*path, start]))
                elif nxt not in path:
                    stack.append((nxt, [*path, nxt]))
    assert not circles, circles[:5]


def test_public_names_are_not_shadowed_by_submodules():
    """Importing a submodule sets the package attribute of its name: a module named like a
    public function (mlxq.dequantize, mlxq.backend_info) would replace that function."""
    import importlib
    import pkgutil

    import mlxq

    for info in pkgutil.walk_packages(mlxq.__path__, "mlxq."):
        if ".testing." in info.name or info.name.endswith("__main__"):
            continue
        importlib.import_module(info.name)
    for name in mlxq.__all__:
        assert callable(getattr(mlxq, name)) or name == "__version__", name
        assert not isinstance(getattr(mlxq, name), type(mlxq)), f"mlxq.{name} is a module"
