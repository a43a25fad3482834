"""The training loader of prepared data (``data/prepared.py``), on Grain: per-process rows, global shuffle, epochs,
weighted mixtures, prefetch in threads, and a position that resumes in constant time.

A run names its data in ``config.data``:

* ``data.train = "/path/or/gs://bucket/prepared"``: one prepared dataset (a directory with a ``manifest.json``);
* ``data.mixture = "web:0.7,code:0.2,math:0.1"`` with ``data.datasets = "web=gs://b/web,code=/d/code,math=/d/math"``:
  a weighted mixture; ``parse_mixture`` checks it (weights are numbers >= 0 with a positive sum, every name has a
  path, every path a name in the mixture) in one line each.

The stream: each dataset's rows in a permutation per epoch (Grain's ``shuffle``: seed ``data_seed + dataset index``,
reseeded every epoch; ``data.shuffle = False`` keeps the prepared order), repeated for training; a mixture
interleaves them by weight (Grain's ``MapDataset.mix``: deterministic, every window of ``1 / min weight`` rows
holds each dataset in proportion). Global batch ``b`` is rows ``[b * B, (b + 1) * B)`` of that stream; a process
reads only the rows of its own devices (``rows``: ``recipe.addressable_rows``), so two, four or one process read
disjoint rows whose union is the global batch, and the stream does not depend on the process count.

The position is the index of the next global batch (Grain's iterator state, ``{"next_index": b}``), the same on
every process: saved in the Orbax checkpoint (``data_state``), it resumes at batch ``b`` by index arithmetic, in
the same time at step 10 as at step 10,000. The state also records the mixture weights: a resume with other
weights is refused (``MixtureChanged``) unless ``data.allow_mixture_change``; then the run continues at the same
global batch index of the stream the new weights define (each dataset continues from its own rows at that
point: a dataset whose weight grew resumes further into its epoch, one whose weight shrank repeats some rows).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mistral_jax import storage
from mistral_jax.data import prepared

log = logging.getLogger(__name__)

STATE_KIND = "prepared"


class MixtureError(ValueError):
    """A ``data.mixture`` / ``data.datasets`` that cannot be read (one line: what, the values, the fix)."""


class MixtureChanged(ValueError):
    """A resume whose mixture weights differ from the checkpoint's, without ``data.allow_mixture_change``."""


def parse_mixture(mixture: str, datasets: str) -> list[tuple[str, str, float]]:
    """``[(name, path, weight)]`` of ``data.mixture`` ("name:weight,...") and ``data.datasets`` ("name=path,...")."""
    paths: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in (datasets or "").split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise MixtureError(f"config.data.datasets item {item!r} is not name=path. Fix: e.g. "
                               "--config.data.datasets='web=gs://bucket/web,code=/data/code'.")
        if name.strip() in paths:
            raise MixtureError(f"config.data.datasets names {name.strip()!r} twice. Fix: one path per name.")
        paths[name.strip()] = path.strip()
    out: list[tuple[str, str, float]] = []
    for item in filter(None, (s.strip() for s in (mixture or "").split(","))):
        name, sep, weight = item.rpartition(":")
        name = name.strip()
        try:
            w = float(weight)
        except ValueError:
            w = float("nan")
        if not sep or not name or not np.isfinite(w) or w < 0:
            raise MixtureError(f"config.data.mixture item {item!r} is not name:weight with a weight >= 0. Fix: e.g. "
                               "--config.data.mixture='web:0.7,code:0.2,math:0.1'.")
        if name not in paths:
            raise MixtureError(f"config.data.mixture names {name!r}, which config.data.datasets does not map to a "
                               f"path (it maps {sorted(paths)}). Fix: add {name}=PATH to config.data.datasets.")
        if any(n == name for n, _, _ in out):
            raise MixtureError(f"config.data.mixture names {name!r} twice. Fix: one weight per dataset.")
        out.append((name, paths[name], w))
    if not out:
        raise MixtureError(f"config.data.mixture={mixture!r} names no dataset. Fix: e.g. 'web:0.7,code:0.3'.")
    total = sum(w for _, _, w in out)
    if not total > 0:
        raise MixtureError(f"config.data.mixture={mixture!r}: the weights sum to {total}, not a positive number. "
                           "Fix: give at least one dataset a positive weight.")
    unused = sorted(set(paths) - {n for n, _, _ in out})
    if unused:
        raise MixtureError(f"config.data.datasets maps {unused} but config.data.mixture gives them no weight. Fix: add "
                           f"them to the mixture (weight 0 to keep them out) or drop them from data.datasets.")
    return [(n, p, w / total) for n, p, w in out if w > 0]


def _empty_like(fields: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    return {k: np.zeros(s["shape"], prepared.LOAD_DTYPES.get(k, s["dtype"])) for k, s in fields.items()}


class GrainBatches:
    """This process's rows of every global batch of prepared data; ``get_state`` / ``set_state`` resume exactly.

    Args:
      components: ``[(name, RowSource, weight)]`` (weights summing to 1; one entry for a single dataset).
      batch_size: rows of a global batch.
      rows: the global row ids this process reads (``recipe.addressable_rows``).
      seed, shuffle: each dataset's row order per epoch.
      loop: repeat epochs (training); False: one pass over the (single) dataset, the last batch padded with
        weight-0 rows, then stop (eval).
      num_threads, prefetch: Grain's read threads and prefetched batches.
      allow_mixture_change: ``set_state`` accepts a checkpoint written with other mixture weights.
    """

    def __init__(self, components: Sequence[tuple[str, prepared.RowSource, float]], batch_size: int,
                 rows: Sequence[int], *, seed: int = 0, shuffle: bool = True, loop: bool = True,
                 num_threads: int = 4, prefetch: int = 4, allow_mixture_change: bool = False):
        import grain

        if not components:
            raise MixtureError("no prepared dataset to read. Fix: set config.data.train or config.data.mixture.")
        if not rows or any(not 0 <= r < batch_size for r in rows):
            raise ValueError(f"rows={list(rows)[:8]} of batch_size={batch_size}: row ids must lie in [0, batch_size).")
        fields = components[0][1].fields
        for name, src, _ in components[1:]:
            if src.fields != fields:
                raise MixtureError(f"dataset {name!r} ({src.path}) has rows {src.fields}, dataset "
                                   f"{components[0][0]!r} has {fields}: a mixture needs the same kind, seq_len and "
                                   "vocabulary size. Fix: prepare them with the same settings.")
        if not loop and len(components) > 1:
            raise MixtureError("a mixture is for training data. Fix: give held-out data as one dataset "
                               "(config.data.validation).")
        self.components = list(components)
        self.names = [n for n, _, _ in components]
        self.weights = [float(w) for _, _, w in components]
        self.batch_size, self.rows = int(batch_size), [int(r) for r in rows]
        self.seed, self.shuffle, self.loop = int(seed), bool(shuffle), bool(loop)
        self.fields, self.allow_mixture_change = fields, bool(allow_mixture_change)
        self._empty = _empty_like(fields)
        datasets = []
        for i, (_, src, _) in enumerate(components):
            ds = grain.MapDataset.source(src)
            if self.shuffle:
                ds = ds.shuffle(seed=(self.seed + 7919 * i) % 2**32)
            datasets.append(ds.repeat() if loop else ds)
        self._stream = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, self.weights)
        n = len(components[0][1])
        self.num_batches = None if loop else -(-n // self.batch_size)
        stream, size, b_size, my_rows, empty = self._stream, None if loop else n, self.batch_size, self.rows, \
            self._empty

        def batch(b: int) -> dict[str, np.ndarray]:
            out = []
            for r in my_rows:
                i = b * b_size + r
                out.append(stream[i] if size is None or i < size else empty)
            return {k: np.stack([row[k] for row in out]) for k in out[0]}

        index = grain.MapDataset.range(self.num_batches if self.num_batches is not None else 1 << 62)
        self._batches = index.map(batch)
        self._read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._it: Any = None
        self._next = 0

    # -- iteration
    def _iter(self) -> Any:
        if self._it is None:
            self._it = iter(self._batches.to_iter_dataset(self._read))
            if self._next:
                self._it.set_state({"next_index": self._next})
        return self._it

    def __iter__(self) -> GrainBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iter())
        self._next += 1
        return batch

    # -- position
    def fingerprint(self) -> str:
        """What defines the stream apart from the weights: the datasets (manifests), seed, shuffle, batch size."""
        key = json.dumps([[n, hashlib.sha256(json.dumps(src.manifest, sort_keys=True).encode()).hexdigest()[:16]]
                          for n, src, _ in self.components] + [self.seed, self.shuffle, self.batch_size])
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def epoch(self) -> int:
        """Whole passes over the dataset read least far (by rows consumed / rows held)."""
        consumed = self._next * self.batch_size
        return int(min(consumed * w // len(src) for (_, src, _), w in zip(self.components, self.weights,
                                                                           strict=True)))

    def get_state(self) -> dict[str, Any]:
        """JSON-able position (the same on every process): Grain's ``next_index`` (global batches read), the
        mixture, the fingerprint."""
        return {"kind": STATE_KIND, "grain": {"next_index": self._next}, "epoch": self.epoch(),
                "mixture": dict(zip(self.names, self.weights, strict=True)), "fingerprint": self.fingerprint()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue at ``state``'s batch (constant time). Refuses another mixture unless ``allow_mixture_change``."""
        if state.get("kind") != STATE_KIND:
            raise ValueError(f"the checkpoint's data position is of another loader ({sorted(state)[:6]}): it was "
                             "written by a run reading raw files or a hub dataset. Fix: resume with the data it was "
                             "written with, or start a new workdir.")
        saved = {k: float(v) for k, v in (state.get("mixture") or {}).items()}
        now = dict(zip(self.names, self.weights, strict=True))
        if set(saved) != set(now) or any(abs(saved[k] - now[k]) > 1e-9 for k in now):
            if not self.allow_mixture_change:
                raise MixtureChanged(
                    f"the checkpoint was written with the mixture {_fmt(saved)}, this run asks for {_fmt(now)}. Fix: "
                    "resume with the same config.data.mixture, or pass --config.data.allow_mixture_change=true to "
                    "continue at the same global batch with the new weights (see data/loader.py).")
            log.warning("data mixture changed on resume: %s -> %s (config.data.allow_mixture_change): continuing at "
                        "global batch %d of the new mixture's stream.", _fmt(saved), _fmt(now),
                        int(state["grain"]["next_index"]))
        elif state.get("fingerprint") not in (None, self.fingerprint()):
            log.warning("data settings changed since the checkpoint (fingerprint %s -> %s): the resumed data order "
                        "differs from the interrupted run's.", state.get("fingerprint"), self.fingerprint())
        self._next = int(state["grain"]["next_index"])
        self._it = None


def _fmt(weights: Mapping[str, float]) -> str:
    return ",".join(f"{k}:{v:.4g}" for k, v in weights.items()) or "(none)"


def open_components(data_cfg: Any, split: str, *, tokenizer: Any = None, kind: str | None = None
                    ) -> list[tuple[str, prepared.RowSource, float]] | None:
    """The prepared datasets of ``split`` from a run's ``config.data`` (checked against the run), or None when
    the data is not prepared (raw files or a hub dataset)."""
    seq_len = int(data_cfg.seq_len)
    if split == "train" and data_cfg.get("mixture", ""):
        comps = parse_mixture(data_cfg.mixture, data_cfg.get("datasets", ""))
        return [(n, prepared.open_dataset(p, what=f"config.data.datasets[{n}]", tokenizer=tokenizer, seq_len=seq_len,
                                          kind=kind), w) for n, p, w in comps]
    spec = data_cfg.train if split == "train" else data_cfg.validation
    if not spec or not prepared.is_prepared(spec):
        return None
    what = "config.data.train" if split == "train" else "config.data.validation"
    return [(split, prepared.open_dataset(spec, what=what, tokenizer=tokenizer, seq_len=seq_len, kind=kind), 1.0)]


def check_config(data_cfg: Any, tokenizer: Any = None, kind: str | None = None) -> None:
    """Every prepared dataset the config names opens and fits the run (before any device work); raises
    ``MixtureError`` / ``prepared.PreparedError``."""
    if data_cfg.get("mixture", "") and data_cfg.get("train", ""):
        raise MixtureError(f"config.data.train={data_cfg.train!r} and config.data.mixture={data_cfg.mixture!r} are "
                           "both set. Fix: name the training data once: for the mixture pass --config.data.train='' as "
                           "well, or drop data.mixture to train on data.train.")
    for split in ("train", "validation"):
        open_components(data_cfg, split, tokenizer=tokenizer, kind=kind)



# ------------------------------------------------------------------------------------------- raw files
# the data options that define a prepared copy of raw files (``data/prepare.py``'s options, from ``config.data``)
RAW_OPTIONS = ("seq_len", "add_bos", "add_eos", "text_field", "messages_field", "pairs_per_row", "skip_invalid",
               "on_decode_error")


def _file_identity(path: str) -> list[Any]:
    """What changes when a file changes: size and modification time (a bucket object's size and etag /
    generation), without reading it."""
    if not storage.is_remote(path):
        st = os.stat(path)
        return [path, st.st_size, st.st_mtime_ns]
    fs, key = storage.fs_and_key(path)
    info = fs.info(key)
    return [path, info.get("size"), info.get("etag") or info.get("generation") or info.get("md5Hash")
            or str(info.get("updated") or info.get("LastModified") or info.get("mtime"))]


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock on ``path`` between the processes of this machine (one prepares, the others wait)."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_prepare(spec: str, data_cfg: Any, tokenizer: Any, kind: str) -> str:
    """The prepared copy of the raw files ``spec`` (file / dir / glob, local or in a bucket) in this machine's cache
    (``storage.cache_dir("data", <key>)``): prepared on first use (streamed, memory flat), reused while the files,
    the tokenizer and the data options stay the same. Small runs on raw files read it with the same loader as
    prepared data (global shuffle, constant-time resume); for a pod, prepare once into a bucket instead."""
    from mistral_jax.data import documents
    from mistral_jax.data.prepare import prepare

    inputs = documents.expand(spec)
    key = hashlib.sha256(json.dumps({
        "files": [_file_identity(f) for f in inputs], "kind": kind, "version": prepared.VERSION,
        "tokenizer": prepared.tokenizer_identity(tokenizer)["sha256"],
        "options": {k: data_cfg.get(k) for k in RAW_OPTIONS}}, sort_keys=True, default=str).encode()).hexdigest()[:20]
    dest = storage.cache_dir("data", key)
    with _locked(dest + ".lock"):
        if not prepared.is_prepared(dest):
            log.info("preparing %s (%d file(s)) into %s (once: later runs reuse it)", spec, len(inputs), dest)
            prepare(",".join(inputs), dest, tokenizer=tokenizer.path, seq_len=int(data_cfg.seq_len), format=kind,
                    add_bos=bool(data_cfg.get("add_bos", True)), add_eos=bool(data_cfg.get("add_eos", True)),
                    text_field=data_cfg.get("text_field", "text"),
                    messages_field=data_cfg.get("messages_field", "messages"),
                    pairs_per_row=int(data_cfg.get("pairs_per_row", 1) or 1),
                    skip_invalid=bool(data_cfg.get("skip_invalid", False)),
                    on_decode_error=data_cfg.get("on_decode_error", "replace"),
                    workers=min(os.cpu_count() or 1, max(1, len(inputs))), progress=False)
    return dest
