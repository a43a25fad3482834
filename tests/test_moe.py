"""MoE backends: the grouped matmul and the dropless path against the dense oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mistral_jax as mj
from mistral_jax.model import moe
from mistral_jax.model.grouped_matmul import block_grouped_matmul


@pytest.mark.parametrize("rows,groups,block", [(37, 4, 8), (100, 8, 64), (5, 3, 64), (64, 2, 16), (50, 6, 1)])
def test_block_grouped_matmul_equals_per_group_products(rows, groups, block):
    rng = np.random.default_rng(rows)
    sizes = np.bincount(rng.integers(0, groups, rows), minlength=groups)
    sizes[0] = 0  # an empty group
    sizes[-1] += rows - sizes.sum()
    x = rng.standard_normal((rows, 6)).astype(np.float32)
    w = rng.standard_normal((groups, 6, 5)).astype(np.float32)
    expected = np.concatenate([x[s:e] @ w[g] for g, (s, e) in enumerate(zip(np.cumsum(sizes) - sizes,
                                                                          np.cumsum(sizes), strict=True))])
    got = block_grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes, jnp.int32), block)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)
    grad = jax.grad(lambda w: block_grouped_matmul(jnp.asarray(x), w, jnp.asarray(sizes, jnp.int32), block).sum())
    ref = jax.grad(lambda w: jax.lax.ragged_dot(jnp.asarray(x), w, jnp.asarray(sizes, jnp.int32)).sum())
    np.testing.assert_allclose(np.asarray(grad(jnp.asarray(w))), np.asarray(ref(jnp.asarray(w))), atol=1e-4)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_ragged_equals_dense_oracle_with_grads(top_k):
    cfg = mj.ModelConfig.tiny_mixtral(num_experts=5, num_experts_per_tok=top_k)
    layer = moe.MoE(cfg, rngs=nnx.Rngs(top_k))
    x = jax.random.normal(jax.random.key(0), (3, 11, cfg.dim))

    def run(impl):
        layer.cfg = cfg.replace(moe_impl=impl)
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
