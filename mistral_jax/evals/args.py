"""eval.py's argument checks: flag values, then paths, then task names, all before the model loads.

Each check raises ``mistral_jax.cli.UsageError`` (one line naming the flag, the value and the fix; exit status 2
through ``cli.run``). ``values`` is any object with eval.py's flags as attributes (absl's ``FLAGS``, a namespace).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from mistral_jax import storage
from mistral_jax.cli import (
    UsageError,
    check_checkpoint_dir,
    check_dtype,
    check_local_flags,
    check_quantize_flags,
    check_reachable,
    check_tokenizer,
    number,
)
from mistral_jax.evals import presets


def parse_seed(text: str) -> tuple[int, int, int, int]:
    """lm-eval's --seed: one integer for all four seeds (python, numpy, torch, fewshot), or four comma-separated."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 4):
        raise UsageError("--seed", text, "is not 1 or 4 comma-separated integers (python,numpy,torch,fewshot)",
                         "pass e.g. --seed 0 or --seed 0,1234,1234,1234")
    return tuple(parts * 4 if len(parts) == 1 else parts)  # type: ignore[return-value]


def check_flags(values: Any, positional: Sequence[str] = ()) -> list[str]:
    """Check every flag value (no file is read); returns the task names of ``--tasks``."""
    if positional:
        raise UsageError("positional arguments", " ".join(positional), "are not accepted",
                         "pass every option as a --flag=value (e.g. --tasks=hellaswag)")
    if not values.checkpoint:
        raise UsageError("--checkpoint", None, "is required",
                         "pass --checkpoint DIR (a directory mistral_jax.load_pretrained accepts)")
    names = [t.strip() for t in (values.tasks or "").split(",") if t.strip()]
    if values.suite is not None and values.suite not in presets.SUITES:
        raise UsageError("--suite", values.suite, "is not a known suite",
                         f"use one of {sorted(presets.SUITES)}, or name lm-eval tasks with --tasks")
    if not names and values.suite is None:
        raise UsageError("--tasks", values.tasks, "names no task and no --suite is given",
                         "pass --tasks with comma-separated lm-eval names (e.g. --tasks=hellaswag,arc_easy) "
                         f"or --suite={next(iter(presets.SUITES))}")
    number("--num_fewshot", values.num_fewshot, int, lambda v: v >= 0, "must be >= 0",
           "pass a number of examples such as --num_fewshot 5, or omit it for each task's default")
    number("--limit", values.limit, float, lambda v: 0 < v < 1 or v >= 1 and v == int(v),
           "must be a fraction in (0, 1) or a whole number of examples >= 1",
           "pass e.g. --limit 100 (examples per task) or --limit 0.1 (a tenth of each task), or omit it for all")
    number("--batch_size", values.batch_size, int, lambda v: v >= 1, "must be at least 1",
           "pass a positive number of rows such as --batch_size 8")
    number("--max_length", values.max_length, int, lambda v: v >= 1, "must be at least 1",
           "pass a context length in tokens such as --max_length 4096, or omit it for the model's max_seq_len")
    check_dtype("--dtype", values.dtype)
    check_quantize_flags(getattr(values, "quantize", None), getattr(values, "kv_cache_dtype", None))
    parse_seed(values.seed)
    if values.log_samples and not values.output_path:
        raise UsageError("--output_path", None, "is needed by --log_samples",
                         "pass --output_path DIR to write the samples to, or drop --log_samples")
    if values.gen_kwargs is not None:
        bad = [kv for kv in values.gen_kwargs.split(",") if not re.fullmatch(r"\s*\w+\s*=.*", kv)]
        if bad:
            raise UsageError("--gen_kwargs", values.gen_kwargs, f"has items that are not key=value: {bad}",
                             "pass comma-separated key=value pairs, e.g. --gen_kwargs temperature=0,max_gen_toks=64")
    return names


REMOTE_OK = ("checkpoint", "tokenizer", "output_path")  # may be gs:// / s3:// (--include_path: lm-eval reads it)


def check_paths(values: Any) -> None:
    """The checkpoint is a checkpoint directory, the tokenizer exists, --include_path is a directory, and
    --output_path is not a file. ``--checkpoint``, ``--tokenizer`` and ``--output_path`` may be ``gs://`` /
    ``s3://`` paths: their buckets are checked first (endpoint, bucket, credentials; ``--output_path`` written to
    once), so a bad one fails in one line before the model loads."""
    check_local_flags({name: getattr(values, name) for name in ("checkpoint", "tokenizer", "include_path",
                                                                "output_path")}, remote_ok=REMOTE_OK)
    if values.output_path is not None:
        check_reachable("--output_path", values.output_path)
        if storage.path(values.output_path).is_file():
            raise UsageError("--output_path", values.output_path, "is a file", "pass a directory (created if missing)")
        check_reachable("--output_path", values.output_path, write=True)  # a bucket: an object written and removed
    fmt = check_checkpoint_dir(values.checkpoint)
    check_tokenizer(values.tokenizer, values.checkpoint, fmt)
    if values.include_path is not None and not os.path.isdir(values.include_path):
        raise UsageError("--include_path", values.include_path,
                         "does not exist" if not os.path.exists(values.include_path) else "is not a directory",
                         "pass a directory holding task YAML files")


def check_task_names(task_manager: Any, names: Sequence[str], tasks_flag: str) -> None:
    """Every name is an lm-eval task, group or tag of ``task_manager`` (else the unknown ones, with close matches)."""
    from mistral_jax.evals.run import unknown_tasks

    unknown = unknown_tasks(task_manager, names)
    if unknown:
        listed = "; ".join(f"{n!r} (close matches: {', '.join(c) or 'none'})" for n, c in unknown.items())
        raise UsageError("--tasks", tasks_flag, f"names unknown lm-eval task(s): {listed}",
                         "correct the name (`lm_eval ls tasks` lists them all), or pass --include_path DIR "
                         "holding its YAML")
