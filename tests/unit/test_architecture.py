"""The shape of the source tree: layers, no import circles, module and function sizes, docstrings.

Reads the sources with ``ast`` (nothing is imported). The layers, from the top:
entries (cli, pytest plugin) > pipeline > outputs > worker > remote > engines > setup >
profiling > verdict > compare > capture > core. A module may import its own
layer and the layers below it, never one above (imports inside functions count
too: hiding an upward import in a function does not make it go away).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "vllm_rbln_exec"
LAYERS = ["entries", "pipeline", "outputs", "worker", "remote", "engines", "setup", "profiling", "verdict", "compare",
          "capture", "core"]
ENTRIES = {"cli", "__main__", "pytest_plugin"}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 70
# A longer function is allowed only where its length is the clearest form; each entry says why.
LONG_FUNCTIONS: dict[str, str] = {
    "cli.run": "the typer signature: one line per option of the run, documented in --help",
}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def layer(module: str) -> int:
    top = module.split(".")[0] if module else ""
    if top in ENTRIES:
        return 0
    if top in LAYERS:
        return LAYERS.index(top)
    return len(LAYERS) - 1  # the package root (its version string) sits with core


def imports_of(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported module of this package, line) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text())
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("vllm_rbln_exec"):
                target = node.module.removeprefix("vllm_rbln_exec").lstrip(".")
            else:
                continue
            names = [a.name for a in node.names]
            known = modules()
            subs = [f"{target}.{n}" if target else n for n in names]
            hits = [s for s in subs if s in known]
            found += [(h, node.lineno) for h in hits] or [(target, node.lineno)]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("vllm_rbln_exec."):
                    found.append((alias.name.removeprefix("vllm_rbln_exec."), node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {t for t, _ in imports_of(m, p) if t in known and t != m} for m, p in known.items()}


def test_no_import_runs_up_the_layers():
    wrong = []
    for module, path in modules().items():
        for target, line in imports_of(module, path):
            if layer(target) < layer(module):
                wrong.append(f"{module}:{line} imports {target} ({LAYERS[layer(module)]} -> {LAYERS[layer(target)]})")
    assert not wrong, "imports that run up the layers:\n" + "\n".join(wrong)


def test_no_import_circles():
    g = graph()
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_modules_are_short_and_say_what_they_own():
    long, bare = [], []
    for module, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long.append(f"{module}: {len(text.splitlines())} lines")
        if text.strip() and not ast.get_docstring(ast.parse(text)):
            bare.append(module)
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
    assert not bare, f"modules without a docstring: {bare}"


def test_functions_are_short():
    long = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                name = f"{module}.{node.name}"
                if size > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS:
                    long.append(f"{name}: {size} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (or add them to LONG_FUNCTIONS with why): {long}"


@pytest.mark.parametrize("module", ["cli", "cli.common", "cli.saved", "cli.info", "cli.cache", "pipeline.run", "pipeline.check", "setup.options", "outputs.terminal"])
def test_the_main_process_never_imports_torch_or_vllm(module):
    text = modules()[module].read_text()
    tree = ast.parse(text)
    heavy = [n.lineno for n in ast.walk(tree)
             if isinstance(n, (ast.Import, ast.ImportFrom))
             and any((getattr(n, "module", None) or a.name).split(".")[0] in ("torch", "vllm", "transformers")
                     for a in n.names)]
    assert not heavy, f"{module} imports torch/vLLM/transformers at lines {heavy}"


def test_test_modules_have_distinct_names_across_tiers():
    """`make test` collects tests/unit and tests/plumbing in one pytest process, and the test folders are no
    packages: two modules of one name (tests/unit/test_x.py, tests/plumbing/test_x.py) stop the whole light
    tier at collection ("import file mismatch"), which running each tier alone never shows."""
    tests = Path(__file__).resolve().parents[1]
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted(tests.glob("*/test_*.py")):
        if path.name in seen:
            clashes.append(f"{seen[path.name].relative_to(tests)} and {path.relative_to(tests)}")
        seen.setdefault(path.name, path)
    assert not clashes, "test modules of one name in two tiers: " + "; ".join(clashes)
