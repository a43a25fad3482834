"""Training into a bucket (issue 30, the training side): ``train.py --workdir gs://bkt/run`` (and ``s3://``) works
like a local workdir, on real emulators (fake-gcs-server and moto, tests/emulators.py; nothing is mocked).

* a run on gs:// is preempted by SIGTERM and resumes to the per-step losses of an uninterrupted run; every artefact
  is in the bucket, nothing is written locally but the staging copy under ``$MISTRAL_JAX_CACHE``;
* SIGKILL while a checkpoint is being written to the bucket: the rerun takes the dead run's lock over and resumes
  from the previous complete checkpoint;
* the same preemption and resume on s3://;
* two processes x 4 devices train into one bucket tree, which restores on one process x 8 devices;
* bad input (a missing bucket, a stopped endpoint, a live lock) is one line, exit 2, and changes nothing in the
  bucket; a stale lock is taken over with one warning line;
* the bucket lock itself: exclusive, refreshed while held, replaced only while it is at the version read.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mistral_jax import storage
from mistral_jax.training import checkpoint as ckpt_lib
from mistral_jax.training import checkpoint_compat
from mistral_jax.training.metrics import read_metrics
from tests.emulators import free_port
from tests.helpers import run_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 8, 2  # checkpoints every 2 steps, the newest 2 kept
TIMEOUT = 400
COMMIT = "commit_success.txt"  # Orbax's mark of a finished step in a bucket


def _overrides(tokenizer: str) -> dict[str, object]:
    return {"num_steps": STEPS, "batch_size": 8, "data.seq_len": 32, "log_every": 1, "checkpoint.every_steps": EVERY,
            "checkpoint.keep": 2, "optimizer.warmup_steps": 1, "data.tokenizer": tokenizer, "data.validation": "",
            "progress_bar": False}


def _cmd(workdir: str, tokenizer: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
            f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in _overrides(tokenizer).items())]


def _env(tmp_path, devices: int = 8, **extra) -> dict[str, str]:
    """The emulators' variables (the fixtures put them in os.environ), 8 CPU devices, and a fresh cache, home and
    temporary directory under ``tmp_path`` (so that what the run writes locally can be listed)."""
    for d in ("cwd", "home", "tmp"):
        (tmp_path / d).mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MISTRAL_JAX_")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="float32", PYTHONPATH=ROOT, MISTRAL_JAX_CACHE=str(tmp_path / "cache"),
               HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(cmd, tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(tmp_path, **env), cwd=tmp_path / "cwd", capture_output=True, text=True,
                          timeout=TIMEOUT)


def _fs(url: str):
    fs = storage.filesystem(storage.url_scheme(url))
    fs.invalidate_cache()
    return fs


def _key(url: str) -> str:
    return url.split("://", 1)[1]


def _exists(url: str) -> bool:
    return _fs(url).exists(_key(url))


def _tree(url: str) -> dict[str, str]:
    """``{path under url: sha256}`` of every object under ``url`` (a whole bucket: ``gs://bkt``)."""
    fs, root = _fs(url), _key(url).rstrip("/")
    return {p[len(root) + 1:]: hashlib.sha256(fs.cat_file(p)).hexdigest() for p in fs.find(root)}


def _wait_for(proc: subprocess.Popen, pred, what: str, poll: float = 0.05) -> None:
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and proc.poll() is None:
        if pred():
            return
        time.sleep(poll)
    proc.kill()
    pytest.fail(f"the run ended or stalled before {what}:\n" + proc.communicate()[0][-3000:])


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: ") and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def _local_files(tmp_path) -> dict[str, list[str]]:
    """What the run left in the working directory, HOME, TMPDIR and the cache (paths relative to each)."""
    out = {}
    for d in ("cwd", "home", "tmp", "cache"):
        root = tmp_path / d
        out[d] = sorted(os.path.relpath(os.path.join(r, f), root) for r, _, fs in os.walk(root) for f in fs)
    return out


@pytest.fixture(scope="module")
def reference(gcs, tokenizer_path, tmp_path_factory):
    """An uninterrupted ``STEPS``-step run on gs:// and its per-step losses (read from the bucket)."""
    url = storage.join(gcs.bucket(), "reference")
    proc = _run(_cmd(url, tokenizer_path), tmp_path_factory.mktemp("reference"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = run_losses(url)
    assert sorted(losses) == list(range(1, STEPS + 1)) and len({round(v, 4) for v in losses.values()}) > 1
    return url, losses


def _preempt_and_resume(url: str, tokenizer: str, tmp_path) -> int:
    """SIGTERM once the first checkpoint is complete in the bucket; the same command resumes. Returns the step
    at which the run was stopped."""
    cmd = _cmd(url, tokenizer)
    proc = subprocess.Popen(cmd, env=_env(tmp_path), cwd=tmp_path / "cwd", stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for(proc, lambda: _exists(storage.join(url, "checkpoints", str(EVERY), COMMIT)), "its first checkpoint")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    stopped = max(run_losses(url))  # the metrics of the stopped run are in the bucket (uploaded at its exit)
    assert EVERY < stopped < STEPS, stopped
    assert ckpt_lib.finalized_steps(storage.join(url, "checkpoints"))[-1] == stopped  # saved on SIGTERM
    assert not _exists(storage.join(url, ".lock"))  # released at exit
    proc = _run(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {url}/checkpoints at step {stopped}" in proc.stderr
    resumed = [r["step"] for r in read_metrics(url) if "loss" in r][stopped:]
    assert resumed == list(range(stopped + 1, STEPS + 1))  # continued, did not start over
    return stopped


# --------------------------------------------------------------------------------------------- runs
@pytest.mark.slow
def test_preempted_run_on_gcs_resumes_exactly_with_everything_in_the_bucket(reference, gcs, tokenizer_path,
                                                                            tmp_path):
    url = storage.join(gcs.bucket(), "run")
    _preempt_and_resume(url, tokenizer_path, tmp_path)
    assert run_losses(url) == reference[1]  # bit-identical per-step losses, data order included
    tree = _tree(url)
    assert {"run_config.json", "model_config.json", "tokenizer.model", "metrics.jsonl"} <= set(tree)
    assert len([p for p in tree if p.startswith("tb/events.out.tfevents")]) == 2  # one events file per run
    assert ckpt_lib.finalized_steps(storage.join(url, "checkpoints")) == [STEPS - EVERY, STEPS]  # keep=2
    assert ".lock" not in tree and not [p for p in tree if ".write_test" in p]
    with open(tokenizer_path, "rb") as f:
        assert tree["tokenizer.model"] == hashlib.sha256(f.read()).hexdigest()
    # nothing local: the working directory, HOME and TMPDIR stay empty; the cache holds the run's staging copy and
    # the prepared copy of its raw training data (data/<key>: manifest, shards, tokenizer, prepare progress)
    local = _local_files(tmp_path)
    assert local["cwd"] == local["home"] == local["tmp"] == [], local
    stage = os.path.join("runs", "gs", _key(url), "process0")
    assert any(p.startswith(stage + os.sep) for p in local["cache"]), local["cache"]
    assert any(p.startswith("data" + os.sep) and p.endswith("manifest.json") for p in local["cache"]), local["cache"]
    assert all(p.startswith((stage + os.sep, "data" + os.sep)) for p in local["cache"]), local["cache"]


@pytest.mark.slow
def test_sigkill_during_a_save_to_the_bucket_resumes_from_the_previous_checkpoint(reference, gcs, tokenizer_path,
                                                                                  tmp_path):
    """The run is killed as soon as the second checkpoint's first object appears in the bucket (the save has
    started, Orbax's commit file is not there): that step is no checkpoint, the rerun takes over the dead run's
    lock and resumes from the first one."""
    url = storage.join(gcs.bucket(), "run")
    first, second = (storage.join(url, "checkpoints", str(s)) for s in (EVERY, 2 * EVERY))
    cmd = _cmd(url, tokenizer_path)
    proc = subprocess.Popen(cmd, env=_env(tmp_path), cwd=tmp_path / "cwd", stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def second_save_started() -> bool:
        return _exists(storage.join(first, COMMIT)) and bool(_fs(url).find(_key(second)))

    _wait_for(proc, second_save_started, "its second checkpoint", poll=0.005)  # the save takes ~0.3 s
    proc.kill()
    proc.communicate(timeout=60)
    assert _fs(url).find(_key(second)) and not _exists(storage.join(second, COMMIT))  # killed half-way
    assert ckpt_lib.finalized_steps(storage.join(url, "checkpoints")) == [EVERY]
    assert _exists(storage.join(url, ".lock"))  # the dead run's lock is left behind

    proc = _run(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    took = [ln for ln in proc.stderr.splitlines() if "stale lock" in ln]
    assert len(took) == 1 and "its process is no longer running" in took[0], proc.stderr[-3000:]
    assert f"resumed from {url}/checkpoints at step {EVERY}" in proc.stderr
    assert run_losses(url) == reference[1]
    assert ckpt_lib.finalized_steps(storage.join(url, "checkpoints")) == [STEPS - EVERY, STEPS]
    assert not _exists(storage.join(url, ".lock"))


@pytest.mark.slow
def test_preempted_run_on_s3_resumes_exactly(reference, s3, tokenizer_path, tmp_path):
    url = storage.join(s3.bucket(), "run")
    _preempt_and_resume(url, tokenizer_path, tmp_path)
    assert run_losses(url) == reference[1]
    tree = _tree(url)
    assert {"run_config.json", "model_config.json", "tokenizer.model", "metrics.jsonl"} <= set(tree)
    assert ckpt_lib.finalized_steps(storage.join(url, "checkpoints")) == [STEPS - EVERY, STEPS]
    assert all(f"checkpoints/{s}/{COMMIT}" in tree for s in (STEPS - EVERY, STEPS))
    assert _local_files(tmp_path)["cwd"] == []


def _state_layout(tokenizer: str):
    """The train state (abstract, on this process's 8 devices) of the runs' config."""
    from mistral_jax.training import run as run_lib
    from mistral_jax.training import step as step_lib
    from mistral_jax.training import trainer

    cfg = trainer.load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    cfg.update_from_flattened_dict(_overrides(tokenizer))
    spec = run_lib.resolve(cfg)
    return step_lib.state_layout(spec.recipe.abstract_model(spec.model_cfg), spec.tx, spec.mesh, spec.rules,
                                 spec.recipe.trainable, keep_initial=spec.recipe.objective.keeps_initial)[1]


@pytest.mark.slow
def test_two_processes_write_one_tree_that_restores_on_one_process(reference, gcs, tokenizer_path, tmp_path):
    import jax

    url = storage.join(gcs.bucket(), "run")
    port = free_port()
    procs = [subprocess.Popen(_cmd(url, tokenizer_path), cwd=tmp_path / "cwd", stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=_env(tmp_path, devices=4, MISTRAL_JAX_COORDINATOR=f"127.0.0.1:{port}",
                                       MISTRAL_JAX_NUM_PROCESSES=2, MISTRAL_JAX_PROCESS_ID=i)) for i in range(2)]
    for i, p in enumerate(procs):
        out = p.communicate(timeout=TIMEOUT)[0]
        assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"
    got, ref = run_losses(url), reference[1]
    assert sorted(got) == sorted(ref)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=1e-4)
    tree = _tree(url)
    assert len(read_metrics(url)) == STEPS and ".lock" not in tree  # one metrics file, written by process 0
    assert ckpt_lib.finalized_steps(storage.join(url, "checkpoints")) == [STEPS - EVERY, STEPS]
    for p in range(2):  # each process wrote its own shards into the one tree
        assert any(k.startswith(f"checkpoints/{STEPS}/params/ocdbt.process_{p}/") for k in tree), p

    abstract = _state_layout(tokenizer_path)  # this process: 8 devices
    assert len({d for a in jax.tree.leaves(abstract["params"]) for d in a.sharding.device_set}) == 8
    restored = {}
    for name, run_url in (("two", url), ("one", reference[0])):
        ckpt = ckpt_lib.Checkpointer(storage.join(run_url, "checkpoints"))
        try:
            step, state, _, meta = ckpt.restore_latest(abstract)
        finally:
            ckpt.close()
        assert step == meta["step"] == STEPS
        restored[name] = state
    for item in ("params", "opt_state"):
        two, one = jax.tree.leaves(restored["two"][item]), jax.tree.leaves(restored["one"][item])
        assert len(two) == len(one)
        for a, b in zip(two, one, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=item)
    # what the checkpoint tools call: the params alone, from the bucket URL
    params, step = ckpt_lib.restore_checkpoint_params(storage.join(url, "checkpoints"), abstract["params"])
    assert step == STEPS
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored["two"]["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.heavy  # a Python subprocess
def test_a_missing_bucket_is_one_line_before_any_work(gcs, tokenizer_path, tmp_path):
    fs = _fs("gs://x")
    buckets = sorted(fs.ls(""))
    url = f"gs://no-such-bucket-{os.getpid()}/run"
    proc = _run(_cmd(url, tokenizer_path), tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line(proc)
    assert f"--workdir='{url}'" in line and "does not exist" in line and "Fix: create it" in line, line
    assert sorted(_fs("gs://x").ls("")) == buckets  # nothing created
    assert _local_files(tmp_path)["cwd"] == [] and _local_files(tmp_path)["cache"] == []


@pytest.mark.heavy  # a Python subprocess
def test_a_stopped_endpoint_is_one_line_in_seconds(tokenizer_path, tmp_path):
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.time()
    proc = _run(_cmd("gs://bkt/run", tokenizer_path), tmp_path, STORAGE_EMULATOR_HOST=nowhere,
                TENSORSTORE_GCS_HTTP_URL=nowhere)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line(proc)
    assert "connection refused" in line and nowhere in line and "STORAGE_EMULATOR_HOST" in line, line
    assert time.time() - start < 60


def _lock(refreshed: float, **holder) -> bytes:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-02 03:04:05",
            "command": "train.py --workdir A", "refreshed": refreshed, "refresh_s": 60.0, **holder}
    return json.dumps(info).encode()


@pytest.mark.heavy  # a Python subprocess
def test_a_live_lock_in_the_bucket_stops_a_second_run(gcs_bucket, tokenizer_path, tmp_path):
    url = storage.join(gcs_bucket, "run")
    storage.write_bytes(storage.join(url, "run_config.json"), b"{}")  # something of the holder's run
    assert storage.create_exclusive(storage.join(url, ".lock"), _lock(time.time()))  # as the holder took it
    before = _tree(gcs_bucket)
    proc = _run(_cmd(url, tokenizer_path), tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line(proc)
    assert (f"in use by process {os.getpid()} on host {socket.gethostname()} (started 2026-01-02 03:04:05" in line
            and "train.py --workdir A" in line and "another --workdir" in line), line
    assert _tree(gcs_bucket) == before  # the lock and the run untouched


@pytest.mark.slow
def test_a_stale_lock_in_the_bucket_is_taken_over(reference, gcs, tokenizer_path, tmp_path):
    """A finished run whose lock was left by a run on another host that stopped refreshing it ten minutes ago:
    the rerun says so in one line, takes the lock, finds nothing to train, and leaves the run as it was."""
    url = storage.join(gcs.bucket(), "run")
    _fs(url).copy(_key(reference[0]), _key(url), recursive=True)
    storage.write_bytes(storage.join(url, ".lock"), _lock(time.time() - 600, pid=4242, host="another-host"))
    before = {k: v for k, v in _tree(url).items() if k != ".lock"}
    proc = _run(_cmd(url, tokenizer_path), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    took = [ln for ln in proc.stderr.splitlines() if "stale lock" in ln]
    assert len(took) == 1 and f"stale lock {url}/.lock of process 4242 on another-host" in took[0], proc.stderr
    assert "more than 3 x its refresh interval of 60 s" in took[0]
    after = _tree(url)
    assert ".lock" not in after  # released at exit
    new = sorted(set(after) - set(before))
    assert len(new) == 1 and new[0].startswith("tb/events.out.tfevents"), new  # this run's (empty) events file
    assert {k: after[k] for k in before} == before  # checkpoints, metrics, configs: unchanged


def test_config_bucket_paths_are_checked_before_any_work(gcs_bucket):
    from configs import tiny
    from mistral_jax.training import run

    cfg = tiny.get_config()
    cfg.data.train = storage.join(gcs_bucket, "train.jsonl")
    run.validate_config(cfg)  # a bucket path is a path
    run.check_storage(cfg)  # the bucket is there (the file itself is the reader's to find)
    cfg.init_from = f"gs://no-such-bucket-{os.getpid()}/model"
    with pytest.raises(storage.StorageError, match=r"^config\.init_from='gs://no-such-bucket-.*does not exist"):
        run.check_storage(cfg)


# --------------------------------------------------------------------------------------------- the lock
@pytest.mark.parametrize("where", ["gcs", "s3"])
def test_bucket_lock_is_exclusive_and_names_the_holder(where, request):
    url = storage.join(request.getfixturevalue(f"{where}_bucket"), "run")
    a = ckpt_lib.WorkdirLock(url).acquire()
    try:
        holder = json.loads(storage.read_bytes(storage.join(url, ".lock")))
        assert holder["pid"] == os.getpid() and holder["refresh_s"] == ckpt_lib.DEFAULT_LOCK_REFRESH_S
        with pytest.raises(ckpt_lib.WorkdirBusy) as e:
            ckpt_lib.WorkdirLock(url).acquire()
        msg = str(e.value)
        assert (f"workdir {url} is in use by process {os.getpid()} on host {socket.gethostname()} (started "
                f"{a.info['started']}; lock refreshed " in msg), msg
        assert "not refreshed for 180 s" in msg and "\n" not in msg
    finally:
        a.release()
    assert not _exists(storage.join(url, ".lock"))
    ckpt_lib.WorkdirLock(url).acquire().release()


@pytest.mark.parametrize("where", ["gcs", "s3"])
def test_bucket_lock_is_refreshed_while_held_and_knows_when_it_was_taken(where, request, monkeypatch, caplog):
    url = storage.join(request.getfixturevalue(f"{where}_bucket"), "run")
    lock_url = storage.join(url, ".lock")
    monkeypatch.setenv(ckpt_lib.LOCK_REFRESH_ENV, "0.2")
    lock = ckpt_lib.WorkdirLock(url).acquire()
    try:
        first = json.loads(storage.read_bytes(lock_url))["refreshed"]
        deadline = time.time() + 30
        while json.loads(storage.read_bytes(lock_url))["refreshed"] == first and time.time() < deadline:
            time.sleep(0.1)
        assert json.loads(storage.read_bytes(lock_url))["refreshed"] > first
        # another run that found it stale replaced it: the refresh must not write it back
        with caplog.at_level("ERROR"):
            storage.write_bytes(lock_url, _lock(time.time(), pid=1, host="another-host"))
            deadline = time.time() + 30
            while lock.held and time.time() < deadline:
                time.sleep(0.1)
        assert not lock.held
        assert any("was taken over by another run" in r.getMessage() for r in caplog.records)
        time.sleep(0.5)
        assert json.loads(storage.read_bytes(lock_url))["host"] == "another-host"
    finally:
        lock.release()
    assert json.loads(storage.read_bytes(lock_url))["host"] == "another-host"  # not ours: not removed


@pytest.mark.parametrize("where", ["gcs", "s3"])
def test_a_stale_bucket_lock_is_replaced_only_at_the_version_read(where, request, caplog):
    url = storage.join(request.getfixturevalue(f"{where}_bucket"), "run")
    lock_url = storage.join(url, ".lock")
    storage.write_bytes(lock_url, _lock(time.time() - 600, pid=4242, host="another-host"))
    obj = checkpoint_compat._BucketObject(lock_url)
    version, _ = obj.read()
    # a second taker that read the same stale version loses once the first has replaced it
    assert obj.replace(_lock(time.time(), pid=1), version) is not None
    assert obj.replace(_lock(time.time(), pid=2), version) is None
    assert json.loads(storage.read_bytes(lock_url))["pid"] == 1
    storage.write_bytes(lock_url, _lock(time.time() - 600, pid=4242, host="another-host"))
    with caplog.at_level("WARNING"):
        lock = ckpt_lib.WorkdirLock(url).acquire()
    try:
        (line,) = [r.getMessage() for r in caplog.records if "stale lock" in r.getMessage()]
        assert f"took over the stale lock {lock_url} of process 4242 on another-host" in line, line
        assert json.loads(storage.read_bytes(lock_url))["pid"] == os.getpid()
    finally:
        lock.release()
    assert not _exists(lock_url)


def test_lock_refresh_interval_is_checked(monkeypatch, tmp_path):
    monkeypatch.setenv(ckpt_lib.LOCK_REFRESH_ENV, "soon")
    with pytest.raises(ValueError, match=r"MISTRAL_JAX_LOCK_REFRESH_S='soon' is not a number of seconds > 0. Fix:"):
        ckpt_lib.lock_refresh_interval()
    ckpt_lib.WorkdirLock(str(tmp_path)).acquire().release()  # a local workdir does not read it


# --------------------------------------------------------------------------------------------- the pieces
@pytest.mark.parametrize("where", ["gcs", "s3"])
def test_metrics_are_staged_locally_and_uploaded_whole(where, request, tmp_path, monkeypatch):
    from mistral_jax.training.metrics import MetricsWriter

    monkeypatch.setenv("MISTRAL_JAX_CACHE", str(tmp_path / "cache"))
    url = storage.join(request.getfixturevalue(f"{where}_bucket"), "run")
    writer = MetricsWriter(url, upload_every=3600)
    writer.write(1, {"loss": 2.5})
    writer.flush(force=True)  # what the loop does at each checkpoint save: uploaded in the background
    deadline = time.time() + 30  # the upload at start (an empty file) may land first: wait for this one
    while (not _exists(storage.join(url, "metrics.jsonl")) or not read_metrics(url)) and time.time() < deadline:
        time.sleep(0.05)
    untimed = lambda: [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(url)]  # noqa: E731
    assert untimed() == [{"step": 1, "loss": 2.5}]
    writer.write(2, {"loss": 2.0})  # not uploaded yet (throttled) ...
    writer.close()  # ... but at close
    assert untimed() == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
    assert all(r["time"] > 1.7e9 for r in read_metrics(url))  # unix seconds of each record
    assert any(k.startswith("tb/events.out.tfevents") for k in _tree(url))
    writer = MetricsWriter(url)  # a resumed run: appends to the bucket's records
    writer.write(3, {"loss": 1.5})
    writer.close()
    assert [r["step"] for r in read_metrics(url)] == [1, 2, 3]
    stage = tmp_path / "cache" / "runs" / where.replace("gcs", "gs") / _key(url) / "process0" / "workdir"
    assert (stage / "metrics.jsonl").read_text().count("\n") == 3


@pytest.mark.parametrize("where", ["gcs", "s3"])
def test_archive_run_moves_a_bucket_run_aside(where, request):
    url = storage.join(request.getfixturevalue(f"{where}_bucket"), "run")
    files = {"run_config.json": b"{}", "metrics.jsonl": b'{"step": 1}\n', "checkpoints/2/params/d/x": b"\0" * 9,
             "checkpoints/2/commit_success.txt": b"ok"}
    for name, data in files.items():
        storage.write_bytes(storage.join(url, name), data)
    assert storage.create_exclusive(storage.join(url, ".lock"), b"{}")
    dest = ckpt_lib.archive_run(url)
    assert dest.startswith(f"{url}/archive/")
    tree = _tree(url)
    stamp = dest[len(url) + 1:]
    assert sorted(tree) == sorted([".lock"] + [f"{stamp}/{k}" for k in files])  # moved, the lock stays
    for name, data in files.items():
        assert tree[f"{stamp}/{name}"] == hashlib.sha256(data).hexdigest()
    assert ckpt_lib.archive_run(url) is None  # nothing left to move


@pytest.mark.slow
def test_a_corrupt_checkpoint_in_the_bucket_is_moved_aside(reference, gcs, tokenizer_path, caplog):
    """The newest step's array data is damaged: restore_latest warns, moves it to corrupt_checkpoints/ in the
    bucket (copied, then deleted) and restores the previous step."""
    url = storage.join(gcs.bucket(), "run")
    _fs(url).copy(_key(reference[0]), _key(url), recursive=True)
    victims = [k for k in _tree(url) if k.startswith(f"checkpoints/{STEPS}/params/") and "/d/" in k]
    assert victims
    for k in victims:
        storage.write_bytes(storage.join(url, k), b"garbage")
    abstract = _state_layout(tokenizer_path)
    ckpt = ckpt_lib.Checkpointer(storage.join(url, "checkpoints"))
    try:
        with caplog.at_level("WARNING"):
            step, *_ = ckpt.restore_latest(abstract)
    finally:
        ckpt.close()
    assert step == STEPS - EVERY
    assert any(f"checkpoint step {STEPS} in {url}/checkpoints cannot be restored" in r.getMessage()
               for r in caplog.records)
    tree = _tree(url)
    assert not [k for k in tree if k.startswith(f"checkpoints/{STEPS}/")]
    moved = sorted({k.split("/")[1] for k in tree if k.startswith("corrupt_checkpoints/")})
    assert len(moved) == 1 and moved[0].startswith(f"{STEPS}-")
    assert all(f"corrupt_checkpoints/{moved[0]}/{k[len(f'checkpoints/{STEPS}/'):]}" in tree for k in victims)
    assert ckpt_lib.finalized_steps(storage.join(url, "checkpoints")) == [STEPS - EVERY]
