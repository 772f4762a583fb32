"""The package's imports flow one way: no import circle, and no import that runs up a layer.

Every import counts, at module level or inside a function (a lazy import still ties two modules together).
The layers, bottom to top, are ``LAYERS`` below; a module may import from its own layer or any layer under it.
A new module must be placed in a layer here, so where it belongs is decided once, on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "megatron_tpcomp"

#: Bottom to top: (layer name, module name prefixes). A module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "errors",
            "paths",
            "rankwarnings",
            "tokenizer",
            "launch",
            "megatron.compat",
            "megatron.model",
            "megatron.cpu",
            "megatron.generate",
            "configs",
        ),
    ),
    ("spec", ("spec",)),
    ("codecs", ("codecs",)),
    ("backends", ("backends",)),
    ("collectives", ("agreement", "collectives")),
    ("costmodel", ("costmodel",)),
    ("config", ("config",)),
    ("megatron plug-in", ("megatron",)),
    ("checkpoint", ("checkpoint",)),
    (
        "tools",
        (
            "assets",
            "cliutil",
            "checkpoint_cli",
            "session",
            "evaluation",
            "calibration",
            "search",
            "textgen",
            "demo",
            "bench",
            "megatron_lm",
            "collectives_demo",
        ),
    ),
    ("cli", ("cli", "", "megatron_lm.__main__")),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    """Package-relative dotted name ("" for the package itself) -> file."""
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module that importing ``name`` (absolute, dotted) loads last, or None outside the package."""
    if name != "megatron_tpcomp" and not name.startswith("megatron_tpcomp."):
        return None
    rel = name.removeprefix("megatron_tpcomp").removeprefix(".")
    while rel not in modules:
        rel = rel.rpartition(".")[0]
    return rel


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """Package modules ``module`` imports (module level or in a function) -> first line.

    ``from pkg import sub`` counts as an import of ``pkg.sub`` when that is a module; imports of the module's own
    parent packages are left out (Python has initialised them before the module runs)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ("megatron_tpcomp." + module).rstrip(".").split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            subs = [f"{source}.{alias.name}" for alias in node.names]
            targets = [s for s in subs if _resolve(s, modules) == s.removeprefix("megatron_tpcomp.")]
            names = targets if len(targets) == len(subs) else [source, *targets]
        for name in names:
            target = _resolve(name, modules)
            parents = {".".join(module.split(".")[:i]) for i in range(len(module.split(".")))}
            if target is None or target == module or target in parents:
                continue
            found.setdefault(target, node.lineno)
    return found


def layer_of(module: str) -> int:
    """Index in ``LAYERS`` of ``module``'s layer (longest matching prefix); -1 when no layer claims it."""
    best, best_len = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix and module.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    modules = _modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer(graph: dict[str, dict[str, int]]) -> None:
    assert len(graph) > 40, f"only {len(graph)} modules found under {PACKAGE}"
    unplaced = sorted(m or "megatron_tpcomp" for m in graph if layer_of(m) < 0)
    assert not unplaced, f"modules in no layer (add them to LAYERS in {Path(__file__).name}): {unplaced}"
    # A prefix that names no module any more is a stale entry: the table must describe the tree as it is.
    stale = [p for _, prefixes in LAYERS for p in prefixes if not any(m == p or m.startswith(p + ".") for m in graph)]
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_no_import_cycle(graph: dict[str, dict[str, int]]) -> None:
    cycles = _cycles(graph)
    lines = [" <-> ".join(c) for c in cycles]
    assert not cycles, "import circles:\n" + "\n".join(lines)


def test_no_import_runs_up_a_layer(graph: dict[str, dict[str, int]]) -> None:
    upward = []
    for module, targets in sorted(graph.items()):
        for target, line in sorted(targets.items()):
            if layer_of(target) > layer_of(module):
                upward.append(
                    f"megatron_tpcomp/{module.replace('.', '/') or '__init__'}.py:{line} imports {target} "
                    f"({LAYERS[layer_of(module)][0]} -> {LAYERS[layer_of(target)][0]})"
                )
    assert not upward, "imports that run up a layer:\n" + "\n".join(upward)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The parser itself: a function-level import and a relative one are edges; a parent package is not."""
    modules = {"": tmp_path / "__init__.py", "a": tmp_path / "a.py", "b": tmp_path / "b.py", "p": tmp_path / "p"}
    source = tmp_path / "a.py"
    source.write_text("import os\nfrom . import b\n\ndef f():\n    from megatron_tpcomp.p import thing\n")
    assert imports_of("a", source, modules) == {"b": 2, "p": 5}
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert _cycles(graph) == [["a", "b", "c"]]
