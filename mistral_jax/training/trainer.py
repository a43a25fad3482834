"""The pretraining loop behind ``train.py``: config checks, data, sharded state, checkpoints, metrics, preemption.

Workdir layout (read by ``load_pretrained``, eval and generate)::

    {workdir}/run_config.json      the run ConfigDict
    {workdir}/model_config.json    ModelConfig.to_dict()
    {workdir}/tokenizer.model      the sentencepiece model used (trained by the run if data.tokenizer == "")
    {workdir}/checkpoints/<step>/  params, opt_state, data_state, meta (training.checkpoint)
    {workdir}/metrics.jsonl        one JSON object per logged step (train and "eval/" metrics)
    {workdir}/tb/                  TensorBoard events
    {workdir}/.lock                pid + host of the run using the workdir (process 0), removed on exit
    {workdir}/corrupt_checkpoints/ steps that could not be read back (moved here, never deleted)
    {workdir}/archive/<time>/      earlier runs moved aside by ``checkpoint.reset`` (never deleted)

Nothing is destroyed by accident: a config that cannot continue the workdir's run (its checkpoints hold another
tree / shapes / dtypes, or its model_config.json or tokenizer differ) fails before anything is written, naming the
fields and the fix; ``resume=False`` on a workdir holding a run fails unless ``checkpoint.reset`` archives it; a
failed checkpoint save stops the run at the next step naming the newest intact checkpoint.

Fault handling: SIGTERM / SIGINT finish the current step, save a checkpoint, wait for it and exit with
``128 + signal`` (so schedulers requeue); a rerun with the same workdir resumes bit-exactly (params, optimizer,
data position). A non-finite loss or gradient never reaches the params (``training.step``); with
``nan_policy="stop"`` the run raises ``FloatingPointError`` without saving that step, with ``"skip"`` it
counts the skipped update (``skipped_steps`` metric) and continues.

Several processes (``distributed.initialize()``, called by ``train.py`` before any device use): every process
runs this same loop on its share of the data (rows ``process_index::process_count``) and takes part in every
Orbax save and restore; only process 0 holds the lock, writes ``run_config.json`` / ``model_config.json`` /
``metrics.jsonl`` / TensorBoard and shows the progress bar. A signal that reaches only some processes stops all
of them at the same step: each step the processes agree on the signals seen (a 4-byte all-gather, skipped with
one process), save that step and exit with ``128 + signal`` together. The checkpoint's ``data_state`` holds every
process's data position (``{"process_count", "processes": [...]}``), so a resumed run continues each process's
stream exactly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import signal
import time
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from mistral_jax import distributed, sharding
from mistral_jax.config import ModelConfig
from mistral_jax.data import pipeline
from mistral_jax.data import tokenizer as tokenizer_lib
from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.data.train_tokenizer import VocabularyTooSmall, train_tokenizer
from mistral_jax.training import sft
from mistral_jax.training import step as step_lib
from mistral_jax.training.checkpoint import (
    ARCHIVE_DIR,
    Checkpointer,
    CheckpointMismatch,
    WorkdirBusy,
    WorkdirLock,
    archive_run,
)
from mistral_jax.training.metrics import MetricsWriter, flops_per_token, peak_flops
from mistral_jax.training.optimizer import check_config as check_optimizer_config
from mistral_jax.training.optimizer import make_optimizer

log = logging.getLogger(__name__)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


class ConfigError(ValueError):
    """A run config that cannot work (the message names the field, its value and the fix)."""


class RunMismatch(ConfigError):
    """The workdir holds a run this config cannot continue (different model, optimizer, tokenizer...)."""



# --------------------------------------------------------------------------- config
def load_config_file(path: str) -> ConfigDict:
    """``get_config()`` of a config file (as ``config_flags`` does)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist. Fix: use one of {sorted(os.listdir(CONFIG_DIR))}.")
    spec = importlib.util.spec_from_file_location(f"_run_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def base_config() -> ConfigDict:
    """``configs/base.py``'s defaults: the schema every run config must fit."""
    return load_config_file(os.path.join(CONFIG_DIR, "base.py"))


def _unknown_keys(cfg: Any, schema: Any, prefix: str = "config") -> list[str]:
    out = []
    for k in cfg.keys():
        if k not in schema:
            out.append(f"{prefix}.{k}={cfg[k]!r} (known fields of {prefix}: {sorted(schema.keys())})")
        elif isinstance(cfg[k], ConfigDict) and isinstance(schema[k], ConfigDict):
            out += _unknown_keys(cfg[k], schema[k], f"{prefix}.{k}")
    return out


def check_cli_overrides(argv: list[str], config_path: str | None = None) -> None:
    """Fail clearly on ``--config.a.b=v`` naming a field the config lacks (before absl's own traceback)."""
    config_path = config_path or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_path is None and "--config" in argv and argv.index("--config") + 1 < len(argv):
        config_path = argv[argv.index("--config") + 1]
    if config_path is None:
        return
    cfg = load_config_file(config_path.split(":")[0])
    for arg in argv:
        m = re.match(r"--config\.([\w.]+)(=(.*))?$", arg)
        if not m:
            continue
        node, parts = cfg, m.group(1).split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ConfigDict) or part not in node:
                where = "config." + ".".join(parts[:i]) if i else "config"
                known = sorted(node.keys()) if isinstance(node, ConfigDict) else []
                raise ConfigError(f"unknown config field config.{m.group(1)} (value {m.group(3)!r}): {where} has no "
                                  f"field {part!r}. Fix: use one of {known}.")
            node = node[part]


def model_config_from(model: Any) -> ModelConfig:
    """``config.model`` (preset name + overrides, None = preset value) -> a validated ``ModelConfig``.

    ``sliding_window <= 0`` means no window (None cannot be told apart from "keep the preset").
    """
    d = dict(model.to_dict() if hasattr(model, "to_dict") else model)
    preset = d.pop("preset", "") or ""
    overrides = {k: v for k, v in d.items() if v is not None}
    if "sliding_window" in overrides and overrides["sliding_window"] <= 0:
        overrides["sliding_window"] = None
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"config.model has unknown field(s) {unknown}. Fix: use ModelConfig fields {sorted(names)}.")
    try:
        return ModelConfig.preset(preset, **overrides) if preset else ModelConfig(**overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.model (preset={preset!r}, overrides={overrides}): {e}") from e


def mesh_sizes(mesh_cfg: Any, n_devices: int, n_slices: int = 1) -> dict[str, int]:
    """The mesh axis sizes of ``config.mesh`` on ``n_devices`` devices (one -1 fills), or ConfigError."""
    dcn = (mesh_cfg.get("dcn_data", 1), mesh_cfg.get("dcn_fsdp", 1))
    if n_slices > 1 or dcn != (1, 1):  # multi-slice: mesh.{data,...} lay out one slice, dcn_* the slices
        try:
            return sharding.mesh_shape(mesh_cfg, n_devices, n_slices)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config.mesh: {e}") from None
    sizes = {a: mesh_cfg[a] for a in sharding.MESH_AXES}
    shown = ", ".join(f"mesh.{k}={v}" for k, v in sizes.items())
    for k, v in sizes.items():
        if not isinstance(v, int) or (v < 1 and v != -1):
            raise ConfigError(f"config.mesh.{k}={v!r} must be a positive integer or -1 (fill). Fix: set mesh.{k}.")
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ConfigError(f"config.mesh: {shown}: only one axis may be -1. Fix: give all but one size explicitly.")
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if n_devices % known:
            raise ConfigError(f"config.mesh: {shown}: {n_devices} devices are not divisible by {known}. "
                              f"Fix: choose sizes whose product divides {n_devices}.")
        sizes[fill[0]] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise ConfigError(f"config.mesh: {shown} needs {math.prod(sizes.values())} devices but there are {n_devices}. "
                          "Fix: make the product equal the device count or set one axis to -1.")
    return sizes


def rules_from(cfg: ConfigDict) -> sharding.ShardingRules:
    """``config.mesh.rules``: a preset name or ``auto`` (the preset matching the mesh: EP, TP or FSDP)."""
    name = cfg.mesh.rules
    if name != "auto" and name not in sharding.RULE_PRESETS:
        raise ConfigError(f"config.mesh.rules={name!r} is unknown. "
                          f"Fix: use auto or one of {sorted(sharding.RULE_PRESETS)}.")
    return sharding.rules_from_config(cfg.mesh)


def validate_config(cfg: ConfigDict, n_devices: int | None = None, process_count: int | None = None,
                    schema: ConfigDict | None = None, n_slices: int | None = None) -> ModelConfig:
    """Check the run config before anything is compiled; returns its ModelConfig. Raises ``ConfigError``."""
    schema = base_config() if schema is None else schema
    unknown = _unknown_keys(cfg, schema)
    if unknown:
        raise ConfigError("unknown config field(s): " + "; ".join(unknown) + ". Fix: remove or rename them.")
    n_devices = jax.device_count() if n_devices is None else n_devices
    process_count = jax.process_count() if process_count is None else process_count
    model_cfg = model_config_from(cfg.model)
    if cfg.remat:
        model_cfg = model_config_from({**cfg.model.to_dict(), "remat": cfg.remat})
    for name in ("num_steps", "batch_size", "grad_accum_steps", "log_every"):
        if not isinstance(cfg[name], int) or cfg[name] < 1:
            raise ConfigError(f"config.{name}={cfg[name]!r} must be an integer >= 1. Fix: set --config.{name}.")
    sizes = mesh_sizes(cfg.mesh, n_devices, sharding.num_slices() if n_slices is None else n_slices)
    rules = rules_from(cfg)
    batch_axes = rules.mesh_axes("batch")
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    dp = math.prod(sizes[a] for a in batch_axes)
    b, acc = cfg.batch_size, cfg.grad_accum_steps
    if b % acc:
        raise ConfigError(f"config.batch_size={b} is not divisible by config.grad_accum_steps={acc}. "
                          "Fix: make batch_size a multiple of grad_accum_steps.")
    if (b // acc) % dp:
        axes = " x ".join(f"mesh.{a}={sizes[a]}" for a in batch_axes)
        raise ConfigError(f"config.batch_size={b} (micro-batch {b // acc} with grad_accum_steps={acc}) is not divisible"
                          f" by the data-parallel size {dp} = {axes}. "
                          f"Fix: use a batch_size that is a multiple of {dp * acc}, or change the mesh.")
    if b % process_count:
        raise ConfigError(f"config.batch_size={b} is not divisible by the {process_count} processes. "
                          "Fix: use a multiple of the process count.")
    if cfg.data.seq_len < 2 or cfg.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"config.data.seq_len={cfg.data.seq_len} must be in [2, model max_seq_len="
                          f"{model_cfg.max_seq_len}]. Fix: lower seq_len or raise model.max_seq_len.")
    if cfg.nan_policy not in ("stop", "skip"):
        raise ConfigError(f"config.nan_policy={cfg.nan_policy!r}. Fix: use 'stop' or 'skip'.")
    if cfg.data.on_decode_error not in pipeline.DECODE_POLICIES:
        raise ConfigError(f"config.data.on_decode_error={cfg.data.on_decode_error!r}. "
                          f"Fix: use one of {pipeline.DECODE_POLICIES}.")
    try:
        check_optimizer_config(cfg.optimizer, cfg.num_steps)
        make_optimizer(cfg.optimizer, cfg.num_steps)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if cfg.checkpoint.every_steps < 1 or cfg.checkpoint.keep < 1:
        raise ConfigError(f"config.checkpoint.every_steps={cfg.checkpoint.every_steps}, keep={cfg.checkpoint.keep}: "
                          "both must be >= 1.")
    return model_cfg


def check_processes(cfg: ConfigDict, workdir: str, process_count: int) -> None:
    """Checks of a run of ``process_count`` processes that need no device: raise ``ConfigError`` before
    ``jax.distributed`` starts (each process would otherwise train its own, different, tokenizer)."""
    if process_count <= 1 or cfg.data.tokenizer or sft.init_from(cfg) or sft.is_chat(cfg):
        return
    if os.path.isfile(os.path.join(workdir, Tokenizer.FILENAME)):  # a resumed run keeps the tokenizer it trained
        return
    raise ConfigError(
        f"config.data.tokenizer='' asks the run to train a tokenizer, which a run of {process_count} processes "
        "cannot do (each process would train its own). Fix: pass --config.data.tokenizer=PATH (a sentencepiece "
        ".model, e.g. trained once with mistral_jax.data.train_tokenizer, or the tokenizer.model of a single-process"
        " run) or a named Mistral tokenizer such as --config.data.tokenizer=mistral:v1.")


def resolve_mesh(cfg: ConfigDict) -> tuple[Any, sharding.ShardingRules]:
    """``(mesh, rules)`` of ``config.mesh`` on every global device; process 0 logs the shape and the rules."""
    rules = rules_from(cfg)
    mesh = sharding.mesh_from_config(cfg.mesh)  # DCN axes too: data / fsdp across TPU slices
    if jax.process_index() == 0:
        log.info("mesh %s over %d devices (%d processes); rules %s: %s",
                 " x ".join(f"{k}={v}" for k, v in mesh.shape.items()), mesh.size, jax.process_count(),
                 cfg.mesh.rules, _describe_rules(rules))
    return mesh, rules


def _describe_rules(rules: sharding.ShardingRules) -> str:
    return ", ".join(f"{k}->{v}" for k, v in rules.rules.items() if v)


# --------------------------------------------------------------------------- helpers
def _tokenizer(cfg: ConfigDict, workdir: str, model_cfg: ModelConfig) -> Tokenizer:
    dest = os.path.join(workdir, Tokenizer.FILENAME)
    if cfg.data.tokenizer:
        tok = Tokenizer(cfg.data.tokenizer)
        if jax.process_index() == 0 and os.path.abspath(tok.path) != os.path.abspath(dest):
            shutil.copyfile(tok.path, dest)
        return tok
    if os.path.isfile(dest):  # a resumed run keeps the tokenizer it trained
        return Tokenizer(dest)
    if jax.process_count() > 1:
        raise ConfigError("config.data.tokenizer='' (train one) is single-process only. "
                          "Fix: train it first (python -m mistral_jax.data.train_tokenizer) and set data.tokenizer.")
    vocab = cfg.data.tokenizer_vocab_size
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1 or vocab > model_cfg.vocab_size:
        raise ConfigError(f"config.data.tokenizer_vocab_size={vocab!r} must be an integer in [1, config.model."
                          f"vocab_size={model_cfg.vocab_size}] (the model embeds every piece). Fix: set "
                          f"--config.data.tokenizer_vocab_size={model_cfg.vocab_size}, or raise "
                          "--config.model.vocab_size as well.")
    texts = pipeline.load_texts(cfg.data.train, cfg.data.text_field, cfg.data.on_decode_error)
    log.info("training a %d-piece sentencepiece tokenizer on %d documents of %s", vocab, len(texts), cfg.data.train)
    try:
        train_tokenizer(texts, dest, vocab)
    except VocabularyTooSmall as e:
        raise ConfigError(
            f"config.data.tokenizer_vocab_size={vocab}: {e} (config.data.train={cfg.data.train!r}). Fix: set "
            f"--config.data.tokenizer_vocab_size={e.needed} --config.model.vocab_size={e.needed} (or larger;"
            " model.vocab_size must be >= the tokenizer's), or pass a trained tokenizer with "
            "--config.data.tokenizer=PATH.") from None
    return Tokenizer(dest)


def _global_batch(local: dict[str, np.ndarray], bsharding) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(bsharding, local[k]) for k in step_lib.BATCH_KEYS}


def _process_rows(bsharding, batch_size: int) -> list[int]:
    """The global batch rows this process holds (and so reads), from the batch sharding."""
    index = bsharding.addressable_devices_indices_map((batch_size, 1))
    return sorted({r for sl in index.values() for r in range(*sl[0].indices(batch_size))})


def _batches(cfg: ConfigDict, source, tok: Tokenizer, batch_size: int, *, train: bool, bsharding):
    """This process's rows of every ``batch_size``-row global batch (``RowReaders`` for local files)."""
    if sft.is_chat(cfg):  # issue 8: chat data (source = "train" / "validation"), see data/chat.py
        return sft.batches(cfg, source, tok, batch_size, train=train)
    if isinstance(source, pipeline.LocalSource):  # the same global batches on any number of processes
        return pipeline.RowReaders(source, tok, cfg.data.seq_len, _process_rows(bsharding, batch_size), batch_size,
                                   seed=cfg.seed, shuffle=cfg.data.shuffle and train, add_bos=cfg.data.add_bos,
                                   add_eos=cfg.data.add_eos, loop=train)
    return pipeline.PackedBatches(
        source, tok, cfg.data.seq_len, batch_size // jax.process_count(), seed=cfg.seed,
        shuffle=cfg.data.shuffle and train, add_bos=cfg.data.add_bos, add_eos=cfg.data.add_eos, loop=train,
        process_index=jax.process_index(), process_count=jax.process_count())


def _saved_data_state(local: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``data_state``: every process's position. ``RowReaders`` states merge into one (resumable
    on any process count); other streams (hub datasets, chat) are kept per process."""
    if jax.process_count() == 1:
        return local
    states = distributed.allgather_json(local)
    if all("rows" in st for st in states):
        return pipeline.merge_row_states(states)
    return {"process_count": jax.process_count(), "processes": states}


def _local_data_state(saved: dict[str, Any]) -> dict[str, Any]:
    """This process's data position from a checkpoint's ``data_state`` (see ``_saved_data_state``)."""
    if "processes" not in saved:
        if jax.process_count() > 1:
            log.warning("the checkpoint holds one data position (a run of 1 process) for %d processes: each "
                        "process resumes from it, so the data order differs from an uninterrupted run.",
                        jax.process_count())
        return saved
    per = saved["processes"]
    if len(per) != jax.process_count():
        log.warning("the checkpoint holds the data positions of %d processes, this run has %d: the data order "
                    "differs from an uninterrupted run.", len(per), jax.process_count())
    return per[jax.process_index() % len(per)]


class _Preemption:
    """Records SIGTERM / SIGINT; the loop saves and exits at the next step boundary."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handler (tests calling train() from a thread)
                pass
        return self

    def _handle(self, signum, _frame):
        log.warning("received signal %d: saving a checkpoint after the current step, then exiting.", signum)
        self.signum = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))  # a second signal acts at once

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def evaluate(cfg: ConfigDict, eval_fn, params, source, tok: Tokenizer, bsharding) -> dict[str, float]:
    """Held-out token loss over ``cfg.eval_steps`` batches of the validation split (from its start)."""
    micro = cfg.batch_size // cfg.grad_accum_steps
    it = _batches(cfg, source, tok, micro, train=False, bsharding=bsharding)
    rows = len(_process_rows(bsharding, micro)) if isinstance(it, pipeline.RowReaders) else micro // jax.process_count()
    ce, n = 0.0, 0.0
    for _ in range(cfg.eval_steps):
        local = next(it, None)
        local = local if local is not None else pipeline.empty_batch(rows, cfg.data.seq_len)
        out = eval_fn(params, _global_batch(local, bsharding))
        ce, n = ce + float(out["ce_sum"]), n + float(out["tokens"])
    loss = ce / max(n, 1.0)
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "tokens": n}


# --------------------------------------------------------------------------- the workdir's run
RUN_FILES = ("run_config.json", "metrics.jsonl")  # with checkpoints: a workdir holding these holds a run
# config fields that shape the train state or its meaning; a resumed run must keep them (the others may change)
STATE_FIELDS = ("model.", "optimizer.", "lora.", "init_from", "remat", "data.tokenizer", "data.format")
# ModelConfig fields a resumed run may change: how it is computed, not what it is (and the init scale, used once)
MAY_CHANGE_ON_RESUME = (*sft.NUMERICS, "initializer_range")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _as_json(cfg: ConfigDict) -> dict[str, Any]:
    return json.loads(cfg.to_json_best_effort())


def previous_run(workdir: str) -> dict[str, Any]:
    """What a workdir holds: ``{"steps": finished checkpoint steps, "files": run files, "holds_run": bool}``."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) if os.path.isdir(ckpt_dir) else []
    files = [n for n in RUN_FILES if os.path.isfile(os.path.join(workdir, n))]
    return {"steps": steps, "files": files, "holds_run": bool(steps or files)}


def _describe(prev: dict[str, Any]) -> str:
    parts = []
    if prev["steps"]:
        parts.append(f"checkpoints at steps {prev['steps']}")
    parts += prev["files"]
    return ", ".join(parts) or "no run files"


def config_differences(saved: dict[str, Any], cfg: ConfigDict) -> list[tuple[str, Any, Any]]:
    """``[(dotted field, saved value, current value)]`` between a saved ``run_config.json`` and ``cfg``."""
    old, now = _flat(saved), _flat(_as_json(cfg))
    missing = object()
    return [(k, old.get(k, missing), now.get(k, missing)) for k in sorted(set(old) | set(now))
            if old.get(k, missing) != now.get(k, missing) and not k.startswith("checkpoint.")]


def _flag(key: str, value: Any) -> str:
    if value is None:
        return f"drop --config.{key}"
    if isinstance(value, bool):
        return f"--config.{key}={str(value).lower()}"
    return f"--config.{key}={value}"


def _identity_differences(cfg: ConfigDict, model_cfg: ModelConfig, workdir: str) -> list[str]:
    """Read-only comparison of a resumed workdir's ``model_config.json`` and ``tokenizer.model`` with ``cfg``."""
    out = []
    saved = _read_json(os.path.join(workdir, "model_config.json"))
    if isinstance(saved, dict):
        now = model_cfg.to_dict()
        for k in sorted(set(saved) | set(now)):
            if k not in MAY_CHANGE_ON_RESUME and saved.get(k) != now.get(k):
                out.append(f"model_config.json: {k}={saved.get(k)!r} saved, {now.get(k)!r} now")
    src = _tokenizer_source(cfg)
    dest = os.path.join(workdir, Tokenizer.FILENAME)
    if src and os.path.isfile(src) and os.path.isfile(dest) and os.path.abspath(src) != dest:
        with open(src, "rb") as a, open(dest, "rb") as b:
            if a.read() != b.read():
                out.append(f"the tokenizer {src} differs from the run's {dest}")
    return out


def _tokenizer_source(cfg: ConfigDict) -> str | None:
    """The sentencepiece file this config reads (``data.tokenizer`` or ``init_from``'s), or None (the run's own)."""
    if cfg.data.tokenizer:
        try:  # a named tokenizer (mistral:v1) compares as its file
            return tokenizer_lib.resolve(cfg.data.tokenizer)
        except ValueError:
            return cfg.data.tokenizer
    if sft.init_from(cfg):
        from mistral_jax import loading

        try:
            return loading.tokenizer_path(sft.init_from(cfg), loading.detect_format(sft.init_from(cfg)))
        except (OSError, ValueError):
            return None
    return None


def _layout_reason(e: CheckpointMismatch) -> str:
    more = f"; {len(e.differences) - 3} more" if len(e.differences) > 3 else ""
    return f"checkpoint step {e.step} holds a different train state ({'; '.join(e.differences[:3])}{more})"


def _mismatch(workdir: str, prev: dict[str, Any], reasons: list[str], cfg: ConfigDict) -> RunMismatch:
    saved = _read_json(os.path.join(workdir, "run_config.json"))
    diffs = [d for d in config_differences(saved, cfg) if d[0].startswith(STATE_FIELDS)] if saved else []
    shown = "; ".join(reasons[:6]) + (f"; ... ({len(reasons) - 6} more)" if len(reasons) > 6 else "")
    if diffs:
        changed = ", ".join(f"{k}={old!r} saved, {new!r} now" for k, old, new in diffs[:8])
        how = "rerun with the saved values (" + " ".join(_flag(k, old) for k, old, _ in diffs[:8]) + ")"
        changed = f" Config fields that differ from its run_config.json: {changed}."
    else:
        changed, how = "", f"rerun with the config in {os.path.join(workdir, 'run_config.json')}"
    return RunMismatch(
        f"workdir {workdir} holds a run ({_describe(prev)}) that this config cannot continue: {shown}.{changed} "
        f"Nothing in {workdir} was changed. Fix: {how}, or pass another --workdir, or pass "
        f"--config.checkpoint.reset=true to move the old run (checkpoints and configs) to "
        f"{os.path.join(workdir, ARCHIVE_DIR)}/<time>/ and start over.")


def _start_over_or_resume(cfg: ConfigDict, workdir: str, prev: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Apply ``checkpoint.resume`` / ``checkpoint.reset`` to a workdir's previous run: ``(resume, prev)``.

    ``reset`` archives the previous run (moved, never deleted), except when that run was started by this very
    config (a requeued job re-running its command): then it resumes. ``resume=False`` on a workdir holding a run
    without ``reset`` is a ``ConfigError``: a new run would mix with the old one.
    """
    resume, reset = bool(cfg.checkpoint.resume), bool(cfg.checkpoint.reset)
    if not prev["holds_run"]:
        return resume, prev
    if reset:
        if _read_json(os.path.join(workdir, "run_config.json")) == _as_json(cfg):
            log.warning("config.checkpoint.reset=True, but %s holds the run this same config started (a requeued "
                        "job): resuming it. To start over again, pass another --workdir.", workdir)
            return True, prev
        dest = archive_run(workdir) if jax.process_index() == 0 else None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("mistral_jax.archive_run")
        log.warning("config.checkpoint.reset=True: moved the previous run in %s (%s) to %s; starting over at step 0.",
                    workdir, _describe(prev), dest)
        return resume, previous_run(workdir)
    if not resume:
        raise ConfigError(
            f"config.checkpoint.resume=False, but workdir {workdir} holds a run ({_describe(prev)}); a new run would "
            f"mix with it (its saves skipped, its run_config.json overwritten). Nothing in {workdir} was changed. "
            "Fix: drop --config.checkpoint.resume=false to resume that run, or pass another --workdir, or pass "
            f"--config.checkpoint.reset=true to move the old run to {os.path.join(workdir, ARCHIVE_DIR)}/<time>/ and "
            "start over.")
    return resume, prev


# --------------------------------------------------------------------------- dry run
def dry_run(cfg: ConfigDict, workdir: str) -> dict[str, Any]:
    """Everything a run does before its first step, without training or writing anything.

    Validates the config, resolves the mesh on the real global devices, opens the data (and packs one batch
    when the tokenizer is known: ``data.tokenizer``, ``init_from``'s, or the workdir's), builds the abstract
    train state (no allocation), compiles the train step on abstract inputs and reports the per-device memory
    of the compiled program (``aot.memory_report``) and the model FLOPs per step (``metrics.flops_per_token``,
    the numerator of the MFU the run logs). Nothing is created in ``workdir``; nothing is locked.

    Returns:
      ``aot.memory_report``'s dict (bytes per device) plus ``mesh``, ``rules``, ``processes``, ``devices``,
      ``model_flops_per_step`` (all devices), ``model_flops_per_device``, ``data`` (what was checked) and
      ``workdir`` (what a real run would do there).
    """
    from mistral_jax import aot

    model_cfg = sft.model_config(cfg, validate_config(cfg))
    workdir = os.path.abspath(workdir)
    mesh, rules = resolve_mesh(cfg)
    data = _dry_run_data(cfg, workdir, step_lib.batch_sharding(mesh, rules))
    tx, schedule = make_optimizer(cfg.optimizer, cfg.num_steps)
    if sft.custom_state(cfg):
        graphdef, abstract_state, shardings, _ = sft.train_state(cfg, model_cfg, mesh, rules)
    else:
        graphdef, abstract_state, shardings = step_lib.make_train_state(model_cfg, cfg, mesh, rules, abstract=True)
    batch = step_lib.abstract_batch(cfg.batch_size, cfg.data.seq_len, mesh, rules)
    fn = step_lib.jit_train_step(graphdef, tx, shardings, mesh, rules, grad_accum_steps=cfg.grad_accum_steps,
                                 schedule=schedule)
    t0 = time.perf_counter()
    with sharding.use_mesh(mesh, rules):
        compiled = fn.lower(abstract_state, batch).compile()
    report = aot.memory_report(compiled)
    flops = flops_per_token(model_cfg, cfg.data.seq_len) * cfg.batch_size * cfg.data.seq_len
    prev = previous_run(workdir) if os.path.isdir(workdir) else {"steps": [], "holds_run": False}
    report.update(mesh={k: int(v) for k, v in mesh.shape.items()}, rules=cfg.mesh.rules,
                  processes=jax.process_count(), devices=jax.device_count(), compile_s=time.perf_counter() - t0,
                  model_flops_per_step=flops, model_flops_per_device=flops / jax.device_count(), data=data,
                  workdir=(f"would resume {workdir} from step {prev['steps'][-1]}" if prev["steps"] and
                           cfg.checkpoint.resume else f"holds a run ({_describe(prev)})" if prev["holds_run"]
                           else f"would start a new run in {workdir}"))
    return report


def _dry_run_data(cfg: ConfigDict, workdir: str, bsharding) -> str:
    """Open the training data (and pack one batch of this process when the tokenizer is known): what was done."""
    path = _tokenizer_source(cfg) or os.path.join(workdir, Tokenizer.FILENAME)
    tok = Tokenizer(path) if _tokenizer_source(cfg) or os.path.isfile(path) else None  # as the run would
    if sft.is_chat(cfg):
        if tok is None:
            return "chat data not read (no tokenizer yet)"
        source = "train"
    else:
        source = pipeline.open_source(cfg.data.train, split=cfg.data.train_split, hub_config=cfg.data.hub_config,
                                      text_field=cfg.data.text_field, on_decode_error=cfg.data.on_decode_error,
                                      shuffle_buffer=cfg.data.shuffle_buffer)
        if tok is None:
            return f"opened {cfg.data.train} (no tokenizer yet: a real run trains one; no batch packed)"
    local = next(_batches(cfg, source, tok, cfg.batch_size, train=True, bsharding=bsharding))
    return (f"opened {cfg.data.train}; packed this process's {local['tokens'].shape[0]} x {local['tokens'].shape[1]}"
            f" rows ({int(local['weights'].sum())} target tokens) with {tok.path}")


def format_dry_run(r: dict[str, Any]) -> str:
    """The dry run's report, a few lines."""
    def gib(x: float) -> str:
        unit = next((u for u in ("GiB", "MiB", "KiB") if x >= 1024 ** (3 - ("GiB", "MiB", "KiB").index(u))), "B")
        return f"{x / 1024 ** (3 - ('GiB', 'MiB', 'KiB', 'B').index(unit)):.2f} {unit}"

    return "\n".join([
        f"dry run: mesh {r['mesh']} over {r['devices']} devices ({r['processes']} processes), rules {r['rules']}",
        f"  data: {r['data']}",
        f"  compiled the train step in {r['compile_s']:.1f} s; per device: arguments {gib(r['arguments'])}, outputs "
        f"{gib(r['outputs'])} (aliased {gib(r['aliased'])}), temporaries {gib(r['temps'])}, total {gib(r['total'])}",
        f"  model FLOPs per step: {r['model_flops_per_step']:.4g} ({r['model_flops_per_device']:.4g} per device); "
        f"XLA cost analysis {r['flops']:.4g} per device (counts a scanned layer once)",
        f"  workdir: {r['workdir']}; nothing written"])


# --------------------------------------------------------------------------- loop
def train(cfg: ConfigDict, workdir: str) -> dict[str, Any]:
    """Run (or resume) the pretraining described by ``cfg`` in ``workdir``.

    Nothing in a workdir is destroyed by accident: the workdir is locked (``{workdir}/.lock``, process 0) so two
    runs cannot share it; a previous run this config cannot continue (``RunMismatch``: model, optimizer or
    tokenizer differ from its checkpoints or configs) fails before anything is written; ``resume=False`` on a
    workdir holding a run fails unless ``checkpoint.reset`` moves the old run to ``{workdir}/archive/<time>/``.

    Args:
      cfg: the run ConfigDict (``configs/*.py``).
      workdir: output directory (created; an existing run there is resumed when ``checkpoint.resume``).

    Returns:
      ``{"status": "done" | "preempted", "step", "signal", "last_metrics", "eval", "checkpoint"}`` (``checkpoint``:
      the newest checkpoint directory, or None).

    Raises:
      ConfigError: a bad config (before anything is written); ``RunMismatch`` for a workdir this config cannot
        continue.
      checkpoint.WorkdirBusy: another live run holds the workdir.
      checkpoint.CheckpointSaveError: a checkpoint save failed (training stops at the next step).
      FloatingPointError: a non-finite loss with ``nan_policy="stop"``.
    """
    model_cfg = sft.model_config(cfg, validate_config(cfg))  # issue 8: init_from's network
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir} is a file, not a directory. Fix: pass a directory (new or a run's).")
    os.makedirs(workdir, exist_ok=True)
    lock, busy = None, None
    if jax.process_index() == 0:  # process 0 owns the workdir; the others wait for its verdict here
        try:
            lock = WorkdirLock(workdir).acquire()
        except WorkdirBusy as e:
            busy = e
    if distributed.any_process(busy is not None):
        raise busy or WorkdirBusy(f"workdir {workdir} is in use by another run (process 0 could not take "
                                  f"{os.path.join(workdir, '.lock')}; its message names the holder). Fix: wait for "
                                  "that run to end, or pass another --workdir.")
    try:
        return _train(cfg, model_cfg, workdir)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: ConfigDict, model_cfg: ModelConfig, workdir: str) -> dict[str, Any]:
    prev = previous_run(workdir)
    resume, prev = _start_over_or_resume(cfg, workdir, prev)
    resuming = resume and bool(prev["steps"])
    if resume and prev["holds_run"] and not prev["steps"]:
        log.warning("%s holds a run without a checkpoint (%s): starting at step 0.", workdir, _describe(prev))
    reasons = _identity_differences(cfg, model_cfg, workdir) if resuming else []

    mesh, rules = resolve_mesh(cfg)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.num_steps)
    if sft.custom_state(cfg):  # issue 8: init_from a checkpoint and/or LoRA adapters (training/sft.py)
        graphdef, abstract_state, shardings, make_state = sft.train_state(cfg, model_cfg, mesh, rules)
    else:
        graphdef, abstract_state, shardings = step_lib.make_train_state(model_cfg, cfg, mesh, rules, abstract=True)
        make_state = lambda: step_lib.make_train_state(model_cfg, cfg, mesh, rules)[1]  # noqa: E731
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=cfg.checkpoint.every_steps,
                        keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    try:
        if resuming:  # read-only: what Orbax wrote (tree, shapes, dtypes) against this config's train state
            try:
                ckpt.check_compatible(abstract_state)
            except CheckpointMismatch as e:
                reasons.append(_layout_reason(e))
            if reasons:
                raise _mismatch(workdir, prev, reasons, cfg)
        tok = sft.tokenizer(cfg, workdir) or _tokenizer(cfg, workdir, model_cfg)  # issue 8: init_from's
        if tok.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but config.model.vocab_size="
                              f"{model_cfg.vocab_size}. Fix: set --config.model.vocab_size={tok.vocab_size} or larger.")
        restored = None
        if resuming:
            try:
                restored = ckpt.restore_latest(abstract_state)
            except CheckpointMismatch as e:
                raise _mismatch(workdir, prev, [_layout_reason(e)], cfg) from e
        distributed.sync("mistral_jax.workdir_read")  # every process has read the workdir before it changes
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "run_config.json"), "w") as f:
                f.write(cfg.to_json_best_effort(indent=2))
            with open(os.path.join(workdir, "model_config.json"), "w") as f:
                json.dump(model_cfg.to_dict(), f, indent=2)
        return _loop(cfg, model_cfg, workdir, tok, ckpt, restored, graphdef, abstract_state, shardings, make_state,
                     mesh, rules, tx, schedule)
    finally:
        ckpt.close()


def _loop(cfg, model_cfg, workdir, tok, ckpt, restored, graphdef, abstract_state, shardings, make_state, mesh, rules,
          tx, schedule) -> dict[str, Any]:
    if sft.is_chat(cfg):  # issue 8: chat conversations are read by data/chat.py
        train_src, eval_src = "train", ("validation" if cfg.data.validation else None)
    else:
        train_src = pipeline.open_source(cfg.data.train, split=cfg.data.train_split, hub_config=cfg.data.hub_config,
                                         text_field=cfg.data.text_field, on_decode_error=cfg.data.on_decode_error,
                                         shuffle_buffer=cfg.data.shuffle_buffer)
        eval_src = None
    if cfg.data.validation and not sft.is_chat(cfg):
        eval_src = pipeline.open_source(cfg.data.validation, split=cfg.data.validation_split,
                                        hub_config=cfg.data.hub_config, text_field=cfg.data.text_field,
                                        on_decode_error=cfg.data.on_decode_error)
    bsharding = step_lib.batch_sharding(mesh, rules)
    data_it = _batches(cfg, train_src, tok, cfg.batch_size, train=True, bsharding=bsharding)
    if restored is not None:
        start, state, data_state, _ = restored
        if "frozen" in abstract_state:  # LoRA checkpoints hold the adapters only: reload the frozen base
            state["frozen"] = make_state()["frozen"]
        data_it.set_state(_local_data_state(data_state))
        log.info("resumed from %s at step %d", ckpt.directory, start)
    else:
        start = 0
        state = make_state()
    meta = {"seed": cfg.seed, "model_config": model_cfg.to_dict()}

    step_fn = step_lib.jit_train_step(graphdef, tx, shardings, mesh, rules, grad_accum_steps=cfg.grad_accum_steps,
                                      schedule=schedule)
    eval_fn = step_lib.jit_eval_step(graphdef, shardings, mesh, rules) if eval_src is not None else None
    flops_tok = flops_per_token(model_cfg, cfg.data.seq_len)
    peak, peak_how = peak_flops(cfg.peak_flops)
    log.info("model FLOPs/token %.3g; peak %.3g FLOP/s (%s)", flops_tok, peak, peak_how)
    writer = MetricsWriter(workdir)

    def newest() -> str | None:
        steps = ckpt.finalized_steps()
        return os.path.join(ckpt.directory, str(steps[-1])) if steps else None

    result: dict[str, Any] = {"status": "done", "step": start, "signal": None, "last_metrics": {}, "eval": None,
                              "checkpoint": None}
    from tqdm import tqdm

    bar = tqdm(total=cfg.num_steps, initial=start, disable=not cfg.progress_bar or jax.process_index() != 0,
               dynamic_ncols=True, desc="train")
    skipped, window_tokens, window_start = 0, 0.0, time.perf_counter()
    try:
        with _Preemption() as preempt, sharding.use_mesh(mesh, rules):
            step = start
            while step < cfg.num_steps:
                ckpt.check(current_step=step)  # a failed background save stops the run here, at the next step
                local = next(data_it)
                data_state = data_it.get_state()
                state, metrics = step_fn(state, _global_batch(local, bsharding))
                step += 1
                stop = distributed.any_process(preempt.signum or 0)  # a signal on any process stops all here
                if int(metrics["nonfinite"]):  # one scalar sync per step: a bad update is caught at once
                    if cfg.nan_policy == "stop":
                        ckpt.wait()
                        raise FloatingPointError(
                            f"non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}, grad_norm="
                            f"{float(metrics['grad_norm'])}); the update was not applied and step {step} was not "
                            f"saved; the newest checkpoint is {max(ckpt.all_steps(), default=None)}. Fix: lower "
                            "optimizer.learning_rate, check the data, or set nan_policy='skip'.")
                    skipped += 1
                    log.warning("non-finite loss at step %d: update skipped (%d so far).", step, skipped)
                window_tokens += float(local["weights"].sum()) * cfg.batch_size / len(local["weights"])  # global
                if step % cfg.log_every == 0 or step == cfg.num_steps or stop:
                    m = jax.device_get(metrics)
                    dt = time.perf_counter() - window_start
                    tps = window_tokens / max(dt, 1e-9)
                    m.update(tokens_per_sec=tps, step_time=dt / max(1, step - result["step"]), skipped_steps=skipped,
                             epoch=data_state["epoch"])
                    if peak:
                        m["mfu"] = tps * flops_tok / peak
                    result["last_metrics"] = writer.write(step, m)
                    result["step"] = step
                    bar.set_postfix(loss=f"{float(m['loss']):.3f}", tok_s=f"{tps:.0f}")
                    window_tokens, window_start = 0.0, time.perf_counter()
                bar.update(1)
                if eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
                    result["eval"] = writer.write(step, evaluate(cfg, eval_fn, sft.eval_params(state), eval_src, tok,
                                                                 bsharding), prefix="eval/")
                force = bool(stop) or step == cfg.num_steps
                if ckpt.due(step, force=force):  # every process's data position goes into the checkpoint
                    ckpt.save(step, state, _saved_data_state(data_state), meta, force=force)
                if stop:
                    ckpt.wait()
                    how = "" if preempt.signum else " (received by another process)"
                    log.warning("preempted by signal %d%s at step %d; checkpoint saved in %s.", stop, how, step,
                                ckpt.directory)
                    result.update(status="preempted", signal=stop, step=step, checkpoint=newest())
                    return result
            result["step"] = step
            if eval_fn is not None and step > start:
                result["eval"] = writer.write(step, evaluate(cfg, eval_fn, sft.eval_params(state), eval_src, tok,
                                                             bsharding), prefix="eval/")
            ckpt.wait()
            result["checkpoint"] = newest()
            return result
    finally:
        bar.close()
        writer.close()
