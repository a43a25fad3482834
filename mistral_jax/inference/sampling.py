"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), as one small pure function.

Legend: B batch, V vocab, X top-k.

Order of the filters (HF ``generate``'s): divide by the temperature, keep the ``top_k`` largest logits,
then keep the smallest set of the most likely tokens whose probability mass reaches ``top_p``.
``temperature == 0`` is greedy (argmax) and ignores ``top_k`` / ``top_p``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

NEG_INF = -jnp.inf  # a filtered token: probability exactly 0 under softmax / categorical


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ``ValueError`` for sampling settings that mean nothing."""
    if temperature is None or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0. "
                         "Fix: use 0 for greedy decoding, e.g. 0.7 to sample.")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive integer or None. "
                         "Fix: use None to disable it, or e.g. 50.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] or None. Fix: use None to disable it, or e.g. 0.9.")


def filter_logits(logits: Float[Array, "B V"], temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> Float[Array, "B V"]:
    """Tempered float32 logits with the tokens outside the top-k / top-p set set to ``-inf``.

    Args:
      logits: ``[B, V]`` next-token logits.
      temperature: > 0; the logits are divided by it.
      top_k: keep the ``top_k`` largest logits (ties at the k-th value are all kept); None = all.
      top_p: keep token ``i`` (in decreasing probability order) iff the mass of the tokens before it is
        ``< top_p``: the smallest prefix whose mass reaches ``top_p`` (the most likely token is always kept).

    Returns:
      float32 ``[B, V]`` logits; ``-inf`` marks a token that can never be sampled.
    """
    # float32: temperature scaling and the top-p cumulative sum need the precision of the raw logits.
    logits = logits.astype(jnp.float32) / temperature
    vocab = logits.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1] the k-th largest logit
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] decreasing
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V] mass of the more likely tokens
        n_keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # [B, 1], >= 1
        threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)  # [B, 1] smallest kept logit
        logits = jnp.where(logits < threshold, NEG_INF, logits)
    return logits


def sample(logits: Float[Array, "B V"], key: Array, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None) -> Int[Array, " B"]:
    """One token per row: argmax when ``temperature == 0``, else a draw from the filtered distribution.

    Args:
      logits: ``[B, V]`` next-token logits.
      key: a ``jax.random`` key (ignored when greedy); one key draws all B rows independently.
      temperature, top_k, top_p: see ``filter_logits``. They are Python values (static under ``jit``).

    Returns:
      int32 token ids ``[B]``.
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p), axis=-1).astype(jnp.int32)
