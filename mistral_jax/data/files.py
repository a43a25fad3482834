"""Data files, local or in a bucket: list them (a file, a directory, a glob) and open them through the path layer.

``load_records`` reads JSON records from such files, or streams them from an HF hub dataset (preference data, the
prompts of `arithmetic`; each caller names what its data is called in the errors).

A local path keeps Python's own semantics (``glob.glob``, ``os.walk``); a ``gs://`` / ``s3://`` path is listed with
the bucket's fsspec filesystem (``**`` included, which ``epath`` refuses) and opened with ``storage.path(p).open``.
Listings are sorted by path, so a directory copied to a bucket yields its files in the local order, and the data
readers give the same documents, tokens and batches from either.
"""

from __future__ import annotations

import glob as globlib
import json
import os
from collections.abc import Iterator
from typing import IO, Any

from mistral_jax import storage

GLOB_CHARS = "*?["


def is_glob(spec: str) -> bool:
    """Whether ``spec`` is a glob pattern (``*``, ``?`` or ``[``)."""
    return any(ch in spec for ch in GLOB_CHARS)


def glob(pattern: str, recursive: bool = True) -> list[str]:
    """The files (not directories) matching ``pattern``, sorted; for a bucket, as ``scheme://bucket/key`` URLs."""
    if not storage.is_remote(pattern):
        return sorted(f for f in globlib.glob(pattern, recursive=recursive) if os.path.isfile(f))
    (fs, key), scheme = storage.fs_and_key(pattern), storage.url_scheme(pattern)
    return sorted(f"{scheme}://{k}" for k, info in fs.glob(key, detail=True).items() if info.get("type") == "file")


def walk(directory: str) -> list[str]:
    """Every file under ``directory`` (recursively), sorted."""
    if not storage.is_remote(directory):
        return sorted(os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs)
    (fs, key), scheme = storage.fs_and_key(directory), storage.url_scheme(directory)
    return sorted(f"{scheme}://{k}" for k in fs.find(key.rstrip("/")))


def isdir(path: str) -> bool:
    return storage.path(path).is_dir() if storage.is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return storage.path(path).is_file() if storage.is_remote(path) else os.path.isfile(path)


def exists(path: str) -> bool:
    return storage.path(path).exists() if storage.is_remote(path) else os.path.exists(path)


def json_files(source: str) -> list[str]:
    """The ``.json*`` files of a directory, or the files a path / glob names (chat and preference data)."""
    if isdir(source):
        return glob(storage.join(source, "*.json*"), recursive=False)
    if storage.is_remote(source) and not is_glob(source):
        return [source] if isfile(source) else []
    return glob(source, recursive=False)


def open_binary(path: str) -> IO[bytes]:
    """``path`` opened for reading bytes (a bucket object is streamed)."""
    return storage.path(path).open("rb")


def open_text(path: str) -> IO[str]:
    """``path`` opened for reading UTF-8 text."""
    return storage.path(path).open("r", encoding="utf-8")


def load_records(source: str, split: str = "train", hub_config: str = "", *, what: str = "data"
                 ) -> Iterator[dict[str, Any]]:
    """Yield raw records from ``.jsonl`` / ``.json`` files (local or ``gs://`` / ``s3://``) or a streamed hub dataset.

    Args:
      source: a file, a directory of ``.json*`` files, a glob, or a hub name (``"name"`` or ``"owner/name"``).
      split: the hub split.
      hub_config: the hub dataset configuration name ("" = the default one).
      what: what the data is called in errors ("preference data", "prompt data" ...).

    Raises:
      FileNotFoundError: a path that does not exist (or a bucket path naming no ``.json*`` file).
      storage.StorageError: a bucket path whose endpoint, bucket or credentials fail (one line with the fix).
      RuntimeError: the hub dataset cannot be streamed (offline, unknown name, unknown split), with the fix.
    """
    storage.check_bucket(source, what)  # a bucket path: endpoint, bucket, credentials, in one line
    paths = json_files(source)
    if paths:
        for path in paths:
            with open_text(path) as f:
                if path.endswith(".jsonl"):
                    yield from (json.loads(line) for line in f if line.strip())
                else:
                    rows = json.load(f)
                    yield from (rows if isinstance(rows, list) else [rows])
        return
    looks_local = source.startswith(("/", ".", "~")) or source.count("/") > 1 or source.endswith((".json", ".jsonl"))
    if looks_local or os.path.exists(source):  # else a hub name: "name" or "owner/name"
        raise FileNotFoundError(f"{what} {source!r} does not exist. Fix: pass a .jsonl/.json file, a "
                                "directory of them, 'bundled', or an HF hub dataset name.")
    try:
        import datasets  # deferred: heavy import, only for hub datasets

        rows = iter(datasets.load_dataset(source, hub_config or None, split=split, streaming=True))
        first = next(rows)
    except StopIteration:
        return
    except Exception as e:  # offline, unknown dataset / split: the datasets library raises many types
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        raise RuntimeError(
            f"cannot stream the hub dataset {source!r} (config {hub_config or None!r}, split {split!r}): "
            f"{type(e).__name__}: {' '.join(str(e).split())[:300]}. Fix: "
            + ("unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE and check the network, or " if offline else
               "check the name, split and network, or ")
            + "download the data and pass a local .jsonl file ('bundled' is this project's offline set).") from e
    yield first
    yield from rows
