"""The training loop behind ``train.py``: sharded state, data, checkpoints, metrics, preemption, for any recipe.

This module sets a run up (the workdir, its lock and resume checks, the train state); the loop itself is
``training.loop.run_loop`` and the recipe's hooks are ``training.hooks``.

The run config is resolved once (``training.run.resolve``: model config, mesh, rules and the recipe of
``training.recipe``); the loop only asks the recipe for the tokenizer, the batches, the model at step 0, the
objective the step minimises (``training.step.Objective``: its batch layout, loss and held-out metrics) and its
hooks (``training.hooks.Hooks``: rollout, before / after step, eval, checkpoint extras in the checkpoint's meta), and
trains the state ``training.step.state_layout`` builds from what the recipe trains (its ``frozen`` part, empty
when every weight trains, is merged into the model but never updated or checkpointed: a resumed run rebuilds it
from the recipe's initial model).

Workdir layout (read by ``load_pretrained``, eval and generate)::

    {workdir}/run_config.json      the run ConfigDict
    {workdir}/model_config.json    ModelConfig.to_dict()
    {workdir}/tokenizer.model      the sentencepiece model used (trained by the run if data.tokenizer == "")
    {workdir}/checkpoints/<step>/  params, opt_state, data_state, meta (training.checkpoint)
    {workdir}/metrics.jsonl        one JSON object per logged step (train and "eval/" metrics)
    {workdir}/tb/                  TensorBoard events
    {workdir}/.lock                pid + host of the run using the workdir (process 0), removed on exit
    {workdir}/corrupt_checkpoints/ steps that could not be read back (moved here, never deleted)
    {workdir}/archive/<time>/      earlier runs moved aside by ``checkpoint.reset`` (never deleted)

The workdir is a local directory or a bucket URL (``gs://bucket/run``, ``s3://bucket/run``; ``mistral_jax.storage``):
everything above lives under it. A bucket cannot append, so ``metrics.jsonl`` and the TensorBoard events are
written to a local working copy and uploaded whole (``training.metrics``), and ``tokenizer.model`` is staged there
for the tokenizer library; that copy is ``checkpoint_compat.staging_dir`` under ``storage.cache_dir()`` (the one
local directory a bucket run writes to). The bucket is checked (reachable, exists, takes writes) before anything is
built, and its lock is refreshed while the run lives (``checkpoint_compat.WorkdirLock``).

Nothing is destroyed by accident: a config that cannot continue the workdir's run (its checkpoints hold another
tree / shapes / dtypes, or its model_config.json or tokenizer differ) fails before anything is written, naming the
fields and the fix; ``resume=False`` on a workdir holding a run fails unless ``checkpoint.reset`` archives it; a
failed checkpoint save stops the run at the next step naming the newest intact checkpoint.

Fault handling: SIGTERM / SIGINT finish the current step, save a checkpoint, wait for it and exit with
``128 + signal`` (so schedulers requeue); a rerun with the same workdir resumes bit-exactly (params, optimizer,
data position). A non-finite loss or gradient never reaches the params (``training.step``); with
``nan_policy="stop"`` the run raises ``FloatingPointError`` without saving that step, with ``"skip"`` it
counts the skipped update (``skipped_steps`` metric) and continues.

Several processes (``distributed.initialize()``, called by ``train.py`` before any device use): every process
runs this same loop on its share of the data (rows ``process_index::process_count``) and takes part in every
Orbax save and restore; only process 0 holds the lock, writes ``run_config.json`` / ``model_config.json`` /
``metrics.jsonl`` / TensorBoard and shows the progress bar. A signal that reaches only some processes stops all
of them at the same step: each step the processes agree on the signals seen (a 4-byte all-gather, skipped with
one process), save that step and exit with ``128 + signal`` together. The checkpoint's ``data_state`` holds every
process's data position (``{"process_count", "processes": [...]}``), so a resumed run continues each process's
stream exactly.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
from ml_collections import ConfigDict

from mistral_jax import distributed, storage
from mistral_jax.config import ModelConfig
from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.training import emergency
from mistral_jax.training import loop as loop_lib
from mistral_jax.training import recipe as recipe_lib
from mistral_jax.training import run as run_lib
from mistral_jax.training import step as step_lib
from mistral_jax.training.checkpoint import (
    ARCHIVE_DIR,
    LOCK_NAME,
    Checkpointer,
    CheckpointMismatch,
    WorkdirBusy,
    WorkdirLock,
    archive_run,
    finalized_steps,
    make_workdir,
    staging_dir,
)
from mistral_jax.training.run import (
    CONFIG_DIR,
    ConfigError,
    RunSpec,
    base_config,
    check_cli_overrides,
    check_processes,
    load_config_file,
    model_config_from,
    validate_config,
)

evaluate = loop_lib.evaluate  # the held-out metrics (training.loop), used through this module by the tests

# the run config's names are used through this module by train.py and the tests

__all__ = ["CONFIG_DIR", "ConfigError", "RunMismatch", "base_config", "check_cli_overrides", "check_processes",
           "config_differences", "evaluate", "load_config_file", "model_config_from",
           "previous_run", "train", "validate_config"]

log = logging.getLogger(__name__)


class RunMismatch(ConfigError):
    """The workdir holds a run this config cannot continue (different model, optimizer, tokenizer...)."""


# --------------------------------------------------------------------------- the workdir's run
RUN_FILES = ("run_config.json", "metrics.jsonl")  # with checkpoints: a workdir holding these holds a run
# ModelConfig fields a resumed run may change: how it is computed, not what it is (the runtime fields: dtypes,
# backends, scan / remat, loss weights, the init scale used once, the platform), and max_seq_len, which holds no
# parameter (it bounds the RoPE table and caches)
MAY_CHANGE_ON_RESUME = (*ModelConfig.runtime_fields(), "max_seq_len")


def _read_json(path: str) -> Any:
    try:
        return json.loads(storage.read_bytes(path))
    except (OSError, ValueError):
        return None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _as_json(cfg: ConfigDict) -> dict[str, Any]:
    return json.loads(cfg.to_json_best_effort())


def previous_run(workdir: str) -> dict[str, Any]:
    """What a workdir holds: ``{"steps": finished checkpoint steps, "files": run files, "holds_run": bool}``."""
    steps = finalized_steps(storage.join(workdir, "checkpoints"))  # fresh listings, also for the files below
    files = [n for n in RUN_FILES if storage.path(storage.join(workdir, n)).is_file()]
    return {"steps": steps, "files": files, "holds_run": bool(steps or files)}


def _describe(prev: dict[str, Any]) -> str:
    parts = []
    if prev["steps"]:
        parts.append(f"checkpoints at steps {prev['steps']}")
    parts += prev["files"]
    return ", ".join(parts) or "no run files"


def config_differences(saved: dict[str, Any], cfg: ConfigDict) -> list[tuple[str, Any, Any]]:
    """``[(dotted field, saved value, current value)]`` between a saved ``run_config.json`` and ``cfg``."""
    old, now = _flat(saved), _flat(_as_json(cfg))
    missing = object()
    return [(k, old.get(k, missing), now.get(k, missing)) for k in sorted(set(old) | set(now))
            if old.get(k, missing) != now.get(k, missing) and not k.startswith("checkpoint.")]


def _flag(key: str, value: Any) -> str:
    if value is None:
        return f"drop --config.{key}"
    if isinstance(value, bool):
        return f"--config.{key}={str(value).lower()}"
    return f"--config.{key}={value}"


def _identity_differences(run: RunSpec, workdir: str) -> list[str]:
    """Read-only comparison of a resumed workdir's ``model_config.json`` and ``tokenizer.model`` with the run."""
    out = []
    saved = _read_json(storage.join(workdir, "model_config.json"))
    if isinstance(saved, dict):
        now = run.model_cfg.to_dict()
        for k in sorted(set(saved) | set(now)):
            if k not in MAY_CHANGE_ON_RESUME and saved.get(k) != now.get(k):
                out.append(f"model_config.json: {k}={saved.get(k)!r} saved, {now.get(k)!r} now")
    src = run.recipe.tokenizer_source()
    dest = storage.join(workdir, Tokenizer.FILENAME)
    if (src and storage.absolute(src) != dest and storage.path(src).is_file() and storage.path(dest).is_file()
            and storage.read_bytes(src) != storage.read_bytes(dest)):
        out.append(f"the tokenizer {src} differs from the run's {dest}")
    return out


def _layout_reason(e: CheckpointMismatch) -> str:
    more = f"; {len(e.differences) - 3} more" if len(e.differences) > 3 else ""
    return f"checkpoint step {e.step} holds a different train state ({'; '.join(e.differences[:3])}{more})"


def _mismatch(workdir: str, prev: dict[str, Any], reasons: list[str], cfg: ConfigDict) -> RunMismatch:
    saved = _read_json(storage.join(workdir, "run_config.json"))
    diffs = [d for d in config_differences(saved, cfg) if d[0].startswith(recipe_lib.state_fields())] if saved else []
    shown = "; ".join(reasons[:6]) + (f"; ... ({len(reasons) - 6} more)" if len(reasons) > 6 else "")
    if diffs:
        changed = ", ".join(f"{k}={old!r} saved, {new!r} now" for k, old, new in diffs[:8])
        how = "rerun with the saved values (" + " ".join(_flag(k, old) for k, old, _ in diffs[:8]) + ")"
        changed = f" Config fields that differ from its run_config.json: {changed}."
    else:
        changed, how = "", f"rerun with the config in {storage.join(workdir, 'run_config.json')}"
    return RunMismatch(
        f"workdir {workdir} holds a run ({_describe(prev)}) that this config cannot continue: {shown}.{changed} "
        f"Nothing in {workdir} was changed. Fix: {how}, or pass another --workdir, or pass "
        f"--config.checkpoint.reset=true to move the old run (checkpoints and configs) to "
        f"{storage.join(workdir, ARCHIVE_DIR)}/<time>/ and start over.")


def _start_over_or_resume(cfg: ConfigDict, workdir: str, prev: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Apply ``checkpoint.resume`` / ``checkpoint.reset`` to a workdir's previous run: ``(resume, prev)``.

    ``reset`` archives the previous run (moved, never deleted), except when that run was started by this very
    config (a requeued job re-running its command): then it resumes. ``resume=False`` on a workdir holding a run
    without ``reset`` is a ``ConfigError``: a new run would mix with the old one.
    """
    resume, reset = bool(cfg.checkpoint.resume), bool(cfg.checkpoint.reset)
    if not prev["holds_run"]:
        return resume, prev
    if reset:
        if _read_json(storage.join(workdir, "run_config.json")) == _as_json(cfg):
            log.warning("config.checkpoint.reset=True, but %s holds the run this same config started (a requeued "
                        "job): resuming it. To start over again, pass another --workdir.", workdir)
            return True, prev
        dest = archive_run(workdir) if jax.process_index() == 0 else None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("mistral_jax.archive_run")
        log.warning("config.checkpoint.reset=True: moved the previous run in %s (%s) to %s; starting over at step 0.",
                    workdir, _describe(prev), dest)
        return resume, previous_run(workdir)
    if not resume:
        raise ConfigError(
            f"config.checkpoint.resume=False, but workdir {workdir} holds a run ({_describe(prev)}); a new run would "
            f"mix with it (its saves skipped, its run_config.json overwritten). Nothing in {workdir} was changed. "
            "Fix: drop --config.checkpoint.resume=false to resume that run, or pass another --workdir, or pass "
            f"--config.checkpoint.reset=true to move the old run to {storage.join(workdir, ARCHIVE_DIR)}/<time>/ and "
            "start over.")
    return resume, prev


# --------------------------------------------------------------------------- loop
def train(run: RunSpec | ConfigDict, workdir: str) -> dict[str, Any]:
    """Run (or resume) the training described by ``cfg`` in ``workdir``.

    Nothing in a workdir is destroyed by accident: the workdir is locked (``{workdir}/.lock``, process 0) so two
    runs cannot share it; a previous run this config cannot continue (``RunMismatch``: model, optimizer or
    tokenizer differ from its checkpoints or configs) fails before anything is written; ``resume=False`` on a
    workdir holding a run fails unless ``checkpoint.reset`` moves the old run to ``{workdir}/archive/<time>/``.

    Args:
      run: the resolved run (``training.run.resolve``), or a run ConfigDict (``configs/*.py``) to resolve on the
        global devices.
      workdir: output directory (created; an existing run there is resumed when ``checkpoint.resume``), or a
        ``gs://`` / ``s3://`` URL.

    Returns:
      ``{"status": "done" | "preempted", "step", "signal", "last_metrics", "eval", "checkpoint"}`` (``checkpoint``:
      the newest checkpoint directory, or None).

    Raises:
      ConfigError: a bad config (before anything is written); ``RunMismatch`` for a workdir this config cannot
        continue; a workdir that cannot be written (a missing bucket, a storage server that does not answer).
      storage.StorageError: a bucket path of the config (``init_from``, ``data.*``) that cannot be read.
      checkpoint.WorkdirBusy: another live run holds the workdir.
      checkpoint.CheckpointSaveError: a checkpoint save failed (training stops at the next step).
      FloatingPointError: a non-finite loss with ``nan_policy="stop"``.
    """
    try:
        storage.check_supported(workdir, "workdir")  # hdfs://... is refused, never taken for a local directory
    except storage.UnsupportedPath as e:
        raise ConfigError(str(e)) from None
    if not isinstance(run, RunSpec):
        run_lib.check_storage(run)  # the config's bucket paths answer, before anything is built or read
        run = run_lib.resolve(run)
    workdir = storage.absolute(workdir)
    if not storage.is_remote(workdir) and os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir} is a file, not a directory. Fix: pass a directory (new or a run's).")
    make_workdir(workdir, tokenizer=run.cfg.data.tokenizer)  # a missing tokenizer or unwritable workdir: nothing made
    lock, busy = None, None
    if jax.process_index() == 0:  # process 0 owns the workdir; the others wait for its verdict here
        try:
            lock = WorkdirLock(workdir).acquire()
        except WorkdirBusy as e:
            busy = e
    if distributed.any_process(busy is not None):
        raise busy or WorkdirBusy(f"workdir {workdir} is in use by another run (process 0 could not take "
                                  f"{storage.join(workdir, LOCK_NAME)}; its message names the holder). Fix: wait for "
                                  "that run to end, or pass another --workdir.")
    try:
        return _train(run, workdir)
    finally:
        if lock is not None:
            lock.release()


def _train(run: RunSpec, workdir: str) -> dict[str, Any]:
    cfg, model_cfg, mesh, rules, recipe = run.cfg, run.model_cfg, run.mesh, run.rules, run.recipe
    prev = previous_run(workdir)
    resume, prev = _start_over_or_resume(cfg, workdir, prev)
    local_dir = cfg.checkpoint.get("local_dir", "") or ""
    resuming = resume and bool(prev["steps"])
    if local_dir and resume and prev["holds_run"] and not resuming:  # killed before its first persistent save
        resuming = bool(distributed.any_process(emergency.has_local_steps(local_dir, workdir)))
    if resume and prev["holds_run"] and not resuming:
        log.warning("%s holds a run without a checkpoint (%s): starting at step 0.", workdir, _describe(prev))
    reasons = _identity_differences(run, workdir) if resuming else []

    if jax.process_index() == 0:  # the set-up (mesh, the whole rules table): train.py --verbose shows it
        log.debug("%s", run_lib.describe(run))
    tx, schedule = run.tx, run.schedule
    graphdef, abstract_state, shardings = step_lib.state_layout(recipe.abstract_model(model_cfg), tx, mesh, rules,
                                                                recipe.trainable,
                                                                keep_initial=recipe.objective.keeps_initial)
    ckpt = Checkpointer(storage.join(workdir, "checkpoints"), every_steps=cfg.checkpoint.every_steps,
                        keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    if local_dir:  # emergency checkpoints: a local tier in front of the persistent one
        try:
            ckpt = emergency.TieredCheckpointer(ckpt, local_dir=local_dir, workdir=workdir, mesh=mesh,
                                                abstract_state=abstract_state,
                                                every_steps=cfg.checkpoint.local_every_steps,
                                                keep=cfg.checkpoint.local_keep, fresh=not resuming)
        except BaseException:
            ckpt.close()
            raise
    try:
        if resuming:  # read-only: what Orbax wrote (tree, shapes, dtypes) against this config's train state
            try:
                ckpt.check_compatible(abstract_state)
            except CheckpointMismatch as e:
                reasons.append(_layout_reason(e))
            if reasons:
                raise _mismatch(workdir, prev, reasons, cfg)
        tok = _run_tokenizer(recipe, workdir, model_cfg)
        if tok.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but config.model.vocab_size="
                              f"{model_cfg.vocab_size}. Fix: set --config.model.vocab_size={tok.vocab_size} or larger.")
        restored = None
        t_restore = time.perf_counter()
        if resuming:
            try:
                restored = ckpt.restore_latest(abstract_state)
            except CheckpointMismatch as e:
                raise _mismatch(workdir, prev, [_layout_reason(e)], cfg) from e
        distributed.sync("mistral_jax.workdir_read")  # every process has read the workdir before it changes
        if jax.process_index() == 0:
            storage.write_bytes(storage.join(workdir, "run_config.json"), cfg.to_json_best_effort(indent=2).encode())
            storage.write_bytes(storage.join(workdir, "model_config.json"),
                                json.dumps(model_cfg.to_dict(), indent=2).encode())
        restore_s = time.perf_counter() - t_restore
        return _loop(run, workdir, tok, ckpt, restored, graphdef, abstract_state, shardings, tx, schedule, restore_s)
    finally:
        ckpt.close()


def _run_tokenizer(recipe: recipe_lib.Recipe, workdir: str, model_cfg: ModelConfig) -> Tokenizer:
    """``recipe.tokenizer(workdir, ...)``: the run's tokenizer, kept (or trained) as ``{workdir}/tokenizer.model``.

    A bucket workdir is staged: the recipe reads and writes ``tokenizer.model`` in this process's local working
    copy (``staging_dir``: the bucket's file downloaded first, a resumed run keeps it), and process 0 uploads the
    file when the bucket's differs."""
    if not storage.is_remote(workdir):
        return recipe.tokenizer(workdir, model_cfg)
    local = staging_dir(workdir, "tokenizer")
    staged, remote = os.path.join(local, Tokenizer.FILENAME), storage.join(workdir, Tokenizer.FILENAME)
    try:
        saved = storage.read_bytes(remote)
    except FileNotFoundError:
        saved = None
    if os.path.exists(staged):
        os.remove(staged)
    if saved is not None:
        with open(staged, "wb") as f:
            f.write(saved)
    tok = recipe.tokenizer(local, model_cfg)
    if jax.process_index() == 0 and os.path.isfile(staged):
        with open(staged, "rb") as f:
            data = f.read()
        if data != saved:
            storage.write_bytes(remote, data)
    return tok


def _initial_state(run: RunSpec, tx, shardings, abstract_state, restored) -> tuple[int, dict[str, Any], Any]:
    """``(step, state, data_state)``: the restored checkpoint, or step 0 of the recipe's initial model."""
    model_cfg, mesh, rules, recipe = run.model_cfg, run.mesh, run.rules, run.recipe
    keep = recipe.objective.keeps_initial
    if restored is None:
        state = step_lib.init_state(recipe.init_model(model_cfg, mesh, rules), tx, shardings, mesh, rules,
                                    recipe.trainable, keep_initial=keep)
        start, data_state = 0, None
    else:
        start, state, data_state, _ = restored
        state["frozen"] = {}
        if jax.tree.leaves(abstract_state["frozen"]):  # frozen weights are not checkpointed: rebuilt as at step 0
            state["frozen"] = step_lib.split_model(recipe.init_model(model_cfg, mesh, rules), shardings,
                                                   recipe.trainable, keep_initial=keep)[1]
    n_trained = sum(x.size for x in jax.tree.leaves(state["params"]))
    n_frozen = sum(x.size for x in jax.tree.leaves(state["frozen"]))
    log.info("%s: %d trained parameters, %d frozen", recipe.name, n_trained, n_frozen)
    return start, state, data_state


def _loop(run: RunSpec, workdir, tok, ckpt, restored, graphdef, abstract_state, shardings, tx, schedule,
          restore_s: float = 0.0) -> dict[str, Any]:
    return loop_lib.run_loop(run, workdir, tok, ckpt, restored, graphdef, shardings, tx, schedule,
                             initial_state=lambda: _initial_state(run, tx, shardings, abstract_state, restored),
                             restore_seconds=restore_s)
