"""Benchmark suites: the Mistral 7B paper's categories mapped to lm-evaluation-harness (0.4.13) task names.

The paper (arXiv:2310.06825, Table 2 / Section 3) groups benchmarks into categories and reports, per
benchmark, a shot count and a metric. Each ``Benchmark`` below names the lm-eval task (or group) that runs it,
the shot count to force, the results key to report (``"metric,filter"`` as lm-eval writes it) and, where
lm-eval cannot reproduce the paper's protocol exactly, a note saying what differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One row of a suite.

    Attributes:
      category: the paper's category (rows are averaged per category).
      name: the benchmark's name in the paper.
      task: the lm-eval task / group name, or an inline group config dict; None = not available in lm-eval.
      num_fewshot: shots (None = the task's own default).
      metric: the results key ``"metric,filter"``; a bare ``"metric"`` takes that metric under any filter.
      repeats: override of the task's ``repeats`` (samples per prompt, for maj@k); None keeps it.
      note: how this differs from the paper's protocol, if it does.
    """

    category: str
    name: str
    task: str | Mapping[str, Any] | None
    num_fewshot: int | None
    metric: str
    repeats: int | None = None
    note: str = ""

    @property
    def task_name(self) -> str | None:
        """The name lm-eval reports results under."""
        if self.task is None or isinstance(self.task, str):
            return self.task
        return self.task.get("group") or self.task.get("task")


# AGIEval, English multiple-choice subsets only (the paper: "English multiple-choice questions only").
_AGIEVAL_EN_MC = {
    "group": "agieval_en_mc",
    "task": ["agieval_aqua_rat", "agieval_gaokao_english", "agieval_logiqa_en", "agieval_lsat_ar",
             "agieval_lsat_lr", "agieval_lsat_rc", "agieval_sat_en_without_passage", "agieval_sat_en",
             "agieval_sat_math"],
    "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
    "metadata": {"version": 0.0},
}

CS, WK, RC, MATH, CODE, AGG = ("Commonsense reasoning", "World knowledge", "Reading comprehension", "Math",
                               "Code", "Popular aggregated results")

MISTRAL_PAPER: tuple[Benchmark, ...] = (
    # Commonsense reasoning, 0-shot.
    Benchmark(CS, "HellaSwag", "hellaswag", 0, "acc_norm,none"),
    Benchmark(CS, "WinoGrande", "winogrande", 0, "acc,none"),
    Benchmark(CS, "PIQA", "piqa", 0, "acc_norm,none"),
    Benchmark(CS, "SIQA", "social_iqa", 0, "acc,none"),
    Benchmark(CS, "OpenBookQA", "openbookqa", 0, "acc_norm,none"),
    Benchmark(CS, "ARC-Easy", "arc_easy", 0, "acc_norm,none"),
    Benchmark(CS, "ARC-Challenge", "arc_challenge", 0, "acc_norm,none"),
    Benchmark(CS, "CommonsenseQA", "commonsense_qa", 0, "acc,none"),
    # World knowledge, 5-shot.
    Benchmark(WK, "NaturalQuestions", "nq_open", 5, "exact_match,remove_whitespace"),
    Benchmark(WK, "TriviaQA", "triviaqa", 5, "exact_match,remove_whitespace"),
    # Reading comprehension, 0-shot.
    Benchmark(RC, "BoolQ", "boolq", 0, "acc,none"),
    Benchmark(RC, "QuAC", None, 0, "f1", note="no QuAC task in lm-eval 0.4.13; skipped"),
    # Math: GSM8K 8-shot maj@8, MATH 4-shot maj@4.
    Benchmark(MATH, "GSM8K", "gsm8k_cot_self_consistency", 8, "exact_match,maj@8", repeats=8,
              note="CoT exemplars, 8 samples at temperature 0.2 (lm-eval's self-consistency task)"),
    Benchmark(MATH, "MATH", "minerva_math", 4, "exact_match", note="greedy maj@1: lm-eval 0.4.13 has no maj@4 "
              "for MATH"),
    # Code: HumanEval 0-shot, MBPP 3-shot (pass@1; needs --confirm_run_unsafe_code and HF_ALLOW_CODE_EVAL=1).
    Benchmark(CODE, "HumanEval", "humaneval", 0, "pass"),
    Benchmark(CODE, "MBPP", "mbpp", 3, "pass"),
    # Popular aggregated results: MMLU 5-shot, BBH 3-shot, AGIEval 3-5-shot (English multiple choice).
    Benchmark(AGG, "MMLU", "mmlu", 5, "acc,none"),
    Benchmark(AGG, "BBH", "bbh_cot_fewshot", 3, "exact_match,get-answer"),
    Benchmark(AGG, "AGIEval", _AGIEVAL_EN_MC, None, "acc,none",
              note="0-shot: lm-eval's AGIEval tasks have no few-shot split"),
)

SUITES: dict[str, tuple[Benchmark, ...]] = {"mistral_paper": MISTRAL_PAPER}


def suite(name: str) -> tuple[Benchmark, ...]:
    """The benchmarks of suite ``name``."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}. Fix: use one of {sorted(SUITES)} or pass --tasks.")
    return SUITES[name]


def pick_metric(task_results: Mapping[str, Any], metric: str) -> tuple[str, float] | None:
    """The ``(key, value)`` of ``metric`` in one task's lm-eval results: the exact ``"metric,filter"`` key, else
    the first numeric key whose metric part starts with ``metric`` (``"pass"`` finds ``pass@1,create_test``)."""
    if metric in task_results and isinstance(task_results[metric], (int, float)):
        return metric, float(task_results[metric])
    want = metric.split(",")[0]
    for key, value in task_results.items():
        if "," in key and not key.split(",")[0].endswith("_stderr") and key.split(",")[0].startswith(want) \
                and isinstance(value, (int, float)):
            return key, float(value)
    return None


def paper_table(results: Mapping[str, Any], benchmarks: tuple[Benchmark, ...]) -> tuple[str, dict[str, float]]:
    """A markdown table grouped like the paper (one row per benchmark, then each category's average).

    Args:
      results: lm-eval's results dict (``simple_evaluate(...)["results"]``).
      benchmarks: the suite's benchmarks (those without results show "-").

    Returns:
      ``(table, averages)``: the markdown text and ``{category: mean score in percent}`` over the benchmarks
      that ran.
    """
    lines = ["| Category | Benchmark | lm-eval task | Shots | Metric | Score |", "|---|---|---|---|---|---|"]
    averages: dict[str, float] = {}
    for category in dict.fromkeys(b.category for b in benchmarks):
        scores = []
        for b in (b for b in benchmarks if b.category == category):
            found = pick_metric(results.get(b.task_name or "", {}), b.metric) if b.task_name else None
            score = "-" if found is None else f"{100 * found[1]:.1f}"
            if found is not None:
                scores.append(100 * found[1])
            shots = "default" if b.num_fewshot is None else str(b.num_fewshot)
            note = f" ({b.note})" if b.note else ""
            lines.append(f"| {category} | {b.name}{note} | {b.task_name or 'n/a'} | {shots} | "
                         f"{found[0] if found else b.metric} | {score} |")
        if scores:
            averages[category] = sum(scores) / len(scores)
            lines.append(f"| **{category}** | **average of {len(scores)}** | | | | **{averages[category]:.1f}** |")
    return "\n".join(lines), averages
