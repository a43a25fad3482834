"""The run's timeline for Google's ``ml-goodput-measurement`` package (``config.goodput.recorder``).

Beside the offline categories of ``goodput.py`` (always on, in ``metrics.jsonl``), a run can record what that
package's ``GoodputRecorder`` records: job start and end, training preparation, the start of every step, data
loading, and custom badput events (checkpoint saves, evaluations). Its ``GoodputCalculator`` then computes the
job's goodput and badput breakdown (and Google Cloud's dashboards and monitoring read it).

* ``recorder="cloud"``: Cloud Logging (the package's own backend; on GCP, with the VM's credentials). Log name
  ``goodput_<job name>``; query it with ``GoodputCalculator(job_name, logger_name)``.
* ``recorder="file"``: the same entries as JSON lines in ``{workdir}/goodput_log.jsonl`` (a local workdir), read
  by ``FileLogger``, which the calculator accepts in place of Cloud Logging:
  ``python -m mistral_jax.training.goodput_recorder WORKDIR`` prints the package's goodput of a run.

Only process 0 records (the package's recommendation: one recorder per job).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import uuid
from typing import Any

LOG_FILE = "goodput_log.jsonl"
RECORDERS = ("", "file", "cloud")
CHECKPOINT_EVENT, EVAL_EVENT = "checkpoint_save", "eval"


class RecorderError(ValueError):
    """``config.goodput`` that cannot work (one line: the value and the fix)."""


def job_name(cfg: Any, workdir: str) -> str:
    g = cfg.get("goodput")
    name = (g.get("job_name", "") if g is not None else "") or os.path.basename(os.path.normpath(workdir))
    return name


def logger_name(name: str) -> str:
    return f"goodput_{name}"


def check(cfg: Any, workdir: str | None = None, *, probe: bool = False) -> None:
    """Raise ``RecorderError`` for a recorder that cannot work (before any device work); ``probe``: also open the
    recorder's backend (the package importable; for 'cloud', a Cloud Logging client with credentials)."""
    g = cfg.get("goodput")
    mode = (g.get("recorder", "") if g is not None else "") or ""
    if mode not in RECORDERS:
        raise RecorderError(f"config.goodput.recorder={mode!r}. Fix: use '' (off), 'file' ({{workdir}}/{LOG_FILE}) "
                            "or 'cloud' (Cloud Logging, on GCP).")
    if mode == "file" and workdir is not None and "://" in workdir:
        raise RecorderError(f"config.goodput.recorder='file' writes {LOG_FILE} into a local workdir, but --workdir="
                            f"{workdir} is a bucket. Fix: use 'cloud' (Cloud Logging) for a bucket workdir, or a local "
                            "workdir.")
    if probe and mode:
        _import_package(mode)
        if mode == "cloud":
            _cloud_client()


def _import_package(mode: str) -> Any:
    try:
        from ml_goodput_measurement import goodput
    except ImportError as e:
        raise RecorderError(f"config.goodput.recorder={mode!r} needs the ml-goodput-measurement package ({e}). "
                            "Fix: pip install 'mistral_jax[goodput]', or set config.goodput.recorder=''.") from None
    return goodput


def _cloud_client() -> Any:
    """A Cloud Logging client (what the package's recorder opens), or ``RecorderError`` naming the cause."""
    try:
        import google.cloud.logging

        return google.cloud.logging.Client()
    except Exception as e:  # noqa: BLE001 - no credentials / project: one line
        said = " ".join(str(e).split())[:300]
        raise RecorderError(f"config.goodput.recorder='cloud' could not open Cloud Logging ({type(e).__name__}: "
                            f"{said}). Fix: run on GCP with a service account allowed to write logs (or `gcloud auth "
                            "application-default login`), or use 'file' / ''.") from None


class FileLogger:
    """The logger interface ``ml_goodput_measurement``'s recorder and calculator use (``write_cloud_logging_entry``,
    ``flush``, ``read_cloud_logging_entries``, ``job_start_time``) over a JSON-lines file: Cloud Logging's
    behaviour for one job (entries of other jobs ignored, reads in time order after the last entry read)."""

    def __init__(self, path: str, job_name: str):
        self.path, self.job_name = path, job_name
        self.job_start_time: datetime.datetime | None = None
        self._f = None

    def write_cloud_logging_entry(self, entry: dict[str, Any] | None) -> None:
        if entry is None or entry.get("job_name") != self.job_name:
            return
        if self._f is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._f = open(self.path, "a")  # noqa: SIM115 - kept open for the run, closed by close()
        rec = {"timestamp": datetime.datetime.now(datetime.UTC).timestamp(), "id": uuid.uuid4().hex,
               "payload": entry}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def read_cloud_logging_entries(self, start_time: datetime.datetime | None = None,
                                   end_time: datetime.datetime | None = None,
                                   last_entry_info: tuple[Any, str] | None = None):
        rows = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        rows = [r for r in rows if r["payload"].get("job_name") == self.job_name]
        rows.sort(key=lambda r: r["timestamp"])
        ts = lambda r: datetime.datetime.fromtimestamp(r["timestamp"], tz=datetime.UTC)  # noqa: E731
        if end_time is not None:
            rows = [r for r in rows if ts(r) <= end_time]
        if last_entry_info and last_entry_info[1]:
            ids = [r["id"] for r in rows]
            rows = rows[ids.index(last_entry_info[1]) + 1:] if last_entry_info[1] in ids else \
                [r for r in rows if ts(r) > last_entry_info[0]]
        elif start_time is not None:
            rows = [r for r in rows if ts(r) >= start_time]
        payloads = [r["payload"] for r in rows]
        if self.job_start_time is None:
            first = next((p["job_start_time"] for p in payloads if "job_start_time" in p), None)
            if first is not None:
                self.job_start_time = datetime.datetime.fromtimestamp(first, tz=datetime.UTC)
        last = (ts(rows[-1]), rows[-1]["id"]) if rows else (None, None)
        return payloads, last


def _utc(t: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t, tz=datetime.UTC)


class Recorder:
    """``GoodputRecorder`` calls at the loop's points (no-ops on processes other than 0 and when off)."""

    def __init__(self, cfg: Any, workdir: str, process_index: int):
        g = cfg.get("goodput")
        self.mode = (g.get("recorder", "") if g is not None else "") or ""
        self.rec = None
        self._logger: FileLogger | None = None
        if not self.mode or process_index != 0:
            return
        check(cfg, workdir)
        self.job_name = job_name(cfg, workdir)
        goodput = _import_package(self.mode)
        if self.mode == "file":
            self._logger = FileLogger(os.path.join(workdir, LOG_FILE), self.job_name)
        else:
            _cloud_client()  # its one-line error, not the package's traceback
        self.rec = goodput.GoodputRecorder(self.job_name, logger_name(self.job_name), logging_enabled=True,
                                           cloud_logger=self._logger)

    def __bool__(self) -> bool:
        return self.rec is not None

    def job_start(self, t: float, ready: float) -> None:
        """The job started at ``t`` (the process start); training preparation ran from ``t`` to ``ready``."""
        if self.rec is not None:
            self.rec.record_job_start_time(_utc(t))
            self.rec.record_training_preparation_start_time(_utc(t))
            self.rec.record_training_preparation_end_time(_utc(ready))

    def step_start(self, step: int, t: float) -> None:
        if self.rec is not None:
            self.rec.record_step_start_time(step, _utc(t))

    def data(self, t0: float, t1: float) -> None:
        if self.rec is not None:
            self.rec.record_data_loading_start_time(_utc(t0))
            self.rec.record_data_loading_end_time(_utc(t1))

    def badput(self, kind: str, t0: float, t1: float) -> None:
        if self.rec is not None:
            self.rec.record_custom_badput_event_start_time(_utc(t0), custom_badput_event_type=kind)
            self.rec.record_custom_badput_event_end_time(_utc(t1), custom_badput_event_type=kind)

    def timed(self, category: str, t0: float, t1: float) -> None:
        """``Goodput``'s listener: its data, checkpoint and eval blocks as the package's events."""
        if category == "data":
            self.data(t0, t1)
        elif category in ("checkpoint", "eval"):
            self.badput(CHECKPOINT_EVENT if category == "checkpoint" else EVAL_EVENT, t0, t1)

    def job_end(self, t: float) -> None:
        if self.rec is not None:
            self.rec.record_job_end_time(_utc(t))
            self.rec.flush()
        if self._logger is not None:
            self._logger.close()


def calculate(workdir: str, name: str | None = None) -> tuple[float, dict[str, Any], int]:
    """The package's ``GoodputCalculator`` over a run's ``goodput_log.jsonl``: ``(goodput %, badput breakdown by
    ``BadputType`` name, last productive step)``."""
    import tempfile

    from ml_goodput_measurement import goodput

    path = os.path.join(workdir, LOG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist. Fix: train with --config.goodput.recorder=file.")
    if name is None:
        with open(path) as f:
            name = json.loads(f.readline())["payload"]["job_name"]
    with tempfile.TemporaryDirectory() as cache:
        calc = goodput.GoodputCalculator(name, logger_name(name), cloud_logger=FileLogger(path, name),
                                         cache_dir=cache)
        pct, badput, last = calc.get_job_goodput(include_badput_breakdown=True)
    return float(pct), {getattr(k, "name", str(k)): v for k, v in badput.items()}, int(last)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m mistral_jax.training.goodput_recorder WORKDIR  (a run trained with "
              "--config.goodput.recorder=file)", file=sys.stderr)
        return 2
    try:
        pct, badput, last = calculate(args[0])
    except (FileNotFoundError, ImportError) as e:
        print(f"goodput_recorder: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"goodput_percent": round(pct, 3), "last_productive_step": last,
                      "badput_percent": {k: v for k, v in badput.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
