"""A run resolved once: run config -> ``Run(cfg, model_cfg, mesh, rules, recipe)``.

``resolve(cfg)`` is the one place a run config becomes the things a program is built from; ``train.py`` (train and
``--dry_run``) and the AOT tool (``python -m mistral_jax.aot``) call it. It checks the config against the schema
(``configs/base.py``) before anything is built, chooses the recipe (``training.recipe.choose``), resolves the
model config (``config.model`` preset + overrides, ``config.remat``, ``init_from``'s architecture) for the target
platform (the devices' platform unless ``config.model.platform`` names one; the AOT tool's devices are a TPU
topology's, so ``auto`` backends resolve for the TPU), and lays out the mesh and sharding rules on the devices.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh
from ml_collections import ConfigDict

from mistral_jax import sharding
from mistral_jax.config import ModelConfig
from mistral_jax.data import pipeline
from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.training.optimizer import check_config as check_optimizer_config
from mistral_jax.training.optimizer import make_optimizer
from mistral_jax.training.recipe import ConfigError, Recipe, choose

log = logging.getLogger(__name__)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")

__all__ = ["CONFIG_DIR", "ConfigError", "Run", "base_config", "check_cli_overrides", "check_processes",
           "load_config_file", "mesh_sizes", "model_config_from", "model_config_of", "resolve", "resolve_mesh",
           "rules_from", "validate_config"]


@dataclasses.dataclass(frozen=True)
class Run:
    """A resolved run: what ``train.py`` trains and the AOT tool compiles."""

    cfg: ConfigDict  # the run config
    model_cfg: ModelConfig  # the network, built for its target platform
    mesh: Mesh
    rules: sharding.ShardingRules
    recipe: Recipe


# --------------------------------------------------------------------------------------------- config files
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


# -------------------------------------------------------------------------------------------- model config
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


def _model_fields(cfg: ConfigDict) -> dict[str, Any]:
    """``config.model`` with ``config.remat`` folded in: the command-line shorthand ``--config.remat=P`` for
    ``--config.model.remat=P`` (set, it wins over the config file's ``model.remat``)."""
    model = cfg.model.to_dict()
    if cfg.get("remat"):
        model["remat"] = cfg.remat
    return model


def model_config_of(cfg: ConfigDict) -> ModelConfig:
    """``config.model`` (and ``config.remat``) as a ``ModelConfig``, before ``init_from`` and the platform."""
    return model_config_from(_model_fields(cfg))


# ---------------------------------------------------------------------------------------------------- mesh
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


def rules_from(cfg: ConfigDict, mesh: Mesh | None = None) -> sharding.ShardingRules:
    """``config.mesh.rules``: a preset name or ``auto`` (the preset matching the mesh: EP, TP or FSDP)."""
    name = cfg.mesh.rules
    if name != "auto" and name not in sharding.RULE_PRESETS:
        raise ConfigError(f"config.mesh.rules={name!r} is unknown. "
                          f"Fix: use auto or one of {sorted(sharding.RULE_PRESETS)}.")
    return sharding.rules_from_config(cfg.mesh, mesh)


def _describe_rules(rules: sharding.ShardingRules) -> str:
    return ", ".join(f"{k}->{v}" for k, v in rules.rules.items() if v)


def resolve_mesh(cfg: ConfigDict, devices: Sequence[Any] | None = None) -> tuple[Mesh, sharding.ShardingRules]:
    """``(mesh, rules)`` of ``config.mesh`` on ``devices`` (default: every global device)."""
    mesh = sharding.mesh_from_config(cfg.mesh, devices=devices)  # DCN axes too: data / fsdp across TPU slices
    return mesh, rules_from(cfg, mesh)


# ------------------------------------------------------------------------------------------------- checks
def validate_config(cfg: ConfigDict, n_devices: int | None = None, process_count: int | None = None,
                    schema: ConfigDict | None = None, n_slices: int | None = None) -> ModelConfig:
    """Check the run config before anything is compiled; returns ``config.model`` as a ModelConfig (before
    ``init_from`` and the platform: ``resolve`` gives the final one). Raises ``ConfigError``."""
    schema = base_config() if schema is None else schema
    unknown = _unknown_keys(cfg, schema)
    if unknown:
        raise ConfigError("unknown config field(s): " + "; ".join(unknown) + ". Fix: remove or rename them.")
    n_devices = jax.device_count() if n_devices is None else n_devices
    process_count = jax.process_count() if process_count is None else process_count
    model_cfg = model_config_of(cfg)
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
    if not cfg.get("init_from"):  # with init_from the context length may be the checkpoint's: see resolve
        _check_seq_len(cfg, model_cfg)
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


def _check_seq_len(cfg: ConfigDict, model_cfg: ModelConfig) -> None:
    if cfg.data.seq_len < 2 or cfg.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"config.data.seq_len={cfg.data.seq_len} must be in [2, model max_seq_len="
                          f"{model_cfg.max_seq_len}]. Fix: lower seq_len or raise model.max_seq_len.")


def check_processes(cfg: ConfigDict, workdir: str, process_count: int) -> None:
    """Checks of a run of ``process_count`` processes that need no device: raise ``ConfigError`` before
    ``jax.distributed`` starts (each process would otherwise train its own, different, tokenizer)."""
    if process_count <= 1 or not choose(cfg).trains_tokenizer:
        return
    if os.path.isfile(os.path.join(workdir, Tokenizer.FILENAME)):  # a resumed run keeps the tokenizer it trained
        return
    raise ConfigError(
        f"config.data.tokenizer='' asks the run to train a tokenizer, which a run of {process_count} processes "
        "cannot do (each process would train its own). Fix: pass --config.data.tokenizer=PATH (a sentencepiece "
        ".model, e.g. trained once with mistral_jax.data.train_tokenizer, or the tokenizer.model of a single-process"
        " run) or a named Mistral tokenizer such as --config.data.tokenizer=mistral:v1.")


# ------------------------------------------------------------------------------------------------ resolve
def resolve(cfg: ConfigDict, *, devices: Sequence[Any] | None = None, process_count: int | None = None,
            require_checkpoint: bool = True) -> Run:
    """The run of ``cfg`` on ``devices`` (default: every global device); raises ``ConfigError``.

    Args:
      cfg: the run config (``configs/*.py`` plus overrides).
      devices: the devices to lay the mesh on; their platform is the target platform of the model's backends
        (``ModelConfig.platform``) unless ``config.model.platform`` names one.
      process_count: processes sharing the batch (default ``jax.process_count()``).
      require_checkpoint: False for a compile without weights (the AOT tool): ``init_from`` is read for its
        architecture when it is a directory here, else ``config.model``'s architecture is compiled.
    """
    devices = list(jax.devices() if devices is None else devices)
    model_cfg = validate_config(cfg, n_devices=len(devices), process_count=process_count,
                                n_slices=sharding.num_slices(devices))
    recipe = choose(cfg)
    model_cfg = recipe.model_config(model_cfg, _model_fields(cfg), require_checkpoint=require_checkpoint)
    model_cfg = model_cfg.for_platform(cfg.model.get("platform") or devices[0].platform)
    _check_seq_len(cfg, model_cfg)
    try:
        mesh, rules = resolve_mesh(cfg, devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from e
    return Run(cfg=cfg, model_cfg=model_cfg, mesh=mesh, rules=rules, recipe=recipe)


def describe(run: Run) -> str:
    """One line: the recipe, the mesh and the rules."""
    return (f"{run.recipe.name}; mesh {' x '.join(f'{k}={v}' for k, v in run.mesh.shape.items())} over "
            f"{run.mesh.size} devices ({jax.process_count()} processes); rules {run.cfg.mesh.rules}: "
            f"{_describe_rules(run.rules)}; platform {run.model_cfg.platform}")
