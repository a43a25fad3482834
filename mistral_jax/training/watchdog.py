"""Hang watchdog: when a training step runs far longer than usual, every process dumps its thread stacks and says
which process is behind (issue 32).

A multi-host step ends in collectives (the jitted train step, ``distributed.any_process``, ...). When one process
stalls (a slow disk, a stuck data worker, a wedged device), every other process waits in its next collective with
no message at all. The watchdog turns that silence into a report:

* the training loop marks where steps start and end and which collective it enters::

      with Watchdog(dump_dir=workdir) as wd:
          for step in ...:
              wd.step_started(step)
              maybe_stall(step)                 # test hook, a no-op unless MISTRAL_JAX_TEST_STALL is set
              wd.entered("train_step"); state, metrics = step_fn(state, batch)
              wd.entered("any_process"); stop = distributed.any_process(flag)
              wd.step_finished(step)

  These calls only store a tuple in this process's memory (about a microsecond; no I/O, no lock).
* a daemon thread checks every ``interval`` seconds. The first ``warmup_steps`` steps (they compile) are not part of
  the median of step times and have their own limit ``compile_seconds``; every later step may run
  ``max(min_seconds, factor x median)`` seconds.
* when a process's state has not changed for ``publish_after`` seconds (a process waiting in a collective, or a
  slow one), its thread publishes it (step, last collective entered) in the ``jax.distributed`` coordination
  service's key-value store, not through XLA collectives, which are what is stuck. Fast steps publish nothing.
* a step over its limit: the process publishes a hang notice, reads every process's state, logs ONE warning line
  (``step 7 has run 12.3 s (> 10 x median 0.4 s): process 1 is slow (at step 7, last entered 'train_step');
  process 0 is waiting in 'any_process' (step 7)``) and dumps all Python thread stacks
  (``faulthandler.dump_traceback``) to stderr and to ``{dump_dir}/hang-p{process}-step{step}.txt``. Every other
  process that is stuck too sees the notice within ``interval`` seconds and does the same, so each host's stacks
  are in its own log.
* ``exit_on_hang=True``: after the dumps the processes meet at a barrier in the coordination service (at most
  ``exit_grace_seconds``) and leave with ``os._exit(EXIT_CODE)`` (75, ``EX_TEMPFAIL``: try again), so a scheduler
  that restarts failed jobs resumes from the newest checkpoint.

With one process (no ``jax.distributed``) nothing is published; the line names this process.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import io
import itertools
import json
import logging
import os
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any

log = logging.getLogger(__name__)

EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): the run hung and was stopped; restart it from the newest checkpoint
ENV_TEST_STALL = "MISTRAL_JAX_TEST_STALL"  # "step:process_index:seconds": maybe_stall sleeps there (tests only)
KEY_PREFIX = "mistral_jax/watchdog"

_instances = itertools.count()  # every process creates its watchdogs in the same order: the same key namespace


@dataclasses.dataclass
class Hang:
    """One report: the step, how long it had run, the limit, the line logged and where the stacks went."""

    step: int
    elapsed: float
    limit: float
    message: str
    slow: list[int]
    reported_by: int
    dump_path: str | None


# The local state, replaced as one tuple (atomic for the watchdog thread): (step, in_step, seq, last, last_step,
# started_at). ``seq`` counts the collectives entered in this step.
_IDLE = (-1, False, 0, None, None, 0.0)


class Watchdog:
    """Watch training steps for hangs; see the module docstring.

    Args:
      factor: a step may run ``factor`` times the median step time ...
      min_seconds: ... but at least this long.
      compile_seconds: the limit of the first ``warmup_steps`` steps (they compile); None: not watched.
      warmup_steps: steps (counted from ``start``) left out of the median.
      exit_on_hang: after the report, leave the process with ``os._exit(EXIT_CODE)``.
      dump_dir: also write each process's stacks to ``{dump_dir}/hang-p{process}-step{step}.txt``.
      interval: seconds between the thread's checks.
      publish_after: a state unchanged this long is published to the other processes (and this process looks
        for their hang notices).
      window: the median is over this many most recent step times.
      exit_grace_seconds: with ``exit_on_hang``, how long to wait for the other processes' reports before leaving.
    """

    def __init__(self, *, factor: float = 10.0, min_seconds: float = 300.0, compile_seconds: float | None = 3600.0,
                 warmup_steps: int = 1, exit_on_hang: bool = False, dump_dir: str | None = None,
                 interval: float = 0.5, publish_after: float = 1.0, window: int = 100,
                 exit_grace_seconds: float = 60.0):
        if factor <= 0 or min_seconds < 0 or interval <= 0 or warmup_steps < 0 or window < 1:
            raise ValueError(f"Watchdog(factor={factor}, min_seconds={min_seconds}, interval={interval}, "
                             f"warmup_steps={warmup_steps}, window={window}) needs factor > 0, min_seconds >= 0, "
                             "interval > 0, warmup_steps >= 0, window >= 1. Fix: pass such values.")
        self.factor, self.min_seconds, self.compile_seconds = float(factor), float(min_seconds), compile_seconds
        self.warmup_steps, self.exit_on_hang, self.dump_dir = int(warmup_steps), bool(exit_on_hang), dump_dir
        self.interval, self.publish_after, self.exit_grace_seconds = interval, publish_after, exit_grace_seconds
        self.fired: list[Hang] = []
        self._state: tuple = _IDLE
        self._times: deque[float] = deque(maxlen=window)
        self._finished = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client, self.process_index, self.process_count = _coordination()  # again at start()
        self._prefix = f"{KEY_PREFIX}/{next(_instances)}"
        self._published: tuple | None = None
        self._reported_step: int | None = None  # one report per step
        self._seen_notices: set[str] = set()
        self._kv_failed = False

    # ------------------------------------------------------------------ called by the training loop (cheap)
    def step_started(self, step: int) -> None:
        self._state = (int(step), True, 0, self._state[3], self._state[4], time.perf_counter())

    def entered(self, name: str) -> None:
        """The loop is about to enter collective ``name`` (the name the report gives)."""
        s = self._state
        self._state = (s[0], s[1], s[2] + 1, name, s[0], s[5])

    def step_finished(self, step: int, *, record: bool = True) -> None:
        """Step ``step`` is done; ``record=False`` keeps its time out of the median (e.g. a step that also saved)."""
        s = self._state
        now = time.perf_counter()
        if s[1]:
            self._finished += 1
            if record and self._finished > self.warmup_steps:
                self._times.append(now - s[5])
        self._state = (int(step), False, 0, s[3], s[4], now)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Watchdog:
        if self._thread is None:
            self._client, self.process_index, self.process_count = _coordination()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="mistral_jax-watchdog", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread (waits for it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ limits
    def median(self) -> float | None:
        times = list(self._times)
        return statistics.median(times) if times else None

    def limit(self) -> tuple[float | None, str]:
        """The current step's limit in seconds (None: not watched) and how it was set, for the report."""
        if self._finished < self.warmup_steps:
            if self.compile_seconds is None:
                return None, "first steps (compiling) are not watched"
            return float(self.compile_seconds), f"compile limit {self.compile_seconds:g} s"
        m = self.median()
        if m is None or self.factor * m < self.min_seconds:
            how = f"min_seconds {self.min_seconds:g} s" + (f"; {self.factor:g} x median {m:.3g} s" if m else "")
            return self.min_seconds, how
        return self.factor * m, f"{self.factor:g} x median {m:.3g} s"

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        seen, since, next_poll = self._state, time.perf_counter(), 0.0
        while not self._stop.wait(self.interval):
            try:
                s, now = self._state, time.perf_counter()
                if s is not seen:
                    seen, since = s, now
                if s[1] and s[0] != self._reported_step:
                    lim, how = self.limit()
                    if lim is not None and now - s[5] > lim:
                        self._report(s, now - s[5], lim, how, reporter=self.process_index)
                        continue
                if now - since >= self.publish_after and self._client is not None and now >= next_poll:
                    next_poll = now + self.publish_after  # at most one look-up per publish_after (a big job's
                    self._publish(s)  # processes all ask the one coordination service)
                    notice = self._notice()
                    if notice is not None and s[0] != self._reported_step:
                        self._report(s, now - s[5], None, "", reporter=notice["process"], notice=notice)
            except Exception:  # noqa: BLE001 - the watchdog must never take the run down
                log.exception("hang watchdog: check failed (it keeps watching)")

    # ------------------------------------------------------------------ key-value store
    def _kv(self, fn: str, *args: Any) -> Any:
        try:
            return getattr(self._client, fn)(*args)
        except Exception as e:  # noqa: BLE001 - coordinator gone, key missing (try_get), timeouts
            if fn != "key_value_try_get" and not self._kv_failed:
                self._kv_failed = True
                log.warning("hang watchdog: coordination service call %s failed: %s", fn, " ".join(str(e).split()))
            return None

    def _publish(self, s: tuple) -> None:
        if s is self._published:
            return
        rec = dict(step=s[0], in_step=s[1], seq=s[2], last=s[3], last_step=s[4], time=time.time())
        self._kv("key_value_set", f"{self._prefix}/state/{self.process_index}", json.dumps(rec), True)
        self._published = s

    def _notice(self) -> dict | None:
        text = self._kv("key_value_try_get", f"{self._prefix}/hang")
        if not text or text in self._seen_notices:
            return None
        self._seen_notices.add(text)
        notice = json.loads(text)
        return notice if notice["step"] >= self._state[0] else None  # a hang this process has already left behind

    def _states(self, own: tuple) -> dict[int, dict]:
        states = {self.process_index: dict(step=own[0], in_step=own[1], seq=own[2], last=own[3], last_step=own[4])}
        if self._client is not None:
            for key, value in self._kv("key_value_dir_get", f"{self._prefix}/state/") or []:
                p = int(key.rsplit("/", 1)[-1])
                if p != self.process_index:
                    states[p] = json.loads(value)
        return states

    # ------------------------------------------------------------------ the report
    def _report(self, s: tuple, elapsed: float, lim: float | None, how: str, *, reporter: int,
                notice: dict | None = None) -> None:
        step = self._reported_step = s[0]
        if self._client is not None:
            if notice is None:
                text = json.dumps(dict(process=self.process_index, step=step, time=time.time()))
                self._seen_notices.add(text)
                self._kv("key_value_set", f"{self._prefix}/hang", text, True)
            self._published = None
            self._publish(s)
            time.sleep(min(self.interval, 0.2))  # let the others publish their newest states too
        slow, who = describe(self._states(s), self.process_count)
        if notice is None:
            message = f"step {step} has run {elapsed:.1f} s (> {how}): {who}"
        else:
            where = f"at step {step}" + (f" for {elapsed:.1f} s" if s[1] else " (between steps)")
            message = f"hang reported by process {reporter} at step {notice['step']}; process " \
                      f"{self.process_index} {where}: {who}"
        path = self._dump(step, message, s)
        self.fired.append(Hang(step, elapsed, lim if lim is not None else float("nan"), message, slow, reporter, path))
        log.warning("%s", message)
        if self.exit_on_hang:
            self._exit()

    def _dump(self, step: int, message: str, s: tuple) -> str | None:
        head = (f"hang watchdog: process {self.process_index} of {self.process_count}, step {step}, "
                f"{'in the step' if s[1] else 'between steps'}, last collective entered: "
                f"{s[3]!r} (step {s[4]})\n{message}\n")
        _write_stacks(sys.stderr, head)
        if not self.dump_dir:
            return None
        path = os.path.join(self.dump_dir, f"hang-p{self.process_index}-step{step}.txt")
        try:
            os.makedirs(self.dump_dir, exist_ok=True)
            with open(path, "w") as f:
                _write_stacks(f, head)
        except OSError as e:
            log.warning("hang watchdog: could not write %s: %s", path, e)
            return None
        return path

    def _exit(self) -> None:
        if self._client is not None:
            try:  # every process reports before any leaves (process 0 hosts the coordination service)
                self._client.wait_at_barrier(f"{self._prefix}/exit", int(self.exit_grace_seconds * 1000))
            except Exception as e:  # noqa: BLE001 - some process did not report in time: leave anyway
                log.warning("hang watchdog: not every process reported within %g s (%s)", self.exit_grace_seconds,
                            " ".join(str(e).split())[:200])
        log.warning("hang watchdog: exiting with code %d (exit_on_hang) so that the run restarts from its newest "
                    "checkpoint", EXIT_CODE)
        for h in logging.getLogger().handlers + log.handlers:
            try:
                h.flush()
            except Exception:  # noqa: BLE001
                pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CODE)


# ---------------------------------------------------------------------- helpers
def _coordination() -> tuple[Any, int, int]:
    """(coordination-service client or None, process index, process count), without touching any device."""
    try:
        from jax._src.distributed import global_state
    except ImportError:  # a JAX whose internals moved: watch this process alone
        return None, 0, 1
    if global_state.client is None:
        return None, 0, 1
    return global_state.client, int(global_state.process_id), int(global_state.num_processes)


def _progress(st: dict) -> tuple:
    """How far a process got: a process in step s is behind one that finished it; within a step, the number of
    collectives entered."""
    return (st["step"], 0 if st["in_step"] else 1, st["seq"] if st["in_step"] else 0)


def _where(st: dict) -> str:
    if st["step"] < 0:
        return "before the first step"
    if not st["in_step"]:
        return f"between steps {st['step']} and {st['step'] + 1}, last entered {st['last']!r}"
    if not st["seq"]:
        return f"at step {st['step']}, in no collective yet, last {st['last']!r} at step {st['last_step']}"
    return f"at step {st['step']}, last entered {st['last']!r}"


def describe(states: dict[int, dict], process_count: int) -> tuple[list[int], str]:
    """(the processes behind the others, a sentence naming them and what the others wait in)."""
    missing = [p for p in range(process_count) if p not in states]
    tail = f"; no state from {_plural(missing)}" if missing else ""
    if len(states) == 1 and process_count == 1:
        (p, st), = states.items()
        return [p], f"process {p} is slow ({_where(st)})"
    progress = {p: _progress(st) for p, st in states.items()}
    low = min(progress.values())
    slow = sorted(p for p, v in progress.items() if v == low)
    if low == max(progress.values()):
        return [], f"no process is behind: all are {_where(states[slow[0]])} (a hang inside it){tail}"
    first = states[slow[0]]
    groups: dict[str, list[int]] = {}
    for p in sorted(states):
        if p not in slow:
            st = states[p]
            groups.setdefault(f"{st['last']!r} (step {st['step']})" if st["in_step"] else _where(st), []).append(p)
    waiting = "; ".join(f"{_plural(ps)} {'is' if len(ps) == 1 else 'are'} waiting in {w}" for w, ps in groups.items())
    return slow, f"{_plural(slow)} {'is' if len(slow) == 1 else 'are'} slow ({_where(first)}); {waiting}{tail}"


def _plural(ps: list[int]) -> str:
    """``process 1`` / ``processes 0, 2-5``."""
    ranges, i = [], 0
    while i < len(ps):
        j = i
        while j + 1 < len(ps) and ps[j + 1] == ps[j] + 1:
            j += 1
        ranges.append(str(ps[i]) if i == j else f"{ps[i]}-{ps[j]}")
        i = j + 1
    return ("process " if len(ps) == 1 else "processes ") + ", ".join(ranges)


def _write_stacks(f: Any, head: str) -> None:
    """``head`` then every Python thread's stack: faulthandler's (async-signal-safe C code) where ``f`` is a real
    file, else formatted from ``sys._current_frames()`` (a captured stderr under pytest, say)."""
    f.write(head)
    f.flush()
    try:
        faulthandler.dump_traceback(file=f, all_threads=True)
    except (AttributeError, ValueError, io.UnsupportedOperation, OSError):
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            f.write(f"Thread 0x{ident:x} ({names.get(ident, '?')}), most recent call last:\n")
            f.write("".join(traceback.format_stack(frame)))
    f.flush()


def maybe_stall(step: int) -> None:
    """Test hook: sleep ``seconds`` at step ``step`` on process ``process_index`` when ``MISTRAL_JAX_TEST_STALL`` is
    ``"step:process_index:seconds"``; nothing otherwise (one dictionary lookup)."""
    text = os.environ.get(ENV_TEST_STALL)
    if not text:
        return
    try:
        at, proc, seconds = text.split(":")
        at, proc, seconds = int(at), int(proc), float(seconds)
    except ValueError:
        raise ValueError(f"{ENV_TEST_STALL}={text!r} is not 'step:process_index:seconds'. Fix: e.g. "
                         f"{ENV_TEST_STALL}=5:1:60 (or unset it).") from None
    if step == at and _coordination()[1] == proc:
        log.warning("%s: process %d sleeps %g s at step %d", ENV_TEST_STALL, proc, seconds, step)
        time.sleep(seconds)
