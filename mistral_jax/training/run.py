"""A run resolved once: run config + devices -> ``RunSpec`` (mesh, rules, model config, optimizer, data spec,
``init_from`` handle, recipe, FLOPs).

``resolve(cfg, devices=...)`` is the one place a run config becomes the things a program is built from: the
trainer (``train.py``), its dry run and the AOT tool (``python -m mistral_jax.aot``, on a TPU topology's
compile-only devices) take the ``RunSpec`` and build nothing of it again. It checks the config against the schema
(``configs/base.py``) before anything is built, lays the mesh out on the devices and resolves the sharding rules
on it (once each), builds the optimizer (once), chooses the recipe (``training.recipe.choose``), opens
``init_from`` (once: ``loading.open_checkpoint``; the recipe and the loaders take the handle) and builds the
model config (once: ``config.model`` preset + overrides, ``config.remat``, ``init_from``'s architecture) for the
target platform (the devices' platform unless ``config.model.platform`` names one; on a TPU topology's devices the
``auto`` backends resolve for the TPU). ``validate_config`` runs the same checks without devices. The path fields
(``PATH_FIELDS``) may be local or ``gs://`` / ``s3://`` URLs; ``check_storage`` checks the buckets answer.

The tools that start from a checkpoint rather than a run config (generate, serve, eval) resolve theirs with
``resolve_checkpoint`` -> ``CheckpointSpec`` (the opened checkpoint, its model config for the devices' platform,
mesh and rules).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh
from ml_collections import ConfigDict

from mistral_jax import flops, loading, sharding, storage
from mistral_jax.config import ModelConfig
from mistral_jax.data import pipeline, prepared
from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.training import optimizer as optimizer_lib
from mistral_jax.training.recipe import ConfigError, Recipe, _get, choose

log = logging.getLogger(__name__)

# the run config's path fields: local paths, or gs:// / s3:// URLs (checked by check_storage before any work)
PATH_FIELDS = ("init_from", "data.train", "data.validation", "data.tokenizer")  # data.datasets: check_data

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")

__all__ = ["CONFIG_DIR", "ConfigError", "DataSpec", "MeshConfigError", "PATH_FIELDS", "RunSpec", "base_config",
           "CheckpointSpec", "check_cli_overrides", "check_processes", "check_storage", "describe", "load_config_file",
           "model_config_from", "model_config_of", "resolve", "resolve_checkpoint", "rules_from", "validate_config"]


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What a step eats: the batch and its rows (``config.data`` and the batch fields)."""

    format: str  # config.data.format: a data kind of the recipe (recipe.DATA_KINDS)
    train: str
    validation: str
    tokenizer: str  # "" = the run's own (trained or the workdir's) or init_from's
    seq_len: int
    batch_size: int  # global rows per optimizer step
    grad_accum_steps: int

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum_steps

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A resolved run: what ``train.py`` trains, its dry run and the AOT tool compile. Build it with ``resolve``."""

    cfg: ConfigDict  # the run config
    model_cfg: ModelConfig  # the network, built for its target platform
    mesh: Mesh
    rules: sharding.ShardingRules
    recipe: Recipe  # its ``init_from`` is the opened handle when set
    tx: optax.GradientTransformation  # the optimizer
    schedule: Callable[[Any], Any]  # step -> learning rate
    data: DataSpec
    init_from: loading.Checkpoint | None  # the opened checkpoint to start from (None: a fresh init / not read)

    @property
    def devices(self) -> list[Any]:
        return list(self.mesh.devices.flat)

    @property
    def flops_per_step(self) -> float:
        """Model FLOPs of one train step, all devices together (``mistral_jax.flops``: the MFU numerator)."""
        return flops.flops_per_step(self.model_cfg, self.data.batch_size, self.data.seq_len)

    def peak_flops(self) -> tuple[float, str]:
        """``(peak FLOP/s of the run's devices, how it was obtained)`` (``config.peak_flops`` wins)."""
        return flops.peak_flops(self.cfg.get("peak_flops", 0.0) or 0.0, self.devices)




class MeshConfigError(ConfigError):
    """The run config's mesh or batch does not lay out on the devices (one line with the fix)."""


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
def _model_overrides(model: Any) -> tuple[str, dict[str, Any]]:
    """``config.model`` as ``(preset, overrides)`` (None = the preset's value); ``sliding_window <= 0`` means no
    window (None cannot be told apart from "keep the preset")."""
    d = dict(model.to_dict() if hasattr(model, "to_dict") else model)
    preset = d.pop("preset", "") or ""
    overrides = {k: v for k, v in d.items() if v is not None}
    if "sliding_window" in overrides and overrides["sliding_window"] <= 0:
        overrides["sliding_window"] = None
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"config.model has unknown field(s) {unknown}. Fix: use ModelConfig fields {sorted(names)}.")
    return preset, overrides


def _build_model_config(preset: str, fields: dict[str, Any], where: str) -> ModelConfig:
    try:
        return ModelConfig.preset(preset, **fields) if preset else ModelConfig(**fields)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where} (preset={preset!r}, overrides={fields}): {e}") from e


def model_config_from(model: Any) -> ModelConfig:
    """``config.model`` (preset name + overrides, None = preset value) -> a validated ``ModelConfig``."""
    preset, overrides = _model_overrides(model)
    return _build_model_config(preset, overrides, "config.model")


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


def _run_model_config(cfg: ConfigDict, init_from: loading.Checkpoint | None, platform: str) -> ModelConfig:
    """The run's network, built once: ``config.model`` (+ ``config.remat``) on ``init_from``'s architecture, for
    ``platform``.

    Only the architecture comes from the checkpoint; dtypes, backends, scan / remat and loss weights stay the run's.
    ``max_seq_len`` is the exception: an architecture field (the checkpoint's context length) that holds no
    parameter (it bounds the RoPE table and caches), so ``config.model.max_seq_len`` set explicitly still overrides
    it, e.g. to fine-tune at a longer context.
    """
    preset, fields = _model_overrides(_model_fields(cfg))
    if init_from is not None:
        explicit_len = fields.get("max_seq_len")
        fields.update(init_from.config.architecture())
        if explicit_len is not None:
            fields["max_seq_len"] = explicit_len
    fields["platform"] = ModelConfig.resolve_platform(fields.get("platform") or platform)
    where = "config.model" + (f" on config.init_from={init_from.path!r}'s architecture" if init_from else "")
    return _build_model_config(preset, fields, where)


# ---------------------------------------------------------------------------------------------------- mesh
def rules_from(cfg: ConfigDict, mesh: Mesh | dict[str, int] | None = None) -> sharding.ShardingRules:
    """``config.mesh.rules``: a preset name or ``auto`` (the preset matching the mesh or its axis sizes: EP, TP or
    FSDP)."""
    name = cfg.mesh.rules
    if name != "auto" and name not in sharding.RULE_PRESETS:
        raise ConfigError(f"config.mesh.rules={name!r} is unknown. "
                          f"Fix: use auto or one of {sorted(sharding.RULE_PRESETS)}.")
    return sharding.rules_from_config(cfg.mesh, mesh)


def _describe_rules(rules: sharding.ShardingRules) -> str:
    return ", ".join(f"{k}->{v}" for k, v in rules.rules.items() if v)


def _mesh_sizes(cfg: ConfigDict, n_devices: int, n_slices: int) -> dict[str, int]:
    """The mesh axis sizes of ``config.mesh`` on ``n_devices`` devices (``sharding.mesh_shape``), or ConfigError."""
    try:
        return sharding.mesh_shape(cfg.mesh, n_devices, n_slices)
    except (ValueError, TypeError) as e:
        raise MeshConfigError(f"config.mesh: {e}") from None


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """What a tool that starts from a checkpoint (generate, serve, eval) runs: ``resolve_checkpoint``'s result."""

    checkpoint: loading.Checkpoint  # opened once; the loaders take it
    model_cfg: ModelConfig  # the checkpoint's network, built for the devices' platform (and ``dtype``)
    mesh: Mesh | None  # None: one device, unsharded
    rules: sharding.ShardingRules
    dtype: str | None  # parameter and compute dtype; None keeps the stored one
    kv_cache_dtype: str | None = None  # the decoding cache's dtype (ModelConfig.kv_cache_dtype); None: the default
    quantize: str | None = None  # weight-only quantization for inference (``quant.quantize_weights``): int8 or None

    def load(self) -> Any:
        """The model (``loading.load_pretrained`` of the opened checkpoint on the mesh), its projection weights
        quantized when ``quantize`` says so."""
        overrides = {**({"dtype": self.dtype} if self.dtype else {}),
                     **({"kv_cache_dtype": self.kv_cache_dtype} if self.kv_cache_dtype else {})}
        model = loading.load_pretrained(self.checkpoint, dtype=self.dtype, mesh=self.mesh, rules=self.rules,
                                        config_overrides=overrides or None)
        if self.quantize:
            from mistral_jax import quant

            quant.quantize_weights(model, self.quantize)
        return model


def resolve_checkpoint(path: str | os.PathLike, *, mesh: str | dict[str, int] | None = None,
                       devices: Sequence[Any] | None = None, dtype: str | None = None,
                       kv_cache_dtype: str | None = None, quantize: str | None = None) -> CheckpointSpec:
    """The one place the checkpoint tools get their mesh, rules and model config (``resolve`` for run configs).

    Args:
      path: the checkpoint directory (anything ``loading.load_pretrained`` reads), or its opened handle.
      mesh: None (one device, unsharded); ``"auto"`` (several devices: FSDP over all of them when the model's
        ``dim`` divides, else every device a data-parallel replica); or ``config.mesh``-like axis sizes
        (``{"data": 1, "fsdp": -1, ...}``).
      devices: the devices (default: every global device).
      dtype: parameter and compute dtype; None keeps the stored one.
      kv_cache_dtype: the decoding KV cache's dtype (``auto`` or ``int8``); None keeps the default.
      quantize: weight-only quantization of the loaded model (``int8``; ``quant.quantize_weights``) or None.

    Raises:
      FileNotFoundError / ValueError: not a checkpoint directory. MeshConfigError: sizes that do not lay out the
        devices.
    """
    ckpt = loading.open_checkpoint(path)
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh
    if mesh == "auto":
        sizes = (None if len(devices) == 1 else {"fsdp": -1} if ckpt.config.dim % len(devices) == 0
                 else {"data": -1, "fsdp": 1})
    try:
        built = sharding.mesh_from_config(sizes, devices=devices) if sizes else None
    except (ValueError, TypeError) as e:
        raise MeshConfigError(str(e)) from None
    rules = sharding.rules_from_config(sizes or {}, built)
    platform = ModelConfig.resolve_platform(devices[0].platform)
    model_cfg = ckpt.config.replace(platform=platform, **({"dtype": dtype} if dtype else {}),
                                    **({"kv_cache_dtype": kv_cache_dtype} if kv_cache_dtype else {}))
    return CheckpointSpec(checkpoint=ckpt, model_cfg=model_cfg, mesh=built, rules=rules, dtype=dtype,
                          kv_cache_dtype=kv_cache_dtype, quantize=quantize)


# ------------------------------------------------------------------------------------------------- checks
def _check_fields(cfg: ConfigDict, schema: ConfigDict | None) -> None:
    """The checks that need neither devices nor the model: schema, counts, policies, the optimizer's fields."""
    schema = base_config() if schema is None else schema
    unknown = _unknown_keys(cfg, schema)
    if unknown:
        raise ConfigError("unknown config field(s): " + "; ".join(unknown) + ". Fix: remove or rename them.")
    for name in PATH_FIELDS:  # a local path, or gs:// / s3://; another scheme is never taken for a local path
        try:
            storage.check_supported(_get(cfg, name), f"config.{name}")
        except storage.UnsupportedPath as e:
            raise ConfigError(str(e)) from None
    for name in ("num_steps", "batch_size", "grad_accum_steps", "log_every"):
        if not isinstance(cfg[name], int) or cfg[name] < 1:
            raise ConfigError(f"config.{name}={cfg[name]!r} must be an integer >= 1. Fix: set --config.{name}.")
    if cfg.nan_policy not in ("stop", "skip"):
        raise ConfigError(f"config.nan_policy={cfg.nan_policy!r}. Fix: use 'stop' or 'skip'.")
    if cfg.data.on_decode_error not in pipeline.DECODE_POLICIES:
        raise ConfigError(f"config.data.on_decode_error={cfg.data.on_decode_error!r}. "
                          f"Fix: use one of {pipeline.DECODE_POLICIES}.")
    try:
        optimizer_lib.check_config(cfg.optimizer, cfg.num_steps)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if cfg.checkpoint.every_steps < 1 or cfg.checkpoint.keep < 1:
        raise ConfigError(f"config.checkpoint.every_steps={cfg.checkpoint.every_steps}, keep={cfg.checkpoint.keep}: "
                          "both must be >= 1.")
    _check_local_tier(cfg)
    from mistral_jax.training import profiling

    try:
        profiling.check(cfg)
    except profiling.ProfileError as e:
        raise ConfigError(str(e)) from None
    from mistral_jax.training import goodput_recorder, wandb_writer

    try:
        goodput_recorder.check(cfg)
        wandb_writer.check(cfg)
    except (goodput_recorder.RecorderError, wandb_writer.WandbError) as e:
        raise ConfigError(str(e)) from None


def _check_batch(cfg: ConfigDict, sizes: dict[str, int], rules: sharding.ShardingRules, process_count: int) -> None:
    """The micro-batch splits evenly over the data-parallel mesh axes, and the batch over the processes."""
    batch_axes = rules.mesh_axes("batch")
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    dp = math.prod(sizes[a] for a in batch_axes)
    b, acc = cfg.batch_size, cfg.grad_accum_steps
    if b % acc:
        raise ConfigError(f"config.batch_size={b} is not divisible by config.grad_accum_steps={acc}. "
                          "Fix: make batch_size a multiple of grad_accum_steps.")
    if (b // acc) % dp:
        shown = " x ".join(f"{a} {sizes[a]}" for a in batch_axes if sizes[a] > 1) or "1"
        fit = [a for a in range(1, acc + 1) if b % a == 0 and (b // a) % dp == 0]
        fix = (f"set --config.grad_accum_steps={fit[-1]}" if fit else
               f"use a batch_size that is a multiple of {dp * acc}")
        raise MeshConfigError(f"config.batch_size={b} with grad_accum_steps={acc} gives micro-batches of {b / acc:g} "
                              f"rows, which do not split over the data-parallel size {dp} = {shown}. Fix: {fix} "
                              "(or change the mesh).")
    if b % process_count:
        raise ConfigError(f"config.batch_size={b} is not divisible by the {process_count} processes. "
                          "Fix: use a multiple of the process count.")


def validate_config(cfg: ConfigDict, n_devices: int | None = None, process_count: int | None = None,
                    schema: ConfigDict | None = None, n_slices: int | None = None) -> ModelConfig:
    """Check the run config without devices (e.g. for a pod this host is not part of); returns ``config.model``
    as a ModelConfig (before ``init_from`` and the platform: ``resolve`` gives the run's). Raises ``ConfigError``.
    ``resolve`` makes the same checks on the real devices."""
    _check_fields(cfg, schema)
    model_cfg = model_config_of(cfg)
    n_devices = jax.device_count() if n_devices is None else n_devices
    sizes = _mesh_sizes(cfg, n_devices, sharding.num_slices() if n_slices is None else n_slices)
    _check_batch(cfg, sizes, rules_from(cfg, sizes), jax.process_count() if process_count is None else process_count)
    if not cfg.get("init_from"):  # with init_from the context length may be the checkpoint's: see resolve
        _check_seq_len(cfg, model_cfg, sizes, rules_from(cfg, sizes))
    return model_cfg


def _check_seq_len(cfg: ConfigDict, model_cfg: ModelConfig, sizes: dict[str, int] | None = None,
                   rules: sharding.ShardingRules | None = None) -> None:
    if cfg.data.seq_len < 2 or cfg.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"config.data.seq_len={cfg.data.seq_len} must be in [2, model max_seq_len="
                          f"{model_cfg.max_seq_len}]. Fix: lower seq_len or raise model.max_seq_len.")
    if sizes is not None and rules is not None:
        _check_context(cfg, model_cfg, sizes, rules)


def _check_context(cfg: ConfigDict, model_cfg: ModelConfig, sizes: dict[str, int],
                   rules: sharding.ShardingRules) -> None:
    """Context parallelism (the sequence split over the mesh axis that ``seq`` maps to): a sequence the ring or
    halo attention can split, and a recipe that runs with it."""
    from mistral_jax.model import backends

    seq_axes = rules.mesh_axes("seq")
    seq_axes = (seq_axes,) if isinstance(seq_axes, str) else tuple(seq_axes or ())
    shards = math.prod(sizes.get(a, 1) for a in seq_axes)
    if shards == 1:
        return
    name = choose(cfg).name
    if name == "grpo":
        raise MeshConfigError(f"config.mesh.context={shards} splits the sequence, but the grpo recipe's rollouts "
                              "decode with a KV cache, which context parallelism does not shard. Fix: set "
                              "--config.mesh.context=1 (and use fsdp / tensor for the model).")
    t = int(cfg.data.seq_len)
    try:
        backends.choose_attention("auto", platform="cpu", self_attention=True, seq_len=t,
                                  window=model_cfg.sliding_window, block=model_cfg.attention_block_size,
                                  has_segments=True, context=shards)
    except ValueError:
        need = 2 * shards
        fit = t // need * need or need
        raise MeshConfigError(f"config.data.seq_len={t} does not split over mesh.context={shards}: ring attention "
                              f"lays the sequence out in {need} equal chunks (zig-zag). Fix: set "
                              f"--config.data.seq_len={fit} (a multiple of {need}) or change mesh.context.") from None


def _check_context_hosts(mesh, rules: sharding.ShardingRules) -> None:
    """Each process feeds whole rows of its batch (``distributed.global_batch``), so the sequence's shards must
    be on one process's devices."""
    (seq_axes,) = rules.spec(("seq",), mesh)
    if seq_axes is None or jax.process_count() == 1:
        return
    axis = mesh.axis_names.index(seq_axes)
    groups = np.moveaxis(mesh.devices, axis, -1).reshape(-1, mesh.shape[seq_axes])
    if any(len({d.process_index for d in g}) > 1 for g in groups):
        raise MeshConfigError(f"mesh.context={mesh.shape[seq_axes]} spreads one sequence over the devices of several "
                              f"processes, whose data loaders each feed whole rows. Fix: keep mesh.context <= the "
                              f"{jax.local_device_count()} devices of one host.")


def check_storage(cfg: ConfigDict, workdir: str | None = None) -> None:
    """The config's bucket paths (``PATH_FIELDS``) can be read and ``workdir`` (when given and a bucket URL) can be
    written: storage server up, bucket there, credentials found (``storage.check_bucket``). Local paths pass; run it
    before anything is built or any device is used.

    Raises:
      storage.StorageError / storage.UnsupportedPath: one line naming the field, the path, what failed and the fix.
      ValueError: a bucket workdir with a bad ``MISTRAL_JAX_LOCK_REFRESH_S``.
    """
    from mistral_jax.training import goodput_recorder

    try:
        goodput_recorder.check(cfg, workdir, probe=True)  # 'file': a local workdir; 'cloud': credentials
    except goodput_recorder.RecorderError as e:
        raise ConfigError(str(e)) from None
    for name in PATH_FIELDS:
        value = _get(cfg, name)
        if value:  # local paths and names (mistral:v3, a hub dataset) pass
            storage.check_bucket(value, f"config.{name}")
    if workdir is not None:
        storage.check_bucket(workdir, "--workdir", write=True)
        if storage.is_remote(workdir):  # the bucket lock's refresh interval: a bad value is one line here too
            from mistral_jax.training.checkpoint_compat import lock_refresh_interval

            lock_refresh_interval()


def check_data(cfg: ConfigDict) -> None:
    """The prepared datasets the config names (``data.train``, ``data.validation``, ``data.mixture``) fit the run:
    manifest there, kind, seq_len, tokenizer (when ``data.tokenizer`` is set), every shard present and readable,
    mixture weights and names. Run it before any device is used; raises ``loader.MixtureError`` /
    ``prepared.PreparedError`` (one line each)."""
    from mistral_jax.data import loader

    tok = Tokenizer(cfg.data.tokenizer) if cfg.data.get("tokenizer") and (
        cfg.data.get("mixture") or any(prepared.is_prepared(cfg.data.get(k, "")) for k in ("train", "validation"))
    ) else None
    recipe = choose(cfg)
    loader.check_config(cfg.data, tokenizer=tok, kind=recipe.data.name)
    recipe.check_data()


def check_processes(cfg: ConfigDict, workdir: str, process_count: int) -> None:
    """Checks of a run of ``process_count`` processes that need no device: raise ``ConfigError`` before
    ``jax.distributed`` starts (each process would otherwise train its own, different, tokenizer)."""
    if process_count <= 1 or not choose(cfg).trains_tokenizer:
        return
    if storage.path(storage.join(workdir, Tokenizer.FILENAME)).is_file():  # a resumed run keeps the one it trained
        return
    raise ConfigError(
        f"config.data.tokenizer='' asks the run to train a tokenizer, which a run of {process_count} processes "
        "cannot do (each process would train its own). Fix: pass --config.data.tokenizer=PATH (a sentencepiece "
        ".model, e.g. trained once with mistral_jax.data.train_tokenizer, or the tokenizer.model of a single-process"
        " run) or a named Mistral tokenizer such as --config.data.tokenizer=mistral:v1.")


# ------------------------------------------------------------------------------------------------ resolve
def _open_init_from(recipe: Recipe, require_checkpoint: bool) -> loading.Checkpoint | None:
    """``config.init_from`` opened (``loading.open_checkpoint``), None for a fresh init; ConfigError when a
    required checkpoint is missing. ``require_checkpoint=False`` (a compile without weights): a missing one is
    None (``config.model``'s architecture is compiled)."""
    path = recipe.init_from
    if path is None or (path and not storage.path(path).is_dir()):
        if not require_checkpoint:
            return None
        if path is None:
            raise ConfigError("config.init_from is required by this config (fine-tuning starts from a released "
                              "model). Fix: --config.init_from=PATH (HF dir, Mistral consolidated dir or "
                              "mistral_jax checkpoint).")
        raise ConfigError(f"config.init_from={path!r} is not a directory. Fix: point at an HF, Mistral "
                          "consolidated or mistral_jax checkpoint directory (or a training workdir).")
    if not path:
        return None
    try:
        return loading.open_checkpoint(path)
    except (ValueError, OSError) as e:
        raise ConfigError(f"config.init_from={path!r}: {e}") from e


def resolve(cfg: ConfigDict, *, devices: Sequence[Any] | None = None, process_count: int | None = None,
            require_checkpoint: bool = True) -> RunSpec:
    """The run of ``cfg`` on ``devices`` (default: every global device); raises ``ConfigError``.

    Args:
      cfg: the run config (``configs/*.py`` plus overrides).
      devices: the devices to lay the mesh on (real ones, or a TPU topology's compile-only devices); their
        platform is the target platform of the model's backends (``ModelConfig.platform``) unless
        ``config.model.platform`` names one.
      process_count: processes sharing the batch (default ``jax.process_count()``).
      require_checkpoint: False for a compile without weights (the AOT tool): ``init_from`` is read for its
        architecture when it is a directory here, else ``config.model``'s architecture is compiled.
    """
    devices = list(jax.devices() if devices is None else devices)
    _check_fields(cfg, None)
    try:
        mesh = sharding.mesh_from_config(cfg.mesh, devices=devices)  # DCN axes too: data / fsdp across TPU slices
    except (ValueError, TypeError) as e:
        where = (f" on {len(devices)} chips ({sharding.num_slices(devices)} slice(s))"
                 if devices[0].platform == "tpu" else "")
        raise MeshConfigError(f"config.mesh{where}: {e}") from None
    rules = rules_from(cfg, mesh)
    _check_batch(cfg, dict(mesh.shape), rules, jax.process_count() if process_count is None else process_count)
    tx, schedule = optimizer_lib.make_optimizer(cfg.optimizer, cfg.num_steps)
    recipe = choose(cfg)
    init_from = _open_init_from(recipe, require_checkpoint)
    if init_from is not None:
        recipe = dataclasses.replace(recipe, init_from=init_from)  # the recipe reads the opened handle
    model_cfg = _run_model_config(cfg, init_from, devices[0].platform)
    _check_seq_len(cfg, model_cfg, dict(mesh.shape), rules)
    _check_context_hosts(mesh, rules)
    d = cfg.data
    data = DataSpec(format=recipe.data.name, train=d.train, validation=d.validation, tokenizer=d.tokenizer,
                    seq_len=int(d.seq_len), batch_size=int(cfg.batch_size), grad_accum_steps=int(cfg.grad_accum_steps))
    return RunSpec(cfg=cfg, model_cfg=model_cfg, mesh=mesh, rules=rules, recipe=recipe, tx=tx, schedule=schedule,
                   data=data, init_from=init_from)


def describe(run: RunSpec) -> str:
    """One line: the recipe, the mesh and the rules."""
    return (f"{run.recipe.name}; mesh {' x '.join(f'{k}={v}' for k, v in run.mesh.shape.items())} over "
            f"{run.mesh.size} devices ({jax.process_count()} processes); rules {run.cfg.mesh.rules}: "
            f"{_describe_rules(run.rules)}; platform {run.model_cfg.platform}")


def _check_local_tier(cfg: ConfigDict) -> None:
    """``checkpoint.local_*`` (emergency checkpoints): what can be checked before any device work. The mesh's
    replicas are checked when the tier opens (``emergency.check_local_tier``)."""
    ck = cfg.checkpoint
    local_dir = ck.get("local_dir", "") or ""
    if not local_dir:
        return
    if storage.is_remote(local_dir):
        raise ConfigError(f"config.checkpoint.local_dir={local_dir!r} is a bucket, but the local tier is each "
                          "host's own disk (fast, lost with the host). Fix: a local path such as /dev/shm/mistral_jax "
                          "or a local SSD; the bucket belongs in --workdir (the persistent tier).")
    for name in ("local_every_steps", "local_keep"):
        v = ck.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"config.checkpoint.{name}={v!r} must be an integer >= 1. "
                              f"Fix: set --config.checkpoint.{name}.")
    from mistral_jax import distributed

    if distributed.expected_process_count() < 2:
        raise ConfigError(f"config.checkpoint.local_dir={local_dir!r} needs a run of two or more processes (hosts): "
                          "the local tier keeps one copy per replica of the train state, on the replica's own hosts, "
                          "and a one-process run has one. Fix: leave checkpoint.local_dir empty on one host.")

