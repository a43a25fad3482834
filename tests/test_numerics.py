"""bfloat16 runs keep the sensitive math in float32 and the master weights in float32 (README, Numerics).

Read off the traced program of the training loss with ``dtype="bfloat16"``: matmuls run in bfloat16, while every
floating-point reduction, exp, log and rsqrt (RMSNorm statistics, attention softmax, router softmax and its
logsumexp, cross-entropy) runs in float32, and the Mixtral router's logits come from a float32 matmul.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mistral_jax as mj
from configs import base
from mistral_jax import sharding
from mistral_jax.training import step as step_lib
from mistral_jax.training.loss import loss_fn

SENSITIVE = ("reduce_sum", "reduce_max", "exp", "log", "rsqrt")


def _ops(fn, *args) -> collections.Counter:
    """(primitive, first input dtype, output shape's last dim) of every equation, nested jaxprs included."""
    seen: collections.Counter = collections.Counter()

    def walk(jaxpr):
        for e in jaxpr.eqns:
            last = e.outvars[0].aval.shape[-1] if e.outvars[0].aval.shape else None
            seen[(e.primitive.name, str(e.invars[0].aval.dtype) if e.invars else "", last)] += 1
            for p in e.params.values():
                for sub in p if isinstance(p, (list, tuple)) else (p,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return seen


def _low_precision_math(ops) -> list:
    return [k for k in ops if k[0] in SENSITIVE and k[1] in ("bfloat16", "float16")]


def _batch(T=16):
    tok = np.random.default_rng(0).integers(0, 512, (2, T)).astype(np.int32)
    return dict(tokens=tok, targets=np.roll(tok, -1, 1), weights=np.ones((2, T), np.float32),
                positions=np.broadcast_to(np.arange(T, dtype=np.int32), (2, T)).copy(),
                segment_ids=np.ones((2, T), np.int32))


def test_checker_flags_bf16_softmax():
    """The check can fail: a softmax computed in bfloat16 shows up as a bfloat16 exp / reduce."""
    x = jnp.ones((4, 8), jnp.bfloat16)
    assert _low_precision_math(_ops(jax.nn.softmax, x))
    assert not _low_precision_math(_ops(lambda x: jax.nn.softmax(x.astype(jnp.float32)), x))


@pytest.mark.parametrize("preset", ["tiny", "tiny_mixtral"])
@pytest.mark.parametrize("attention", ["reference", "blocked"])
def test_bf16_loss_keeps_sensitive_math_in_float32(preset, attention):
    cfg = mj.ModelConfig.preset(preset).replace(dtype="bfloat16", attention_impl=attention, attention_block_size=8,
                                                sliding_window=8)
    graphdef, state = nnx.split(mj.Transformer(cfg, rngs=nnx.Rngs(0)))
    ops = _ops(lambda s: loss_fn(nnx.merge(graphdef, s), _batch())[0], state)
    assert not _low_precision_math(ops), _low_precision_math(ops)
    assert ops[("dot_general", "bfloat16", cfg.dim)] > 0  # the projections do run in bfloat16
    if cfg.is_moe:  # router logits [tokens, experts] from a float32 matmul, none in bfloat16
        assert ops[("dot_general", "float32", cfg.num_experts)] >= 1
        assert ops[("dot_general", "bfloat16", cfg.num_experts)] == 0


@pytest.mark.slow
def test_bf16_training_keeps_float32_master_weights():
    rc = base.get_config()
    cfg = mj.ModelConfig.tiny_mixtral(dtype="bfloat16")
    mesh = sharding.mesh_from_config(dict(fsdp=-1))
    rules = sharding.rules_from_config(dict(rules="auto"), mesh)
    graphdef, state, shardings = step_lib.make_train_state(cfg, rc, mesh, rules)
    floats = [x for x in jax.tree.leaves(state["params"]) + jax.tree.leaves(state["opt_state"])
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}  # params and Adam moments
    from mistral_jax.training.optimizer import make_optimizer

    tx, sched = make_optimizer(rc.optimizer, int(rc.num_steps))
    train_step = step_lib.jit_train_step(graphdef, tx, shardings, mesh, rules, schedule=sched)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    batch = {k: jax.tree.map(lambda x: jnp.concatenate([x] * 4), v) for k, v in batch.items()}  # 8 rows
    with sharding.use_mesh(mesh, rules):
        new, metrics = train_step(state, batch)
    assert {x.dtype for x in jax.tree.leaves(new["params"])} == {jnp.dtype(jnp.float32)}
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
