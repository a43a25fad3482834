"""MoE backends: the grouped matmul and the dropless path against the dense oracle."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mistral_jax as mj
from mistral_jax.model import backends, cpu, moe
from mistral_jax.model.kernels import tpu_grouped_matmul


@pytest.mark.parametrize("rows,groups,blocks,short", [
    (100, 8, (64, 16), 0),
    *(pytest.param(*case, marks=pytest.mark.slow)
      for case in [(37, 4, (8,), 0), (5, 3, (64, 8), 0), (40, 5, (8, 2), 7), (300, 3, (64, 16, 4), 0)])])
@pytest.mark.heavy
def test_cpu_expert_mlp_equals_per_group_swiglu(rows, groups, blocks, short):
    """The CPU looped SwiGLU experts against per-group numpy products, and its four gradients against the
    accelerator form (three ``ragged_dot`` calls), with an empty group, blocks larger than groups or than all rows,
    and rows past the last group (0, gradient 0)."""
    rng = np.random.default_rng(rows)
    sizes = np.bincount(rng.integers(0, groups, rows), minlength=groups)
    sizes[0] = 0
    sizes[-1] += rows - short - sizes.sum()
    d, f = 6, 5
    x = rng.standard_normal((rows, d)).astype(np.float32)
    w1, w3 = (rng.standard_normal((groups, d, f)).astype(np.float32) for _ in range(2))
    w2 = rng.standard_normal((groups, f, d)).astype(np.float32)
    silu = lambda a: a / (1 + np.exp(-a))
    ends = np.cumsum(sizes)
    expected = np.concatenate([(silu(x[e - n:e] @ w1[g]) * (x[e - n:e] @ w3[g])) @ w2[g]
                               for g, (n, e) in enumerate(zip(sizes, ends, strict=True))]
                              + [np.zeros((short, d), np.float32)])
    gs = jnp.asarray(sizes, jnp.int32)
    args = tuple(jnp.asarray(a) for a in (x, w1, w3, w2))
    np.testing.assert_allclose(np.asarray(cpu.looped_expert_mlp(*args, gs, blocks)), expected, rtol=1e-5, atol=1e-4)
    dy = jnp.asarray(rng.standard_normal((rows, d)).astype(np.float32))
    forms = {"cpu": lambda *a: cpu.looped_expert_mlp(*a, gs, blocks),
             "gpu": lambda *a: backends.EXPERT_MLP["ragged_dot"].fn(*a, gs)}  # "gpu": ragged_dot, also on CPU
    grads = {p: jax.grad(lambda *a, f=f: (f(*a) * dy).sum(), argnums=(0, 1, 2, 3))(*args) for p, f in forms.items()}
    for g, r in zip(grads["cpu"], grads["gpu"], strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-3)
    assert not np.asarray(grads["cpu"][0])[rows - short:].any()


def test_tpu_grouped_matmul_equals_ragged_dot_with_grads():
    """The TPU form (its own input-gradient rule) against ``ragged_dot`` and its autodiff, run on CPU: an empty
    group and rows past the last group included."""
    rng = np.random.default_rng(1)
    gs = jnp.asarray([3, 0, 5, 2], jnp.int32)  # 10 of 12 rows
    x, w, dy = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((12, 6), (4, 6, 7), (12, 7)))
    np.testing.assert_allclose(np.asarray(tpu_grouped_matmul(x, w, gs)), np.asarray(jax.lax.ragged_dot(x, w, gs)))
    ours = jax.grad(lambda x, w: (tpu_grouped_matmul(x, w, gs) * dy).sum(), argnums=(0, 1))(x, w)
    ref = jax.grad(lambda x, w: (jax.lax.ragged_dot(x, w, gs) * dy).sum(), argnums=(0, 1))(x, w)
    for g, r in zip(ours, ref, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)
    assert not np.asarray(ours[0])[10:].any()


def test_dispatch_and_combine_equal_indexing_with_grads():
    """The permutation forms (gradients gather, no scatter) against plain indexing and its autodiff."""
    rng = np.random.default_rng(0)
    m, top_k, e, d = 7, 3, 4, 5
    idx = jnp.asarray(np.stack([rng.permutation(e)[:top_k] for _ in range(m)]), jnp.int32)
    x, w = jnp.asarray(rng.standard_normal((m, d)), jnp.float32), jnp.asarray(rng.random((m, top_k)), jnp.float32)
    a = moe.sort_assignments(idx, e)
    np.testing.assert_array_equal(np.asarray(a.group_sizes), np.bincount(np.asarray(idx).ravel(), minlength=e))
    np.testing.assert_array_equal(np.asarray(idx).ravel()[np.asarray(a.order)], np.sort(np.asarray(idx).ravel()))
    token = a.order // top_k

    def ours(x, w):
        y = moe.dispatch(x, a.order, a.inverse) * 1.5 + 1  # stands in for the experts
        return moe.combine(y, a, w)

    def plain(x, w):
        y = x[token] * 1.5 + 1
        return jnp.zeros_like(x).at[token].add(y * w.reshape(-1)[a.order][:, None])

    np.testing.assert_allclose(np.asarray(ours(x, w)), np.asarray(plain(x, w)), rtol=1e-6)
    dy = jnp.asarray(rng.standard_normal((m, d)), jnp.float32)
    g_ours = jax.grad(lambda x, w: (ours(x, w) * dy).sum(), argnums=(0, 1))(x, w)
    g_plain = jax.grad(lambda x, w: (plain(x, w) * dy).sum(), argnums=(0, 1))(x, w)
    for g, r in zip(g_ours, g_plain, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.slow
def test_ragged_equals_dense_oracle_with_grads(top_k):
    cfg = mj.ModelConfig.tiny_mixtral(num_experts=5, num_experts_per_tok=top_k)
    layer = moe.MoE(cfg, rngs=nnx.Rngs(top_k))
    x = jax.random.normal(jax.random.key(0), (3, 11, cfg.dim))

    def run(impl):
        layer.cfg = layer.cfg.replace(moe_impl=impl)  # (layer.cfg: the config with its platform filled in)
        layer.backends = backends.resolve(layer.cfg)
        y, stats = layer(x)
        g = nnx.grad(lambda m: (m(x)[0] ** 2).sum())(layer)
        return y, stats, g

    dense, ragged = run("dense"), run("ragged")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5), dense, ragged)


def test_routing_renormalises_top_k():
    logits = jnp.array([[2.0, 1.0, 0.5, -1.0]])
    probs, w, idx = moe.route(logits, 2)
    p = np.exp([2.0, 1.0, 0.5, -1.0]) / np.exp([2.0, 1.0, 0.5, -1.0]).sum()
    np.testing.assert_allclose(np.asarray(probs)[0], p, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(idx)[0], [0, 1])
    np.testing.assert_allclose(np.asarray(w)[0], p[:2] / p[:2].sum(), rtol=1e-6)


# ------------------------------------------------------------------------------- expert parallelism (8 CPU devices)
def test_ragged_all_to_all_cpu_exchange_follows_the_primitive_semantics():
    """The CPU stand-in for ``jax.lax.ragged_all_to_all`` (XLA:CPU has no such op): peer j's block
    ``operand[input_offsets[j]:][:send_sizes[j]]`` lands at ``output_offsets[j]`` of peer j's output."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mistral_jax import sharding as sh

    p, n, r = 4, 6, 10
    mesh = sh.make_mesh(fsdp=2, expert=p)
    rng = np.random.default_rng(0)
    sends = np.zeros((p, p), np.int32)  # sends[src, dst]
    for s in range(p):
        sends[s] = np.bincount(rng.integers(0, p, rng.integers(0, n + 1)), minlength=p)[:p]
    while (sends.sum(0) > r).any():
        sends[sends.argmax() // p, sends.argmax() % p] -= 1
    in_off = np.cumsum(sends, 1) - sends
    out_off = np.cumsum(sends, 0) - sends  # out_off[src, dst]: rows of earlier sources come first at dst
    operand = rng.standard_normal((p, n, 3)).astype(np.float32)
    expected = np.zeros((p, r, 3), np.float32)
    for s in range(p):
        for d in range(p):
            expected[d, out_off[s, d]:out_off[s, d] + sends[s, d]] = operand[s, in_off[s, d]:in_off[s, d] + sends[s, d]]

    def exchange(x, io, ss, oo, rs):
        return cpu.dense_all_to_all(x[0], jnp.zeros((r, 3)), io[0], ss[0], oo[0], rs[0], axis_name="expert")[None]

    fn = jax.shard_map(exchange, mesh=mesh, in_specs=P("expert"), out_specs=P("expert"), check_vma=False)
    args = [jax.device_put(a, NamedSharding(mesh, P("expert"))) for a in (operand, in_off, sends, out_off, sends.T)]
    np.testing.assert_array_equal(np.asarray(jax.jit(fn)(*args)), expected)


_EP_CASES = {  # mesh, experts, dispatch, chunk_tokens: one expert per shard, two per shard with tensor parallelism
    "a2a_one_expert_per_shard": (dict(fsdp=1, expert=8), 8, "all_to_all", 0),
    "a2a_two_experts_tensor": (dict(fsdp=1, tensor=2, expert=4), 8, "all_to_all", 0),
    "a2a_fsdp_chunked": (dict(fsdp=2, expert=4), 8, "all_to_all", 4),
    "a2a_uneven_chunks_top1": (dict(fsdp=2, expert=4), 4, "all_to_all", 3),
    "all_gather": (dict(fsdp=2, expert=4), 8, "all_gather", 0),
}


@pytest.mark.parametrize("case", [c if c == "a2a_one_expert_per_shard" else pytest.param(c, marks=pytest.mark.slow)
                                  for c in sorted(_EP_CASES)])
@pytest.mark.heavy
def test_expert_parallel_dispatch_equals_dense_oracle_forward_and_backward(case):
    """On 8 CPU devices: the expert-parallel MoE block (tokens split over the expert axis) equals the dense oracle in
    output and in every gradient; the all-to-all dispatch really exchanges tokens (an all-to-all in the program)
    instead of gathering them."""
    from mistral_jax import sharding as sh

    mesh_shape, experts, dispatch, chunk = _EP_CASES[case]
    cfg = mj.ModelConfig.tiny_mixtral(num_experts=experts, num_experts_per_tok=1 if "top1" in case else 2,
                                      moe_dispatch=dispatch, moe_chunk_tokens=chunk)
    mesh, rules = sh.make_mesh(**mesh_shape), sh.rules_preset("fsdp_tp_ep")
    on_mesh = backends.resolve(cfg.for_platform(), mesh, rules)  # the mesh passed in explicitly
    assert on_mesh.moe == dispatch and on_mesh.expert_parallel.tokens_split_over_experts
    graphdef, params = nnx.split(moe.MoE(cfg, rngs=nnx.Rngs(3), backends=on_mesh))
    dense = nnx.graphdef(moe.MoE(cfg.replace(moe_impl="dense"), rngs=nnx.Rngs(3)))
    x = jax.random.normal(jax.random.key(4), (8, 16, cfg.dim))

    def loss(p, x, gd):
        y, stats = nnx.merge(gd, p)(x)
        return jnp.sum(jnp.sin(y)) + stats["z_sum"], y

    (ref_loss, ref_y), ref_g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x, dense)
    with sh.use_mesh(mesh, rules):
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
        (got_loss, got_y), got_g = fn(params, x, graphdef)
        hlo = fn.lower(params, x, graphdef).compile().as_text()
    assert ("all-to-all" in hlo) == (dispatch == "all_to_all")
    np.testing.assert_allclose(np.asarray(got_y), np.asarray(ref_y), atol=1e-5)
    np.testing.assert_allclose(float(got_loss), float(ref_loss), rtol=1e-5)
    for got, ref in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5)


@pytest.mark.parametrize("case,expert_mlp", [
    ("one_device", "ragged_dot"), ("a2a_two_experts_tensor", "ragged_dot"), ("a2a_fsdp_chunked", "ragged_dot"),
    ("all_gather", "ragged_dot"), ("one_device", "looped"), ("a2a_fsdp_chunked", "looped")])
@pytest.mark.heavy
def test_lora_experts_unmerged_equal_the_merged_dense_oracle_with_adapter_grads(case, expert_mlp):
    """LoRA on the experts (``moe.LowRank``): with an accelerator's expert MLP (``ragged_dot``: grouped matmuls, as
    on GPU; TPU's megablox is the same ``swiglu_experts``), ``x W + (x A) B``, never the merged weight: on one
    device and on expert-parallel meshes (8 CPU devices; F split over the tensor axis too) the block's output and
    the adapters' gradients equal the dense oracle over merged weights ``W + scale A B``, and no [E, D, F]
    weight-gradient matmul is in the program. CPU's fused ``looped`` MLP gets the merged weights: same numbers."""
    import dataclasses

    from mistral_jax import lora
    from mistral_jax import sharding as sh

    mesh_shape, experts, dispatch, chunk = _EP_CASES.get(case, (None, 8, "all_to_all", 0))
    cfg = mj.ModelConfig.tiny_mixtral(num_experts=experts, moe_dispatch=dispatch, moe_chunk_tokens=chunk)
    mesh, rules = (sh.make_mesh(**mesh_shape), sh.rules_preset("fsdp_tp_ep")) if mesh_shape else (None, None)
    chosen = dataclasses.replace(backends.resolve(cfg.for_platform(), mesh, rules), expert_mlp=expert_mlp)
    layer = moe.MoE(cfg, rngs=nnx.Rngs(3), backends=chosen)
    lora.apply_lora(layer, 2, 4.0, "w1,w2,w3", seed=1)
    rng = np.random.default_rng(5)
    for _, node in nnx.iter_graph(layer):
        if isinstance(node, lora.LoRAWeight):  # B = 0 at the start: give it a real update
            node.b[...] = jnp.asarray(0.1 * rng.standard_normal(node.b.shape), jnp.float32)
    graphdef, adapters, rest = nnx.split(layer, lora.LoRAParam, ...)
    x = jax.random.normal(jax.random.key(4), (8, 12, cfg.dim))  # 96 tokens: no row count is D or F

    def loss(ad, x, gd):
        y, _ = nnx.merge(gd, ad, rest)(x)
        return jnp.sum(jnp.sin(y)), y

    def merged_loss(ad, x):  # the oracle: dense experts over W + scale A B, formed here
        m = nnx.merge(graphdef, ad, rest)
        plain = moe.MoE(cfg.replace(moe_impl="dense"), rngs=nnx.Rngs(0))
        plain.gate = nnx.Param(m.gate[...])
        for name in ("w1", "w3", "w2"):
            lw = getattr(m, name)
            setattr(plain, name, nnx.Param(lw.base[...] + lw.scale * jnp.einsum(
                "EIR,ERO->EIO", ad[name]["a"][...], ad[name]["b"][...])))
        y, _ = plain(x)
        return jnp.sum(jnp.sin(y)), y

    (ref_loss, ref_y), ref_g = jax.value_and_grad(merged_loss, has_aux=True)(adapters, x)
    fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=2)
    if mesh:  # replicated on the mesh (the program shards them)
        adapters, rest, x = jax.device_put((adapters, rest, x), jax.sharding.NamedSharding(mesh, jax.P()))
    with sh.use_mesh(mesh, rules) if mesh else contextlib.nullcontext():
        (got_loss, got_y), got_g = fn(adapters, x, graphdef)
        jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, has_aux=True), static_argnums=2)(adapters, x, graphdef)
    np.testing.assert_allclose(np.asarray(got_y), np.asarray(ref_y), atol=1e-5)
    np.testing.assert_allclose(float(got_loss), float(ref_loss), atol=1e-6)
    for got, ref in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5)
    shapes = set()

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name in ("dot_general", "ragged_dot_general"):
                shapes.add(tuple(eqn.outvars[0].aval.shape[-2:]))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    d, f = cfg.dim, cfg.hidden_dim // (mesh_shape or {}).get("tensor", 1)  # F per shard
    weight_shaped = {(d, f), (f, d)} & shapes  # a merged weight or its gradient: [D, F] / [F, D]
    assert shapes and bool(weight_shaped) == (expert_mlp == "looped"), sorted(shapes)
