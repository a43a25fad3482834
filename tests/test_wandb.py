"""Weights & Biases beside metrics.jsonl (``config.wandb``): a run in ``WANDB_MODE=offline`` leaves W&B's own run
file, read back here with W&B's protobuf records: the config, every metrics record at its step, and the run
report's figures as images; a resumed run is the same W&B run. Misuse is one line before any device."""

import glob
import json
import os
import struct
import subprocess
import sys
import types

import pytest

from mistral_jax.training import wandb_writer
from tests.helpers import run_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wandb_records(path):
    """The records of a ``.wandb`` run file: W&B's 7-byte header (``:W&B`` + version), then LevelDB's log format
    (32 KiB blocks of chunks: crc32c, length, type full / first / middle / last), each a
    ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:8]
    pos, block, chunks, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    out = []
    for c in chunks:
        r = pb.Record()
        r.ParseFromString(c)
        out.append(r)
    return out


def _history(records):
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


def _cmd(workdir, tokenizer, steps, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/tiny.py"),
            f"--workdir={workdir}", f"--config.num_steps={steps}", "--config.batch_size=8", "--config.data.seq_len=32",
            "--config.log_every=1", "--config.checkpoint.every_steps=3", "--config.eval_every=3",
            "--config.eval_steps=2", "--config.optimizer.warmup_steps=2", f"--config.data.tokenizer={tokenizer}",
            "--config.progress_bar=False", "--config.wandb.project=mj-test", *extra]


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               WANDB_MODE="offline", WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"))
    return env


@pytest.mark.slow
def test_an_offline_run_holds_the_config_metrics_and_report_figures(tokenizer_path, tmp_path):
    workdir = str(tmp_path / "run")
    r = subprocess.run(_cmd(workdir, tokenizer_path, 6), env=_env(tmp_path), cwd=ROOT, capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wandb" not in (r.stdout + r.stderr).lower(), r.stderr[-2000:]  # quiet
    (run_file,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))
    assert os.path.basename(run_file) == f"run-{wandb_writer.run_id(workdir)}.wandb"
    records = wandb_records(run_file)
    (run,) = [x.run for x in records if x.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["num_steps"] == 6 and config["batch_size"] == 8 and config["wandb"]["project"] == "mj-test"
    rows = _history(records)
    train = {row["step"]: row["loss"] for row in rows if "loss" in row}
    assert train == pytest.approx(run_losses(workdir))  # every step's loss, as in metrics.jsonl
    assert sorted(row["step"] for row in rows if "eval/loss" in row) == [3, 6]
    assert all("goodput/percent" in row for row in rows if "loss" in row)
    images = {k.split("/")[1] for row in rows for k, v in row.items() if k.endswith("/_type") and v == "image-file"}
    assert {"loss", "throughput", "goodput", "timeline"} <= images  # the run report's figures
    media = glob.glob(os.path.join(os.path.dirname(run_file), "files", "media", "images", "report", "*.png"))
    assert len(media) == len(images)

    # the same workdir again with more steps (a resume): the same W&B run, logging from the next step on
    r = subprocess.run(_cmd(workdir, tokenizer_path, 8), env=_env(tmp_path), cwd=ROOT, capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb")))
    assert len(files) == 2 and {os.path.basename(f) for f in files} == {os.path.basename(run_file)}
    later = [f for f in files if f != run_file][0]
    assert sorted({row["step"] for row in _history(wandb_records(later)) if "loss" in row}) == [7, 8]


def _cfg(**wandb):
    from ml_collections import ConfigDict

    return ConfigDict({"wandb": {"project": "", "entity": "", "name": "", "figures": True, **wandb}})


def test_wandb_misuse_is_one_line(monkeypatch, tmp_path):
    wandb_writer.check(_cfg())  # off: nothing to check
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(wandb_writer.WandbError, match=r"project='p' needs the wandb package .* Fix: pip install"):
        wandb_writer.check(_cfg(project="p"))
    monkeypatch.setitem(sys.modules, "wandb", types.ModuleType("wandb"))  # installed, online, without a key
    for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "netrc").write_text("machine example.com login x password y\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(wandb_writer.WandbError, match=r"no W&B API key .* Fix: `wandb login`") as e:
        wandb_writer.check(_cfg(project="p"))
    assert "\n" not in str(e.value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb_writer.check(_cfg(project="p"))  # offline: no key needed
    assert wandb_writer.run_id("/a/run") == wandb_writer.run_id("/a/run") != wandb_writer.run_id("/b/run")
