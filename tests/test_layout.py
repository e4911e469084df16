"""The package's shape: no import cycles, dependencies that run one way, and small functions and classes.

Static (AST) checks of finetune/: imports inside functions count too, since a cycle through a lazy import
is still a cycle a reader has to untangle."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "finetune"
# lower layers never import higher ones (commands > app/train/features/sweep > model/data/tracking > config)
LAYERS = {"commands": 4, "cli": 5, "__main__": 5, "app": 3, "train": 3, "features": 3, "sweep": 3,
          "model": 2, "data": 2, "tracking": 2, "config": 1, "errors": 0, "files": 0, "registry": 0, "progress_bar": 0, "tracking_buffer": 3}
MAX_FUNCTION_LINES, MAX_CLASS_LINES = 60, 200
# at most two, each with its reason in a comment at the definition ("size-limit exception: ...")
EXCEPTION_MARK = "size-limit exception:"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target != "finetune":
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    edges = {name: imports_of(name, tree, known) for name, tree in trees.items()}
    # a package's __init__ re-exporting its modules is not a dependency of those modules on it
    return {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in edges.items()}


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def layer(module: str) -> int:
    return LAYERS[module.split(".")[1]] if module.count(".") else 5


def test_dependencies_run_one_way():
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
              if a.count(".") and b.count(".") and layer(b) > layer(a)]
    assert not upward, "imports from a higher layer: " + "; ".join(sorted(upward))


def test_functions_and_classes_are_small():
    too_long, exceptions = [], []
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(source))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                lines = node.end_lineno - start + 1
                if lines <= limit:
                    continue
                where = f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)"
                context = "\n".join(source[max(0, start - 3):node.lineno + 2])
                (exceptions if EXCEPTION_MARK in context else too_long).append(where)
    assert not too_long, "over the size limits: " + "; ".join(too_long)
    assert len(exceptions) <= 2, f"at most two size-limit exceptions: {exceptions}"
