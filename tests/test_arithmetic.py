"""The bundled arithmetic task (``data.arithmetic``): determinism, the splits, GSM8K's layout, loading."""

from __future__ import annotations

import json
import re

import pytest

from mistral_jax.data import arithmetic
from mistral_jax.training.rewards import parse_answer

SUBTRACT = re.compile(r"gives away|takes|lost|How many more")
ADD = re.compile(r"buys|puts in|together|gave")


def _expected(question: str) -> int:
    """The answer of a question, read from its own text: its two numbers and the operation its words name."""
    a, b = (int(n) for n in re.findall(r"\d+", question))
    if SUBTRACT.search(question):
        return a - b
    assert ADD.search(question), question
    return a + b


def test_problems_are_deterministic_from_the_seed():
    assert arithmetic.make_problems(50, seed=3) == arithmetic.make_problems(50, seed=3)
    assert arithmetic.make_problems(50, seed=3) != arithmetic.make_problems(50, seed=4)
    assert arithmetic.make_problems(0, seed=3) == []
    with pytest.raises(ValueError, match=r"n=-1.*Fix"):
        arithmetic.make_problems(-1, seed=0)


def test_bundled_splits_have_their_sizes_and_are_disjoint():
    train = arithmetic.bundled_records("train")
    val, test = arithmetic.bundled_records("validation"), arithmetic.bundled_records("test")
    assert len(train) == 2000 and len(val) == 200
    assert val == test == arithmetic.bundled_records("val")
    train_q, val_q = {r["question"] for r in train}, {r["question"] for r in val}
    assert len(train_q) == 2000 and len(val_q) == 200  # distinct questions within each split
    assert not train_q & val_q
    assert not any(map(arithmetic.is_held_out, train_q)) and all(map(arithmetic.is_held_out, val_q))
    assert train == arithmetic.bundled_records("train")  # the same on every call
    with pytest.raises(ValueError, match=r"no split 'dev'.*Fix"):
        arithmetic.bundled_records("dev")


def test_the_held_out_bucket_is_a_tenth_of_questions():
    qs = {p["question"] for p in arithmetic.make_problems(5000, seed=7)}
    share = sum(map(arithmetic.is_held_out, qs)) / len(qs)
    assert 0.07 < share < 0.13, share


@pytest.mark.parametrize("split", ["train", "validation"])
def test_every_bundled_answer_is_gsm8k_and_right(split):
    records = arithmetic.bundled_records(split)
    ops = set()
    for r in records:
        assert set(r) == {"question", "answer"}
        q, answer = r["question"], r["answer"]
        assert 10 <= len(q.split()) <= 20, q
        want = _expected(q)
        a, b = (int(n) for n in re.findall(r"\d+", q))
        assert 0 <= a <= 20 and 0 <= b <= 20 and want >= 0, q
        lines = answer.split("\n")
        assert lines[-1] == f"#### {want}", (q, answer)
        assert parse_answer(answer) == str(want) == arithmetic.example_answer(r)
        worked = re.search(r"(\d+) ([+-]) (\d+) = (\d+)", lines[0])
        assert worked, answer
        assert eval(f"{worked[1]} {worked[2]} {worked[3]}") == int(worked[4]) == want  # noqa: S307 (digits only)
        assert (int(worked[1]), int(worked[3])) == (a, b)
        ops.add(worked[2])
    assert ops == {"+", "-"}


def test_load_records_bundled_and_files(tmp_path):
    assert list(arithmetic.load_records("bundled")) == arithmetic.bundled_records("train")
    assert list(arithmetic.load_records("bundled", "test")) == arithmetic.bundled_records("test")
    rows = arithmetic.make_problems(5, seed=1) + [{"question": "What is 2 + 2?", "answer": "4"}]
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert list(arithmetic.load_records(str(path))) == rows
    (tmp_path / "more.json").write_text(json.dumps(rows[:2]))
    assert list(arithmetic.load_records(str(tmp_path))) == rows + rows[:2]  # a directory: sorted by name
    assert list(arithmetic.load_records(str(tmp_path / "*.json"))) == rows[:2]
    with pytest.raises(FileNotFoundError, match=r"prompt data '.*missing.jsonl' does not exist\. Fix: "):
        next(arithmetic.load_records(str(tmp_path / "missing.jsonl")))


def test_load_records_from_the_hub_fails_offline_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError) as err:
        next(arithmetic.load_records("no-such-owner-xyz/no-such-dataset-xyz", "train", hub_config="main"))
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert msg.startswith("cannot stream the hub dataset 'no-such-owner-xyz/no-such-dataset-xyz' (config 'main', "
                          "split 'train')"), msg
    assert "Fix: unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE" in msg and "'bundled'" in msg, msg


@pytest.mark.parametrize("answer, want", [
    ("Tom has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("a #### 3 then\n#### -5", "-5"),
    ("#### 7.0", "7"),
    (7, "7"),
    ("12", "12"),
    (2.5, "2.5"),
    ("no number here", None),
    (None, None),
    (True, None),
])
def test_example_answer(answer, want):
    assert arithmetic.example_answer({"question": "q", "answer": answer}) == want
    assert arithmetic.example_answer({"question": "q"}) is None


def test_normalize_number():
    n = arithmetic.normalize_number
    assert n(" $1,234.50 ") == "1234.5" and n("7.") == "7" and n("-0.0") == "0" and n("+3") == "3"
    assert n("-$12") == "-12" and n(".5") == "0.5" and n("007") == "7"
    assert n("7 apples") is None and n("") is None and n("1e5") is None
