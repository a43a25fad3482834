"""Whether a workdir's checkpoints belong to this config, and who owns the workdir.

* ``layout_differences`` (on ``Checkpointer``) compares what Orbax wrote (its array metadata: tree, shapes,
  dtypes) with the train state the current config builds through ``compare_layouts`` here. A step whose metadata
  differs is a *mismatch* (``CheckpointMismatch``: a different run, never moved); ``looks_like_mismatch`` tells
  such an Orbax restore error from damage.
* ``make_workdir`` creates the workdir after checking what the run reads and that the workdir can be written, so
  a bad path is one error and leaves nothing behind. ``WorkdirLock`` gives a workdir one owner; ``archive_run``
  moves a finished or abandoned run aside (``{workdir}/archive/<time>/``) instead of deleting it.

The Orbax side (save, restore, resume) is ``training.checkpoint``, which re-exports these names.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from typing import Any

import jax
import numpy as np

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


class WorkdirLock:
    """``{workdir}/.lock``: the workdir's single owner (process 0 of a run), created with ``O_EXCL``.

    The file holds ``{"pid", "host", "started", "command"}``. A lock whose process is dead (same host) is stale:
    reported and taken over. A live holder, or one on another host, raises ``WorkdirBusy``. ``release()`` removes
    the file if it is still ours.
    """

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.held = False
        self.info = {"pid": os.getpid(), "host": socket.gethostname(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:500]}

    def _read(self) -> dict[str, Any] | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def acquire(self) -> WorkdirLock:
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
                raise WorkdirBusy(
                    f"workdir {self.workdir} is in use by process {pid} on host {host} (started "
                    f"{holder.get('started')}: {holder.get('command')}); two runs cannot share a workdir. Fix: wait "
                    f"for that run to end (or stop it), or pass another --workdir; if that process is gone for good "
                    f"(e.g. its host died), delete {self.path}.") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.info, f)
            self.held = True
            return self
        raise WorkdirBusy(f"could not take the lock {self.path} (it keeps changing). Fix: make sure no other run "
                          "uses this workdir, or pass another --workdir.")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
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


def archive_run(workdir: str, keep: tuple[str, ...] = (LOCK_NAME, ARCHIVE_DIR)) -> str | None:
    """Move everything in ``workdir`` (but the lock and earlier archives) to ``{workdir}/archive/<time>/``.

    Returns the archive directory, or None if there was nothing to move. Nothing is deleted.
    """
    names = sorted(n for n in os.listdir(workdir) if n not in keep) if os.path.isdir(workdir) else []
    if not names:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = os.path.join(workdir, ARCHIVE_DIR, stamp)
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(workdir, ARCHIVE_DIR, f"{stamp}-{n}")
    os.makedirs(dest)
    for name in names:
        os.rename(os.path.join(workdir, name), os.path.join(dest, name))
    return dest


def _missing_tokenizer(tokenizer: str) -> str | None:
    """Why ``config.data.tokenizer`` names no tokenizer file ("does not exist", ...), or None when it does."""
    from mistral_jax.data import tokenizer as tokenizer_lib

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
    holding one, or a ``mistral:`` name). Then the workdir is created and a probe file written and removed in it.
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
