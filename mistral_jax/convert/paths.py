"""Where a conversion or export may write, so that nothing is lost.

* An output never overlaps what is read: it may not be an input directory, lie inside one, or contain one
  (compared as real paths, symlinks resolved), nor contain a file that is read (e.g. the tokenizer).
* ``overwrite`` only ever replaces a *previous export of the same kind*: a directory holding nothing but the
  files that export writes (an HF export: ``config.json`` + ``model*.safetensors`` ...). A training workdir
  (``checkpoints/``, ``metrics.jsonl``, ``tb/``...), a downloaded checkpoint with other files, an export of
  another kind or a directory of sibling runs is refused, whatever ``overwrite`` says.
* Outputs are written to a temporary sibling ``.<name>.tmp-<host>-<pid>-<random>`` and renamed into place (see
  ``atomic_dir``); the replaced export is parked in ``.<name>.old-<host>-<pid>-<random>`` until the rename
  is done. A killed conversion leaves those behind: the next conversion into the same place removes them when
  their owning process (same host, pid from the name) is gone, and puts a parked export back if the kill came
  between the two renames. Directories of a live process, of another host, or not named by this pattern are
  never touched.

On a bucket (``gs://``, ``s3://``) there is no rename: an export is written in place, between two markers.

* ``mistral_jax_export.incomplete`` (``INCOMPLETE``) is created first (only if absent: GCS ``ifGenerationMatch=0`` /
  S3 ``If-None-Match``, so two exports never write the same place at once), recording the kind, host and pid.
  When overwriting, the previous export's completion marker goes next, then its files.
* ``mistral_jax_export.json`` (``MARKER``) is written last, listing every file of the export with its size;
  then ``INCOMPLETE`` is removed. A failed export removes what it wrote (and ``INCOMPLETE``); a killed one leaves
  ``INCOMPLETE`` behind, and ``overwrite`` may replace it (unless its process is alive on this host).
* Readers (``check_complete``, run by ``loading`` on every checkpoint directory it opens) tell the cases apart:
  a directory with ``MARKER`` is a finished mistral_jax export, and every file it lists must be there with its
  size; one with ``INCOMPLETE`` but no ``MARKER`` is an unfinished one and is refused (``IncompleteExportError``,
  one line: rerun the export); one with neither was written by another tool (an HF repo copied to a bucket, a
  training workdir, whose steps Orbax commits itself) and is read as before.

Local exports carry no marker (the rename is their commit); a local copy of a bucket export keeps its markers and
is checked the same way.

This module imports nothing heavy, so command-line tools can validate their arguments before loading anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence

from mistral_jax import storage
from mistral_jax.convert import files as fileio

log = logging.getLogger(__name__)

# what each kind of export writes (and nothing else); ``dirs`` are sub-directories, ``required`` must be present
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_TOKENIZER_FILES = {"tokenizer.model", "tekken.json"}
EXPORT_FILES: dict[str, dict[str, set[str]]] = {
    "hf": {"files": {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                     "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model.v2",
                     "tokenizer.model.v3", "tokenizer.model.v7", *_TOKENIZER_FILES},
           "dirs": set(), "required": {"config.json"}},
    "mistral": {"files": {"params.json", "consolidated.safetensors", *_TOKENIZER_FILES}, "dirs": set(),
                "required": {"params.json", "consolidated.safetensors"}},
    "jax": {"files": {"model_config.json", *_TOKENIZER_FILES}, "dirs": {"params"},
            "required": {"model_config.json", "params"}},
    # LoRA adapters alone in PEFT's format (convert/peft.py)
    "peft": {"files": {"adapter_config.json", "adapter_model.safetensors"}, "dirs": set(),
             "required": {"adapter_config.json", "adapter_model.safetensors"}},
    # llama.cpp's one-file format (convert/gguf.py)
    "gguf": {"files": {"model.gguf"}, "dirs": set(), "required": {"model.gguf"}},
}
# a bucket export's markers: written first (removed last) and written last (see the module docstring)
MARKER = "mistral_jax_export.json"
INCOMPLETE = "mistral_jax_export.incomplete"
# signs of a training run (never replaced)
RUN_MARKERS = ("checkpoints", "run_config.json", "metrics.jsonl", "tb", "corrupt_checkpoints", ".lock", "archive")


class OutputPathError(ValueError):
    """The output path overlaps an input; ``problem`` and ``fix`` are the two halves of the message."""

    def __init__(self, out_dir: str, problem: str, fix: str):
        self.out_dir, self.problem, self.fix = out_dir, problem, fix
        super().__init__(f"output {out_dir!r} {problem}. Fix: {fix}.")


class IncompleteExportError(ValueError):
    """A mistral_jax export that was not finished (or no longer matches its completion marker): refused."""


class OutputExistsError(FileExistsError):
    """The output exists and may not be replaced; ``problem`` and ``fix`` as for :class:`OutputPathError`."""

    def __init__(self, out_dir: str, problem: str, fix: str):
        self.out_dir, self.problem, self.fix = out_dir, problem, fix
        super().__init__(f"output directory {out_dir!r} {problem}. Fix: {fix}.")


def real(path: str | os.PathLike) -> str:
    """The absolute path with every symlink resolved (also for a path that does not exist yet); a bucket URL as it
    is (without a trailing slash: buckets have no symlinks)."""
    if storage.is_remote(path):
        return storage.absolute(path)
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _within(path: str, root: str) -> bool:
    """``path`` is ``root`` or lies below it (both real paths, or both bucket URLs)."""
    sep = "/" if storage.is_remote(root) else os.sep
    return path == root or path.startswith(root.rstrip(sep) + sep)


def check_not_overlapping(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                          files: Iterable[str | os.PathLike] = ()) -> None:
    """Raise :class:`OutputPathError` if ``out_dir`` is an input dir, inside one, a parent of one, or holds a file
    that is read (``files``, e.g. a tokenizer). Paths are compared after resolving symlinks."""
    out = real(out_dir)
    shown = os.fspath(out_dir)
    for d in inputs:
        if d is None:
            continue
        d_real = real(d)
        where = f" (real path {out})" if out != storage.absolute(shown) else ""
        if out == d_real:
            raise OutputPathError(shown, f"is the input directory {os.fspath(d)!r}{where}",
                                  "write the output to a new directory outside the input, e.g. "
                                  f"{os.path.basename(d_real.rstrip(os.sep)) or 'out'}_export next to it")
        if _within(out, d_real):
            raise OutputPathError(shown, f"lies inside the input directory {os.fspath(d)!r}{where}",
                                  "write the output to a directory outside the input")
        if _within(d_real, out):
            raise OutputPathError(shown, f"contains the input directory {os.fspath(d)!r}{where}; replacing it "
                                  "would delete the input", "write the output to a new directory that does not "
                                  "contain the input")
    for f in files:
        if f is not None and _within(real(f), out):
            raise OutputPathError(shown, f"contains {os.fspath(f)!r}, which the export reads",
                                  "write the output to a directory that does not contain its inputs")


def replace_problem(out_dir: str | os.PathLike, kind: str) -> str | None:
    """Why an existing, non-empty ``out_dir`` may not be replaced by a ``kind`` export (None: it may).

    Only a previous export of the same kind may be replaced: nothing but the files that kind of export writes
    (and a bucket export's markers), and its required ones present, or an unfinished bucket export of that kind.
    """
    out = os.fspath(out_dir)
    kinds = fileio.entries(out)  # symlinks are "link": never taken for an export's file or directory
    names = sorted(kinds)
    run = [n for n in names if n in RUN_MARKERS]
    if run:
        return f"holds a training run ({', '.join(run)})"  # checked first: a workdir has a model_config.json too
    spec = EXPORT_FILES[kind]
    other = [n for n in names
             if not ((n in spec["files"] or n in (MARKER, INCOMPLETE) or (kind == "hf" and _SHARD.fullmatch(n)))
                     and kinds[n] == "file")
             and not (n in spec["dirs"] and kinds[n] == "dir")]
    if other:
        shown = other[:8] + (["..."] if len(other) > 8 else [])
        return f"holds what a {kind} export does not write: {', '.join(shown)}"
    if INCOMPLETE in names and MARKER not in names:
        started = _read_json(storage.join(out, INCOMPLETE)) or {}
        if started.get("kind") not in (None, kind):
            return f"holds an unfinished {started['kind']} export"
        return None  # an unfinished export of this kind: rewriting it is what the user wants
    missing = sorted(spec["required"] - set(names))
    if missing:
        return f"lacks {', '.join(missing)}"
    return None


def _read_json(path: str) -> dict | None:
    try:
        d = fileio.read_json(path)
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def check_output(out_dir: str | os.PathLike, kind: str | None, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike] = (), files: Iterable[str | os.PathLike] = ()) -> str:
    """Check that a ``kind`` export may be written at ``out_dir``; returns its real path (a bucket URL as it is).

    Raises:
      storage.UnsupportedPath: a URL of a scheme the project cannot write (``hdfs://`` ...).
      storage.StorageError: a bucket that cannot be reached or does not exist (one line, with the fix).
      OutputPathError: ``out_dir`` overlaps an input (see :func:`check_not_overlapping`).
      OutputExistsError: ``out_dir`` is a file, or a non-empty directory and not ``overwrite``, or one that is not
        a previous ``kind`` export (a training run, another checkpoint, sibling runs...) even with ``overwrite``.
        ``kind=None`` accepts only an absent or empty directory.
    """
    if kind is not None and kind not in EXPORT_FILES:
        raise ValueError(f"unknown export kind {kind!r}. Fix: use one of {sorted(EXPORT_FILES)}.")
    storage.check_supported(out_dir, "output")  # e.g. hdfs:// would be written as a local directory named "hdfs:"
    check_not_overlapping(out_dir, inputs, files)
    out = real(out_dir)
    shown = os.fspath(out_dir)
    if storage.is_remote(out):
        storage.check_bucket(out, "output")
        is_file = fileio.is_file(out)
    else:
        is_file = os.path.lexists(out) and not os.path.isdir(out)
    if is_file:
        raise OutputExistsError(shown, "exists and is not a directory", "choose a directory path")
    if fileio.entries(out):
        if kind is None:
            raise OutputExistsError(shown, "exists and is not empty", "choose a new path or remove it")
        problem = replace_problem(out, kind)
        if problem:
            raise OutputExistsError(shown, f"exists and is not empty, and it is not a previous {kind} export (it "
                                    f"{problem}); overwrite only ever replaces a previous {kind} export",
                                    "choose a new output path (or remove that directory yourself if it is "
                                    "really to go)")
        if not overwrite:
            raise OutputExistsError(shown, f"exists and is not empty (a previous {kind} export)",
                                    "choose a new path, remove it, or pass overwrite=True (--overwrite) to "
                                    "replace it")
    return out


def check_complete(path: str | os.PathLike, what: str = "checkpoint") -> None:
    """Refuse a mistral_jax export that is unfinished or no longer whole (see the module docstring).

    Raises:
      IncompleteExportError: one line naming ``what`` (e.g. ``--input``), the directory, what is missing, and the
        fix (rerun the export).
    """
    path = os.fspath(path)
    shown = f"{what}={path!r}"
    names = fileio.entries(path)
    if MARKER in names:
        marker = _read_json(storage.join(path, MARKER))
        listed = marker.get("files") if marker else None
        if not isinstance(listed, dict):
            raise IncompleteExportError(f"{shown}: its completion marker {MARKER} is unreadable. Fix: rerun the "
                                        "export into it with --overwrite (overwrite=True).")
        have = fileio.listing(path)
        missing = sorted(f for f in listed if f not in have)
        changed = sorted(f for f in listed if f in have and have[f] != listed[f])
        if missing or changed:
            what = "; ".join(f"{label} {', '.join(fs[:4])}{' ...' if len(fs) > 4 else ''}"
                             for label, fs in (("missing", missing), ("size changed", changed)) if fs)
            raise IncompleteExportError(f"{shown} does not hold the files its {MARKER} lists ({what}): it was "
                                        "copied or deleted in part. Fix: rerun the export into it with --overwrite "
                                        "(overwrite=True), or copy the whole export again.")
    elif INCOMPLETE in names:
        started = _read_json(storage.join(path, INCOMPLETE)) or {}
        who = f" (a {started.get('kind')} export by pid {started.get('pid')} on {started.get('host')})" \
            if started.get("pid") else ""
        raise IncompleteExportError(f"{shown} is an unfinished mistral_jax export{who}: it has {INCOMPLETE} but no "
                                    f"{MARKER}, so the export failed, was killed, or is still running. Fix: rerun "
                                    "the export into it with --overwrite (overwrite=True), or wait for the running "
                                    "one to finish.")


# ----------------------------------------------------------------------------- temporary directories
def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def temp_name(out_dir: str, what: str = "tmp") -> str:
    """A fresh hidden sibling of ``out_dir`` owned by this process: ``.<name>.<what>-<host>-<pid>-<random>``."""
    parent, base = os.path.split(out_dir.rstrip(os.sep))
    return os.path.join(parent, f".{base}.{what}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _pattern(base: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(base)}\.(?P<what>tmp|old)-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-[0-9a-f]{{8}}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a pid we may not signal counts as alive)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def clean_stale(out_dir: str | os.PathLike) -> list[str]:
    """Remove the temporary siblings of ``out_dir`` left by killed conversions on this host; returns their paths.

    Only directories named by :func:`temp_name`'s pattern whose process is dead are touched. A parked previous
    export (``.old-``) is moved back to ``out_dir`` when ``out_dir`` is missing (the kill came between the two
    renames), and removed otherwise.
    """
    if storage.is_remote(out_dir):
        return []  # buckets have no temporary siblings (see the module docstring)
    out = real(out_dir)
    parent, base = os.path.split(out.rstrip(os.sep))
    if not os.path.isdir(parent):
        return []
    pat, host, done = _pattern(base), _host(), []
    for name in sorted(os.listdir(parent)):
        m = pat.fullmatch(name)
        path = os.path.join(parent, name)
        if not m or m["host"] != host or pid_alive(int(m["pid"])) or os.path.islink(path) or not os.path.isdir(path):
            continue
        if m["what"] == "old" and not os.path.lexists(out):
            os.replace(path, out)
            log.warning("restored %s from %s, parked there by a conversion (pid %s) that was killed",
                        out, path, m["pid"])
        else:
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s, left by a conversion (pid %s) that was killed", path, m["pid"])
        done.append(path)
    return done


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False, kind: str | None = None,
               inputs: Sequence[str | os.PathLike] = (), files: Sequence[str | os.PathLike] = ()) -> Iterator[str]:
    """Yield a temporary sibling of ``out_dir`` to write into; on success it replaces ``out_dir`` at once.

    On any exception the temporary directory is removed and ``out_dir`` is left as it was (absent, or the old
    contents when overwriting), so a failed conversion never leaves a half-written checkpoint. Before anything
    is written, ``check_output`` refuses an ``out_dir`` that overlaps ``inputs`` / ``files`` or that is not
    a previous ``kind`` export (``overwrite`` never replaces anything else), and temporary siblings left by
    killed conversions are cleaned up (``clean_stale``).

    On a bucket, ``out_dir`` itself is yielded and written between the two markers (module docstring): it looks
    complete only once ``MARKER`` is written. A failure removes what was written; when overwriting, the previous
    export was removed before writing began.

    Args:
      out_dir: the directory to create (symlinks resolved: the export lands where the path really points), or a
        ``gs://`` / ``s3://`` path.
      overwrite: replace a previous ``kind`` export at ``out_dir``.
      kind: ``hf`` / ``mistral`` / ``jax``: what is written (what may be replaced). None: only an absent or
        empty ``out_dir`` is accepted.
      inputs: directories read by the conversion (the output may not be, be inside or contain one).
      files: files read by the conversion (the output may not contain one).
    """
    storage.check_supported(out_dir, "output")  # before anything: hdfs:// ... is never taken for a local path
    if storage.is_remote(out_dir):
        with _bucket_dir(out_dir, overwrite, kind, inputs, files) as out:
            yield out
        return
    check_not_overlapping(out_dir, inputs, files)
    clean_stale(out_dir)  # first: it may put back a previous export parked by a killed conversion
    out_dir = check_output(out_dir, kind, overwrite, inputs, files)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = temp_name(out_dir, "tmp")
    os.makedirs(tmp)
    try:
        yield tmp
        old = None
        if os.path.isdir(out_dir):
            if os.listdir(out_dir):
                check_output(out_dir, kind, overwrite, inputs, files)  # still replaceable after writing?
                old = temp_name(out_dir, "old")
                os.replace(out_dir, old)
            else:
                os.rmdir(out_dir)
        os.replace(tmp, out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _bucket_dir(out_dir: str | os.PathLike, overwrite: bool, kind: str | None, inputs: Sequence[str | os.PathLike],
                files: Sequence[str | os.PathLike]) -> Iterator[str]:
    """``atomic_dir`` on a bucket: ``INCOMPLETE`` first, the export in place, ``MARKER`` last."""
    shown = os.fspath(out_dir)
    out = check_output(out_dir, kind, overwrite, inputs, files)
    incomplete, marker = storage.join(out, INCOMPLETE), storage.join(out, MARKER)
    mine = json.dumps({"kind": kind, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
    if not storage.create_exclusive(incomplete, mine):  # an unfinished export is there (check_output let it pass)
        other = _read_json(incomplete) or {}
        pid = int(other.get("pid") or -1)
        live = other.get("host") == socket.gethostname() and pid != os.getpid() and pid_alive(pid)
        if live or not overwrite:
            who = f"process {pid} on this host" if live else f"process {pid} on {other.get('host')}"
            raise OutputExistsError(shown, f"is being written by another export ({who}: {INCOMPLETE} is there)",
                                    "wait for it to finish, or choose another output path" if live else
                                    "wait for it to finish, or pass overwrite=True (--overwrite) if it was killed")
        storage.write_bytes(incomplete, mine)
    try:
        storage.remove(marker)  # a previous export stops looking complete before any of its files goes
        for name in fileio.entries(out):
            if name != INCOMPLETE:
                fileio.remove_tree(storage.join(out, name))
        yield out
        written = {f: n for f, n in fileio.listing(out).items() if f not in (INCOMPLETE, MARKER)}
        fileio.write_json(marker, {"format": "mistral_jax export", "kind": kind, "files": written}, indent=2,
                          sort_keys=True)
    except BaseException:
        with contextlib.suppress(Exception):  # best effort: if this fails, INCOMPLETE stays and readers refuse
            for name in fileio.entries(out):
                if name != INCOMPLETE:
                    fileio.remove_tree(storage.join(out, name))
            storage.remove(incomplete)
        raise
    storage.remove(incomplete)
