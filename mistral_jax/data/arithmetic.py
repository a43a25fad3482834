"""Arithmetic word problems: the bundled offline task of RL recipes, in GSM8K's record layout.

A record is ``{"question": str, "answer": str}``; the answer is a short worked solution whose last line is
``#### <number>`` (GSM8K's convention)::

    {"question": "Tom has 3 apples and buys 4 more. How many now?", "answer": "3 + 4 = 7.\\n#### 7"}

The problems are easy and short on purpose: one addition or subtraction of operands 1..9 with a non-negative
result, in two templates with names and objects, 11 words a question: the demo model (2 layers, a 16-token window)
learns their answer format and a little of their arithmetic (12.5 % exact after SFT, 2-5 % with longer word
problems); GSM8K's own problems are for real models. They are deterministic from a seed (``make_problems``). The
bundled splits (``bundled_records``) are disjoint by construction: a question belongs to the held-out split when a
hash of its text falls in one bucket of ten, so no question of ``"validation"`` / ``"test"`` can appear in
``"train"``.

``load_records`` reads this task or any data of the same layout (``.jsonl`` / ``.json`` files, local or in a bucket,
or an HF hub dataset such as ``openai/gsm8k`` with ``hub_config="main"``). ``example_answer`` is the reference
answer of a record, normalised as ``training.rewards.parse_answer`` normalises a completion's answer.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
import re
from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import Any

from mistral_jax.data import files

TRAIN_SIZE = 2000
HELD_OUT_SIZE = 200
HELD_OUT_BUCKETS = 10  # a question is held out when the hash of its text is 0 modulo this
MAX_OPERAND = 9

# A number as written in an answer: an optional sign and "$", digits with optional "," thousands separators and an
# optional decimal part ("-$1,234.50"). ``normalize_number`` turns a match into the canonical form.
NUMBER_PATTERN = r"[-+]?\s*\$?\s*[-+]?\d[\d,]*(?:\.\d+)?"
_FINAL = re.compile(r"\s*(" + NUMBER_PATTERN + ")")


@dataclasses.dataclass(frozen=True)
class Template:
    """A problem template: the operation, the question and the worked line (``{a} {op} {b} = {r}`` inside)."""

    op: str  # "+" or "-"
    question: str
    solution: str


TEMPLATES = (
    Template("+", "{name} has {a} {obj_a} and buys {b} more. How many now?", "{a} + {b} = {r}."),
    Template("-", "{name} has {a} {obj_a} and gives away {b}. How many left?", "{a} - {b} = {r}."),
)
NAMES = ("Tom", "Anna", "Sam", "Mia", "Ben", "Lily", "Max", "Emma", "Leo", "Zoe", "Jack", "Nora")
OBJECTS = (("apple", "apples"), ("pen", "pens"), ("book", "books"), ("coin", "coins"), ("card", "cards"),
           ("marble", "marbles"), ("sticker", "stickers"), ("cookie", "cookies"), ("shell", "shells"),
           ("ball", "balls"))


def _problem(rng: random.Random) -> dict[str, str]:
    t = rng.choice(TEMPLATES)
    name, other = rng.sample(NAMES, 2)
    one, many = rng.choice(OBJECTS)
    a = rng.randint(1, MAX_OPERAND)
    b = rng.randint(1, MAX_OPERAND) if t.op == "+" else rng.randint(1, a)  # a subtraction never goes below 0
    r = a + b if t.op == "+" else a - b
    words = dict(name=name, other=other, a=a, b=b, r=r, obj=many, obj_a=one if a == 1 else many,
                 obj_b=one if b == 1 else many, obj_r=one if r == 1 else many)
    return {"question": t.question.format(**words), "answer": f"{t.solution.format(**words)}\n#### {r}"}


def make_problems(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` problems drawn with ``seed`` (the same arguments give the same list; either split's questions may occur).

    Raises:
      ValueError: a negative ``n``.
    """
    if n < 0:
        raise ValueError(f"make_problems(n={n}): n is negative. Fix: ask for n >= 0 problems.")
    rng = random.Random(seed)
    return [_problem(rng) for _ in range(n)]


def is_held_out(question: str) -> bool:
    """Whether ``question`` belongs to the held-out split (a hash of its text; stable across runs and machines)."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_BUCKETS == 0


@functools.lru_cache(maxsize=2)
def _split(held_out: bool) -> tuple[tuple[str, str], ...]:
    rng = random.Random(1 if held_out else 0)
    size = HELD_OUT_SIZE if held_out else TRAIN_SIZE
    seen: dict[str, str] = {}  # question -> answer, in order: distinct questions only
    while len(seen) < size:
        p = _problem(rng)
        if is_held_out(p["question"]) == held_out:
            seen.setdefault(p["question"], p["answer"])
    return tuple(seen.items())


def bundled_records(split: str) -> list[dict[str, str]]:
    """The bundled split: ``"train"`` (2000 distinct problems) or a split starting with ``val`` / ``test`` (200
    distinct held-out problems, none of whose questions is in ``"train"``).

    Raises:
      ValueError: another split name.
    """
    if split.startswith(("val", "test")):
        return [{"question": q, "answer": a} for q, a in _split(True)]
    if split == "train":
        return [{"question": q, "answer": a} for q, a in _split(False)]
    raise ValueError(f"the bundled arithmetic task has no split {split!r}. Fix: use 'train', or a split starting "
                     "with 'val' or 'test' (the held-out problems).")


def load_records(source: str, split: str = "train", hub_config: str = "") -> Iterator[dict[str, Any]]:
    """Yield prompt records (GSM8K layout) from the bundled task, ``.jsonl`` / ``.json`` files or a hub dataset.

    Args:
      source: ``"bundled"`` (this module's generated task), a file, a directory of ``.json*`` files, a glob (local
        or ``gs://`` / ``s3://``), or an HF hub dataset name (``openai/gsm8k``), streamed.
      split: the hub split; for ``"bundled"``, ``"train"`` or a split starting with ``val`` / ``test``.
      hub_config: the hub dataset configuration name (``"main"`` for ``openai/gsm8k``).

    Raises:
      ValueError: an unknown bundled split.
      FileNotFoundError, storage.StorageError, RuntimeError: as ``files.load_records`` (a missing path, a bucket
        that fails, a hub dataset that cannot be streamed, e.g. offline), each one line with the fix.
    """
    if source == "bundled":
        yield from bundled_records(split)
        return
    yield from files.load_records(source, split, hub_config, what="prompt data")


# ----------------------------------------------------------------------------------------------- answers
def normalize_number(text: str) -> str | None:
    """The canonical form of a number written as text, or None if ``text`` is not one.

    Spaces, ``$`` and ``,`` (thousands separators) are dropped, as is a trailing ``.``; the value is written
    without trailing zeros (``"7.0"`` and ``"7"`` give ``"7"``, ``"-$1,234.50"`` gives ``"-1234.5"``).
    """
    t = re.sub(r"[\s$,]", "", text).rstrip(".")
    if not re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)", t):
        return None
    v = Decimal(t)
    if v == v.to_integral_value():
        return str(int(v))
    return format(v.normalize(), "f")


def final_answer(text: str) -> str | None:
    """The normalised number right after the last ``####`` of ``text`` (GSM8K), or None when there is none."""
    if "####" not in text:
        return None
    m = _FINAL.match(text.rsplit("####", 1)[1])
    return normalize_number(m.group(1)) if m else None


def example_answer(example: Mapping[str, Any]) -> str | None:
    """The reference answer of a record: the number after the last ``####`` of its ``answer`` (GSM8K), or an
    ``answer`` that is a bare number (``7``, ``"7"``), normalised with ``normalize_number``; None when there is none.
    """
    answer = example.get("answer") if isinstance(example, Mapping) else None
    if answer is None or isinstance(answer, bool):
        return None
    if isinstance(answer, (int, float)):
        answer = str(answer)
    if not isinstance(answer, str):
        return None
    return final_answer(answer) if "####" in answer else normalize_number(answer)
