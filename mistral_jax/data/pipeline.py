"""Text documents -> sentencepiece tokens -> packed fixed-length rows: the packer, sources, and the streamed path.

Training reads files (local or in a bucket) through their prepared copy (``data/prepared.py``, made once per
machine by ``loader.cached_prepare``, or beforehand with ``python -m mistral_jax.data.prepare``) and the Grain
loader (``data/loader.py``): global shuffle, per-process rows, constant-time resume, memory flat in the corpus
size. This module keeps what that path shares and the streamed path of HF hub datasets:

Sources (``open_source``):
  * files, local or in a bucket (``gs://`` / ``s3://``, read through the path layer: ``data.files``): a path, a
    directory (every supported file inside, recursively, sorted) or a glob (``**`` included). ``.jsonl`` / ``.json``
    (one JSON object per line, or a JSON array; the text under ``text_field``), ``.txt`` (one document per
    line, as HF ``datasets``' text builder) and ``.parquet`` (column ``text_field``). ``LocalSource`` holds them in
    memory (small data: tests, inspection); ``load_texts`` streams the first documents (tokenizer training).
  * anything else is an HF hub dataset name, opened with ``datasets.load_dataset(..., streaming=True)``;
    offline, this fails with a message naming the dataset and how to use a local file instead.

Bad input: a missing path or an empty dataset raises ``DataError``; malformed JSON names the file and
line. A bucket path is checked first (``storage.check_bucket``): an unreachable endpoint, a missing bucket or
missing credentials is one ``DataError`` line with the fix, before any listing. Non-UTF-8 bytes follow
``on_decode_error``: ``"replace"`` (default) decodes them as U+FFFD and warns once per file with the number of bad
lines and the first one; ``"error"`` raises naming file and line. A file whose bytes are more than a quarter
undecodable (``MAX_UNDECODABLE_FRACTION``: random or binary data, another encoding) holds no UTF-8 text and raises
``DataError`` under either policy.

Packing (``pack_documents``, the one packer; ``PackedBatches`` packs the same way): each document becomes
``[<s>] + ids + [</s>]`` (``add_bos`` / ``add_eos``); its (input, target) pairs are laid greedily into rows of
``seq_len``. A document longer than the space left continues in the next row as a new segment. ``segment_ids``
count the pieces of a row from 1 (0 = padding), ``positions`` restart at 0 for each piece, ``weights`` are 1 on
real targets and 0 on padding.

Streamed order (``PackedBatches``, hub datasets): each epoch visits the documents in a permutation drawn from
``seed + epoch`` (``shuffle``; hub datasets use ``datasets``' seeded shuffle buffer), and process ``p`` of ``P``
takes every P-th document (``split_dataset_by_node``: a streamed dataset's global batch depends on the process
count). Resumable state: ``{"epoch", "index", "offset"}`` (the next document of this process and the number of its
pairs already emitted), plus a ``fingerprint`` of the settings that define the order; for hub datasets resuming
skips ``index`` documents of the stream again (prepare the data for a constant-time resume).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from mistral_jax.data import files
from mistral_jax.data.documents import (  # noqa: F401 - re-exported
    DECODE_POLICIES,
    MAX_UNDECODABLE_FRACTION,
    SUPPORTED,
    DataError,
    check_remote,
    supported,
)
from mistral_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

EXTENSIONS = SUPPORTED  # documents.SUPPORTED: what prepare reads (also .gz / .zst line files)
# --------------------------------------------------------------------------- sources
def _expand(spec: str) -> list[str] | None:
    """The files of ``spec`` (path, dir, glob; local or in a bucket), or None if ``spec`` does not look like a
    path (a hub name)."""
    remote = check_remote(spec, "dataset")
    path = spec if remote else os.path.expanduser(spec)
    if files.is_glob(spec):
        found = files.glob(path)
        if not found:
            raise DataError(f"data glob {spec!r} matches no files. Fix: check the pattern and the working directory.")
        return found
    if files.isdir(path):
        found = [f for f in files.walk(path) if supported(f)]
        if not found:
            raise DataError(f"data directory {spec!r} holds no {'/'.join(EXTENSIONS)} files. "
                            "Fix: point at a directory of such files or at one file.")
        return found
    if files.isfile(path):
        return [path]
    if remote:
        raise DataError(f"data file {spec!r} does not exist. Fix: check the object name (`gcloud storage ls` / "
                        "`aws s3 ls` lists a bucket).")
    if spec.startswith(("/", ".", "~")) or spec.endswith(EXTENSIONS) or os.sep + os.sep in spec:
        raise DataError(f"data file {spec!r} does not exist (cwd: {os.getcwd()}). Fix: give an existing path, "
                        "or an HF hub dataset name such as 'allenai/c4'.")
    return None


def _decode_lines(path: str, on_decode_error: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a file's lines under the decode-error policy (``documents.decode_lines``)."""
    from mistral_jax.data import documents

    with files.open_binary(path) as f:
        yield from documents.decode_lines(f, path, on_decode_error)


def _read_file(path: str, text_field: str, on_decode_error: str) -> list[str]:
    """The documents of one file (``documents.read_unit``, streamed; also ``.gz`` / ``.zst`` line files)."""
    from mistral_jax.data import documents

    return list(documents.read_unit(documents.Unit(path), field=text_field, on_decode_error=on_decode_error))


class LocalSource:
    """Documents of files (local or in a bucket: ``data.files``), held in memory."""

    def __init__(self, spec: str, files: Sequence[str], text_field: str = "text", on_decode_error: str = "replace"):
        if on_decode_error not in DECODE_POLICIES:
            raise DataError(f"config.data.on_decode_error={on_decode_error!r}. Fix: use one of {DECODE_POLICIES}.")
        self.spec = spec
        self.files = list(files)
        self.texts = [t for f in self.files for t in _read_file(f, text_field, on_decode_error) if t.strip()]
        if not self.texts:
            raise DataError(f"dataset {spec!r} ({len(self.files)} file(s): {self.files[:3]}) has no non-empty "
                            f"documents under {text_field!r}. Fix: point at a file with text.")

    def __len__(self) -> int:
        return len(self.texts)

    def documents(self, epoch: int, start: int, seed: int, shuffle: bool, process_index: int, process_count: int
                  ) -> Iterator[str]:
        """This process's documents of ``epoch`` from its ``start``-th on."""
        order = np.arange(len(self.texts))
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(len(self.texts))
        mine = order[process_index::process_count]
        for i in mine[start:]:
            yield self.texts[int(i)]


class HubSource:
    """An HF hub dataset, streamed (never downloaded whole)."""

    def __init__(self, name: str, split: str, config_name: str = "", text_field: str = "text",
                 shuffle_buffer: int = 10_000):
        self.spec, self.split, self.text_field, self.shuffle_buffer = name, split, text_field, shuffle_buffer
        try:
            import datasets

            self.ds = datasets.load_dataset(name, config_name or None, split=split, streaming=True)
        except Exception as e:  # noqa: BLE001 - offline, unknown name, bad split: one clear message
            raise DataError(
                f"could not open HF hub dataset {name!r} (config={config_name or None!r}, split={split!r}): "
                f"{type(e).__name__}: {str(e)[:300]}. Fix: on a machine without hub access, point the data at a "
                "local file instead, e.g. --config.data.train=/path/train.jsonl (.jsonl/.json/.txt/.parquet), "
                "or check the dataset name and split.") from e

    def documents(self, epoch: int, start: int, seed: int, shuffle: bool, process_index: int, process_count: int
                  ) -> Iterator[str]:
        from datasets.distributed import split_dataset_by_node

        ds = self.ds
        if shuffle:
            ds = ds.shuffle(seed=seed, buffer_size=self.shuffle_buffer)
            ds.set_epoch(epoch)
        if process_count > 1:
            ds = split_dataset_by_node(ds, rank=process_index, world_size=process_count)
        if start:
            ds = ds.skip(start)
        for rec in ds:
            text = rec.get(self.text_field)
            if text is None:
                raise DataError(f"hub dataset {self.spec!r} has no field {self.text_field!r} (has {sorted(rec)}). "
                                "Fix: set config.data.text_field.")
            if isinstance(text, str) and text.strip():
                yield text


def open_source(spec: str, *, split: str = "train", hub_config: str = "", text_field: str = "text",
                on_decode_error: str = "replace", shuffle_buffer: int = 10_000) -> LocalSource | HubSource:
    """Open files (path / dir / glob, local or gs:// / s3://) or, failing that, an HF hub dataset named ``spec``."""
    if not spec:
        raise DataError("no dataset given (config.data.train is empty). Fix: --config.data.train=PATH_OR_HUB_NAME.")
    found = _expand(spec)
    if found is not None:
        return LocalSource(spec, found, text_field, on_decode_error)
    return HubSource(spec, split, hub_config, text_field, shuffle_buffer)


# --------------------------------------------------------------------------- packing
def pack_documents(docs: Iterable[Sequence[int]], seq_len: int) -> Iterator[dict[str, np.ndarray]]:
    """Token ids of documents (``[<s>] + ids + [</s>]`` each) packed greedily into rows of ``seq_len``, in order.

    The packing of the module docstring: a document's (input, target) pairs fill the row; one longer than the
    space left continues in the next row as a new segment. The last row is padded (``segment_ids`` 0, weight 0).
    A document of fewer than two ids has no pair and is skipped. Yields ``{tokens, targets, positions, segment_ids:
    int32 [seq_len], weights: float32 [seq_len]}``. Prepared data (``data/prepare.py``) packs each unit of input
    with this function, and the on-the-fly loader does too: the two give the same rows.
    """
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len}: must be >= 1.")
    t = seq_len
    count = np.arange(t, dtype=np.int32)

    def new_row() -> tuple[np.ndarray, ...]:
        return (np.zeros((t,), np.int32), np.zeros((t,), np.int32), np.zeros((t,), np.int32),
                np.zeros((t,), np.int32), np.zeros((t,), np.float32))

    def done(r: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
        return dict(zip(("tokens", "targets", "positions", "segment_ids", "weights"), r, strict=True))

    row, filled, seg = new_row(), 0, 0
    tokens, targets, positions, segments, weights = row
    for doc in docs:
        ids = np.asarray(doc, np.int32)
        pairs, o = len(ids) - 1, 0
        while o < pairs:
            n = min(pairs - o, t - filled)
            seg += 1
            end = filled + n
            tokens[filled:end] = ids[o:o + n]
            targets[filled:end] = ids[o + 1:o + n + 1]
            positions[filled:end] = count[:n]
            segments[filled:end] = seg
            weights[filled:end] = 1.0
            filled = end
            o += n
            if filled == t:
                yield done(row)
                row, filled, seg = new_row(), 0, 0
                tokens, targets, positions, segments, weights = row
    if filled:
        yield done(row)


class PackedBatches:
    """Iterator of packed ``[batch_size, seq_len]`` numpy batches (this process's share), with resumable state.

    Args:
      source: a ``LocalSource`` / ``HubSource``.
      tokenizer: ``mj.Tokenizer``.
      seq_len: tokens per row.
      batch_size: rows per batch *of this process*.
      seed, shuffle: document order per epoch.
      add_bos, add_eos: wrap every document in ``<s>`` ... ``</s>``.
      loop: start a new epoch at the end (training); else pad the last batch and stop (eval).
      process_index, process_count: this process's share of the documents.
    """

    def __init__(self, source: LocalSource | HubSource, tokenizer: Tokenizer, seq_len: int, batch_size: int, *,
                 seed: int = 0, shuffle: bool = True, add_bos: bool = True, add_eos: bool = True, loop: bool = True,
                 process_index: int = 0, process_count: int = 1):
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len={seq_len}, batch_size={batch_size}: both must be >= 1.")
        if isinstance(source, LocalSource) and len(source) < process_count:
            raise DataError(f"dataset {source.spec!r} has {len(source)} documents for {process_count} processes. "
                            "Fix: use more data or fewer processes.")
        self.source, self.tok = source, tokenizer
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.shuffle, self.add_bos, self.add_eos, self.loop = seed, shuffle, add_bos, add_eos, loop
        self.pi, self.pc = process_index, process_count
        self.epoch, self.index, self.offset = 0, 0, 0
        self._docs: Iterator[str] | None = None
        self._cur: list[int] | None = None
        self._done = False

    # -- state
    def fingerprint(self) -> str:
        key = json.dumps([self.source.spec, self.seq_len, self.batch_size, self.seed, self.shuffle, self.add_bos,
                          self.add_eos, self.pi, self.pc, self.tok.vocab_size])
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def get_state(self) -> dict[str, Any]:
        """JSON-able position of the stream (save it with the checkpoint of the step that consumed the batch)."""
        return {"epoch": self.epoch, "index": self.index, "offset": self.offset, "fingerprint": self.fingerprint()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from ``get_state``)."""
        if state.get("fingerprint") not in (None, self.fingerprint()):
            log.warning("data settings changed since the checkpoint (fingerprint %s -> %s): the resumed data order "
                        "will differ from the interrupted run's.", state.get("fingerprint"), self.fingerprint())
        self.epoch, self.index, self.offset = int(state["epoch"]), int(state["index"]), int(state["offset"])
        self._docs, self._cur, self._done = None, None, False

    # -- documents
    def _next_doc(self) -> list[int] | None:
        """Token ids of the document at (epoch, index), advancing epochs; None when a non-looping source ends."""
        for _ in range(2):  # at most one epoch change per call
            if self._docs is None:
                self._docs = self.source.documents(self.epoch, self.index, self.seed, self.shuffle, self.pi, self.pc)
            text = next(self._docs, None)
            if text is not None:
                return self.tok.encode(text, bos=self.add_bos, eos=self.add_eos)
            if self.index == 0:
                raise DataError(f"dataset {self.source.spec!r} yielded no documents for process {self.pi}/{self.pc}"
                                f" in epoch {self.epoch}. Fix: check the dataset, split and text_field.")
            if not self.loop:
                return None
            self.epoch, self.index, self._docs = self.epoch + 1, 0, None
        raise AssertionError("unreachable")

    def _row(self) -> dict[str, np.ndarray] | None:
        t = self.seq_len
        row = {k: np.zeros((t,), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
        weights = np.zeros((t,), np.float32)
        filled, seg = 0, 0
        while filled < t:
            if self._cur is None:
                doc = self._next_doc()
                if doc is None:
                    self._done = True
                    break
                if len(doc) < 2:  # no (input, target) pair: skip
                    self.index += 1
                    continue
                self._cur = doc
            pairs = len(self._cur) - 1
            n = min(pairs - self.offset, t - filled)
            seg += 1
            o = self.offset
            row["tokens"][filled:filled + n] = self._cur[o:o + n]
            row["targets"][filled:filled + n] = self._cur[o + 1:o + n + 1]
            row["positions"][filled:filled + n] = np.arange(n)
            row["segment_ids"][filled:filled + n] = seg
            weights[filled:filled + n] = 1.0
            filled += n
            self.offset += n
            if self.offset == pairs:
                self._cur, self.offset = None, 0
                self.index += 1
        if filled == 0:
            return None
        row["weights"] = weights
        return row

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._done:
            raise StopIteration
        if self._cur is None and self.offset:  # resumed mid-document: re-tokenize it and skip what was emitted
            self._cur = self._next_doc()
        rows = []
        while len(rows) < self.batch_size:
            r = self._row()
            if r is None:
                break
            rows.append(r)
        if not rows:
            raise StopIteration
        while len(rows) < self.batch_size:  # end of a non-looping source: all-padding rows
            rows.append({k: np.zeros_like(v) for k, v in rows[0].items()})
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def empty_batch(batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    """An all-padding batch (weights 0): keeps eval steps in lock-step across processes."""
    b = {k: np.zeros((batch_size, seq_len), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    b["weights"] = np.zeros((batch_size, seq_len), np.float32)
    return b


def is_files(spec: str) -> bool:
    """Whether ``spec`` names files (a path, directory or glob, local or in a bucket) rather than a hub dataset;
    a path that does not exist raises ``DataError`` (one line)."""
    if not spec:
        raise DataError("no dataset given (config.data.train is empty). Fix: --config.data.train=PATH_OR_HUB_NAME.")
    return _expand(spec) is not None


def load_texts(spec: str, text_field: str = "text", on_decode_error: str = "replace", limit: int = 200_000
               ) -> list[str]:
    """Up to ``limit`` non-empty documents of ``spec`` (e.g. to train a tokenizer), streamed: files are read only as
    far as needed."""
    from mistral_jax.data import documents

    if not is_files(spec):
        out = []
        for t in HubSource(spec, "train", text_field=text_field).documents(0, 0, 0, False, 0, 1):
            out.append(t)
            if len(out) >= limit:
                break
        return out
    out = []
    for unit in documents.units(spec):
        for t in documents.read_unit(unit, field=text_field, on_decode_error=on_decode_error):
            if isinstance(t, str) and t.strip():
                out.append(t)
                if len(out) >= limit:
                    return out
    if not out:
        raise DataError(f"dataset {spec!r} has no non-empty documents under {text_field!r}. Fix: point at a file "
                        "with text, or set config.data.text_field.")
    return out
