"""The package's shape as the README's Layout section lists it: each part of bert_jax/ imports
only the parts listed above it, and no module imports itself back through others."""

import ast
import os
import re

from cli import ROOT

PACKAGE = os.path.join(ROOT, "bert_jax")


def _listed_order() -> list[str]:
    """The top-level parts of bert_jax/ in the order of the README's Layout block."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    return [
        m.group(1).removesuffix(".py").removesuffix("/")
        for m in re.finditer(r"^  (\w+(?:\.py|/))\s", block, flags=re.M)
    ]


def _module_imports() -> dict[str, set[str]]:
    """bert_jax module (dotted) -> the bert_jax modules it imports (anywhere in the file)."""
    modules = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                modules[rel.removesuffix(".__init__")] = ast.parse(open(path).read())
    graph = {}
    for mod, tree in modules.items():
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bert_jax"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("bert_jax")}
        graph[mod] = {t for t in targets if t != mod and not mod.startswith(t + ".")}
    return graph


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_each_part_imports_only_the_parts_listed_above_it():
    order = _listed_order()
    parts = {_part(m) for m in _module_imports() if m != "bert_jax"}
    assert parts == set(order), f"listed {sorted(set(order))}, present {sorted(parts)}"
    rank = {p: i for i, p in enumerate(order)}
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in _module_imports().items()
        if module != "bert_jax"
        for target in targets
        if target != "bert_jax" and rank[_part(target)] > rank[_part(module)]
    )
    assert upward == [], upward


def test_no_module_imports_itself_back():
    graph = _module_imports()
    cycles = []

    def visit(module, path):
        for target in graph.get(module, ()):
            if target == path[0]:
                cycles.append(" -> ".join([*path, target]))
            elif target not in path and len(path) < 8:
                visit(target, [*path, target])

    for module in graph:
        visit(module, [module])
    assert cycles == [], cycles[:5]
