"""The package's import rule, read from the source (nothing is imported): a module imports its own
layer and lower ones only. Layers, lowest first:

    foundation (errors, paths, losses, compat, bounds) < speed < model < data < evaluate < modules
    < run

``qlora_lightning/__init__.py`` (the names exported on first use) and ``__main__.py`` sit above them
all. Every import counts: at the top of a file, inside a function, under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qlora_lightning"
FOUNDATION = ("errors", "paths", "losses", "compat", "bounds")
LAYERS = ("foundation", "speed", "model", "data", "evaluate", "modules", "run", "entry")
SUBPACKAGES = LAYERS[1:-1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> str | None:
    """The layer of ``qlora_lightning...`` ``module``; None for a module no layer holds."""
    parts = module.split(".")
    if parts[1:] in ([], ["__main__"]):
        return "entry"
    if parts[1] in FOUNDATION and len(parts) == 2:
        return "foundation"
    return parts[1] if parts[1] in SUBPACKAGES else None


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of the package in ``path``, a ``from X import name``
    counting as an import of ``X.name`` where that is a module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found += [
                (node.lineno, f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
                for alias in node.names
            ]
    return [(line, target) for line, target in found if target.split(".")[0] == "qlora_lightning"]


def upward_imports() -> list[str]:
    problems = []
    for module, path in sorted(MODULES.items()):
        layer = layer_of(module)
        for line, target in imports(path):
            target_layer = layer_of(target)
            if LAYERS.index(target_layer) > LAYERS.index(layer):
                problems.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {module} ({layer}) imports "
                    f"{target} ({target_layer}), a higher layer"
                )
    return problems


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer_of(m) is None] == []
    assert {layer_of(m) for m in MODULES} == set(LAYERS)


def test_no_lower_layer_imports_a_higher_one():
    assert imports(PACKAGE / "run" / "cli.py"), "the reader finds no imports"
    problems = upward_imports()
    assert not problems, "\n".join(problems)


def test_each_subpackage_says_what_it_owns_and_may_import():
    for name in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and "May import" in doc, (
            f"qlora_lightning/{name}/__init__.py: no docstring naming what it may import"
        )
