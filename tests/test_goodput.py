"""Goodput accounting (``training/goodput.py``): every second of a job in a category, across restarts, with the
steps made again after a resume counted as lost; memory and the run's timeline in the metrics."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mistral_jax.training import goodput as gp
from mistral_jax.training import goodput_recorder
from mistral_jax.training.metrics import read_events, read_metrics
from tests.helpers import run_losses, signal_when

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_categories_add_up_to_the_wall_time():
    g = gp.Goodput({"productive": 10.0, "compile": 2.0, "wall": 20.0, "idle": 8.0}, redo_until=5, start=1000.0)
    g.add("data", 1.5)
    g.add(g.step_category(5), 2.0)  # step 5 was made before: lost
    g.add(g.step_category(6), 3.0)
    t = g.totals(now=1010.0)
    assert t["lost"] == 2.0 and t["productive"] == 13.0 and t["data"] == 1.5
    assert t["wall"] == 30.0 and t["idle"] == 8.0 + (10.0 - 6.5)
    assert sum(t[c] for c in gp.CATEGORIES) == pytest.approx(t["wall"])
    rec = g.record(now=1010.0)
    assert rec["goodput/percent"] == pytest.approx(100 * 13 / 30) and rec["goodput/wall_s"] == 30.0
    assert g.summary(now=1010.0).startswith("goodput 43.3% of 30.0s (productive 13.0s")


def test_previous_totals_are_the_newest_and_the_last_step_the_highest():
    records = [{"step": 1, "loss": 5.0, "goodput/wall_s": 3.0, "goodput/productive_s": 1.0},
               {"step": 2, "loss": 4.0, "goodput/wall_s": 4.0, "goodput/productive_s": 2.0},
               {"step": 2, "eval/loss": 4.5}]
    events = [{"event": "preempted", "step": 2, "wall_s": 5.5, "productive_s": 2.2, "checkpoint_s": 0.5}]
    totals, last = gp.previous(records, events)
    assert last == 2 and totals["wall"] == 5.5 and totals["productive"] == 2.2 and totals["checkpoint"] == 0.5
    assert gp.previous(records)[0]["wall"] == 4.0 and gp.previous([], []) == ({c: 0.0 for c in (*gp.CATEGORIES,
                                                                                                  "wall")}, 0)


def test_process_start_time_is_before_now():
    assert time.time() - 3600 * 24 * 365 < gp.process_start_time() <= time.time()


def _cmd(workdir, tokenizer, steps):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/tiny.py"),
            f"--workdir={workdir}", f"--config.num_steps={steps}", "--config.batch_size=8", "--config.data.seq_len=32",
            "--config.log_every=1", "--config.checkpoint.every_steps=3", "--config.checkpoint.keep=3",
            "--config.eval_every=3", "--config.eval_steps=2", "--config.optimizer.warmup_steps=2",
            f"--config.data.tokenizer={tokenizer}", "--config.progress_bar=False", "--config.goodput.recorder=file"]


def _env():
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": ROOT}


@pytest.mark.slow
def test_a_preempted_and_resumed_job_is_accounted_for(tokenizer_path, tmp_path):
    """Compile, train, save, evaluate, SIGTERM; the newest checkpoint is lost (removed), so the resume makes some
    steps again: the job's goodput wall is the two processes' lifetimes, the categories add up to it, and the steps
    made again are lost time."""
    workdir, steps = str(tmp_path / "run"), 14
    t0 = time.time()
    rc, out = signal_when(_cmd(workdir, tokenizer_path, steps), lambda: os.path.exists(
        os.path.join(workdir, "metrics.jsonl")) and len(run_losses(workdir)) >= 8, env=_env())
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    stopped = max(run_losses(workdir))
    ev1 = read_events(workdir)
    assert [e["event"] for e in ev1][:2] == ["start", "compiled"] and ev1[-1]["event"] == "preempted"
    assert ev1[-1]["wall_s"] == pytest.approx(ev1[-1]["time"] - t0, rel=0.02, abs=0.3)  # from the process start
    assert "checkpoint" in [e["event"] for e in ev1] and "eval" in [e["event"] for e in ev1]

    ckpts = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert ckpts[-1] == stopped and len(ckpts) >= 2
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(stopped)))  # the newest save is lost
    restored = ckpts[-2]

    t1 = time.time()
    r = subprocess.run(_cmd(workdir, tokenizer_path, steps), env=_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "; goodput " in r.stdout and "% of " in r.stdout  # printed at the end of the run
    events = read_events(workdir)[len(ev1):]
    assert events[0]["event"] == "resume" and events[0]["from_step"] == restored
    assert events[0]["earlier_last_step"] == stopped
    end = events[-1]
    assert end["event"] == "end" and end["step"] == steps
    wall = (ev1[-1]["time"] - t0) + (end["time"] - t1)  # each process's life up to its last record
    assert end["wall_s"] == pytest.approx(wall, rel=0.02, abs=0.5)
    cats = {c: end[f"{c}_s"] for c in gp.CATEGORIES}
    assert sum(cats.values()) == pytest.approx(end["wall_s"], rel=0.02)
    for c in ("productive", "compile", "data", "checkpoint", "eval", "lost", "idle"):
        assert cats[c] > 0, (c, cats)
    # the lost time is the steps made again: about (stopped - restored) steps' worth of productive time
    per_step = cats["productive"] / (steps - (stopped - restored))
    assert 0.2 < cats["lost"] / ((stopped - restored) * per_step) < 5, (cats, stopped, restored)
    assert end["percent"] == pytest.approx(100 * cats["productive"] / end["wall_s"], rel=1e-3)
    # every metrics record carries the job's totals so far and the memory in use
    recs = [x for x in read_metrics(workdir) if "loss" in x]
    walls = [x["goodput/wall_s"] for x in recs]
    assert walls == sorted(walls) and all(x["memory/host_rss_bytes"] > 50e6 for x in recs)
    assert all(x["time"] >= t0 for x in recs)

    # the oracle: Google's ml-goodput-measurement calculator over what the recorder logged (goodput_log.jsonl)
    pct, badput, last = goodput_recorder.calculate(workdir)
    print(f"ml-goodput-measurement: {pct:.2f}% vs ours {end['percent']:.2f}%; badput {badput}; ours {cats}")
    assert last == steps - 1  # its steps count from 0
    seconds = {k: v / 100 * end["wall_s"] for k, v in badput.items() if not isinstance(v, dict)}
    custom = {k: v / 100 * end["wall_s"] for k, v in badput["CUSTOM_BADPUT_EVENTS"].items()}
    assert seconds["PROGRAM_STARTUP"] == pytest.approx(cats["compile"], rel=0.5, abs=1.0)  # the compiling steps
    assert custom["EVAL"] == pytest.approx(cats["eval"], rel=0.5, abs=0.5)
    # it sees the restart: the time from the preempted job's last step to the resumed job's first one (the steps
    # made again overwrite their earlier start times in its step table, so it has no "lost" of its own here)
    assert seconds["INFRASTRUCTURE_RECOVERY_FROM_DISRUPTION"] > 0
    # it counts the loop's own work between steps (logging, host syncs) as productive, we count it idle
    assert end["percent"] - 1 <= pct <= end["percent"] + 15


def _recorder_cfg(**goodput):
    from ml_collections import ConfigDict

    return ConfigDict({"goodput": {"recorder": "", "job_name": "", **goodput}})


@pytest.mark.parametrize("goodput, workdir, match", [
    ({"recorder": "tensorboard"}, "/tmp/run", r"config.goodput.recorder='tensorboard'. Fix: use '' \(off\)"),
    ({"recorder": "file"}, "gs://bucket/run", r"writes goodput_log.jsonl into a local workdir, but --workdir=gs://"),
])
def test_bad_recorder_config_is_one_line(goodput, workdir, match):
    with pytest.raises(goodput_recorder.RecorderError, match=match) as e:
        goodput_recorder.check(_recorder_cfg(**goodput), workdir)
    assert "\n" not in str(e.value) and "Fix:" in str(e.value)


@pytest.mark.heavy
def test_the_cloud_recorder_without_credentials_is_one_line_before_any_device(tmp_path, monkeypatch):
    """Offline there is no Cloud Logging: train.py's storage check (before any device) says so in one line."""
    from mistral_jax.config import ConfigError
    from mistral_jax.training import run

    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")  # no metadata server: fail at once, not after a timeout
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no user credentials either
    cfg = _recorder_cfg(recorder="cloud")
    with pytest.raises(ConfigError, match=r"recorder='cloud' could not open Cloud Logging \(.*\). Fix: run on GCP"):
        run.check_storage(cfg, str(tmp_path / "run"))


def test_file_logger_reads_like_cloud_logging(tmp_path):
    """One job's entries, in time order, the next read continuing after the last entry read; the job start kept."""
    path = str(tmp_path / goodput_recorder.LOG_FILE)
    a, other = goodput_recorder.FileLogger(path, "a"), goodput_recorder.FileLogger(path, "b")
    a.write_cloud_logging_entry({"job_name": "a", "job_start_time": 100.0})
    other.write_cloud_logging_entry({"job_name": "b", "step_count": 0, "step_start_time": 101.0})
    a.write_cloud_logging_entry({"job_name": "b", "step_count": 9})  # another job's entry: not written by a
    a.write_cloud_logging_entry({"job_name": "a", "step_count": 0, "step_start_time": 102.0})
    reader = goodput_recorder.FileLogger(path, "a")
    got, last = reader.read_cloud_logging_entries()
    assert [e.get("step_count") for e in got] == [None, 0] and all(e["job_name"] == "a" for e in got)
    assert reader.job_start_time.timestamp() == 100.0
    a.write_cloud_logging_entry({"job_name": "a", "step_count": 1, "step_start_time": 103.0})
    more, _ = reader.read_cloud_logging_entries(last_entry_info=last)
    assert [e["step_count"] for e in more] == [1]
    assert reader.read_cloud_logging_entries(end_time=last[0])[0] == got
