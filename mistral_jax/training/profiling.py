"""Profiler traces of chosen train steps, and memory per step.

``config.profile.steps = "100:105"`` traces the train steps that make steps 100 to 104 (``start:stop``, stop
excluded) with ``jax.profiler`` into ``{workdir}/profile/`` (a bucket workdir: traced into the local cache, then
uploaded), on process 0 (``config.profile.processes = "0"``) or on every process (``"all"``). Open it with XProf
(``xprof --logdir WORKDIR/profile``) or TensorBoard's profile plugin. Each step is a ``StepTraceAnnotation``
(``train``, ``step_num``), with host annotations ``data``, ``checkpoint`` and ``eval`` and, inside the compiled
step, the named scopes ``forward``, ``backward`` and ``optimizer`` (``training.step``).

``memory_metrics()``: device memory in use and its peak (``Device.memory_stats()``, TPU / GPU; the largest over
this process's devices) and the host's resident set (``/proc``), in bytes, for every metrics record.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import jax

from mistral_jax import storage

log = logging.getLogger(__name__)

PROFILE_DIR = "profile"


class ProfileError(ValueError):
    """A ``config.profile`` value that cannot work: one line with the fix."""


def parse_steps(spec: str) -> tuple[int, int] | None:
    """``"a:b"`` -> ``(a, b)`` (steps a .. b-1; ``"a"`` is ``a:a+1``); ``""`` -> None."""
    spec = (spec or "").strip()
    if not spec:
        return None
    try:
        a, _, b = spec.partition(":")
        start, stop = int(a), (int(b) if b else int(a) + 1)
    except ValueError:
        raise ProfileError(f"config.profile.steps={spec!r} is not 'start:stop'. Fix: e.g. --config.profile.steps="
                           "100:105 (the steps that make 100 to 104).") from None
    if start < 1 or stop <= start:
        raise ProfileError(f"config.profile.steps={spec!r}: need 1 <= start < stop. Fix: e.g. "
                           "--config.profile.steps=100:105.")
    return start, stop


def check(cfg: Any) -> None:
    """The profile block's values (``ProfileError``), before anything is built."""
    prof = cfg.get("profile")
    if prof is None:
        return
    parse_steps(prof.steps)
    if prof.processes not in ("0", "all"):
        raise ProfileError(f"config.profile.processes={prof.processes!r}. Fix: '0' (process 0) or 'all'.")


class Profiler:
    """Starts a trace before step ``start`` is made and stops it after step ``stop - 1`` (see the module doc)."""

    def __init__(self, cfg: Any, workdir: str):
        prof = cfg.get("profile")
        self.range = parse_steps(prof.steps) if prof is not None else None
        on = prof is not None and (prof.processes == "all" or jax.process_index() == 0)
        if not on:
            self.range = None
        self.target = storage.join(workdir, PROFILE_DIR)
        self.remote = storage.is_remote(workdir)
        self.local = self.target
        if self.range is not None and self.remote:
            self.local = os.path.join(storage.cache_dir("profile"), f"p{jax.process_index()}")
            shutil.rmtree(self.local, ignore_errors=True)
        self.active = False

    def before(self, step: int) -> None:
        """Called before the step that makes ``step``."""
        if self.range is not None and step == self.range[0] and not self.active:
            os.makedirs(self.local, exist_ok=True)
            jax.profiler.start_trace(self.local, create_perfetto_trace=True)
            self.active = True
            log.info("profiling steps %d to %d into %s", self.range[0], self.range[1] - 1, self.target)

    def after(self, step: int) -> None:
        """Called after step ``step`` was made (its results are ready)."""
        if self.active and step >= self.range[1] - 1:
            self.stop()

    def stop(self) -> None:
        if not self.active:
            return
        jax.profiler.stop_trace()
        self.active = False
        if self.remote:
            for root, _, files in os.walk(self.local):
                for name in files:
                    rel = os.path.relpath(os.path.join(root, name), self.local).replace(os.sep, "/")
                    with open(os.path.join(root, name), "rb") as f:
                        storage.write_bytes(storage.join(self.target, rel), f.read())
        log.info("profile written to %s (open it with: xprof --logdir %s)", self.target, self.target)


def memory_metrics() -> dict[str, float]:
    """``memory/device_bytes_in_use``, ``memory/device_peak_bytes`` (where the backend reports them) and
    ``memory/host_rss_bytes``."""
    out: dict[str, float] = {}
    used, peak = [], []
    for d in jax.local_devices():
        try:
            st = d.memory_stats()
        except Exception:  # noqa: BLE001 - a backend without memory stats
            st = None
        if st:
            used.append(st.get("bytes_in_use", 0))
            peak.append(st.get("peak_bytes_in_use", 0))
    if used:
        out["memory/device_bytes_in_use"] = float(max(used))
        out["memory/device_peak_bytes"] = float(max(peak))
    try:
        with open("/proc/self/statm") as f:
            out["memory/host_rss_bytes"] = float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        pass
    return out


def compiled_memory(compiled: Any) -> float | None:
    """Bytes per device the compiled program needs (arguments + outputs + temporaries - aliased), if known."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without the analysis
        return None
    if m is None:
        return None
    return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)
