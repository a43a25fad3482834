"""Shared machinery of the converters: tensor sources, the streaming safetensors writer, the sharded model
builder, mismatch collection and atomic output directories.

A *source* yields model-layout slices one :class:`~mistral_jax.convert.keys.Entry` at a time (from files or
from in-memory parameters); writers and the model builder consume it slice by slice, so no converter holds
more than a tensor (plus the shard being written, on disk) at once, except the model itself when the
destination is a model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mistral_jax import sharding
from mistral_jax.config import ModelConfig
from mistral_jax.convert import keys as keys_lib
from mistral_jax.convert import paths
from mistral_jax.convert import safetensors_io as st

DTYPE_NAMES = ("float32", "bfloat16", "float16")


class ConversionError(ValueError):
    """A checkpoint does not match what the config says; ``problems`` lists every mismatch."""

    def __init__(self, what: str, problems: Sequence[str], fix: str):
        self.problems = list(problems)
        lines = "\n  ".join(self.problems)
        super().__init__(f"{what}: {len(self.problems)} problem(s):\n  {lines}\nFix: {fix}")


def np_dtype(name: str | Any) -> np.dtype:
    """``"bfloat16"`` / ``jnp.bfloat16`` / ``np.float32`` -> numpy dtype (bfloat16 via ml_dtypes)."""
    if str(name) == "bfloat16" or name is jnp.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    dt = np.dtype(name)
    if dt.name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r} is not supported for checkpoints. Fix: use one of {DTYPE_NAMES}.")
    return dt


def dtype_name(dt: Any) -> str:
    dt = np_dtype(dt)
    return "bfloat16" if dt == np.dtype(ml_dtypes.bfloat16) else dt.name


def parse_size(size: int | str) -> int:
    """``5_000_000`` / ``"5GB"`` (10^9) / ``"500MiB"`` (2^20) -> bytes, as HF's ``max_shard_size``."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size={size} must be > 0. Fix: pass e.g. '5GB'.")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r} is not a size. Fix: pass an int (bytes) or e.g. '5GB', '500MiB'.")
    unit = m.group(2) or "B"
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return parse_size(int(float(m.group(1)) * scale))


# ----------------------------------------------------------------------------- atomic output
@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False, kind: str | None = None,
               inputs: Sequence[str | os.PathLike] = (), files: Sequence[str | os.PathLike] = ()) -> Iterator[str]:
    """Yield a temporary sibling of ``out_dir`` to write into; on success it replaces ``out_dir`` at once.

    On any exception the temporary directory is removed and ``out_dir`` is left as it was (absent, or the old
    contents when overwriting), so a failed conversion never leaves a half-written checkpoint. Before anything
    is written, ``paths.check_output`` refuses an ``out_dir`` that overlaps ``inputs`` / ``files`` or that is not
    a previous ``kind`` export (``overwrite`` never replaces anything else), and temporary siblings left by
    killed conversions are cleaned up (``paths.clean_stale``).

    Args:
      out_dir: the directory to create (symlinks resolved: the export lands where the path really points).
      overwrite: replace a previous ``kind`` export at ``out_dir``.
      kind: ``hf`` / ``mistral`` / ``jax``: what is written (what may be replaced). None: only an absent or
        empty ``out_dir`` is accepted.
      inputs: directories read by the conversion (the output may not be, be inside or contain one).
      files: files read by the conversion (the output may not contain one).
    """
    paths.check_not_overlapping(out_dir, inputs, files)
    paths.clean_stale(out_dir)  # first: it may put back a previous export parked by a killed conversion
    out_dir = paths.check_output(out_dir, kind, overwrite, inputs, files)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = paths.temp_name(out_dir, "tmp")
    os.makedirs(tmp)
    try:
        yield tmp
        old = None
        if os.path.isdir(out_dir):
            if os.listdir(out_dir):
                paths.check_output(out_dir, kind, overwrite, inputs, files)  # still replaceable after writing?
                old = paths.temp_name(out_dir, "old")
                os.replace(out_dir, old)
            else:
                os.rmdir(out_dir)
        os.replace(tmp, out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- sources
class Source(Protocol):
    """Model-layout tensors, one entry at a time."""

    cfg: ModelConfig

    def dtype(self, entry: keys_lib.Entry) -> np.dtype: ...

    def read(self, entry: keys_lib.Entry) -> np.ndarray: ...


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


# ----------------------------------------------------------------------------- writing files
def plan_shards(specs: Sequence[tuple[str, str, tuple[int, ...]]], max_bytes: int) -> list[list[int]]:
    """Greedy split of tensors (in order) into shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, code, shape) in enumerate(specs):
        n = st.tensor_nbytes(code, shape)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def write_tensors(out_dir: str, source: Source, fmt: keys_lib.Format, dtype: str | None,
                  file_names: Sequence[str] | None, max_shard_size: int | str | None) -> dict[str, str]:
    """Stream every tensor of ``source.cfg`` into safetensors shard(s); returns ``{tensor name: file name}``.

    ``file_names(i, n)`` style: when ``max_shard_size`` is None a single file ``file_names[0]`` is written,
    else shards ``model-0000i-of-0000n.safetensors`` (a single one is named ``file_names[0]``).
    """
    cfg = source.cfg
    es = keys_lib.entries(cfg)
    out_dt = None if dtype is None else np_dtype(dtype)
    specs = [(e.name(fmt), st.dtype_code(out_dt if out_dt is not None else source.dtype(e)), e.file_shape(fmt, cfg))
             for e in es]
    groups = [list(range(len(es)))] if max_shard_size is None else plan_shards(specs, parse_size(max_shard_size))
    weight_map = {}
    for s, idx in enumerate(groups):
        fname = file_names[0] if len(groups) == 1 else f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"

        def produce(idx=idx):
            for i in idx:
                yield es[i].to_file(fmt, source.read(es[i]), cfg)

        st.write_file(os.path.join(out_dir, fname), [specs[i] for i in idx], produce())
        weight_map.update({specs[i][0]: fname for i in idx})
    return weight_map


TOKENIZER_FILES = ("tokenizer.model", "tekken.json")
_MAX_TOKENIZER_BYTES = 256 * 2**20  # real sentencepiece / tekken files are a few MB; never load a stray 10 GB file


def tokenizer_kind(path: str | os.PathLike) -> str:
    """``"sentencepiece"`` or ``"tekken"`` for a valid tokenizer file; raises naming the file and the fix otherwise.

    A sentencepiece model is a protobuf that sentencepiece loads (with at least one piece); a tekken tokenizer
    is a JSON file (``tekken.json``, Mistral's ``tekken_*.json``, or any name: judged by content) with a ``vocab``
    list. Symlinks are followed: what is checked is what
    would be copied.
    """
    path = os.fspath(path)
    shown = path if os.path.realpath(path) == os.path.abspath(path) else f"{path} (-> {os.path.realpath(path)})"
    fix = "pass a sentencepiece tokenizer.model or a tekken.json (or no tokenizer)"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer {shown!r} is not a file. Fix: {fix}.")
    size = os.path.getsize(path)
    if size > _MAX_TOKENIZER_BYTES:
        raise ValueError(f"tokenizer {shown!r} has {size} bytes: too big for a tokenizer model. Fix: {fix}.")
    from mistral_jax.data.tokenizer import is_tekken_file

    if os.path.basename(path).endswith(".json") or is_tekken_file(path):  # tekken: JSON, by name or by content
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"tokenizer {shown!r} is not a tekken tokenizer (unreadable JSON: {e}). Fix: {fix}.") \
                from e
        if not isinstance(d, dict) or not isinstance(d.get("vocab"), list) or not d["vocab"]:
            raise ValueError(f"tokenizer {shown!r} is not a tekken tokenizer (no 'vocab' list). Fix: {fix}.")
        return "tekken"
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        with open(path, "rb") as f:
            ok = sp.LoadFromSerializedProto(f.read())
    except (OSError, RuntimeError, TypeError) as e:
        raise ValueError(f"tokenizer {shown!r} is not a sentencepiece model ({e}). Fix: {fix}.") from e
    if ok is False or sp.GetPieceSize() <= 0:
        raise ValueError(f"tokenizer {shown!r} is not a sentencepiece model. Fix: {fix}.")
    return "sentencepiece"


def copy_tokenizer(tokenizer: Any, out_dir: str) -> str | None:
    """Copy a checked tokenizer into ``out_dir``: a sentencepiece model as ``tokenizer.model``, a tekken one as
    ``tekken.json``.

    Args:
      tokenizer: a ``Tokenizer``, a ``tokenizer.model`` / ``tekken.json`` path, a directory holding one, or None.
      out_dir: the (temporary) export directory.

    Returns:
      ``"sentencepiece"`` / ``"tekken"``, or None when there is no tokenizer.
    """
    if tokenizer is None:
        return None
    path = os.fspath(getattr(tokenizer, "path", tokenizer))
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise FileNotFoundError(f"tokenizer directory {path!r} holds neither of {TOKENIZER_FILES}. "
                                    "Fix: pass a Tokenizer, a tokenizer.model path, or None.")
        path = found[0]
    kind = tokenizer_kind(path)
    shutil.copyfile(path, os.path.join(out_dir, "tekken.json" if kind == "tekken" else "tokenizer.model"))
    return kind


# ----------------------------------------------------------------------------- building the model
def _zeros(shape, dtype, sh):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sh)()


_SETTERS: dict[Any, Any] = {}


def _setter(sh):
    if sh not in _SETTERS:
        def set_slice(a, x, idx):
            lead = (1,) * len(idx)
            return jax.lax.dynamic_update_slice(a, x.reshape(lead + x.shape), (*idx, *([0] * x.ndim)))

        _SETTERS[sh] = jax.jit(set_slice, donate_argnums=0, out_shardings=sh)
    return _SETTERS[sh]


def build_params(cfg: ModelConfig, source: Source, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                 rules: sharding.ShardingRules | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """Read every tensor from ``source`` into device arrays laid out as ``params_dict``, slice by slice.

    With a ``mesh`` each parameter is created sharded (logical-axis rules) and each layer / expert slice is
    transferred as its shards only: the host never holds more than one slice. Returns the config with
    ``param_dtype`` set to the dtype of the arrays, and the nested params dict.
    """
    from flax import nnx

    from mistral_jax.model.transformer import abstract_model

    es = keys_lib.entries(cfg)
    if dtype is None:
        dtype = dtype_name(source.dtype(es[0]))
    out_dt = np_dtype(dtype)
    cfg = cfg.replace(param_dtype=dtype)
    if mesh is not None:
        state = nnx.state(abstract_model(cfg), nnx.Param)
        flat_sh = {tuple(map(str, k)): v for k, v in nnx.to_flat_state(
            sharding.state_shardings(state, mesh, rules or sharding.DEFAULT_RULES))}
    by_path: dict[tuple[str, ...], list[keys_lib.Entry]] = {}
    for e in es:
        by_path.setdefault(e.key.path, []).append(e)
    params: dict[str, Any] = {}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for path, group in by_path.items():
        sh = flat_sh[path] if mesh is not None else default
        sh = getattr(sh, "value", sh)
        if group[0].index == ():
            arr = jax.device_put(np.asarray(source.read(group[0]), out_dt), sh)
        else:
            arr = _zeros(group[0].param_shape, out_dt, sh)
            n = len(group[0].index)
            slice_sh = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*tuple(sh.spec)[n:]))
                        if mesh is not None else default)
            set_slice = _setter(sh)
            for e in group:
                x = jax.device_put(np.asarray(source.read(e), out_dt), slice_sh)
                arr = set_slice(arr, x, tuple(np.int32(i) for i in e.index))
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = arr
    return cfg, params


def read_json_config(directory: str, filename: str, parse: Any, where: str) -> Any:
    """``parse(json of directory/filename)``; every failure names the file and says how to fix it.

    Args:
      directory: the checkpoint directory.
      filename: ``config.json``, ``params.json`` or ``model_config.json``.
      parse: dict -> ModelConfig (``ModelConfig.from_hf`` ...).
      where: what the directory should be, for the missing-file message.
    """
    path = os.path.join(directory, filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} not found: not {where}. Fix: point at the directory holding {filename}.")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path!r} is not valid JSON ({e}). Fix: repair or re-download it.") from e
    try:
        return parse(d)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from e
