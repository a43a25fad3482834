"""Orbax checkpoints of a training run: ``{workdir}/checkpoints/<step>/{params,opt_state,data_state,meta}``.

* ``params``: the ``params_dict`` pytree (StandardSave) - what ``load_pretrained`` reads.
* ``opt_state``: the optax state (StandardSave).
* ``data_state``: the data iterator position (JsonSave, see ``data.pipeline.PackedBatches.get_state``).
* ``meta``: ``{"step", "seed", "model_config", ...}`` (JsonSave).

The directory is local or a bucket URL (``gs://``, ``s3://``): Orbax writes the arrays with tensorstore's GCS / S3
drivers and the rest through ``etils.epath``; in a bucket a step is finished when Orbax's ``commit_success.txt`` is
in it (``finalized_steps``), so a save killed half-way is no checkpoint, and a quarantine move is a copy, then a
delete. Saves are asynchronous (training continues while the files are written), every ``every_steps`` steps,
keeping the newest ``keep``. A save that fails (disk full, permission denied, any I/O error) raises
``CheckpointSaveError`` at the next ``check()`` / ``save()`` naming the error, the step and the newest intact
checkpoint; checkpoints already on disk are left alone. The ``checkpoints`` directory is made by the first save,
so a run that fails before it leaves none behind.

Nothing destroys a run by accident (DESIGN 16): ``layout_differences`` compares what Orbax wrote (its array
metadata: tree, shapes, dtypes) with the train state the current config builds. A step whose metadata differs is
a *mismatch* (``CheckpointMismatch``: a different run, never moved); a step whose metadata or data cannot be read
is *corrupt* and ``restore_latest`` moves it to ``{workdir}/corrupt_checkpoints/`` with a warning and falls back
to the previous one. The compatibility checks and the workdir's ownership (``CheckpointMismatch``,
``compare_layouts``, ``WorkdirLock``, ``archive_run``, ``make_workdir``) live in ``training.checkpoint_compat``
and are importable from here too.

Several processes: every process calls ``save`` / ``restore_latest`` at the same steps (Orbax writes each
process's shards and synchronises them); the processes agree on which step restores (a step that fails on any
process is quarantined by process 0 while the others wait), so they never resume from different steps.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from mistral_jax import distributed, storage
from mistral_jax.training.checkpoint_compat import (  # noqa: F401 - re-exported: one import place for callers
    ARCHIVE_DIR,
    ARRAY_ITEMS,
    DEFAULT_LOCK_REFRESH_S,
    LOCK_NAME,
    LOCK_REFRESH_ENV,
    STALE_AFTER_REFRESHES,
    CheckpointMismatch,
    WorkdirBusy,
    WorkdirLock,
    archive_run,
    compare_layouts,
    lock_refresh_interval,
    looks_like_mismatch,
    make_workdir,
    move_in_bucket,
    staging_dir,
)

log = logging.getLogger(__name__)

ITEMS = ("params", "opt_state", "data_state", "meta")
COMMIT_FILE = ocp.path.atomicity_types.COMMIT_SUCCESS_FILE  # what Orbax writes last into a step in a bucket


class CheckpointSaveError(RuntimeError):
    """A checkpoint save that failed; the message names the error, the step and the newest intact checkpoint."""

    def __init__(self, directory: str, step: int, error: BaseException | str, newest: int | None,
                 stopped_at: int | None = None):
        self.directory, self.step, self.error, self.newest = directory, step, error, newest
        err = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
        code = getattr(error, "errno", None)
        if storage.is_remote(directory):
            fix = (f"check the network and this account's write access to {directory} (and the bucket's quota)")
        elif code in (errno.ENOSPC, errno.EDQUOT):
            fix = f"free space on the filesystem of {directory} (or raise the quota)"
        elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = f"make {directory} writable by this user"
        else:
            fix = f"fix the I/O error on {directory}"
        where = f"; training stopped at step {stopped_at}" if stopped_at is not None else ""
        if newest is None:
            kept = "there is no earlier checkpoint"
            resume = "then rerun the same command (it starts from step 0)"
        else:
            kept = f"the newest intact checkpoint is step {newest} ({storage.join(directory, str(newest))})"
            resume = f"then rerun the same command to resume from step {newest}"
        super().__init__(f"saving checkpoint step {step} failed: {err}{where}. Checkpoints already saved were not "
                         f"touched; {kept}. Fix: {fix}, {resume}.")


def finalized_steps(directory: str) -> list[int]:
    """The steps Orbax finished in ``directory`` (``{workdir}/checkpoints``, local or a bucket URL), read from
    storage: on a local disk the step directories renamed from their temporary names, in a bucket those holding
    ``commit_success.txt`` (Orbax's own test, ``ocp.path.step.checkpoint_steps``): a save killed half-way is not a
    step."""
    storage.ready(directory)
    return sorted(ocp.path.step.checkpoint_steps(storage.absolute(directory)))


# --------------------------------------------------------------------------------------------- checkpointer
_TEARDOWN_NOISE = ("Event loop is closed", "cannot schedule new futures after interpreter shutdown")
_NOISY_LOGGERS = ("absl", "concurrent.futures", "asyncio")


class _OrbaxErrors(logging.Filter):
    """Keeps Orbax's ERROR records (with their tracebacks) off stderr and remembers them: the checkpointer reports
    a failed save itself, once. Also drops the teardown noise of Orbax's background threads after a failed save
    (``Event loop is closed``). ``MISTRAL_JAX_DEBUG=1`` lets everything through."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get("MISTRAL_JAX_DEBUG", "") not in ("", "0") or record.levelno < logging.ERROR:
            return True
        if "orbax" in (record.pathname or ""):
            self.records.append(record)
            return False
        exc = record.exc_info[1] if record.exc_info else None
        return not _is_teardown_noise(exc)


def _is_teardown_noise(value: BaseException | None) -> bool:
    return isinstance(value, RuntimeError) and any(n in str(value) for n in _TEARDOWN_NOISE)


def _silence_teardown_noise() -> None:
    """After a failed save, TensorStore's write callbacks may still reach the event loop Orbax already closed; they
    report ``RuntimeError: Event loop is closed`` through ``sys.unraisablehook`` / ``sys.excepthook``, one
    traceback per array. Drop exactly those (idempotent; ``MISTRAL_JAX_DEBUG=1`` keeps them)."""
    if os.environ.get("MISTRAL_JAX_DEBUG", "") not in ("", "0"):
        return
    if not getattr(sys.unraisablehook, "_mistral_jax_teardown", False):
        previous_unraisable = sys.unraisablehook

        def unraisable(u):
            if not _is_teardown_noise(u.exc_value):
                previous_unraisable(u)

        unraisable._mistral_jax_teardown = True
        sys.unraisablehook = unraisable
    if not getattr(sys.excepthook, "_mistral_jax_teardown", False):
        previous_except = sys.excepthook

        def excepthook(kind, value, tb):
            if not _is_teardown_noise(value):
                previous_except(kind, value, tb)

        excepthook._mistral_jax_teardown = True
        sys.excepthook = excepthook


def _join_background_threads(timeout: float = 30.0) -> None:
    """Wait for Orbax's writer threads of a failed save (the first error does not wait for the other writes)."""
    deadline = time.time() + timeout
    for t in threading.enumerate():
        if t is threading.current_thread() or t is threading.main_thread() or not t.is_alive():
            continue
        if "orbax" in type(t).__module__ or t.name in ("async_save", "save_finalize"):
            try:
                t.join(max(0.0, deadline - time.time()))
            except Exception:  # noqa: BLE001, S110 - Orbax's threads re-raise their write error on join
                pass


class Checkpointer:
    """A thin ``ocp.CheckpointManager`` wrapper for the train state of ``training.step``.

    Args:
      directory: ``{workdir}/checkpoints``: a local directory or a ``gs://`` / ``s3://`` URL (Orbax writes the
        arrays with tensorstore's GCS / S3 drivers, the rest through ``etils.epath``; a step in a bucket is
        finalized when Orbax's ``commit_success.txt`` is in it).
      every_steps: periodic save interval (``save(..., force=True)`` saves regardless).
      keep: number of newest checkpoints kept.
      async_save: write in a background thread.
    """

    def __init__(self, directory: str, *, every_steps: int = 1000, keep: int = 3, async_save: bool = True):
        if every_steps < 1 or keep < 1:
            raise ValueError(f"config.checkpoint.every_steps={every_steps}, keep={keep}: both must be >= 1. "
                             "Fix: set them to positive integers.")
        self.directory = storage.absolute(directory)
        self.remote = storage.is_remote(self.directory)
        self.every_steps, self.keep, self.async_save = every_steps, keep, async_save
        self._pending: int | None = None  # the step of the last save started and not yet checked
        self._failed: CheckpointSaveError | None = None
        self._errors = _OrbaxErrors()
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).addFilter(self._errors)
        _silence_teardown_noise()  # a background save can fail (and leave this noise) before check() sees it
        self._open()

    def _open(self) -> None:
        storage.ready(self.directory)  # a bucket: Orbax on s3:// (orbax_s3), quiet clients
        options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, save_interval_steps=self.every_steps,
                                               enable_async_checkpointing=self.async_save, create=False)
        handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                    "data_state": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def finalized_steps(self) -> list[int]:
        """Steps Orbax finished, read from storage (not the manager's cache): see ``finalized_steps``."""
        return finalized_steps(self.directory)

    def _finalized(self, step: int) -> bool:
        """Whether Orbax finished ``step``: its directory renamed (local), its commit file written (a bucket: one
        request, not a listing)."""
        step_dir = storage.join(self.directory, str(step))
        if not self.remote:
            return os.path.isdir(step_dir)
        return storage.path(storage.join(step_dir, COMMIT_FILE)).exists()

    # ----------------------------------------------------------------------------------------- save
    def due(self, step: int, *, force: bool = False) -> bool:
        """Whether ``save(step, ..., force=force)`` would start a save (the same answer on every process)."""
        return step not in self.manager.all_steps() and (force or step % self.every_steps == 0)

    def save(self, step: int, state: dict[str, Any], data_state: dict[str, Any], meta: dict[str, Any], *,
             force: bool = False) -> bool:
        """Save (asynchronously) if ``step`` is due or ``force``; returns whether a save started.

        Raises:
          CheckpointSaveError: this save, or the previous one, failed.
        """
        if not self.due(step, force=force):
            return False  # orbax alone would also save the first step of every run
        self.check(block=True, current_step=step)  # orbax waits for the previous save here anyway
        args = ocp.args.Composite(params=ocp.args.StandardSave(state["params"]),
                                  opt_state=ocp.args.StandardSave(state["opt_state"]),
                                  data_state=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave({**meta, "step": int(step)}))
        self._pending = int(step)
        self._errors.records.clear()  # what Orbax logs from here on belongs to this save
        try:
            if not self.remote:  # at the first save, so a run that fails before leaves none (buckets: no dirs)
                os.makedirs(self.directory, exist_ok=True)
            started = self.manager.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001 - any failure to write is reported the same way
            self._fail(step, e, step)
        if not started:
            self._pending = None
        elif not self.async_save:
            self.check(block=True, current_step=step)
        return started

    def check(self, block: bool = False, current_step: int | None = None) -> None:
        """Raise ``CheckpointSaveError`` if the last save failed (``block``: wait for a save in progress first).

        Without ``block`` a save still in progress is left running and checked at a later call.
        """
        if self._failed is not None:
            raise self._failed
        step = self._pending
        if step is None or (not block and self.manager.is_saving_in_progress()):
            return
        self._pending = None
        err: BaseException | None = None
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            err = e
        if err is None and not self._finalized(step):
            logged = self._logged_error()
            err = logged if isinstance(logged, BaseException) else RuntimeError(
                logged or f"Orbax did not finalize {storage.join(self.directory, str(step))}")
        if err is not None:
            self._fail(step, err, current_step)

    def _logged_error(self) -> BaseException | str | None:
        for r in reversed(self._errors.records):
            if r.exc_info and r.exc_info[1] is not None:
                return r.exc_info[1]
        return self._errors.records[-1].getMessage() if self._errors.records else None

    def _fail(self, step: int, err: BaseException, current_step: int | None) -> None:
        cause = err
        while cause.__cause__ is not None and not isinstance(cause, OSError):  # name the OSError at the root
            cause = cause.__cause__
        if not isinstance(cause, OSError):
            logged = self._logged_error()
            cause = logged if isinstance(logged, OSError) else err
        _join_background_threads()
        newest = max([s for s in self.finalized_steps() if s != step], default=None)
        self._failed = CheckpointSaveError(self.directory, step, cause, newest, current_step)
        raise self._failed from err

    # ----------------------------------------------------------------------------------------- restore
    def saved_layout(self, step: int) -> dict[str, Any]:
        """What Orbax wrote for ``step``: ``{"params": metadata tree, "opt_state": metadata tree}`` (reads no data).

        Raises whatever Orbax raises when the metadata is missing or unreadable (a damaged checkpoint).
        """
        md = self.manager.item_metadata(step)
        out = {item: md[item] for item in ARRAY_ITEMS}
        for item, tree in out.items():
            if tree is None or not jax.tree.leaves(tree):
                raise FileNotFoundError(f"checkpoint step {step} has no readable {item!r} metadata")
        return out

    def layout_differences(self, step: int, abstract_state: dict[str, Any]) -> list[str]:
        """``[]`` if ``step``'s saved tree / shapes / dtypes match ``abstract_state``, else the differences.

        Raises (whatever Orbax raises) when ``step``'s metadata cannot be read: corruption, not a mismatch.
        """
        return compare_layouts(self.saved_layout(step), {k: abstract_state[k] for k in ARRAY_ITEMS})

    def check_compatible(self, abstract_state: dict[str, Any]) -> dict[int, BaseException]:
        """Read-only pass over every step: raise ``CheckpointMismatch`` (newest mismatching step) if any step was
        written for a different train state; returns ``{step: error}`` of steps whose metadata is unreadable."""
        unreadable: dict[int, BaseException] = {}
        for step in reversed(self.all_steps()):
            try:
                diffs = self.layout_differences(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - unreadable metadata: damage, handled by restore_latest
                unreadable[step] = e
                continue
            if diffs:
                raise CheckpointMismatch(self.directory, step, diffs)
        return unreadable

    def restore(self, step: int, abstract_state: dict[str, Any]) -> tuple[dict[str, Any], dict, dict]:
        """``(state, data_state, meta)`` of ``step``, placed on the shardings of ``abstract_state``'s leaves."""
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_state["params"]),
                                  opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
                                  data_state=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        step_sharding = abstract_state["step"].sharding
        state = {"params": out["params"], "opt_state": out["opt_state"],
                 "step": jax.device_put(jax.numpy.asarray(int(out["meta"]["step"]), jax.numpy.int32), step_sharding)}
        return state, dict(out["data_state"]), dict(out["meta"])

    def restore_latest(self, abstract_state: dict[str, Any]) -> tuple[int, dict[str, Any], dict, dict] | None:
        """Restore the newest intact step: ``(step, state, data_state, meta)``, or None if there is none.

        First a read-only pass (``check_compatible``): a step written for a different train state raises
        ``CheckpointMismatch`` and nothing is moved. Then, newest first, a step that fails to restore (missing or
        unreadable metadata, truncated data) is moved to ``corrupt_checkpoints/`` next to the checkpoint
        directory, with a warning, and the next older step is tried.
        """
        unreadable = self.check_compatible(abstract_state)
        for step in reversed(self.all_steps()):
            err = unreadable.get(step)
            if err is None:
                try:
                    state, data_state, meta = self.restore(step, abstract_state)
                except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable
                    if looks_like_mismatch(e):
                        said = " ".join(str(e).split())[:300]  # one line
                        raise CheckpointMismatch(self.directory, step, [f"{type(e).__name__}: {said}"]) from e
                    err = e
            if distributed.any_process(err is not None):  # unusable on any process: every process moves on
                self._quarantine(step, err or RuntimeError("another process could not restore it"))
                continue
            return step, state, data_state, meta
        return None

    def _quarantine(self, step: int, err: BaseException) -> None:
        parent = self.directory.rsplit("/", 1)[0] if self.remote else os.path.dirname(self.directory)
        dest = storage.join(parent, "corrupt_checkpoints", f"{step}-{int(time.time())}")
        log.warning("checkpoint step %d in %s cannot be restored (%s: %s); moving it to %s and falling back to the "
                    "previous checkpoint.", step, self.directory, type(err).__name__, str(err)[:300], dest)
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            src = storage.join(self.directory, str(step))
            if self.remote:  # a bucket moves by copy, then delete
                move_in_bucket(src, dest)
            else:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.move(src, dest)
        distributed.sync(f"mistral_jax.quarantine_{step}")  # the others reopen after process 0 moved it
        self.manager.close()
        self._open()

    def wait(self) -> None:
        """Block until background saves are on disk (raises ``CheckpointSaveError`` if one failed)."""
        self.check(block=True)

    def close(self) -> None:
        """Wait for background saves and release the manager; a failure already reported is not raised again."""
        try:
            if self._failed is None:
                self.check(block=True)
        finally:
            try:
                self.manager.close()
            except Exception as e:  # noqa: BLE001 - a failed save is already reported (CheckpointSaveError)
                if self._failed is None:
                    raise
                log.debug("closing the checkpoint manager after a failed save: %s", e)
            if self._failed is not None:  # let Orbax's writer threads of the failed save finish (and log) first
                _join_background_threads(10.0)
            for name in _NOISY_LOGGERS:
                logging.getLogger(name).removeFilter(self._errors)



def restore_checkpoint_params(checkpoint_dir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
    """Only the ``params`` item of ``step`` (default: newest intact) of a training run's ``{workdir}/checkpoints``.

    (Not ``convert.native.restore_params``, which reads the ``params`` directory of a mistral_jax export.)

    Args:
      checkpoint_dir: ``{workdir}/checkpoints`` (local, or a ``gs://`` / ``s3://`` URL).
      abstract_params: ``ShapeDtypeStruct`` tree (with shardings) of the ``params_dict`` layout.
      step: which step; None = the newest that restores.

    Returns:
      ``(params, step)``.
    """
    storage.ready(checkpoint_dir)  # a bucket: Orbax on s3:// (orbax_s3), quiet clients
    manager = ocp.CheckpointManager(storage.absolute(checkpoint_dir), item_names=ITEMS,
                                    options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    steps = sorted(manager.all_steps()) if step is None else [step]
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {checkpoint_dir!r}. Fix: train first, or pass a run's workdir.")
    errors = []
    for s in reversed(steps):
        try:
            out = manager.restore(s, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
            return out["params"], s
        except Exception as e:  # noqa: BLE001
            errors.append(f"step {s}: {type(e).__name__}: {str(e)[:200]}")
            log.warning("checkpoint step %d of %s does not restore; trying an older one.", s, checkpoint_dir)
    raise ValueError(f"no checkpoint in {checkpoint_dir!r} restores:\n  " + "\n  ".join(errors))

