"""The package's shape (issue 16): imports go one way, command-line tools live in ``mistral_jax.cli`` and are
registered as console scripts, the library keeps its names."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mistral_jax"


def _modules(package: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is_package) for every .py file under ``package``."""
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at any depth of its code (lazy imports inside functions count:
    they are dependencies too). ``from a.b import c`` depends on ``a.b`` (whose ``__init__`` runs) and on ``a.b.c``
    when that is a module. A module's own ancestors (packages it lives in) are not edges."""
    mods = _modules(package)
    root = package.name

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, (path, is_pkg) in mods.items():
        here = mod if is_pkg else mod.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                if name == root or name.startswith(root + "."):
                    target = resolve(name)
                    if target and target != mod and not mod.startswith(target + "."):
                        deps.add(target)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    found = cycles(import_graph(PACKAGE))
    assert not found, "modules that import each other (directly or through others): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_cycle_checker_finds_a_lazy_cycle(tmp_path):
    """The checker itself: a cycle through an import inside a function, and through a package ``__init__``."""
    pkg = tmp_path / "mistral_jax"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from mistral_jax.a import f\n")
    (pkg / "a.py").write_text("from mistral_jax.sub import helper\n\ndef f():\n    pass\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "helper.py").write_text("def g():\n    from mistral_jax import a\n    return a\n")
    (pkg / "b.py").write_text("from . import a\n")
    assert cycles(import_graph(pkg)) == [["mistral_jax.a", "mistral_jax.sub.helper"]]
    (pkg / "sub" / "helper.py").write_text("def g():\n    return 1\n")
    assert cycles(import_graph(pkg)) == []


def _console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(_console_scripts()))
@pytest.mark.heavy
def test_console_script_is_a_cli_entry(name):
    """Every tool is registered, lives in ``mistral_jax.cli`` and answers ``--help`` without loading a model."""
    target = _console_scripts()[name]
    module, _, attr = target.partition(":")
    assert module.startswith("mistral_jax.cli."), target
    assert callable(getattr(importlib.import_module(module), attr))
    res = subprocess.run([sys.executable, "-c", f"import sys; sys.argv = [{name!r}, '--help']; "
                          f"from {module} import {attr}; {attr}()"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage:" in res.stdout.lower(), res.stdout[:500]


def test_generate_function_survives_importing_the_cli():
    """``mj.generate`` is the library function, whatever else was imported (no module-class patching)."""
    code = ("import mistral_jax as mj, mistral_jax.cli.generate, inspect; "
            "from mistral_jax.inference.generate import generate; "
            "assert mj.generate is generate and inspect.isfunction(mj.generate), mj.generate")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
