"""Pure, jittable training and eval steps over a plain-pytree train state.

The train state is a dict ``{"params": params_dict layout, "opt_state": optax state, "step": int32 []}``;
params are float32 master weights (``ModelConfig.param_dtype``) and the model computes in ``ModelConfig.dtype``.

Public functions (all usable on abstract inputs for ``jax.jit(...).lower(...).compile()``):

* ``make_train_state(model_cfg, run_cfg, mesh, rules=DEFAULT_RULES, *, abstract=False)``
  -> ``(graphdef, state, shardings)``: the state created directly in its shards (or ``ShapeDtypeStruct``s
  carrying their sharding when ``abstract``), and the matching ``NamedSharding`` tree.
* ``train_step(graphdef, tx, state, batch, *, grad_accum_steps=1, schedule=None)`` -> ``(state, metrics)``:
  one optimizer step; a scan over ``grad_accum_steps`` micro-batches; a non-finite loss or gradient leaves
  params and optimizer state unchanged and sets ``metrics["nonfinite"] = 1``.
* ``eval_step(graphdef, params, batch)`` -> metrics sums (``ce_sum``, ``tokens``).
* ``jit_train_step(graphdef, tx, shardings, mesh, rules, *, grad_accum_steps, schedule)`` and
  ``jit_eval_step(graphdef, shardings, mesh, rules)``: the steps jitted once with in/out shardings
  (state donated). Call them inside ``sharding.use_mesh(mesh, rules)``.
* ``batch_sharding(mesh, rules)`` and ``abstract_batch(batch_size, seq_len, mesh, rules)``.

A batch is the ``training.loss`` contract: ``tokens, targets, weights, positions, segment_ids`` of shape [B, T].
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mistral_jax import sharding
from mistral_jax.config import ModelConfig
from mistral_jax.model.transformer import Transformer
from mistral_jax.training.loss import cross_entropy, loss_fn
from mistral_jax.training.optimizer import make_optimizer

BATCH_KEYS = ("tokens", "targets", "weights", "positions", "segment_ids")
_BATCH_DTYPES = dict(tokens=jnp.int32, targets=jnp.int32, weights=jnp.float32, positions=jnp.int32,
                     segment_ids=jnp.int32)


def batch_sharding(mesh: Mesh, rules: sharding.ShardingRules = sharding.DEFAULT_RULES) -> NamedSharding:
    """Sharding of every [B, T] batch array: batch over the data-parallel mesh axes."""
    return NamedSharding(mesh, rules.spec(("batch", "seq"), mesh))


def abstract_batch(batch_size: int, seq_len: int, mesh: Mesh,
                   rules: sharding.ShardingRules = sharding.DEFAULT_RULES) -> dict[str, jax.ShapeDtypeStruct]:
    """``ShapeDtypeStruct``s of a global batch (for AOT lowering)."""
    s = batch_sharding(mesh, rules)
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dt, sharding=s) for k, dt in _BATCH_DTYPES.items()}


def _param_shardings(model_cfg: ModelConfig, mesh: Mesh, rules: sharding.ShardingRules):
    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shard_state = sharding.state_shardings(abstract_state, mesh, rules)
    return graphdef, nnx.to_pure_dict(abstract_state), nnx.to_pure_dict(shard_state)


def make_train_state(model_cfg: ModelConfig, run_cfg: Any, mesh: Mesh,
                     rules: sharding.ShardingRules = sharding.DEFAULT_RULES, *, abstract: bool = False
                     ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Create the train state sharded on ``mesh``.

    Args:
      model_cfg: the network.
      run_cfg: the run ConfigDict (``seed``, ``num_steps``, ``optimizer``).
      mesh: device mesh (``sharding.make_mesh``).
      rules: logical -> mesh axis rules.
      abstract: return ``jax.ShapeDtypeStruct``s (with shardings) instead of arrays; nothing is allocated.

    Returns:
      ``(graphdef, state, shardings)``; optimizer moments get their parameter's sharding, scalars are
      replicated.
    """
    tx, _ = make_optimizer(run_cfg.optimizer, int(run_cfg.num_steps))
    graphdef, abstract_params, param_sh = _param_shardings(model_cfg, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                   transform_non_params=lambda _: replicated)
    shardings = {"params": param_sh, "opt_state": opt_sh, "step": replicated}
    if abstract:
        shapes = {"params": abstract_params, "opt_state": abstract_opt,
                  "step": jax.ShapeDtypeStruct((), jnp.int32)}
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
        return graphdef, state, shardings
    seed = int(run_cfg.seed)

    def init():
        params = nnx.to_pure_dict(nnx.state(Transformer(model_cfg, rngs=nnx.Rngs(seed))))
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    with sharding.use_mesh(mesh, rules):
        state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state, shardings


def _micro_batches(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    if n == 1:
        return jax.tree.map(lambda x: x[None], batch)
    b = batch["tokens"].shape[0]
    if b % n:
        raise ValueError(f"batch of {b} rows is not divisible by grad_accum_steps={n}. "
                         "Fix: make config.batch_size a multiple of config.grad_accum_steps.")
    # [B, T] -> [n, B/n, T]; row i of micro-batch j is row j + n*i so each micro-batch keeps the batch sharding.
    return jax.tree.map(lambda x: x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def train_step(graphdef: Any, tx: optax.GradientTransformation, state: dict[str, Any], batch: dict[str, jax.Array],
               *, grad_accum_steps: int = 1, schedule: Any = None) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """One optimizer step (pure).

    Gradients of the micro-batches are summed, each weighted by its share of the batch's loss-weighted
    tokens, so ``grad_accum_steps`` changes memory use, not the result (up to float rounding).

    Returns:
      ``(new_state, metrics)``; metrics are scalars (and ``expert_load`` ``[L, E]``): ``loss``, ``ce_loss``,
      ``aux_loss``, ``z_loss``, ``tokens``, ``grad_norm``, ``learning_rate``, ``nonfinite``.
    """
    params = state["params"]
    frozen = state.get("frozen")  # LoRA (issue 8): frozen base weights, merged in but never differentiated
    extra = () if frozen is None else (frozen,)
    micro = _micro_batches(batch, grad_accum_steps)
    total = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)

    def micro_loss(p, mb):
        loss, metrics = loss_fn(nnx.merge(graphdef, p, *extra), mb)
        share = metrics["tokens"] / total  # this micro-batch's fraction of the step's tokens
        return loss * share, (metrics, share)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def body(carry, mb):
        g_acc, m_acc = carry
        (_, (metrics, share)), g = grad_fn(params, mb)
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        m_acc = jax.tree.map(lambda a, m: a + m * share, m_acc, {k: v for k, v in metrics.items() if k != "tokens"})
        return (g_acc, m_acc), None

    mb0 = jax.tree.map(lambda x: x[0], micro)
    if grad_accum_steps == 1:  # no accumulators to zero and add into
        (_, (metrics, _)), grads = grad_fn(params, mb0)
        metrics = {k: v for k, v in metrics.items() if k != "tokens"}
    else:
        zeros_g = jax.tree.map(jnp.zeros_like, params)
        m_shape = jax.eval_shape(lambda: grad_fn(params, mb0)[0][1][0])
        zeros_m = {k: jnp.zeros(v.shape, v.dtype) for k, v in m_shape.items() if k != "tokens"}
        (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), micro)
    metrics["tokens"] = jnp.sum(batch["weights"].astype(jnp.float32))

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

    def apply(params, opt_state):
        updates, new_opt = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt

    # A non-finite step keeps the previous params and optimizer state (the checkpoint stays clean); a branch
    # rather than a per-element select, so a finite step reads and writes every array once.
    new_params, new_opt = jax.lax.cond(finite, apply, lambda p, o: (p, o), params, state["opt_state"])
    new_state = {"params": new_params, "opt_state": new_opt,
                 "step": state["step"] + 1, **({"frozen": frozen} if frozen is not None else {})}
    metrics.update(grad_norm=grad_norm, nonfinite=(~finite).astype(jnp.int32))
    if schedule is not None:
        metrics["learning_rate"] = jnp.asarray(schedule(state["step"]), jnp.float32)
    return new_state, metrics


def eval_step(graphdef: Any, params: dict[str, Any] | tuple, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums for held-out loss: ``ce_sum`` (weighted token cross-entropy) and ``tokens`` (sum of weights).

    ``params`` is the state's ``params``, or ``(params, frozen)`` for a LoRA state (``training.sft``).
    """
    model = nnx.merge(graphdef, *params) if isinstance(params, tuple) else nnx.merge(graphdef, params)  # LoRA: pair
    logits = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    ce_sum, n = cross_entropy(logits, batch["targets"], batch["weights"])
    return {"ce_sum": ce_sum, "tokens": n}


def jit_train_step(graphdef: Any, tx: optax.GradientTransformation, shardings: dict[str, Any], mesh: Mesh,
                   rules: sharding.ShardingRules = sharding.DEFAULT_RULES, *, grad_accum_steps: int = 1,
                   schedule: Any = None):
    """``train_step`` jitted once: ``fn(state, batch) -> (state, metrics)``; the state is donated."""
    fn = functools.partial(train_step, graphdef, tx, grad_accum_steps=grad_accum_steps, schedule=schedule)
    bs = batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, in_shardings=(shardings, {k: bs for k in BATCH_KEYS}),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))


def jit_eval_step(graphdef: Any, shardings: dict[str, Any], mesh: Mesh,
                  rules: sharding.ShardingRules = sharding.DEFAULT_RULES):
    """``eval_step`` jitted once: ``fn(params, batch) -> {"ce_sum", "tokens"}``."""
    bs = batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    params_sh = (shardings["params"], shardings["frozen"]) if "frozen" in shardings else shardings["params"]
    return jax.jit(functools.partial(eval_step, graphdef), in_shardings=(params_sh, {k: bs for k in BATCH_KEYS}),
                   out_shardings=replicated)
