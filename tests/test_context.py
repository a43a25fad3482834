"""Context parallelism (model/context.py): the loss and gradients with the sequence split over the mesh's context
axis equal one device's, for full causal attention (ring, zig-zag layout) and sliding windows (halo) narrower and
wider than a shard, with packed documents crossing shard boundaries; the halo moves O(W) bytes (read from the
compiled HLO)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mistral_jax as mj
from mistral_jax import sharding as sh
from mistral_jax.aot import hlo
from mistral_jax.model import context as ctx
from mistral_jax.model.attention import self_attention_backend
from mistral_jax.training.loss import loss_fn

B, T = 4, 64


def packed_batch(vocab: int, seed: int = 0) -> dict:
    """Rows of three packed documents whose boundaries (21, 45; 9, 50; ...) fall inside the shards of 4 x 16."""
    tok = jax.random.randint(jax.random.key(seed), (B, T + 1), 0, vocab)
    seg = np.ones((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for r, cuts in enumerate(((21, 45), (9, 50), (16, 33), (3, 61))):
        starts = (0, *cuts)
        for i, (a, b) in enumerate(zip(starts, (*cuts, T), strict=True)):
            seg[r, a:b], pos[r, a:b] = i + 1, np.arange(b - a)
    return dict(tokens=tok[:, :-1], targets=tok[:, 1:], weights=jnp.ones((B, T), jnp.float32),
                positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))


def loss_and_grads(cfg, batch, mesh=None, rules=None, attention_impl="auto"):
    cfg = cfg.replace(attention_impl=attention_impl) if attention_impl != "auto" else cfg
    model = mj.Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    fn = jax.value_and_grad(lambda p, b: loss_fn(nnx.merge(graphdef, p), b)[0])
    if mesh is None:
        return jax.jit(fn)(params, batch), None
    model = mj.Transformer(cfg, rngs=nnx.Rngs(0), mesh=mesh, rules=rules)
    graphdef, params = nnx.split(model)
    pshard = sh.state_shardings(params, mesh, rules)
    bs = sh.batch_sharding(mesh, rules)
    with sh.use_mesh(mesh, rules):
        jitted = jax.jit(fn, in_shardings=(pshard, {k: bs for k in batch}), out_shardings=(sh.replicated(mesh), pshard))
        return jitted(params, batch), self_attention_backend(model.cfg, model.backends, T, True)


CASES = {  # name -> (config, mesh sizes, expected backend)
    "full_ring_cp4": (mj.ModelConfig.tiny(sliding_window=None), dict(fsdp=2, context=4), "ring"),
    "full_ring_cp2_fsdp4": (mj.ModelConfig.tiny(sliding_window=None), dict(fsdp=4, context=2), "ring"),
    "swa_narrow_halo": (mj.ModelConfig.tiny(sliding_window=7), dict(fsdp=2, context=4), "halo"),  # W < shard 16
    "swa_wide_halo": (mj.ModelConfig.tiny(sliding_window=27), dict(fsdp=2, context=4), "halo"),  # 2 neighbours
    "mixtral_ring": (mj.ModelConfig.tiny_mixtral(), dict(fsdp=2, context=4), "ring"),
    "mixtral_ep_swa": (mj.ModelConfig.tiny_mixtral(sliding_window=12), dict(context=4, expert=2), "halo"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_context_parallel_equals_one_device(case, monkeypatch):
    monkeypatch.setattr(ctx, "QUERY_CHUNK", 8)  # the loop over query chunks inside a shard runs 2+ steps
    cfg, sizes, backend = CASES[case]
    batch = packed_batch(cfg.vocab_size)
    (loss0, grads0), _ = loss_and_grads(cfg, batch)
    mesh = sh.make_mesh(**sizes)
    rules = sh.rules_from_config({}, mesh)
    (loss, grads), chosen = loss_and_grads(cfg, batch, mesh, rules)
    assert chosen == backend
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-5, atol=1e-6)
    flat0 = dict(jax.tree_util.tree_flatten_with_path(grads0)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat0[path]), atol=1e-5, rtol=1e-5,
                                   err_msg=f"{case} {jax.tree_util.keystr(path)}")


@pytest.mark.heavy
def test_ring_with_a_window_equals_one_device():
    """The ring also takes a window (forced by attention_impl=ring): the mask inside each block applies it."""
    cfg = mj.ModelConfig.tiny(sliding_window=11, n_layers=1)
    batch = packed_batch(cfg.vocab_size, seed=3)
    (loss0, grads0), _ = loss_and_grads(cfg, batch)
    mesh = sh.make_mesh(fsdp=2, context=4)
    (loss, grads), chosen = loss_and_grads(cfg, batch, mesh, sh.rules_from_config({}, mesh), attention_impl="ring")
    assert chosen == "ring"
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_zigzag_layout_round_trips_and_balances():
    x = jnp.arange(2 * 32).reshape(2, 32)
    z = ctx.to_zigzag(x, 4)
    np.testing.assert_array_equal(ctx.from_zigzag(z, 4), x)
    # shard i holds chunks i and 7 - i of 8 chunks of 4: the same number of causal pairs on every shard
    shards = np.asarray(z[0]).reshape(4, 8)
    np.testing.assert_array_equal(shards[1], [4, 5, 6, 7, 24, 25, 26, 27])
    assert len({int(np.sum(s + 1)) for s in shards}) == 1


def _permute_bytes(cfg, impl: str) -> float:
    mesh = sh.make_mesh(fsdp=2, context=4)
    rules = sh.rules_from_config({}, mesh)
    model = mj.Transformer(cfg.replace(attention_impl=impl), rngs=nnx.Rngs(0), mesh=mesh, rules=rules)
    graphdef, params = nnx.split(model)
    batch = dict(tokens=jnp.zeros((2, 1024), jnp.int32), targets=jnp.zeros((2, 1024), jnp.int32),
                 weights=jnp.ones((2, 1024), jnp.float32))
    pshard = sh.state_shardings(params, mesh, rules)
    bs = sh.batch_sharding(mesh, rules)
    fn = jax.value_and_grad(lambda p, b: loss_fn(nnx.merge(graphdef, p), b)[0])
    with sh.use_mesh(mesh, rules):
        text = jax.jit(fn, in_shardings=(pshard, {k: bs for k in batch})).lower(params, batch).compile().as_text()
    traffic = hlo.collective_traffic(text)
    return traffic.kinds["collective-permute"]["bytes"]


def test_halo_moves_a_quarter_of_the_ring_bytes_or_less():
    """SWA W=64, T=1024 on 4 context shards: the compiled program's collective-permute bytes (forward and
    backward) with the halo are <= 1/4 of the ring's."""
    cfg = mj.ModelConfig.tiny(sliding_window=64, n_layers=1, scan_layers=False)
    halo, ring = _permute_bytes(cfg, "halo"), _permute_bytes(cfg, "ring")
    assert 0 < halo <= ring / 4, (halo, ring)


@pytest.mark.slow
def test_train_steps_with_accumulation_and_remat_equal_one_device():
    """Two optimizer steps of 2 accumulated micro-batches, full remat, scanned layers, halo (window 7) and ring
    (Mixtral): the losses and the updated parameters with context=4 x fsdp=2 equal one device's."""
    from configs import base
    from mistral_jax.training import step as step_lib
    from mistral_jax.training.optimizer import make_optimizer

    rc = base.get_config()
    rc.optimizer.warmup_steps, rc.optimizer.schedule, rc.optimizer.learning_rate = 0, "constant", 1e-3
    rc.optimizer.eps = 1e-3  # Adam's m / sqrt(v) would turn a 1e-9 gradient difference into a full step
    for cfg in (mj.ModelConfig.tiny(sliding_window=7, remat="full"), mj.ModelConfig.tiny_mixtral(remat="full")):
        batch = packed_batch(cfg.vocab_size, seed=5)
        out = []
        for mesh in (sh.make_mesh(fsdp=1, devices=jax.devices()[:1]), sh.make_mesh(fsdp=2, context=4)):
            rules = sh.rules_from_config({}, mesh)
            graphdef, state, shardings = step_lib.make_train_state(cfg, rc, mesh, rules)
            tx, sched = make_optimizer(rc.optimizer, int(rc.num_steps))
            step = step_lib.jit_train_step(graphdef, tx, shardings, mesh, rules, grad_accum_steps=2, schedule=sched)
            losses = []
            with sh.use_mesh(mesh, rules):
                for _ in range(2):
                    state, metrics = step(state, batch)
                    losses.append(float(metrics["loss"]))
            out.append((losses, jax.tree.map(np.asarray, state["params"])))
        (l0, p0), (l1, p1) = out
        np.testing.assert_allclose(l1, l0, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p0), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
