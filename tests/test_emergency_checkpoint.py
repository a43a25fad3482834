"""Emergency checkpoints (``checkpoint.local_*``): a local tier per host through Orbax's emergency manager in
front of the persistent tier. Two processes, two replicas (``mesh.data=2``): a run killed (SIGKILL, both
processes) between persistent saves resumes from the newer local step; with one host's local tier gone (a
replaced host) every process resumes from the persistent tier; both continue to the uninterrupted run's losses.
Misuse is one line before device work."""

import os
import shutil
import signal
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from mistral_jax.config import ConfigError
from mistral_jax.training import emergency, trainer
from mistral_jax.training.metrics import read_events
from tests.helpers import run_losses
from tests.test_pod import POD_TRAIN, ROOT, _launch, _ok, _train_args, _wait

STEPS = 10  # tests/test_pod.py's runs: checkpoints every 5 steps here, the local tier every 2


def _args(workdir, tokenizer, *extra):
    return [POD_TRAIN, *_train_args(workdir, tokenizer, "--config.mesh.data=2", "--config.mesh.fsdp=4",
                                    "--config.checkpoint.every_steps=5", *extra)]


def _local(root):
    return [f"--config.checkpoint.local_dir={root}", "--config.checkpoint.local_every_steps=2"]


def _steps(d):
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


@pytest.mark.slow
def test_a_killed_run_resumes_from_the_local_tier_and_a_replaced_host_from_the_persistent_one(tokenizer_path,
                                                                                              tmp_path):
    ref, run_a, run_b = (str(tmp_path / k) for k in ("ref", "a", "b"))
    local_a, local_b = str(tmp_path / "local_a"), str(tmp_path / "local_b")
    p0, p1 = (emergency.local_directory(local_a, run_a, i) for i in (0, 1))
    reference = _launch(_args(ref, tokenizer_path), 2)
    procs = _launch(_args(run_a, tokenizer_path, *_local(local_a)), 2, POD_STEP_SLEEP=0.4)
    deadline = time.time() + 300

    def saved_6():  # step 6 of the local tier on process 1's disk, and its event written (a race under load)
        try:
            events = read_events(run_a) if 6 in _steps(f"{p1}/state") else []
        except (OSError, ValueError):  # not written yet, or a line being written
            return False
        return any(e["event"] == "checkpoint" and e["step"] == 6 for e in events)

    while time.time() < deadline and all(p.poll() is None for p in procs) and not saved_6():
        time.sleep(0.05)
    for p in procs:  # both hosts die at once: no signal handler, no final save
        p.send_signal(signal.SIGKILL)
    _wait(procs, timeout=60)
    _ok(_wait(reference))
    local = _steps(f"{p1}/state")
    assert 6 in local and max(local) < STEPS, local  # Orbax: replica 1 (process 1) holds the local steps
    newest = max(local)
    assert _steps(os.path.join(run_a, "checkpoints")) == [5]  # the persistent tier is older
    assert not _steps(f"{p0}/state")  # replica 0 keeps no local copy
    assert not os.listdir(os.path.join(p0, "unused-persistent"))  # nor a persistent one of its own
    assert os.path.exists(os.path.join(p0, "meta", f"{newest}.json"))  # the data position: on every process
    tiers = [(e["step"], e.get("tier")) for e in read_events(run_a) if e["event"] == "checkpoint"]
    assert tiers[:4] == [(2, "local"), (4, "local"), (5, "persistent"), (6, "local")]

    # run b: a copy of run a whose process 1 came back on a new host (its local tier empty)
    shutil.copytree(run_a, run_b)
    shutil.copytree(os.path.join(local_a, emergency.run_id(run_a)), os.path.join(local_b, emergency.run_id(run_b)))
    shutil.rmtree(emergency.local_directory(local_b, run_b, 1))

    procs = _launch(_args(run_a, tokenizer_path, *_local(local_a)), 2) + \
        _launch(_args(run_b, tokenizer_path, *_local(local_b)), 2)
    results = _wait(procs, timeout=400)
    _ok(results)
    resumed = {k: [e for e in read_events(w) if e["event"] == "resume"] for k, w in (("a", run_a), ("b", run_b))}
    assert [(e["from_step"], e["tier"]) for e in resumed["a"]] == [(newest, "local")]  # newer than the bucket's 5
    assert f"restored step {newest} from the local tier" in results[0][1] + results[1][1]
    assert [(e["from_step"], e["tier"]) for e in resumed["b"]] == [(5, "persistent")]  # nothing lost
    ref_losses = run_losses(ref)
    assert sorted(ref_losses) == list(range(1, STEPS + 1))
    assert run_losses(run_a) == ref_losses and run_losses(run_b) == ref_losses  # the uninterrupted losses


def _cfg(tokenizer, **overrides):
    cfg = trainer.load_config_file(os.path.join(ROOT, "configs/tiny.py"))
    cfg.update_from_flattened_dict({"num_steps": 6, "batch_size": 8, "data.seq_len": 32, "data.tokenizer": tokenizer,
                                    "data.validation": "", "optimizer.warmup_steps": 1, **overrides})
    return cfg


@pytest.mark.parametrize("change, match", [
    ({"checkpoint.local_dir": "gs://b/local"}, r"local_dir='gs://b/local' is a bucket"),
    ({"checkpoint.local_dir": "/dev/shm/x", "checkpoint.local_every_steps": 0}, r"local_every_steps=0 must be"),
    ({"checkpoint.local_dir": "/dev/shm/x", "checkpoint.local_keep": -1}, r"local_keep=-1 must be"),
    ({"checkpoint.local_dir": "/dev/shm/x"}, r"needs a run of two or more processes"),
])
def test_bad_local_tier_config_is_one_line(change, match, tokenizer_path):
    from mistral_jax.training.run import validate_config

    with pytest.raises(ConfigError, match=match) as e:
        validate_config(_cfg(tokenizer_path, **change), n_devices=8)
    assert "\n" not in str(e.value) and "Fix:" in str(e.value)


@pytest.mark.parametrize("data, match", [(1, r"needs two or more replicas .* has data=1"),
                                         (2, r"replicas 0 and 1 of the mesh's data axis share process\(es\) \[0\]")])
def test_the_mesh_must_hold_replicas_on_their_own_processes(data, match):
    devices = np.asarray(jax.devices()[:8]).reshape(data, 8 // data)
    mesh = Mesh(devices, ("data", "fsdp"))
    with pytest.raises(emergency.LocalTierError, match=match) as e:
        emergency.check_local_tier(mesh, "/dev/shm/x")
    assert "\n" not in str(e.value) and "Fix:" in str(e.value)
