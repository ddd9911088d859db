"""The import graph of shardinfer, read from its sources with ``ast`` (nothing is imported): no cycle,
the config package a leaf, and shardinfer modules imported at module level, not inside functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Function-local imports of shardinfer modules that stay: (importing module, imported module) -> why.
LOCAL_ALLOWED = {
    ("shardinfer", "shardinfer.launch.start"):
        "run/submit/resume of the package: importing any shardinfer module runs shardinfer/__init__.py first, "
        "which therefore cannot load the launch stage",
    ("shardinfer", "shardinfer.ledger.rundir"): "resume of the package, as above",
    ("shardinfer.bench.simulate", "shardinfer.bench.sim_engine"):
        "importing it registers the sim engine (a plugin): only a simulation does",
}
LEAF = "shardinfer.config"
LEAF_MAY_IMPORT = ("shardinfer.config", "shardinfer.errors")


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package)."""
    found = {}
    for path in sorted((SRC / "shardinfer").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


MODULES = _modules()


def _targets(node: ast.Import | ast.ImportFrom, name: str, package: bool) -> list[str]:
    """The shardinfer modules an import statement loads (``from a import b`` loads a.b when that is a module)."""
    if isinstance(node, ast.Import):
        found = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = name.split(".") if package else name.split(".")[:-1]
            base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
        found = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return [t for t in found if t == "shardinfer" or t.startswith("shardinfer.")]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str) -> list[tuple[str, str, int]]:
    """(where, imported module, line) for every shardinfer import of a module; where is "module" (run
    when the module is imported), "typing" (``if TYPE_CHECKING:``, never run) or "function"."""
    path, package = MODULES[name]
    out: list[tuple[str, str, int]] = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.extend((where, target, child.lineno) for target in _targets(child, name, package))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, "function")
            elif isinstance(child, ast.If) and where == "module" and _is_type_checking(child):
                visit(child, "typing")
            else:
                visit(child, where)

    visit(ast.parse(path.read_text(), str(path)), "module")
    return out


IMPORTS = {name: _imports(name) for name in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := walk(start)):
            return found
    return None


def test_the_graph_is_read_from_every_module():
    assert {"shardinfer.cli", "shardinfer.config.schema", "shardinfer.planning.validate",
            "shardinfer.engines.registry"} <= set(MODULES)
    assert ("module", "shardinfer.config") in {(w, t) for w, t, _ in IMPORTS["shardinfer.planning.validate"]}
    assert ("module", "shardinfer._moved") in {(w, t) for w, t, _ in IMPORTS["shardinfer.ledger"]}  # from x import module
    assert ("typing", "shardinfer.launch.base") in {(w, t) for w, t, _ in IMPORTS["shardinfer"]}


def test_module_level_imports_have_no_cycle():
    graph = {name: {t for where, t, _ in found if where == "module" and t in MODULES and t != name}
             for name, found in IMPORTS.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check itself


def test_the_config_package_imports_nothing_of_shardinfer_but_itself_and_errors():
    config = [name for name in MODULES if name == LEAF or name.startswith(LEAF + ".")]
    assert len(config) >= 4
    wrong = [f"{name}:{line} imports {target}" for name in config for _, target, line in IMPORTS[name]
             if not any(target == ok or target.startswith(ok + ".") for ok in LEAF_MAY_IMPORT)]
    assert not wrong, "\n".join(wrong)


def test_importing_the_config_package_loads_no_other_stage():
    code = "import sys, shardinfer.config; print(sorted(m for m in sys.modules if m.startswith('shardinfer')))"
    loaded = eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert [m for m in loaded if not m.startswith(LEAF)] == ["shardinfer", "shardinfer._moved", "shardinfer.errors"]


def test_shardinfer_modules_are_imported_at_module_level():
    local = {(name, target): line for name, found in IMPORTS.items() for where, target, line in found
             if where == "function"}
    unexplained = [f"{name}:{line} imports {target} inside a function" for (name, target), line in local.items()
                   if (name, target) not in LOCAL_ALLOWED]
    assert not unexplained, "\n".join([*unexplained, "import them at module level; a function-local import is for "
                                       "heavy optional packages (vllm, torch, ...) and plugins, or add it to "
                                       "LOCAL_ALLOWED with the reason"])
    assert set(LOCAL_ALLOWED) <= set(local), "LOCAL_ALLOWED names an import that is gone: remove it from the list"
    assert all(LOCAL_ALLOWED.values())
