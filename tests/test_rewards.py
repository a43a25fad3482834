"""Reward functions (``training.rewards``): answer parsing, the built-in rewards, resolving and scoring."""

from __future__ import annotations

import numpy as np
import pytest

from mistral_jax.training import rewards

EXAMPLE = {"question": "Tom has 3 apples and buys 4 more. How many apples does Tom have now?",
           "answer": "Tom has 3 + 4 = 7 apples now.\n#### 7"}


@pytest.mark.parametrize("text, want", [
    ("3 + 4 = 7\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("The answer is #### $1,000,000.", "1000000"),
    ("#### -3", "-3"),
    ("####-3", "-3"),
    ("#### 7.0", "7"),
    ("#### 7.50", "7.5"),
    ("#### 2\nwait, no\n#### 5 apples", "5"),  # the last ####
    ("so \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{ 2,500 }", "2500"),  # the last \boxed
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces; not a number: kept as text
    ("\\boxed{-0.50}", "-0.5"),
    ("#### 9 and \\boxed{3}", "9"),  # #### wins
    ("#### none\n\\boxed{3}", "3"),  # a #### without a number: the boxed answer
    ("\\boxed{7", None),  # never closed
    ("the answer is 7", None),
    ("", None),
])
def test_parse_answer(text, want):
    assert rewards.parse_answer(text) == want


def test_decimal_and_integer_answers_compare_equal():
    assert rewards.parse_answer("#### 7.0") == rewards.parse_answer("#### 7") == rewards.parse_answer("\\boxed{7.}")
    assert rewards.parse_answer("#### -7") != rewards.parse_answer("#### 7")


@pytest.mark.parametrize("completion, want", [
    ("3 + 4 = 7\n#### 7", 1.0),
    ("#### 7.0", 1.0),
    ("\\boxed{7}", 1.0),
    ("#### 8", 0.0),
    ("7", 0.0),
    ("#### 7\n#### 6", 0.0),
    ("", 0.0),
])
def test_exact_answer(completion, want):
    assert rewards.exact_answer("prompt", completion, EXAMPLE) == want


def test_exact_answer_takes_a_bare_number_reference_and_refuses_none():
    assert rewards.exact_answer("p", "#### 12", {"answer": "12"}) == 1.0
    assert rewards.exact_answer("p", "#### 12", {"answer": 12}) == 1.0
    assert rewards.exact_answer("p", "#### 12", {"answer": "13"}) == 0.0
    with pytest.raises(ValueError, match=r"no reference answer \(answer='twelve'\)\. Fix: "):
        rewards.exact_answer("p", "#### 12", {"answer": "twelve"})


@pytest.mark.parametrize("completion, want", [
    ("3 + 4 = 7\n#### 7", 1.0),
    ("3 + 4 = 7\n#### 7\n\n  ", 1.0),  # trailing blank lines
    ("#### -1,200.5.", 1.0),
    ("#### 7 apples", 0.5),  # more text on the line
    ("#### 7\nDone.", 0.5),  # not the last line
    ("#### seven", 0.0),
    ("\\boxed{7}", 0.0),
    ("7", 0.0),
    ("", 0.0),
])
def test_format_reward(completion, want):
    assert rewards.format_reward("prompt", completion, EXAMPLE) == want


# ----------------------------------------------------------------------------------------------- resolve
def test_resolve_both_spellings_and_lists():
    got = rewards.resolve("mistral_jax.training.rewards:exact_answer, mistral_jax.training.rewards.format_reward")
    assert got == [("exact_answer", rewards.exact_answer), ("format_reward", rewards.format_reward)]
    assert rewards.resolve(["mistral_jax.training.rewards:format_reward"]) == [("format_reward",
                                                                               rewards.format_reward)]

    def my_reward(prompt, completion, example):
        return 1.0

    assert rewards.resolve([my_reward, "mistral_jax.training.rewards:exact_answer"]) == [
        ("my_reward", my_reward), ("exact_answer", rewards.exact_answer)]


@pytest.mark.parametrize("paths, pattern", [
    ("", r"no reward functions given \(rewards=''\)\. Fix: "),
    (" , ", r"no reward functions given"),
    ([], r"no reward functions given"),
    ("no_such_pkg_xyz.mod:fn", r"reward 'no_such_pkg_xyz.mod:fn': module 'no_such_pkg_xyz.mod' does not import "
                               r"\(ModuleNotFoundError: No module named 'no_such_pkg_xyz'\)\. Fix: "),
    ("mistral_jax.training.rewards:no_such_fn", r"reward 'mistral_jax.training.rewards:no_such_fn': module "
                                                r"'mistral_jax.training.rewards' has no attribute 'no_such_fn' .*"
                                                r"'exact_answer'.*Fix: "),
    ("mistral_jax.training.rewards:_BOXED", r"reward 'mistral_jax.training.rewards:_BOXED' is a str .*not a "
                                            r"callable\. Fix: "),
    (["mistral_jax.training.rewards:exact_answer", 3], r"reward 3 is a int, not an import path or a callable\. Fix: "),
    ("exact_answer", r"reward 'exact_answer' is not an import path\. Fix: "),
    ("mistral_jax.training.rewards:exact_answer,mistral_jax.training.rewards.exact_answer",
     r"share the name 'exact_answer' \(the metric rewards/exact_answer/mean\)\. Fix: "),
])
def test_resolve_errors_are_one_line_with_the_fix(paths, pattern):
    with pytest.raises(ValueError, match=pattern) as err:
        rewards.resolve(paths)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------- score
def test_score_calls_each_reward_in_order():
    pairs = rewards.resolve("mistral_jax.training.rewards:exact_answer,mistral_jax.training.rewards:format_reward")
    assert rewards.score(pairs, "p", "#### 7 apples", EXAMPLE, 0) == [1.0, 0.5]
    assert rewards.score(pairs, "p", "#### 8", EXAMPLE, 0) == [0.0, 1.0]
    numbers = [("a", lambda p, c, e: np.float32(0.25)), ("b", lambda p, c, e: 2), ("c", lambda p, c, e: np.int64(3))]
    got = rewards.score(numbers, "p", "c", EXAMPLE, 0)
    assert got == [0.25, 2.0, 3.0] and all(type(v) is float for v in got)


@pytest.mark.parametrize("value, shown", [
    (None, r"returned None \(NoneType\)"),
    (True, r"returned True \(bool\)"),
    (float("nan"), r"returned nan \(float\)"),
    (float("inf"), r"returned inf \(float\)"),
    ("1.0", r"returned '1.0' \(str\)"),
    (np.array([1.0]), r"returned array\(\[1\.\]\) \(ndarray\)"),
])
def test_score_refuses_a_value_that_is_not_a_finite_number(value, shown):
    with pytest.raises(rewards.RewardError, match=r"^reward 'bad' " + shown + r" on example 5, not a finite "
                                                  r"number\. Fix: make bad return a float"):
        rewards.score([("ok", lambda p, c, e: 1.0), ("bad", lambda p, c, e: value)], "p", "c", EXAMPLE, 5)


def test_score_names_a_reward_that_raises():
    def boom(prompt, completion, example):
        raise KeyError("missing\nfield")

    with pytest.raises(rewards.RewardError, match=r"^reward 'boom' raised on example 3: KeyError: .*missing.*Fix: "
                                                  r"make boom handle this example") as err:
        rewards.score([("boom", boom)], "p", "c", EXAMPLE, 3)
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)
    assert isinstance(err.value.__cause__, KeyError)
    with pytest.raises(rewards.RewardError, match=r"reward 'exact_answer' raised on example 9: ValueError: the "
                                                  r"example has no reference answer"):
        rewards.score(rewards.resolve("mistral_jax.training.rewards:exact_answer"), "p", "#### 1", {"q": 1}, 9)
