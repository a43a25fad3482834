"""MkDocs hook: pages generated from the code at build time, so they cannot go stale.

A page holds a marker line and the hook replaces it with Markdown built from the source tree:

- ``<!-- generated: config-reference -->``: every field of ``configs/base.py``'s ``get_config()`` with its
  default and its one-line comment, and every ``ModelConfig`` field (``config.model.<field>``) with its comment.
  A field without a comment fails the build (the config's rule: one comment per field).
- ``<!-- generated: config-presets -->``: the config files under ``configs/`` with the first line of their
  docstring, and the ``ModelConfig`` presets.
- ``<!-- generated: error-messages -->``: every error message raised with a literal text in the package and the
  entry points, grouped by the tool that shows it, with its fix.

``tests/test_docs.py`` imports this file to check the reference against ``get_config()``'s flattened keys.
"""

from __future__ import annotations

import ast
import dataclasses
import html
import inspect
import io
import re
import sys
import textwrap
import tokenize
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent


def _importable() -> None:
    """Put the repository first on sys.path (mkdocs restores sys.path after loading a hook, so this runs per use)."""
    if not sys.path or sys.path[0] != str(ROOT):
        sys.path.insert(0, str(ROOT))

MARKER = "<!-- generated: {} -->"


# ----------------------------------------------------------------------------------------- source comments
def _comments(source: str) -> dict[int, str]:
    """Line number -> text of the comment on that line (without ``#``)."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _field_comment(lines: list[str], comments: dict[int, str], start: int, end: int) -> str:
    """The comment of an assignment spanning lines ``start..end``: its trailing comment, else the block of
    comment-only lines right above it."""
    for ln in range(end, start - 1, -1):
        if ln in comments and not lines[ln - 1].lstrip().startswith("#"):
            return comments[ln]
    block = []
    ln = start - 1
    while ln >= 1 and lines[ln - 1].lstrip().startswith("#"):
        block.insert(0, comments[ln])
        ln -= 1
    return " ".join(block)


def _attr_path(node: ast.expr, root: str) -> str | None:
    """``c.data.train`` -> ``"data.train"`` when the chain starts at the name ``root``."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.insert(0, node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == root and parts:
        return ".".join(parts)
    return None


def _function_fields(source: str, func: str, root: str) -> dict[str, str]:
    """Every ``root.a.b = ...`` assignment in function ``func`` of ``source`` -> its comment."""
    tree = ast.parse(source)
    lines, comments = source.splitlines(), _comments(source)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func)
    out = {}
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                key = _attr_path(target, root)
                if key is not None:
                    out[key] = _field_comment(lines, comments, node.lineno, node.end_lineno or node.lineno)
    return out


def _class_fields(source: str, cls: str) -> dict[str, str]:
    """Every annotated field of class ``cls`` in ``source`` -> its comment."""
    tree = ast.parse(source)
    lines, comments = source.splitlines(), _comments(source)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls)
    return {
        s.target.id: _field_comment(lines, comments, s.lineno, s.end_lineno or s.lineno)
        for s in node.body
        if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
    }


# ----------------------------------------------------------------------------------------- config reference
def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """A ConfigDict's leaves as ``{"a.b": value}``."""
    out = {}
    for k in cfg.keys():
        v = cfg[k]
        if hasattr(v, "keys") and hasattr(v, "to_dict"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Field(NamedTuple):
    key: str  # dotted key under ``config``
    default: Any  # the value get_config() gives it (None for a model override: the preset's value)
    comment: str  # the field's one-line comment in the source


def recipe_block_comments() -> dict[str, str]:
    """``{"<recipe>.<field>": comment}`` for the config block each registered recipe declares in its
    ``config_defaults`` (``configs/base.py`` adds those blocks; their comments live with the recipe)."""
    _importable()
    from mistral_jax.training import recipe

    out = {}
    for name, cls in recipe.RECIPES.items():
        if cls.config_defaults() is None:
            continue
        source = textwrap.dedent(inspect.getsource(cls.config_defaults.__func__))
        block = re.search(r"^\s*(\w+)\s*=\s*(?:ml_collections\.)?ConfigDict\(", source, re.M)  # the block's name
        fields = _function_fields(source, "config_defaults", block.group(1) if block else "b")
        out.update({f"{name}.{k}": v for k, v in fields.items()})
    return out


def config_fields() -> list[Field]:
    """Every leaf of ``configs/base.py``'s ``get_config()``, in its order, with its comment.

    ``config.model`` is built by ``model_fields()``: its ``preset`` and one override per ``ModelConfig`` field,
    whose comment is the field's comment in ``mistral_jax/config.py``.

    Raises:
        ValueError: a leaf of ``get_config()`` has no comment in the source.
    """
    _importable()
    from configs import base
    from mistral_jax.config import ModelConfig

    base_src = (ROOT / "configs" / "base.py").read_text()
    comments = _function_fields(base_src, "get_config", "c")
    comments.update({f"model.{k}": v for k, v in _function_fields(base_src, "model_fields", "m").items()})
    model_comments = _class_fields((ROOT / "mistral_jax" / "config.py").read_text(), "ModelConfig")
    comments.update(recipe_block_comments())
    for f in dataclasses.fields(ModelConfig):
        comments.setdefault(f"model.{f.name}", model_comments.get(f.name, ""))
    fields = [Field(k, v, comments.get(k, "")) for k, v in flatten(base.get_config()).items()]
    missing = [f.key for f in fields if not f.comment]
    if missing:
        raise ValueError(f"configs/base.py: fields without a comment: {missing}. Fix: give each field a one-line "
                         "comment on its line (or a comment block right above it).")
    return fields


def _cell(text: str) -> str:
    """Plain text shown as is in a Markdown table cell: no links, emphasis, HTML or column breaks."""
    text = html.escape(" ".join(text.split()), quote=False)
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", text)


def _default(value: Any) -> str:
    return "*(preset)*" if value is None else f"`{value!r}`".replace("|", "\\|")


def config_reference_markdown() -> str:
    _importable()
    from mistral_jax.config import ModelConfig

    fields = config_fields()
    groups: dict[str, list[Field]] = {}
    for f in fields:
        group = f.key.split(".")[0] if "." in f.key else ""
        groups.setdefault(group, []).append(f)
    out = [f"{len(fields)} fields, read from `configs/base.py` and `mistral_jax/config.py` when this site was built.",
           ""]
    order = [""] + [g for g in groups if g]
    for g in order:
        out += [f"### `config.{g}`" if g else "### Top level", "", "| field | default | meaning |", "|---|---|---|"]
        for f in groups[g]:
            out.append(f"| `{f.key}` | {_default(f.default)} | {_cell(f.comment)} |")
        out.append("")
    defaults = ModelConfig()
    out += ["### `ModelConfig` defaults", "",
            "`config.model.<field>` left at `None` keeps the preset's value. The dataclass defaults "
            "(Mistral 7B v0.1's architecture) are:", "",
            "| field | dataclass default | runtime field |", "|---|---|---|"]
    runtime = set(ModelConfig.runtime_fields())
    for f in dataclasses.fields(ModelConfig):
        out.append(f"| `{f.name}` | {_default(getattr(defaults, f.name))} | {'yes' if f.name in runtime else ''} |")
    return "\n".join(out) + "\n"


def _presets() -> list[str]:
    """``ModelConfig`` classmethods that take no argument and return a config: the model presets."""
    _importable()
    from mistral_jax.config import ModelConfig

    tree = ast.parse((ROOT / "mistral_jax" / "config.py").read_text())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "ModelConfig")
    names = []
    for fn in cls.body:
        if (isinstance(fn, ast.FunctionDef) and not fn.name.startswith("_")
                and any(isinstance(d, ast.Name) and d.id == "classmethod" for d in fn.decorator_list)
                and len(fn.args.args) == 1 and not fn.args.kwonlyargs and not fn.args.vararg):
            try:
                if isinstance(getattr(ModelConfig, fn.name)(), ModelConfig):
                    names.append(fn.name)
            except Exception:  # a classmethod that needs arguments is not a preset
                continue
    return names


def config_presets_markdown() -> str:
    out = ["| config file | what it is |", "|---|---|"]
    for path in sorted((ROOT / "configs").glob("*.py")):
        if path.name == "__init__.py":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        first = doc.strip().split("\n\n")[0].replace("\n", " ")
        out.append(f"| `configs/{path.name}` | {_cell(first)} |")
    out += ["", "Model presets (`config.model.preset`, or `mj.ModelConfig.<name>()` in Python): "
            + ", ".join(f"`{p}`" for p in _presets()) + "."]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------- error messages
# Which tool shows the errors of a source file (first matching prefix wins).
TOOLS = [
    ("mistral_jax/cli/train", "train.py"), ("train.py", "train.py"), ("mistral_jax/training/", "train.py"),
    ("mistral_jax/data/", "train.py (data and tokenizers)"), ("mistral_jax/lora", "LoRA (train.py, mistral-jax-lora)"),
    ("mistral_jax/cli/lora", "LoRA (train.py, mistral-jax-lora)"),
    ("eval.py", "eval.py"), ("mistral_jax/evals/", "eval.py"),
    ("mistral_jax/cli/serve", "serve"), ("mistral_jax/serve/", "serve"),
    ("mistral_jax/cli/generate", "generate"), ("mistral_jax/inference/", "generate"),
    ("mistral_jax/cli/convert", "convert and export"), ("mistral_jax/cli/export", "convert and export"),
    ("mistral_jax/convert/", "convert and export"), ("mistral_jax/export", "convert and export"),
    ("mistral_jax/loading", "loading checkpoints (every tool)"),
    ("mistral_jax/cli/aot", "aot"), ("mistral_jax/aot/", "aot"),
    ("mistral_jax/sharding", "meshes and sharding (every tool)"), ("mistral_jax/distributed", "multi-host start-up"),
    ("mistral_jax/config", "model config (every tool)"), ("mistral_jax/model/", "model (every tool)"),
    ("mistral_jax/", "every tool"),
]


def _render(node: ast.expr) -> str | None:
    """The text of a message expression, ``{expression}`` where values are filled in; None if not literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.Constant):
                parts.append(str(v.value))
            else:
                parts.append("{" + ast.unparse(v.value) + "}")
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _render(node.left), _render(node.right)
        if left is None and right is None:
            return None
        return (left if left is not None else "{" + ast.unparse(node.left) + "}") + (
            right if right is not None else "{" + ast.unparse(node.right) + "}")
    return None


def _message(call: ast.Call) -> str | None:
    name = ast.unparse(call.func).split(".")[-1]
    args = call.args
    if name == "UsageError" and len(args) == 4:  # cli.UsageError(flag, value, problem, fix)
        flag, problem, fix = (_render(a) or "{" + ast.unparse(a) + "}" for a in (args[0], args[2], args[3]))
        return f"{flag}={{{ast.unparse(args[1])}}} {problem}. Fix: {fix}"
    texts = [_render(a) for a in args]
    if not any(t is not None for t in texts):
        return None
    return " … ".join(t for t in texts if t is not None)


class ErrorMessage(NamedTuple):
    tool: str
    where: str  # path:line
    kind: str  # the exception (or ``fail`` for a one-line exit)
    text: str


def error_messages() -> list[ErrorMessage]:
    """Every ``raise X(<literal message>)`` and ``cli.fail(prog, <literal message>)`` in the package and the
    entry points."""
    files = sorted((ROOT / "mistral_jax").rglob("*.py")) + [ROOT / "train.py", ROOT / "eval.py"]
    out = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        tool = next(t for prefix, t in TOOLS if rel.startswith(prefix))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                call, kind = node.exc, ast.unparse(node.exc.func).split(".")[-1]
            elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("fail", "cli.fail") and len(node.args) > 1:
                call, kind = ast.Call(func=node.func, args=node.args[1:2], keywords=[]), "exit"
            else:
                continue
            text = _message(call)
            if text and len(text) > 12:
                out.append(ErrorMessage(tool, f"{rel}:{node.lineno}", kind, " ".join(text.split())))
    return sorted(out, key=lambda m: (m.where.split(":")[0], int(m.where.split(":")[1])))


def error_messages_markdown() -> str:
    msgs = error_messages()
    by_tool: dict[str, list[ErrorMessage]] = {}
    for m in msgs:
        by_tool.setdefault(m.tool, []).append(m)
    out = [f"{len(msgs)} messages, read from the source when this site was built. `{{...}}` is filled in with "
           "the actual value.", ""]
    for tool in sorted(by_tool):
        out += [f"### {tool}", "", "| message | fix | raised as | where |", "|---|---|---|---|"]
        for m in by_tool[tool]:
            problem, _, fix = m.text.partition("Fix:")
            if not fix and "fix:" in problem.lower():
                problem, fix = re.split(r"(?i)\bfix:", problem, maxsplit=1)
            out.append(f"| {_cell(problem.strip())} | {_cell(fix.strip())} | `{m.kind}` | `{m.where}` |")
        out.append("")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------- the hook
GENERATORS = {
    "config-reference": config_reference_markdown,
    "config-presets": config_presets_markdown,
    "error-messages": error_messages_markdown,
}


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """MkDocs event: replace each generator's marker in a page with its output."""
    for name, gen in GENERATORS.items():
        marker = MARKER.format(name)
        if marker in markdown:
            markdown = markdown.replace(marker, gen())
    return markdown
