"""Streaming safetensors reading and writing, one tensor at a time.

The format (https://github.com/huggingface/safetensors): 8-byte little-endian header length ``N``, a JSON
header ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``, then the raw tensor
bytes. ``safetensors.safe_open(framework="numpy")`` cannot return bfloat16, and the core package must not
need torch, so this module reads the (tiny) format itself with ``ml_dtypes`` for bfloat16: each
``read`` allocates exactly one tensor and fills it with ``readinto``. The writer is given every tensor's
name, dtype and shape up front, writes the header, then streams the tensors in order, so a shard is never
assembled in memory.

On a bucket (``gs://``, ``s3://``) a file is read with ranged reads, never downloaded whole: the header is one
ranged GET (two when it is longer than the first guess) and each tensor one more, so memory stays at about one
tensor, not one shard. A file written to a bucket is streamed into the object (fsspec's multipart / resumable
upload, a few MB buffered at a time); nothing is staged on the local disk.

A tensor that leaves a conversion byte for byte as it came in (same layout, same dtype: HF -> HF, most of HF ->
GGUF) need not pass through Python at all: ``SafetensorsFile.span`` names its bytes (a :class:`FileBytes`) and the
writers copy them file to file in the kernel (``os.sendfile``, as ``shutil.copyfile`` does), local to local.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import struct
import sys
from collections.abc import Iterable, Sequence
from typing import BinaryIO

import ml_dtypes
import numpy as np

from mistral_jax import storage
from mistral_jax.convert import files

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000  # the safetensors limit
_FIRST_READ = 1 << 16  # bytes fetched for a bucket file's header at once (a 7B shard's header is ~30 KB)


def dtype_code(dtype) -> str:
    """``np.float32`` / ``"bfloat16"`` ... -> the safetensors dtype code (``F32``, ``BF16`` ...)."""
    dt = np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)
    if dt not in _NAMES:
        raise ValueError(f"dtype {dtype} cannot be stored: supported are float64, float32, float16, bfloat16.")
    return _NAMES[dt]


class SafetensorsFile:
    """The header of one ``.safetensors`` file plus on-demand tensor reads.

    Construction reads only the header. ``problems`` lists what is wrong with the file (truncated data,
    unknown dtypes, offsets inconsistent with shapes), each naming the file and the tensor.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the header cannot be parsed (not a safetensors file, or truncated inside the header).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.remote = storage.is_remote(self.path)
        if not files.is_file(self.path):
            raise FileNotFoundError(f"safetensors file {self.path!r} does not exist. Fix: check the directory holds "
                                    "every file its index names (re-download or re-export it).")
        size = files.size(self.path)
        head = files.read_range(self.path, 0, min(size, _FIRST_READ if self.remote else 8))
        if len(head) < 8:
            raise ValueError(f"{self.path!r} is not a safetensors file (only {size} bytes, no header). "
                             "Fix: re-download or re-export it.")
        (n,) = struct.unpack("<Q", head[:8])
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"{self.path!r}: the header claims {n} bytes but the file holds {size} bytes in all; "
                             "it is truncated or not a safetensors file. Fix: re-download or re-export it.")
        raw = head[8:8 + n] if len(head) >= 8 + n else files.read_range(self.path, 8, n)
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path!r}: unreadable safetensors header ({e}). Fix: re-download or "
                             "re-export it.") from e
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.size = size
        self.tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        self.problems: list[str] = []
        available = size - self.data_start
        for name, info in header.items():
            try:
                code, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                self.problems.append(f"{self.path}: tensor {name!r} has a malformed header entry {info!r}")
                continue
            if code not in DTYPES:
                self.problems.append(f"{self.path}: tensor {name!r} has dtype {code}; supported: {sorted(DTYPES)}")
                continue
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[code].itemsize
            if end - begin != nbytes:
                self.problems.append(f"{self.path}: tensor {name!r} shape {shape} {code} needs {nbytes} bytes but "
                                     f"its offsets span {end - begin}")
            elif end > available:
                self.problems.append(f"{self.path}: truncated: tensor {name!r} ends at byte {self.data_start + end} "
                                     f"but the file has {size} bytes. Fix: re-download or re-export the file")
            self.tensors[name] = (code, shape, int(begin), int(end))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self.tensors[name][0]]

    def read(self, name: str) -> np.ndarray:
        """One tensor as a fresh numpy array (bfloat16 via ``ml_dtypes``)."""
        code, shape, begin, end = self.tensors[name]
        out = np.empty(shape, DTYPES[code])
        if self.remote:  # one ranged GET of this tensor's bytes (the shard is never fetched whole)
            data = files.read_range(self.path, self.data_start + begin, end - begin)
            got = len(data)
            if got == end - begin and out.size:
                out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8)
            del data
        else:
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin)
                got = f.readinto(out.reshape(-1).view(np.uint8)) if out.size else 0
        if got != end - begin:
            raise ValueError(f"{self.path}: truncated while reading tensor {name!r}: expected {end - begin} bytes, got "
                             f"{got}. Fix: re-download or re-export the file.")
        return out

    def view(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only array over the file's pages (``mmap`` of its byte range, unmapped when the
        array is dropped): no copy, for a caller that transforms or writes it at once and does not keep it. A bucket
        file (or an empty tensor) is read as :meth:`read` does."""
        code, shape, begin, end = self.tensors[name]
        if self.remote or end == begin:
            return self.read(name)
        start = self.data_start + begin
        base = start - start % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < self.data_start + end:  # cut since the header was read: reading the map would be a SIGBUS
                raise ValueError(f"{self.path}: truncated while reading tensor {name!r}: it ends at byte "
                                 f"{self.data_start + end} but the file now has {size}. Fix: re-download or "
                                 "re-export the file.")
            mm = mmap.mmap(f.fileno(), start - base + end - begin, access=mmap.ACCESS_READ, offset=base)
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(mm, DTYPES[code], count=count, offset=start - base).reshape(shape)

    def span(self, name: str) -> FileBytes | None:
        """Where tensor ``name``'s bytes lie (a :class:`FileBytes`), or None for a bucket file (read it instead)."""
        if self.remote:
            return None
        code, shape, begin, end = self.tensors[name]
        return FileBytes(self.path, self.data_start + begin, end - begin, code, shape)


@dataclasses.dataclass(frozen=True)
class FileBytes:
    """A tensor's bytes as they lie in a local file: ``nbytes`` bytes at ``offset`` of ``path``, with their safetensors
    dtype code and shape. Writers copy them unchanged (:func:`copy_bytes`) instead of reading them into an array."""

    path: str
    offset: int
    nbytes: int
    code: str
    shape: tuple[int, ...]


_KERNEL_COPY = sys.platform.startswith("linux") and hasattr(os, "sendfile")  # sendfile to a regular file: Linux
_CHUNK = 16 << 20  # the fallback's copy unit


def _runs(spans: Sequence[FileBytes]) -> list[tuple[str, int, int]]:
    """``spans`` as ``(path, offset, nbytes)`` runs: neighbours that lie back to back in one file are joined."""
    runs: list[tuple[str, int, int]] = []
    for s in spans:
        if runs and runs[-1][0] == s.path and runs[-1][1] + runs[-1][2] == s.offset:
            runs[-1] = (s.path, runs[-1][1], runs[-1][2] + s.nbytes)
        elif s.nbytes:
            runs.append((s.path, s.offset, s.nbytes))
    return runs


def copy_bytes(out: BinaryIO, spans: Sequence[FileBytes]) -> int:
    """Append ``spans``' bytes, in order, to the open binary file ``out``; returns the bytes written.

    A local file with a descriptor gets them by ``os.sendfile`` (page cache to page cache, no Python buffer; spans
    back to back in one file in one call), then ``out`` is repositioned past them; anything else (a bucket object,
    another platform) gets them in 16 MB reads.
    """
    try:
        fd = out.fileno() if _KERNEL_COPY else None
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        fd = None
    total = 0
    if fd is not None:
        out.flush()
        pos = out.tell()
    sources: dict[str, BinaryIO] = {}
    try:
        for path, offset, nbytes in _runs(spans):
            src = sources.get(path) or sources.setdefault(path, open(path, "rb"))  # noqa: SIM115 - closed below
            done = 0
            while done < nbytes:
                if fd is not None:
                    n = os.sendfile(fd, src.fileno(), offset + done, nbytes - done)
                else:
                    src.seek(offset + done)
                    chunk = src.read(min(_CHUNK, nbytes - done))
                    n = len(chunk)
                    out.write(chunk)
                if n == 0:
                    raise ValueError(f"{path}: truncated while copying {nbytes} bytes at offset {offset} ({done} "
                                     "copied). Fix: re-download or re-export the file.")
                done += n
            total += done
    finally:
        for src in sources.values():
            src.close()
    if fd is not None:
        out.seek(pos + total)  # sendfile moved the descriptor; the buffered writer must know
    return total


def preallocate(out: BinaryIO, size: int) -> None:
    """Reserve ``size`` bytes for the local file ``out`` is writing (``posix_fallocate``, one extent allocation
    up front: the kernel copies into it about a quarter faster than into a file grown write by write). A no-op for
    a bucket object, a small file or a platform without it."""
    if size < (64 << 20) or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(out.fileno(), 0, size)
    except (AttributeError, OSError, ValueError):  # no descriptor, or a filesystem that cannot: write as usual
        pass


def header_bytes(specs: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> bytes:
    """The length prefix + JSON header for tensors ``(name, dtype code, shape)`` stored in this order."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, code, shape in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[code].itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # 8-byte alignment of the data, as safetensors writes it
    return struct.pack("<Q", len(text)) + text


def tensor_nbytes(code: str, shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * DTYPES[code].itemsize


def write_file(path: str | os.PathLike, specs: Sequence[tuple[str, str, tuple[int, ...]]],
               arrays: Iterable[np.ndarray | FileBytes], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file whose tensors are produced one at a time by ``arrays`` (same order as ``specs``).

    Each produced array is cast to its spec's dtype, checked against its shape, written and dropped; a produced
    :class:`FileBytes` (same dtype code and shape as its spec) is copied file to file (:func:`copy_bytes`).
    ``path`` may be on a bucket (streamed into the object). Returns the file's size in bytes.
    """
    path = os.fspath(path)
    with storage.path(path).open("wb") as f:
        head = header_bytes(specs, metadata)
        preallocate(f, len(head) + sum(tensor_nbytes(code, shape) for _, code, shape in specs))
        f.write(head)
        written = len(head)
        it = iter(arrays)
        pending: list[FileBytes] = []  # unchanged tensors not yet copied: a run of them is one kernel copy
        for name, code, shape in specs:
            try:
                arr = next(it)
            except StopIteration:
                raise RuntimeError(f"{path}: the producer stopped before tensor {name!r}") from None
            if isinstance(arr, FileBytes):
                if (arr.code, tuple(arr.shape)) != (code, tuple(shape)):
                    raise ValueError(f"{path}: tensor {name!r} is {arr.code} {arr.shape} in {arr.path}, the header "
                                     f"says {code} {tuple(shape)}")
                pending.append(arr)
                continue
            if pending:
                written += copy_bytes(f, pending)
                pending = []
            arr = np.ascontiguousarray(np.asarray(arr).astype(DTYPES[code], copy=False))
            if arr.shape != tuple(shape):
                raise ValueError(f"{path}: tensor {name!r} has shape {arr.shape}, the header says {tuple(shape)}")
            if arr.size:
                f.write(arr.reshape(-1).view(np.uint8).data)
                written += arr.nbytes
            del arr
        if pending:
            written += copy_bytes(f, pending)
    return written
