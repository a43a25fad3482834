"""Evaluation through lm-evaluation-harness: the ``mistral_jax`` model backend, benchmark suites, the runner."""

from mistral_jax.evals.lm import MistralJaxLM, eval_mesh, length_bucket, xla_compile_count
from mistral_jax.evals.presets import SUITES, Benchmark, paper_table, suite
from mistral_jax.evals.run import DatasetUnavailableError, TaskLoadError, evaluate, load_tasks

__all__ = ["SUITES", "Benchmark", "DatasetUnavailableError", "MistralJaxLM", "TaskLoadError", "eval_mesh", "evaluate",
           "length_bucket", "load_tasks", "paper_table", "suite", "xla_compile_count"]
