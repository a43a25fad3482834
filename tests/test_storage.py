"""A URL is never taken for a local path: every path the project reads or writes is refused in one line, before
any work, when it is ``gs://``, ``s3://`` or any other ``scheme://`` (mistral_jax/storage.py).

Without the check, ``train.py --workdir gs://bkt/x`` trained into a local ``./gs:/bkt/x`` and failed at its first
save, and ``convert --output gs://bkt/export`` wrote ``./gs:/bkt/export`` and exited 0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import mistral_jax as mj
from mistral_jax import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path, scheme", [
    ("gs://bkt/run", "gs"), ("s3://bkt/run", "s3"), ("GS://bkt", "gs"), ("file:///tmp/x", "file"),
    ("hf://datasets/x", "hf"), ("runs/demo", None), ("/abs/gs://x", None), ("mistral:v3", None),
    ("HuggingFaceH4/ultrachat_200k", None), ("C:\\runs\\x", None), ("", None), (None, None), (3, None),
])
def test_url_scheme(path, scheme):
    assert storage.url_scheme(path) == scheme


def test_check_local_names_the_field_the_url_and_the_fix():
    storage.check_local("runs/x", "--workdir")
    storage.check_local(["a.jsonl", "b.jsonl"], "--input")
    with pytest.raises(storage.UnsupportedPath) as e:
        storage.check_local(["a.jsonl", "s3://b/c.jsonl"], "--input")
    msg = str(e.value)
    assert msg.startswith("--input='s3://b/c.jsonl' is a s3:// URL") and "Fix: pass a local path" in msg
    assert "\n" not in msg


def _no_url_dirs(where) -> None:
    """Nothing named like a URL's first segment was created (``gs:`` / ``s3:``)."""
    assert not [n for n in os.listdir(where) if n.endswith(":")], os.listdir(where)


@pytest.mark.parametrize("argv, flag", [
    (["mistral_jax.cli.convert", "--input", "hdfs://nn/hf", "--output", "out", "--from", "hf", "--to", "jax"],
     "--input"),  # gs:// and s3:// work there (tests/test_storage_export.py); other schemes are refused
    (["mistral_jax.cli.convert", "--input", "{hf}", "--output", "hdfs://nn/export", "--from", "hf", "--to", "hf"],
     "--output"),
    (["mistral_jax.cli.generate", "--checkpoint", "hdfs://nn/ckpt", "--prompt", "hi"], "--checkpoint"),
    (["mistral_jax.cli.lora", "--workdir", "hdfs://nn/lora", "--output", "out"], "--workdir"),
    (["mistral_jax.cli.train_tokenizer", "--input", "a.txt", "hdfs://nn/b.txt", "--output", "t.model"], "--input"),
])
def test_command_line_tools_refuse_a_url_in_one_line(argv, flag, tmp_path, monkeypatch, capsys):
    import importlib

    hf = tmp_path / "hf"
    hf.mkdir()
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(argv[0])
    from mistral_jax import cli

    try:  # as each tool's console script runs main: a returned exit status, or a UsageError as one line, exit 2
        code = cli.run(lambda: module.main([a.format(hf=hf) for a in argv[1:]]), argv[0])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, (code, err)
    assert f"{flag}=" in err and "URL" in err and "Fix:" in err
    _no_url_dirs(tmp_path)


@pytest.mark.oracle  # mistral_jax.evals imports lm-eval (not in the light extra)
def test_eval_refuses_an_unsupported_url_before_loading_lm_eval():
    from absl import flags

    from mistral_jax.cli import UsageError
    from mistral_jax.evals import args

    values = flags.FlagValues()
    for name in ("checkpoint", "tokenizer", "include_path", "output_path"):
        flags.DEFINE_string(name, None, "", flag_values=values)
    values(["eval.py", "--checkpoint", "runs/demo", "--output_path", "hdfs://nn/evals"])
    with pytest.raises(UsageError, match=r"--output_path='hdfs://nn/evals' is a hdfs:// URL"):
        args.check_paths(values)


@pytest.mark.heavy  # a Python subprocess
def test_train_py_refuses_a_url_workdir_before_any_work(tmp_path):
    """The issue's case, as a user runs it: a URL train.py cannot open (``gs://`` and ``s3://`` it can) is exit 2,
    one line, no ``./hdfs:`` directory, nothing trained."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config",
                           os.path.join(ROOT, "configs", "tiny.py"), "--workdir", "hdfs://bkt/run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--workdir='hdfs://bkt/run' is a hdfs:// URL" in lines[0], proc.stderr
    assert "Fix:" in lines[0]
    _no_url_dirs(tmp_path)


@pytest.mark.parametrize("field", ["init_from", "data.train", "data.validation", "data.tokenizer"])
def test_run_config_paths_are_checked(field):
    """A bucket path is a path (its readers open it); any other URL is refused in one line."""
    from configs import tiny
    from mistral_jax.training import run

    cfg = tiny.get_config()
    head, _, leaf = field.rpartition(".")
    (cfg[head] if head else cfg)[leaf] = "s3://bkt/thing"
    run.validate_config(cfg)
    (cfg[head] if head else cfg)[leaf] = "hdfs://bkt/thing"
    with pytest.raises(run.ConfigError) as e:
        run.validate_config(cfg)
    assert str(e.value).startswith(f"config.{field}='hdfs://bkt/thing' is a hdfs:// URL") and "\n" not in str(e.value)


def test_library_entry_points_refuse_urls(tmp_path, monkeypatch):
    from configs import tiny
    from mistral_jax.training import trainer

    monkeypatch.chdir(tmp_path)
    with pytest.raises(storage.UnsupportedPath, match="checkpoint='hdfs://nn/model' is a hdfs:// URL"):
        mj.load_pretrained("hdfs://nn/model")  # gs:// and s3:// load (tests/test_storage_export.py)
    model = mj.Transformer(mj.ModelConfig.tiny(), rngs=__import__("flax").nnx.Rngs(0))
    for save in (mj.save_hf, mj.save_mistral, mj.save_jax):
        with pytest.raises(storage.UnsupportedPath, match="output='hdfs://nn/export' is a hdfs:// URL"):
            save(model, "hdfs://nn/export")
    with pytest.raises(trainer.ConfigError, match="workdir='hdfs://bkt/run' is a hdfs:// URL"):
        trainer.train(tiny.get_config(), "hdfs://bkt/run")  # gs:// and s3:// are trained into
    _no_url_dirs(tmp_path)


# ------------------------------------------------------------------------------------------- the path layer
def test_check_supported_takes_buckets_and_refuses_other_schemes():
    storage.check_supported(["gs://bkt/run", "s3://bkt/run", "runs/x", "mistral:v3"], "--workdir")
    for url in ("http://host/x", "hdfs://nn/x", "file:///tmp/x"):
        with pytest.raises(storage.UnsupportedPath) as e:
            storage.check_supported(url, "--workdir")
        assert str(e.value).startswith(f"--workdir={url!r} is a ") and "Fix:" in str(e.value)
        assert "\n" not in str(e.value)


def test_join_keeps_the_scheme():
    assert storage.join("gs://bkt/run/", "checkpoints", "1") == "gs://bkt/run/checkpoints/1"
    assert storage.join("runs/x", "metrics.jsonl") == os.path.join("runs/x", "metrics.jsonl")
    assert storage.absolute("s3://bkt/run/") == "s3://bkt/run"


@pytest.mark.parametrize("where", ["local", "gcs", "s3"])
def test_create_exclusive_lets_one_writer_win(where, tmp_path, request):
    base = str(tmp_path) if where == "local" else request.getfixturevalue(f"{where}_bucket")
    p = storage.join(base, "run", ".lock")
    assert storage.create_exclusive(p, b"first")
    assert not storage.create_exclusive(p, b"second")
    assert storage.read_bytes(p) == b"first"  # nothing overwritten
    storage.remove(p)
    assert storage.create_exclusive(p, b"third")


@pytest.mark.parametrize("where", ["gcs", "s3"])
def test_check_bucket_names_a_missing_bucket_in_one_line(where, request):
    url = request.getfixturevalue(f"{where}_bucket")
    storage.check_bucket(storage.join(url, "run"), "--workdir", write=True)
    missing = f"{url.split('://')[0]}://no-such-bucket-{os.getpid()}/run"
    with pytest.raises(storage.StorageError) as e:
        storage.check_bucket(missing, "--workdir")
    msg = str(e.value)
    assert "does not exist" in msg and "no-such-bucket" in msg and "Fix: create it" in msg and "\n" not in msg


def test_check_bucket_fails_fast_when_the_endpoint_is_down(tmp_path, monkeypatch):
    import time

    from tests.emulators import free_port

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    start = time.time()
    with pytest.raises(storage.StorageError) as e:
        storage.check_bucket("gs://bkt/run", "--workdir")
    assert time.time() - start < 5
    assert "connection refused" in str(e.value) and "STORAGE_EMULATOR_HOST" in str(e.value)


@pytest.mark.parametrize("where", ["gcs", "s3"])
def test_orbax_saves_and_restores_on_a_bucket(where, request):
    """Orbax's CheckpointManager on the emulator, arrays through tensorstore's GCS / S3 driver (orbax_s3.py)."""
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp

    url = storage.join(request.getfixturevalue(f"{where}_bucket"), "ckpt")
    storage.configure()
    state = {"a": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones((5,), jnp.int32)}
    mgr = ocp.CheckpointManager(url, options=ocp.CheckpointManagerOptions(create=True))
    mgr.save(7, args=ocp.args.Composite(params=ocp.args.StandardSave(state)))
    mgr.wait_until_finished()
    out = ocp.CheckpointManager(url).restore(7, args=ocp.args.Composite(params=ocp.args.StandardRestore(state)))
    np.testing.assert_array_equal(out["params"]["a"], state["a"])
    np.testing.assert_array_equal(out["params"]["b"], state["b"])
    assert storage.path(storage.join(url, "7", "commit_success.txt")).exists()  # the commit-file protocol
