"""The training progress bar's ETA leaves out the first step, which compiles (a 16 s run once showed 28:10)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
from tqdm import tqdm

from mistral_jax.training.progress import StepBar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAR = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:]+)")  # n/total [elapsed<ETA (an unknown ETA, "?", is skipped)


def _seconds(text: str) -> int:
    out = 0
    for part in text.split(":"):
        out = out * 60 + int(part)
    return out


def _shown(output: str) -> list[tuple[int, int, int, int]]:
    """Every ``(n, total, elapsed_s, eta_s)`` a bar printed (tqdm rewrites its line with carriage returns)."""
    return [(int(n), int(t), _seconds(e), _seconds(r)) for n, t, e, r in BAR.findall(output)]


@pytest.mark.parametrize("bar_class", [tqdm, StepBar], ids=["tqdm", "StepBar"])
def test_eta_after_a_compiling_first_step(bar_class, monkeypatch):
    """A simulated clock: the first step takes 30 s (compilation), every later one 0.2 s. Plain tqdm's ETA is
    ~100x the real remaining time after it; StepBar's is within 3x of it from the first ETA it shows."""
    now = [0.0]
    monkeypatch.setattr("tqdm.std.time", lambda: now[0])  # the clock tqdm reads
    total, out = 300, io.StringIO()
    bar = bar_class(total=total, file=out, desc="train", ascii=True)
    now[0] += 30.0
    bar.update(1)
    for _ in range(total - 1):
        now[0] += 0.2
        bar.update(1)
    bar.close()
    shown = [(n, eta, (total - n) * 0.2) for n, _, _, eta in _shown(out.getvalue()) if n < total]
    assert shown and shown[0][0] <= 3, out.getvalue()[:500]  # an ETA shows from the first steps on
    if bar_class is tqdm:  # the bug StepBar fixes
        assert max(eta / real for _, eta, real in shown[:3]) > 20, shown[:3]
    else:
        assert all(eta <= 3 * real + 1 for _, eta, real in shown), [s for s in shown if s[1] > 3 * s[2] + 1]
        assert _shown(out.getvalue())[-1][2] < 70  # the elapsed time leaves the 30 s of compilation out


@pytest.mark.slow
def test_train_py_eta_is_sensible(tmp_path):
    """A real run: every ETA the bar prints is at most 3x the whole run's post-compile time (the last elapsed)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run"),
                          "--config.num_steps=40", "--config.optimizer.warmup_steps=1", "--config.data.validation=",
                          "--config.progress_bar=True", "--config.checkpoint.every_steps=1000"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    shown = _shown(res.stderr)
    assert shown and shown[-1][0] == 40, res.stderr[-2000:]
    run_time = shown[-1][2]  # elapsed at the end: the steps after the first
    assert all(eta <= 3 * run_time + 2 for n, _, _, eta in shown), [s for s in shown if s[3] > 3 * run_time + 2]
