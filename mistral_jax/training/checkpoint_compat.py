"""Whether a workdir's checkpoints belong to this config, and who owns the workdir.

* ``layout_differences`` (on ``Checkpointer``) compares what Orbax wrote (its array metadata: tree, shapes,
  dtypes) with the train state the current config builds through ``compare_layouts`` here. A step whose metadata
  differs is a *mismatch* (``CheckpointMismatch``: a different run, never moved); ``looks_like_mismatch`` tells
  such an Orbax restore error from damage.
* ``make_workdir`` creates the workdir after checking what the run reads and that the workdir can be written, so
  a bad path is one error and leaves nothing behind. ``WorkdirLock`` gives a workdir one owner (in a bucket: an
  object created only if absent and refreshed while the run lives); ``archive_run`` moves a finished or abandoned
  run aside (``{workdir}/archive/<time>/``) instead of deleting it. A workdir is a local directory or a ``gs://`` /
  ``s3://`` URL (``mistral_jax.storage``); ``staging_dir`` is the local working copy of a bucket workdir's files.

The Orbax side (save, restore, resume) is ``training.checkpoint``, which re-exports these names.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import threading
import time
from typing import Any

import jax
import numpy as np

from mistral_jax import storage

log = logging.getLogger(__name__)

ARRAY_ITEMS = ("params", "opt_state")  # the items whose layout must match the train state
LOCK_NAME = ".lock"
ARCHIVE_DIR = "archive"
# what Orbax says when a restore target's tree / shapes / dtypes differ from the saved ones (a mismatch, not damage)
_MISMATCH_HINTS = ("tree structures do not match", "not compatible with the stored shape", "shape mismatch",
                   "dtype mismatch", "does not match the stored")



class CheckpointMismatch(ValueError):
    """A checkpoint that reads fine but was written for a different train state (tree, shapes or dtypes).

    ``differences``: human-readable lines, e.g. ``"params/embed: shape (512, 64) saved, (512, 128) now"``.
    """

    def __init__(self, directory: str, step: int, differences: list[str]):
        self.directory, self.step, self.differences = directory, step, list(differences)
        shown = "; ".join(differences[:6]) + (f"; ... ({len(differences) - 6} more)" if len(differences) > 6 else "")
        super().__init__(f"checkpoint step {step} in {directory} does not match the train state of this config: "
                         f"{shown}")



class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir's lock."""


# --------------------------------------------------------------------------------------------- layout
def _key(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _leaves(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{"a/b/0": (shape, dtype)}`` of the array leaves of ``tree`` (abstract values or Orbax metadata)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if shape is None and dtype is None:
            shape, dtype = np.shape(leaf), np.asarray(leaf).dtype
        out["/".join(_key(k) for k in path)] = (tuple(shape or ()), str(np.dtype(dtype)) if dtype is not None else "?")
    return out


def _fmt(shape_dtype: tuple[tuple[int, ...], str]) -> str:
    return f"{shape_dtype[1]}{list(shape_dtype[0])}"


def compare_layouts(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Differences between two ``{item: pytree}`` layouts (missing / extra arrays, shapes, dtypes)."""
    out = []
    for item in ARRAY_ITEMS:
        if item not in expected:
            continue
        s, e = _leaves(saved.get(item)), _leaves(expected[item])
        only_saved, only_now = sorted(set(s) - set(e)), sorted(set(e) - set(s))
        if only_saved or only_now:
            def few(keys):
                return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            out.append(f"{item}: tree differs ({len(s)} arrays saved, {len(e)} now; only in the checkpoint: "
                       f"[{few(only_saved)}]; only in this config: [{few(only_now)}])")
        for k in sorted(set(s) & set(e)):
            if s[k] != e[k]:
                out.append(f"{item}/{k}: {_fmt(s[k])} saved, {_fmt(e[k])} now")
    return out


def looks_like_mismatch(err: BaseException) -> bool:
    """Whether an Orbax restore error says the target's tree / shapes / dtypes differ (not unreadable data)."""
    text = str(err).lower()
    return any(h in text for h in _MISMATCH_HINTS)



# --------------------------------------------------------------------------------------------- workdir
LOCK_REFRESH_ENV = "MISTRAL_JAX_LOCK_REFRESH_S"
DEFAULT_LOCK_REFRESH_S = 60.0
STALE_AFTER_REFRESHES = 3  # a bucket lock not refreshed for this many of its holder's intervals is stale


def lock_refresh_interval() -> float:
    """Seconds between two refreshes of a bucket workdir's lock: ``MISTRAL_JAX_LOCK_REFRESH_S`` (default 60).

    Raises:
      ValueError: the variable is set to something other than a number > 0 (one line with the fix).
    """
    text = os.environ.get(LOCK_REFRESH_ENV, "").strip()
    if not text:
        return DEFAULT_LOCK_REFRESH_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{LOCK_REFRESH_ENV}={text!r} is not a number of seconds > 0. Fix: set it to e.g. 60 (or "
                         "unset it for the default of 60 s).")
    return value


def staging_dir(workdir: str, *parts: str) -> str:
    """This process's local directory for a bucket ``workdir``'s files that cannot be written in place: what a
    bucket cannot append to (``metrics.jsonl``, TensorBoard events, uploaded whole) and what a reader needs as a
    local file (``tokenizer.model``). It is ``storage.cache_dir("runs", scheme, bucket, path..., "process<i>",
    *parts)``, created; the bucket holds the run, this only a working copy."""
    scheme, rest = storage.absolute(workdir).split("://", 1)
    segments = [p if p not in (".", "..") else "_" for p in rest.split("/") if p]
    return storage.cache_dir("runs", scheme, *segments, f"process{jax.process_index()}", *parts)


def move_in_bucket(src: str, dst: str) -> None:
    """Move the object ``src``, or every object under the prefix ``src/``, to ``dst`` in the same bucket: all are
    copied first, then the originals deleted, so an interruption leaves a copy, never nothing (a bucket has no
    rename; ``etils.epath``'s wants ``dst``'s parent folder to exist, which a bucket never has)."""
    fs = storage.filesystem(storage.url_scheme(src))
    s, d = (storage.absolute(p).split("://", 1)[1] for p in (src, dst))
    objects = fs.find(s)  # the object itself, or those under "s/" (not "s1/...")
    if not objects:
        raise FileNotFoundError(f"nothing to move at {src}")
    for o in objects:
        fs.cp_file(o, d + o[len(s):])
    fs.rm(objects)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a zombie (exited, not yet reaped) is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _precondition_failed(err: BaseException) -> bool:
    """Whether a bucket request failed because its condition did not hold (HTTP 412 / 409 on a conditional write)."""
    if isinstance(err, FileExistsError):  # gcsfs's 412
        return True
    text = " ".join(str(e) for e in (err, err.__cause__, err.__context__) if e is not None)
    return any(s in text for s in ("PreconditionFailed", "pre-conditions you specified did not hold",
                                   "ConditionalRequestConflict"))


class _BucketObject:
    """One bucket object with the conditional requests a lock needs: replace or delete it only while it is at a
    known version (GCS ``ifGenerationMatch``, S3 ``If-Match`` on its ETag), which the store itself checks."""

    def __init__(self, url: str):
        self.url = url
        self.scheme = storage.url_scheme(url)
        self.fs = storage.filesystem(self.scheme)
        self.key_path = url.split("://", 1)[1]
        self.bucket, _, self.key = self.key_path.partition("/")

    def read(self) -> tuple[str, bytes] | None:
        """``(version, content)``, None when there is no object. The content is at least as new as the version."""
        self.fs.invalidate_cache(self.key_path)
        try:
            info = self.fs.info(self.key_path)
            data = self.fs.cat_file(self.key_path)
        except FileNotFoundError:
            return None
        return str(info["generation"] if self.scheme == "gs" else info["ETag"]), data

    def modified(self) -> float | None:
        try:
            return self.fs.modified(self.key_path).timestamp()
        except (FileNotFoundError, NotImplementedError):
            return None

    def replace(self, data: bytes, version: str) -> str | None:
        """Write ``data`` if the object is still at ``version``: its new version, or None when it changed."""
        try:
            if self.scheme == "gs":
                from urllib.parse import quote

                head = (b"--==0==\nContent-Type: application/json; charset=UTF-8\n\n"
                        + json.dumps({"name": self.key}).encode()
                        + b"\n--==0==\nContent-Type: application/octet-stream\n\n")
                out = self.fs.call("POST", f"{self.fs._location}/upload/storage/v1/b/{quote(self.bucket)}/o",
                                   uploadType="multipart", ifGenerationMatch=version, json_out=True,
                                   headers={"Content-Type": 'multipart/related; boundary="==0=="'},
                                   data=head + data + b"\n--==0==--")
                return str(out["generation"])
            return str(self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data,
                                       IfMatch=version)["ETag"])
        except (OSError, FileNotFoundError) as e:
            if _precondition_failed(e) or isinstance(e, FileNotFoundError):
                return None
            raise
        finally:
            self.fs.invalidate_cache(self.key_path)

    def delete(self, version: str) -> bool:
        """Delete the object if it is still at ``version`` (a store that does not take the condition on deletes:
        unconditionally, after a read showed it still at ``version``)."""
        try:
            if self.scheme == "gs":
                self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=version)
            else:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            if _precondition_failed(e):
                return False
            got = self.read()  # e.g. an S3-compatible store without conditional deletes
            if got is None or got[0] != version:
                return False
            self.fs.rm_file(self.key_path)
            return True
        finally:
            self.fs.invalidate_cache(self.key_path)


class WorkdirLock:
    """``{workdir}/.lock``: the workdir's single owner (process 0 of a run).

    On a local disk the file is created with ``O_EXCL`` and holds ``{"pid", "host", "started", "command"}``; a lock
    whose process is dead (same host) is stale: reported and taken over. A live holder, or one on another host,
    raises ``WorkdirBusy``. ``release()`` removes the file if it is still ours.

    In a bucket (``gs://``, ``s3://``) the object is created only if absent (``storage.create_exclusive``) and also
    holds ``"refreshed"`` (the time of its last refresh) and ``"refresh_s"``: a background thread rewrites it every
    ``MISTRAL_JAX_LOCK_REFRESH_S`` seconds (default 60) while the run lives, each rewrite conditional on the
    version it wrote last. A lock not refreshed for ``STALE_AFTER_REFRESHES`` (3) of its holder's intervals, or
    whose process is dead on this host, is stale: it is replaced by this run's lock conditionally on the stale
    object's version (GCS generation, S3 ETag), so two runs cannot both take it over and a live lock is never
    overwritten. Anything else raises ``WorkdirBusy`` naming the holder (host, pid, start time).
    """

    def __init__(self, workdir: str):
        self.remote = storage.is_remote(workdir)
        self.workdir = storage.absolute(workdir)
        self.path = storage.join(self.workdir, LOCK_NAME)
        self.held = False
        self.info = {"pid": os.getpid(), "host": socket.gethostname(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:500]}
        self.refresh_s = lock_refresh_interval() if self.remote else None
        self._version: str | None = None  # the bucket object's version this lock wrote last
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(self.path))
        except (OSError, ValueError):
            return None

    def acquire(self) -> WorkdirLock:
        if self.remote:
            return self._acquire_bucket()
        os.makedirs(self.workdir, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:  # being written right now, or garbage: give a writer a moment
                    time.sleep(0.2)
                    holder = self._read()
                    if holder is None and time.time() - os.path.getmtime(self.path) < 10:
                        continue
                    holder = holder or {"pid": None, "host": "?", "started": "?", "command": "?"}
                pid, host = holder.get("pid"), holder.get("host")
                dead = host == self.info["host"] and isinstance(pid, int) and not _pid_alive(pid)
                if holder.get("pid") is None or dead:
                    log.warning("removing the stale lock %s of process %s on %s (started %s), which is no longer "
                                "running; this run takes the workdir over.", self.path, pid, host,
                                holder.get("started"))
                    try:
                        os.remove(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                raise self._busy(holder, "") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.info, f)
            self.held = True
            return self
        raise self._keeps_changing()

    def _busy(self, holder: dict[str, Any], refreshed: str) -> WorkdirBusy:
        stale = ""
        if self.remote:
            limit = STALE_AFTER_REFRESHES * _holder_interval(holder, self.refresh_s)
            stale = (f"; a lock not refreshed for {limit:g} s ({STALE_AFTER_REFRESHES} x its run's "
                     f"{LOCK_REFRESH_ENV}) is stale and the next run takes it over")
        return WorkdirBusy(
            f"workdir {self.workdir} is in use by process {holder.get('pid')} on host {holder.get('host')} (started "
            f"{holder.get('started')}{refreshed}: {holder.get('command')}); two runs cannot share a workdir. Fix: "
            f"wait for that run to end (or stop it), or pass another --workdir{stale}; if that process is gone for "
            f"good (e.g. its host died), delete {self.path}.")

    def _keeps_changing(self) -> WorkdirBusy:
        return WorkdirBusy(f"could not take the lock {self.path} (it keeps changing). Fix: make sure no other run "
                           "uses this workdir, or pass another --workdir.")

    # ----------------------------------------------------------------------------------------- in a bucket
    def _payload(self) -> bytes:
        return json.dumps({**self.info, "refreshed": time.time(), "refresh_s": self.refresh_s}).encode()

    def _why_stale(self, holder: dict[str, Any], obj: _BucketObject) -> tuple[str | None, str]:
        """``(why the holder's lock is stale or None, "; refreshed N s ago")``."""
        pid, host = holder.get("pid"), holder.get("host")
        refreshed = holder.get("refreshed")
        if not isinstance(refreshed, (int, float)) or isinstance(refreshed, bool):
            refreshed = obj.modified()  # not a lock this code wrote: the object's own time
        age = None if refreshed is None else max(0.0, time.time() - refreshed)
        said = "" if age is None else f"; lock refreshed {age:.0f} s ago"
        if host == self.info["host"] and isinstance(pid, int) and not _pid_alive(pid):
            return "its process is no longer running", said
        interval = _holder_interval(holder, self.refresh_s)
        if age is None or age > STALE_AFTER_REFRESHES * interval:
            return (f"not refreshed for {'ever' if age is None else f'{age:.0f} s'}, more than "
                    f"{STALE_AFTER_REFRESHES} x its refresh interval of {interval:g} s"), said
        return None, said

    def _acquire_bucket(self) -> WorkdirLock:
        obj = _BucketObject(self.path)
        for _ in range(5):
            if storage.create_exclusive(self.path, self._payload()):
                got = obj.read()
                if got is None:  # removed at once (cannot be a live run's doing): take it again
                    continue
                self._version = got[0]
                return self._held_in_bucket(obj)
            got = obj.read()
            if got is None:  # released in between: try again
                continue
            version, raw = got
            try:
                holder = json.loads(raw)
            except ValueError:
                holder = None
            if not isinstance(holder, dict):
                holder = {"pid": None, "host": "?", "started": "?", "command": "?"}
            why, refreshed = self._why_stale(holder, obj)
            if why is None:
                raise self._busy(holder, refreshed)
            new = obj.replace(self._payload(), version)
            if new is None:  # another run changed it first: look again
                continue
            log.warning("took over the stale lock %s of process %s on %s (started %s): %s.", self.path,
                        holder.get("pid"), holder.get("host"), holder.get("started"), why)
            self._version = new
            return self._held_in_bucket(obj)
        raise self._keeps_changing()

    def _held_in_bucket(self, obj: _BucketObject) -> WorkdirLock:
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._refresh, args=(obj,), name="mistral_jax_lock_refresh",
                                        daemon=True)
        self._thread.start()
        return self

    def _refresh(self, obj: _BucketObject) -> None:
        """Rewrite the lock every ``refresh_s`` seconds, each time only if it is still the version written last."""
        failing = False
        while not self._stop.wait(self.refresh_s):
            try:
                new = obj.replace(self._payload(), self._version)
            except Exception as e:  # noqa: BLE001 - a network error: try again at the next interval
                if not failing:
                    log.warning("could not refresh the workdir lock %s (%s: %s); retrying every %g s.", self.path,
                                type(e).__name__, " ".join(str(e).split())[:200], self.refresh_s)
                failing = True
                continue
            if new is None:
                log.error("the workdir lock %s was taken over by another run (it found this run's lock stale); "
                          "two runs may now write to %s. Fix: stop one of them.", self.path, self.workdir)
                self.held = False
                return
            if failing:
                log.warning("refreshed the workdir lock %s again.", self.path)
            failing = False
            self._version = new

    def _release_bucket(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        obj = _BucketObject(self.path)
        got = obj.read()
        if got is not None and got[0] == self._version:  # still ours
            obj.delete(self._version)

    def release(self) -> None:
        if not self.held:
            if self.remote:
                self._stop.set()
            return
        self.held = False
        if self.remote:
            return self._release_bucket()
        holder = self._read()
        if holder is not None and holder.get("pid") == self.info["pid"] and holder.get("host") == self.info["host"]:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder_interval(holder: dict[str, Any], default: float | None) -> float:
    """The refresh interval the lock's holder announced (``refresh_s``), else ``default`` (this run's)."""
    value = holder.get("refresh_s")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return float(default or DEFAULT_LOCK_REFRESH_S)


def archive_run(workdir: str, keep: tuple[str, ...] = (LOCK_NAME, ARCHIVE_DIR)) -> str | None:
    """Move everything in ``workdir`` (but the lock and earlier archives) to ``{workdir}/archive/<time>/``.

    Returns the archive directory, or None if there was nothing to move. Nothing is deleted (in a bucket a move
    is a copy, then the delete of the original).
    """
    root = storage.path(workdir)
    names = sorted(p.name for p in root.iterdir() if p.name not in keep) if root.is_dir() else []
    if not names:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = storage.join(workdir, ARCHIVE_DIR, stamp)
    n = 1
    while storage.path(dest).exists():
        n += 1
        dest = storage.join(workdir, ARCHIVE_DIR, f"{stamp}-{n}")
    if not storage.is_remote(workdir):
        os.makedirs(dest)
        for name in names:
            os.rename(os.path.join(workdir, name), os.path.join(dest, name))
        return dest
    for name in names:
        move_in_bucket(storage.join(workdir, name), storage.join(dest, name))
    return dest


def _missing_tokenizer(tokenizer: str) -> str | None:
    """Why ``config.data.tokenizer`` names no tokenizer file ("does not exist", ...), or None when it does."""
    from mistral_jax.data import tokenizer as tokenizer_lib

    if storage.is_remote(tokenizer):
        p = storage.path(tokenizer)
        if p.is_file():
            return None
        if not p.is_dir():
            return "does not exist"
        names = (tokenizer_lib.Tokenizer.FILENAME, tokenizer_lib.Tokenizer.TEKKEN_FILENAME)
        return None if any((p / n).is_file() for n in names) else f"is a directory without {' or '.join(names)}"
    try:
        path = tokenizer_lib.resolve(tokenizer)  # a mistral:... name's shipped file, a directory's tokenizer.model
    except ValueError as e:  # an unknown mistral:... name: its message says what is wrong and the fix
        return str(e).partition(". Fix: ")[0]
    if os.path.isfile(path):
        return None
    if not os.path.exists(tokenizer):
        return "does not exist"
    return (f"is a directory without {tokenizer_lib.Tokenizer.FILENAME} or {tokenizer_lib.Tokenizer.TEKKEN_FILENAME}"
            if os.path.isdir(tokenizer) else f"resolves to {path!r}, which is not a file")


def make_workdir(workdir: str, *, tokenizer: str | None = None) -> None:
    """Create a run's ``workdir`` (and its parents) once what the run reads is there and the workdir is writable.

    Checked first, before anything is created: ``tokenizer`` (``config.data.tokenizer``; a file, a directory
    holding one, or a ``mistral:`` name; local or in a bucket). Then the workdir is created and a probe file written
    and removed in it. A bucket workdir (``gs://``, ``s3://``) is checked by ``storage.check_bucket`` (the bucket
    exists and takes a probe object written and deleted under the workdir); nothing is created.
    A failure leaves nothing behind (directories this call created are removed) and raises ``ConfigError`` with
    one line naming the path and the fix.

    Raises:
      ConfigError: the tokenizer file does not exist, or the workdir cannot be created or written.
    """
    from mistral_jax.config import ConfigError

    if tokenizer:
        problem = _missing_tokenizer(tokenizer)
        if problem is not None:
            raise ConfigError(f"config.data.tokenizer={tokenizer!r} {problem}. Fix: pass --config.data.tokenizer="
                              "PATH of a sentencepiece tokenizer.model (or a tekken.json, or a directory holding one),"
                              " a Mistral name such as mistral:v3, or '' to train one on config.data.train.")
    if storage.is_remote(workdir):  # a bucket has no directories to create: it must exist and take writes
        try:
            storage.check_bucket(workdir, "--workdir", write=True)
        except storage.StorageError as e:
            raise ConfigError(str(e)) from None
        return
    workdir = os.path.abspath(workdir)
    created, parent = [], workdir
    while not os.path.exists(parent):  # the directories this call creates, innermost first
        created.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{os.getpid()}.{socket.gethostname()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        for d in created:  # leave nothing behind
            try:
                os.rmdir(d)
            except OSError:
                pass
        where = e.filename or workdir
        raise ConfigError(f"--workdir={workdir} cannot be written: {e.strerror or e} ({where}). Fix: pass a "
                          f"--workdir on a writable filesystem (e.g. under {os.path.expanduser('~')}), or make "
                          f"{where if os.path.exists(where) else os.path.dirname(where)} writable by this user."
                          ) from None
