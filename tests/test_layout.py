"""The house layout, checked from the source: module sizes, no import circles, engines apart, absolute imports only,
and a bare ``import tpru_agent`` that loads no torch.

Project modules are named as installed: ``cli/x.py`` is ``tpru_agent.cli.x``, ``finetune/a/b.py`` is
``tpru_agent.finetune.a.b`` (pyproject's package-dir).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Source folder -> the package it installs as.
PACKAGES = {"tpru_agent": "tpru_agent", "cli": "tpru_agent.cli", "finetune": "tpru_agent.finetune"}
#: Where relative imports are looked for (the project's own code, its tests, benchmarks and examples).
ALL_CODE = ("tpru_agent", "cli", "finetune", "tests", "benchmarks", "examples")
MAX_LINES = 450
#: Engine modules that belong to one runtime; a runtime never imports another's (shared: base, chat, prefix_cache).
RUNTIMES = {
    "hf": {"hf", "hf_options", "hf_tokens"},
    "onnx": {"onnx", "ort_setup"},
    "openai": {"openai", "openai_protocol"},
    "classic": {"classic", "classic_features"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:-1]]
    if path.stem != "__init__":
        parts.append(path.stem)
    return ".".join(parts)


@lru_cache(maxsize=1)
def project_modules() -> dict[str, Path]:
    """Module name -> file, for every module under tpru_agent/, cli/ and finetune/."""
    out = {}
    for folder in PACKAGES:
        for path in sorted((REPO / folder).rglob("*.py")):
            out[_module_name(path)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.Module, *, module_level: bool):
    """Import statements run at import time (``module_level``: not in functions, not under ``if TYPE_CHECKING``),
    or every import statement in the file."""
    if not module_level:
        yield from (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        return
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def _targets(node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> set[str]:
    """The project modules an import statement loads (the named module, or each named submodule)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    if node.level or not node.module or node.module not in modules:
        return set()
    subs = {f"{node.module}.{alias.name}" for alias in node.names}
    found = {name for name in subs if name in modules}
    # ``from pkg import name`` where ``name`` is not a submodule reads the package's __init__
    return found | ({node.module} if len(found) < len(subs) else set())


@lru_cache(maxsize=2)
def import_graph(module_level: bool) -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = set().union(*(_targets(n, modules) for n in _import_nodes(tree, module_level=module_level)))
        graph[name].discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path ``[a, b, ..., a]``, or ``None`` (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


# ------------------------------------------------------------------------------------------------ the checks
def test_the_checker_sees_every_module_and_finds_a_planted_circle():
    modules = project_modules()
    assert {"tpru_agent.frames", "tpru_agent.sizing", "tpru_agent.cli.sheet",
            "tpru_agent.finetune.train.modeling"} <= modules.keys()
    graph = import_graph(True)
    assert "tpru_agent.sizing" in graph["tpru_agent.frames"]           # frames sizes through sizing
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_over_the_size_limit():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in project_modules().items()}
    over = {str(project_modules()[n].relative_to(REPO)): lines for n, lines in sizes.items() if lines > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them by topic): {over}"


def test_no_import_circle_at_import_time():
    cycle = find_cycle(import_graph(True))
    assert cycle is None, "module-level import circle: " + " -> ".join(cycle or [])


def test_engines_do_not_import_each_other_or_the_exporter():
    """Each runtime is its own module group (README: engines/); none reaches into another or into onnx.export,
    even inside a function."""
    graph = import_graph(False)
    owner = {f"tpru_agent.engines.{m}": kind for kind, mods in RUNTIMES.items() for m in mods}
    bad = []
    for module, kind in owner.items():
        for target in graph.get(module, ()):
            if owner.get(target, kind) != kind or target == "tpru_agent.onnx.export":
                bad.append(f"{module} -> {target}")
    assert not bad, f"engine modules importing another runtime or the exporter: {bad}"
    assert set(owner) <= set(project_modules()), "RUNTIMES names an engine module that does not exist"


def test_no_relative_imports():
    bad = []
    for folder in ALL_CODE:
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            bad += [f"{path.relative_to(REPO)}:{n.lineno}" for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and n.level]
    assert not bad, f"relative imports (write them absolute: from tpru_agent.x import y): {bad}"


def test_bare_import_loads_no_torch():
    code = "import tpru_agent, sys; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("hand_rolled", ["os.replace(", "os.rename(", "mkstemp(", "mkdtemp("])
def test_atomic_writes_go_through_fsutil(hand_rolled):
    """fsutil is the one atomic write (README: "the one atomic write"); no other module renames temporaries."""
    users = [str(path.relative_to(REPO)) for name, path in project_modules().items()
             if name != "tpru_agent.fsutil" and hand_rolled in path.read_text(encoding="utf-8")]
    assert not users, f"{hand_rolled} outside tpru_agent/fsutil.py (use atomic_path / atomic_dir / write_*): {users}"
