"""Run lm-evaluation-harness tasks or a benchmark suite on a mistral_jax checkpoint (the library side of eval.py).

Results go where lm-eval puts them (``output_path/<model>/results_<date>.json``, ``samples_<task>_<date>.jsonl``),
also in a bucket: lm-eval writes local files, so a ``gs://`` / ``s3://`` ``output_path`` is stood in for by a
temporary directory under ``storage.cache_dir("eval_outputs")`` whose files are uploaded to the same places under
``output_path`` when the evaluation ends (``staged_output``); the temporary directory is removed either way.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax

from mistral_jax import storage
from mistral_jax.evals import presets
from mistral_jax.evals.lm import MistralJaxLM, xla_compile_count

log = logging.getLogger(__name__)


class TaskLoadError(RuntimeError):
    """Tasks that cannot be built here: a missing dataset or a missing Python package (all listed at once)."""


class DatasetUnavailableError(TaskLoadError):
    """A task's dataset could not be fetched (offline, or not in the local datasets cache)."""


HUB_PROBE_TIMEOUT_S = 3.0  # one HEAD request; an unreachable hub otherwise costs ~25 s of retries per dataset
_hub_unreachable_reason: str | None = None  # set when go_offline_if_hub_unreachable switched this process offline


def _offline() -> bool:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set to a true value (as huggingface_hub and datasets read them)."""
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    """The HF hub the datasets come from (``HF_ENDPOINT``, default https://huggingface.co)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the HF hub cannot be reached (one HEAD request, proxies honoured), or None when it answers.

    Any HTTP answer, an error status included, counts as reachable: only a failed connection (no DNS, refused,
    timed out) is "unreachable".
    """
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(hub_endpoint(), method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as e:  # URLError, socket.timeout, ConnectionRefusedError; ValueError: a bad URL
        return f"{type(getattr(e, 'reason', e)).__name__}: {getattr(e, 'reason', e)}"
    return None


def go_offline_if_hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Switch ``datasets`` and ``huggingface_hub`` to offline mode when the hub does not answer one quick probe.

    Without this, every dataset of an unreachable hub is retried with back-off (1+2+4+8+8 s, each warning
    printed twice) before it fails; offline, a cached dataset loads at once and a missing one fails at once.
    Sets ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` for this process (and the module constants the two
    libraries read them into at import, if they are imported already). Does nothing when offline mode is set.

    Returns:
      Why the hub is unreachable (e.g. ``"ConnectionRefusedError: [Errno 111] Connection refused"``), or None
      when it answered or offline mode was already set.
    """
    if _offline():
        return None
    reason = hub_unreachable(timeout)
    if reason is None:
        return None
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import sys

    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:
        sys.modules["datasets.config"].HF_HUB_OFFLINE = sys.modules["datasets.config"].HF_DATASETS_OFFLINE = True
    global _hub_unreachable_reason
    _hub_unreachable_reason = reason
    log.info("the HF hub %s is unreachable (%s): datasets load from the local cache only", hub_endpoint(), reason)
    return reason


def _dataset_hint(task_manager: Any, spec: Any) -> str:
    """``dataset_path[/dataset_name]`` of a task spec, read from its YAML, or '' if unknown."""
    try:
        entry = task_manager._entry(spec) if isinstance(spec, str) else None  # noqa: SLF001 - best effort only
        path = getattr(entry, "yaml_path", None)
        if path:
            import yaml

            with open(path) as f:
                cfg = yaml.load(f, Loader=yaml.BaseLoader) or {}
            if cfg.get("dataset_path") in (None, "null"):  # set in an included base YAML: let the error name it
                return ""
            return "/".join(str(cfg[k]) for k in ("dataset_path", "dataset_name") if cfg.get(k) not in (None, "null"))
    except Exception:  # noqa: BLE001 - only used to improve the message
        pass
    return ""


def _yaml_file(config: Mapping[str, Any]) -> str:
    """An inline task / group config written to a YAML file (lm-eval 0.4.13 builds inline group dicts wrongly:
    it passes the group's keys to every child task; a YAML path loads correctly)."""
    import tempfile

    import yaml

    directory = tempfile.mkdtemp(prefix="mistral_jax_tasks_")
    path = os.path.join(directory, f"{config.get('group') or config.get('task')}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(dict(config), f)
    return path


def unknown_tasks(task_manager: Any, names: Sequence[str]) -> dict[str, list[str]]:
    """The names that are no task, group or tag of ``task_manager``, each with its closest known names (difflib).

    Cheap once the task manager is built (a lookup in its index): callers check names before loading a model.
    """
    import difflib

    known = set(task_manager.all_tasks)
    return {n: difflib.get_close_matches(n, known, n=5) for n in names if n not in known}


def _unknown_error(unknown: Mapping[str, list[str]]) -> ValueError:
    listed = "; ".join(f"{n!r} (close matches: {', '.join(c) or 'none'})" for n, c in unknown.items())
    return ValueError(f"unknown lm-eval task(s): {listed}. Fix: correct the name (`lm_eval ls tasks` lists them "
                      "all), or pass --include_path DIR holding its YAML.")


def load_tasks(task_manager: Any, specs: Sequence[str | Mapping[str, Any]]) -> list[Any]:
    """Build lm-eval Task / Group objects for ``specs`` (names, tags or inline group dicts), one spec at a time,
    so a failure names the task it belongs to.

    Raises:
      ValueError: an unknown task name (with close matches).
      DatasetUnavailableError: every task whose dataset cannot be fetched (all listed at once, with any task
        missing a Python package), with how to pre-download them.
      TaskLoadError: tasks whose code needs a Python package that is not installed (lm-eval's extras).
    """
    go_offline_if_hub_unreachable()  # before any download: an unreachable hub fails at once, not after retries
    import datasets

    built, missing, packages = [], [], []
    for spec in specs:
        name = spec if isinstance(spec, str) else spec.get("group") or spec.get("task")
        try:
            loaded = task_manager.load(spec if isinstance(spec, str) else _yaml_file(spec))
        except KeyError as e:
            raise _unknown_error(unknown_tasks(task_manager, [str(name)]) or {str(name): []}) from e
        except (OSError, datasets.exceptions.DatasetNotFoundError) as e:
            ds = _dataset_hint(task_manager, spec)
            fetch = [spec] if isinstance(spec, str) else list(spec.get("task", [name]))  # registered names
            missing.append((fetch, f"task {name!r}{f' (dataset {ds!r})' if ds else ''} cannot be loaded: "
                                   f"{type(e).__name__}: {e}"))
            continue
        except ImportError as e:  # task utils import optional packages (lm-eval[math], evaluate, ...)
            packages.append(f"task {name!r} needs a Python package that is not installed: {e}")
            continue
        if name in loaded["groups"]:
            built.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            built.append(loaded["tasks"][name])
        else:  # a tag: its tasks
            built.extend(loaded["tasks"].values())
    fix_packages = ("Fix: install the package(s) named above (lm-eval's extras: `pip install \"lm-eval[math]\"`, "
                    "`pip install evaluate` for code tasks), or drop these tasks.")
    if missing:  # one line (the command-line tools print it as their one-line error)
        names = [n for fetch, _ in missing for n in fetch]
        why = (f"The HF hub {hub_endpoint()} is unreachable ({_hub_unreachable_reason}), so the run went offline,"
               if _hub_unreachable_reason else
               "The run is offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set, or no network)")
        raise DatasetUnavailableError(
            f"{len(missing)} task(s) cannot load their datasets (or metric modules): "
            + "; ".join([m for _, m in missing] + packages) +
            f". {why} and these datasets are not in the local cache. Fix: pre-download them once on a machine with "
            "network access, with the same datasets cache (HF_HOME / HF_DATASETS_CACHE) as this run: "
            "`HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0 "
            f"python -c \"from lm_eval.tasks import TaskManager; TaskManager().load({names!r})\"`, then copy the "
            "cache here; or evaluate on local files with a task YAML (`dataset_path: json`, "
            "`dataset_kwargs: {data_files: {test: FILE}}`) passed through --include_path." +
            (f" {fix_packages}" if packages else ""))
    if packages:
        raise TaskLoadError("tasks cannot be built: " + "; ".join(packages) + ". " + fix_packages)
    return built


def upload_tree(local_dir: str, remote_dir: str) -> list[str]:
    """Copy every file under ``local_dir`` to the same relative path under the bucket path ``remote_dir``; returns
    the URLs written, sorted."""
    fs = storage.filesystem(storage.url_scheme(remote_dir))
    written = []
    for root, _, names in os.walk(local_dir):
        for name in sorted(names):
            src = os.path.join(root, name)
            dest = storage.join(remote_dir, os.path.relpath(src, local_dir).replace(os.sep, "/"))
            fs.put_file(src, dest)
            written.append(dest)
    return sorted(written)


@contextlib.contextmanager
def staged_output(output_path: str | None) -> Iterator[str | None]:
    """The ``output_path`` to give lm-eval's ``EvaluationTracker``: itself when local (or None); for a bucket path,
    a temporary local directory whose files are uploaded under ``output_path`` when the block ends without an
    error. The temporary directory is removed either way.

    lm-eval reads an ``output_path`` ending in ``.json`` as the results file's name (``<stem>_<date>.json``, the
    samples beside it): the stand-in keeps that name, and the files land in its bucket directory."""
    if output_path is None or not storage.is_remote(output_path):
        yield output_path
        return
    import shutil
    import tempfile

    remote = output_path.rstrip("/")
    head, _, name = remote.rpartition("/")
    json_file = name.endswith(".json") and "://" in head  # lm-eval: the results file's name, not a directory
    tmp = tempfile.mkdtemp(prefix="eval-", dir=storage.cache_dir("eval_outputs"))
    try:
        yield os.path.join(tmp, name) if json_file else tmp
        written = upload_tree(tmp, head if json_file else remote)
        log.info("eval outputs written to %s", ", ".join(written) or "(none: lm-eval wrote no file)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _leaf_tasks(obj: Any) -> list[Any]:
    return list(obj.get_all_tasks()) if hasattr(obj, "get_all_tasks") else [obj]


def evaluate(*, checkpoint: str | None = None, lm: MistralJaxLM | None = None, tasks: str | Sequence[str] = (),
             suite: str | None = None, num_fewshot: int | None = None, limit: float | None = None,
             batch_size: int = 8, include_path: str | None = None, output_path: str | None = None,
             log_samples: bool = False, seed: Sequence[int] = (0, 1234, 1234, 1234),
             apply_chat_template: bool = False, confirm_run_unsafe_code: bool = False,
             gen_kwargs: str | None = None, tokenizer: str | None = None, dtype: str | None = None,
             max_length: int | None = None, task_manager: Any = None, verbose: bool = True,
             quantize: str | None = None, kv_cache_dtype: str | None = None) -> dict[str, Any]:
    """Evaluate with lm-evaluation-harness through the ``mistral_jax`` backend.

    Args:
      checkpoint: a directory ``load_pretrained`` accepts (or pass ``lm``).
      lm: a ready ``MistralJaxLM`` (e.g. over an in-memory model).
      tasks: lm-eval task / group / tag names (comma-separated string or list).
      suite: a preset suite (``mistral_paper``) run with its own shot counts, printed grouped by category.
      num_fewshot: shots for every task (overrides the suite's).
      limit: examples per task (a fraction if < 1), as lm-eval's ``--limit``.
      batch_size: rows per compiled batch.
      include_path: extra directory of task YAMLs.
      output_path: write ``results_<date>.json`` (and ``samples_<task>_<date>.jsonl`` with ``log_samples``)
        under ``output_path/<model name>/`` exactly as lm-eval does; a local directory or a ``gs://`` / ``s3://``
        path (``staged_output``).
      log_samples: keep per-sample inputs, responses and metrics.
      seed: python, numpy, torch and few-shot seeds (lm-eval's ``--seed``).
      apply_chat_template: wrap prompts in Mistral's instruct template (for instruct models).
      confirm_run_unsafe_code: allow tasks that execute generated code (HumanEval, MBPP).
      gen_kwargs: generation overrides, ``"temperature=0,max_gen_toks=64"``.
      tokenizer: a tokenizer.model path when the checkpoint has none.
      dtype: parameter dtype for loading (``bfloat16`` / ``float32``).
      quantize: ``int8`` to evaluate the checkpoint with int8 weights; kv_cache_dtype: ``int8`` for an int8 KV
        cache in generation tasks.
      max_length: context length (default the model's ``max_seq_len``).
      task_manager: a ready ``lm_eval.tasks.TaskManager`` (it indexes every task YAML: slow to build).
      verbose: print the result tables.

    Returns:
      lm-eval's results dict, plus ``config["mistral_jax"]`` with compilation counts and timings.
    """
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    benchmarks = presets.suite(suite) if suite else ()
    if not names and not benchmarks:
        raise ValueError("nothing to evaluate: give --tasks (comma-separated lm-eval names) or --suite mistral_paper.")
    if lm is None and checkpoint is None:
        raise ValueError("evaluate() needs checkpoint=<dir> or lm=<MistralJaxLM>. Fix: pass --checkpoint DIR.")
    task_manager = task_manager or TaskManager(include_path=include_path)
    unknown = unknown_tasks(task_manager, names)  # names and datasets are checked before the model loads
    if unknown:
        raise _unknown_error(unknown)

    skipped = [b for b in benchmarks if b.task is None]
    for b in skipped:
        log.warning("suite %s: %s skipped (%s)", suite, b.name, b.note)
    wanted = [b for b in benchmarks if b.task is not None and not (isinstance(b.task, str) and b.task in names)]
    objs = load_tasks(task_manager, names + [b.task for b in wanted])  # one error listing every missing dataset
    for b, obj in zip(wanted, objs[len(objs) - len(wanted):], strict=True):  # suite entries are tasks or groups
        for t in _leaf_tasks(obj):
            if b.num_fewshot is not None and num_fewshot is None:
                t.set_config(key="num_fewshot", value=b.num_fewshot)
            if b.repeats is not None:
                t.set_config(key="repeats", value=b.repeats)
    if lm is None:
        from mistral_jax.training.run import resolve_checkpoint

        spec = resolve_checkpoint(checkpoint, mesh="auto", dtype=dtype)  # opened once; mesh and rules resolved here
        lm = MistralJaxLM(spec.checkpoint, tokenizer=tokenizer, batch_size=batch_size, dtype=dtype,
                          max_length=max_length, seed=seed[0], mesh=spec.mesh, rules=spec.rules, quantize=quantize,
                          kv_cache_dtype=kv_cache_dtype)

    main = jax.process_index() == 0  # several processes run the same requests in lock-step; process 0 writes
    with staged_output(output_path if main else None) as local_output:  # a bucket: written locally, then uploaded
        tracker = EvaluationTracker(output_path=local_output) if local_output else None
        compiles0, t0 = xla_compile_count(), time.perf_counter()
        score0 = lm.n_compilations
        results = lm_eval.simple_evaluate(
            model=lm, model_args={"pretrained": checkpoint or "in-memory"}, tasks=objs, num_fewshot=num_fewshot,
            batch_size=lm.batch_size, limit=limit, log_samples=log_samples, evaluation_tracker=tracker,
            apply_chat_template=apply_chat_template, fewshot_as_multiturn=bool(apply_chat_template),
            gen_kwargs=gen_kwargs, task_manager=task_manager, random_seed=seed[0], numpy_random_seed=seed[1],
            torch_random_seed=seed[2], fewshot_random_seed=seed[3], confirm_run_unsafe_code=confirm_run_unsafe_code,
            bootstrap_iters=0 if limit is not None else 100000)
        info = {"score_compilations": lm.n_compilations - score0,
                "score_shapes": [s for _, s in lm.compile_log[score0:]],
                "xla_compilations": xla_compile_count() - compiles0, "seconds": round(time.perf_counter() - t0, 2),
                "batch_size": lm.batch_size, "devices": 1 if lm.mesh is None else lm.mesh.size}
        results["config"]["mistral_jax"] = info
        log.info("mistral_jax eval: %s", json.dumps(info))
        if benchmarks:
            table, averages = presets.paper_table(results["results"], benchmarks)
            results["mistral_jax_suite"] = {"suite": suite, "category_averages": averages, "table": table}
        if tracker is not None:
            samples = results.pop("samples", None) if log_samples else None
            written = copy.deepcopy(samples)  # the tracker rewrites samples in place as it serialises them
            tracker.save_results_aggregated(results=results, samples=written)
            for task_name in (results["configs"] if written else ()):
                tracker.save_results_samples(task_name=task_name, samples=written[task_name])
            if samples is not None:
                results["samples"] = samples
    if verbose and main:
        print(make_table(results))
        if "groups" in results:
            print(make_table(results, "groups"))
        if benchmarks:
            print(results["mistral_jax_suite"]["table"])
        print(f"compilations: {info['score_compilations']} scoring step(s) {info['score_shapes']}, "
              f"{info['xla_compilations']} XLA in total; {info['seconds']} s on {info['devices']} device(s)")
    return results
