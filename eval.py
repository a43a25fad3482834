"""Evaluate a checkpoint with lm-evaluation-harness through the JAX model (lm-eval's argument names).

  python eval.py --checkpoint DIR --tasks hellaswag,arc_easy [--num_fewshot N] [--limit N] [--batch_size 8]
                 [--include_path DIR] [--output_path DIR] [--log_samples] [--seed 0,1234,1234,1234]
                 [--apply_chat_template]
  python eval.py --checkpoint DIR --suite mistral_paper     # the paper's categories, shots and metrics

Several processes (a TPU slice, SLURM / Open MPI, or ``MISTRAL_JAX_COORDINATOR`` / ``_NUM_PROCESSES`` /
``_PROCESS_ID``) run the same command: each scores every request on the global mesh; process 0 writes and prints.

DIR is anything ``mistral_jax.load_pretrained`` accepts (HF, Mistral consolidated, mistral_jax export or
training workdir), local or ``gs://`` / ``s3://``. Results are written like lm-eval's (``results_<date>.json``,
``samples_<task>_<date>.jsonl``), into a local directory or a bucket path (``--output_path gs://bkt/evals``: written
locally under the cache directory, then uploaded).

Before anything loads, the flag values are checked, then the paths (checkpoint, tokenizer, --include_path), then
the task names against lm-eval's index (with close matches); a bad one is one line on stderr naming the flag, the
value and the fix, exit status 2 (``--verbose`` or ``MISTRAL_JAX_DEBUG=1`` also shows the traceback).
"""

from __future__ import annotations

from absl import app, flags

flags.DEFINE_string("checkpoint", None, "Checkpoint directory (HF, Mistral consolidated or mistral_jax), local or "
                    "gs:// / s3://.")
flags.DEFINE_string("tasks", "", "Comma-separated lm-eval task / group / tag names.")
flags.DEFINE_string("suite", None, "Preset suite run with its own shots and metrics: mistral_paper.")
flags.DEFINE_integer("num_fewshot", None, "Few-shot examples for every task (default: the task's / suite's).")
flags.DEFINE_float("limit", None, "Examples per task (a fraction of each task if < 1). For testing only.")
flags.DEFINE_integer("batch_size", 8, "Rows per compiled batch (rounded up to a multiple of the device count).")
flags.DEFINE_string("include_path", None, "Extra directory of task YAMLs (e.g. tasks over local files).")
flags.DEFINE_string("output_path", None, "Directory for results_<date>.json (and samples_*.jsonl), local or "
                    "gs:// / s3://.")
flags.DEFINE_bool("log_samples", False, "Write per-sample inputs, outputs and metrics (needs --output_path).")
flags.DEFINE_string("seed", "0,1234,1234,1234", "Seeds for python,numpy,torch,fewshot (one value = all four).")
flags.DEFINE_bool("apply_chat_template", False, "Wrap prompts in Mistral's [INST] instruct template.")
flags.DEFINE_bool("confirm_run_unsafe_code", False, "Allow tasks that execute generated code (HumanEval, MBPP).")
flags.DEFINE_string("gen_kwargs", None, "Generation overrides, e.g. 'temperature=0,max_gen_toks=64'.")
flags.DEFINE_string("tokenizer", None, "tokenizer.model to use when the checkpoint has none (local or gs:// / s3://).")
flags.DEFINE_string("dtype", None, "Parameter dtype: float32 or bfloat16 (default: as stored).")
flags.DEFINE_integer("max_length", None, "Context length (default: the model's max_seq_len).")
flags.DEFINE_string("quantize", None, "Weight-only quantization of the checkpoint: int8 (default: none).")
flags.DEFINE_string("kv_cache_dtype", None, "Generation tasks' KV cache: auto or int8 (default: auto).")
flags.DEFINE_bool("verbose", False, "Show the traceback of argument errors too (as MISTRAL_JAX_DEBUG=1 does).")
FLAGS = flags.FLAGS
PROG = "eval.py"


def _main(argv: list[str]) -> int:
    from mistral_jax import cli
    from mistral_jax.evals import args

    cli.quiet_libraries()
    cli.keep_host_memory(PROG)
    names = args.check_flags(FLAGS, argv[1:])  # flag values first, then paths, then task names: before any load
    args.check_paths(FLAGS)
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=FLAGS.include_path)  # indexes every task YAML (seconds)
    args.check_task_names(task_manager, names, FLAGS.tasks)
    from mistral_jax import distributed

    distributed.initialize()  # several processes (TPU slice, SLURM, MISTRAL_JAX_*): before any device is used
    from mistral_jax.evals.run import evaluate

    evaluate(checkpoint=FLAGS.checkpoint, tasks=names, suite=FLAGS.suite, num_fewshot=FLAGS.num_fewshot,
             limit=FLAGS.limit, batch_size=FLAGS.batch_size, include_path=FLAGS.include_path,
             output_path=FLAGS.output_path, log_samples=FLAGS.log_samples, seed=args.parse_seed(FLAGS.seed),
             apply_chat_template=FLAGS.apply_chat_template, confirm_run_unsafe_code=FLAGS.confirm_run_unsafe_code,
             gen_kwargs=FLAGS.gen_kwargs, tokenizer=FLAGS.tokenizer, dtype=FLAGS.dtype,
             max_length=FLAGS.max_length, task_manager=task_manager, quantize=FLAGS.quantize,
             kv_cache_dtype=FLAGS.kv_cache_dtype)
    return 0


def main(argv: list[str]) -> int:
    """Check the flags, then evaluate; a bad value or an unloadable task is one message on stderr, exit status 2."""
    from mistral_jax import cli
    from mistral_jax.evals.run import TaskLoadError

    return cli.run(lambda: _main(argv), PROG, expected=(TaskLoadError,))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; its errors (an unknown flag, a value of the wrong type) are one line, exit status 2."""
    from mistral_jax.cli import absl_flags_parser

    return absl_flags_parser(PROG, FLAGS)(argv)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
