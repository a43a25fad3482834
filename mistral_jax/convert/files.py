"""The file operations of checkpoint reading and writing, for local paths and buckets alike (``gs://``, ``s3://``).

Everything goes through the path layer (``mistral_jax.storage``: ``etils.epath`` over gcsfs / s3fs), except two
things that the layer's ``epath.Path`` does not offer and that are done here with the bucket's fsspec filesystem:

* listings with types and sizes in one request (``entries``, ``listing``), for format detection, the output
  checks and the completion marker of a bucket export (``convert.paths``);
* ranged reads (``read_range``): a safetensors tensor is one ranged GET, never the whole shard.

Bucket listings are not cached (``storage.configure``), so a directory written a moment ago (by this process,
Orbax through tensorstore, or another host) is seen as it is.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mistral_jax import storage


def _fs_key(p: str) -> tuple[Any, str]:
    fs, key = storage.fs_and_key(p)
    return fs, key.rstrip("/")


def exists(p: Any) -> bool:
    return storage.path(p).exists()


def is_file(p: Any) -> bool:
    q = storage.path(p)
    return q.exists() and not q.is_dir()


def is_dir(p: Any) -> bool:
    return storage.path(p).is_dir()


def listdir(p: Any) -> list[str]:
    """The names in directory ``p``, sorted (``[]`` when it does not exist)."""
    return sorted(entries(p))


def entries(p: Any) -> dict[str, str]:
    """``{name: "file" | "dir" | "link" | "other"}`` of directory ``p`` (``{}`` when it does not exist). Locally a
    symlink is ``"link"`` (outputs never replace one); a bucket has files and prefixes (``"dir"``) only."""
    p = os.fspath(p)
    if not storage.is_remote(p):
        if not os.path.isdir(p):
            return {}
        out = {}
        for name in os.listdir(p):
            q = os.path.join(p, name)
            out[name] = ("link" if os.path.islink(q) else "dir" if os.path.isdir(q) else
                         "file" if os.path.isfile(q) else "other")
        return out
    fs, key = _fs_key(p)
    try:
        infos = fs.ls(key, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for info in infos:
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if info["name"].rstrip("/") == key or not name:
            continue  # the directory's own placeholder object, where a tool wrote one
        out[name] = "dir" if info.get("type") == "directory" else "file"
    return out


def listing(p: Any) -> dict[str, int]:
    """``{relative path: size}`` of every file below directory ``p`` (one recursive listing on a bucket)."""
    p = os.fspath(p)
    if not storage.is_remote(p):
        out = {}
        for dirpath, _, names in os.walk(p):
            for name in names:
                q = os.path.join(dirpath, name)
                out[os.path.relpath(q, p).replace(os.sep, "/")] = os.path.getsize(q)
        return out
    fs, key = _fs_key(p)
    found = fs.find(key, detail=True)
    return {name[len(key) + 1:]: int(info.get("size") or 0) for name, info in found.items()
            if name.startswith(key + "/") and info.get("type") != "directory" and not name.endswith("/")}


def size(p: Any) -> int:
    return int(storage.path(p).stat().length)


def read_range(p: Any, start: int, length: int) -> bytes:
    """``length`` bytes of file ``p`` from byte ``start`` (a ranged GET on a bucket: only those bytes travel)."""
    p = os.fspath(p)
    if length <= 0:
        return b""
    if storage.is_remote(p):
        fs, key = _fs_key(p)
        return fs.cat_file(key, start=start, end=start + length)
    with storage.path(p).open("rb") as f:
        f.seek(start)
        return f.read(length)


def read_json(p: Any) -> Any:
    return json.loads(storage.path(p).read_text())


def write_json(p: Any, obj: Any, **kwargs: Any) -> None:
    storage.write_bytes(p, json.dumps(obj, **kwargs).encode())


def copy_file(src: Any, dst: Any) -> int:
    """Copy a (small: a tokenizer) file between any two places; returns its size."""
    data = storage.read_bytes(src)
    storage.write_bytes(dst, data)
    return len(data)


def remove_tree(p: Any) -> None:
    """Remove file or directory ``p`` (every object below it on a bucket); nothing if it is absent."""
    p = os.fspath(p)
    if storage.is_remote(p):
        fs, key = _fs_key(p)
        if fs.exists(key):
            fs.rm(key, recursive=True)
        return
    import shutil

    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p)
    elif os.path.lexists(p):
        os.remove(p)
