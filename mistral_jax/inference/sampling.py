"""Next-token sampling and token log-probs: greedy, temperature, top-k and top-p (nucleus), one pure implementation.

Legend: B batch, V vocab, T tokens.

Order of the filters (HF ``generate``'s): divide by the temperature, keep the ``top_k`` largest logits, then keep
the smallest set of the most likely tokens whose probability mass reaches ``top_p``.

Each setting is either one Python value for the whole batch (static under ``jit``: ``mj.generate``, RL rollouts)
or an array ``[B]`` of per-row values (traced: the server, where every request brings its own and all share one
compiled step). The batch-wide form is the per-row one with every row equal (the same float operations, so the
same numbers); a stage a Python value disables is left out at trace time, a stage that per-row values may need
runs under ``lax.cond`` on the batch, so an all-greedy server batch costs one argmax.

Keys: one key for the batch (the rows' noise drawn together, as ``generate`` always has), ``[B]`` keys, or a pair
``(seeds [B], steps [B])`` meaning row b draws with ``fold_in(key(seed_b), step_b)`` (the server's: a request's
draws depend on its seed and token index only, never on its neighbours). For one row the three agree.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

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


def _static(x: Any) -> bool:
    """A Python value (one setting for the batch, known at trace time), not an array of per-row values."""
    return x is None or isinstance(x, (int, float))


def _stage(setting: Any, active: Any, fn: Any, x: jax.Array) -> jax.Array:
    """``fn(x)`` where ``setting`` asks for it: decided at trace time for a Python value, else (per-row arrays)
    under ``lax.cond`` on whether any row does (``active(setting)`` is that row's wish)."""
    if _static(setting):
        return fn(x) if setting is not None and active(setting) else x
    return jax.lax.cond(jnp.any(active(setting)), fn, lambda x: x, x)


def _rows(x: Any, b: int, dtype: Any) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(x, dtype), (b,))


def filter_logits(logits: Float[Array, "B V"], temperature: float | Float[Array, " B"] = 1.0,
                  top_k: int | None | Int[Array, " B"] = None, top_p: float | None | Float[Array, " B"] = None
                  ) -> Float[Array, "B V"]:
    """Tempered float32 logits with the tokens outside the top-k / top-p set set to ``-inf``.

    Args:
      logits: ``[B, V]`` next-token logits.
      temperature: > 0 (a Python value or ``[B]``); the logits are divided by it.
      top_k: keep the ``top_k`` largest logits (ties at the k-th value are all kept); None (or a row's 0) = all.
      top_p: keep token ``i`` (in decreasing probability order) iff the mass of the tokens before it is
        ``< top_p``: the smallest prefix whose mass reaches ``top_p`` (the most likely token is always kept);
        None (or a row's 1.0) = all.

    Returns:
      float32 ``[B, V]`` logits; ``-inf`` marks a token that can never be sampled.
    """
    b, vocab = logits.shape
    # float32: temperature scaling and the top-p cumulative sum need the precision of the raw logits.
    t = temperature if _static(temperature) else jnp.asarray(temperature)
    x = logits.astype(jnp.float32) / (t if _static(t) or t.ndim == 0 else t[:, None])

    def top_k_filter(x):  # [B, V]
        k = _rows(top_k, b, jnp.int32)
        desc = jnp.sort(x, axis=-1)[:, ::-1]  # [B, V] decreasing
        kth = jnp.take_along_axis(desc, jnp.clip(k - 1, 0, vocab - 1)[:, None], axis=-1)  # [B, 1] k-th largest
        return jnp.where(((k > 0) & (k < vocab))[:, None] & (x < kth), NEG_INF, x)

    def top_p_filter(x):  # [B, V]
        p = _rows(top_p, b, jnp.float32)
        desc = jnp.sort(x, axis=-1)[:, ::-1]  # [B, V] decreasing
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V] mass of the more likely tokens
        n_keep = jnp.sum(mass_before < p[:, None], axis=-1, keepdims=True)  # [B, 1], >= 1
        threshold = jnp.take_along_axis(desc, jnp.maximum(n_keep - 1, 0), axis=-1)  # [B, 1] smallest kept logit
        return jnp.where((p < 1.0)[:, None] & (x < threshold), NEG_INF, x)

    x = _stage(top_k, lambda k: (k > 0) & (k < vocab), top_k_filter, x)
    return _stage(top_p, lambda p: p < 1.0, top_p_filter, x)


def row_keys(key: Any, b: int) -> jax.Array:
    """``key`` as one key for the batch (shape ``()``) or ``[B]`` keys; a ``(seeds, steps)`` pair becomes
    ``fold_in(key(seed_b), step_b)`` per row."""
    if isinstance(key, tuple):
        seeds, steps = key
        return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)
    return key


def token_logprobs(logits: Float[Array, "*B V"], tokens: Int[Array, "*B"]) -> Float[Array, "*B"]:
    """``log p(tokens)`` under the model's distribution (``log_softmax`` of the raw logits: temperature 1, no
    filter), float32: what a training forward recomputes for a sampled token (RL) and what scoring sums (evals)."""
    # float32 log-softmax: sums of many tokens' log-probs need it (lm-eval's hf backend scores in float32 too).
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def top_logprobs(logits: Float[Array, "*B V"], tokens: Int[Array, "*B"], k: int
                 ) -> tuple[Float[Array, "*B"], Float[Array, "*B k"], Int[Array, "*B k"]]:
    """OpenAI's ``logprobs``: ``token_logprobs`` of ``tokens`` and the ``k`` most likely tokens' log-probs and ids
    (decreasing; ties: the lower id first), all under the raw distribution (temperature 1, no filter), float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    values, ids = jax.lax.top_k(logp, k)
    return chosen, values, ids.astype(jnp.int32)


def greedy(logits: Float[Array, "*B V"]) -> Int[Array, "*B"]:
    """The most likely token (argmax; the first on ties)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def is_greedy(logits: Float[Array, "*B V"], tokens: Int[Array, "*B"]) -> Bool[Array, "*B"]:
    """Whether each token is the argmax of its logits (lm-eval's ``is_greedy``)."""
    return greedy(logits) == tokens


def sample(logits: Float[Array, "B V"], key: Any, temperature: float | Float[Array, " B"] = 0.0,
           top_k: int | None | Int[Array, " B"] = None, top_p: float | None | Float[Array, " B"] = None, *,
           logprobs: bool | float = False) -> Int[Array, " B"] | tuple[Int[Array, " B"], Float[Array, " B"]]:
    """One token per row: argmax where the temperature is 0, else a draw from the filtered distribution.

    Args:
      logits: ``[B, V]`` next-token logits.
      key: one ``jax.random`` key for the batch, ``[B]`` keys, or ``(seeds, steps)`` int32 ``[B]`` each (see the
        module docstring); ignored by greedy rows.
      temperature, top_k, top_p: Python values for the batch (static under ``jit``) or per-row arrays ``[B]``
        (temperature 0 = greedy, top_k 0 = all, top_p 1 = no cut); see ``filter_logits``.
      logprobs: also return ``token_logprobs`` of the chosen tokens: ``True`` under the raw distribution, a float
        ``t > 0`` under ``softmax(logits / t)`` (the sampling policy at temperature ``t``, before any top-k / top-p
        cut: what RL's policy ratio compares, TRL's convention).

    Returns:
      int32 token ids ``[B]``, and with ``logprobs`` their float32 log-probs ``[B]``.
    """
    b = logits.shape[0]
    argmax = greedy(logits)
    if _static(temperature) and temperature == 0.0:
        tokens = argmax
    else:
        keys = row_keys(key, b)

        def draw(_):
            if _static(temperature):
                x = filter_logits(logits, temperature, top_k, top_p)
            else:  # greedy rows: divide by 1 and ask no filter (their token is the argmax anyway)
                on = temperature > 0
                x = filter_logits(logits, jnp.where(on, temperature, 1.0),
                                  top_k if _static(top_k) else jnp.where(on, top_k, 0),
                                  top_p if _static(top_p) else jnp.where(on, top_p, 1.0))
            if keys.ndim == 0:  # one key: the batch's noise drawn together
                drawn = jax.random.categorical(keys, x, axis=-1).astype(jnp.int32)
            else:
                drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row[None], axis=-1)[0])(keys, x)
                drawn = drawn.astype(jnp.int32)
            return drawn if _static(temperature) else jnp.where(temperature > 0, drawn, argmax)

        tokens = draw(None) if _static(temperature) else jax.lax.cond(
            jnp.any(temperature > 0), draw, lambda _: argmax, None)
    if not logprobs:
        return tokens
    scale = 1.0 if logprobs is True else 1.0 / float(logprobs)  # a float t: log-probs of softmax(logits / t)
    return tokens, token_logprobs(logits if scale == 1.0 else logits.astype(jnp.float32) * scale, tokens)
