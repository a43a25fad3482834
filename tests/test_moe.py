"""MoE backends: the grouped matmul and the dropless path against the dense oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mistral_jax as mj
from mistral_jax.model import moe
from mistral_jax.model.grouped_matmul import looped_grouped_matmul


@pytest.mark.parametrize("rows,groups,blocks,short", [(37, 4, (8,), 0), (100, 8, (64, 16), 0), (5, 3, (64, 8), 0),
                                                      (64, 2, (16, 4), 0), (50, 6, (1,), 0), (40, 5, (8, 2), 7),
                                                      (300, 3, (64, 16, 4), 0)])
@pytest.mark.slow
def test_looped_grouped_matmul_equals_per_group_products(rows, groups, blocks, short):
    """Forward and both gradients against per-group products and ``ragged_dot``, with an empty group, blocks
    larger than groups, one to three block sizes, and (``short``) rows past the last group, which must be 0."""
    rng = np.random.default_rng(rows)
    sizes = np.bincount(rng.integers(0, groups, rows), minlength=groups)
    sizes[0] = 0  # an empty group
    sizes[-1] += rows - short - sizes.sum()
    x = rng.standard_normal((rows, 6)).astype(np.float32)
    w = rng.standard_normal((groups, 6, 5)).astype(np.float32)
    ends = np.cumsum(sizes)
    expected = np.concatenate([x[e - n:e] @ w[g] for g, (n, e) in enumerate(zip(sizes, ends, strict=True))]
                              + [np.zeros((short, 5), np.float32)])
    gs = jnp.asarray(sizes, jnp.int32)
    got = looped_grouped_matmul(jnp.asarray(x), jnp.asarray(w), gs, blocks)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)
    dy = jnp.asarray(rng.standard_normal((rows, 5)).astype(np.float32))
    grads = jax.grad(lambda x, w: (looped_grouped_matmul(x, w, gs, blocks) * dy).sum(), argnums=(0, 1))
    ref = jax.grad(lambda x, w: (jax.lax.ragged_dot(x, w, gs) * dy).sum(), argnums=(0, 1))
    for g, r in zip(grads(jnp.asarray(x), jnp.asarray(w)), ref(jnp.asarray(x), jnp.asarray(w)), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4)


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.slow
def test_ragged_equals_dense_oracle_with_grads(top_k):
    cfg = mj.ModelConfig.tiny_mixtral(num_experts=5, num_experts_per_tok=top_k)
    layer = moe.MoE(cfg, rngs=nnx.Rngs(top_k))
    x = jax.random.normal(jax.random.key(0), (3, 11, cfg.dim))

    def run(impl):
        layer.cfg = layer.cfg.replace(moe_impl=impl)  # (layer.cfg: the config with its platform filled in)
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
