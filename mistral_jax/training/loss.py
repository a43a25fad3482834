"""Training loss: token cross-entropy (float32) + router_aux_loss_coef * load balancing + router_z_loss_coef * z.

A batch is a dict of ``[B, T]`` arrays: ``tokens`` (int32 inputs), ``targets`` (int32 next tokens),
``weights`` (float32 loss weight per target: 0 for padding and, in SFT, for prompt tokens),
``positions`` (int32, restart per packed document) and ``segment_ids`` (int32, 0 = padding).

Two ways to the same token cross-entropy, chosen by ``ModelConfig.loss_chunk_size``:

- ``0``: ``cross_entropy`` on the model's float32 logits ``[B, T, V]``. The training step then holds those logits
  and their gradient, each ``4 * B * T * V`` bytes (Mistral 7B, 16k tokens per chip, V = 32768: 2 GiB each).
- ``C > 0``: ``chunked_cross_entropy`` on the final hidden states ``[B, T, D]`` (``forward(..., return_hidden=True)``)
  and the LM head: a ``lax.scan`` over ``ceil(T / C)`` chunks of C positions, each computing its ``[B, C, V]``
  float32 logits (``Transformer.head_logits``), their logsumexp and the target's logit. The chunk body is
  ``jax.checkpoint``-ed, so the backward pass recomputes a chunk's logits instead of saving them: at most one
  chunk's logits (and their gradient) is live, ``C / T`` of the plain path's. Chunks run along T, so the
  hidden states' batch sharding is untouched. Same values and gradients as the plain path (float32 rounding).

``chunked_token_logps`` is the same scan giving per-position log-probs (the sequence log-probs of DPO / ORPO in
``training.preference``), so no objective holds the float32 logits of a whole batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from mistral_jax import sharding


def cross_entropy(logits: Float[Array, "B T V"], targets: Int[Array, "B T"], weights: Float[Array, "B T"]
                  ) -> tuple[Array, Array]:
    """Weighted sum of token cross-entropies and the sum of weights. float32 log-softmax (logits are float32)."""
    logits = logits.astype(jnp.float32)  # float32: logsumexp over 32k logits in bfloat16 loses ~1e-2
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    w = weights.astype(jnp.float32)
    return jnp.sum((lse - picked) * w), jnp.sum(w)


def _scan_chunks(hidden: Float[Array, "B T D"], head: Float[Array, "D V"], per_position: tuple[Array, ...],
                 chunk_size: int, head_logits: Callable[[Array, Array], Array],
                 fn: Callable[..., Any]) -> tuple[Any, int]:
    """``fn(logits [B, C, V], *per_position chunks [B, C])`` over chunks of C positions, the head applied per chunk.

    The scaffolding shared by the chunked losses: T is padded to a multiple of C with zero-valued positions (their
    arrays padded with 0; callers give them zero weight), chunks lead a ``lax.scan`` (B keeps its batch sharding)
    and each chunk's body is ``jax.checkpoint``-ed, so the backward pass recomputes a chunk's ``[B, C, V]`` float32
    logits instead of saving them. Returns ``(fn's outputs stacked over the n chunks, the padding)``.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunked loss: chunk_size={chunk_size!r} must be > 0. Fix: pass a positive chunk size, or "
                         "use cross_entropy on full logits.")
    b, t, d = hidden.shape
    c = min(chunk_size, t)
    n = -(-t // c)  # chunks
    pad = n * c - t
    if pad:  # padding positions: zero inputs (callers weight them 0), sliced off or summed with weight 0
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        per_position = tuple(jnp.pad(x, ((0, 0), (0, pad))) for x in per_position)
    # [B, n*C, ...] -> [n, B, C, ...]: the scan axis leads; B stays sharded over the batch mesh axes.
    xs = (sharding.constrain(hidden.reshape(b, n, c, d).swapaxes(0, 1), (None, "batch", "seq", "act_embed")),
          *(sharding.constrain(x.reshape(b, n, c).swapaxes(0, 1), (None, "batch", "seq")) for x in per_position))
    # The head stays in its parameter sharding inside the loop: each chunk all-gathers it (in the compute dtype)
    # and reduce-scatters its gradient into the float32 shard. Gathering it once before the loop instead keeps
    # a gathered float32 head and a replicated float32 gradient carry alive through the loop: more memory per chip
    # for somewhat fewer collective bytes (docs/benchmarks.md#the-chunked-loss-keeps-the-head-sharded). A vocab
    # (tensor) sharding stays: each chip computes its vocab shard of the logits.
    head = sharding.constrain(head, ("embed", "vocab"))

    # backward: recompute this chunk's logits rather than keep n of them (prevent_cse=False: inside a scan)
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk(head, x, *rest):
        return fn(head_logits(x, sharding.constrain(head, ("embed", "vocab"))), *rest)  # logits [B, C, V] float32

    def body(carry, xs_i):
        return carry, chunk(head, *xs_i)

    return jax.lax.scan(body, None, xs)[1], pad


def chunked_cross_entropy(hidden: Float[Array, "B T D"], head: Float[Array, "D V"], targets: Int[Array, "B T"],
                          weights: Float[Array, "B T"], chunk_size: int,
                          head_logits: Callable[[Array, Array], Array]) -> tuple[Array, Array]:
    """``cross_entropy(head_logits(hidden, head), targets, weights)`` without the ``[B, T, V]`` logits.

    Args:
      hidden: final-normed hidden states (``forward(..., return_hidden=True).hidden``).
      head: the LM head weight (``Transformer.head_weight()``, param dtype: the head's gradient is summed over
        the chunks in that dtype, float32 for float32 master weights).
      targets, weights: as for ``cross_entropy``.
      chunk_size: positions per chunk, > 0. T not a multiple of it: the last chunk is padded with zero-weight
        positions (at most ``chunk_size - 1`` wasted columns; a divisor search could degrade to tiny chunks for
        a prime T). ``chunk_size >= T``: one chunk of T.
      head_logits: ``(x [B, C, D], head) -> float32 logits [B, C, V]`` (``Transformer.head_logits``: the head's
        dtype and precision live there).

    Returns:
      ``(weighted sum of token cross-entropies, sum of weights)``, float32 scalars.
    """
    w = weights.astype(jnp.float32)
    # zero-weight padding positions add exactly 0 to both sums and get a zero gradient
    sums, _ = _scan_chunks(hidden, head, (targets, w), chunk_size, head_logits,
                           lambda logits, tgt, wt: cross_entropy(logits, tgt, wt)[0])  # [n] per-chunk sums
    return jnp.sum(sums), jnp.sum(w)


def chunked_token_logps(hidden: Float[Array, "B T D"], head: Float[Array, "D V"], targets: Int[Array, "B T"],
                        chunk_size: int, head_logits: Callable[[Array, Array], Array], *,
                        with_mean_logits: bool = False) -> tuple[Array, Array | None]:
    """Per-position ``log p(target)`` (float32 log-softmax) of ``head_logits(hidden, head)`` without the
    ``[B, T, V]`` logits: at most one ``[B, C, V]`` chunk is live, forward and backward (``chunked_cross_entropy``'s
    scan). The sequence objectives (DPO / ORPO log-probs) sum these per sequence.

    Returns:
      ``(logps [B, T], mean_logits [B, T] or None)``: ``mean_logits`` (``with_mean_logits``) is the mean logit over
      the vocabulary per position (TRL's ``logits/*`` metrics), float32.
    """
    b, t = targets.shape

    def stats(logits, tgt):
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]  # [B, C]
        out = picked - jax.nn.logsumexp(logits, axis=-1)
        return (out, jnp.mean(logits, axis=-1)) if with_mean_logits else (out,)

    outs, _ = _scan_chunks(hidden, head, (targets,), chunk_size, head_logits, stats)
    return _unchunk(outs[0], b, t), (_unchunk(outs[1], b, t) if with_mean_logits else None)


def _unchunk(x: Array, b: int, t: int) -> Array:
    """``[n, B, C]`` per-chunk values -> ``[B, T]`` (the padding sliced off)."""
    return sharding.constrain(x.swapaxes(0, 1).reshape(b, -1)[:, :t], ("batch", "seq"))


def chunked_token_stats(hidden: Float[Array, "B T D"], head: Float[Array, "D V"], targets: Int[Array, "B T"],
                        chunk_size: int, head_logits: Callable[[Array, Array], Array], *,
                        with_entropy: bool = False) -> tuple[Array, Array | None]:
    """``chunked_token_logps``'s per-position ``log p(target)`` and, with ``with_entropy``, the entropy of each
    position's distribution (nats, float32; the RL objectives' metric), the ``[B, T, V]`` logits never whole."""
    b, t = targets.shape

    def stats(logits, tgt):
        lse = jax.nn.logsumexp(logits, axis=-1)
        out = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0] - lse
        if not with_entropy:
            return (out,)
        return out, lse - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)

    outs, _ = _scan_chunks(hidden, head, (targets,), chunk_size, head_logits, stats)
    return _unchunk(outs[0], b, t), (_unchunk(outs[1], b, t) if with_entropy else None)


def token_cross_entropy(model, batch: dict[str, Array]) -> tuple[Array, Array, dict[str, Array]]:
    """``(weighted CE sum, sum of weights, aux)`` of ``model`` on ``batch``: chunked over the sequence when
    ``model.cfg.loss_chunk_size > 0`` (the logits are never materialised whole), else on full logits."""
    chunk = model.cfg.loss_chunk_size
    out = model.forward(batch["tokens"], batch.get("positions"), batch.get("segment_ids"), return_hidden=chunk > 0)
    if chunk > 0:
        ce_sum, n = chunked_cross_entropy(out.hidden, model.head_weight(), batch["targets"], batch["weights"], chunk,
                                          model.head_logits)
    else:
        ce_sum, n = cross_entropy(out.logits, batch["targets"], batch["weights"])
    return ce_sum, n, out.aux


def loss_fn(model, batch: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    """Mean token loss plus the weighted MoE aux losses; returns ``(loss, metrics)``."""
    cfg = model.cfg
    ce_sum, n, aux = token_cross_entropy(model, batch)
    ce = ce_sum / jnp.maximum(n, 1.0)
    loss = ce
    if cfg.is_moe:
        loss += cfg.router_aux_loss_coef * aux["load_balancing_loss"] + cfg.router_z_loss_coef * aux["router_z_loss"]
    metrics = dict(loss=loss, ce_loss=ce, tokens=n, aux_loss=aux["load_balancing_loss"], z_loss=aux["router_z_loss"],
                   expert_load=aux["expert_load"])
    return loss, metrics
