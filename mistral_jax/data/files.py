"""Data files, local or in a bucket: list them (a file, a directory, a glob) and open them through the path layer.

A local path keeps Python's own semantics (``glob.glob``, ``os.walk``); a ``gs://`` / ``s3://`` path is listed with
the bucket's fsspec filesystem (``**`` included, which ``epath`` refuses) and opened with ``storage.path(p).open``.
Listings are sorted by path, so a directory copied to a bucket yields its files in the local order, and the data
readers give the same documents, tokens and batches from either.
"""

from __future__ import annotations

import glob as globlib
import os
from typing import IO

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
