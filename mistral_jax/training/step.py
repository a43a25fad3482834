"""Pure, jittable training and eval steps over a plain-pytree train state.

The train state is a dict ``{"params", "frozen", "opt_state", "step"}``: ``params`` are the trainable variables
(the model's variables selected by the recipe's ``trainable`` filter, ``nnx.Param`` by default), ``frozen`` the
rest of the model (merged into the forward pass, never differentiated, not in the optimizer state and not
checkpointed; empty when every weight trains), ``opt_state`` the optax state of ``params`` and ``step`` an
int32 scalar. Params are float32 master weights (``ModelConfig.param_dtype``); the model computes in
``ModelConfig.dtype``.

Public functions (all usable on abstract inputs for ``jax.jit(...).lower(...).compile()``):

* ``state_layout(abstract_model, tx, mesh, rules, trainable)`` -> ``(graphdef, abstract_state, shardings)``: the
  train state of a model as ``ShapeDtypeStruct``s carrying their shardings, and the ``NamedSharding`` tree.
* ``init_state(model, tx, shardings, mesh, rules, trainable)``: the real state of a built (sharded) model;
  ``split_model`` gives its ``(params, frozen)`` alone.
* ``make_train_state(model_cfg, run_cfg, mesh, rules=DEFAULT_RULES, *, abstract=False)``
  -> ``(graphdef, state, shardings)``: the state of a freshly initialised ``Transformer`` (seed ``run_cfg.seed``).
* ``train_step(graphdef, tx, state, batch, *, grad_accum_steps=1, schedule=None, objective=TOKEN_LOSS)`` ->
  ``(state, metrics)``: one optimizer step; a scan over ``grad_accum_steps`` micro-batches; a non-finite loss or
  gradient leaves params and optimizer state unchanged and sets ``metrics["nonfinite"] = 1``.
* ``eval_step(graphdef, params, frozen, batch, objective=TOKEN_LOSS)`` -> metric sums (``ce_sum``, ``tokens`` for
  the token loss); ``objective.eval_summary`` turns the sums of several batches into metrics.
* ``jit_train_step(graphdef, tx, shardings, mesh, rules, *, grad_accum_steps, schedule, objective)`` and
  ``jit_eval_step(graphdef, shardings, mesh, rules, objective)``: the steps jitted once with in/out shardings
  (state donated). Call them inside ``sharding.use_mesh(mesh, rules)``.
* ``batch_shardings(objective, mesh, rules)`` (one per batch array; ``sharding.batch_sharding`` is the ``[B, T]``
  one) and ``abstract_batch(batch_size, seq_len, mesh, rules, objective)``.

What the step minimises is an ``Objective`` (the run's recipe gives it): the batch it reads (names, shapes, logical
axes), the loss of the model on a (micro-)batch, what the loss needs besides the trained weights computed once per
batch without gradient (``prepare``: e.g. a frozen reference model's outputs), and the eval sums. ``TOKEN_LOSS``,
the default, is ``training.loss``: ``tokens, targets, weights, positions, segment_ids`` of shape [B, T]. An
objective with ``keeps_initial`` has the state's ``frozen`` part hold ``{"model": the model's frozen variables,
"initial": a copy of the initial trained weights}`` (rebuilt from the initial model on resume, never checkpointed).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mistral_jax import sharding
from mistral_jax.config import ModelConfig
from mistral_jax.model import backends
from mistral_jax.model.transformer import Transformer
from mistral_jax.training.loss import loss_fn, token_cross_entropy
from mistral_jax.training.optimizer import make_optimizer

_BATCH_DTYPES = dict(tokens=jnp.int32, targets=jnp.int32, weights=jnp.float32, positions=jnp.int32,
                     segment_ids=jnp.int32)


# ------------------------------------------------------------------------------------------------ objective
@dataclasses.dataclass(frozen=True)
class Objective:
    """What the train step minimises and the eval step measures: the mean token cross-entropy of
    ``training.loss`` (plus the MoE aux losses) over ``[B, T]`` batches. Recipes with another objective subclass it.

    Attributes:
      keeps_initial: the state's ``frozen`` part also holds a copy of the initial trained weights
        (``{"model": ..., "initial": ...}``), e.g. for a loss measured against the starting model.
      count_metrics: metrics summed over micro-batches (the others are averaged, each micro-batch weighted by its
        share of ``weight``).
    """

    keeps_initial: bool = False
    count_metrics: tuple[str, ...] = ("tokens",)

    def batch_spec(self, batch_size: int, seq_len: int) -> dict[str, tuple[tuple[int, ...], Any, tuple]]:
        """``{name: (shape, dtype, logical axes)}`` of a global batch."""
        return {k: ((batch_size, seq_len), dt, ("batch", "seq")) for k, dt in _BATCH_DTYPES.items()}

    def weight(self, batch: dict[str, jax.Array]) -> jax.Array:
        """The batch's size in the unit the loss averages over (here: loss-weighted target tokens)."""
        return jnp.sum(batch["weights"].astype(jnp.float32))

    def model(self, graphdef: Any, params: Any, frozen: Any) -> nnx.Module:
        """The model to differentiate: ``params`` merged with the frozen variables."""
        return nnx.merge(graphdef, params, frozen["model"] if self.keeps_initial else frozen)

    def prepare(self, graphdef: Any, params: Any, frozen: Any, batch: dict[str, jax.Array]) -> Any:
        """What the loss needs besides the trained weights, computed once per (micro-)batch outside the gradient."""
        del graphdef, params, frozen, batch
        return None

    def loss(self, model: nnx.Module, batch: dict[str, jax.Array], prepared: Any
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(scalar loss, metrics)`` of one (micro-)batch."""
        del prepared
        return loss_fn(model, batch)

    def eval_sums(self, graphdef: Any, params: Any, frozen: Any, batch: dict[str, jax.Array]
                  ) -> dict[str, jax.Array]:
        """Sums over one held-out batch that ``eval_summary`` turns into metrics."""
        model = self.model(graphdef, params, frozen)
        ce_sum, n, _ = token_cross_entropy(model, batch)  # chunked like the training loss (cfg.loss_chunk_size)
        return {"ce_sum": ce_sum, "tokens": n}

    def eval_summary(self, sums: dict[str, float]) -> dict[str, float]:
        """Held-out metrics from the sums of ``eval_sums`` over the eval batches."""
        loss = sums["ce_sum"] / max(sums["tokens"], 1.0)
        return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "tokens": sums["tokens"]}


TOKEN_LOSS = Objective()


def batch_shardings(objective: Objective, mesh: Mesh, rules: sharding.ShardingRules = sharding.DEFAULT_RULES
                    ) -> dict[str, NamedSharding]:
    """Sharding of each array of ``objective``'s batches (rows over the data-parallel mesh axes)."""
    return {k: NamedSharding(mesh, rules.spec(axes, mesh)) for k, (_, _, axes) in objective.batch_spec(1, 1).items()}


def abstract_batch(batch_size: int, seq_len: int, mesh: Mesh,
                   rules: sharding.ShardingRules = sharding.DEFAULT_RULES, objective: Objective = TOKEN_LOSS
                   ) -> dict[str, jax.ShapeDtypeStruct]:
    """``ShapeDtypeStruct``s of a global batch (for AOT lowering)."""
    sh = batch_shardings(objective, mesh, rules)
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=sh[k])
            for k, (shape, dt, _) in objective.batch_spec(batch_size, seq_len).items()}


def state_layout(abstract_model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh,
                 rules: sharding.ShardingRules = sharding.DEFAULT_RULES, trainable: Any = nnx.Param, *,
                 keep_initial: bool = False) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The train state of ``abstract_model`` (``nnx.eval_shape`` of the model to train), nothing allocated.

    Args:
      abstract_model: the model as it will be trained (abstract arrays carrying logical-axis metadata).
      tx: the optimizer; its state covers ``params`` only.
      mesh: device mesh.
      rules: logical -> mesh axis rules.
      trainable: ``nnx`` filter of the trained variables; every other variable is ``frozen``.
      keep_initial: ``frozen`` is ``{"model": the frozen variables, "initial": a copy of the trained ones}``
        (``Objective.keeps_initial``).

    Returns:
      ``(graphdef, abstract_state, shardings)``: ``abstract_state`` holds ``ShapeDtypeStruct``s with their
      sharding (what ``Checkpointer.restore_latest`` and ``lower`` take); optimizer moments get their
      parameter's sharding, scalars are replicated.
    """
    # the model's backends (splash's shard_map, expert parallelism) chosen for this mesh, once
    graphdef, params, frozen = nnx.split(backends.bind(abstract_model, mesh, rules), trainable, ...)
    param_sh = nnx.to_pure_dict(sharding.state_shardings(params, mesh, rules))
    frozen_sh = nnx.to_pure_dict(sharding.state_shardings(frozen, mesh, rules))
    params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
    if keep_initial:
        frozen, frozen_sh = {"model": frozen, "initial": params}, {"model": frozen_sh, "initial": param_sh}
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = {"params": param_sh, "frozen": frozen_sh,
                 "opt_state": sharding.opt_state_shardings(tx, params, param_sh, mesh), "step": replicated}
    shapes = {"params": params, "frozen": frozen, "opt_state": jax.eval_shape(tx.init, params),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    return graphdef, state, shardings


def split_model(model: nnx.Module, shardings: dict[str, Any], trainable: Any = nnx.Param, *,
                keep_initial: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(params, frozen)`` of a built model, placed on the train state's shardings (``state_layout``'s
    ``keep_initial``: ``frozen["initial"]`` is a copy of ``params``, its own buffers: the state is donated)."""
    _, params, frozen = nnx.split(model, trainable, ...)
    params = jax.device_put(nnx.to_pure_dict(params), shardings["params"])
    if not keep_initial:
        return params, jax.device_put(nnx.to_pure_dict(frozen), shardings["frozen"])
    frozen = jax.device_put(nnx.to_pure_dict(frozen), shardings["frozen"]["model"])
    initial = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings["frozen"]["initial"])(params)
    return params, {"model": frozen, "initial": initial}


def init_state(model: nnx.Module, tx: optax.GradientTransformation, shardings: dict[str, Any], mesh: Mesh,
               rules: sharding.ShardingRules = sharding.DEFAULT_RULES, trainable: Any = nnx.Param, *,
               keep_initial: bool = False) -> dict[str, Any]:
    """The train state at step 0 of a built model (its arrays already sharded, e.g. ``sharding.create_sharded``
    or ``load_pretrained(..., mesh=mesh)``): its variables split by ``trainable`` and a fresh optimizer state."""
    params, frozen = split_model(model, shardings, trainable, keep_initial=keep_initial)
    with sharding.use_mesh(mesh, rules):
        opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    return {"params": params, "frozen": frozen, "opt_state": opt_state,
            "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])}


def fresh_model(model_cfg: ModelConfig, seed: int, mesh: Mesh,
                rules: sharding.ShardingRules = sharding.DEFAULT_RULES) -> Transformer:
    """A randomly initialised ``Transformer`` created directly in its shards."""
    return sharding.create_sharded(lambda: Transformer(model_cfg, rngs=nnx.Rngs(seed), mesh=mesh, rules=rules), mesh,
                                   rules)


def make_train_state(model_cfg: ModelConfig, run_cfg: Any, mesh: Mesh,
                     rules: sharding.ShardingRules = sharding.DEFAULT_RULES, *, abstract: bool = False
                     ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The train state of a freshly initialised ``Transformer`` (every weight trains), sharded on ``mesh``.

    Args:
      model_cfg: the network.
      run_cfg: the run ConfigDict (``seed``, ``num_steps``, ``optimizer``).
      mesh: device mesh (``sharding.make_mesh``).
      rules: logical -> mesh axis rules.
      abstract: return ``jax.ShapeDtypeStruct``s (with shardings) instead of arrays; nothing is allocated.

    Returns:
      ``(graphdef, state, shardings)`` as ``state_layout`` / ``init_state`` give them.
    """
    tx, _ = make_optimizer(run_cfg.optimizer, int(run_cfg.num_steps))
    graphdef, abstract_state, shardings = state_layout(
        nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))), tx, mesh, rules)
    if abstract:
        return graphdef, abstract_state, shardings
    return graphdef, init_state(fresh_model(model_cfg, int(run_cfg.seed), mesh, rules), tx, shardings, mesh,
                                rules), shardings


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
               *, grad_accum_steps: int = 1, schedule: Any = None, objective: Objective = TOKEN_LOSS
               ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """One optimizer step (pure) of ``objective``.

    Gradients of the micro-batches are summed, each weighted by its share of the batch's ``objective.weight``
    (loss-weighted tokens for the token loss), so ``grad_accum_steps`` changes memory use, not the result (up to
    float rounding). ``objective.prepare`` runs once per micro-batch, outside the gradient.

    Returns:
      ``(new_state, metrics)``; metrics are scalars (and ``expert_load`` ``[L, E]``): the objective's (``loss``,
      ``ce_loss``, ``aux_loss``, ``z_loss``, ``tokens`` for the token loss), ``grad_norm``, ``learning_rate``,
      ``nonfinite``.
    """
    params, frozen = state["params"], state["frozen"]  # frozen: merged into the model, never differentiated
    micro = _micro_batches(batch, grad_accum_steps)
    total = jnp.maximum(objective.weight(batch), 1.0)
    counts = objective.count_metrics

    def micro_loss(p, mb, prepared):
        with jax.named_scope("forward"):  # profiler scopes: forward, backward (its transpose), optimizer
            loss, metrics = objective.loss(objective.model(graphdef, p, frozen), mb, prepared)
        share = objective.weight(mb) / total  # this micro-batch's fraction of the step's loss weight
        return loss * share, (metrics, share)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def grads_of(mb):
        prepared = jax.lax.stop_gradient(objective.prepare(graphdef, params, frozen, mb))
        with jax.named_scope("backward"):
            return grad_fn(params, mb, prepared)

    def body(carry, mb):
        g_acc, m_acc = carry
        (_, (metrics, share)), g = grads_of(mb)
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        m_acc = {k: a + (metrics[k] if k in counts else metrics[k] * share) for k, a in m_acc.items()}
        return (g_acc, m_acc), None

    mb0 = jax.tree.map(lambda x: x[0], micro)
    if grad_accum_steps == 1:  # no accumulators to zero and add into
        (_, (metrics, _)), grads = grads_of(mb0)
    else:
        zeros_g = jax.tree.map(jnp.zeros_like, params)
        m_shape = jax.eval_shape(lambda: grads_of(mb0)[0][1][0])
        zeros_m = {k: jnp.zeros(v.shape, v.dtype) for k, v in m_shape.items()}
        (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), micro)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

    def apply(params, opt_state):
        with jax.named_scope("optimizer"):
            updates, new_opt = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt

    # A non-finite step keeps the previous params and optimizer state (the checkpoint stays clean); a branch
    # rather than a per-element select, so a finite step reads and writes every array once.
    new_params, new_opt = jax.lax.cond(finite, apply, lambda p, o: (p, o), params, state["opt_state"])
    new_state = {"params": new_params, "frozen": frozen, "opt_state": new_opt, "step": state["step"] + 1}
    metrics = dict(metrics)
    metrics.update(grad_norm=grad_norm, nonfinite=(~finite).astype(jnp.int32))
    if schedule is not None:
        metrics["learning_rate"] = jnp.asarray(schedule(state["step"]), jnp.float32)
    return new_state, metrics


def eval_step(graphdef: Any, params: dict[str, Any], frozen: dict[str, Any], batch: dict[str, jax.Array],
              objective: Objective = TOKEN_LOSS) -> dict[str, jax.Array]:
    """Sums over one held-out batch (token loss: ``ce_sum``, the weighted token cross-entropy, and ``tokens``)."""
    return objective.eval_sums(graphdef, params, frozen, batch)


def jit_train_step(graphdef: Any, tx: optax.GradientTransformation, shardings: dict[str, Any], mesh: Mesh,
                   rules: sharding.ShardingRules = sharding.DEFAULT_RULES, *, grad_accum_steps: int = 1,
                   schedule: Any = None, objective: Objective = TOKEN_LOSS):
    """``train_step`` jitted once: ``fn(state, batch) -> (state, metrics)``; the state is donated."""
    fn = functools.partial(train_step, graphdef, tx, grad_accum_steps=grad_accum_steps, schedule=schedule,
                           objective=objective)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, in_shardings=(shardings, batch_shardings(objective, mesh, rules)),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))


def jit_eval_step(graphdef: Any, shardings: dict[str, Any], mesh: Mesh,
                  rules: sharding.ShardingRules = sharding.DEFAULT_RULES, objective: Objective = TOKEN_LOSS):
    """``eval_step`` jitted once: ``fn(params, frozen, batch) -> sums`` (``objective.eval_sums``)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(functools.partial(eval_step, graphdef, objective=objective),
                   in_shardings=(shardings["params"], shardings["frozen"], batch_shardings(objective, mesh, rules)),
                   out_shardings=replicated)
