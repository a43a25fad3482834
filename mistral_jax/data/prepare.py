"""Prepare a corpus once: tokenize (and pack) it into the prepared format (``data/prepared.py``), in parallel,
resumably, locally or into a bucket.

``python -m mistral_jax.data.prepare --inputs DATA --dest OUT --tokenizer TOK --seq_len N`` (``cli/prepare.py``), or
``prepare(inputs, dest, tokenizer=..., seq_len=...)``. ``data/prepare_beam.py`` runs the same per-unit transform as an
Apache Beam pipeline and writes the same files.

Transform: the inputs are split into units (``documents.units``: a file, or a byte range of a large line file);
unit ``i`` becomes shard ``prepared.shard_name(i)``, independently of every other unit, so the output is the same for
any number of workers (a ``multiprocessing`` pool over the units: ``pool_context``) and any runner.

* ``text``: each non-empty document (``text_field``) is ``Tokenizer.encode(text, bos=add_bos, eos=add_eos)``, as the
  training loop adds them; a unit's documents are packed in order by ``pipeline.pack_documents`` (``pack=False``:
  each document starts its own row(s), with the same continuation rule).
* ``chat``: each record's messages (``chat.to_messages(rec, messages_field)``) rendered by ``chat.render`` and packed
  by ``chat.pack`` (``pack=False``: one conversation per row).
* ``preference``: each record ``preference.to_pair`` -> ``render_pair``, packed by ``preference.pack_pairs`` with
  ``pairs_per_row`` (``pack=False``: one pair per row).

With ``skip_invalid``, a chat / preference record that fails validation or rendering is skipped and counted
(``skipped.invalid``); otherwise it is a ``DataError`` naming the file and record.

Counts: a shard's ``documents`` are the documents that reached its rows (text: non-empty documents of two ids or
more; chat: conversations not dropped as too long; preference: pairs not dropped). The manifest's ``rows``,
``tokens`` and ``documents`` are the sums over its shards; ``skipped`` counts the rest (``empty`` texts, ``short``
texts of fewer than two ids, ``invalid`` records, conversations / pairs ``dropped`` as too long for ``seq_len``,
conversations ``truncated`` to fit). A unit that yields no rows writes no shard file and is not listed in
``shards`` (``units`` counts every unit, ``empty_units`` those).

Resuming: ``DEST/progress/`` holds ``args.json`` (the prepare's arguments and their fingerprint: options,
tokenizer sha256, units, source sizes) and, per finished unit, ``part-00007.json`` (its shard entry, written after
the shard is in place) and, per hashed source file, ``source-00003.json``. A rerun with the same arguments keeps
every unit whose progress file is there and whose shard has the recorded size, and redoes the others (a shard is
written whole or not at all: ``prepared.ShardWriter``); a rerun with other arguments into the same ``DEST`` is
refused. ``manifest.json`` is written last; the manifest holds no timing, so an interrupted and resumed prepare
gives the same files as an uninterrupted one, byte for byte (``progress/`` included).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from mistral_jax import storage
from mistral_jax.data import documents, prepared
from mistral_jax.data.pipeline import DECODE_POLICIES, DataError, pack_documents

log = logging.getLogger(__name__)

PROGRESS = "progress"
ARGS = "args.json"
DEFAULT_SHARD_BYTES = 64 << 20
ENCODE_BATCH = 256  # documents read, then tokenized, then packed at a time (up to ENCODE_BATCH_BYTES of text)
ENCODE_BATCH_BYTES = 8 << 20
# test hook: seconds to sleep after each unit (lets a test kill a prepare mid-way); not for users
DELAY_ENV = "MISTRAL_JAX_PREPARE_UNIT_DELAY"


class PrepareError(ValueError):
    """A prepare that cannot run as asked (bad option, foreign destination): one line with the fix."""


@dataclasses.dataclass(frozen=True)
class Options:
    """What defines a prepare's output (all of it goes into the argument fingerprint)."""

    tokenizer: str
    seq_len: int
    format: str = "text"
    pack: bool = True
    add_bos: bool = True
    add_eos: bool = True
    text_field: str = "text"
    messages_field: str = "messages"
    pairs_per_row: int = 1
    skip_invalid: bool = False
    on_decode_error: str = "replace"


@dataclasses.dataclass(frozen=True)
class Plan:
    """A validated prepare: its options, units, sources, stored fields and manifest header (picklable)."""

    inputs: str
    dest: str
    options: Options
    units: tuple[documents.Unit, ...]
    sources: tuple[str, ...]
    fields: dict[str, dict[str, Any]]
    tokenizer: dict[str, Any]
    args: dict[str, Any]
    fingerprint: str


# --------------------------------------------------------------------------------------------------- planning
def check_options(opts: Options) -> None:
    """Option values (no file read); ``PrepareError`` for the first bad one."""
    if opts.format not in prepared.KINDS:
        raise PrepareError(f"format={opts.format!r} is not a prepared kind. Fix: use one of {prepared.KINDS}.")
    low = 1 if opts.format == "text" else 2
    if not isinstance(opts.seq_len, int) or isinstance(opts.seq_len, bool) or opts.seq_len < low:
        raise PrepareError(f"seq_len={opts.seq_len!r}: must be an integer >= {low} for {opts.format} data. Fix: pass "
                           "the training run's config.data.seq_len, e.g. --seq_len 2048.")
    if opts.pairs_per_row < 1:
        raise PrepareError(f"pairs_per_row={opts.pairs_per_row}: must be >= 1. Fix: pass 1 (one pair per row) or "
                           "more to pack short pairs.")
    if opts.on_decode_error not in DECODE_POLICIES:
        raise PrepareError(f"on_decode_error={opts.on_decode_error!r}. Fix: use one of {DECODE_POLICIES}.")
    if not opts.tokenizer:
        raise PrepareError("no tokenizer given. Fix: pass the run's tokenizer (a sentencepiece .model, a tekken.json, "
                           "or a name such as mistral:v3).")


_TOKENIZERS: dict[str, Any] = {}


def load_tokenizer(spec: str) -> Any:
    """``Tokenizer(spec)``, once per process."""
    if spec not in _TOKENIZERS:
        from mistral_jax.data.tokenizer import Tokenizer

        try:
            _TOKENIZERS[spec] = Tokenizer(spec)
        except (OSError, ValueError, storage.StorageError) as e:
            raise PrepareError(f"tokenizer={spec!r} cannot be loaded: {str(e).split('. Fix:')[0]}. Fix: pass a "
                               "sentencepiece .model, a tekken.json (or a directory holding one), or a name such as "
                               "mistral:v3.") from None
    return _TOKENIZERS[spec]


def template_row(opts: Options) -> dict[str, np.ndarray]:
    """A row shaped like the rows of ``opts``' format (its stored fields: ``prepared.storage_fields``)."""
    if opts.format == "text":
        return next(pack_documents([[0, 0]], opts.seq_len))
    if opts.format == "chat":
        from mistral_jax.data import chat

        return next(chat.pack([chat.Rendered([0, 0], [False, True], [2])], opts.seq_len))
    from mistral_jax.data import preference

    return preference.empty_row(opts.seq_len, opts.pairs_per_row)


def _progress(dest: str, name: str) -> str:
    return storage.join(dest, PROGRESS, name)


def _read_json(path: str) -> Any:
    try:
        return json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):  # a torn write: treated as not there
        return None


def _write_json(path: str, value: Any) -> None:
    data = json.dumps(value, indent=1).encode()
    if storage.is_remote(path):
        storage.write_bytes(path, data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.partial"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def plan(inputs: str | Sequence[str], dest: str, options: Options, *, shard_bytes: int = DEFAULT_SHARD_BYTES
         ) -> Plan:
    """Validate everything before any work and record the arguments in ``DEST/progress/args.json``.

    Raises ``PrepareError`` / ``DataError`` (one line): a bad option, no inputs, a tokenizer that does not load,
    a destination that holds something else or another prepare.
    """
    check_options(options)
    if not isinstance(inputs, str):
        inputs = ",".join(inputs)
    if not dest:
        raise PrepareError("no destination given. Fix: pass --dest DIR (local, gs:// or s3://).")
    dest = storage.absolute(dest)
    if storage.is_remote(dest):
        try:
            storage.check_bucket(dest, "--dest", write=True)
        except (storage.StorageError, storage.UnsupportedPath) as e:
            raise PrepareError(str(e)) from None
    elif os.path.exists(dest) and not os.path.isdir(dest):
        raise PrepareError(f"dest={dest!r} is a file. Fix: pass a directory to create (or one a previous prepare "
                           "with the same arguments wrote).")
    us = documents.units(inputs, shard_bytes=shard_bytes)
    tok = load_tokenizer(options.tokenizer)
    identity = prepared.tokenizer_identity(tok)
    srcs = documents.sources(us)
    sizes = {p: documents._size(p) for p in srcs}
    args = {"format": prepared.FORMAT, "version": prepared.VERSION, "options": dataclasses.asdict(options),
            "tokenizer_sha256": identity["sha256"], "inputs": inputs, "shard_bytes": shard_bytes,
            "units": [u.key for u in us], "source_bytes": [sizes[p] for p in srcs]}
    fp = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()
    args["fingerprint"] = fp
    fields = prepared.storage_fields(template_row(options), identity["vocab_size"], options.seq_len)
    p = Plan(inputs, dest, options, tuple(us), tuple(srcs), fields, identity, args, fp)
    _claim(p)
    return p


def _claim(p: Plan) -> None:
    """Write ``progress/args.json``, or check that the one there is this prepare's."""
    path = _progress(p.dest, ARGS)
    have = _read_json(path)
    if have is not None:
        if have.get("fingerprint") != p.fingerprint:
            diff = sorted(k for k in set(have) | set(p.args) if k != "fingerprint" and have.get(k) != p.args.get(k))
            if "options" in diff:
                o1, o2 = have.get("options") or {}, p.args["options"]
                diff = [f"options.{k}" for k in sorted(set(o1) | set(o2)) if o1.get(k) != o2.get(k)] + \
                    [d for d in diff if d != "options"]
            raise PrepareError(f"dest={p.dest!r} holds a prepare with other arguments (differing: {', '.join(diff)}; "
                               f"{path}). Fix: pass another --dest, delete that directory, or rerun with the arguments "
                               "it was started with to finish it.")
        return
    root = storage.path(p.dest)
    if root.exists() and any(True for _ in root.iterdir()):
        names = sorted(x.name for x in root.iterdir())[:5]
        raise PrepareError(f"dest={p.dest!r} exists and is not a prepare's directory (it holds {names}, no "
                           f"{PROGRESS}/{ARGS}). Fix: pass a new or empty directory.")
    _write_json(path, p.args)


# --------------------------------------------------------------------------------------------------- one unit
def _text_rows(unit: documents.Unit, opts: Options, tok: Any, counts: dict[str, int]
               ) -> Iterator[dict[str, np.ndarray]]:
    def encoded(texts: list[str]) -> list[np.ndarray]:
        out = []
        for text in texts:
            if not text.strip():
                counts["empty"] += 1
                continue
            ids = tok.encode_array(text, bos=opts.add_bos, eos=opts.add_eos)
            if len(ids) < 2:  # no (input, target) pair: pack_documents would skip it
                counts["short"] += 1
                continue
            counts["documents"] += 1
            out.append(ids)
        return out

    def docs() -> Iterator[np.ndarray]:
        # read a batch, tokenize it, then pack it: each stage keeps its working set in the CPU caches for a while
        # (benchmarks/data_pipeline.py: the time beyond tokenizing fell from 10 % to 6 % of it, 1 to 256 documents)
        texts: list[str] = []
        size = 0
        for text in documents.read_unit(unit, field=opts.text_field, on_decode_error=opts.on_decode_error):
            texts.append(text)
            size += len(text)
            if len(texts) == ENCODE_BATCH or size >= ENCODE_BATCH_BYTES:
                yield from encoded(texts)
                texts, size = [], 0
        yield from encoded(texts)

    if opts.pack:
        yield from pack_documents(docs(), opts.seq_len)
    else:
        for ids in docs():
            yield from pack_documents([ids], opts.seq_len)


def _rendered(unit: documents.Unit, opts: Options, tok: Any, counts: dict[str, int]) -> Iterator[Any]:
    """Rendered conversations (chat) or pairs (preference) of a unit; invalid ones skipped or a ``DataError``."""
    from mistral_jax.data import chat, preference

    records = documents.read_records(unit, field=opts.text_field, on_decode_error=opts.on_decode_error)
    for i, rec in enumerate(records):
        try:
            if opts.format == "chat":
                item = chat.render(chat.to_messages(rec, opts.messages_field), tok, index=i)
            else:
                item = preference.render_pair(preference.to_pair(rec, i), tok, i)
        except ValueError as e:
            if not opts.skip_invalid:
                raise DataError(f"{unit.where}: record {i}: {e} (or pass --skip_invalid to skip such records)"
                                ) from None
            if not counts["invalid"]:
                log.warning("%s: skipping invalid records (--skip_invalid); first: %s", unit.where, e)
            counts["invalid"] += 1
            continue
        yield item


def unit_rows(unit: documents.Unit, opts: Options, tok: Any, counts: dict[str, int]
              ) -> Iterator[dict[str, np.ndarray]]:
    """The rows of one unit, in order (``counts`` is updated as they are produced)."""
    if opts.format == "text":
        yield from _text_rows(unit, opts, tok, counts)
        return
    from mistral_jax.data import chat, preference

    items = _rendered(unit, opts, tok, counts)
    if opts.format == "chat":
        stats = chat.PackStats()
        groups = [items] if opts.pack else ([r] for r in items)
        for g in groups:
            yield from chat.pack(g, opts.seq_len, tok.pad_id, stats)
        counts["dropped"] += stats.dropped
        counts["truncated"] += stats.truncated
        counts["documents"] += stats.conversations - stats.dropped
    else:
        pstats = preference.PairStats()
        groups = [items] if opts.pack else ([r] for r in items)
        for g in groups:
            yield from preference.pack_pairs(g, opts.seq_len, opts.pairs_per_row, tok.pad_id, pstats)
        counts["dropped"] += pstats.dropped
        counts["documents"] += pstats.pairs - pstats.dropped


def _shard_size(dest: str, name: str) -> int | None:
    p = storage.join(dest, name)
    try:
        if storage.is_remote(p):
            fs, key = storage.fs_and_key(p)
            return int(fs.size(key))
        return os.path.getsize(p)
    except (FileNotFoundError, OSError):
        return None


def done_entry(dest: str, index: int) -> dict[str, Any] | None:
    """The progress entry of unit ``index`` if it finished (its shard, if any, there with the recorded size)."""
    entry = _read_json(_progress(dest, f"part-{index:05d}.json"))
    if entry is None:
        return None
    if entry["rows"] and _shard_size(dest, entry["file"]) != int(entry["bytes"]):
        return None
    return entry


def process_unit(p: Plan, index: int) -> dict[str, Any]:
    """Prepare unit ``index`` of ``p`` into its shard (kept if a previous run finished it); returns its progress
    entry ``{file, rows, tokens, documents, bytes, sha256, skipped}``."""
    have = done_entry(p.dest, index)
    if have is not None:
        return have
    unit, opts = p.units[index], p.options
    tok = load_tokenizer(opts.tokenizer)
    counts = {"documents": 0, "empty": 0, "short": 0, "invalid": 0, "dropped": 0, "truncated": 0}
    rows = unit_rows(unit, opts, tok, counts)
    first = next(rows, None)
    if first is None:
        entry = {"file": prepared.shard_name(index), "rows": 0, "tokens": 0, "documents": counts["documents"],
                 "bytes": 0, "sha256": None}
    else:
        with prepared.ShardWriter(p.dest, index, p.fields) as w:
            w.write(first)
            for row in rows:
                w.write(row)
            entry = w.close()
        entry = {**entry, "documents": counts["documents"]}
    entry["skipped"] = {k: v for k, v in counts.items() if k != "documents"}
    _write_json(_progress(p.dest, f"part-{index:05d}.json"), entry)
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    if delay:
        time.sleep(delay)
    return entry


def process_source(p: Plan, index: int) -> dict[str, Any]:
    """The fingerprint of source ``index`` (kept in ``progress/source-XXXXX.json``, hashed once)."""
    path = _progress(p.dest, f"source-{index:05d}.json")
    have = _read_json(path)
    if have is not None and have.get("path") == p.sources[index]:
        return have
    fp = documents.fingerprint(p.sources[index])
    _write_json(path, fp)
    return fp


# --------------------------------------------------------------------------------------------------- manifest
def manifest(p: Plan, entries: Sequence[Mapping[str, Any]], sources: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The manifest of a finished prepare (``entries`` in unit order)."""
    opts = p.options
    shards = [{k: e[k] for k in ("file", "rows", "tokens", "documents", "bytes", "sha256")} for e in entries
              if e["rows"]]
    skipped: dict[str, int] = {}
    for e in entries:
        for k, v in e["skipped"].items():
            skipped[k] = skipped.get(k, 0) + int(v)
    m: dict[str, Any] = {
        "kind": opts.format, "tokenizer": p.tokenizer, "seq_len": opts.seq_len, "packed": opts.pack,
        "add_bos": opts.add_bos, "add_eos": opts.add_eos, "fields": p.fields, "shards": shards,
        "rows": sum(s["rows"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
        "documents": sum(int(e["documents"]) for e in entries), "sources": [dict(s) for s in sources],
        "inputs": p.inputs, "units": len(p.units), "empty_units": sum(1 for e in entries if not e["rows"]),
        "skipped": skipped, "on_decode_error": opts.on_decode_error,
    }
    if opts.format == "text":
        m["text_field"] = opts.text_field
    else:
        m["messages_field" if opts.format == "chat" else "pairs_per_row"] = (
            opts.messages_field if opts.format == "chat" else opts.pairs_per_row)
        m["skip_invalid"] = opts.skip_invalid
    return m


def finish(p: Plan, entries: Sequence[Mapping[str, Any]], sources: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Write ``manifest.json`` (last) and return the manifest."""
    m = manifest(p, entries, sources)
    load_tokenizer(p.options.tokenizer).save(p.dest)  # kept beside the shards: a run with data.tokenizer="" uses it
    if not m["rows"]:
        log.warning("prepare of %r wrote no rows (%d units, skipped %s): the dataset is empty.", p.inputs,
                    len(p.units), m["skipped"])
    prepared.write_manifest(p.dest, m)
    return {"format": prepared.FORMAT, "version": prepared.VERSION, **m}


def _clean_partials(dest: str) -> None:
    """Remove the temporary files of shards a killed run left (local destinations; a bucket gets whole shards)."""
    d = os.path.join(dest, prepared.SHARDS)
    if storage.is_remote(dest) or not os.path.isdir(d):
        return
    for name in os.listdir(d):
        if name.startswith(".part-") and name.endswith(".partial"):
            os.remove(os.path.join(d, name))


# --------------------------------------------------------------------------------------------------- running
_PLAN: Plan | None = None


def pool_context() -> Any:
    """The workers' start method: ``fork`` where it is safe (Linux, and JAX's runtime, whose threads a child must
    not inherit, not started): a worker starts in milliseconds with the tokenizer loaded; else ``spawn`` (each
    worker imports the project and loads the tokenizer: about 2 s)."""
    xb = sys.modules.get("jax._src.xla_bridge")
    jax_started = xb is not None and xb.backends_are_initialized()
    if sys.platform.startswith("linux") and not jax_started:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _init_worker(p: Plan) -> None:
    global _PLAN
    _PLAN = p
    logging.basicConfig(level=logging.WARNING)


def _task(task: tuple[str, int]) -> tuple[str, int, dict[str, Any]]:
    kind, i = task
    assert _PLAN is not None
    return kind, i, (process_unit(_PLAN, i) if kind == "unit" else process_source(_PLAN, i))


def prepare(inputs: str | Sequence[str], dest: str, *, tokenizer: str, seq_len: int, format: str = "text",
            pack: bool = True, add_bos: bool = True, add_eos: bool = True, text_field: str = "text",
            messages_field: str = "messages", pairs_per_row: int = 1, skip_invalid: bool = False,
            on_decode_error: str = "replace", shard_bytes: int = DEFAULT_SHARD_BYTES, workers: int | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Prepare ``inputs`` into ``dest`` (see the module docstring); returns the manifest.

    ``workers``: processes (default ``os.cpu_count()``; 1 runs in this process). The output does not depend on it.
    """
    opts = Options(tokenizer=str(tokenizer), seq_len=seq_len, format=format, pack=bool(pack), add_bos=bool(add_bos),
                   add_eos=bool(add_eos), text_field=text_field, messages_field=messages_field,
                   pairs_per_row=int(pairs_per_row), skip_invalid=bool(skip_invalid), on_decode_error=on_decode_error)
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise PrepareError(f"workers={workers}: must be >= 1. Fix: pass e.g. --workers {os.cpu_count() or 1}.")
    p = plan(inputs, dest, opts, shard_bytes=shard_bytes)
    _clean_partials(p.dest)
    t0 = time.time()
    tasks = [("unit", i) for i in range(len(p.units))] + [("source", j) for j in range(len(p.sources))]
    entries: list[Any] = [None] * len(p.units)
    srcs: list[Any] = [None] * len(p.sources)
    from tqdm import tqdm

    bar = tqdm(total=len(p.units), unit="unit", desc="prepare", disable=not (progress and sys.stderr.isatty()))
    n = min(workers, len(tasks))

    def take(kind: str, i: int, out: dict[str, Any]) -> None:
        if kind == "unit":
            entries[i] = out
            bar.update(1)
        else:
            srcs[i] = out

    try:
        if n <= 1:
            _init_worker(p)
            for t in tasks:
                take(*_task(t))
        else:
            with warnings.catch_warnings():  # Python 3.12 on fork with BLAS threads: the workers use no BLAS
                warnings.filterwarnings("ignore", r"This process .* is multi-threaded", DeprecationWarning)
                pool = pool_context().Pool(n, initializer=_init_worker, initargs=(p,))
            with pool:
                for result in pool.imap_unordered(_task, tasks):
                    take(*result)
    finally:
        bar.close()
    m = finish(p, entries, srcs)
    log.info("prepared %d rows (%d tokens, %d documents) in %d shards into %s in %.1fs", m["rows"], m["tokens"],
             m["documents"], len(m["shards"]), p.dest, time.time() - t0)
    return m


if __name__ == "__main__":  # python -m mistral_jax.data.prepare: the command-line tool (cli/prepare.py)
    import runpy

    runpy.run_module("mistral_jax.cli.prepare", run_name="__main__", alter_sys=True)
