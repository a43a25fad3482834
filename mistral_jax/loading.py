"""``load_pretrained``: a Transformer from an HF, Mistral consolidated or mistral_jax directory.

Kinds of directory (``detect_format``):
  * ``hf``: ``config.json`` + ``model.safetensors`` or ``model.safetensors.index.json`` + shards.
  * ``mistral``: ``params.json`` + ``consolidated.safetensors``.
  * ``jax``: an export dir (``model_config.json`` + ``params/``), a training workdir
    (``model_config.json`` + ``checkpoints/<step>/params``; the newest step that restores is used, a corrupt
    newest step falls back to the previous one with a warning) or a step dir ``checkpoints/<step>``.
    A LoRA training workdir (``run_config.json`` with ``lora.rank > 0``: its checkpoints hold only the adapters)
    or one of its step dirs loads as its base model (``init_from``) with the adapters merged in, the model that
    ``mistral-jax-lora`` exports.
A directory holding both HF and consolidated files (as some hub repos do) loads as ``hf``.

Any of them may be on a bucket (``gs://``, ``s3://``): the directory is probed through the path layer
(``storage``: epath over gcsfs / s3fs; the bucket is checked first, ``storage.check_bucket``, so a missing
bucket or an unreachable endpoint is one line), safetensors are read tensor by tensor with ranged reads, Orbax
restores arrays from the bucket itself. A mistral_jax export that was not finished is refused before anything
is read (``convert.paths.check_complete``: ``mistral_jax_export.incomplete`` without ``mistral_jax_export.json``,
or files missing from what that marker lists); directories written by other tools carry neither marker and load
as before.

A saved config is built for the platform that loads it: ``ModelConfig.platform`` (which the ``auto`` backends are
resolved from) becomes this host's (the platform of ``mesh``'s devices when one is given) unless
``config_overrides`` names one, so a model trained and saved on a TPU runs the CPU / GPU backends here.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from typing import Any, Literal

import jax

from mistral_jax import sharding, storage
from mistral_jax.config import ModelConfig
from mistral_jax.convert import build, dtypes, files, hf, mistral, native, paths, sources
from mistral_jax.model import backends
from mistral_jax.model.transformer import Transformer, from_params

Format = Literal["hf", "mistral", "jax"]
FORMATS: tuple[str, ...] = ("hf", "mistral", "jax")

RUN_CONFIG = "run_config.json"

# tokenizer.model of the directory each loaded model came from (used by save_* when no tokenizer is given)
_TOKENIZER_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# directories each loaded model was read from (save_* never writes over them)
_INPUTS_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True, eq=False)
class Checkpoint(os.PathLike):
    """A checkpoint directory opened once (``open_checkpoint``): its format, its saved ``ModelConfig``, its
    tokenizer file, the LoRA run it belongs to (if any) and the directories reading it touches.

    It is a path (``os.fspath``, ``str``), and every loader here (``detect_format``, ``checkpoint_config``,
    ``tokenizer_path``, ``load_pretrained``, ``open_source``, ``input_dirs``) takes it instead of a path without
    probing the directory again: ``training.run.resolve`` opens ``config.init_from`` once and the recipe, the
    trainer and the loaders share the handle.
    """

    path: str
    format: Format
    config: ModelConfig  # as saved (its ``platform`` is the one it was built for)
    tokenizer: str | None  # tokenizer.model / tekken.json next to it, if any
    lora: tuple[str, dict[str, Any], int | None] | None  # ``lora_run(path)``
    inputs: tuple[str, ...]  # ``input_dirs(path)``

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    def __repr__(self) -> str:  # reads as the path in messages (``config.init_from='...'``)
        return repr(self.path)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint directory once: detect its format, read its config file (no weights) and find its
    tokenizer. A ``Checkpoint`` is returned as it is.

    Raises:
      FileNotFoundError: no such directory; ValueError: a directory of no known format (both name the fix);
      convert.paths.IncompleteExportError (a ValueError): an unfinished mistral_jax export;
      storage.UnsupportedPath / storage.StorageError: a URL that cannot be opened, a bucket that cannot be read.
    """
    if isinstance(path, Checkpoint):
        return path
    path = os.fspath(path)
    found = formats_of(path)
    fmt = _first_format(path, found)
    lora = lora_run(path) if fmt == "jax" else None
    return Checkpoint(path=path, format=fmt, config=_read_config(path, fmt), tokenizer=_tokenizer_file(path, fmt),
                      lora=lora, inputs=tuple(_input_dirs(path, fmt, lora)))


def formats_of(path: str | os.PathLike) -> list[str]:
    """Every format ``path`` could be read as (``hf`` first). A bucket path is checked first (reachable, the bucket
    exists), and an unfinished mistral_jax export is refused (``convert.paths.check_complete``)."""
    storage.check_supported(path, "checkpoint")
    path = os.fspath(path)
    storage.check_bucket(path, "checkpoint")
    if not files.is_dir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist. Fix: check the path.")
    paths.check_complete(path)
    out = []
    if files.is_file(storage.join(path, hf.CONFIG)):
        out.append("hf")
    if files.is_file(storage.join(path, mistral.PARAMS)):
        out.append("mistral")
    try:
        native.config_and_params_dirs(path)
        out.append("jax")
    except FileNotFoundError:
        pass
    return out


def detect_format(path: str | os.PathLike) -> Format:
    """``hf``, ``mistral`` or ``jax``; raises naming the files looked for when it is none of them."""
    if isinstance(path, Checkpoint):
        return path.format
    return _first_format(path, formats_of(path))


def _first_format(path: str | os.PathLike, found: list[str]) -> Format:
    if not found:
        raise ValueError(f"{os.fspath(path)!r} is not a checkpoint directory I can read (files: "
                         f"{files.listdir(path)[:20]}). Fix: point at an HF dir (config.json + "
                         "model*.safetensors), "
                         "a Mistral dir (params.json + consolidated.safetensors) or a mistral_jax export dir / "
                         "training workdir (model_config.json + params/ or checkpoints/).")
    return found[0]  # type: ignore[return-value]


def lora_run(path: str | os.PathLike) -> tuple[str, dict[str, Any], int | None] | None:
    """``(workdir, run config, step)`` when ``path`` is a LoRA training workdir or a step dir of one, else None.

    A LoRA run (``train.py`` with ``config.lora.rank > 0``) writes ``run_config.json`` and checkpoints holding only
    the adapters; ``step`` is None for the workdir (newest step) and the step number for ``checkpoints/<step>``.
    """
    path = storage.absolute(path)
    root, step = path, None
    if not files.is_file(storage.join(path, RUN_CONFIG)):
        up = os.path.dirname(path)
        if not (os.path.basename(path).isdigit() and os.path.basename(up) == native.CHECKPOINTS
                and files.is_file(storage.join(os.path.dirname(up), RUN_CONFIG))):
            return None
        root, step = os.path.dirname(up), int(os.path.basename(path))
    try:
        run = files.read_json(storage.join(root, RUN_CONFIG))
        rank = int((run.get("lora") or {}).get("rank") or 0)
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # not a run config we can read: not recognisably a LoRA run
    return (root, run, step) if rank > 0 else None


def input_dirs(path: str | os.PathLike, fmt: str | None = None) -> list[str]:
    """Every directory that reading checkpoint ``path`` touches: itself, the workdir of a step dir, and the base
    model of a LoRA run. An output must not overlap any of them (``convert.paths``)."""
    if isinstance(path, Checkpoint):
        return list(path.inputs)
    path = os.fspath(path)
    lora = lora_run(path) if fmt in (None, "jax") and files.is_dir(path) else None
    return _input_dirs(path, fmt, lora)


def _input_dirs(path: str, fmt: str | None, lora: tuple[str, dict[str, Any], int | None] | None) -> list[str]:
    out = [path]
    if fmt in (None, "jax") and files.is_dir(path):
        try:
            out.append(native.config_and_params_dirs(path)[0])
        except FileNotFoundError:
            pass
        if lora:
            out.append(lora[0])
            if lora[1].get("init_from"):
                out.append(os.fspath(lora[1]["init_from"]))
    return list(dict.fromkeys(out))


def checkpoint_config(path: str | os.PathLike) -> ModelConfig:
    """The ``ModelConfig`` of a checkpoint directory, read from its config file only (no weights), as saved
    (its ``platform`` is the one it was built for)."""
    if isinstance(path, Checkpoint):
        return path.config
    return _read_config(os.fspath(path), detect_format(path))


def _read_config(path: str, fmt: str) -> ModelConfig:
    if fmt == "hf":
        return hf.read_config(path)
    if fmt == "mistral":
        return mistral.read_config(path)
    return native.read_config(native.config_and_params_dirs(path)[0])


def tokenizer_path(path: str | os.PathLike, fmt: str) -> str | None:
    """The tokenizer file belonging to a checkpoint directory (``tokenizer.model``, else ``tekken.json``), if any."""
    if isinstance(path, Checkpoint):
        return path.tokenizer
    return _tokenizer_file(os.fspath(path), fmt)


def _tokenizer_file(path: str, fmt: str) -> str | None:
    root = native.config_and_params_dirs(path)[0] if fmt == "jax" else path
    for name in ("tokenizer.model", "tekken.json"):
        p = storage.join(root, name)
        if files.is_file(p):
            return p
    return None


def _for_this_host(config_overrides: dict[str, Any] | None, mesh: jax.sharding.Mesh | None) -> dict[str, Any]:
    """``config_overrides`` plus the platform the model will run on (unless they name one)."""
    out = dict(config_overrides or {})
    if "platform" not in out:
        out["platform"] = ModelConfig.resolve_platform(mesh.devices.flat[0].platform if mesh is not None else None)
    return out


def open_source(path: str | os.PathLike, fmt: Format | None = None, *, dtype: str | None = None,
                mesh: jax.sharding.Mesh | None = None, rules: sharding.ShardingRules | None = None,
                config_overrides: dict[str, Any] | None = None) -> sources.Source:
    """A checked tensor source over a checkpoint directory of format ``fmt`` (detected when None).

    File formats are read lazily tensor by tensor; the ``jax`` format is restored (sharded with ``mesh``).
    """
    handle = path if isinstance(path, Checkpoint) else None
    path = os.fspath(path)
    config_overrides = _for_this_host(config_overrides, mesh)
    found = [handle.format] if handle else formats_of(path)
    fmt = fmt or _first_format(path, found)
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}. Fix: use one of {FORMATS}.")
    if fmt not in found:
        raise ValueError(f"{path!r} is not a {fmt!r} checkpoint directory" +
                         (f"; it looks like {found}. Fix: use --from {found[0]}." if found else
                          f" (files: {files.listdir(path)[:20]}). Fix: check the path."))
    if fmt == "jax":
        run = handle.lora if handle else lora_run(path)
        if run:
            from mistral_jax.model.transformer import params_dict

            model = _load_lora_run(*run, dtype=dtype, mesh=mesh, rules=rules, config_overrides=config_overrides)
            return sources.ParamsSource(model.cfg, params_dict(model))
        cfg, params, _ = native.load(path, dtype, mesh, rules, config_overrides)
        return sources.ParamsSource(cfg, params)
    reader = hf if fmt == "hf" else mistral
    cfg = handle.config if handle else reader.read_config(path)
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    return reader.open_source(path, cfg)


def load_pretrained(path: str | os.PathLike, *, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                    rules: sharding.ShardingRules | None = None, fmt: Format | None = None,
                    config_overrides: dict[str, Any] | None = None) -> Transformer:
    """Load a Transformer from an HF, Mistral consolidated or mistral_jax directory.

    Args:
      path: the directory (see the module docstring for the kinds accepted), or its ``open_checkpoint`` handle.
      dtype: parameter dtype (``"float32"``, ``"bfloat16"``, ``"float16"``); None keeps the stored dtype.
        It becomes ``cfg.param_dtype``; the compute dtype ``cfg.dtype`` is left alone (see config_overrides).
      mesh: place every parameter sharded on this mesh (logical-axis ``rules``) as it is read, slice by slice;
        the host then never holds more than one layer's tensor. None: the first device.
      rules: sharding rules for ``mesh`` (default ``sharding.DEFAULT_RULES``).
      fmt: force the format instead of detecting it.
      config_overrides: ``ModelConfig`` fields to replace, e.g. ``{"attention_impl": "blocked", "dtype": "bfloat16"}``.

    Returns:
      The model, with ``model.cfg`` describing it.

    Raises:
      FileNotFoundError: missing directory / files (named).
      ValueError: an unsupported architecture or config; ``ConversionError`` (a ValueError) listing every
        missing, unexpected or mis-shaped tensor and every truncated file.
    """
    handle = open_checkpoint(path) if fmt is None or isinstance(path, Checkpoint) else None
    fmt = fmt or handle.format
    if handle is not None and fmt != handle.format:  # a forced format: read the directory as that one
        handle = None
    path = os.fspath(path)
    config_overrides = _for_this_host(config_overrides, mesh)
    if handle is not None:
        run = handle.lora if fmt == "jax" else None
    else:
        run = lora_run(path) if fmt == "jax" and fmt in formats_of(path) else None
    if run:
        model = _load_lora_run(*run, dtype=dtype, mesh=mesh, rules=rules, config_overrides=config_overrides)
    else:
        source = open_source(handle or path, fmt, dtype=dtype, mesh=mesh, rules=rules,
                             config_overrides=config_overrides)
        if isinstance(source, sources.ParamsSource):
            cfg, params = source.cfg, source.params
        else:
            cfg, params = build.build_params(source.cfg, source, dtype, mesh, rules)
        model = from_params(cfg, params)
    if mesh is not None:  # the model's mesh-aware backends (splash's shard_map, expert parallelism) run on it
        backends.bind(model, mesh, rules)
    tok = tokenizer_path(handle or path, fmt)
    if tok:
        _TOKENIZER_OF[model] = tok
    _INPUTS_OF[model] = input_dirs(handle or path, fmt)
    return model


def load_lora_adapters(path: str | os.PathLike, step: int | None = None) -> Transformer:
    """A LoRA training workdir's model *unmerged*: its base with the adapters of ``step`` (newest by default) as
    ``lora.LoRAWeight`` s, for ``lora.stack_adapters`` (the server's multi-LoRA).

    Raises:
      ValueError: ``path`` is not a LoRA training workdir, or its adapters cannot be restored.
    """
    path = os.fspath(path)
    run = lora_run(path) if files.is_dir(path) else None
    if run is None:
        raise ValueError(f"{path!r} is not a LoRA training workdir (a run_config.json with lora.rank > 0 and "
                         "checkpoints). Fix: pass the workdir of a run trained with config.lora.rank > 0.")
    root, config, found_step = run
    return _load_lora_run(root, config, found_step if step is None else step, merge=False)


def _load_lora_run(root: str, run: dict[str, Any], step: int | None, *, dtype: str | None = None,
                   mesh: jax.sharding.Mesh | None = None, rules: sharding.ShardingRules | None = None,
                   config_overrides: dict[str, Any] | None = None, merge: bool = True) -> Transformer:
    """The merged model of a LoRA run: its base (``init_from``, or the seeded init) + the adapters of ``step``.

    The base is loaded as the run trained it (``model_config.json``: the base's network with the run's numerics,
    float32 master weights), the adapters of the newest (or ``step``) checkpoint are restored into it and folded
    into the weights (``lora.merge_lora``), exactly as ``mistral-jax-lora`` exports it.
    """
    from flax import nnx

    from mistral_jax import lora as lora_lib
    from mistral_jax.model.transformer import params_dict
    from mistral_jax.training.checkpoint import restore_checkpoint_params

    cfg = native.read_config(root)  # the network the run trained (built for this host below)
    cfg = cfg.replace(platform=_for_this_host(config_overrides, mesh)["platform"])
    base = os.fspath(run.get("init_from") or "")
    export = f"mistral-jax-lora --workdir {root} --output DIR"
    if base:
        if not files.is_dir(base):
            raise FileNotFoundError(
                f"{root!r} is a LoRA training workdir: its checkpoints hold only adapters for the base model "
                f"init_from={base!r}, which is not a directory (from {os.getcwd()!r}). Fix: make the base model "
                f"readable at that path (or correct init_from in {storage.join(root, RUN_CONFIG)}); then this "
                f"workdir loads merged, and `{export}` exports it.")
        same = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "param_dtype"}
        model = load_pretrained(base, dtype=cfg.param_dtype, mesh=mesh, rules=rules, config_overrides=same)
    else:  # a LoRA run on a fresh init: the frozen base is the seeded init, rebuilt the way the trainer built it
        seed = int(run.get("seed", 0))
        if mesh is None:
            model = Transformer(cfg, rngs=nnx.Rngs(seed))
        else:
            model = sharding.create_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)), mesh,
                                            rules or sharding.DEFAULT_RULES)
    lora = run["lora"]
    if lora.get("quantize_base"):  # QLoRA: the adapters were trained over the int8 base; merged into it dequantized
        from mistral_jax import quant

        quant.quantize_weights(model, lora["quantize_base"])
    lora_lib.apply_lora(model, int(lora["rank"]), float(lora["alpha"]), lora.get("targets", "all"),
                        seed=int(run.get("seed", 0)))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            nnx.to_pure_dict(lora_lib.adapter_state(model)))
    try:
        with native.quiet_orbax():
            adapters, _ = restore_checkpoint_params(storage.join(root, native.CHECKPOINTS), abstract, step)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{root!r} is a LoRA training workdir whose adapters could not be restored: {e}. Fix: point "
                         f"at a step that holds them (checkpoints/<step>), or export with `{export} --step N`.") from e
    state = lora_lib.adapter_state(model)
    nnx.replace_by_pure_dict(state, adapters)
    nnx.update(model, state)
    if not merge:
        return model
    model = lora_lib.merge_lora(model)
    new = model.cfg.replace(**(config_overrides or {}))
    if dtype is not None or new != model.cfg:
        params = params_dict(model)
        if dtype is not None:
            dt = dtypes.np_dtype(dtype)
            params = jax.tree.map(lambda a: a.astype(dt), params)
            new = new.replace(param_dtype=dtypes.dtype_name(dt))
        model = from_params(new, params)
    return model


def sources_of(model: Transformer) -> list[str]:
    """The directories ``model`` was loaded from (empty if unknown): exports must not overwrite them."""
    try:
        return list(_INPUTS_OF.get(model, []))
    except TypeError:
        return []


def known_tokenizer(model: Transformer) -> str | None:
    """The tokenizer.model of the directory ``model`` was loaded from (None if unknown)."""
    try:
        return _TOKENIZER_OF.get(model)
    except TypeError:
        return None


def _cfg_of(model: Any) -> ModelConfig:
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"expected a mistral_jax Transformer, got {type(model).__name__}. "
                        "Fix: pass the model returned by mj.Transformer(...) or mj.load_pretrained(...).")
    return cfg
