"""The prepared data format: tokenized (and packed) rows in ArrayRecord shards plus a manifest, local or in a bucket.

``python -m mistral_jax.data.prepare`` writes it (``data/prepare.py``; ``data/prepare_beam.py`` is the same transform
as an Apache Beam pipeline); the training loader reads it with Grain (``data/loader.py``). Layout of a prepared
dataset directory::

    manifest.json                    written last: a directory without it is an unfinished prepare
    shards/part-00000.array_record   one shard per unit of input (a file, or a byte range of a large file)
    shards/part-00001.array_record
    ...

A record is one row: the fields of a training batch row (``tokens``, ``targets``, ``positions``, ``segment_ids``,
``weights``; preference rows add a side axis and ``pair_mask``), each stored in the smallest dtype that holds it
(``storage_fields``: token ids in ``uint16`` when the vocabulary fits, 0/1 weights in ``uint8``) and concatenated in
the manifest's field order; ``decode_row`` gives them back in the training dtypes (``int32`` / ``float32``).

The manifest holds what the loader checks before any device work (``open_dataset``): the format version, the kind
(``text`` / ``chat`` / ``preference``), the tokenizer's identity (name, kind, sha256 of its file, vocabulary size,
BOS / EOS ids), ``seq_len``, packing, the fields, every shard (file, rows, tokens, documents, bytes, sha256) and the
sources (path, size, sha256) with document / token / row counts.

Reading: ``gs://`` and local shards are read by ArrayRecord itself (random access, the C++ reader; the GCS
emulator is honoured through ``CLOUD_STORAGE_EMULATOR_ENDPOINT``, set by ``storage.configure``); ``s3://`` shards,
which ArrayRecord cannot open, are copied once into ``storage.cache_dir("prepared", <manifest hash>)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mistral_jax import storage

log = logging.getLogger(__name__)

FORMAT = "mistral_jax.prepared"
VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
KINDS = ("text", "chat", "preference")
# one record per row, each compressed on its own (random access reads one row); snappy: a third of zstd's write
# time for about the same size on token rows (positions and segment ids compress well either way)
WRITER_OPTIONS = "group_size:1,snappy"
# the dtype each field has in a training batch
LOAD_DTYPES = {"tokens": "int32", "targets": "int32", "positions": "int32", "segment_ids": "int32",
               "weights": "float32", "pair_mask": "float32"}


class PreparedError(ValueError):
    """A prepared dataset that cannot be used as asked (the message names the file, the values and the fix)."""


def shard_name(index: int) -> str:
    """``shards/part-00007.array_record``: the file of unit ``index`` (relative to the dataset directory)."""
    return f"{SHARDS}/part-{index:05d}.array_record"


def tokenizer_identity(tok: Any) -> dict[str, Any]:
    """What identifies a tokenizer in a manifest: name (``mistral:v3`` or the file name), kind, sha256 of its file,
    vocabulary size, BOS / EOS ids. Two tokenizers with the same sha256 encode every text the same way."""
    return {"name": tok.name or os.path.basename(str(tok.path).rstrip("/")), "kind": tok.kind,
            "sha256": hashlib.sha256(tok.read_bytes()).hexdigest(), "vocab_size": int(tok.vocab_size),
            "bos_id": int(tok.bos_id), "eos_id": int(tok.eos_id)}


def storage_fields(row: Mapping[str, np.ndarray], vocab_size: int, seq_len: int) -> dict[str, dict[str, Any]]:
    """The stored layout of rows shaped like ``row``: ``{field: {"dtype", "shape"}}`` in record order."""
    out = {}
    for name, a in row.items():
        if name in ("tokens", "targets"):
            dt = "uint16" if vocab_size <= 1 << 16 else "int32"
        elif name in ("positions", "segment_ids"):
            dt = "uint16" if seq_len < 1 << 16 else "int32"
        elif name in ("weights", "pair_mask"):
            dt = "uint8"  # 0 / 1 loss masks; checked when written
        else:
            dt = str(np.asarray(a).dtype)
        out[name] = {"dtype": dt, "shape": list(np.shape(a))}
    return out


def encode_row(row: Mapping[str, np.ndarray], fields: Mapping[str, Mapping[str, Any]]) -> bytes:
    """One record: the fields of ``row`` in ``fields``' order and stored dtypes."""
    parts = []
    for name, spec in fields.items():
        a = np.asarray(row[name])
        if list(a.shape) != list(spec["shape"]):
            raise PreparedError(f"row field {name!r} has shape {list(a.shape)}, the dataset's rows have "
                                f"{spec['shape']}. Fix: every row of a dataset must have the same seq_len.")
        if spec["dtype"] == "uint8" and name in ("weights", "pair_mask"):
            b = a.astype(np.uint8)
            if (b > 1).any() or not np.array_equal(b, a):
                    raise PreparedError(f"row field {name!r} holds values other than 0 and 1 ({np.unique(a)[:5]}): "
                                    "prepared loss masks are 0/1. Fix: weight rows with config options, not the "
                                    "data.")
            parts.append(b.tobytes())
            continue
        parts.append(a.astype(spec["dtype"], copy=False).tobytes())
    return b"".join(parts)


def decode_row(data: bytes, fields: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """The row of one record, in the training dtypes (``LOAD_DTYPES``)."""
    out, at = {}, 0
    for name, spec in fields.items():
        dt = np.dtype(spec["dtype"])
        n = int(np.prod(spec["shape"], dtype=np.int64))
        a = np.frombuffer(data, dt, n, at).reshape(spec["shape"])
        at += n * dt.itemsize
        out[name] = a.astype(LOAD_DTYPES.get(name, dt))
    if at != len(data):
        raise PreparedError(f"a record holds {len(data)} bytes, the manifest's fields describe {at}: the shard does "
                            "not belong to this manifest. Fix: prepare the dataset again.")
    return out


def row_bytes(fields: Mapping[str, Mapping[str, Any]]) -> int:
    """Bytes of one decoded record (before compression)."""
    return sum(int(np.prod(s["shape"])) * np.dtype(s["dtype"]).itemsize for s in fields.values())


# --------------------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Writes the rows of one unit into ``dest/shards/part-<index>.array_record``, whole or not at all.

    The rows go to a temporary local file (beside the target, or in ``storage.cache_dir`` for a bucket) which
    ``close()`` renames / uploads into place: a killed prepare leaves no partial shard under the final name.
    """

    def __init__(self, dest: str, index: int, fields: Mapping[str, Mapping[str, Any]]):
        from array_record.python import array_record_module

        self.dest, self.index, self.fields = dest, index, dict(fields)
        self.name = shard_name(index)
        self.target = storage.join(dest, self.name)
        if storage.is_remote(dest):
            tmpdir = storage.cache_dir("prepare-staging")
        else:
            tmpdir = os.path.dirname(self.target)
            os.makedirs(tmpdir, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=tmpdir, prefix=f".part-{index:05d}-", suffix=".partial")
        os.close(fd)
        self._w = array_record_module.ArrayRecordWriter(self.tmp, WRITER_OPTIONS)
        self.rows = self.tokens = 0
        self._closed = False

    def write(self, row: Mapping[str, np.ndarray]) -> None:
        self._w.write(encode_row(row, self.fields))
        self.rows += 1
        self.tokens += int(np.count_nonzero(row["segment_ids"]))

    def close(self) -> dict[str, Any]:
        """Finish the shard; returns its manifest entry ``{file, rows, tokens, bytes, sha256}``."""
        self._w.close()
        self._closed = True
        digest = hashlib.sha256()
        with open(self.tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        size = os.path.getsize(self.tmp)
        os.chmod(self.tmp, 0o644)  # mkstemp's 0600 would keep other users (a shared data disk) out
        if storage.is_remote(self.dest):
            try:
                storage.path(self.target).write_bytes(open(self.tmp, "rb").read())
            finally:
                os.remove(self.tmp)
        else:
            os.replace(self.tmp, self.target)
        return {"file": self.name, "rows": self.rows, "tokens": self.tokens, "bytes": size,
                "sha256": digest.hexdigest()}

    def abort(self) -> None:
        """Drop the unfinished shard."""
        if not self._closed:
            try:
                self._w.close()
            except Exception:  # noqa: BLE001 - already failing: the temporary file goes either way
                pass
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:
            self.abort()


def write_manifest(dest: str, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest.json`` (last: its presence marks a finished dataset)."""
    data = json.dumps({"format": FORMAT, "version": VERSION, **manifest}, indent=1, sort_keys=False).encode()
    if storage.is_remote(dest):
        storage.write_bytes(storage.join(dest, MANIFEST), data)
        return
    os.makedirs(dest, exist_ok=True)
    tmp = os.path.join(dest, f".{MANIFEST}.partial")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(dest, MANIFEST))


# --------------------------------------------------------------------------------------------------- reading
def is_prepared(path: str) -> bool:
    """Whether ``path`` is a prepared dataset directory (holds a ``manifest.json``)."""
    if not path or any(ch in path for ch in "*?["):
        return False
    try:
        return storage.path(storage.join(path, MANIFEST)).is_file()
    except (OSError, ValueError, storage.StorageError):
        return False


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of the prepared dataset at ``path`` (``PreparedError`` when missing or not ours)."""
    mpath = storage.join(path, MANIFEST)
    try:
        m = json.loads(storage.read_bytes(mpath))
    except FileNotFoundError:
        raise PreparedError(f"{mpath}: no manifest: {path!r} is not a prepared dataset, or its prepare did not "
                            "finish. Fix: run `python -m mistral_jax.data.prepare` to the end (rerunning continues "
                            "where it stopped).") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PreparedError(f"{mpath}: not valid JSON ({e}). Fix: prepare the dataset again.") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise PreparedError(f"{mpath}: not a mistral_jax prepared-data manifest (format={m.get('format')!r} if "
                            f"a dict). Fix: point at a directory written by `python -m mistral_jax.data.prepare`.")
    if int(m.get("version", 0)) > VERSION:
        raise PreparedError(f"{mpath}: format version {m['version']} is newer than this mistral_jax reads "
                            f"({VERSION}). Fix: upgrade mistral_jax.")
    return m


def check_tokenizer(path: str, manifest: Mapping[str, Any], tokenizer: Any, what: str = "config.data.train") -> None:
    """The dataset at ``path`` (``manifest``) was tokenized with ``tokenizer`` (same file sha256), else
    ``PreparedError`` naming both."""
    want, have = tokenizer_identity(tokenizer), manifest.get("tokenizer", {})
    if have.get("sha256") != want["sha256"]:
        raise PreparedError(
            f"{what}={path!r} was tokenized with {have.get('name')!r} (sha256 {str(have.get('sha256'))[:12]}, "
            f"vocab {have.get('vocab_size')}), this run uses {want['name']!r} (sha256 {want['sha256'][:12]}, "
            f"vocab {want['vocab_size']}) ({storage.join(path, MANIFEST)}). Fix: prepare the data with the run's "
            f"tokenizer (--tokenizer={tokenizer.name or tokenizer.path}), or set config.data.tokenizer to the one "
            "it was prepared with (its file is in the prepared directory).")


class RowSource:
    """A Grain random-access data source over the rows of a prepared dataset (all shards, in shard order).

    Pickles without open readers (Grain worker processes open their own)."""

    def __init__(self, path: str, manifest: Mapping[str, Any], files: Sequence[str]):
        self.path, self.manifest, self.files = path, dict(manifest), list(files)
        self.fields = self.manifest["fields"]
        self._source: Any = None

    def _open(self) -> Any:
        if self._source is None:
            import grain

            self._source = grain.sources.ArrayRecordDataSource(self.files)
        return self._source

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return decode_row(self._open()[int(index)], self.fields)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None}

    def __repr__(self) -> str:
        return f"RowSource({self.path!r}, rows={len(self)})"


def _local_files(path: str, manifest: Mapping[str, Any]) -> list[str]:
    """Files ArrayRecord can open: local and gs:// shards as they are, s3:// shards copied once into the cache."""
    shards = [storage.join(path, s["file"]) for s in manifest["shards"]]
    if storage.url_scheme(path) != "s3":
        return shards
    key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    cache = storage.cache_dir("prepared", key)
    out = []
    for s, url in zip(manifest["shards"], shards, strict=True):
        local = os.path.join(cache, os.path.basename(s["file"]))
        if not (os.path.isfile(local) and os.path.getsize(local) == int(s["bytes"])):
            fd, tmp = tempfile.mkstemp(dir=cache, suffix=".partial")
            with os.fdopen(fd, "wb") as f:
                f.write(storage.read_bytes(url))
            os.replace(tmp, local)
        out.append(local)
    return out


def open_dataset(path: str, *, what: str = "config.data.train", tokenizer: Any = None, seq_len: int | None = None,
                 kind: str | None = None, check_rows: bool = True) -> RowSource:
    """Open the prepared dataset at ``path`` for reading, after checking it against the run.

    Checks (one ``PreparedError`` line each, naming the file and the fix): a manifest is there and readable; its
    kind is ``kind``; its tokenizer has the sha256 of ``tokenizer``'s file; its ``seq_len`` is ``seq_len``; it has
    rows; every shard is there with the manifest's size; with ``check_rows``, every shard opens (its footer is
    intact) with the manifest's number of records.
    """
    if storage.is_remote(path):
        try:
            storage.check_bucket(path, what)
        except (storage.StorageError, storage.UnsupportedPath) as e:
            raise PreparedError(str(e)) from None
    m = read_manifest(path)
    mpath = storage.join(path, MANIFEST)
    if kind is not None and m.get("kind") != kind:
        raise PreparedError(f"{what}={path!r} holds {m.get('kind')!r} data ({mpath}), this run reads {kind!r}. "
                            f"Fix: prepare it with --format={kind}, or set config.data.format={m.get('kind')!r}.")
    if tokenizer is not None:
        check_tokenizer(path, m, tokenizer, what)
    if seq_len is not None and int(m.get("seq_len", -1)) != int(seq_len):
        raise PreparedError(f"{what}={path!r} holds rows of seq_len={m.get('seq_len')} ({mpath}), the run has "
                            f"config.data.seq_len={seq_len}. Fix: set --config.data.seq_len={m.get('seq_len')}, or "
                            f"prepare the data again with --seq_len={seq_len}.")
    if not m.get("shards") or int(m.get("rows", 0)) < 1:
        raise PreparedError(f"{what}={path!r} is empty: its manifest lists {int(m.get('rows', 0))} rows in "
                            f"{len(m.get('shards') or [])} shards ({mpath}). Fix: prepare it from inputs that hold "
                            "documents.")
    for s in m["shards"]:
        spath = storage.join(path, s["file"])
        p = storage.path(spath)
        if not p.exists():
            raise PreparedError(f"{spath}: shard missing ({s['rows']} rows listed in {mpath}). Fix: copy the whole "
                                "prepared directory, or prepare it again.")
        size = p.stat().length if storage.is_remote(spath) else os.path.getsize(spath)
        if int(size) != int(s["bytes"]):
            raise PreparedError(f"{spath}: {size} bytes, the manifest says {s['bytes']}: the shard is truncated or "
                                "replaced. Fix: copy it again from the original, or prepare the dataset again.")
    files = _local_files(path, m)
    if check_rows:
        from array_record.python import array_record_module

        for s, f in zip(m["shards"], files, strict=True):
            try:
                r = array_record_module.ArrayRecordReader(f, "readahead_buffer_size:0")
                n = r.num_records()
                r.close()
            except Exception as e:  # noqa: BLE001 - any reader failure: a corrupt shard, one line
                raise PreparedError(f"{storage.join(path, s['file'])}: not a readable ArrayRecord shard "
                                    f"({type(e).__name__}: {str(e)[:200]}). Fix: copy it again, or prepare the "
                                    "dataset again.") from None
            if n != int(s["rows"]):
                raise PreparedError(f"{storage.join(path, s['file'])}: {n} records, the manifest says {s['rows']}. "
                                    "Fix: prepare the dataset again.")
    return RowSource(path, m, files)
