"""Reward functions of RL recipes: plain Python callables ``(prompt, completion, example) -> float``.

``prompt`` is the prompt text, ``completion`` the sampled answer text, ``example`` the data record the prompt came
from (GSM8K layout ``{"question", "answer"}`` for ``data.arithmetic``). A run names its rewards by import path
(``"mistral_jax.training.rewards:exact_answer,mistral_jax.training.rewards:format_reward"``); ``resolve`` imports
and checks them once, and ``score`` calls them per completion, refusing anything but a finite number. A reward's
name is its function's ``__name__`` (the metrics ``rewards/<name>/mean``).

Built in:

- ``exact_answer``: 1.0 when the completion's final answer (``parse_answer``) equals the record's reference
  answer (``data.arithmetic.example_answer``), else 0.0.
- ``format_reward``: 1.0 when the completion ends with a ``#### <number>`` line, 0.5 when it has one elsewhere,
  else 0.0.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mistral_jax.data import arithmetic

Reward = Callable[[str, str, Mapping[str, Any]], float]

_FINAL_LINE = re.compile(r"\s*####\s*" + arithmetic.NUMBER_PATTERN + r"\s*\.?\s*")
_FINAL_ANYWHERE = re.compile(r"####\s*" + arithmetic.NUMBER_PATTERN)
_BOXED = "\\boxed{"


class RewardError(ValueError):
    """A reward function that raised or returned something other than a finite number (one line, with the fix)."""


# ----------------------------------------------------------------------------------------------- answers
def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` of ``text`` (nested braces matched), or None."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # never closed


def parse_answer(text: str) -> str | None:
    """The final answer of ``text``, normalised; None when there is none.

    The number right after the last ``####`` (GSM8K), else the content of the last ``\\boxed{...}``. Numbers are
    normalised with ``data.arithmetic.normalize_number`` (spaces, ``$``, ``,`` separators and a trailing ``.``
    dropped; ``"7.0"`` == ``"7"``; signs kept); a boxed answer that is not a number is returned without spaces,
    ``$`` and a trailing ``.``.
    """
    if not isinstance(text, str):
        return None
    hashed = arithmetic.final_answer(text)
    if hashed is not None:
        return hashed
    boxed = _last_boxed(text)
    if boxed is None:
        return None
    number = arithmetic.normalize_number(boxed)
    if number is not None:
        return number
    return re.sub(r"[\s$]", "", boxed).rstrip(".") or None


def exact_answer(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
    """1.0 when ``parse_answer(completion)`` equals the record's reference answer, else 0.0.

    The reference is ``data.arithmetic.example_answer(example)``: the number after the last ``####`` of
    ``example["answer"]``, or an ``answer`` that is a bare number.

    Raises:
      ValueError: the record has no reference answer (``score`` reports it as a ``RewardError``).
    """
    want = arithmetic.example_answer(example)
    if want is None:
        got = example.get("answer") if isinstance(example, Mapping) else example
        raise ValueError(f"the example has no reference answer (answer={got!r:.100}). Fix: give each record an "
                         "'answer' ending with '#### <number>' (GSM8K) or holding a bare number.")
    return 1.0 if parse_answer(completion) == want else 0.0


def format_reward(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
    """How well the completion keeps GSM8K's answer format, whatever the answer.

    1.0 when its last non-empty line is ``#### <number>`` (nothing else on the line but spaces and a final ``.``);
    0.5 when ``#### <number>`` occurs elsewhere (e.g. followed by more text); 0.0 otherwise.
    """
    lines = [line for line in completion.splitlines() if line.strip()]
    if lines and _FINAL_LINE.fullmatch(lines[-1]):
        return 1.0
    return 0.5 if _FINAL_ANYWHERE.search(completion) else 0.0


# ----------------------------------------------------------------------------------------------- resolving
def _resolve_one(path: str) -> tuple[str, Reward]:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr or not re.fullmatch(r"[\w.]+", module_name) or not attr.isidentifier():
        raise ValueError(f"reward {path!r} is not an import path. Fix: name it 'package.module:function', e.g. "
                         "'mistral_jax.training.rewards:exact_answer'.")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises while it runs
        raise ValueError(f"reward {path!r}: module {module_name!r} does not import ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}). Fix: check the module name, and that it is installed "
                         "or on PYTHONPATH.") from e
    if not hasattr(module, attr):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:8]
        raise ValueError(f"reward {path!r}: module {module_name!r} has no attribute {attr!r} (callables there "
                         f"include {found}). Fix: check the function's name.")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(f"reward {path!r} is a {type(fn).__name__} ({fn!r:.60}), not a callable. Fix: name a "
                         "function (prompt: str, completion: str, example: dict) -> float.")
    return getattr(fn, "__name__", attr), fn


def resolve(paths: str | Sequence[str | Reward]) -> list[tuple[str, Reward]]:
    """Import and check reward functions: ``[(name, function), ...]`` in the order given.

    Args:
      paths: a comma-separated string or a list of import paths, each ``"package.module:function"`` or
        ``"package.module.function"``; a list may also hold the functions themselves.

    Returns:
      ``(name, function)`` pairs; the name is the function's ``__name__`` (metrics ``rewards/<name>/mean``).

    Raises:
      ValueError: no rewards, a path that is not one, a module that does not import, a missing attribute, a
        non-callable, or two rewards of the same name; one line naming the path, with the fix.
    """
    items = paths.split(",") if isinstance(paths, str) else list(paths)
    items = [p.strip() if isinstance(p, str) else p for p in items]
    items = [p for p in items if not isinstance(p, str) or p]
    if not items:
        raise ValueError(f"no reward functions given (rewards={paths!r}). Fix: name them as 'package.module:function', "
                         "comma-separated, e.g. 'mistral_jax.training.rewards:exact_answer'.")
    out: list[tuple[str, Reward]] = []
    where: dict[str, str] = {}
    for item in items:
        if isinstance(item, str):
            name, fn = _resolve_one(item)
        elif callable(item):
            name, fn = getattr(item, "__name__", type(item).__name__), item
        else:
            raise ValueError(f"reward {item!r:.60} is a {type(item).__name__}, not an import path or a callable. "
                             "Fix: pass 'package.module:function' strings or the functions themselves.")
        label = item if isinstance(item, str) else repr(fn)
        if name in where:
            raise ValueError(f"rewards {where[name]!r} and {label!r} share the name {name!r} (the metric "
                             f"rewards/{name}/mean). Fix: list each reward once, or rename one of the functions.")
        where[name] = label
        out.append((name, fn))
    return out


# ----------------------------------------------------------------------------------------------- scoring
def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def score(rewards: Sequence[tuple[str, Reward]], prompt: str, completion: str, example: Mapping[str, Any],
          index: int) -> list[float]:
    """Each reward of one completion, in the order of ``rewards`` (``resolve``'s pairs).

    Args:
      rewards: ``(name, function)`` pairs.
      prompt, completion, example: what each reward function is called with.
      index: the example's index (named in errors).

    Raises:
      RewardError: a reward raised, or returned something other than a finite int / float (numpy scalars count;
        ``bool``, ``None``, NaN and infinities do not); one line naming the reward and the example, with the fix.
    """
    out = []
    for name, fn in rewards:
        try:
            value = fn(prompt, completion, example)
        except Exception as e:  # any error of user code: name the reward and the example
            raise RewardError(f"reward {name!r} raised on example {index}: {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]}. Fix: make {name} handle this example (or fix the "
                              "data), returning a float for every (prompt, completion, example).") from e
        if not _is_number(value):
            raise RewardError(f"reward {name!r} returned {value!r:.80} ({type(value).__name__}) on example {index}, "
                              f"not a finite number. Fix: make {name} return a float (e.g. 0.0 when it cannot "
                              "score the completion).")
        out.append(float(value))
    return out
