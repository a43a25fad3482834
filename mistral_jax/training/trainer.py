"""The pretraining loop behind ``train.py``: config checks, data, sharded state, checkpoints, metrics, preemption.

Workdir layout (read by ``load_pretrained``, eval and generate)::

    {workdir}/run_config.json      the run ConfigDict
    {workdir}/model_config.json    ModelConfig.to_dict()
    {workdir}/tokenizer.model      the sentencepiece model used (trained by the run if data.tokenizer == "")
    {workdir}/checkpoints/<step>/  params, opt_state, data_state, meta (training.checkpoint)
    {workdir}/metrics.jsonl        one JSON object per logged step (train and "eval/" metrics)
    {workdir}/tb/                  TensorBoard events

Fault handling: SIGTERM / SIGINT finish the current step, save a checkpoint, wait for it and exit with
``128 + signal`` (so schedulers requeue); a rerun with the same workdir resumes bit-exactly (params, optimizer,
data position). A non-finite loss or gradient never reaches the params (``training.step``); with
``nan_policy="stop"`` the run raises ``FloatingPointError`` without saving that step, with ``"skip"`` it
counts the skipped update (``skipped_steps`` metric) and continues.
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

from mistral_jax import sharding
from mistral_jax.config import ModelConfig
from mistral_jax.data import pipeline
from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.data.train_tokenizer import train_tokenizer
from mistral_jax.training import sft
from mistral_jax.training import step as step_lib
from mistral_jax.training.checkpoint import Checkpointer
from mistral_jax.training.metrics import MetricsWriter, flops_per_token, peak_flops
from mistral_jax.training.optimizer import make_optimizer

log = logging.getLogger(__name__)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


class ConfigError(ValueError):
    """A run config that cannot work (the message names the field, its value and the fix)."""


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


def mesh_sizes(mesh_cfg: Any, n_devices: int) -> dict[str, int]:
    """The mesh axis sizes of ``config.mesh`` on ``n_devices`` devices (one -1 fills), or ConfigError."""
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
                    schema: ConfigDict | None = None) -> ModelConfig:
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
    sizes = mesh_sizes(cfg.mesh, n_devices)
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
        make_optimizer(cfg.optimizer, cfg.num_steps)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if cfg.checkpoint.every_steps < 1 or cfg.checkpoint.keep < 1:
        raise ConfigError(f"config.checkpoint.every_steps={cfg.checkpoint.every_steps}, keep={cfg.checkpoint.keep}: "
                          "both must be >= 1.")
    return model_cfg


# --------------------------------------------------------------------------- helpers
def _tokenizer(cfg: ConfigDict, workdir: str) -> Tokenizer:
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
    texts = pipeline.load_texts(cfg.data.train, cfg.data.text_field, cfg.data.on_decode_error)
    log.info("training a %d-piece sentencepiece tokenizer on %d documents of %s", cfg.data.tokenizer_vocab_size,
             len(texts), cfg.data.train)
    train_tokenizer(texts, dest, cfg.data.tokenizer_vocab_size)
    return Tokenizer(dest)


def _global_batch(local: dict[str, np.ndarray], bsharding) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(bsharding, local[k]) for k in step_lib.BATCH_KEYS}


def _batches(cfg: ConfigDict, source, tok: Tokenizer, batch_size: int, *, train: bool) -> pipeline.PackedBatches:
    if sft.is_chat(cfg):  # issue 8: chat data (source = "train" / "validation"), see data/chat.py
        return sft.batches(cfg, source, tok, batch_size, train=train)
    return pipeline.PackedBatches(
        source, tok, cfg.data.seq_len, batch_size // jax.process_count(), seed=cfg.seed,
        shuffle=cfg.data.shuffle and train, add_bos=cfg.data.add_bos, add_eos=cfg.data.add_eos, loop=train,
        process_index=jax.process_index(), process_count=jax.process_count())


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
    it = _batches(cfg, source, tok, micro, train=False)
    ce, n = 0.0, 0.0
    for _ in range(cfg.eval_steps):
        local = next(it, None)
        local = local if local is not None else pipeline.empty_batch(micro // jax.process_count(), cfg.data.seq_len)
        out = eval_fn(params, _global_batch(local, bsharding))
        ce, n = ce + float(out["ce_sum"]), n + float(out["tokens"])
    loss = ce / max(n, 1.0)
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "tokens": n}


# --------------------------------------------------------------------------- loop
def train(cfg: ConfigDict, workdir: str) -> dict[str, Any]:
    """Run (or resume) the pretraining described by ``cfg`` in ``workdir``.

    Args:
      cfg: the run ConfigDict (``configs/*.py``).
      workdir: output directory (created; an existing run there is resumed when ``checkpoint.resume``).

    Returns:
      ``{"status": "done" | "preempted", "step", "signal", "last_metrics", "eval"}``.
    """
    model_cfg = sft.model_config(cfg, validate_config(cfg))  # issue 8: init_from's network
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    tok = sft.tokenizer(cfg, workdir) or _tokenizer(cfg, workdir)  # issue 8: data.tokenizer / init_from's
    if tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but config.model.vocab_size="
                          f"{model_cfg.vocab_size}. Fix: set --config.model.vocab_size={tok.vocab_size} or larger.")
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "run_config.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))
        with open(os.path.join(workdir, "model_config.json"), "w") as f:
            json.dump(model_cfg.to_dict(), f, indent=2)
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
    data_it = _batches(cfg, train_src, tok, cfg.batch_size, train=True)

    rules = rules_from(cfg)
    mesh = sharding.make_mesh(**{a: cfg.mesh[a] for a in sharding.MESH_AXES})
    tx, schedule = make_optimizer(cfg.optimizer, cfg.num_steps)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=cfg.checkpoint.every_steps,
                        keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    if sft.custom_state(cfg):  # issue 8: init_from a checkpoint and/or LoRA adapters (training/sft.py)
        graphdef, abstract_state, shardings, make_state = sft.train_state(cfg, model_cfg, mesh, rules)
    else:
        graphdef, abstract_state, shardings = step_lib.make_train_state(model_cfg, cfg, mesh, rules, abstract=True)
        make_state = lambda: step_lib.make_train_state(model_cfg, cfg, mesh, rules)[1]  # noqa: E731
    restored = ckpt.restore_latest(abstract_state) if cfg.checkpoint.resume else None
    if restored is not None:
        start, state, data_state, _ = restored
        if "frozen" in abstract_state:  # LoRA checkpoints hold the adapters only: reload the frozen base
            state["frozen"] = make_state()["frozen"]
        data_it.set_state(data_state)
        log.info("resumed from %s at step %d", ckpt.directory, start)
    else:
        start = 0
        state = make_state()
    meta = {"seed": cfg.seed, "model_config": model_cfg.to_dict()}

    bsharding = step_lib.batch_sharding(mesh, rules)
    step_fn = step_lib.jit_train_step(graphdef, tx, shardings, mesh, rules, grad_accum_steps=cfg.grad_accum_steps,
                                      schedule=schedule)
    eval_fn = step_lib.jit_eval_step(graphdef, shardings, mesh, rules) if eval_src is not None else None
    flops_tok = flops_per_token(model_cfg, cfg.data.seq_len)
    peak, peak_how = peak_flops(cfg.peak_flops)
    log.info("model FLOPs/token %.3g; peak %.3g FLOP/s (%s)", flops_tok, peak, peak_how)
    writer = MetricsWriter(workdir)
    result: dict[str, Any] = {"status": "done", "step": start, "signal": None, "last_metrics": {}, "eval": None}
    from tqdm import tqdm

    bar = tqdm(total=cfg.num_steps, initial=start, disable=not cfg.progress_bar or jax.process_index() != 0,
               dynamic_ncols=True, desc="train")
    skipped, window_tokens, window_start = 0, 0.0, time.perf_counter()
    try:
        with _Preemption() as preempt, sharding.use_mesh(mesh, rules):
            step = start
            while step < cfg.num_steps:
                local = next(data_it)
                data_state = data_it.get_state()
                state, metrics = step_fn(state, _global_batch(local, bsharding))
                step += 1
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
                window_tokens += float(local["weights"].sum()) * jax.process_count()
                if step % cfg.log_every == 0 or step == cfg.num_steps or preempt.signum:
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
                ckpt.save(step, state, data_state, meta, force=bool(preempt.signum) or step == cfg.num_steps)
                if preempt.signum:
                    ckpt.wait()
                    log.warning("preempted by signal %d at step %d; checkpoint saved in %s.", preempt.signum, step,
                                ckpt.directory)
                    result.update(status="preempted", signal=preempt.signum, step=step)
                    return result
            result["step"] = step
            if eval_fn is not None and step > start:
                result["eval"] = writer.write(step, evaluate(cfg, eval_fn, sft.eval_params(state), eval_src, tok,
                                                             bsharding), prefix="eval/")
            return result
    finally:
        bar.close()
        writer.close()
        ckpt.close()
