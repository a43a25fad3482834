"""Two local processes (jax.distributed over 127.0.0.1, 4 CPU devices each) train, checkpoint and restore
exactly like one process with 8 devices; plus the single-process paths of mistral_jax.distributed."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mistral_jax import distributed
from mistral_jax import sharding as sh

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, num_processes: int, local_devices: int):
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return [subprocess.Popen([sys.executable, str(WORKER), str(out), str(num_processes), str(i), str(port),
                              str(local_devices)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(num_processes)]


def _wait(procs, timeout=420):
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-host worker timed out:\n" + "\n".join(logs))
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, f"worker failed (rc={p.returncode}):\n{log[-4000:]}"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    procs = _launch(base / "two", 2, 4) + _launch(base / "one", 1, 8)  # run both at once
    _wait(procs)
    return {n: json.loads((base / n / "result.json").read_text()) for n in ("two", "one")}


@pytest.mark.slow
def test_two_processes_match_one(results):
    two, one = results["two"], results["one"]
    assert (two["process_count"], two["local_devices"]) == (2, 4)
    assert (one["process_count"], one["local_devices"]) == (1, 8)
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5, atol=1e-5)
    assert len(set(np.round(two["losses"], 4))) > 1  # it trains: the loss moves
    for k, v in one["final"].items():
        np.testing.assert_allclose(two["final"][k], v, rtol=1e-4, atol=1e-4, err_msg=k)


@pytest.mark.slow
def test_checkpoint_restore_across_processes(results):
    two = results["two"]
    assert two["restored_step"] == 3 and two["meta_step"] == 3 and two["data_state"] == {"rows_seen": 24}
    assert two["specs_ok"]
    assert two["after"] == two["before"]
    assert two["identical"] == {"params": True, "opt_state": True, "rolled_params": False}  # element by element
    for k, v in two["before"].items():  # why sums could not tell: rolled rows keep every sum (up to rounding)
        np.testing.assert_allclose(two["rolled_sums"][k], v, rtol=1e-5, atol=1e-5, err_msg=k)


def test_single_process_helpers():
    assert distributed.initialize() is False  # no cluster, no arguments: single process
    assert distributed.is_main_process()
    assert distributed.process_row_slice(8) == slice(0, 8)
    mesh = sh.make_mesh(fsdp=4, tensor=2)
    rules = sh.rules_preset("fsdp_tp")
    local = {"tokens": np.arange(8 * 4, dtype=np.int32).reshape(8, 4)}
    batch = distributed.global_batch(local, {"tokens": sh.batch_sharding(mesh, rules)})
    assert batch["tokens"].sharding.spec == rules.spec(("batch", None), mesh)
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), local["tokens"])
    np.testing.assert_array_equal(distributed.local_rows(batch["tokens"]), local["tokens"])


def test_initialize_reports_missing_arguments():
    with pytest.raises(ValueError, match=r"missing \['num_processes', 'process_id'\]"):
        distributed.initialize("127.0.0.1:1234")
    with pytest.raises(ValueError, match="process_id=3 is outside"):
        distributed.initialize("127.0.0.1:1234", 2, 3)
    assert jax.process_count() == 1


def test_torchrun_variables_start_jax_distributed(monkeypatch):
    """torchrun-style launchers: MASTER_ADDR / MASTER_PORT / WORLD_SIZE / RANK give the coordinator (on MASTER_PORT
    + 1: torchrun's agent store holds MASTER_PORT), the process count and id; LOCAL_RANK the GPU of a process when
    LOCAL_WORLD_SIZE > 1; a bad value is one line naming the variable."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.torchrun_env() is None
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("RANK", "9")
    assert distributed.torchrun_env() == ("10.0.0.7:29501", 16, 9, None)  # one process per node
    assert distributed.expected_process_count() == 16
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert distributed.torchrun_env() == ("10.0.0.7:29501", 16, 9, [1])  # one process per GPU
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.torchrun_env() is None and distributed.expected_process_count() == 1
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"WORLD_SIZE='two' is not an integer >= 1. Fix: set WORLD_SIZE"):
        distributed.torchrun_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match=r"process_id=5 is outside \[0, num_processes=2\)"):
        distributed.initialize()  # checked before anything connects
