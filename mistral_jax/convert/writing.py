"""Writing safetensors checkpoints from a source: shard planning (HF's ``max_shard_size``) and streaming writes
(shard by shard, tensor by tensor; into a local directory or straight into a bucket)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from mistral_jax import storage
from mistral_jax.convert import keys as keys_lib
from mistral_jax.convert import safetensors_io as st
from mistral_jax.convert.dtypes import np_dtype
from mistral_jax.convert.sources import Source, transient, unchanged


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
                  file_names: Sequence[str] | None, max_shard_size: int | str | None
                  ) -> tuple[dict[str, str], dict[str, int]]:
    """Stream every tensor of ``source.cfg`` into safetensors shard(s) in ``out_dir`` (local or a bucket); returns
    ``({tensor name: file name}, {file name: bytes})``.

    ``file_names(i, n)`` style: when ``max_shard_size`` is None a single file ``file_names[0]`` is written,
    else shards ``model-0000i-of-0000n.safetensors`` (a single one is named ``file_names[0]``).
    """
    cfg = source.cfg
    es = keys_lib.entries(cfg)
    out_dt = None if dtype is None else np_dtype(dtype)
    specs = [(e.name(fmt), st.dtype_code(out_dt if out_dt is not None else source.dtype(e)), e.file_shape(fmt, cfg))
             for e in es]
    groups = [list(range(len(es)))] if max_shard_size is None else plan_shards(specs, parse_size(max_shard_size))
    weight_map, sizes = {}, {}
    for s, idx in enumerate(groups):
        fname = file_names[0] if len(groups) == 1 else f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"

        def produce(idx=idx):
            for i in idx:  # a tensor stored as it is written is copied file to file, never read
                same = unchanged(source, es[i], fmt, st.DTYPES[specs[i][1]])
                yield same if same is not None else es[i].to_file(fmt, transient(source, es[i]), cfg)

        sizes[fname] = st.write_file(storage.join(out_dir, fname), [specs[i] for i in idx], produce())
        weight_map.update({specs[i][0]: fname for i in idx})
    return weight_map, sizes
