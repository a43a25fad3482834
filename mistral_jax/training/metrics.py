"""The metrics writer (JSONL always, TensorBoard via tensorboardX) and reader, for a local or a bucket workdir.

A bucket (``gs://``, ``s3://``) cannot append to an object: for a bucket workdir the writer appends to a local
working copy (``checkpoint_compat.staging_dir``, under ``storage.cache_dir()``) and uploads the whole
``metrics.jsonl`` and the TensorBoard event files in a background thread, at most every ``upload_every`` seconds,
at each ``flush(force=True)`` (the loop calls it at every checkpoint save) and at ``close()``. A resumed run first
downloads the bucket's ``metrics.jsonl``, so its records append to the earlier ones.

The model FLOPs and peaks behind the logged MFU live in ``mistral_jax.flops`` (shared with the dry run and the AOT
tool); they are re-exported here for older imports.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from typing import Any

import jax
import numpy as np

from mistral_jax import storage
from mistral_jax.flops import flops_per_token, mean_attended_keys, measured_matmul_peak, peak_flops

__all__ = ["MetricsWriter", "flops_per_token", "mean_attended_keys", "measured_matmul_peak", "peak_flops",
           "read_events", "read_metrics"]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
TB_DIR = "tb"
UPLOAD_EVERY_S = 15.0  # a bucket workdir's metrics and events: uploaded at most this often (and at saves, at close)


class _Uploader:
    """Copies a bucket workdir's staged files (``metrics.jsonl``, ``tb/*``) to the bucket, whole, in a background
    thread: ``request()`` asks for an upload (several requests while one runs make one more upload), ``close()``
    makes a last one and waits for it. A failed upload is retried at the next request; the local copy stays."""

    def __init__(self, stage: str, workdir: str):
        self.stage, self.workdir = stage, workdir
        self._sent: dict[str, tuple[int, int]] = {}  # staged file -> (size, mtime_ns) last uploaded
        self._wanted = threading.Event()
        self._closing = False
        self._failed: str | None = None
        self._thread = threading.Thread(target=self._run, name="mistral_jax_metrics_upload", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            closing = self._closing  # read after the clear: a close() from here on sets _wanted again
            self.upload()
            if closing:
                return

    def upload(self) -> None:
        """Upload every staged file that changed since its last upload."""
        for root, _, files in os.walk(self.stage):
            for name in sorted(files):
                local = os.path.join(root, name)
                try:
                    st = os.stat(local)
                    if self._sent.get(local) == (st.st_size, st.st_mtime_ns):
                        continue
                    with open(local, "rb") as f:
                        data = f.read()
                    if name.endswith(".jsonl"):  # whole records only: a line being appended waits for the next
                        data = data[:data.rfind(b"\n") + 1]
                    rel = os.path.relpath(local, self.stage).replace(os.sep, "/")
                    storage.path(storage.join(self.workdir, rel)).write_bytes(data)
                    self._sent[local] = (st.st_size, st.st_mtime_ns)
                except Exception as e:  # noqa: BLE001 - reported once; the next upload tries again
                    why = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
                    if self._failed is None:
                        log.warning("could not upload %s to %s (%s); will retry (the local copy is in %s).", name,
                                    self.workdir, why, self.stage)
                    self._failed = why
                    continue
                if self._failed is not None:
                    log.warning("uploaded the metrics to %s again.", self.workdir)
                    self._failed = None

    def close(self) -> None:
        self._closing = True
        self._wanted.set()
        self._thread.join()
        if self._failed is not None:
            log.warning("the last metrics upload to %s failed (%s); the records are in %s.", self.workdir,
                        self._failed, self.stage)


class MetricsWriter:
    """Appends one JSON object per logged step to ``{workdir}/metrics.jsonl`` and mirrors scalars to TensorBoard
    (``{workdir}/tb/``); ``workdir`` is local or a bucket URL (see the module docstring).

    Only process 0 writes. Arrays are flattened to scalars (``expert_load`` -> ``expert_load/e{i}``).
    """

    def __init__(self, workdir: str, tensorboard: bool = True, upload_every: float = UPLOAD_EVERY_S,
                 cfg: Any = None):
        self.active = jax.process_index() == 0
        self.remote = storage.is_remote(workdir)
        self.workdir = storage.absolute(workdir) if self.remote else workdir
        self.upload_every = upload_every
        self.tb = None
        self._uploader: _Uploader | None = None
        self._last_upload = time.monotonic()
        local = workdir
        if self.active and self.remote:
            from mistral_jax.training.checkpoint_compat import staging_dir

            local = staging_dir(workdir, "workdir")
            shutil.rmtree(local)  # a working copy of this run only: the bucket holds the truth
            os.makedirs(local)
            for name in (METRICS_FILE, EVENTS_FILE):
                try:
                    earlier = storage.read_bytes(storage.join(self.workdir, name))
                except FileNotFoundError:
                    earlier = None
                if earlier is not None:  # a resumed run appends to the bucket's records
                    with open(os.path.join(local, name), "wb") as f:
                        f.write(earlier)
        self.path = os.path.join(local, METRICS_FILE)  # the file appended to (the staged copy for a bucket)
        if self.active:
            os.makedirs(local, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self._events = open(os.path.join(local, EVENTS_FILE), "a", encoding="utf-8")  # noqa: SIM115
            if tensorboard:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(local, TB_DIR))
            if self.remote:
                self._uploader = _Uploader(local, self.workdir)
                self._uploader.request()
        self.wandb = None  # config.wandb: Weights & Biases beside the files (training/wandb_writer.py)
        if cfg is not None and self.active:
            from mistral_jax.training.wandb_writer import WandbWriter

            self.wandb = WandbWriter(cfg, workdir, local, jax.process_index()) or None

    @staticmethod
    def scalars(metrics: dict[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in metrics.items():
            a = np.asarray(v)
            if k == "expert_load":
                if a.size:
                    per_layer = a.reshape(-1, a.shape[-1])
                    for e, x in enumerate(per_layer.mean(0)):  # mean over layers
                        out[f"expert_load/e{e}"] = float(x)
                    for layer, row in enumerate(per_layer):  # the run report's heat map (metrics.jsonl only)
                        for e, x in enumerate(row):
                            out[f"expert_load/l{layer}/e{e}"] = float(x)
            elif a.size == 1:
                out[k] = float(a)
        return out

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
        """Log ``metrics`` at ``step`` (``prefix`` e.g. ``"eval/"``); returns the flattened scalars."""
        s = {f"{prefix}{k}": v for k, v in self.scalars(metrics).items()}
        if self.active:
            self._f.write(json.dumps({"step": int(step), "time": round(time.time(), 3), **s}) + "\n")
            self._f.flush()
            shown = {k: v for k, v in s.items()  # per-layer expert load: JSONL only (the report's heat map)
                     if not k.startswith(("expert_load/l", f"{prefix}expert_load/l"))}
            if self.tb is not None:
                for k, v in shown.items():
                    self.tb.add_scalar(k, v, int(step))
                self.tb.flush()
            if self.wandb is not None:
                self.wandb.log(step, shown)
            self.flush()
        return s

    def event(self, name: str, step: int, **fields: Any) -> None:
        """Append ``{"time", "event": name, "step", **fields}`` to ``{workdir}/events.jsonl`` (the run's
        timeline: start, resume, compiled, checkpoint, eval, preempted, hang, end; the run report draws it)."""
        if self.active:
            rec = {"time": round(time.time(), 3), "event": name, "step": int(step), **fields}
            self._events.write(json.dumps(rec) + "\n")
            self._events.flush()
            self.flush()

    def flush(self, force: bool = False) -> None:
        """A bucket workdir: upload the records in the background, if ``upload_every`` seconds have passed since
        the last upload or ``force``. A local workdir is written in place: nothing to do."""
        if self._uploader is None or not (force or time.monotonic() - self._last_upload >= self.upload_every):
            return
        self._last_upload = time.monotonic()
        self._uploader.request()

    def close(self) -> None:
        """Close the files; a bucket workdir's last upload is made (and waited for) here."""
        if self.active:
            self._f.close()
            self._events.close()
            if self.tb is not None:
                self.tb.close()
            if self._uploader is not None:
                self._uploader.close()
            if self.wandb is not None:  # after the upload: the report's figures read the workdir's records
                self.wandb.finish(self.workdir)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of ``{workdir}/metrics.jsonl``, local or in a bucket (a resumed run appends; later records of a
    step win)."""
    text = storage.path(storage.join(workdir, METRICS_FILE)).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_events(workdir: str) -> list[dict[str, Any]]:
    """All records of ``{workdir}/events.jsonl`` (``MetricsWriter.event``), local or in a bucket."""
    text = storage.path(storage.join(workdir, EVENTS_FILE)).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
