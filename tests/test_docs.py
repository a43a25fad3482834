"""The README and the docs site: short README, every extra listed, links that resolve, a configuration reference
generated from the config tree, a strict MkDocs build, and the README's quick start run as a newcomer would."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def _hooks():
    """docs/hooks.py, the generators of the docs' generated pages, imported from its file (docs/ is no package)."""
    if "mistral_jax_docs_hooks" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mistral_jax_docs_hooks", DOCS / "hooks.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["mistral_jax_docs_hooks"]


def test_readme_is_at_most_200_lines():
    n = len(README.read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines; move details into docs/ (the README keeps at most 200)"


def test_readme_lists_every_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    text = README.read_text()
    missing = [name for name in extras if f"| `{name}` |" not in text]
    assert not missing, f"extras of pyproject.toml missing from the README's install table: {missing}"


# ------------------------------------------------------------------------------------------------ links
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # links inside code blocks are not links
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


def test_every_relative_link_resolves():
    broken, checked = [], 0
    for path in _markdown_files():
        for target in _links(path):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # web links and same-page anchors (mkdocs --strict checks the anchors)
            checked += 1
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert checked > 20, f"only {checked} relative links found: the link pattern is broken"
    assert not broken, "relative links to missing files:\n" + "\n".join(broken)


def test_link_check_sees_a_broken_link(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("see [the guide](guide.md), [ok](page.md), `[not a link](x.md)` and [web](https://example.com)\n")
    assert _links(page) == ["guide.md", "page.md", "https://example.com"]


# ------------------------------------------------------------------------------------------------ config reference
def test_config_reference_lists_every_field_with_its_comment():
    from configs import base

    hooks = _hooks()
    keys = set(hooks.flatten(base.get_config()))
    fields = {f.key: f for f in hooks.config_fields()}
    assert set(fields) == keys, f"undocumented: {keys - set(fields)}; unknown: {set(fields) - keys}"
    sources = "".join((ROOT / p).read_text() for p in ("configs/base.py", "mistral_jax/config.py",
                                                         "mistral_jax/training/recipe.py"))  # recipes' own blocks
    flat_sources = " ".join(re.sub(r"\s*#\s*", " ", sources).split())
    for f in fields.values():
        assert f.comment, f"config.{f.key} has no comment in configs/base.py"
        assert " ".join(f.comment.split()) in flat_sources, (f.key, f.comment)
    page = hooks.config_reference_markdown()
    for key, f in fields.items():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"config.{key} is not in the generated reference"
        assert hooks._cell(f.comment) in row, (key, row)
    # the page that shows it is the generated one, not a committed copy
    assert "<!-- generated: config-reference -->" in (DOCS / "configuration.md").read_text()


def test_config_comment_parser():
    """The comment of a field: on its line, else the comment block right above it; none is an empty string."""
    source = '''
def get_config():
    c = ConfigDict()
    c.a = 1  # the a field
    # the b field,
    # over two lines
    c.b = 2
    c.x = ConfigDict()

    c.x.c = 3
    c.x.d = (
        4)  # d, at the end of its statement
    return c
'''
    got = _hooks()._function_fields(source, "get_config", "c")
    assert got == {"a": "the a field", "b": "the b field, over two lines", "x": "", "x.c": "",
                   "x.d": "d, at the end of its statement"}


def test_config_reference_fails_on_an_undocumented_field(monkeypatch):
    """Adding a field to get_config() without a comment breaks the docs build (the generator raises)."""
    from configs import base

    hooks = _hooks()
    original = base.get_config

    def with_new_field():
        c = original()
        c.brand_new_field = 1
        return c

    monkeypatch.setattr(base, "get_config", with_new_field)
    with pytest.raises(ValueError, match="brand_new_field"):
        hooks.config_fields()


def test_presets_and_error_messages_are_generated():
    hooks = _hooks()
    presets = hooks.config_presets_markdown()
    for path in (ROOT / "configs").glob("*.py"):
        if path.name != "__init__.py":
            assert f"`configs/{path.name}`" in presets, path.name
    messages = hooks.error_messages()
    # a message of each kind the tools raise: a flag (UsageError), a run config (ConfigError), a model field
    kinds = {m.kind for m in messages}
    assert {"UsageError", "ConfigError", "ValueError"} <= kinds, kinds
    assert any("config.init_from" in m.text and "Fix:" in m.text for m in messages)
    tools = {m.tool for m in messages}
    assert {"train.py", "eval.py", "serve", "generate", "convert and export", "aot"} <= tools, tools


# ------------------------------------------------------------------------------------------------ the site
@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    missing = [m for m in ("mkdocs", "material", "mkdocstrings_handlers.python") if not _has(m)]
    if missing:
        pytest.skip(f"the docs extra is not installed (no {missing}). Fix: pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    html = (site / "configuration" / "index.html").read_text()
    assert "data.seq_len" in html and "<!-- generated" not in html
    api = (site / "api" / "index.html").read_text()
    import mistral_jax

    for name in mistral_jax.__all__:  # every public name has its entry in the API reference
        obj = getattr(mistral_jax, name)
        ids = {f'id="mistral_jax.{name}"', f'id="{obj.__module__}.{obj.__qualname__}"'}
        assert any(i in api for i in ids), f"mj.{name} is not in the API reference (looked for {ids})"


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# ------------------------------------------------------------------------------------------------ the quick start
IGNORED = shutil.ignore_patterns(".git", ".venv*", ".ci-venv*", "runs", "site", "workdir*", "build", "dist",
                                 "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache")


def _quick_start_commands() -> list[str]:
    """The commands of the README's shell blocks marked ``<!-- test: run -->``, in order, comments dropped."""
    blocks = re.findall(r"<!-- test: run -->\s*```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_quick_start_starts_with_make_demo_and_uses_its_workdir():
    commands = _quick_start_commands()
    assert commands[0] == "make demo", commands
    assert len(commands) >= 6, commands
    # every later command reads what `make demo` writes (runs/demo), as scripts/demo.sh says it does
    assert 'WORKDIR=${WORKDIR:-runs/demo}' in (ROOT / "scripts" / "demo.sh").read_text()
    for cmd in commands[1:]:
        assert "runs/demo" in cmd and "runs/tiny" not in cmd, cmd


@pytest.mark.slow
def test_readme_quick_start_runs_in_order(tmp_path):
    """A newcomer's session: `make demo`, then each command of the README's next-steps block, in a fresh copy.

    `make demo` is `make install` (pip) followed by the demo recipe; the test environment is installed already, so
    the recipe runs without the install (the Makefile is checked to say so).
    """
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo: install.*\n\t(.+)$", makefile, flags=re.M)
    assert recipe and recipe.group(1).strip() == "PYTHON=$(PYTHON) bash scripts/demo.sh", makefile
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=IGNORED)
    bin_dir = os.path.dirname(sys.executable)  # the virtualenv's python and console scripts (mistral-jax-*)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
    env.update(PYTHONPATH=str(repo), PATH=bin_dir + os.pathsep + env.get("PATH", ""), PYTHON=sys.executable,
               JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for cmd in _quick_start_commands():
        run = "PYTHON=$PYTHON bash scripts/demo.sh" if cmd == "make demo" else cmd
        proc = subprocess.run(run, shell=True, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    runs = repo / "runs"
    assert (runs / "demo" / "checkpoints" / "300").is_dir() and (runs / "demo-hf" / "config.json").is_file()
    assert (runs / "demo_sft" / "checkpoints" / "150").is_dir() and (runs / "demo_dpo" / "checkpoints" / "30").is_dir()
    assert list((runs / "demo_sft-mistral").glob("consolidated*.safetensors")), list(runs.iterdir())
