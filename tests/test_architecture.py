"""The package's structure: no import cycle among its modules, imports inside functions included.

An import inside a function hides a cycle from Python at import time, not from the design: the two modules still
need each other. So every `import` and `from ... import` anywhere in a module counts.
"""
from __future__ import annotations

import ast
import os

from conftest import REPO_ROOT


def module_files(root: str, package: str) -> dict[str, str]:
    """{dotted module name: path} of every .py file of `package` under `root`."""
    modules = {}
    for directory, _, files in os.walk(os.path.join(root, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path
    return modules


def imported_modules(path: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of `known` that `module` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                parts = module.split(".")[:len(module.split(".")) - node.level + is_package]
                base = ".".join(parts + ([base] if base else []))
            # `from package import name` imports the submodule `name` when there is one
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known and target != module)
    return found


def import_graph(root: str, package: str) -> dict[str, set[str]]:
    files = module_files(root, package)
    return {module: imported_modules(path, module, path.endswith("__init__.py"), set(files))
            for module, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: the import cycles."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def describe(graph: dict[str, set[str]], component: list[str]) -> str:
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(component)))}" for m in component)


def test_the_package_has_no_import_cycle():
    graph = import_graph(REPO_ROOT, "trainer")
    assert len(graph) > 30 and graph["trainer.mlm"], "the walk found the package's modules and their imports"
    found = cycles(graph)
    assert not found, "import cycles: " + " | ".join(describe(graph, component) for component in found)


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    """The check itself: a cycle closed by an import inside a function, through a package and a relative
    import, is reported; the same modules without that import are not."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("from . import c\n")
    (package / "sub" / "c.py").write_text("import os\n\n\ndef late():\n    from pkg.a import x\n    return x, os\n")
    graph = import_graph(str(tmp_path), "pkg")
    assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]
    (package / "sub" / "c.py").write_text("import os\n")
    assert cycles(import_graph(str(tmp_path), "pkg")) == []
