"""``load_pretrained``: a Transformer from an HF, Mistral consolidated or mistral_jax directory.

Kinds of directory (``detect_format``):
  * ``hf``: ``config.json`` + ``model.safetensors`` or ``model.safetensors.index.json`` + shards.
  * ``mistral``: ``params.json`` + ``consolidated.safetensors``.
  * ``jax``: an export dir (``model_config.json`` + ``params/``), a training workdir
    (``model_config.json`` + ``checkpoints/<step>/params``; the newest step that restores is used, a corrupt
    newest step falls back to the previous one with a warning) or a step dir ``checkpoints/<step>``.
A directory holding both HF and consolidated files (as some hub repos do) loads as ``hf``.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Literal

import jax

from mistral_jax import sharding
from mistral_jax.config import ModelConfig
from mistral_jax.convert import common, hf, mistral, native
from mistral_jax.model.transformer import Transformer, from_params

Format = Literal["hf", "mistral", "jax"]
FORMATS: tuple[str, ...] = ("hf", "mistral", "jax")

# tokenizer.model of the directory each loaded model came from (used by save_* when no tokenizer is given)
_TOKENIZER_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def formats_of(path: str | os.PathLike) -> list[str]:
    """Every format ``path`` could be read as (``hf`` first)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist. Fix: check the path.")
    out = []
    if os.path.isfile(os.path.join(path, hf.CONFIG)):
        out.append("hf")
    if os.path.isfile(os.path.join(path, mistral.PARAMS)):
        out.append("mistral")
    try:
        native.config_and_params_dirs(path)
        out.append("jax")
    except FileNotFoundError:
        pass
    return out


def detect_format(path: str | os.PathLike) -> Format:
    """``hf``, ``mistral`` or ``jax``; raises naming the files looked for when it is none of them."""
    found = formats_of(path)
    if not found:
        raise ValueError(f"{os.fspath(path)!r} is not a checkpoint directory I can read (files: "
                         f"{sorted(os.listdir(path))[:20]}). Fix: point at an HF dir (config.json + "
                         "model*.safetensors), "
                         "a Mistral dir (params.json + consolidated.safetensors) or a mistral_jax export dir / "
                         "training workdir (model_config.json + params/ or checkpoints/).")
    return found[0]  # type: ignore[return-value]


def tokenizer_path(path: str | os.PathLike, fmt: str) -> str | None:
    """The ``tokenizer.model`` belonging to a checkpoint directory, if any."""
    root = native.config_and_params_dirs(path)[0] if fmt == "jax" else os.fspath(path)
    p = os.path.join(root, "tokenizer.model")
    return p if os.path.isfile(p) else None


def open_source(path: str | os.PathLike, fmt: Format | None = None, *, dtype: str | None = None,
                mesh: jax.sharding.Mesh | None = None, rules: sharding.ShardingRules | None = None,
                config_overrides: dict[str, Any] | None = None) -> common.Source:
    """A checked tensor source over a checkpoint directory of format ``fmt`` (detected when None).

    File formats are read lazily tensor by tensor; the ``jax`` format is restored (sharded with ``mesh``).
    """
    path = os.fspath(path)
    found = formats_of(path)
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}. Fix: use one of {FORMATS}.")
    if fmt not in found:
        raise ValueError(f"{path!r} is not a {fmt!r} checkpoint directory" +
                         (f"; it looks like {found}. Fix: use --from {found[0]}." if found else
                          f" (files: {sorted(os.listdir(path))[:20]}). Fix: check the path."))
    if fmt == "jax":
        cfg, params, _ = native.load(path, dtype, mesh, rules, config_overrides)
        return common.ParamsSource(cfg, params)
    reader = hf if fmt == "hf" else mistral
    cfg = reader.read_config(path)
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    return reader.open_source(path, cfg)


def load_pretrained(path: str | os.PathLike, *, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                    rules: sharding.ShardingRules | None = None, fmt: Format | None = None,
                    config_overrides: dict[str, Any] | None = None) -> Transformer:
    """Load a Transformer from an HF, Mistral consolidated or mistral_jax directory.

    Args:
      path: the directory (see the module docstring for the kinds accepted).
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
    path = os.fspath(path)
    fmt = fmt or detect_format(path)
    source = open_source(path, fmt, dtype=dtype, mesh=mesh, rules=rules, config_overrides=config_overrides)
    if isinstance(source, common.ParamsSource):
        cfg, params = source.cfg, source.params
    else:
        cfg, params = common.build_params(source.cfg, source, dtype, mesh, rules)
    model = from_params(cfg, params)
    tok = tokenizer_path(path, fmt)
    if tok:
        _TOKENIZER_OF[model] = tok
    return model


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
