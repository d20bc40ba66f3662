"""The search package's public face: its modules are private, and the rest of the library and the
benchmarks import it only through ``budgetsearch.search`` (tests may reach the private modules
they test)."""

from __future__ import annotations

import ast
from pathlib import Path

import budgetsearch
import budgetsearch.search as search

ROOT = Path(budgetsearch.__file__).parent


def test_the_modules_behind_the_face_are_private():
    modules = sorted(p.name for p in (ROOT / "search").glob("*.py"))
    assert modules[0] == "__init__.py"
    assert all(name.startswith("_") for name in modules), modules


def test_every_public_name_is_importable_and_documented():
    doc = search.__doc__ or ""
    for name in search.__all__:
        assert getattr(search, name) is not None
        assert name in doc, f"{name} is exported but not listed in the package docstring"


def _search_imports(path: Path, package: tuple[str, ...]) -> list[str]:
    """The modules of budgetsearch.search a file imports, resolved to absolute names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names] if target == "budgetsearch" else []
            found += [t for t in (target, *names) if t.startswith("budgetsearch.search")]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("budgetsearch.search")]
    return found


def test_the_library_and_benchmarks_import_only_the_face():
    files = [(p, ("budgetsearch", *p.relative_to(ROOT).parent.parts))
             for p in ROOT.rglob("*.py") if "search" not in p.relative_to(ROOT).parts[:1]]
    files += [(p, ()) for p in (ROOT.parent / "benchmarks").glob("*.py")]
    assert len(files) > 50
    offenders = {str(p): bad for p, pkg in files
                 if (bad := [t for t in _search_imports(p, pkg) if t != "budgetsearch.search"])}
    assert not offenders, offenders
