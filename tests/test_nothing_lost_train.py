"""Nothing lost, ever (training side, DESIGN 16): a workdir's run is never quarantined, overwritten or mixed by
accident. Each failing case asserts the exit status, that the message names the cause and the fix, and that every
file of the pre-existing run is byte-identical afterwards.

* a config that changed (optimizer, model dims) is a mismatch, not corruption: nothing moves, the fix is named;
* an Orbax restore error that says "tree / shape mismatch" is a mismatch too; unreadable metadata is corruption;
* ``resume=False`` on a run fails unless ``checkpoint.reset`` archives the old run (a requeue resumes);
* a workdir lock: a live holder stops a second run, a dead one's lock is reported and taken over;
* a failed save (ENOSPC / EACCES injected into Orbax's writes) stops training with one line, earlier
  checkpoints restore;
* bad arguments and values: one line, exit status 2, before anything is loaded; tokenizer too small for CJK text;
* the normal path is quiet and ends with a one-line summary.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from mistral_jax.data.train_tokenizer import train_tokenizer
from mistral_jax.training import checkpoint as ckpt_lib
from mistral_jax.training import trainer
from mistral_jax.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULT = os.path.join(ROOT, "tests", "nothing_lost_train_fault.py")
STEPS = 4
# the run every test starts from: 4 steps, checkpoints at 2 and 4 (dotted keys, as --config.<key>=<value>)
RUN = {"num_steps": STEPS, "batch_size": 8, "log_every": 1, "data.seq_len": 32, "checkpoint.every_steps": 2,
       "checkpoint.keep": 3, "optimizer.warmup_steps": 1, "data.validation": "", "progress_bar": False}


def tiny_config(tokenizer: str, **overrides):
    cfg = trainer.load_config_file(os.path.join(ROOT, "configs/tiny.py"))
    cfg.update_from_flattened_dict({**RUN, "data.tokenizer": tokenizer, **overrides})
    return cfg


def with_reset(cfg, value=True):
    cfg.checkpoint.reset = value
    return cfg


def hashes(root: str) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def env(**extra):
    e = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_DEFAULT_MATMUL_PRECISION="float32", PYTHONPATH=ROOT)
    e.pop("MISTRAL_JAX_DEBUG", None)
    e.update(extra)
    return e


def cli_args(workdir: str, tokenizer: str, config: str | None = None, **overrides) -> list[str]:
    args = ["--config", config or os.path.join(ROOT, "configs/tiny.py"), f"--workdir={workdir}"]
    for k, v in {**RUN, "data.tokenizer": tokenizer, **overrides}.items():
        args.append(f"--config.{k}={v}")
    return args


def train_py(args: list[str], prefix: list[str] = (), timeout: int = 300, **env_extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *prefix, os.path.join(ROOT, "train.py"), *args], env=env(**env_extra),
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def one_line(proc: subprocess.CompletedProcess) -> str:
    """The failure message: no traceback, a single ``train: ...`` line on stderr."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("train: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tokenizer_path):
    """A finished 4-step run (checkpoints 2 and 4), made in-process."""
    workdir = str(tmp_path_factory.mktemp("base") / "run")
    result = trainer.train(tiny_config(tokenizer_path), workdir)
    assert result["status"] == "done" and result["step"] == STEPS
    assert result["checkpoint"] == os.path.join(workdir, "checkpoints", str(STEPS))
    return workdir


@pytest.fixture
def run_copy(base_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(base_run, workdir)
    return workdir


# --------------------------------------------------------------------------------------------- mismatch
@pytest.mark.parametrize("override, cause, fix", [
    ({"optimizer.grad_clip_norm": 0}, "optimizer.grad_clip_norm=1.0 saved, 0.0 now",
     "--config.optimizer.grad_clip_norm=1.0"),
    ({"model.dim": 128}, "dim=64 saved, 128 now", "drop --config.model.dim"),
])
@pytest.mark.slow
def test_changed_config_is_a_mismatch_not_corruption(run_copy, tokenizer_path, override, cause, fix):
    before = hashes(run_copy)
    proc = train_py(cli_args(run_copy, tokenizer_path, **{**override, "num_steps": 6}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    msg = one_line(proc)
    assert "cannot continue" in msg and cause in msg and fix in msg, msg
    assert "checkpoint step 4 holds a different train state" in msg, msg
    assert "--workdir" in msg and "--config.checkpoint.reset=true" in msg and "Nothing in" in msg, msg
    assert hashes(run_copy) == before  # nothing quarantined, model_config.json / run_config.json untouched
    assert not os.path.exists(os.path.join(run_copy, "corrupt_checkpoints"))


@pytest.mark.slow
def test_orbax_mismatch_error_is_not_quarantined(run_copy, tokenizer_path, monkeypatch):
    """Second line of defence: if the metadata comparison missed it, Orbax's own tree-mismatch error on restore
    still counts as a mismatch (not corruption)."""
    monkeypatch.setattr(ckpt_lib.Checkpointer, "layout_differences", lambda self, step, abstract: [])
    before = hashes(run_copy)
    with pytest.raises(trainer.RunMismatch, match=r"checkpoint step 4 holds a different train state.*"
                                                  r"tree structures do not match.*optimizer.grad_clip_norm=1.0"):
        trainer.train(tiny_config(tokenizer_path, **{"optimizer.grad_clip_norm": 0.0}), run_copy)
    assert hashes(run_copy) == before


@pytest.mark.slow
def test_unreadable_metadata_is_corruption_and_falls_back(run_copy, tokenizer_path, caplog):
    meta = os.path.join(run_copy, "checkpoints", "4", "params", "_METADATA")
    with open(meta, "r+b") as f:
        f.truncate(os.path.getsize(meta) // 2)
    intact = {k: v for k, v in hashes(run_copy).items() if k.startswith("checkpoints/2/")}
    with caplog.at_level("WARNING"):
        result = trainer.train(tiny_config(tokenizer_path), run_copy)
    assert result["status"] == "done" and result["step"] == STEPS
    assert any("cannot be restored" in r.getMessage() for r in caplog.records)
    assert [d.split("-")[0] for d in os.listdir(os.path.join(run_copy, "corrupt_checkpoints"))] == ["4"]
    steps = [r["step"] for r in read_metrics(run_copy) if "loss" in r]
    assert steps[STEPS:] == [3, 4]  # resumed from step 2
    assert {k: v for k, v in hashes(run_copy).items() if k.startswith("checkpoints/2/")} == intact


# --------------------------------------------------------------------------------------------- resume / reset
@pytest.mark.slow
def test_resume_false_on_a_run_fails(run_copy, tokenizer_path):
    before = hashes(run_copy)
    proc = train_py(cli_args(run_copy, tokenizer_path, **{"checkpoint.resume": False}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    msg = one_line(proc)
    assert "config.checkpoint.resume=False" in msg and "holds a run (checkpoints at steps [2, 4]" in msg, msg
    assert "drop --config.checkpoint.resume=false" in msg and "--config.checkpoint.reset=true" in msg, msg
    assert hashes(run_copy) == before


@pytest.mark.slow
def test_reset_archives_the_old_run_and_a_requeue_resumes(run_copy, tokenizer_path, tmp_path):
    before = hashes(run_copy)
    args = cli_args(run_copy, tokenizer_path, **{"checkpoint.reset": True,
                                                                      "optimizer.grad_clip_norm": 0.5})
    proc = train_py(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "moved the previous run" in proc.stderr
    (archive,) = os.listdir(os.path.join(run_copy, "archive"))
    moved = hashes(os.path.join(run_copy, "archive", archive))
    assert moved == before  # the whole old run, byte for byte, configs included
    assert sorted(os.listdir(os.path.join(run_copy, "checkpoints"))) == ["2", "4"]
    assert [r["step"] for r in read_metrics(run_copy)] == [1, 2, 3, 4]  # a fresh metrics.jsonl
    with open(os.path.join(run_copy, "run_config.json")) as f:
        assert json.load(f)["optimizer"]["grad_clip_norm"] == 0.5
    # the normal path: quiet, and a one-line summary at the end
    assert "Metadata file does not exist" not in proc.stderr and "orbax" not in proc.stderr.lower()
    assert proc.stdout.strip().splitlines()[-1].startswith(
        f"train: done at step {STEPS}/{STEPS}; final loss "), proc.stdout
    assert re.search(rf"; newest checkpoint {re.escape(os.path.join(run_copy, 'checkpoints', str(STEPS)))}; "
                     rf"goodput \d+\.\d% of \d+\.\ds \(", proc.stdout.strip().splitlines()[-1]), proc.stdout

    # the same command again (a requeued job): resumes the run it started, archives nothing more
    after = hashes(run_copy)
    proc = train_py(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "a requeued job" in proc.stderr and os.listdir(os.path.join(run_copy, "archive")) == [archive]
    assert {k: v for k, v in hashes(run_copy).items() if k.startswith("checkpoints/")} == \
        {k: v for k, v in after.items() if k.startswith("checkpoints/")}


@pytest.mark.slow
def test_reset_in_process_with_resume_false(run_copy, tokenizer_path):
    before = hashes(run_copy)
    cfg = with_reset(tiny_config(tokenizer_path, **{"checkpoint.resume": False, "num_steps": 2}))
    result = trainer.train(cfg, run_copy)
    assert result["status"] == "done" and result["step"] == 2
    (archive,) = os.listdir(os.path.join(run_copy, "archive"))
    assert hashes(os.path.join(run_copy, "archive", archive)) == before


# --------------------------------------------------------------------------------------------- lock
@pytest.mark.slow
def test_a_live_lock_stops_a_second_run(run_copy, tokenizer_path):
    lock = os.path.join(run_copy, ".lock")
    with open(lock, "w") as f:  # this test process: alive, same host
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": "now", "command": "train.py A"}, f)
    before = hashes(run_copy)
    proc = train_py(cli_args(run_copy, tokenizer_path, num_steps=6))
    assert proc.returncode == 2, proc.stderr[-3000:]
    msg = one_line(proc)
    assert f"in use by process {os.getpid()}" in msg and "train.py A" in msg and "another --workdir" in msg, msg
    assert hashes(run_copy) == before  # the lock and the run untouched, nothing appended to metrics.jsonl


@pytest.mark.slow
def test_a_stale_lock_is_reported_and_taken_over(run_copy, tokenizer_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = os.path.join(run_copy, ".lock")
    with open(lock, "w") as f:
        json.dump({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier", "command": "x"}, f)
    with caplog.at_level("WARNING"):
        result = trainer.train(tiny_config(tokenizer_path), run_copy)  # finished run: resumes, nothing to do
    assert result["status"] == "done" and result["step"] == STEPS
    assert any(f"stale lock {lock} of process {dead.pid}" in r.getMessage() for r in caplog.records)
    assert not os.path.exists(lock)  # released on exit


def test_lock_is_exclusive_in_process(tmp_path):
    a = ckpt_lib.WorkdirLock(str(tmp_path)).acquire()
    with pytest.raises(ckpt_lib.WorkdirBusy, match=f"in use by process {os.getpid()}"):
        ckpt_lib.WorkdirLock(str(tmp_path)).acquire()
    a.release()
    assert not os.path.exists(tmp_path / ".lock")
    ckpt_lib.WorkdirLock(str(tmp_path)).acquire().release()


# --------------------------------------------------------------------------------------------- failed saves
@pytest.mark.slow
def test_disk_full_during_a_save_stops_with_one_line(tokenizer_path, tmp_path):
    """ENOSPC on every file Orbax writes for step 4: the run stops at the next step with one line naming the
    error, the step and the newest intact checkpoint (2); rerunning resumes from 2."""
    workdir = str(tmp_path / "run")
    args = cli_args(workdir, tokenizer_path, num_steps=6)
    proc = train_py(args, prefix=[FAULT, "4", "ENOSPC"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    msg = one_line(proc)
    assert "saving checkpoint step 4 failed: OSError: [Errno 28] No space left on device" in msg, msg
    assert "training stopped at step 4" in msg, msg
    assert f"newest intact checkpoint is step 2 ({os.path.join(workdir, 'checkpoints', '2')})" in msg, msg
    assert "Fix: free space" in msg and "resume from step 2" in msg, msg
    assert max(r["step"] for r in read_metrics(workdir)) <= 5  # stopped at the next step, not ~20 later
    saved = {k: v for k, v in hashes(workdir).items() if k.startswith("checkpoints/2/")}

    proc = train_py(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
    assert "Metadata file does not exist" not in proc.stderr and "orbax" not in proc.stderr.lower(), proc.stderr
    assert [r["step"] for r in read_metrics(workdir)][-4:] == [3, 4, 5, 6]
    if os.path.isdir(os.path.join(workdir, "checkpoints", "2")):  # (keep=3 may since have rotated it out)
        assert {k: v for k, v in hashes(workdir).items() if k.startswith("checkpoints/2/")} == saved


@pytest.mark.slow
def test_permission_denied_during_a_save(tokenizer_path, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("nothing_lost_train_fault", FAULT)
    fault = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fault)
    workdir = str(tmp_path / "run")
    undo = fault.install(4, errno.EACCES)
    try:
        cfg = tiny_config(tokenizer_path, num_steps=6, **{"checkpoint.async_save": False})
        with pytest.raises(ckpt_lib.CheckpointSaveError, match=r"saving checkpoint step 4 failed: PermissionError: "
                           r"\[Errno 13\].*newest intact checkpoint is step 2.*Fix: make "):
            trainer.train(cfg, workdir)
    finally:
        undo()
    assert [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()] == ["2"]
    assert not os.path.exists(os.path.join(workdir, ".lock"))


# --------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("args, expect", [
    ([], "--config=(not given) is required. Fix:"),
    (["--config", "configs/nope.py", "--workdir", "w"], "--config='configs/nope.py' does not exist. Fix: pass one of"),
    (["--config", "configs/tiny.py"], "--workdir=(not given) is required. Fix:"),
    (["--config", "configs/tiny.py", "--workdir", "w", "--config.num_steps=abc"], "--config.num_steps=abc: "),
    (["--config", "configs/tiny.py", "--workdir", "w", "extra"], "unexpected arguments ['extra']"),
    (["--config", "configs/tiny.py", "--workdir", "w", "--config.optimizer.b1=1.0"],
     "config.optimizer.b1=1.0 must be in [0, 1)"),
])
@pytest.mark.heavy
def test_bad_arguments_are_one_line_exit_2(args, expect, tmp_path):
    args = [a if a != "w" else str(tmp_path / "w") for a in args]
    proc = train_py(args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    msg = one_line(proc)
    assert expect in msg and "Fix:" in msg, msg
    assert not os.path.exists(tmp_path / "w")  # validated before anything was loaded or written


@pytest.mark.heavy  # 3-5 s on 2 busy cores: the light tier stays near its 90 s
def test_debug_shows_the_traceback(tmp_path):
    proc = train_py(["--config", "configs/tiny.py", f"--workdir={tmp_path / 'w'}", "--config.optimizer.b1=1.0"],
                    timeout=120, MISTRAL_JAX_DEBUG="1")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


@pytest.mark.parametrize("field, value, match", [
    ("learning_rate", -1e-3, r"config.optimizer.learning_rate=-0.001 must be >= 0.*Fix: set e.g. "),
    ("b1", 1.0, r"config.optimizer.b1=1.0 must be in \[0, 1\).*Fix: set e.g. --config.optimizer.b1=0.9"),
    ("b2", 1.5, r"config.optimizer.b2=1.5 must be in \[0, 1\)"),
    ("eps", 0.0, r"config.optimizer.eps=0.0 must be > 0"),
    ("weight_decay", -0.1, r"config.optimizer.weight_decay=-0.1 must be >= 0.*Fix:"),
    ("min_lr_ratio", 2.0, r"config.optimizer.min_lr_ratio=2.0 must be in \[0, 1\]"),
    ("grad_clip_norm", -1.0, r"config.optimizer.grad_clip_norm=-1.0 must be >= 0"),
    ("warmup_steps", 5, r"config.optimizer.warmup_steps=5 is larger than config.num_steps=4.*Fix: set "
                        r"--config.optimizer.warmup_steps="),
])
def test_optimizer_values_are_range_checked(field, value, match, tokenizer_path, tmp_path):
    cfg = tiny_config(tokenizer_path, **{f"optimizer.{field}": value})
    with pytest.raises(trainer.ConfigError, match=match):
        trainer.train(cfg, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


# --------------------------------------------------------------------------------------------- tokenizer
@pytest.mark.heavy  # 3-5 s on 2 busy cores: the light tier stays near its 90 s
def test_tokenizer_too_small_for_cjk_names_the_fields(tmp_path):
    import random

    rng = random.Random(0)
    chars = [chr(0x4E00 + i) for i in range(1500)]
    data = tmp_path / "cjk.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for _ in range(300):
            f.write(json.dumps({"text": "".join(rng.choice(chars) for _ in range(80))}, ensure_ascii=False) + "\n")
    workdir = tmp_path / "w"
    proc = train_py(cli_args(str(workdir), "", **{"data.train": str(data)}), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    msg = one_line(proc)
    with open(data, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    n_chars = len(set("".join(texts)))
    needed = n_chars + 1 + 256 + 3  # + the word-boundary piece, byte fallback, <unk> <s> </s>
    assert "config.data.tokenizer_vocab_size=512: a 512-piece vocabulary is too small" in msg, msg
    assert f"{n_chars:,} distinct characters" in msg and f"at least {needed:,}" in msg, msg
    assert f"--config.data.tokenizer_vocab_size={needed} --config.model.vocab_size={needed}" in msg, msg
    assert "character_coverage" not in msg  # sentencepiece's flag is not the fix
    assert not os.path.exists(workdir / "tokenizer.model")
    # and the fix works: the suggested size trains (its own tokenizer: the CJK data and the size are the test)
    assert train_tokenizer(texts, str(tmp_path / "ok.model"), needed)
