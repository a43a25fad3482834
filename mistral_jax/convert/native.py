"""mistral_jax's own directories: the export dir and the training workdir (Orbax).

* export dir: ``model_config.json`` (``ModelConfig.to_dict()``), ``params/`` (Orbax ``StandardCheckpointer`` of
  the ``params_dict`` pytree), optional ``tokenizer.model``.
* training workdir: ``model_config.json``, optional ``tokenizer.model``, ``checkpoints/<step>/`` written by
  ``ocp.CheckpointManager`` with a ``params`` item (``StandardSave``) among others.
* a step dir ``checkpoints/<step>/`` (its ``model_config.json`` two levels up).

Each may be on a bucket (``gs://``, ``s3://``): Orbax reads and writes the arrays there itself (tensorstore's GCS /
S3 drivers, ``mistral_jax.orbax_s3``); a step on a bucket counts once Orbax has committed it
(``commit_success.txt``, its commit-file protocol on object stores: a half-written step is skipped).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import jax

from mistral_jax import sharding, storage
from mistral_jax.config import ModelConfig
from mistral_jax.convert import dtypes, files, sources, tokenizer_files
from mistral_jax.convert import keys as keys_lib

MODEL_CONFIG = "model_config.json"
PARAMS = "params"
CHECKPOINTS = "checkpoints"
COMMITTED = "commit_success.txt"  # Orbax's commit file (atomicity_types.COMMIT_SUCCESS_FILE) on object stores


_HARMLESS = ("Metadata file does not exist", "read_only=True, setting save_interval_steps",
             "Given directory is read only")


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(h in record.getMessage() for h in _HARMLESS)


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
    """Drop Orbax's warnings that every read of a params item prints and that mean nothing here (a params dir
    restored on its own has no step-level ``_CHECKPOINT_METADATA``; a read-only manager saves nothing)."""
    f = _DropHarmless()
    loggers = [logging.getLogger("absl")]
    for lg in loggers:
        lg.addFilter(f)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(f)


class AdaptersOnlyError(ValueError):
    """A checkpoint of a LoRA run (adapters only) was read as a model."""


def _ocp():
    import orbax.checkpoint as ocp  # imported lazily: slow, and only this format needs it

    storage.configure()  # Orbax on s3:// (orbax_s3), emulator settings: before Orbax touches a bucket path
    return ocp


def read_config(path: str) -> ModelConfig:
    """``ModelConfig`` from a mistral_jax export dir or training workdir (``model_config.json``)."""
    return sources.read_json_config(path, MODEL_CONFIG, ModelConfig.from_dict,
                                   "a mistral_jax export dir or training workdir")


def step_dirs(workdir: str) -> list[str]:
    """``checkpoints/<step>`` directories of a training workdir, newest first (temporary dirs skipped; on a bucket,
    steps that Orbax has not committed too)."""
    root = storage.join(workdir, CHECKPOINTS)
    kinds = files.entries(root)
    steps = sorted((int(n) for n, k in kinds.items() if n.isdigit() and
                    (k == "dir" or k == "link" and files.is_dir(storage.join(root, n)))), reverse=True)
    out = [storage.join(root, str(s)) for s in steps]
    if storage.is_remote(workdir):
        out = [d for d in out if files.is_file(storage.join(d, COMMITTED))]
    return out


def config_and_params_dirs(path: str) -> tuple[str, list[str]]:
    """(directory holding ``model_config.json``, candidate ``params`` dirs in the order to try)."""
    path = storage.absolute(path)
    if files.is_file(storage.join(path, MODEL_CONFIG)):
        if files.is_dir(storage.join(path, PARAMS)):  # export dir
            return path, [storage.join(path, PARAMS)]
        steps = step_dirs(path)
        if steps:
            return path, [storage.join(s, PARAMS) for s in steps]
        raise FileNotFoundError(f"{path!r} has {MODEL_CONFIG} but neither {PARAMS}/ nor {CHECKPOINTS}/<step>/. "
                                "Fix: train until a checkpoint is written, or point at an export dir.")
    if files.is_dir(storage.join(path, PARAMS)):  # a step dir
        root = os.path.dirname(os.path.dirname(path))
        if files.is_file(storage.join(root, MODEL_CONFIG)):
            return root, [storage.join(path, PARAMS)]
        raise FileNotFoundError(f"{path!r} looks like a checkpoint step but {root}/{MODEL_CONFIG} is missing. "
                                "Fix: keep the step inside its training workdir.")
    raise FileNotFoundError(f"{path!r} is not a mistral_jax directory (no {MODEL_CONFIG}).")


def _check_tree(cfg: ModelConfig, params_dir: str) -> dict[tuple[str, ...], Any]:
    """Compare the stored tree with the config's parameter shapes; one error listing every mismatch."""
    ocp = _ocp()
    try:
        with quiet_orbax():
            md = ocp.StandardCheckpointer().metadata(params_dir)
    except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable dirs
        raise ValueError(f"cannot read checkpoint metadata of {params_dir!r}: {e}") from e
    tree = getattr(getattr(md, "item_metadata", md), "tree", None)
    if tree is None:
        tree = md
    stored = {tuple(str(getattr(k, "key", k)) for k in path): leaf
              for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    expected = keys_lib.param_shapes(cfg)
    if stored and all(len(k) >= 2 and k[-1] in ("a", "b") for k in stored):  # LoRA adapters (lora.LoRAWeight)
        root = os.path.dirname(os.path.dirname(os.path.dirname(storage.absolute(params_dir))))
        raise AdaptersOnlyError(f"checkpoint {params_dir!r} holds only LoRA adapters ({len(stored)} arrays), not "
                                f"a model: {root!r} is a LoRA training workdir. Fix: keep its run_config.json (which "
                                "names the base model) so it loads merged, or export it with `mistral-jax-lora "
                                f"--workdir {root} --output DIR`.")
    problems = [f"{params_dir}: missing parameter {'/'.join(k)} {s}" for k, s in expected.items() if k not in stored]
    problems += [f"{params_dir}: unexpected parameter {'/'.join(k)} {tuple(v.shape)}" for k, v in stored.items()
                 if k not in expected]
    problems += [f"{params_dir}: parameter {'/'.join(k)} has shape {tuple(stored[k].shape)}, the config needs {s}"
                 for k, s in expected.items() if k in stored and tuple(stored[k].shape) != tuple(s)]
    sources.check_or_raise(problems, f"checkpoint {params_dir}", f"the parameters must match {MODEL_CONFIG}")
    return stored


def restore_params(cfg: ModelConfig, params_dir: str, dtype: str | None = None,
                   mesh: jax.sharding.Mesh | None = None, rules: sharding.ShardingRules | None = None
                   ) -> tuple[ModelConfig, dict[str, Any]]:
    """Restore a ``params`` item, cast to ``dtype`` and placed with ``mesh`` (sharded as read) if given."""
    from flax import nnx

    from mistral_jax.model.transformer import abstract_model

    stored = _check_tree(cfg, params_dir)
    if dtype is None:
        dtype = dtypes.dtype_name(stored[("embed",)].dtype)
    cfg = cfg.replace(param_dtype=dtype)
    state = nnx.state(abstract_model(cfg), nnx.Param)
    if mesh is not None:
        shardings = sharding.state_shardings(state, mesh, rules or sharding.DEFAULT_RULES)
        flat_sh = {tuple(map(str, k)): getattr(v, "value", v) for k, v in nnx.to_flat_state(shardings)}
    else:
        flat_sh = {}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target: dict[str, Any] = {}
    for path, shape in keys_lib.param_shapes(cfg).items():
        node = target
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = jax.ShapeDtypeStruct(shape, dtypes.np_dtype(dtype), sharding=flat_sh.get(path, default))
    with quiet_orbax():
        params = _ocp().StandardCheckpointer().restore(params_dir, target)
    return cfg, params


def load(path: str, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
         rules: sharding.ShardingRules | None = None, config_overrides: dict[str, Any] | None = None
         ) -> tuple[ModelConfig, dict[str, Any], str]:
    """(config, params, config dir) of an export dir, workdir (newest restorable step) or step dir."""
    root, candidates = config_and_params_dirs(path)
    cfg = read_config(root)
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    errors = []
    for i, params_dir in enumerate(candidates):
        try:
            cfg_out, params = restore_params(cfg, params_dir, dtype, mesh, rules)
        except (sources.ConversionError, AdaptersOnlyError):
            raise  # a config / shape mismatch is not corruption: older steps would fail the same way
        except Exception as e:  # noqa: BLE001 - a corrupt step: fall back to the previous one
            errors.append(f"{params_dir}: {type(e).__name__}: {e}")
            if i + 1 < len(candidates):
                warnings.warn(f"checkpoint {params_dir} could not be restored ({type(e).__name__}: {e}); "
                              f"falling back to {candidates[i + 1]}", stacklevel=3)
            continue
        return cfg_out, params, root
    raise ValueError(f"no checkpoint under {path!r} could be restored:\n  " + "\n  ".join(errors) +
                     "\nFix: point at an intact checkpoint (or re-run training to write one).")


def write(out_dir: str, cfg: ModelConfig, params: dict[str, Any], tokenizer: Any = None) -> None:
    """Write an export dir (``model_config.json``, ``params/``, ``tokenizer.model``) into ``out_dir`` (a temporary
    local directory, or the export's place on a bucket)."""
    ckpt = _ocp().StandardCheckpointer()
    ckpt.save(storage.join(out_dir, PARAMS), params)
    ckpt.wait_until_finished()
    ckpt.close()
    files.write_json(storage.join(out_dir, MODEL_CONFIG), cfg.to_dict(), indent=2)
    tokenizer_files.copy_tokenizer(tokenizer, out_dir)
