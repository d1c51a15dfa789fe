"""The layout holds: no module over 600 lines, no import cycle, layers import only downward.

Imports are read from the source (``ast``): module-level imports only, as function-level
imports and ``if TYPE_CHECKING:`` blocks do not run at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "emosteer"
MAX_LINES = 600

# Each layer may import itself and the layers listed for it (and nothing above it).
LAYERS = {
    "request": {"request"},
    "ops": {"ops"},
    # prompt pairs are labelled with the emotion wheel's categories (analysis/emotion.py)
    "data": {"data", "request", "analysis"},
    "models": {"models", "request"},
    "hf": {"hf", "request", "ops", "models"},
    "vllm": {"vllm", "request", "ops", "models"},
    "analysis": {"analysis", "request", "ops", "models", "hf", "vllm", "data", "report", "llm"},
    "report": {"report", "request", "analysis"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _top_level_imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                    + ([node.module] if node.module else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)

    visit(tree.body)
    # a module's own packages are initialised before it: importing them is no cycle
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {m for m in found if m in modules and m != name and m not in ancestors}


def test_no_module_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_import_cycle():
    modules = _modules()
    graph = {m: _top_level_imports(p, m, modules) for m, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)


def test_layers_import_downward():
    modules = _modules()
    bad = []
    for m, p in modules.items():
        parts = m.split(".")
        if len(parts) < 2 or parts[1] not in LAYERS:
            continue
        allowed = LAYERS[parts[1]]
        for n in _top_level_imports(p, m, modules):
            layer = n.split(".")[1] if n.count(".") else None
            if layer is not None and layer not in allowed and not n.startswith("emosteer._C"):
                bad.append(f"{m} imports {n}")
    assert not bad, "\n".join(bad)
