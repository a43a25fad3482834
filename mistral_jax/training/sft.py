"""Instruction fine-tuning hooks for the trainer: ``init_from`` a released checkpoint, chat data, LoRA state.

``training.trainer`` calls these where a run differs from pretraining (each call site is marked "issue 8"):

* ``model_config(cfg, preset_cfg)``: with ``config.init_from``, the network is the checkpoint's (``config.model``
  fields that are set still override numerics such as ``dtype``, ``attention_impl``, ``remat``).
* ``tokenizer(cfg, workdir)``: ``data.tokenizer`` or the checkpoint's ``tokenizer.model`` (never a new one).
* ``batches(cfg, split, tok, batch_size, train)``: ``data.format == "chat"`` -> ``data.chat.ChatBatches``.
* ``train_state(cfg, model_cfg, mesh, rules)``: the train state when ``init_from`` or LoRA is set.

Train state layouts (the ``training.step`` contract):

* full fine-tuning: ``{"params", "opt_state", "step"}`` exactly as in pretraining, params read from ``init_from``
  by ``load_pretrained(path, mesh=...)`` slice by slice straight into their shards.
* LoRA (``config.lora.rank > 0``): ``{"params": adapters, "frozen": base weights, "opt_state", "step"}``;
  ``train_step`` differentiates ``params`` only and the optimizer state covers only the adapters. The checkpointer
  stores ``params`` and ``opt_state``, so a LoRA checkpoint holds only the adapters; the frozen base is read again
  from ``init_from`` on resume. ``merged_model(workdir)`` rebuilds base + adapters and merges them for export.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mistral_jax import lora as lora_lib
from mistral_jax import sharding
from mistral_jax.config import ModelConfig
from mistral_jax.data import chat
from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.model.transformer import Transformer
from mistral_jax.training.optimizer import make_optimizer

log = logging.getLogger(__name__)

# config.model fields that may differ from the checkpoint's (how it is computed, not what it is)
NUMERICS = ("dtype", "param_dtype", "attention_impl", "attention_block_size", "moe_impl", "scan_layers", "remat",
            "router_aux_loss_coef", "router_z_loss_coef", "max_seq_len")


def _get(cfg: Any, dotted: str, default: Any = None) -> Any:
    node = cfg
    for part in dotted.split("."):
        if node is None or part not in node:
            return default
        node = node[part]
    return node


def init_from(cfg: Any) -> str:
    return _get(cfg, "init_from", "") or ""


def lora_rank(cfg: Any) -> int:
    return int(_get(cfg, "lora.rank", 0) or 0)


def is_chat(cfg: Any) -> bool:
    return _get(cfg, "data.format", "text") == "chat"


def custom_state(cfg: Any) -> bool:
    """Whether the train state comes from here (``init_from`` and/or LoRA) rather than a fresh init."""
    return bool(init_from(cfg)) or lora_rank(cfg) > 0


def _overrides(cfg: Any) -> dict[str, Any]:
    m = cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model)
    out = {k: v for k, v in m.items() if k in NUMERICS and v is not None}
    if _get(cfg, "remat"):
        out["remat"] = cfg.remat
    return out


def checkpoint_config(path: str) -> ModelConfig:
    """The ``ModelConfig`` of a checkpoint directory, read from its config file only (no weights)."""
    from mistral_jax import loading
    from mistral_jax.convert import hf, mistral, native

    fmt = loading.detect_format(path)
    if fmt == "hf":
        return hf.read_config(path)
    if fmt == "mistral":
        return mistral.read_config(path)
    return native.read_config(native.config_and_params_dirs(path)[0])


def model_config(cfg: Any, preset_cfg: ModelConfig) -> ModelConfig:
    """The network to train: ``init_from``'s config plus the numerics overrides of ``config.model``.

    Args:
      cfg: the run config.
      preset_cfg: ``config.model`` resolved by the trainer (used when there is no ``init_from``).
    """
    if "init_from" in cfg and cfg.init_from is None:
        raise ValueError("config.init_from is required by this config (fine-tuning starts from a released model). "
                         "Fix: --config.init_from=PATH (HF dir, Mistral consolidated dir or mistral_jax checkpoint).")
    path = init_from(cfg)
    if not path:
        return preset_cfg
    if not os.path.isdir(path):
        raise ValueError(f"config.init_from={path!r} is not a directory. Fix: point at an HF, Mistral "
                                "consolidated or mistral_jax checkpoint directory (or a training workdir).")
    # float32 master weights unless config.model.param_dtype says otherwise (checkpoints are often bfloat16)
    return checkpoint_config(path).replace(**{"param_dtype": "float32", **_overrides(cfg)})


def tokenizer(cfg: Any, workdir: str) -> Tokenizer | None:
    """``data.tokenizer`` or ``init_from``'s ``tokenizer.model`` (copied into ``workdir``); None = trainer default."""
    path = _get(cfg, "data.tokenizer", "")
    if not path and init_from(cfg):
        from mistral_jax import loading

        src = init_from(cfg)
        path = loading.tokenizer_path(src, loading.detect_format(src))
        if path is None:
            raise ValueError(f"config.init_from={src!r} has no tokenizer.model. Fix: set "
                                    "--config.data.tokenizer=PATH to the checkpoint's sentencepiece model.")
    if not path:
        if is_chat(cfg):
            raise ValueError("chat fine-tuning needs the model's tokenizer. Fix: set config.data.tokenizer or "
                             "config.init_from (a checkpoint directory holding tokenizer.model).")
        return None
    tok = Tokenizer(path)
    dest = os.path.join(workdir, Tokenizer.FILENAME)
    if jax.process_index() == 0 and os.path.abspath(tok.path) != os.path.abspath(dest):
        shutil.copyfile(tok.path, dest)
    return tok


def batches(cfg: Any, split: str, tok: Tokenizer, batch_size: int, *, train: bool) -> chat.ChatBatches:
    """Packed chat batches (this process's rows of a ``batch_size``-row global batch)."""
    return chat.chat_batches(cfg.data, tok, batch_size, split=split, seed=int(cfg.seed), loop=train,
                             process_index=jax.process_index(), process_count=jax.process_count())


# ----------------------------------------------------------------------------------------------- state
def _opt_shardings(tx, abstract_params, param_sh, mesh: Mesh):
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    return abstract_opt, optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                               transform_non_params=lambda _: replicated)


def _lora_args(cfg: Any) -> dict[str, Any]:
    return dict(rank=lora_rank(cfg), alpha=float(cfg.lora.alpha), targets=cfg.lora.targets, seed=int(cfg.seed))


def load_model(cfg: Any, model_cfg: ModelConfig, mesh: Mesh | None, rules: sharding.ShardingRules) -> Transformer:
    """The starting model: ``init_from`` loaded onto ``mesh`` (never whole on one host), else a fresh sharded init."""
    path = init_from(cfg)
    if path:
        from mistral_jax.loading import load_pretrained

        overrides = {k: v for k, v in _overrides(cfg).items() if k != "param_dtype"}
        model = load_pretrained(path, dtype=model_cfg.param_dtype, mesh=mesh, rules=rules, config_overrides=overrides)
        if model.cfg != model_cfg:
            raise ValueError(f"config.init_from={path!r} loads as {model.cfg} but the run expects {model_cfg}. "
                             "Fix: do not override architecture fields of config.model with init_from.")
        return model
    seed = int(cfg.seed)
    return sharding.create_sharded(lambda: Transformer(model_cfg, rngs=nnx.Rngs(seed)), mesh, rules)


def train_state(cfg: Any, model_cfg: ModelConfig, mesh: Mesh, rules: sharding.ShardingRules
                ) -> tuple[Any, dict[str, Any], dict[str, Any], Callable[[], dict[str, Any]]]:
    """``(graphdef, abstract_state, shardings, make_state)`` for ``init_from`` / LoRA runs.

    ``abstract_state`` carries shardings (for ``Checkpointer.restore_latest``); ``make_state()`` loads the
    checkpoint (and wraps it with LoRA) and returns the real state on ``shardings``.
    """
    tx, _ = make_optimizer(cfg.optimizer, int(cfg.num_steps))
    rank = lora_rank(cfg)
    replicated = NamedSharding(mesh, PartitionSpec())

    def wrap(model):
        return lora_lib.apply_lora(model, **_lora_args(cfg)) if rank else model

    def split(model):  # LoRA: (graphdef, adapters, frozen base); else (graphdef, all params, None)
        return nnx.split(model, nnx.Param, ...) if rank else (*nnx.split(model), None)

    graphdef, abs_params, abs_frozen = split(nnx.eval_shape(lambda: wrap(Transformer(model_cfg, rngs=nnx.Rngs(0)))))
    param_sh = nnx.to_pure_dict(sharding.state_shardings(abs_params, mesh, rules))
    abs_params = nnx.to_pure_dict(abs_params)
    abstract_opt, opt_sh = _opt_shardings(tx, abs_params, param_sh, mesh)
    shardings: dict[str, Any] = {"params": param_sh, "opt_state": opt_sh, "step": replicated}
    shapes: dict[str, Any] = {"params": abs_params, "opt_state": abstract_opt,
                              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    if abs_frozen is not None:
        shardings["frozen"] = nnx.to_pure_dict(sharding.state_shardings(abs_frozen, mesh, rules))
        shapes["frozen"] = nnx.to_pure_dict(abs_frozen)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)

    def make_state() -> dict[str, Any]:
        with sharding.use_mesh(mesh, rules):
            _, params, frozen = split(wrap(load_model(cfg, model_cfg, mesh, rules)))
            params = jax.device_put(nnx.to_pure_dict(params), shardings["params"])
            opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
        state = {"params": params, "opt_state": opt_state, "step": jax.device_put(jnp.zeros((), jnp.int32),
                                                                                    replicated)}
        if frozen is not None:
            state["frozen"] = jax.device_put(nnx.to_pure_dict(frozen), shardings["frozen"])
            n_ad = sum(x.size for x in jax.tree.leaves(params))
            n_fr = sum(x.size for x in jax.tree.leaves(state["frozen"]))
            log.info("LoRA rank %d on %s: %d trainable adapter parameters, %d frozen (%.3f%%)", rank,
                     lora_lib.resolve_targets(cfg.lora.targets), n_ad, n_fr, 100 * n_ad / max(n_fr, 1))
        return state

    return graphdef, abstract_state, shardings, make_state


def eval_params(state: dict[str, Any]) -> Any:
    """What ``step.eval_step`` takes: ``params``, or ``(params, frozen)`` for a LoRA state."""
    return (state["params"], state["frozen"]) if "frozen" in state else state["params"]


# ----------------------------------------------------------------------------------------------- export
def merged_model(workdir: str, step: int | None = None, mesh: Mesh | None = None) -> Transformer:
    """The fine-tuned model of a LoRA run: ``init_from`` + the adapters of its newest (or ``step``) checkpoint,
    merged into plain weights (export it with ``mj.save_hf`` / ``mj.save_mistral``).

    Args:
      workdir: the run's ``--workdir`` (reads ``run_config.json`` and ``checkpoints/``).
      step: checkpoint step; None = newest that restores.
      mesh: place the model on this mesh (None: default device).
    """
    from ml_collections import ConfigDict

    from mistral_jax.training.checkpoint import restore_params

    with open(os.path.join(workdir, "run_config.json")) as f:
        cfg = ConfigDict(json.load(f))
    if not lora_rank(cfg):
        raise ValueError(f"{workdir!r} is not a LoRA run (config.lora.rank=0). Fix: load it with "
                         "mj.load_pretrained(workdir).")
    rules = sharding.DEFAULT_RULES
    model_cfg = model_config(cfg, checkpoint_config(init_from(cfg)))
    model = load_model(cfg, model_cfg, mesh, rules)
    lora_lib.apply_lora(model, **_lora_args(cfg))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            nnx.to_pure_dict(lora_lib.adapter_state(model)))
    adapters, _ = restore_params(os.path.join(workdir, "checkpoints"), abstract, step)
    state = lora_lib.adapter_state(model)
    nnx.replace_by_pure_dict(state, adapters)
    nnx.update(model, state)
    return lora_lib.merge_lora(model)
