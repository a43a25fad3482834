"""Checkpoints that survive faults: SIGTERM or SIGINT + resume is bit-identical (losses, params, optimizer state),
a corrupt newest step falls back, keep-last-K, restore onto a different mesh."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mistral_jax import sharding
from mistral_jax.training.metrics import read_metrics
from tests.helpers import run_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


def _cmd(workdir, tokenizer, steps=STEPS):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/tiny.py"),
            f"--workdir={workdir}", f"--config.num_steps={steps}", "--config.batch_size=8", "--config.data.seq_len=32",
            "--config.log_every=1", "--config.checkpoint.every_steps=4", "--config.checkpoint.keep=2",
            "--config.optimizer.warmup_steps=2", f"--config.data.tokenizer={tokenizer}", "--config.data.validation=",
            "--config.progress_bar=False"]


def _env():
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="float32", PYTHONPATH=ROOT)
    return env


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tokenizer_path):
    workdir = str(tmp_path_factory.mktemp("ref"))
    proc = subprocess.run(_cmd(workdir, tokenizer_path), env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_uninterrupted_run_keeps_last_k(reference_run):
    losses = run_losses(reference_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    steps = sorted(int(d) for d in os.listdir(os.path.join(reference_run, "checkpoints")) if d.isdigit())
    assert steps == [8, 12]  # every 4 steps, keep=2
    for name in ("model_config.json", "run_config.json", "tokenizer.model"):
        assert os.path.isfile(os.path.join(reference_run, name))
    assert not os.path.exists(os.path.join(reference_run, "config.json"))


def _saved(workdir, step):
    """Every array of a checkpoint's params and optimizer state, read back as numpy (no target tree needed)."""
    import orbax.checkpoint as ocp

    out = {}
    for item in ("params", "opt_state"):
        path = os.path.join(workdir, "checkpoints", str(step), item)
        ckptr = ocp.PyTreeCheckpointer()
        meta = ckptr.metadata(path)
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        out[item] = jax.tree_util.tree_flatten_with_path(
            ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args)))[0]
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.slow
def test_signal_then_resume_is_bit_identical(reference_run, tokenizer_path, tmp_path, sig):
    """SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C): save, exit 128 + signal, resume to the same bits."""
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen(_cmd(workdir, tokenizer_path), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(run_losses(workdir)) >= 5:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.stdout.read()[-3000:]
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out[-3000:]
    killed_at = max(run_losses(workdir))
    assert 5 <= killed_at < STEPS
    ckpts = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert ckpts[-1] == killed_at  # saved on SIGTERM, not only at the periodic steps

    proc = subprocess.run(_cmd(workdir, tokenizer_path), env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(workdir)
    resumed_steps = [r["step"] for r in records if "loss" in r][killed_at:]
    assert resumed_steps == list(range(killed_at + 1, STEPS + 1))  # continued, did not start over
    ref, got = run_losses(reference_run), run_losses(workdir)
    assert got == ref  # bit-identical per-step losses, data order included
    # and the final parameters and optimizer state (Adam moments, step counts), array by array
    want, have = _saved(reference_run, STEPS), _saved(workdir, STEPS)
    for item in ("params", "opt_state"):
        assert [k for k, _ in have[item]] == [k for k, _ in want[item]]
        for (k, a), (_, b) in zip(have[item], want[item], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{item}{jax.tree_util.keystr(k)}")


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back(reference_run, tokenizer_path, tmp_path, caplog):
    from mistral_jax.training import trainer

    workdir = str(tmp_path / "run")
    shutil.copytree(reference_run, workdir)
    params_dir = os.path.join(workdir, "checkpoints", "12", "params")
    victims = [os.path.join(r, f) for r, _, fs in os.walk(params_dir) for f in fs if "ocdbt" in r or f.startswith("d")]
    assert victims, os.listdir(params_dir)
    for v in victims:  # truncate the data files of the params item
        with open(v, "r+b") as f:
            f.truncate(os.path.getsize(v) // 3)
    cfg = trainer.load_config_file(os.path.join(ROOT, "configs/tiny.py"))
    for arg in _cmd(workdir, tokenizer_path)[5:]:  # the same overrides as the subprocess runs
        key, value = arg[len("--config."):].split("=", 1)
        node = cfg
        for part in key.split(".")[:-1]:
            node = node[part]
        leaf = key.split(".")[-1]
        node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else value == "True"
    with caplog.at_level("WARNING"):
        result = trainer.train(cfg, workdir)
    assert result["status"] == "done" and result["step"] == STEPS
    assert any("cannot be restored" in r.getMessage() for r in caplog.records)
    quarantined = os.listdir(os.path.join(workdir, "corrupt_checkpoints"))
    assert len(quarantined) == 1 and quarantined[0].startswith("12-")
    records = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in records[STEPS:]] == list(range(9, STEPS + 1))  # resumed from step 8
    ref, got = run_losses(reference_run), run_losses(workdir)
    np.testing.assert_allclose([got[s] for s in range(9, STEPS + 1)], [ref[s] for s in range(9, STEPS + 1)],
                               rtol=1e-5)


@pytest.mark.slow
def test_restore_onto_a_different_mesh(tmp_path):
    from mistral_jax.config import ModelConfig
    from mistral_jax.training import step as step_lib
    from mistral_jax.training.checkpoint import Checkpointer
    from mistral_jax.training.trainer import base_config

    cfg = base_config()
    model_cfg = ModelConfig.tiny()
    mesh_a = sharding.make_mesh(fsdp=8)
    _, state, _ = step_lib.make_train_state(model_cfg, cfg, mesh_a)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), every_steps=1, keep=2)
    ckpt.save(3, state, {"epoch": 0, "index": 5, "offset": 7}, {"seed": 0}, force=True)
    ckpt.close()

    mesh_b = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    _, abstract_b, shardings_b = step_lib.make_train_state(model_cfg, cfg, mesh_b, abstract=True)
    step, restored, data_state, meta = Checkpointer(str(tmp_path / "ckpt")).restore_latest(abstract_b)
    assert step == 3 and data_state["index"] == 5 and meta["step"] == 3
    wq = restored["params"]["layers"]["attention"]["wq"]
    assert wq.sharding == shardings_b["params"]["layers"]["attention"]["wq"]
    assert wq.sharding.spec != state["params"]["layers"]["attention"]["wq"].sharding.spec
    saved = {k: state[k] for k in ("params", "opt_state")}
    got = {k: restored[k] for k in ("params", "opt_state")}
    assert jax.tree.structure(saved) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(restored["step"]) == 3  # the step counter comes from the checkpoint's meta


@pytest.mark.slow
def test_train_py_resumes_on_a_different_mesh(reference_run, tokenizer_path, tmp_path):
    """The README's "a run can resume on a different mesh", through train.py: FSDP over 8 -> data 2 x FSDP 2 x TP 2."""
    workdir = str(tmp_path / "run")
    shutil.copytree(reference_run, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))  # resume from step 8
    proc = subprocess.run(_cmd(workdir, tokenizer_path) + ["--config.mesh.data=2", "--config.mesh.fsdp=2",
                                                           "--config.mesh.tensor=2"],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = [r["step"] for r in read_metrics(workdir) if "loss" in r][STEPS:]
    assert resumed == list(range(9, STEPS + 1))  # continued from step 8 on the new mesh
    ref, got = run_losses(reference_run), run_losses(workdir)
    np.testing.assert_allclose([got[s] for s in resumed], [ref[s] for s in resumed], rtol=1e-5)


def test_make_workdir_checks_before_it_creates(tmp_path):
    """make_workdir: a missing tokenizer, or a workdir that cannot be made, is one ConfigError naming the path and
    the fix, and leaves nothing behind (the in-process side of the train.py checks in test_nothing_lost_cli)."""
    from mistral_jax.training.checkpoint import make_workdir
    from mistral_jax.training.recipe import ConfigError

    workdir = tmp_path / "a" / "b" / "run"
    with pytest.raises(ConfigError, match=r"config.data.tokenizer='/nope/t.model' does not exist\. Fix: "):
        make_workdir(str(workdir), tokenizer="/nope/t.model")
    assert os.listdir(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"--workdir=.*/file/run cannot be written: Not a directory .* Fix: "):
        make_workdir(str(tmp_path / "file" / "run"))
    assert os.listdir(tmp_path) == ["file"]
    make_workdir(str(workdir), tokenizer="")  # '' = train one: nothing to check
    assert os.listdir(workdir) == []  # the write probe is gone
