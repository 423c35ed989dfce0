"""The unit tier needs nothing but the package's own dependencies: checked from the source.

Every module under tests/unit, and every tests/ helper module they import, may
import only the standard library, the package's declared dependencies
([project] dependencies in pyproject.toml), pytest, vllm_rbln_exec and tests/
helpers: no torch, vLLM or transformers (nor safetensors or tokenizers, which
come with them), so ``pytest tests/unit`` runs where no engine is installed.
The unit test modules import no subprocess or multiprocessing either.
(conftest.py enforces the same at run time.)
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

UNIT = Path(__file__).resolve().parent
TESTS = UNIT.parent
REPO = TESTS.parent
ENGINES = {"torch", "vllm", "transformers", "safetensors", "tokenizers", "gguf", "accelerate"}
NO_PROCESS = {"subprocess", "multiprocessing", "concurrent"}


def declared_dependencies() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].strip().lower().replace("-", "_")
            for dep in project["dependencies"]}


def imported_names(path: Path) -> set[str]:
    """Dotted names a module imports: import statements, and string arguments of
    importlib.import_module, __import__ and pytest.importorskip."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__", "importorskip"):
                names.add(node.args[0].value)
    return names


def local_module(name: str) -> Path | None:
    """The file of a tests/ helper module (``tests.fakes.model`` -> tests/fakes/model.py)."""
    if not name.startswith("tests."):
        return None
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_unit_modules_import_no_engine_and_start_no_process():
    allowed = set(sys.stdlib_module_names) | declared_dependencies() | {"pytest", "vllm_rbln_exec", "tests"}
    assert not allowed & ENGINES
    problems = []
    queue = sorted(UNIT.rglob("*.py"))
    seen: set[Path] = set()
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        in_unit = UNIT in path.parents and path.name != "conftest.py"  # conftest imports subprocess to guard it
        for name in sorted(imported_names(path)):
            top = name.split(".")[0]
            where = path.relative_to(REPO)
            if top not in allowed or top in ENGINES:
                problems.append(f"{where} imports {name}")
            elif in_unit and top in NO_PROCESS:
                problems.append(f"{where} imports {name} (a unit test starts no process)")
            helper = local_module(name)
            if helper is not None:
                queue.append(helper)
    assert not problems, "\n".join(problems)
    assert len(seen) > 10  # the scan did find the unit tests


def test_the_scan_sees_every_way_of_importing(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import torch.nn\nfrom vllm import LLM\nimport importlib\n"
                      "importlib.import_module('transformers')\n__import__('safetensors')\n"
                      "import pytest\npytest.importorskip('tokenizers')\nfrom . import sibling\n")
    assert imported_names(sample) == {"torch.nn", "vllm", "importlib", "transformers", "safetensors", "pytest",
                                      "tokenizers"}
