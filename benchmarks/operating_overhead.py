"""Cost of the operator's instruments per train step: ``python benchmarks/operating_overhead.py [--repeats 5]``.

Two figures, one JSON line each (median and range over ``--repeats``):

* ``instruments_us_per_step``: microseconds per step of what the loop adds to every step (the goodput timers of
  the data and step phases, the watchdog's step start / collective marks / step end with its thread running, the
  profiler's step annotation outside a trace), timed over 10,000 simulated steps;
* ``step_time_watchdog_on_over_off``: the median train-step time of the tiny config (``configs/tiny.py``, CPU) with
  the watchdog on / off, the two runs alternating in the same process (goal <= 1.01); goodput accounting is always
  on, so its cost is in both runs and in the first figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _line(**kw) -> None:
    print(json.dumps(kw), flush=True)


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def instruments_us(steps: int = 10_000) -> float:
    import jax

    from mistral_jax.training.goodput import Goodput
    from mistral_jax.training.watchdog import Watchdog

    g = Goodput()
    with Watchdog(min_seconds=300.0) as wd:
        t = time.perf_counter()
        for s in range(1, steps + 1):
            wd.step_started(s)
            with jax.profiler.StepTraceAnnotation("train", step_num=s):
                with g.timed("data"), jax.profiler.TraceAnnotation("data"):
                    wd.entered("global_batch")
                t0 = time.perf_counter()
                wd.entered("train_step")
                wd.entered("any_process")
                wd.entered("train_step results")
                g.add(g.step_category(s), time.perf_counter() - t0)
            wd.step_finished(s)
        return (time.perf_counter() - t) / steps * 1e6


def step_time(tokenizer: str, workdir: str, watchdog: bool, steps: int) -> float:
    from mistral_jax.training import trainer
    from mistral_jax.training.metrics import read_metrics

    cfg = trainer.load_config_file(os.path.join(ROOT, "configs/tiny.py"))
    cfg.update_from_flattened_dict({"num_steps": steps, "log_every": 1, "progress_bar": False, "eval_every": 0,
                                    "data.validation": "", "data.tokenizer": tokenizer,
                                    "checkpoint.every_steps": 10 * steps, "watchdog.enabled": watchdog,
                                    "optimizer.warmup_steps": 1})
    trainer.train(cfg, workdir)
    times = [r["step_time"] for r in read_metrics(workdir) if "step_time" in r][2:]  # past the compile
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    _line(figure="instruments_us_per_step", **_stats([instruments_us() for _ in range(args.repeats)]))
    tmp = tempfile.mkdtemp(prefix="operating_overhead_")
    tok = os.path.join(tmp, "tok")
    step_time("", tok, True, 3)  # trains the tiny tokenizer once
    tokenizer = os.path.join(tok, "tokenizer.model")
    ratios, on_s, off_s = [], [], []
    for i in range(args.repeats):
        on = step_time(tokenizer, os.path.join(tmp, f"on{i}"), True, args.steps)
        off = step_time(tokenizer, os.path.join(tmp, f"off{i}"), False, args.steps)
        on_s.append(on)
        off_s.append(off)
        ratios.append(on / off)
    _line(figure="step_time_s_watchdog_on", **_stats(on_s))
    _line(figure="step_time_s_watchdog_off", **_stats(off_s))
    _line(figure="step_time_watchdog_on_over_off", target="<= 1.01", **_stats(ratios))


if __name__ == "__main__":
    main()
