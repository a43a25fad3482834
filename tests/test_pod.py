"""Pods for real: ``train.py`` / ``eval.py`` launched as several processes (jax.distributed over 127.0.0.1, CPU
devices split between them) behave like one process: same losses, one metrics file and checkpoint tree, a signal
to one process stops all at the same saved step, a killed process stops the others in bounded time, and every
interrupted run resumes. Plus ``--dry_run`` and the single-process pieces (environment detection, row readers)."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mistral_jax import distributed
from mistral_jax.data.corpus import TRAIN
from mistral_jax.training.metrics import read_metrics
from tests.helpers import mc_task_yaml, ppl_task_yaml, run_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD_TRAIN = os.path.join(ROOT, "tests", "pod_train.py")
STEPS = 10
TIMEOUT = 400  # per launch: every subprocess is bounded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(local_devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MISTRAL_JAX_")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}", JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="float32", PYTHONPATH=ROOT, **{k: str(v) for k, v in extra.items()})
    return env


def _train_args(workdir, tokenizer, *extra):
    return [f"--config={os.path.join(ROOT, 'configs/tiny.py')}", f"--workdir={workdir}", f"--config.num_steps={STEPS}",
            "--config.batch_size=8", "--config.data.seq_len=32", "--config.log_every=1",
            "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=3", "--config.optimizer.warmup_steps=1",
            f"--config.data.tokenizer={tokenizer}", "--config.data.validation=", "--config.progress_bar=False",
            "--config.mesh.fsdp=8", *extra]  # the mesh needs all 8 global devices


def _launch(script_args, processes: int, devices: int = 8, **env_extra) -> list[subprocess.Popen]:
    """``processes`` processes x ``devices // processes`` CPU devices, the documented MISTRAL_JAX_* variables."""
    port, local = _free_port(), devices // processes
    procs = []
    for i in range(processes):
        dist = dict(MISTRAL_JAX_COORDINATOR=f"127.0.0.1:{port}", MISTRAL_JAX_NUM_PROCESSES=processes,
                    MISTRAL_JAX_PROCESS_ID=i) if processes > 1 else {}
        procs.append(subprocess.Popen([sys.executable, *script_args], cwd=ROOT, env=_env(local, **dist, **env_extra),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _wait(procs, timeout=TIMEOUT) -> list[tuple[int, str]]:
    out, deadline = [], time.time() + timeout
    for p in procs:
        try:
            log = p.communicate(timeout=max(1.0, deadline - time.time()))[0]
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a process did not finish in time (hang?):\n" + "\n".join(o for _, o in out)[-4000:])
        out.append((p.returncode, log))
    return out


def _ok(results):
    for i, (rc, log) in enumerate(results):
        assert rc == 0, f"process {i} exited {rc}:\n{log[-4000:]}"


def _ckpt_steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_path):
    """The same run as 1 x 8, 2 x 4 and 4 x 2 processes x devices, all launched at once."""
    base = tmp_path_factory.mktemp("pod")
    shapes = {"1x8": 1, "2x4": 2, "4x2": 4}
    procs = {k: _launch([POD_TRAIN, *_train_args(base / k, tokenizer_path)], n) for k, n in shapes.items()}
    t0 = time.time()
    for k in shapes:
        _ok(_wait(procs[k]))
    print(f"1x8 + 2x4 + 4x2 runs: {time.time() - t0:.0f} s")
    return {k: str(base / k) for k in shapes}


@pytest.mark.slow
def test_processes_match_one_process(runs):
    ref = run_losses(runs["1x8"])
    assert sorted(ref) == list(range(1, STEPS + 1)) and len({round(v, 3) for v in ref.values()}) > 1
    for k in ("2x4", "4x2"):
        got = run_losses(runs[k])
        assert sorted(got) == sorted(ref), k
        np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=1e-4,
                                   err_msg=k)
        # one metrics file, one checkpoint tree, one copy of the run files: process 0 writes, all save
        assert glob.glob(os.path.join(runs[k], "**", "metrics.jsonl"), recursive=True) == [
            os.path.join(runs[k], "metrics.jsonl")]
        assert [len(open(os.path.join(runs[k], "metrics.jsonl")).readlines())] == [STEPS]
        assert _ckpt_steps(runs[k]) == [6, 8, 10]
        assert sorted(os.listdir(runs[k])) == sorted(os.listdir(runs["1x8"]))
        assert not os.path.exists(os.path.join(runs[k], ".lock"))


def _wait_for(workdir, procs, pred, timeout=TIMEOUT):
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and pred():
            return
        time.sleep(0.1)
    for p in procs:
        p.kill()
    pytest.fail("the run ended or stalled before it could be interrupted:\n" + procs[0].communicate()[0][-3000:])


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step(runs, tokenizer_path, tmp_path):
    workdir = str(tmp_path / "run")
    args = [POD_TRAIN, *_train_args(workdir, tokenizer_path)]
    procs = _launch(args, 2, POD_STEP_SLEEP=0.4)
    _wait_for(workdir, procs, lambda: len(run_losses(workdir)) >= 3)
    procs[1].send_signal(signal.SIGTERM)  # only process 1 is told
    results = _wait(procs, timeout=120)
    assert [rc for rc, _ in results] == [143, 143], "\n".join(log[-2000:] for _, log in results)
    stopped = max(run_losses(workdir))
    assert 3 <= stopped < STEPS and _ckpt_steps(workdir)[-1] == stopped  # that step saved, by both processes
    assert "received by another process" in results[0][1] and "preempted by signal 15" in results[0][1]

    _ok(_wait(_launch(args, 2)))  # the same command resumes
    resumed = [r["step"] for r in read_metrics(workdir) if "loss" in r][stopped:]
    assert resumed == list(range(stopped + 1, STEPS + 1))
    assert run_losses(workdir) == run_losses(runs["2x4"])  # bit-identical to the uninterrupted 2 x 4 run


@pytest.mark.slow
def test_killed_process_stops_the_others_then_resume(runs, tokenizer_path, tmp_path):
    workdir = str(tmp_path / "run")
    args = [POD_TRAIN, *_train_args(workdir, tokenizer_path)]
    procs = _launch(args, 2, POD_STEP_SLEEP=0.4, MISTRAL_JAX_HEARTBEAT_TIMEOUT=10)
    _wait_for(workdir, procs, lambda: len(run_losses(workdir)) >= 5 and _ckpt_steps(workdir))
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    rc, log = _wait(procs[:1], timeout=120)[0]  # bounded: no hang
    took = time.time() - t0
    procs[1].wait(timeout=10)
    print(f"process 0 stopped {took:.0f} s after process 1 was killed (rc {rc})")
    assert rc != 0 and took < 120, log[-3000:]
    assert "stopped sending heartbeats" in log and "\n1\n" in log, log[-3000:]  # names task 1
    newest = _ckpt_steps(workdir)[-1]

    results = _wait(_launch(args, 2))
    _ok(results)
    assert f"at step {newest}" in results[0][1]  # "resumed from ... at step N": the newest complete checkpoint
    assert run_losses(workdir) == run_losses(runs["2x4"])


@pytest.mark.slow
def test_stalled_process_is_named_by_every_process_and_exit_mode_restarts(runs, tokenizer_path, tmp_path):
    """Process 1 sleeps inside step 5 (the test hook): both processes dump their stacks and name process 1
    within the watchdog limit; in exit mode both exit 75, and the same command resumes to the same losses."""
    from mistral_jax.training.watchdog import ENV_TEST_STALL, EXIT_CODE

    workdir = str(tmp_path / "run")
    args = [POD_TRAIN, *_train_args(workdir, tokenizer_path, "--config.watchdog.min_seconds=4",
                                    "--config.watchdog.exit=True")]
    t0 = time.time()
    results = _wait(_launch(args, 2, **{ENV_TEST_STALL: "5:1:600"}), timeout=240)
    took = time.time() - t0
    assert [rc for rc, _ in results] == [EXIT_CODE, EXIT_CODE], "\n".join(log[-2000:] for _, log in results)
    assert took < 200  # not the 600 s stall
    for i, (_, log) in enumerate(results):
        assert "process 1 is slow" in log, (i, log[-3000:])
        dump = os.path.join(workdir, "hangs", f"hang-p{i}-step5.txt")
        text = open(dump).read()
        assert "Thread" in text and "File " in text, text[:2000]  # faulthandler's stacks of every thread
    assert max(run_losses(workdir)) == 4

    _ok(_wait(_launch(args, 2)))  # no stall: the same command resumes from the newest checkpoint
    assert run_losses(workdir) == run_losses(runs["2x4"])




@pytest.mark.slow
def test_eval_two_processes_match_one(runs, tmp_path):
    texts = [json.loads(line)["text"] for line in open(TRAIN, encoding="utf-8")][:40]
    rng = np.random.default_rng(0)
    words = " ".join(texts).split()
    mc = [{"question": " ".join(rng.choice(words, 5)), "choices": [" ".join(rng.choice(words, 3)) for _ in range(4)],
           "label": int(rng.integers(4))} for _ in range(12)]
    ppl = [{"text": t[:300]} for t in texts[:4]]
    for name, rows, yaml in (("mc", mc, lambda data: mc_task_yaml("pod_mc", data, ("acc", "acc_norm"))),
                             ("ppl", ppl, lambda data: ppl_task_yaml("pod_ppl", data))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / f"pod_{name}.yaml").write_text(yaml(data=tmp_path / f"{name}.jsonl"))

    def args(out):
        return [os.path.join(ROOT, "eval.py"), f"--checkpoint={runs['2x4']}", "--tasks=pod_mc,pod_ppl",
                f"--include_path={tmp_path}", "--batch_size=8", f"--output_path={tmp_path / out}"]

    one, two = _launch(args("one"), 1), _launch(args("two"), 2)
    _ok(_wait(one + two))
    got = {}
    for out in ("one", "two"):
        (path,) = glob.glob(str(tmp_path / out / "**" / "results_*.json"), recursive=True)  # written once
        got[out] = json.loads(open(path).read())["results"]
    for task in ("pod_mc", "pod_ppl"):
        for k, v in got["one"][task].items():
            if isinstance(v, float):
                np.testing.assert_allclose(got["two"][task][k], v, rtol=1e-4, err_msg=f"{task} {k}")
    assert got["one"]["pod_ppl"]["word_perplexity,none"] > 1


@pytest.mark.slow
def test_dry_run_prints_memory_and_flops_writes_nothing(tokenizer_path, tmp_path):
    workdir = tmp_path / "never"
    results = _wait(_launch([os.path.join(ROOT, "train.py"), *_train_args(workdir, tokenizer_path), "--dry_run"], 2))
    _ok(results)
    out = results[0][1]
    for want in ("'fsdp': 8", "over 8 devices (2 processes)", "temporaries", "total", "model FLOPs per step",
                 "packed this process's 4 x 32 rows", "nothing written"):
        assert want in out, out[-3000:]
    assert "model FLOPs per step" not in results[1][1]  # process 0 reports
    assert not workdir.exists()


@pytest.mark.heavy  # 3-5 s on 2 busy cores: the light tier stays near its 90 s
def test_tokenizer_training_refused_on_several_processes(tmp_path):
    # fails before jax.distributed starts: no coordinator is listening on this port, nothing waits
    env = _env(4, MISTRAL_JAX_COORDINATOR=f"127.0.0.1:{_free_port()}", MISTRAL_JAX_NUM_PROCESSES=2,
               MISTRAL_JAX_PROCESS_ID=1)
    proc = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                           "--config.data.tokenizer="], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("train:")]
    assert len(lines) == 1 and "2 processes" in lines[0] and "--config.data.tokenizer=PATH" in lines[0]
    assert "mistral:v1" in lines[0] and not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------------ in-process pieces
def test_environment_detection(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("MISTRAL_JAX_", "SLURM_", "OMPI_", "TPU_WORKER", "MEGASCALE")):
            monkeypatch.delenv(k)
    assert distributed.expected_process_count() == 1 and not distributed._cluster_detected()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")  # mpirun -n 4
    assert distributed._cluster_detected() and distributed.expected_process_count() == 4
    monkeypatch.setenv("MISTRAL_JAX_NUM_PROCESSES", "2")  # explicit wins
    assert distributed.expected_process_count() == 2
    monkeypatch.setenv("MISTRAL_JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="MISTRAL_JAX_NUM_PROCESSES='two' is not an integer"):
        distributed.expected_process_count()
    monkeypatch.setenv("MISTRAL_JAX_LOCAL_DEVICE_IDS", "0,1")
    assert distributed._local_device_ids(None) == [0, 1]
    monkeypatch.setenv("MISTRAL_JAX_LOCAL_DEVICE_IDS", "gpu0")
    with pytest.raises(ValueError, match="MISTRAL_JAX_LOCAL_DEVICE_IDS='gpu0'"):
        distributed._local_device_ids(None)
    assert distributed.any_process(3) == 3 and distributed.allgather_json({"a": 1}) == [{"a": 1}]  # one process


