"""Every third-party import of the project is declared in pyproject.toml, in the extra of the feature using it.

Imports are read with ``ast`` (also inside string constants that hold code run in a child process), import names
are mapped to distributions with ``importlib.metadata.packages_distributions()``, and each distribution must be
a requirement (or a requirement's requested extra, e.g. ``jax[tpu]`` brings ``libtpu``) of the dependency groups
the importing file may rely on:

- the package itself, ``train.py``, ``configs/``, ``scripts/``: the core dependencies only;
- ``eval.py`` and ``mistral_jax/evals/``: core + ``eval``; ``mistral_jax/aot/``: core + ``tpu``;
  ``mistral_jax/serve/``: core + ``serve``; ``mistral_jax/data/prepare_beam.py``: core + ``beam``;
  ``mistral_jax/training/goodput_recorder.py``: core + ``goodput``; ``.../wandb_writer.py``: core + ``wandb``;
- ``benchmarks/`` and ``tests/``: core + ``test`` (which includes ``eval`` and ``tpu``).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent

# Which dependency groups ("" = core) a file may import from; the first matching prefix wins.
GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("mistral_jax/evals/", ("", "eval")),
    ("mistral_jax/aot/", ("", "tpu")),
    ("mistral_jax/cli/aot.py", ("", "tpu")),
    ("mistral_jax/serve/", ("", "serve")),
    ("mistral_jax/cli/serve.py", ("", "serve")),
    ("mistral_jax/convert/hf.py", ("", "hf")),
    ("mistral_jax/data/prepare_beam.py", ("", "beam")),
    ("mistral_jax/training/goodput_recorder.py", ("", "goodput")),
    ("mistral_jax/training/wandb_writer.py", ("", "wandb")),
    ("mistral_jax/", ("",)),
    ("eval.py", ("", "eval")),
    ("train.py", ("",)),
    ("configs/", ("",)),
    ("scripts/", ("",)),
    ("benchmarks/", ("", "test")),
    ("tests/", ("", "test")),
]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports_of_source(source: str) -> set[str]:
    """Top-level names of absolute imports in ``source``, including code held in string constants."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "import " in node.value:
            names |= _imports_of_source(node.value)  # e.g. a script run with ``python -c``
    return names


def _python_sources(root: Path) -> list[Path]:
    files = []
    for rel, _groups in GROUPS:
        p = root / rel
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(p.rglob("*.py"))
    for sh in sorted((root / "scripts").glob("*.sh")) if (root / "scripts").is_dir() else []:
        files.append(sh)  # shell scripts: the Python heredocs in them
    return sorted(set(files))


def _sources_in(path: Path) -> str:
    text = path.read_text()
    if path.suffix == ".sh":  # python heredocs: <<'PY' ... PY
        return "\n".join(m.group(1) for m in re.finditer(r"<<'?PY'?\n(.*?)\nPY\n", text, flags=re.S))
    return text


def _group_distributions(pyproject: dict) -> dict[str, set[str]]:
    """Normalised distribution names each group provides (its requirements and their requested extras)."""
    project = pyproject["project"]
    raw = {"": list(project.get("dependencies", []))}
    raw.update({k: list(v) for k, v in project.get("optional-dependencies", {}).items()})
    own = _norm(project["name"])

    def expand(group: str, seen: set[str]) -> set[str]:
        out = set()
        for spec in raw.get(group, []):
            req = Requirement(spec)
            if _norm(req.name) == own:  # "mistral_jax[eval,tpu]": this project's own extras
                for extra in req.extras:
                    if extra not in seen:
                        out |= expand(extra, seen | {extra})
                continue
            out.add(_norm(req.name))
            for extra in req.extras:  # e.g. jax[tpu] -> libtpu (read from the installed distribution)
                try:
                    requires = md.requires(req.name) or []
                except md.PackageNotFoundError:
                    continue
                for r in map(Requirement, requires):
                    if r.marker is not None and r.marker.evaluate({"extra": extra}) and \
                            not r.marker.evaluate({"extra": ""}):
                        out.add(_norm(r.name))
        return out

    return {g: expand(g, {g}) for g in raw}


def undeclared_imports(root: Path) -> list[str]:
    """``file: import X (distribution D) is not declared in <groups>`` for every undeclared third-party import."""
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    provided = _group_distributions(pyproject)
    dists_of = md.packages_distributions()
    local = {p.stem if p.is_file() else p.name for p in root.iterdir()
             if (p.is_dir() and any(p.glob("*.py"))) or p.suffix == ".py"}
    problems = []
    for path in _python_sources(root):
        rel = path.relative_to(root).as_posix()
        groups = next(g for prefix, g in GROUPS if rel == prefix or rel.startswith(prefix))
        allowed = set().union(*(provided.get(g, set()) for g in groups))
        siblings = {p.stem for p in path.parent.glob("*.py")}
        for name in sorted(_imports_of_source(_sources_in(path))):
            if name in sys.stdlib_module_names or name in local or name in siblings:
                continue
            dists = {_norm(d) for d in dists_of.get(name, [])}
            if not dists:
                problems.append(f"{rel}: import {name}: no installed distribution provides it "
                                f"(declare it in pyproject.toml, in {groups})")
            elif not dists & allowed:
                where = " or ".join(f"[{g}]" if g else "core dependencies" for g in groups)
                problems.append(f"{rel}: import {name} (distribution {sorted(dists)[0]}) is not declared in "
                                f"{where}")
    return problems


@pytest.mark.oracle
def test_every_import_is_declared():
    problems = undeclared_imports(ROOT)
    assert not problems, "undeclared third-party imports:\n" + "\n".join(problems)


@pytest.mark.oracle
def test_checker_catches_an_undeclared_import(tmp_path):
    """The checker itself: an import missing from pyproject.toml, or declared only in another feature's extra."""
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "mistral_jax"\ndependencies = ["numpy"]\n'
        '[project.optional-dependencies]\ntest = ["pytest", "mistral_jax[tpu]"]\ntpu = ["jax[tpu]"]\n')
    pkg = tmp_path / "mistral_jax"
    (pkg / "evals").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import numpy\nfrom pytest import fixture\n")
    (pkg / "aot").mkdir()
    (pkg / "aot" / "__init__.py").write_text("import libtpu\n")  # declared through the tpu extra's jax[tpu]
    (pkg / "helper.py").write_text('CHILD = """\nimport packaging\nprint(1)\n"""\n')  # code in a string
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("import pytest\nimport libtpu\nfrom mistral_jax import aot\n")
    problems = undeclared_imports(tmp_path)
    text = "\n".join(problems)
    assert "mistral_jax/__init__.py: import pytest" in text, text  # a test-only package in the core package
    assert "mistral_jax/helper.py: import packaging" in text, text
    assert "import numpy" not in text and "aot/" not in text and "tests/test_x.py" not in text, text
    assert len(problems) == 2, text

