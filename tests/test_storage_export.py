"""Exports and checkpoints on buckets (``gs://`` on fake-gcs-server, ``s3://`` on moto; tests/emulators.py).

An export written to a bucket holds the same bytes as the local one and loads to the same parameters; conversions
read from and write to buckets; a training workdir on a bucket loads (its uncommitted steps skipped); an export
looks complete only once its marker ``mistral_jax_export.json`` is there (an unfinished one is refused in one
line), while a checkpoint copied to a bucket by other tools loads as before; bad paths are one line and exit 2
from the command line, and leave the bucket as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import mistral_jax as mj
from mistral_jax import cli, storage
from mistral_jax.cli.convert import main as convert_main
from mistral_jax.convert import files, paths
from mistral_jax.loading import open_checkpoint
from mistral_jax.model.transformer import params_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = mj.ModelConfig.tiny(dim=32, hidden_dim=64, head_dim=8)  # vocab 512: tokenizer_path's
MOE = mj.ModelConfig.tiny_mixtral(dim=32, hidden_dim=64, head_dim=8)
SAVE = {"hf": mj.save_hf, "mistral": mj.save_mistral, "jax": mj.save_jax}


@pytest.fixture(scope="module")
def model():
    return mj.Transformer(CFG, rngs=nnx.Rngs(0))


def _params(m) -> dict:
    return jax.tree.map(np.asarray, params_dict(m))


def _assert_same_params(a, b) -> None:
    pa, pb = _params(a), _params(b)
    assert jax.tree.structure(pa) == jax.tree.structure(pb)
    jax.tree.map(np.testing.assert_array_equal, pa, pb)


def _bytes_under(root: str) -> dict[str, bytes]:
    """Every file below ``root`` (local or a bucket) -> its bytes; the bucket markers left out."""
    return {rel: storage.read_bytes(storage.join(root, rel)) for rel in sorted(files.listing(root))
            if rel not in (paths.MARKER, paths.INCOMPLETE)}


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """``python -m mistral_jax.convert ARGV`` in process: (exit status, stderr lines)."""
    code = cli.run(lambda: convert_main(list(argv)), "convert")
    return code, capsys.readouterr().err.strip().splitlines()


def _everything(bucket: str) -> dict[str, int]:
    return files.listing(bucket)


# ------------------------------------------------------------------------------------------------ exports
@pytest.mark.heavy  # seconds each: the fast tier (the light tier keeps the refusals)
@pytest.mark.parametrize("shard", ["5GB", "40KB"])  # one model.safetensors / shards + index
def test_hf_export_on_gcs_is_the_local_export(model, gcs_bucket, tmp_path, tokenizer_path, shard):
    """The same files, byte for byte (the tokenizer's too), plus the marker listing them; loads to the same
    parameters."""
    tok = tokenizer_path if shard == "5GB" else None
    local = mj.save_hf(model, tmp_path / "hf", tokenizer=tok, max_shard_size=shard)
    url = mj.save_hf(model, storage.join(gcs_bucket, "exports", "hf"), tokenizer=tok, max_shard_size=shard)
    want = _bytes_under(local)
    assert _bytes_under(url) == want
    assert ("model.safetensors.index.json" in want) == (shard == "40KB") and ("tokenizer.json" in want) == bool(tok)
    marker = json.loads(storage.read_bytes(storage.join(url, paths.MARKER)))
    assert marker["kind"] == "hf" and marker["files"] == {f: len(b) for f, b in want.items()}
    assert paths.INCOMPLETE not in files.listdir(url)
    _assert_same_params(mj.load_pretrained(url), mj.load_pretrained(local))


@pytest.mark.heavy  # seconds each: the fast tier (the light tier keeps the refusals)
@pytest.mark.parametrize("fmt, where", [("mistral", "gcs"), ("jax", "gcs"), ("hf", "s3"), ("jax", "s3")])
def test_each_format_round_trips_through_a_bucket(fmt, where, request, tmp_path):
    """``save_<fmt>`` to the bucket, ``open_checkpoint`` / ``load_pretrained`` from it: the same model (MoE too)."""
    m = mj.Transformer(MOE, rngs=nnx.Rngs(1))
    url = storage.join(request.getfixturevalue(f"{where}_bucket"), fmt)
    assert SAVE[fmt](m, url) == url
    ckpt = open_checkpoint(url)
    assert ckpt.format == fmt and ckpt.config.to_hf("float32") == m.cfg.to_hf("float32")  # the same network
    _assert_same_params(mj.load_pretrained(ckpt), m)
    if fmt != "jax":  # the file formats: the same bytes as the local export
        assert _bytes_under(url) == _bytes_under(SAVE[fmt](m, tmp_path / fmt))


@pytest.mark.heavy  # seconds each: the fast tier (the light tier keeps the refusals)
def test_convert_streams_between_buckets_and_back(model, gcs_bucket, s3_bucket, tmp_path, capsys, tokenizer_path):
    """hf on gs:// -> mistral on s3:// -> jax on gs:// -> hf local: the local hf export, byte for byte (the
    tokenizer travels along, read from the buckets)."""
    local = mj.save_hf(model, tmp_path / "hf", tokenizer=tokenizer_path)
    hf_url = mj.save_hf(model, storage.join(gcs_bucket, "hf"), tokenizer=tokenizer_path)
    steps = [("hf", "mistral", hf_url, storage.join(s3_bucket, "consolidated")),
             ("mistral", "jax", storage.join(s3_bucket, "consolidated"), storage.join(gcs_bucket, "jax")),
             ("jax", "hf", storage.join(gcs_bucket, "jax"), str(tmp_path / "back"))]
    for src, dst, inp, out in steps:
        code, err = _cli(capsys, "--from", src, "--to", dst, "--input", inp, "--output", out)
        assert code == 0 and err == [], err
    assert _bytes_under(str(tmp_path / "back")) == _bytes_under(local)
    _assert_same_params(mj.load_pretrained(storage.join(gcs_bucket, "jax")), model)


@pytest.mark.heavy  # seconds each: the fast tier (the light tier keeps the refusals)
def test_training_workdir_on_a_bucket_loads_its_newest_committed_step(model, gcs_bucket):
    """A workdir as train.py lays it out on a bucket: model_config.json + Orbax steps (commit-file protocol).
    A step that Orbax never committed (a killed save) is skipped; a step dir loads on its own."""
    from mistral_jax.training.checkpoint import ITEMS

    workdir = storage.join(gcs_bucket, "runs", "tiny")
    storage.write_bytes(storage.join(workdir, "model_config.json"), json.dumps(CFG.to_dict()).encode())
    storage.configure()
    newer = jax.tree.map(lambda x: x + 1, params_dict(model))
    mgr = ocp.CheckpointManager(storage.join(workdir, "checkpoints"), item_names=ITEMS)
    for step, params in ((10, params_dict(model)), (20, newer)):
        mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                               meta=ocp.args.JsonSave({"step": step})))
    mgr.wait_until_finished()
    mgr.close()
    steps = storage.join(workdir, "checkpoints")
    for rel in files.listing(storage.join(steps, "20")):  # step 30: step 20's files, never committed
        if rel != "commit_success.txt":
            files.copy_file(storage.join(steps, "20", rel), storage.join(steps, "30", rel))
    ckpt = open_checkpoint(workdir)
    assert ckpt.format == "jax" and ckpt.config == CFG
    got = _params(mj.load_pretrained(workdir))
    jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, newer))
    _assert_same_params(mj.load_pretrained(storage.join(steps, "10")), model)


@pytest.mark.heavy  # seconds (its HF export of the model): the fast tier
def test_a_checkpoint_copied_by_another_tool_loads(model, gcs_bucket, tmp_path):
    """No markers (e.g. ``gcloud storage cp -r`` of an HF repo): read as it is."""
    local = mj.save_hf(model, tmp_path / "hf")
    url = storage.join(gcs_bucket, "copied")
    for rel in files.listing(local):
        files.copy_file(os.path.join(local, rel), storage.join(url, rel))
    _assert_same_params(mj.load_pretrained(url), model)


# ------------------------------------------------------------------------------------------------ markers
def _kill_mid_export(url: str, kind: str = "hf") -> None:
    """What a killed export leaves: its files without the marker, and the in-progress marker of a dead process."""
    storage.remove(storage.join(url, paths.MARKER))
    storage.write_bytes(storage.join(url, paths.INCOMPLETE),
                        json.dumps({"kind": kind, "host": "another-host", "pid": 99999999}).encode())


def test_an_unfinished_export_is_refused_in_one_line(model, gcs_bucket, capsys):
    url = mj.save_hf(model, storage.join(gcs_bucket, "hf"))
    _kill_mid_export(url)
    before = _everything(gcs_bucket)
    with pytest.raises(paths.IncompleteExportError) as e:
        mj.load_pretrained(url)
    msg = str(e.value)
    assert "\n" not in msg and paths.INCOMPLETE in msg and paths.MARKER in msg and "Fix: rerun the export" in msg
    code, err = _cli(capsys, "--from", "hf", "--to", "jax", "--input", url, "--output",
                     storage.join(gcs_bucket, "out"))
    assert code == 2 and len(err) == 1 and "--input=" in err[0] and "unfinished" in err[0], err
    assert _everything(gcs_bucket) == before
    # without overwrite the unfinished export stays; with it, the export is written again and loads
    with pytest.raises(paths.OutputExistsError, match="exists and is not empty"):
        mj.save_hf(model, url)
    assert _everything(gcs_bucket) == before
    mj.save_hf(model, url, overwrite=True)
    assert paths.INCOMPLETE not in files.listdir(url)
    _assert_same_params(mj.load_pretrained(url), model)


def test_an_export_missing_a_listed_file_is_refused(model, s3_bucket):
    url = mj.save_mistral(model, storage.join(s3_bucket, "consolidated"))
    storage.remove(storage.join(url, "params.json"))
    with pytest.raises(paths.IncompleteExportError, match=r"missing params\.json.*Fix: rerun the export"):
        open_checkpoint(url)


def test_a_failed_export_leaves_the_bucket_as_it_was(model, gcs_bucket, tmp_path):
    """The tokenizer is checked after the weights are written: its failure removes everything written."""
    bogus = tmp_path / "tokenizer.model"
    bogus.write_bytes(b"not a sentencepiece model")
    mj.save_jax(model, storage.join(gcs_bucket, "kept"))
    before = _everything(gcs_bucket)
    with pytest.raises(ValueError, match="is not a sentencepiece model"):
        mj.save_hf(model, storage.join(gcs_bucket, "hf"), tokenizer=str(bogus))
    assert _everything(gcs_bucket) == before


@pytest.mark.heavy  # seconds each: the fast tier (the light tier keeps the refusals)
def test_overwrite_replaces_a_previous_bucket_export_and_nothing_else(model, gcs_bucket, capsys):
    url = mj.save_hf(model, storage.join(gcs_bucket, "hf"), max_shard_size="40KB")
    assert sum(f.startswith("model-0") for f in files.listdir(url)) > 1
    other = mj.save_mistral(model, storage.join(gcs_bucket, "consolidated"))
    run = mj.save_jax(model, storage.join(gcs_bucket, "jax"))
    before = _everything(gcs_bucket)
    for out, why in ((url, "a previous hf export"), (run, "not a previous hf export")):
        code, err = _cli(capsys, "--from", "mistral", "--to", "hf", "--input", other, "--output", out)
        assert code == 2 and len(err) == 1 and why in err[0], err
    code, err = _cli(capsys, "--from", "jax", "--to", "hf", "--input", storage.join(gcs_bucket, "hf"), "--output",
                     storage.join(gcs_bucket, "hf", "inside"))
    assert code == 2 and len(err) == 1 and "lies inside the input directory" in err[0], err
    assert _everything(gcs_bucket) == before
    code, err = _cli(capsys, "--from", "mistral", "--to", "hf", "--input", other, "--output", url, "--overwrite")
    assert code == 0, err
    assert files.listdir(url) == sorted(["config.json", "generation_config.json", "model.safetensors", paths.MARKER])
    _assert_same_params(mj.load_pretrained(url), model)


# ------------------------------------------------------------------------------------------------ bad paths
def test_cli_bad_bucket_paths_are_one_line_exit_2(model, gcs_bucket, s3_bucket, capsys, tmp_path, monkeypatch):
    from tests.emulators import free_port

    local = mj.save_hf(model, tmp_path / "hf")
    url = mj.save_hf(model, storage.join(gcs_bucket, "hf"))
    before = {b: _everything(b) for b in (gcs_bucket, s3_bucket)}
    cases = [  # (argv, what the line says)
        (["--input", local, "--output", f"gs://no-such-bucket-{os.getpid()}/export"], "does not exist"),
        (["--input", f"s3://no-such-bucket-{os.getpid()}/hf", "--output", str(tmp_path / "o")], "does not exist"),
        (["--input", storage.join(gcs_bucket, "absent"), "--output", str(tmp_path / "o")], "does not exist"),
        (["--input", local, "--output", "hdfs://namenode/export"], "cannot open"),
    ]
    for argv, says in cases:
        code, err = _cli(capsys, "--from", "hf", "--to", "hf", *argv)
        assert code == 2 and len(err) == 1 and says in err[0] and "Fix:" in err[0], (argv, err)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # the endpoint is down
    code, err = _cli(capsys, "--from", "hf", "--to", "jax", "--input", url, "--output", str(tmp_path / "o"))
    assert code == 2 and len(err) == 1 and "cannot reach" in err[0] and "connection refused" in err[0], err
    monkeypatch.undo()
    assert {b: _everything(b) for b in (gcs_bucket, s3_bucket)} == before
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_library_refuses_a_missing_bucket_before_writing(model, gcs_bucket):
    missing = f"gs://no-such-bucket-{os.getpid()}/export"
    with pytest.raises(storage.StorageError, match=r"output='gs://no-such-bucket-.*does not exist.*Fix: create it"):
        mj.save_jax(model, missing)
    with pytest.raises(storage.StorageError, match="checkpoint=.*does not exist"):
        mj.load_pretrained(missing)


@pytest.mark.heavy  # Python subprocesses, as a user runs the converter
def test_convert_command_to_a_bucket_and_back_is_quiet(model, gcs_bucket, tmp_path):
    local = mj.save_hf(model, tmp_path / "hf")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    env.pop("MISTRAL_JAX_DEBUG", None)
    url = storage.join(gcs_bucket, "export")
    for src, dst, inp, out in (("hf", "jax", local, url), ("jax", "hf", url, str(tmp_path / "back"))):
        proc = subprocess.run([sys.executable, "-m", "mistral_jax.convert", "--from", src, "--to", dst, "--input",
                               inp, "--output", out], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0 and proc.stdout.startswith(f"wrote {dst} checkpoint to {out}"), proc.stderr
        assert [ln for ln in proc.stderr.splitlines() if "GOOGLE_AUTH_TOKEN_FOR_TESTING" not in ln] == []
    assert _bytes_under(str(tmp_path / "back")) == _bytes_under(local)
