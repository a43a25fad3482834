"""Goodput: where every second of a training job went, across its restarts.

Categories (seconds, process 0's clock, cumulative over every run of the job in the workdir):

* ``productive``: train steps that advanced the run for the first time;
* ``compile``: compiling the train step (the first step of each run: ``Compiled`` ahead of its first call);
* ``data``: waiting for this process's batch (reading, building the global batch);
* ``rollout``: an RL recipe's rollouts (the hooks' ``rollout``: sampling completions, scoring them);
* ``checkpoint``: restoring at start and the blocking part of saves (the device-to-host copy; an async save's
  writes overlap training), plus waiting for the last save at the end;
* ``eval``: held-out evaluations;
* ``lost``: train steps made again after a resume: the steps after the restored checkpoint that an earlier run had
  already made (its records in ``metrics.jsonl`` say how far it got);
* ``idle``: the rest of the wall time: start-up (imports, devices, the workdir checks), logging.

A run killed without a chance to write (SIGKILL, a lost host) leaves its time after its last record out of the
totals; a signalled run (SIGTERM, SIGINT) writes a last record before it exits.

``wall`` runs from the process's start (read from ``/proc``; the import of this module where there is none) to
now, summed over the runs; every category is measured, and ``idle`` is what is left, so they add up to ``wall``.
``goodput/percent`` is ``productive / wall``. The loop writes ``goodput/<category>_s``, ``goodput/wall_s`` and
``goodput/percent`` with every metrics record, and the final totals (``<category>_s``, ``wall_s``, ``percent``) in
the ``end`` / ``preempted`` event of ``events.jsonl``; a resumed run continues from the newest totals.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

CATEGORIES = ("productive", "compile", "data", "rollout", "checkpoint", "eval", "lost", "idle")
PREFIX = "goodput/"
_IMPORTED = time.time()


def process_start_time() -> float:
    """Unix time this process started (Linux ``/proc``), else the time this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat(5): start time in clock ticks after boot
        with open("/proc/uptime") as f:  # to 10 ms; /proc/stat's btime is whole seconds (up to 1 s off)
            uptime = float(f.read().split()[0])
        now = time.time()
        return min(now - uptime + ticks / os.sysconf("SC_CLK_TCK"), now)
    except (OSError, ValueError, IndexError):
        return _IMPORTED


def previous(records: Sequence[dict[str, Any]], events: Sequence[dict[str, Any]] = ()) -> tuple[dict[str, float],
                                                                                                  int]:
    """``(totals, last_step)`` of the earlier runs: the newest goodput totals (the largest ``wall``) among the
    ``metrics.jsonl`` records (``goodput/<c>_s``) and the ``events.jsonl`` end / preempted events (``<c>_s``),
    zeros if none; and the highest train step recorded (0 if none)."""
    keys = (*CATEGORIES, "wall")
    totals = {c: 0.0 for c in keys}
    for r in records:
        if float(r.get(f"{PREFIX}wall_s", -1.0)) > totals["wall"]:
            totals = {c: float(r.get(f"{PREFIX}{c}_s", 0.0)) for c in keys}
    for e in events:
        if float(e.get("wall_s", -1.0)) > totals["wall"]:
            totals = {c: float(e.get(f"{c}_s", 0.0)) for c in keys}
    last_step = max((int(r["step"]) for r in records if "loss" in r and "step" in r), default=0)
    return totals, last_step


class Goodput:
    """This run's accounting, on top of the earlier runs' ``totals``; ``redo_until``: the last step an earlier run
    made (steps up to it are ``lost`` time when made again)."""

    def __init__(self, totals: dict[str, float] | None = None, redo_until: int = 0, start: float | None = None):
        self.base = dict(totals or {})
        self.redo_until = int(redo_until)
        self.start = process_start_time() if start is None else float(start)
        self.spent = {c: 0.0 for c in CATEGORIES if c != "idle"}
        self.listeners: list[Any] = []  # fn(category, wall start, wall end) per timed block (goodput_recorder)

    @contextlib.contextmanager
    def timed(self, category: str) -> Iterator[None]:
        t, wall = time.perf_counter(), time.time()
        try:
            yield
        finally:
            self.add(category, time.perf_counter() - t)
            for fn in self.listeners:
                fn(category, wall, time.time())

    def add(self, category: str, seconds: float) -> None:
        self.spent[category] += seconds

    def step_category(self, step: int) -> str:
        """``productive`` or ``lost`` for making step ``step`` (1-based: the step being made)."""
        return "lost" if step <= self.redo_until else "productive"

    def totals(self, now: float | None = None) -> dict[str, float]:
        """Job totals in seconds (``wall`` included), earlier runs and this one."""
        wall = (time.time() if now is None else now) - self.start
        run = dict(self.spent)
        run["idle"] = max(0.0, wall - sum(self.spent.values()))
        out = {c: self.base.get(c, 0.0) + run[c] for c in CATEGORIES}
        out["wall"] = self.base.get("wall", 0.0) + wall
        return out

    def record(self, now: float | None = None) -> dict[str, float]:
        """The metrics record's goodput fields."""
        t = self.totals(now)
        out = {f"{PREFIX}{c}_s": v for c, v in t.items()}
        out[f"{PREFIX}percent"] = 100.0 * t["productive"] / t["wall"] if t["wall"] > 0 else 0.0
        return out

    def summary(self, now: float | None = None) -> str:
        """One line for the end of a run."""
        t = self.totals(now)
        parts = ", ".join(f"{c} {t[c]:.1f}s" for c in CATEGORIES if t[c] >= 0.05)
        pct = 100.0 * t["productive"] / t["wall"] if t["wall"] > 0 else 0.0
        return f"goodput {pct:.1f}% of {t['wall']:.1f}s ({parts})"
