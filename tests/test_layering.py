"""Import contracts outside the package that `lint-imports` cannot see: the benchmarks use the public API only.

`lint-imports` checks the layers inside ``projlens_defense`` (``[tool.importlinter]`` in pyproject.toml); the
benchmark scripts are not in the package, so this test parses them: each may import ``projlens_defense`` (the
top-level package: ``pld.scan``, ``pld.auroc``, ...) and nothing below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import projlens_defense as pld

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py"))


def internal_imports(source: str) -> list[str]:
    """The ``projlens_defense.<submodule>`` modules ``source`` imports, at any depth (functions included)."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if a.name.startswith("projlens_defense.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("projlens_defense."):
            bad.append(node.module)
    return bad


def test_the_check_sees_every_form_of_internal_import() -> None:
    src = ("import projlens_defense as pld\nfrom projlens_defense import scan\n"
           "def f():\n    from projlens_defense.metrics import auroc\n    import projlens_defense.runtime as rt\n")
    assert internal_imports(src) == ["projlens_defense.metrics", "projlens_defense.runtime"]


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_imports_only_the_public_package(script: Path) -> None:
    assert not internal_imports(script.read_text()), f"{script.name} imports library internals; use pld.* instead"


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_uses_only_public_names(script: Path) -> None:
    """Every ``pld.NAME`` / ``from projlens_defense import NAME`` a benchmark uses is exported in ``__all__``."""
    tree = ast.parse(script.read_text())
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "pld"}
    used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "projlens_defense"
             for a in n.names}
    assert used <= set(pld.__all__), sorted(used - set(pld.__all__))


def test_the_public_exports_resolve() -> None:
    for name in pld.__all__:
        assert getattr(pld, name) is not None, name
