"""A run is resolved once (``training.run.resolve -> RunSpec``): each of mesh, rules, ModelConfig, optimizer and
``init_from`` is built once per ``train.py`` run; the dry run and the AOT tool report the same FLOPs and MFU (one
FLOP count and one peak table: ``mistral_jax.flops``); ``train.py`` is quiet on stderr."""

import collections
import logging
import os
import re
import subprocess
import sys

import jax
import pytest
from jax.sharding import Mesh

from configs import tiny
from mistral_jax import aot, flops, loading, sharding
from mistral_jax.aot import dry_run as dry_run_lib
from mistral_jax.aot import roofline
from mistral_jax.config import ModelConfig
from mistral_jax.training import metrics, optimizer
from mistral_jax.training import run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------- built once
class Counts:
    """Counts constructor calls: ``Mesh``, ``ShardingRules``, ``ModelConfig`` (outside the weight loader),
    ``make_optimizer`` and the opening of a checkpoint directory."""

    def __init__(self, monkeypatch):
        self.n = collections.Counter()
        self._in_loader = 0
        self._wrap_new(monkeypatch, Mesh, "mesh")
        self._wrap(monkeypatch, sharding.ShardingRules, "__init__", "rules")
        self._wrap(monkeypatch, optimizer, "make_optimizer", "optimizer")
        self._wrap(monkeypatch, loading, "formats_of", "directory probes")  # every open of a checkpoint probes
        orig_post = ModelConfig.__post_init__

        def post_init(cfg_self):
            if not self._in_loader:
                self.n["model_config"] += 1
            return orig_post(cfg_self)

        monkeypatch.setattr(ModelConfig, "__post_init__", post_init)
        orig_open = loading.open_checkpoint

        def open_checkpoint(path):
            if not isinstance(path, loading.Checkpoint):
                self.n["init_from opened"] += 1
            return orig_open(path)

        monkeypatch.setattr(loading, "open_checkpoint", open_checkpoint)
        orig_load = loading.load_pretrained

        def load_pretrained(*a, **k):  # the weight loader builds the config of the model it restores
            self._in_loader += 1
            try:
                return orig_load(*a, **k)
            finally:
                self._in_loader -= 1

        monkeypatch.setattr(loading, "load_pretrained", load_pretrained)

    def _wrap(self, monkeypatch, owner, name, key):
        orig = getattr(owner, name)

        def counted(*a, **k):
            self.n[key] += 1
            return orig(*a, **k)

        monkeypatch.setattr(owner, name, counted)

    def _wrap_new(self, monkeypatch, cls, key):
        orig = cls.__new__

        def counted(klass, *a, **k):
            self.n[key] += 1
            return orig(klass, *a, **k)

        monkeypatch.setattr(cls, "__new__", counted)


def _train_main(monkeypatch, workdir, tokenizer_path, *extra):
    """``train.py``'s ``main`` in this process (absl flags parsed as the command line would)."""
    from absl import flags

    from mistral_jax.cli import train as train_cli

    argv = ["train.py", "--config", os.path.join(ROOT, "configs/tiny.py"), f"--workdir={workdir}",
            "--config.num_steps=2", "--config.optimizer.warmup_steps=0", "--config.log_every=1",
            "--config.eval_every=0", "--config.data.validation=", f"--config.data.tokenizer={tokenizer_path}",
            "--config.progress_bar=false", "--config.checkpoint.async_save=false", *extra]
    from ml_collections import config_flags

    # train.py's flags, defined as entry() defines them (config_flags reads the overrides off sys.argv), on a
    # FlagValues of this test's own
    monkeypatch.setattr(sys, "argv", argv)
    fv = flags.FlagValues()
    monkeypatch.setitem(train_cli._FLAGS, "config", config_flags.DEFINE_config_file(
        "config", None, "run config", flag_values=fv, lock_config=True))
    monkeypatch.setitem(train_cli._FLAGS, "workdir", flags.DEFINE_string("workdir", None, "out", flag_values=fv))
    monkeypatch.setitem(train_cli._FLAGS, "dry_run", flags.DEFINE_bool("dry_run", False, "compile", flag_values=fv))
    fv(argv)
    package_log = logging.getLogger("mistral_jax")
    level, handlers, propagate = package_log.level, list(package_log.handlers), package_log.propagate
    try:
        train_cli.main(argv)
    finally:  # main() sets the package's logging up: restored for the other tests
        package_log.setLevel(level)
        package_log.handlers[:] = handlers
        package_log.propagate = propagate


@pytest.mark.parametrize("start", ["fresh", "init_from"])
@pytest.mark.heavy  # trains or compiles end to end: fast tier, not light
def test_train_py_builds_each_part_of_the_run_once(start, monkeypatch, tmp_path, tokenizer_path, tiny_trained_run,
                                                   capsys):
    extra = [f"--config.init_from={tiny_trained_run}"] if start == "init_from" else []
    counts = Counts(monkeypatch)
    _train_main(monkeypatch, tmp_path / "run", tokenizer_path, *extra)
    assert "train: done at step 2/2" in capsys.readouterr().out
    want = {"mesh": 1, "rules": 1, "optimizer": 1}
    if start == "init_from":
        # the checkpoint is opened once (one probe of the directory, its config file read once: one ModelConfig as
        # saved); the run's ModelConfig is the second, built once from config.model on that architecture
        want.update({"init_from opened": 1, "directory probes": 1, "model_config": 2})
    else:
        want.update({"model_config": 1})
    assert dict(counts.n) == want


@pytest.mark.heavy  # the shared trained run (13 s to train): the fast tier
def test_resolve_holds_the_run(tmp_path, tiny_trained_run, tokenizer_path):
    cfg = tiny.get_config()
    cfg.update_from_flattened_dict({"init_from": tiny_trained_run, "data.tokenizer": tokenizer_path,
                                    "batch_size": 8, "grad_accum_steps": 2, "num_steps": 30})
    spec = run_lib.resolve(cfg, devices=jax.devices()[:4])
    assert spec.mesh.size == 4 and spec.rules == sharding.rules_preset("fsdp")
    assert isinstance(spec.init_from, loading.Checkpoint) and spec.init_from.format == "jax"
    assert spec.recipe.init_from is spec.init_from  # the recipe reads the opened handle
    assert loading.checkpoint_config(spec.init_from) is spec.init_from.config
    assert spec.model_cfg.architecture() == spec.init_from.config.architecture()
    assert spec.model_cfg.platform == "cpu"
    assert (spec.data.micro_batch_size, spec.data.tokens_per_step) == (4, 8 * 64)
    assert spec.flops_per_step == flops.flops_per_token(spec.model_cfg, 64) * 8 * 64
    assert spec.schedule(30) == pytest.approx(cfg.optimizer.learning_rate * cfg.optimizer.min_lr_ratio)


# ------------------------------------------------------------------------------- one FLOP count
def test_one_flop_count_and_one_peak_table():
    assert metrics.flops_per_token is flops.flops_per_token and metrics.peak_flops is flops.peak_flops
    assert not hasattr(aot, "model_flops_per_step")
    for gen, chip in roofline.CHIPS.items():
        assert flops.CHIPS[gen] is chip
    kinds = {"TPU v5": "v5p", "TPU v5 lite": "v5e", "TPU v6 lite": "v6e", "TPU v4": "v4",
             "NVIDIA H100 80GB HBM3": "H100", "NVIDIA H100 PCIe": "H100 PCIe", "NVIDIA H100 NVL": "H100 NVL"}
    for kind, chip in kinds.items():
        assert flops.chip_of(type("D", (), {"device_kind": kind, "platform": "tpu"})()) == chip
    assert flops.chip_of(jax.devices()[0]) is None  # CPU: a measured peak
    devs = [type("D", (), {"device_kind": "TPU v5", "platform": "tpu"})()] * 4
    assert flops.peak_flops(0.0, devs) == (4 * 459e12, "datasheet v5p x 4")


@pytest.mark.slow
def test_dry_run_and_aot_report_the_same_flops_and_mfu(tmp_path, tokenizer_path):
    assert aot.libtpu_available(), "libtpu is missing. Fix: pip install -e '.[test]' (or '.[tpu]')"
    cfg = tiny.get_config()
    cfg.update_from_flattened_dict({"data.seq_len": 128, "data.tokenizer": tokenizer_path, "batch_size": 8})
    devices = aot.topology_devices(aot.parse_topology("v5p-8"))
    by_aot = aot.compile_train_step(cfg, devices)
    by_dry_run = dry_run_lib.dry_run(cfg, str(tmp_path / "w"), devices=devices)
    assert not os.path.exists(tmp_path / "w")
    flops_per_step = flops.flops_per_step(ModelConfig.tiny(), 8, 128)
    assert by_aot["model_flops_per_step"] == by_dry_run["model_flops_per_step"] == flops_per_step
    assert by_aot["model_flops_per_chip"] == by_dry_run["model_flops_per_chip"] == flops_per_step / 4
    assert by_aot["roofline"]["generation"] == "v5p" and 0 < by_aot["roofline"]["mfu"] <= 1
    assert by_dry_run["roofline"]["mfu"] == by_aot["roofline"]["mfu"]
    assert by_dry_run["roofline"]["step_s"] == by_aot["roofline"]["step_s"]
    text = dry_run_lib.format_dry_run(by_dry_run)
    mfu = re.search(r"MFU <= (\d+%)", text).group(1)
    assert mfu in aot.format_report({**by_aot, "hbm": 95 * aot.GiB, "fits": True}, "tiny")
    assert "packed this process's 8 x 128 rows" in by_dry_run["data"]  # the dry run also reads the data


# --------------------------------------------------------------------------------------- quiet logs
@pytest.mark.slow
def test_train_py_stderr_is_quiet(tmp_path, tokenizer_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env.pop("MISTRAL_JAX_DEBUG", None)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/tiny.py"),
           f"--workdir={tmp_path / 'run'}", "--config.num_steps=2", "--config.optimizer.warmup_steps=0",
           "--config.eval_every=0", f"--config.data.tokenizer={tokenizer_path}", "--config.progress_bar=false"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    glog = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d", re.M)  # absl / glog: I1205 12:00:00.123 ...
    assert not glog.search(proc.stderr), proc.stderr[:2000]
    assert "->" not in proc.stderr and "rules" not in proc.stderr, proc.stderr[:2000]  # the sharding rules dump
    assert len(proc.stderr.splitlines()) <= 3, proc.stderr[:2000]  # a few plain lines: FLOPs and peak, parameters
    assert "train: done at step 2/2" in proc.stdout
    # the set-up is still there for who asks for it
    verbose = subprocess.run(cmd[:4] + [f"--workdir={tmp_path / 'verbose'}"] + cmd[5:] + ["--verbose"], env=env,
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert verbose.returncode == 0, verbose.stderr[-2000:]
    assert re.search(r"rules auto: .*embed->", verbose.stderr), verbose.stderr[-2000:]


# ------------------------------------------------------------------- tools that start from a checkpoint
@pytest.mark.heavy  # the shared trained run (13 s to train): the fast tier
def test_resolve_checkpoint_gives_the_tools_mesh_rules_and_model_config(tiny_trained_run, monkeypatch):
    spec = run_lib.resolve_checkpoint(tiny_trained_run, mesh="auto")  # eval's mesh: FSDP when dim divides
    assert dict(spec.mesh.shape)["fsdp"] == 8 and spec.rules == sharding.rules_preset("fsdp")
    assert spec.model_cfg == spec.checkpoint.config.replace(platform="cpu")
    wide = run_lib.resolve_checkpoint(spec.checkpoint, mesh="auto", devices=jax.devices()[:3])  # 64 % 3: replicas
    assert dict(wide.mesh.shape)["data"] == 3 and wide.checkpoint is spec.checkpoint
    one = run_lib.resolve_checkpoint(tiny_trained_run, mesh={"data": 2, "fsdp": -1}, dtype="bfloat16")
    assert dict(one.mesh.shape) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1, "expert": 1}
    assert one.model_cfg.dtype == "bfloat16"
    assert run_lib.resolve_checkpoint(tiny_trained_run).mesh is None  # generate: one device
    with pytest.raises(run_lib.MeshConfigError, match="mesh.data=3.*8 devices are not divisible by 3"):
        run_lib.resolve_checkpoint(tiny_trained_run, mesh={"data": 3, "fsdp": -1})
    # the checkpoint tools' loader (generate, serve) opens the checkpoint once
    from argparse import Namespace

    from mistral_jax import cli

    opened = []
    orig = loading.open_checkpoint
    monkeypatch.setattr(loading, "open_checkpoint", lambda p: opened.append(p) or orig(p))
    monkeypatch.setattr(loading, "formats_of", lambda p, _f=loading.formats_of: opened.append("probe") or _f(p))
    tok, model = cli.load_checkpoint(Namespace(checkpoint=tiny_trained_run, dtype=None),
                                     os.path.join(tiny_trained_run, "tokenizer.model"))
    assert model.cfg == spec.model_cfg and tok.vocab_size == 512
    assert [p for p in opened if not isinstance(p, loading.Checkpoint)] == [tiny_trained_run, "probe"]
