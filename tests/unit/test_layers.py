"""The package's layering: a layer imports only layers below it, and no modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import vllm_rbln_exec

ROOT = Path(vllm_rbln_exec.__file__).parent
# bottom first; the entries (cli, pytest_plugin, __main__) sit above everything
LAYERS = ("core", "capture", "compare", "verdict", "profiling", "setup", "engines", "worker", "outputs", "pipeline")
NO_LOCAL_IMPORTS = ("compare", "verdict")  # every import at module level: nothing hides a circle


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    if not module:
        return -1  # the package's own __init__: its version only, below everything
    top = module.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else len(LAYERS)


def _imports() -> dict[str, list[tuple[str, bool]]]:
    """module -> [(imported module, inside a function)] for the package's own relative imports."""
    out: dict[str, list[tuple[str, bool]]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        module = _module(path)
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        tree = ast.parse(path.read_text())
        local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
        found = []
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            for alias in node.names:
                target = [*base, alias.name]
                is_module = (ROOT.joinpath(*target).with_suffix(".py")).exists() or ROOT.joinpath(*target).is_dir()
                found.append((".".join(target if is_module else base), id(node) in local))
        out[module] = found
    return out


def test_no_layer_imports_a_layer_above_it():
    upward = [f"{m} -> {t}" for m, deps in _imports().items() for t, _ in deps if _layer(t) > _layer(m)]
    assert upward == []


def test_compare_and_verdict_import_at_module_level_only():
    local = [f"{m} -> {t}" for m, deps in _imports().items() if m.split(".")[0] in NO_LOCAL_IMPORTS
             for t, inside in deps if inside]
    assert local == []


def test_no_import_circles():
    imports = _imports()
    graph = {m: {t for t, _ in deps if t != m and t in imports} for m, deps in imports.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for nxt in sorted(graph[module]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (circle := visit(nxt, [*path, nxt])):
                return circle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            assert visit(module, [module]) is None
