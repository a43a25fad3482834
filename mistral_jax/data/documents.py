"""Streaming input reading: the units of work of an input spec, and the records of one unit, in flat memory.

Shared by ``data/prepare.py`` (one unit -> one prepared shard) and the on-the-fly loader.

Inputs (``units(spec)``): a file, a directory (recursively), a glob (``**`` included) or a comma-separated list of
those, local or ``gs://`` / ``s3://`` (listed through ``data.files``; each part's files sorted by path, the parts in
the given order, a file named twice read once). Supported files:

* ``.jsonl`` / ``.json`` (JSON lines; a ``.json`` file whose first character is ``[`` is a JSON array, read whole:
  use JSON lines for big files), ``.txt`` (one document per line, as HF ``datasets``' text builder), ``.parquet``
  (read by row group batches, column ``field``);
* ``.jsonl`` / ``.json`` / ``.txt`` compressed with gzip (``.gz``) or zstandard (``.zst``), streamed;
* a directory written by HF ``datasets``' ``save_to_disk`` (it holds ``state.json`` and ``dataset_info.json``): one
  unit per Arrow file listed in ``state.json``, in its order, read batch by batch with ``pyarrow.ipc`` (the same
  rows ``datasets.load_from_disk`` gives, without loading the table). A ``DatasetDict`` directory
  (``dataset_dict.json``) is refused: point at one split's directory.

A unit (``Unit``) is a whole file, or a byte range ``[start, end)`` of an uncompressed ``.jsonl`` / ``.txt`` file
larger than ``shard_bytes``. Ranges follow Hadoop's line-record semantics: a line belongs to the range holding its
first byte (a range with ``start > 0`` skips to just after the first newline at or after ``start - 1``), so the
ranges of a file give every line exactly once.

Decoding (``decode_lines``, also behind ``pipeline``'s file reader): bytes that are not UTF-8 follow
``on_decode_error`` (``"replace"``: U+FFFD, one warning per unit; ``"error"``: ``DataError`` naming file and
line); a unit with more than ``MAX_UNDECODABLE_FRACTION`` undecodable bytes raises under either policy.
Line numbers count from the unit's first line (a range names its bytes: ``file (bytes 100-200):3``).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator
from typing import IO, Any

from mistral_jax import storage
from mistral_jax.data import files

log = logging.getLogger(__name__)

DECODE_POLICIES = ("replace", "error")
# A file with more undecodable bytes than this (random bytes: ~45%) holds no UTF-8 text: refused even under
# "replace". Text in a Latin-1 code page stays well below it (accented letters are a few % of the bytes).
MAX_UNDECODABLE_FRACTION = 0.25


class DataError(ValueError):
    """Bad or missing training data (the message names the source and the fix); ``pipeline.DataError`` too."""

PLAIN = (".jsonl", ".json", ".txt", ".parquet")
COMPRESSION = (".gz", ".zst")
COMPRESSIBLE = (".jsonl", ".json", ".txt")
SUPPORTED = PLAIN + tuple(e + c for e in COMPRESSIBLE for c in COMPRESSION)
SPLITTABLE = (".jsonl", ".txt")  # uncompressed line files: byte ranges
ARROW = ".arrow"  # a file of an HF ``save_to_disk`` directory
HF_MARKERS = ("state.json", "dataset_info.json")
BATCH_ROWS = 1024  # parquet / arrow rows read at a time


@dataclasses.dataclass(frozen=True)
class Unit:
    """One unit of input: the bytes ``[start, end)`` of an uncompressed line file (``end=-1``: to the end), or a
    whole file of another kind."""

    path: str
    start: int = 0
    end: int = -1

    @property
    def key(self) -> str:
        """``path`` for a whole file, ``path#start-end`` for a byte range: stable across runs."""
        return self.path if (self.start, self.end) == (0, -1) else f"{self.path}#{self.start}-{self.end}"

    @property
    def where(self) -> str:
        """How error messages name the unit."""
        return self.path if (self.start, self.end) == (0, -1) else f"{self.path} (bytes {self.start}-{self.end})"


def supported(path: str) -> bool:
    return path.endswith(SUPPORTED)


def _base(path: str) -> str:
    """The name without a compression suffix (``a.jsonl`` of ``a.jsonl.gz``)."""
    for c in COMPRESSION:
        if path.endswith(c):
            return path[: -len(c)]
    return path


def _size(path: str) -> int:
    if storage.is_remote(path):
        fs, key = storage.fs_and_key(path)
        return int(fs.size(key))
    return os.path.getsize(path)


# --------------------------------------------------------------------------------------------------- listing
def _hf_files(directory: str) -> list[str]:
    """The Arrow files of an HF ``save_to_disk`` directory, in ``state.json``'s order."""
    state = json.loads(storage.read_bytes(storage.join(directory, "state.json")))
    names = [d["filename"] for d in state.get("_data_files", [])]
    if not names:
        raise DataError(f"{directory}: an HF datasets directory whose state.json lists no data files. Fix: save the "
                        "dataset again with Dataset.save_to_disk.")
    return [storage.join(directory, n) for n in names]


def _is_hf_dir(directory: str) -> bool:
    return all(files.isfile(storage.join(directory, m)) for m in HF_MARKERS)


def _dir_files(spec: str, directory: str) -> list[str]:
    """Supported files under ``directory``; HF datasets directories inside it contribute their Arrow files."""
    if files.isfile(storage.join(directory, "dataset_dict.json")):
        splits = json.loads(storage.read_bytes(storage.join(directory, "dataset_dict.json"))).get("splits")
        raise DataError(f"input {spec!r} is an HF DatasetDict (splits {splits}). Fix: point at one split's "
                        f"directory, e.g. {storage.join(directory, (splits or ['train'])[0])}.")
    if _is_hf_dir(directory):
        return _hf_files(directory)
    found = files.walk(directory)
    sep = "/" if storage.is_remote(directory) else os.sep
    roots = sorted({f.rsplit(sep, 1)[0] for f in found if f.endswith(sep + "state.json")
                    and f.rsplit(sep, 1)[0] + sep + "dataset_info.json" in found})
    out: list[tuple[str, list[str]]] = []
    for f in found:
        if any(f.startswith(r + sep) for r in roots):
            continue
        if supported(f):
            out.append((f, [f]))
    out += [(r + sep, _hf_files(r)) for r in roots]
    return [f for _, fs in sorted(out) for f in fs]


def check_remote(spec: str, what: str) -> bool:
    """Whether ``spec`` is a URL; a bucket URL is checked first (an unreachable endpoint, a missing bucket, no
    credentials, an unknown scheme: one ``DataError`` line before any listing)."""
    if storage.url_scheme(spec) is None:
        return False
    try:
        storage.check_bucket(spec, what)
    except (storage.StorageError, storage.UnsupportedPath) as e:
        raise DataError(str(e)) from None
    return True


def expand(spec: str) -> list[str]:
    """The input files of ``spec`` (see the module docstring), in reading order; ``DataError`` (one line) if a part
    names nothing readable."""
    parts = [p.strip() for p in str(spec or "").split(",") if p.strip()]
    if not parts:
        raise DataError(f"no inputs given ({spec!r}). Fix: pass files, directories or globs of "
                        f"{'/'.join(SUPPORTED)} files, or an HF save_to_disk directory, comma-separated.")
    out: list[str] = []
    for part in parts:
        remote = check_remote(part, "input")
        path = part if remote else os.path.abspath(os.path.expanduser(part))
        if files.is_glob(part):
            found = [f for f in files.glob(path) if supported(f)]
            if not found:
                raise DataError(f"input glob {part!r} matches no {'/'.join(SUPPORTED)} files. Fix: check the "
                                "pattern and the working directory.")
        elif files.isdir(path):
            found = _dir_files(part, path)
            if not found:
                raise DataError(f"input directory {part!r} holds no {'/'.join(SUPPORTED)} files. Fix: point at a "
                                "directory of such files, a file, or an HF save_to_disk directory.")
        elif files.isfile(path):
            if not supported(path):
                raise DataError(f"input file {part!r} is not a supported kind. Fix: use {'/'.join(SUPPORTED)} "
                                "files (or an HF save_to_disk directory).")
            found = [path]
        else:
            where = "" if remote else f" (cwd: {os.getcwd()})"
            raise DataError(f"input {part!r} does not exist{where}. Fix: give an existing file, directory or glob.")
        out += [f for f in found if f not in out]
    return out


def units(spec: str, *, shard_bytes: int = 64 << 20) -> list[Unit]:
    """The units of ``spec``: its files in order; an uncompressed ``.jsonl`` / ``.txt`` file larger than
    ``shard_bytes`` as consecutive byte ranges of ``shard_bytes`` (the last one to the file's size)."""
    if shard_bytes < 1:
        raise DataError(f"shard_bytes={shard_bytes}: must be >= 1. Fix: pass e.g. 67108864 (64 MiB).")
    out = []
    for path in expand(spec):
        size = _size(path) if path.endswith(SPLITTABLE) else 0
        if size <= shard_bytes:
            out.append(Unit(path))
            continue
        out += [Unit(path, s, min(s + shard_bytes, size)) for s in range(0, size, shard_bytes)]
    return out


def fingerprint(path: str) -> dict[str, Any]:
    """``{"path", "bytes", "sha256"}`` of a source file (streamed)."""
    digest, n = hashlib.sha256(), 0
    with files.open_binary(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            n += len(block)
    return {"path": path, "bytes": n, "sha256": digest.hexdigest()}


def sources(us: Iterable[Unit]) -> list[str]:
    """The distinct files of ``us``, in order."""
    return list(dict.fromkeys(u.path for u in us))


# --------------------------------------------------------------------------------------------------- reading
def decode_lines(raw_lines: Iterable[bytes], where: str, on_decode_error: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of raw lines, with the decode-error policy of the module docstring."""
    if on_decode_error not in DECODE_POLICIES:
        raise DataError(f"on_decode_error={on_decode_error!r}. Fix: use one of {DECODE_POLICIES}.")
    bad, first, bad_bytes, total, lineno = 0, None, 0, 0, 0
    for lineno, raw in enumerate(raw_lines, 1):
        total += len(raw)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if on_decode_error == "error":
                raise DataError(f"{where}:{lineno}: not valid UTF-8 ({e}). Fix: re-encode the file as UTF-8, or "
                                "set config.data.on_decode_error='replace' to decode bad bytes as U+FFFD.") from e
            bad += 1
            first = first or lineno
            escaped = raw.decode("utf-8", errors="surrogateescape")  # one lone surrogate per undecodable byte
            bad_bytes += sum(1 for ch in escaped if "\udc80" <= ch <= "\udcff")
            line = raw.decode("utf-8", errors="replace")
        yield lineno, line
    if bad_bytes > MAX_UNDECODABLE_FRACTION * total:
        raise DataError(f"{where}: {bad_bytes} of its {total} bytes ({bad_bytes / total:.0%}, in {bad} of {lineno} "
                        f"lines) are not valid UTF-8: it holds no UTF-8 text (random or binary data, or text in "
                        f"another encoding), and more than {MAX_UNDECODABLE_FRACTION:.0%} undecodable bytes are "
                        "refused even with config.data.on_decode_error='replace'. Fix: re-encode the file as UTF-8 "
                        "(e.g. `iconv -f LATIN1 -t UTF-8`), or remove it from config.data.train.")
    if bad:
        log.warning("%s: %d line(s) are not valid UTF-8 (first: line %d); their bad bytes were replaced by U+FFFD "
                    "(config.data.on_decode_error='replace').", where, bad, first)


def _open_stream(path: str, raw: IO[bytes]) -> IO[bytes]:
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    return raw


def _raw_lines(unit: Unit) -> Iterator[bytes]:
    """The raw lines of a line-file unit (Hadoop semantics for byte ranges), streamed."""
    with files.open_binary(unit.path) as raw:
        if (unit.start, unit.end) == (0, -1):
            yield from _open_stream(unit.path, raw)
            return
        pos = unit.start
        if unit.start > 0:
            raw.seek(unit.start - 1)
            pos = unit.start - 1 + len(raw.readline())  # the line holding byte start-1 belongs to the unit before
        while unit.end < 0 or pos < unit.end:
            line = raw.readline()
            if not line:
                return
            pos += len(line)
            yield line


def _first_char(unit: Unit) -> bytes:
    with files.open_binary(unit.path) as raw:
        f = _open_stream(unit.path, raw)
        while True:
            block = f.read(4096)
            if not block:
                return b""
            s = block.lstrip()
            if s:
                return s[:1]


def _batches(unit: Unit, columns: list[str] | None) -> Iterator[list[dict[str, Any]]]:
    """Rows of a parquet or Arrow unit, ``BATCH_ROWS`` at a time."""
    import pyarrow as pa

    with files.open_binary(unit.path) as f:
        if unit.path.endswith(".parquet"):
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            reader: Iterable[Any] = (pf.iter_batches(batch_size=BATCH_ROWS, columns=columns)
                                     if columns is None or set(columns) <= set(names) else ())
        else:
            source = pa.memory_map(unit.path) if not storage.is_remote(unit.path) else f
            try:
                rd = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                rd = pa.ipc.open_file(source)
                reader = (rd.get_batch(i) for i in range(rd.num_record_batches))
            else:
                reader = rd
            names = rd.schema.names
        if columns is not None and not set(columns) <= set(names):
            raise DataError(f"{unit.where}: no column {columns[0]!r} (columns: {names}). Fix: set the text field "
                            "(--text_field / config.data.text_field) to the column holding the text.")
        for batch in reader:
            if columns is not None:
                batch = batch.select(columns)
            yield batch.to_pylist()


def _json_records(unit: Unit, on_decode_error: str) -> Iterator[tuple[int, Any]]:
    """``(line or array index, record)`` of a JSON lines / JSON array unit."""
    if _base(unit.path).endswith(".json") and unit.start == 0 and _first_char(unit) == b"[":
        text = "".join(line for _, line in decode_lines(_raw_lines(unit), unit.where, on_decode_error))
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{unit.where}:{e.lineno}: malformed JSON ({e.msg}). Fix: the file must be a JSON array "
                            "of objects or JSON lines.") from e
        yield from enumerate(records, 1)
        return
    for lineno, line in decode_lines(_raw_lines(unit), unit.where, on_decode_error):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{unit.where}:{lineno}: malformed JSON line ({e.msg}): {line[:80]!r}. "
                            "Fix: one JSON object per line (JSON lines).") from e


def read_records(unit: Unit, *, field: str = "text", on_decode_error: str = "replace") -> Iterator[dict[str, Any]]:
    """The records of ``unit`` as dicts (chat / preference data): JSON objects, parquet / Arrow rows; a ``.txt``
    line is ``{field: line}``."""
    if unit.path.endswith((".parquet", ARROW)):
        for batch in _batches(unit, None):
            yield from batch
        return
    if _base(unit.path).endswith(".txt"):
        for _, line in decode_lines(_raw_lines(unit), unit.where, on_decode_error):
            yield {field: line.rstrip("\n")}
        return
    for lineno, rec in _json_records(unit, on_decode_error):
        if not isinstance(rec, dict):
            raise DataError(f"{unit.where}:{lineno}: a record is a {type(rec).__name__}, not a JSON object. "
                            "Fix: one JSON object per line (JSON lines).")
        yield rec


def read_unit(unit: Unit, *, field: str = "text", on_decode_error: str = "replace") -> Iterator[Any]:
    """The documents of ``unit``: the strings under ``field`` (records whose ``field`` is not a string are
    skipped, a record without ``field`` is a ``DataError``); a ``.txt`` line is one document (without its
    newline)."""
    if unit.path.endswith((".parquet", ARROW)):
        for batch in _batches(unit, [field]):
            yield from (r[field] for r in batch if isinstance(r[field], str))
        return
    if _base(unit.path).endswith(".txt"):
        for _, line in decode_lines(_raw_lines(unit), unit.where, on_decode_error):
            yield line.rstrip("\n")
        return
    for lineno, rec in _json_records(unit, on_decode_error):
        if not isinstance(rec, dict) or field not in rec:
            keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise DataError(f"{unit.where}:{lineno}: record has no {field!r} field (has {keys}). "
                            "Fix: set config.data.text_field to the key holding the text.")
        if isinstance(rec[field], str):
            yield rec[field]
