"""Rebuild the bundled preference set: ``python -m mistral_jax.data.corpus.build_preference``.

Written for this project (no third-party text; CC0-1.0, see ``PREFERENCE_LICENSE``). Every record is made by fixed
rules from small word tables below, with no randomness, so the files are the same on every machine and Python
version. Each prompt gets a *chosen* answer that is correct, polite and consistent with the question, and a
*rejected* one that breaks one rule (the record's ``rule`` field names it):

* ``wrong``: the same sentence with a wrong fact (a wrong sum, capital, opposite, plural or colour);
* ``rude``: a dismissive non-answer ("Look it up yourself.");
* ``off_topic``: a fluent answer to a different question.

Records use TRL's conversational preference layout: ``{"id", "rule", "prompt": [user message], "chosen":
[assistant message], "rejected": [assistant message]}``. The validation split holds every record of every fifth
question (question index % 5 == 4), so no validation question is seen in training: 202 train and 48 validation pairs.
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "preference_train.jsonl")
VALIDATION = os.path.join(HERE, "preference_validation.jsonl")

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Greece", "Athens"),
            ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Portugal", "Lisbon"),
            ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Chile", "Santiago"), ("Cuba", "Havana"),
            ("Canada", "Ottawa"), ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"),
            ("Mexico", "Mexico City"), ("Turkey", "Ankara"), ("Hungary", "Budapest")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("open", "closed"),
             ("light", "dark"), ("happy", "sad"), ("early", "late"), ("full", "empty"), ("high", "low"),
             ("strong", "weak"), ("old", "young"), ("wet", "dry"), ("hard", "soft"), ("rich", "poor"),
             ("loud", "quiet"), ("thick", "thin"), ("near", "far"), ("clean", "dirty"), ("true", "false")]
PLURALS = [("cat", "cats"), ("dog", "dogs"), ("child", "children"), ("mouse", "mice"), ("box", "boxes"),
           ("city", "cities"), ("foot", "feet"), ("tooth", "teeth"), ("leaf", "leaves"), ("bus", "buses"),
           ("man", "men"), ("woman", "women"), ("knife", "knives"), ("baby", "babies"), ("goose", "geese"),
           ("house", "houses"), ("sheep", "sheep"), ("wolf", "wolves"), ("story", "stories"), ("hero", "heroes")]
COLOURS = [("the sky on a clear day", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"),
           ("a ripe banana", "yellow"), ("a ripe tomato", "red"), ("an orange", "orange"), ("milk", "white"),
           ("a lemon", "yellow"), ("a fire truck", "red")]
RUDE = ["Look it up yourself.", "Why would I tell you that?", "Not my problem.", "Ask someone else.",
        "That is a boring question.", "I do not feel like answering."]


def _facts() -> list[tuple[str, str, str, str]]:
    """``(kind, question, correct answer, wrong answer)`` in a fixed order."""
    out = []
    for i, (country, capital) in enumerate(CAPITALS):
        wrong = CAPITALS[(i + 7) % len(CAPITALS)][1]
        out.append(("capital", f"What is the capital of {country}?", f"The capital of {country} is {capital}.",
                    f"The capital of {country} is {wrong}."))
    for word, opp in OPPOSITES:
        out.append(("opposite", f"What is the opposite of {word}?", f"The opposite of {word} is {opp}.",
                    f"The opposite of {word} is {word}."))
    for word, plural in PLURALS:
        wrong = word + "s" if plural != word + "s" else word + "es"
        out.append(("plural", f"What is the plural of {word}?", f"The plural of {word} is {plural}.",
                    f"The plural of {word} is {wrong}."))
    for i, (thing, colour) in enumerate(COLOURS):
        wrong = COLOURS[(i + 3) % len(COLOURS)][1]
        wrong = wrong if wrong != colour else "purple"
        subject = thing[0].upper() + thing[1:]
        out.append(("colour", f"What colour is {thing}?", f"{subject} is {colour}.", f"{subject} is {wrong}."))
    n = 0
    for a in range(2, 10):
        for b in range(1, 10):
            if (a * 7 + b * 3) % 4:
                continue  # a fixed, spread-out subset of the sums and differences
            if n % 2:
                out.append(("arithmetic", f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.",
                            f"{a} plus {b} is {a + b + 1 + n % 3}."))
            elif a > b:
                out.append(("arithmetic", f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}.",
                            f"{a} minus {b} is {a - b + 1 + n % 2}."))
            n += 1
    return out


def records() -> list[dict]:
    """The set as records in a fixed order (about 250)."""
    facts = _facts()
    out = []
    for i in range(250):
        kind, question, right, wrong = facts[i % len(facts)]
        rule = ("wrong", "rude", "off_topic")[(i // len(facts) + i) % 3]
        if rule == "wrong":
            rejected = wrong
        elif rule == "rude":
            rejected = RUDE[i % len(RUDE)]
        else:
            rejected = facts[(i * 7 + 11) % len(facts)][2]  # right, but about another question
            if rejected == right:
                rejected = facts[(i + 1) % len(facts)][2]
        if i >= len(facts):  # a second pass over the facts: the polite long form of the same answer
            right = f"Sure! {right}"
        out.append({"id": f"pref-{i:04d}", "rule": rule, "question": i % len(facts),
                    "prompt": [{"role": "user", "content": question}],
                    "chosen": [{"role": "assistant", "content": right}],
                    "rejected": [{"role": "assistant", "content": rejected}]})
    return out


def main() -> None:
    recs = records()
    n_val = 0
    with open(TRAIN, "w", encoding="utf-8") as tr, open(VALIDATION, "w", encoding="utf-8") as va:
        for r in recs:
            held_out = r.pop("question") % 5 == 4
            n_val += held_out
            (va if held_out else tr).write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{len(recs) - n_val} train + {n_val} validation preference pairs -> {TRAIN}, {VALIDATION}")


if __name__ == "__main__":
    main()
