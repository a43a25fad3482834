"""Evaluate a checkpoint with lm-evaluation-harness through the JAX model (lm-eval's argument names).

  python eval.py --checkpoint DIR --tasks hellaswag,arc_easy [--num_fewshot N] [--limit N] [--batch_size 8]
                 [--include_path DIR] [--output_path DIR] [--log_samples] [--seed 0,1234,1234,1234]
                 [--apply_chat_template]
  python eval.py --checkpoint DIR --suite mistral_paper     # the paper's categories, shots and metrics

DIR is anything ``mistral_jax.load_pretrained`` accepts (HF, Mistral consolidated, mistral_jax export or
training workdir). Results are written like lm-eval's (``results_<date>.json``, ``samples_<task>_<date>.jsonl``).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

flags.DEFINE_string("checkpoint", None, "Checkpoint directory (HF, Mistral consolidated or mistral_jax).")
flags.DEFINE_string("tasks", "", "Comma-separated lm-eval task / group / tag names.")
flags.DEFINE_string("suite", None, "Preset suite run with its own shots and metrics: mistral_paper.")
flags.DEFINE_integer("num_fewshot", None, "Few-shot examples for every task (default: the task's / suite's).")
flags.DEFINE_float("limit", None, "Examples per task (a fraction of each task if < 1). For testing only.")
flags.DEFINE_integer("batch_size", 8, "Rows per compiled batch (rounded up to a multiple of the device count).")
flags.DEFINE_string("include_path", None, "Extra directory of task YAMLs (e.g. tasks over local files).")
flags.DEFINE_string("output_path", None, "Directory for results_<date>.json (and samples_*.jsonl).")
flags.DEFINE_bool("log_samples", False, "Write per-sample inputs, outputs and metrics (needs --output_path).")
flags.DEFINE_string("seed", "0,1234,1234,1234", "Seeds for python,numpy,torch,fewshot (one value = all four).")
flags.DEFINE_bool("apply_chat_template", False, "Wrap prompts in Mistral's [INST] instruct template.")
flags.DEFINE_bool("confirm_run_unsafe_code", False, "Allow tasks that execute generated code (HumanEval, MBPP).")
flags.DEFINE_string("gen_kwargs", None, "Generation overrides, e.g. 'temperature=0,max_gen_toks=64'.")
flags.DEFINE_string("tokenizer", None, "tokenizer.model to use when the checkpoint has none.")
flags.DEFINE_string("dtype", None, "Parameter dtype: float32 or bfloat16 (default: as stored).")
flags.DEFINE_integer("max_length", None, "Context length (default: the model's max_seq_len).")
FLAGS = flags.FLAGS


def parse_seed(text: str) -> tuple[int, int, int, int]:
    """lm-eval's --seed: one integer for all four seeds, or four comma-separated ones."""
    parts = [int(p) for p in text.split(",")]
    if len(parts) == 1:
        return (parts[0],) * 4
    if len(parts) != 4:
        raise app.UsageError(f"--seed={text!r}: give 1 or 4 comma-separated integers, e.g. 0,1234,1234,1234.")
    return tuple(parts)  # type: ignore[return-value]


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag.")
    if not FLAGS.checkpoint:
        raise app.UsageError("--checkpoint DIR is required (a directory mistral_jax.load_pretrained accepts).")
    if FLAGS.log_samples and not FLAGS.output_path:
        raise app.UsageError("--log_samples needs --output_path DIR to write the samples to.")
    from mistral_jax.evals.run import TaskLoadError, evaluate

    try:
        evaluate(checkpoint=FLAGS.checkpoint, tasks=FLAGS.tasks, suite=FLAGS.suite, num_fewshot=FLAGS.num_fewshot,
                 limit=FLAGS.limit, batch_size=FLAGS.batch_size, include_path=FLAGS.include_path,
                 output_path=FLAGS.output_path, log_samples=FLAGS.log_samples, seed=parse_seed(FLAGS.seed),
                 apply_chat_template=FLAGS.apply_chat_template, confirm_run_unsafe_code=FLAGS.confirm_run_unsafe_code,
                 gen_kwargs=FLAGS.gen_kwargs, tokenizer=FLAGS.tokenizer, dtype=FLAGS.dtype,
                 max_length=FLAGS.max_length)
    except TaskLoadError as e:  # an expected, explained failure: the message, not a traceback
        print(f"eval.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(app.run(main))
