"""What a conversion reads: tensor *sources* and the checks that collect every mismatch before raising once.

A source yields model-layout slices one :class:`~mistral_jax.convert.keys.Entry` at a time (from safetensors files
through a ``TensorIndex``, or from in-memory parameters); writers and the model builder consume it slice by slice,
so no converter holds more than a tensor at once. A checkpoint's JSON config is read by ``read_json_config``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from mistral_jax import storage
from mistral_jax.config import ModelConfig
from mistral_jax.convert import files
from mistral_jax.convert import keys as keys_lib
from mistral_jax.convert import safetensors_io as st
from mistral_jax.convert.dtypes import np_dtype


class ConversionError(ValueError):
    """A checkpoint does not match what the config says; ``problems`` lists every mismatch."""

    def __init__(self, what: str, problems: Sequence[str], fix: str):
        self.problems = list(problems)
        lines = "\n  ".join(self.problems)
        super().__init__(f"{what}: {len(self.problems)} problem(s):\n  {lines}\nFix: {fix}")


class Source(Protocol):
    """Model-layout tensors, one entry at a time."""

    cfg: ModelConfig

    def dtype(self, entry: keys_lib.Entry) -> np.dtype: ...

    def read(self, entry: keys_lib.Entry) -> np.ndarray: ...


def transient(source: Source, entry: keys_lib.Entry) -> np.ndarray:
    """``source.read(entry)`` for immediate use: a read-only view of a local file's pages where the source has them
    (``FileSource.transient``); the caller must not keep or modify it."""
    read = getattr(source, "transient", None)
    return read(entry) if read is not None else source.read(entry)


def unchanged(source: Source, entry: keys_lib.Entry, fmt: keys_lib.Format, dtype: np.dtype) -> st.FileBytes | None:
    """``entry``'s stored bytes when its ``fmt`` file tensor in ``dtype`` is exactly them, else None.

    That holds when ``source`` reads local safetensors files whose format stores the entry with the same transform
    as ``fmt`` (the transforms are exact inverses, so the round trip is the identity) and the dtype is the stored
    one: HF -> HF in the same dtype, and every HF -> Mistral layout tensor but the rotary-permuted ``wq`` / ``wk``.
    Writers then copy the bytes file to file (``safetensors_io.copy_bytes``) instead of reading, transforming and
    writing an array.
    """
    span = getattr(source, "span", None)
    if span is None or entry.key.transform(source.fmt) != entry.key.transform(fmt):
        return None
    if np.dtype(dtype) != source.dtype(entry):
        return None
    return span(entry)


class TensorIndex:
    """Name -> file for a set of safetensors files; construction reads headers only and collects problems."""

    def __init__(self, files: Sequence[str], weight_map: dict[str, str] | None = None):
        self.files: dict[str, st.SafetensorsFile] = {}
        self.where: dict[str, st.SafetensorsFile] = {}
        self.problems: list[str] = []
        for path in files:
            try:
                f = st.SafetensorsFile(path)
            except (FileNotFoundError, ValueError) as e:
                self.problems.append(str(e))
                continue
            self.files[path] = f
            self.problems += f.problems
            for name in f.tensors:
                if name in self.where:
                    self.problems.append(f"tensor {name!r} is in both {self.where[name].path} and {path}")
                self.where[name] = f
        if weight_map:
            for name, fname in weight_map.items():
                if name not in self.where and not any(fname in p for p in self.problems):
                    self.problems.append(f"the index maps {name!r} to {fname} but that file does not hold it")

    def check(self, cfg: ModelConfig, fmt: keys_lib.Format) -> list[str]:
        """Every problem: unreadable files, missing / unexpected tensors, wrong shapes."""
        problems = list(self.problems)
        expected = {e.name(fmt): e.file_shape(fmt, cfg) for e in keys_lib.entries(cfg)}
        for name, shape in expected.items():
            f = self.where.get(name)
            if f is None:
                problems.append(f"missing tensor {name!r} {shape}")
            elif f.shape(name) != shape:
                problems.append(f"{f.path}: tensor {name!r} has shape {f.shape(name)}, the config needs {shape}")
        for name, f in self.where.items():
            if name not in expected and not name.endswith(keys_lib.IGNORED_SUFFIXES):
                if cfg.tie_embeddings and name == keys_lib.KEYS[-1].name(fmt):
                    continue  # a tied checkpoint may still carry the (identical) output matrix
                problems.append(f"{f.path}: unexpected tensor {name!r} {f.shape(name)}")
        return problems


class FileSource:
    """Reads model slices from safetensors files in format ``fmt`` (after :meth:`TensorIndex.check`)."""

    def __init__(self, cfg: ModelConfig, index: TensorIndex, fmt: keys_lib.Format):
        self.cfg, self.index, self.fmt = cfg, index, fmt

    def dtype(self, entry: keys_lib.Entry) -> np.dtype:
        name = entry.name(self.fmt)
        return self.index.where[name].dtype(name)

    def read(self, entry: keys_lib.Entry) -> np.ndarray:
        name = entry.name(self.fmt)
        return entry.from_file(self.fmt, self.index.where[name].read(name), self.cfg)

    def transient(self, entry: keys_lib.Entry) -> np.ndarray:
        """:meth:`read` without the copy where the file is local: a read-only view of the file's pages
        (``SafetensorsFile.view``), for writers that transform or write the slice at once and drop it."""
        name = entry.name(self.fmt)
        return entry.from_file(self.fmt, self.index.where[name].view(name), self.cfg)

    def span(self, entry: keys_lib.Entry) -> st.FileBytes | None:
        """Where ``entry``'s bytes lie in its (local) file, as stored in ``self.fmt``; None on a bucket."""
        name = entry.name(self.fmt)
        return self.index.where[name].span(name)


class ParamsSource:
    """Reads model slices from a ``params_dict`` pytree (jax or numpy arrays, possibly sharded)."""

    def __init__(self, cfg: ModelConfig, params: dict[str, Any]):
        self.cfg, self.params = cfg, params

    def _leaf(self, entry: keys_lib.Entry):
        leaf = self.params
        for p in entry.key.path:
            leaf = leaf[p]
        return leaf

    def dtype(self, entry: keys_lib.Entry) -> np.dtype:
        return np_dtype(self._leaf(entry).dtype)

    def read(self, entry: keys_lib.Entry) -> np.ndarray:
        leaf = self._leaf(entry)
        return np.asarray(leaf[entry.index] if entry.index else leaf)  # device -> host, one slice


def check_or_raise(problems: Sequence[str], what: str, fix: str) -> None:
    if problems:
        raise ConversionError(what, problems, fix)


def read_json_config(directory: str, filename: str, parse: Any, where: str) -> Any:
    """``parse(json of directory/filename)``; every failure names the file and says how to fix it.

    Args:
      directory: the checkpoint directory (local or on a bucket).
      filename: ``config.json``, ``params.json`` or ``model_config.json``.
      parse: dict -> ModelConfig (``ModelConfig.from_hf`` ...).
      where: what the directory should be, for the missing-file message.
    """
    path = storage.join(directory, filename)
    if not files.is_file(path):
        raise FileNotFoundError(f"{path!r} not found: not {where}. Fix: point at the directory holding {filename}.")
    try:
        d = files.read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path!r} is not valid JSON ({e}). Fix: repair or re-download it.") from e
    try:
        return parse(d)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from e
