"""Sparse mixture of experts (Mixtral): top-k router, SwiGLU experts, auxiliary losses.

Legend: B batch, T sequence, D model dim, F expert hidden dim, E experts, X top-k (experts per token),
M = B*T tokens, A = M*X routed assignments.

Routing: router logits -> softmax (float32) -> top-k -> renormalise the k weights (HF ``MixtralTopKRouter``).

Backends (``ModelConfig.moe_impl``):
  * ``dense``: every expert on every token, combined with the (mostly zero) routing weights. The oracle.
  * ``ragged``: dropless: sort the A assignments by expert and run three grouped matmuls
    (``jax.lax.ragged_dot``), so compute is proportional to X, not to E.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from mistral_jax import sharding


def route(logits: Float[Array, "M E"], top_k: int) -> tuple[Float[Array, "M E"], Float[Array, "M X"], Int[Array, "M X"]]:
    """Softmax in float32 (small logit gaps decide the top-k), top-k, renormalised weights."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [M, E]
    top_w, top_idx = jax.lax.top_k(probs, top_k)  # [M, X]
    top_w = top_w / top_w.sum(axis=-1, keepdims=True)
    return probs, top_w, top_idx


def router_stats(logits: Float[Array, "M E"], probs: Float[Array, "M E"], top_idx: Int[Array, "M X"],
                 valid: Bool[Array, " M"]) -> dict[str, Array]:
    """Per-layer sums from which the Transformer forms the aux losses over all layers at once.

    ``counts[e]`` = number of (valid) top-k assignments to e; ``prob_sum[e]`` = sum of router
    probabilities of e; ``z_sum`` = sum of logsumexp(logits)^2; ``tokens`` = number of valid tokens.
    """
    num_experts = logits.shape[-1]
    w = valid.astype(jnp.float32)  # [M]
    one_hot = jax.nn.one_hot(top_idx, num_experts, dtype=jnp.float32)  # [M, X, E]
    # float32 sums: bfloat16 counts stop being exact after 256.
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # [M]
    return dict(
        counts=jnp.einsum("MXE,M->E", one_hot, w),
        prob_sum=jnp.einsum("ME,M->E", probs, w),
        z_sum=jnp.sum(lse**2 * w),
        tokens=jnp.sum(w),
    )


def load_balancing_loss(counts: Float[Array, "... E"], prob_sum: Float[Array, "... E"], tokens: Array) -> Array:
    """Switch-Transformer load-balancing loss in HF units (``load_balancing_loss_func``).

    ``E * sum_e f_e * P_e`` with ``f_e = counts_e / tokens`` (the expected number of the token's X slots
    that go to e, so sum_e f_e = X) and ``P_e = prob_sum_e / tokens`` (mean router probability), where the
    sums run over every token of every layer. A perfectly balanced router gives X.
    """
    counts = counts.reshape(-1, counts.shape[-1]).sum(0)  # [E] (sum over layers if stacked)
    prob_sum = prob_sum.reshape(-1, prob_sum.shape[-1]).sum(0)  # [E]
    tokens = jnp.maximum(jnp.sum(tokens), 1.0)
    return counts.shape[-1] * jnp.sum((counts / tokens) * (prob_sum / tokens))


def z_loss(z_sum: Array, tokens: Array) -> Array:
    """ST-MoE router z-loss: mean over tokens (and layers) of ``logsumexp(router_logits)^2``."""
    return jnp.sum(z_sum) / jnp.maximum(jnp.sum(tokens), 1.0)


def dense_experts(x: Float[Array, "M D"], w1, w3, w2, top_w: Float[Array, "M X"], top_idx: Int[Array, "M X"]
                  ) -> Float[Array, "M D"]:
    """The oracle: all E experts on all M tokens, weighted by the routing weights (zero off the top-k)."""
    gates = jnp.einsum("MX,MXE->ME", top_w, jax.nn.one_hot(top_idx, w1.shape[0], dtype=top_w.dtype))  # [M, E]
    h = jax.nn.silu(jnp.einsum("MD,EDF->MEF", x, w1)) * jnp.einsum("MD,EDF->MEF", x, w3)  # [M, E, F]
    y = jnp.einsum("MEF,EFD->MED", h, w2)  # [M, E, D]
    return jnp.einsum("MED,ME->MD", y, gates.astype(y.dtype))


def ragged_experts(x: Float[Array, "M D"], w1, w3, w2, top_w: Float[Array, "M X"], top_idx: Int[Array, "M X"]
                   ) -> Float[Array, "M D"]:
    """Dropless grouped matmul: sort the A = M*X assignments by expert, ragged_dot per expert group."""
    m, top_k = top_idx.shape
    num_experts = w1.shape[0]
    flat_expert = top_idx.reshape(-1)  # [A]
    order = jnp.argsort(flat_expert, stable=True)  # [A] assignments grouped by expert
    token = order // top_k  # [A] source token of each sorted assignment
    group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)  # [E]
    xs = x[token]  # [A, D]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w1, group_sizes)) * jax.lax.ragged_dot(xs, w3, group_sizes)  # [A, F]
    y = jax.lax.ragged_dot(h, w2, group_sizes)  # [A, D]
    weights = top_w.reshape(-1)[order].astype(y.dtype)  # [A]
    return jnp.zeros_like(x).at[token].add(y * weights[:, None])  # [M, D]


class MoE(nnx.Module):
    """Mixtral's sparse MoE block (HF ``MixtralSparseMoeBlock``)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f, e = cfg.dim, cfg.hidden_dim, cfg.num_experts
        init = nnx.initializers.normal(cfg.initializer_range)
        pd = cfg.jnp_param_dtype
        self.gate = nnx.Param(init(rngs.params(), (d, e), pd), logical_axes=("embed", None))
        self.w1 = nnx.Param(init(rngs.params(), (e, d, f), pd), logical_axes=("experts", "embed", "mlp"))
        self.w3 = nnx.Param(init(rngs.params(), (e, d, f), pd), logical_axes=("experts", "embed", "mlp"))
        self.w2 = nnx.Param(init(rngs.params(), (e, f, d), pd), logical_axes=("experts", "mlp", "embed"))

    def __call__(self, x: Float[Array, "B T D"], valid: Bool[Array, "B T"] | None = None
                 ) -> tuple[Float[Array, "B T D"], dict[str, Array]]:
        """Returns ``(y [B, T, D], stats)``; ``stats`` feed ``load_balancing_loss`` and ``z_loss``.

        ``valid`` marks real tokens (padding is excluded from the statistics, as HF's attention_mask does).
        """
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        b, t, d = x.shape
        xf = x.reshape(b * t, d)  # [M, D]
        logits = jnp.einsum("MD,DE->ME", xf, self.gate[...].astype(dt))
        probs, top_w, top_idx = route(logits, cfg.num_experts_per_tok)
        valid_m = jnp.ones((b * t,), bool) if valid is None else valid.reshape(b * t)  # [M]
        stats = router_stats(logits, probs, top_idx, valid_m)
        experts = dense_experts if cfg.moe_impl == "dense" else ragged_experts
        y = experts(xf, self.w1[...].astype(dt), self.w3[...].astype(dt), self.w2[...].astype(dt),
                    top_w.astype(dt), top_idx)
        return sharding.constrain(y.reshape(b, t, d), ("batch", "seq", "act_embed")), stats
