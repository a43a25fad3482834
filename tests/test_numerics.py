"""bfloat16 runs keep the sensitive math in float32 and the master weights in float32 (README, Numerics).

Read off the traced program of the training loss with ``dtype="bfloat16"``: matmuls run in bfloat16, while every
floating-point reduction, exp, log and rsqrt (RMSNorm statistics, attention softmax, router softmax and its
logsumexp, cross-entropy) runs in float32, and the Mixtral router's logits come from a float32 matmul.
"""

from __future__ import annotations

import collections

import jax
import jax.extend
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


@pytest.mark.parametrize("preset", ["tiny", "tiny_mixtral"])
@pytest.mark.heavy
def test_weights_cast_before_the_layer_scan_change_memory_not_numbers(preset, monkeypatch):
    """The stacked weights are cast to bfloat16 before the scan over layers (the router stays float32), so the
    backward pass stacks each layer's weight gradient in bfloat16; loss and float32 gradients are bit-identical to
    casting inside each layer, and LoRA's frozen base and float32 adapters are left alone."""
    from mistral_jax import lora
    from mistral_jax.model import transformer

    cfg = getattr(mj.ModelConfig, preset)(dtype="bfloat16")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    batch = dict(tokens=tokens, targets=np.roll(tokens, -1, 1), weights=np.ones(tokens.shape, np.float32))
    graphdef, params = nnx.split(mj.Transformer(cfg, rngs=nnx.Rngs(0)))
    grad_fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch)[0]))

    def stacked(p):  # the output types of the gradient program's last scan: the backward pass over the layers
        out = []

        def walk(jaxpr):
            for eqn in jaxpr.eqns:
                if eqn.primitive.name == "scan":
                    out.append([str(v.aval) for v in eqn.outvars])
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    walk(sub)

        walk(jax.make_jaxpr(jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch)[0]))(p).jaxpr)
        return out[-1]

    w1 = f"[{cfg.n_layers},{cfg.dim},{cfg.hidden_dim}]" if preset == "tiny" else (
        f"[{cfg.n_layers},{cfg.num_experts},{cfg.dim},{cfg.hidden_dim}]")
    cast_first = grad_fn(params), stacked(params)
    monkeypatch.setattr(transformer, "_compute_dtype_weights", lambda state, cfg: state)
    grad_fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch)[0]))
    per_layer = grad_fn(params), stacked(params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), cast_first[0], per_layer[0])
    assert f"bfloat16{w1}" in cast_first[1], cast_first[1]  # the backward scan stacks the gradient in bfloat16
    assert f"bfloat16{w1}" not in per_layer[1], per_layer[1]
    assert f"float32{w1}" in per_layer[1]
    monkeypatch.undo()

    model = mj.Transformer(cfg, rngs=nnx.Rngs(0))
    cast = transformer._compute_dtype_weights(nnx.split(model.layers)[1], model.cfg)
    dtypes = {jax.tree_util.keystr(p): v[...].dtype for p, v in jax.tree_util.tree_leaves_with_path(
        cast, is_leaf=lambda x: isinstance(x, nnx.Variable))}
    assert {d for k, d in dtypes.items() if "gate" not in k} == {jnp.dtype(jnp.bfloat16)}
    assert all(d == jnp.float32 for k, d in dtypes.items() if "gate" in k)
    lora.apply_lora(model, 2, 4.0, "all")
    cast = transformer._compute_dtype_weights(nnx.split(model.layers)[1], model.cfg)
    assert {v[...].dtype for v in jax.tree_util.tree_leaves(cast, is_leaf=lambda x: isinstance(x, nnx.Variable))} == {
        jnp.dtype(jnp.float32)}
