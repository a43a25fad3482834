"""The decoding core over the rolling-buffer KV cache: chunked prefill, the decode step, the device decode loop.

Legend: B batch, T prompt length (padded), C prefill chunk, S cache slots, V vocab, N decode block.

The model is split once with ``nnx.split`` into a static ``graphdef`` and a ``state`` of arrays; every step
below is a pure function of ``(graphdef, state, cache, ...)`` under ``jax.jit`` (graphdef static, the cache
donated), so each compiles once per shape and updates the cache in place. ``mj.generate`` (``generate.py``), the
server's continuous batching (``serve/engine.py``: scheduling only) and the lm-eval backend all decode through
these functions; sampling is ``sampling.sample``, text is ``detokenize``.

Batching: prompts of different lengths are **right-aligned** (left-padded). A pad column has position -1:
the model neither attends to it nor stores it (see ``kv_cache.slots_for``), so every row sees exactly its
own prompt at positions ``0 .. len-1``; after the prompt, row ``b`` decodes at positions ``len_b, len_b+1 ..``.
The padded prompt length is bucketed (a power of two up to C, then whole chunks) so prompts of similar
length share compiled shapes.

Prefill runs the prompt in chunks of C tokens (default: the sliding window W, as in the Mistral paper):
each chunk attends over ``[cache ; chunk]`` and then overwrites the slots ``position mod S``, so memory
stays S = W per layer however long the prompt. Models without a window use the same code with a plain
cache of ``S >= prompt + new tokens`` slots. A chunk can also go into one row ``b`` of a batched cache
(``row=b``, traced): the server prefills one request while the others keep their rows.

Sampling settings come two ways (see ``sampling``): Python values for the whole batch, static under ``jit``
(``_decode_step``, ``_decode_loop``: ``generate``), or per-row arrays ``[B]``, traced (``decode_rows``,
``prefill_rows``: the server, one compilation whatever its requests ask for).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from mistral_jax import sharding
from mistral_jax.inference.per_layer import serving_forward
from mistral_jax.inference.sampling import sample, top_logprobs
from mistral_jax.model.kv_cache import EMPTY, KVCache
from mistral_jax.model.projection import adapter_rows

DEFAULT_CHUNK = 4096  # prefill chunk for models without a sliding window
DECODE_BLOCK = 32  # decode steps per device loop between host syncs (when nothing needs every token)
NO_EOS = -1  # eos id that never matches
TOP_LOGPROBS = 20  # alternatives computed per token when a server request asks for logprobs (OpenAI's most)
PREFILL_TOKENS = 4096  # prompt tokens one batched prefill call of the server may take (bounds its activations)


def prefill_batch_limit(max_batch: int, chunk: int, max_tokens: int = PREFILL_TOKENS) -> int:
    """How many prompts' chunks one batched prefill call takes at most: ``max_tokens // chunk`` (at least one, at
    most ``max_batch``)."""
    return max(1, min(max_batch, max_tokens // chunk))


# ----------------------------------------------------------------------------- shapes
def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def default_chunk_size(cfg) -> int:
    """The prefill chunk: the sliding window W (Mistral's choice), else ``DEFAULT_CHUNK``."""
    return cfg.sliding_window or DEFAULT_CHUNK


def padded_prompt_length(length: int, chunk_size: int) -> int:
    """Bucketed prompt length: a power of two (>= 8) up to one chunk, then whole chunks plus a power-of-two head."""
    if length <= chunk_size:
        return min(max(_next_pow2(length), 8), chunk_size)
    full, rest = divmod(length, chunk_size)
    if rest == 0:
        return length
    return full * chunk_size + min(max(_next_pow2(rest), 8), chunk_size)


def cache_length(cfg, total: int) -> int:
    """Cache slots for ``total`` positions: W with a window (fewer if the whole sequence fits), else ``total``
    rounded up to a power of two (>= 16) and capped at ``max_seq_len``."""
    need = max(_next_pow2(total), 16)
    if cfg.sliding_window is not None:
        return min(cfg.sliding_window, need)
    if total > cfg.max_seq_len:
        raise ValueError(f"prompt + new tokens = {total} positions exceed max_seq_len={cfg.max_seq_len} of a model "
                         "without a sliding window (its cache holds every position). Fix: shorten the prompt, lower "
                         "max_new_tokens, or raise ModelConfig.max_seq_len.")
    return min(need, cfg.max_seq_len)


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0
                ) -> tuple[Int[Array, "B T"], Int[Array, "B T"]]:
    """Right-align ``prompts`` in ``[B, length]``: pad columns hold ``pad_id`` at position -1.

    Returns:
      ``(tokens, positions)``, int32 numpy arrays ``[B, length]``; row b's real tokens have positions
      ``0 .. len_b - 1`` in its last ``len_b`` columns.
    """
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    positions = np.full((len(prompts), length), -1, np.int32)
    for b, p in enumerate(prompts):
        if len(p) > length:
            raise ValueError(f"prompt {b} has {len(p)} tokens but the padded length is {length}. "
                             "Fix: pass length >= the longest prompt.")
        if len(p):
            tokens[b, length - len(p):] = np.asarray(p, np.int32)
            positions[b, length - len(p):] = np.arange(len(p), dtype=np.int32)
    return tokens, positions


def prompt_chunks(prompt: Sequence[int], chunk: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A prompt as prefill chunks ``[1, chunk]`` whose boundaries are multiples of ``chunk`` counted from the first
    token (so two prompts with a common prefix share its chunks exactly: the server's prefix cache); the last,
    partial chunk is right-aligned (its padding, at position -1, first), so its last column is the last token."""
    n = len(prompt)
    out = []
    for start in range(0, n, chunk):
        piece = prompt[start:start + chunk]
        tokens, positions = pad_prompts([piece], chunk)
        positions = np.where(positions >= 0, positions + start, -1).astype(np.int32)
        out.append((tokens, positions))
    return out


@functools.lru_cache(maxsize=16)
def _sharded_cache_init(cfg, batch: int, n_slots: int, shardings: KVCache):
    """A jitted constructor of an empty cache created in its shards; cached so repeated calls do not recompile."""
    return jax.jit(lambda: KVCache.init(cfg, batch, n_slots), out_shardings=shardings)


def new_cache(cfg, batch: int, n_slots: int, mesh: jax.sharding.Mesh | None = None,
              rules: sharding.ShardingRules = sharding.DEFAULT_RULES) -> KVCache:
    """An empty cache ``[L, B, S, ...]``; with ``mesh``, created in its shards (rows over the batch axes, kv heads
    by the rules). Call it under ``sharding.use_mesh(mesh, rules)``."""
    if mesh is None:
        return KVCache.init(cfg, batch, n_slots)
    abstract = jax.eval_shape(lambda: KVCache.init(cfg, batch, n_slots))
    return _sharded_cache_init(cfg, batch, n_slots, abstract.shardings(mesh, rules))()


# ----------------------------------------------------------------------------- pure steps
def _cache_row(cache: KVCache, b: Int[Array, ""]) -> KVCache:
    """Row ``b`` of the cache as a one-row cache ``[L, 1, S, ...]``."""
    return cache.map_rows(lambda x, axis: jax.lax.dynamic_slice_in_dim(x, b, 1, axis=axis))


def _put_row(cache: KVCache, row: KVCache, b: Int[Array, ""]) -> KVCache:
    """The cache with row ``b`` replaced by the one-row cache ``row``."""
    return cache.update_rows(row, b)


def forward_chunk(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, tokens: Int[Array, "B C"],
                  positions: Int[Array, "B C"], *, last_only: bool = False, layers: tuple | None = None,
                  row: Int[Array, ""] | None = None, reset: Bool[Array, ""] | None = None
                  ) -> tuple[Float[Array, "B C V"] | Float[Array, "B V"], KVCache]:
    """One prefill chunk through the cache. Returns ``(logits [B, C, V] (or the last column [B, V]), cache)``.

    Args:
      layers: optional per-layer weights (``serving_layers``) used instead of the stacked ones.
      row: feed the chunk (``tokens [1, C]``) into this row of the cache only (a traced index): the row is
        sliced out, extended and written back; the other rows are left as they are.
      reset: with ``row``: first clear the row's stored positions, so nothing of its previous occupant is
        attended to (the first chunk of a new request).
    """
    model = nnx.merge(graphdef, state)
    if row is None:
        out = serving_forward(model, layers, tokens, positions, cache=cache, logits_to_keep=int(last_only))
        return (out.logits[:, -1] if last_only else out.logits), out.cache.constrain()
    r = _cache_row(cache, row)
    if reset is not None:
        r = r.replace(pos=jnp.where(reset, EMPTY, r.pos))
    out = serving_forward(model, layers, tokens, positions, cache=r, logits_to_keep=int(last_only))
    return (out.logits[:, -1] if last_only else out.logits), _put_row(cache, out.cache, row)


@functools.partial(jax.jit)
def cache_row(cache: KVCache, b: Int[Array, ""]) -> KVCache:
    """A copy of row ``b`` as a one-row cache ``[L, 1, S, ...]`` (the server's prefix-cache snapshot)."""
    return _cache_row(cache, b)


@functools.partial(jax.jit, donate_argnames=("cache",))
def put_row(cache: KVCache, row: KVCache, b: Int[Array, ""]) -> KVCache:
    """The cache with row ``b`` replaced by the one-row cache ``row`` (a restored snapshot)."""
    return _put_row(cache, row, b)


@functools.partial(jax.jit, donate_argnames=("cache",))
def copy_row(cache: KVCache, src: Int[Array, ""], dst: Int[Array, ""]) -> KVCache:
    """The cache with row ``dst`` a copy of row ``src`` (``n > 1`` completions of one prefilled prompt)."""
    return _put_row(cache, _cache_row(cache, src), dst)


_forward_chunk = jax.jit(forward_chunk, static_argnames=("graphdef", "last_only"), donate_argnames=("cache",))


def prefill(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, tokens: Int[Array, "B T"],
            positions: Int[Array, "B T"], *, chunk_size: int | None = None, return_all_logits: bool = False,
            layers: tuple | None = None) -> tuple[Float[Array, "B V"] | Float[Array, "B T V"], KVCache]:
    """Feed a (right-aligned) prompt through the cache in chunks of ``chunk_size`` tokens.

    The first chunk takes the remainder ``T mod chunk_size`` (it holds the left padding), every later
    chunk is exactly ``chunk_size``, so a long prompt compiles at most two chunk shapes.

    Args:
      graphdef, state: ``nnx.split(model)``.
      cache: the cache to extend (e.g. ``new_cache``); it is donated.
      tokens, positions: int32 ``[B, T]``; position -1 marks padding.
      chunk_size: tokens per chunk; default the sliding window (``default_chunk_size``).
      return_all_logits: return the logits of every column ``[B, T, V]`` instead of the last one ``[B, V]``.
      layers: optional per-layer weights (``serving_layers``) used instead of the stacked ones.

    Returns:
      ``(logits, cache)``: float32 logits of the last column (the next-token logits of every row of a
      right-aligned batch), or of all columns; and the updated cache.
    """
    chunk = chunk_size or default_chunk_size(nnx.merge(graphdef, state).cfg)
    if chunk < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be >= 1. Fix: use None for the default (the window).")
    t = tokens.shape[1]
    first = t % chunk or min(chunk, t)
    bounds = [0, *range(first, t + 1, chunk)]
    tokens, positions = jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32)
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        logits, cache = _forward_chunk(graphdef, state, cache, tokens[:, start:end], positions[:, start:end],
                                       last_only=not return_all_logits, layers=layers)
        outs.append(logits)
    return (jnp.concatenate(outs, axis=1) if return_all_logits else outs[-1]), cache


def prefill_chunk(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, tokens: Int[Array, "B C"],
                  positions: Int[Array, "B C"], key: Any, *, temperature: Any = 0.0, top_k: Any = None,
                  top_p: Any = None, layers: tuple | None = None, row: Int[Array, ""] | None = None,
                  reset: Bool[Array, ""] | None = None, logprobs: bool = False) -> tuple:
    """One prompt chunk (``forward_chunk``) and the next token sampled from its last column: after the prompt's
    last chunk, the first new token. Sampling settings and ``key`` as for ``sampling.sample``.

    Returns:
      ``(next [B] int32, cache)``, or ``(next, cache, logprobs [B])`` with ``logprobs``.
    """
    logits, cache = forward_chunk(graphdef, state, cache, tokens, positions, last_only=True, layers=layers,
                                  row=row, reset=reset)
    out = sample(logits, key, temperature, top_k, top_p, logprobs=logprobs)
    return (out[0], cache, out[1]) if logprobs else (out, cache)


def prefill_rows_batch(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, tokens: Int[Array, "k C"],
                       positions: Int[Array, "k C"], rows: Int[Array, " k"], reset: Bool[Array, " k"], key: Any, *,
                       temperature: Any = 0.0, top_k: Any = None, top_p: Any = None,
                       layers: tuple | None = None, adapters: Int[Array, " k"] | None = None) -> tuple:
    """One prefill chunk for each of ``k`` requests at once, into their rows ``rows`` of the batched cache: the
    rows are copied out ``[L, k, S, ...]``, extended together and written back one by one in place (a row index
    ``>= B`` is a padding entry, whose positions must all be -1: it changes nothing). ``reset[i]`` clears row
    ``i``'s stored positions first (a new request's first chunk). Samples each row's next token from its last
    column (per-row settings, ``[k]``). ``adapters``: each row's LoRA adapter in a multi-LoRA model
    (``lora.stack_adapters``; 0 = none).

    Returns:
      ``(next [k] int32, cache)``.
    """
    n_rows, k = cache.pos.shape[0], tokens.shape[0]
    pad = rows >= n_rows
    rows = jnp.minimum(rows, n_rows - 1)  # a padding entry reads the last row and, feeding nothing, leaves it as is
    parts = [_cache_row(cache, rows[i]) for i in range(k)]
    sub = KVCache.concat_rows(parts)
    sub = sub.replace(pos=jnp.where((reset & ~pad)[:, None], EMPTY, sub.pos))
    model = nnx.merge(graphdef, state)
    with adapter_rows(adapters):
        out = serving_forward(model, layers, tokens, positions, cache=sub, logits_to_keep=1)
    nxt = sample(out.logits[:, -1], key, temperature, top_k, top_p)
    new = out.cache
    for i in reversed(range(k)):  # row by row, in place; padding entries (last) first, so a real row's write wins
        cache = _put_row(cache, new.map_rows(lambda x, axis, i=i: jax.lax.slice_in_dim(x, i, i + 1, axis=axis)),
                         rows[i])
    return nxt, cache


def prefill_chunk_scored(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, tokens: Int[Array, "1 C"],
                         positions: Int[Array, "1 C"], targets: Int[Array, "1 C"], key: Any, *,
                         temperature: Any = 0.0, top_k: Any = None, top_p: Any = None, layers: tuple | None = None,
                         row: Int[Array, ""], reset: Bool[Array, ""], top: int = TOP_LOGPROBS,
                         adapters: Int[Array, " 1"] | None = None) -> tuple:
    """``prefill_chunk`` into one row that also scores the chunk: the log-prob of ``targets`` (each column's next
    prompt token; -1: the sampled token, for the prompt's last column) and the ``top`` alternatives of every column
    (the server's ``echo`` with ``logprobs``). The chunk's float32 logits ``[1, C, V]`` exist inside the step.

    Returns:
      ``(next [1], cache, target_logprobs [1, C], top_logprobs [1, C, top], top_ids [1, C, top])``.
    """
    with adapter_rows(adapters):
        logits, cache = forward_chunk(graphdef, state, cache, tokens, positions, layers=layers, row=row,
                                      reset=reset)
    nxt = sample(logits[:, -1], key, temperature, top_k, top_p)
    chosen, values, ids = top_logprobs(logits, jnp.where(targets < 0, nxt[:, None], targets), top)
    return nxt, cache, chosen, values, ids


def decode_step(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, tokens: Int[Array, " B"],
                positions: Int[Array, " B"], key: Any, *, temperature: Any = 0.0, top_k: Any = None,
                top_p: Any = None, layers: tuple | None = None, logprobs: bool = False) -> tuple:
    """One decode step: feed ``tokens`` at ``positions`` (-1: an idle row, which neither attends nor writes), sample
    the next token of each row. Sampling settings and ``key`` as for ``sampling.sample``.

    ``layers``: optional per-layer weights (``serving_layers``) used instead of the stacked ones.

    Returns:
      ``(next_tokens [B] int32, logits [B, V] float32, cache)``, and with ``logprobs`` a fourth element: the
      log-probs ``[B]`` of the chosen tokens (``sampling.token_logprobs``).
    """
    out = serving_forward(nnx.merge(graphdef, state), layers, tokens[:, None], positions[:, None], cache=cache)
    logits = out.logits[:, 0]  # [B, V]
    nxt = sample(logits, key, temperature, top_k, top_p, logprobs=logprobs)
    if logprobs:
        return nxt[0], logits, out.cache.constrain(), nxt[1]
    return nxt, logits, out.cache.constrain()


# Sampling settings static (Python values for the batch): generate, tests, RL rollouts.
_decode_step = jax.jit(decode_step, static_argnames=("graphdef", "temperature", "top_k", "top_p", "logprobs"),
                       donate_argnames=("cache",))
# Sampling settings as per-row arrays [B] (traced): the server's steps, one compilation whatever requests ask.
decode_rows = jax.jit(decode_step, static_argnames=("graphdef", "logprobs"), donate_argnames=("cache",))
prefill_rows = jax.jit(prefill_chunk, static_argnames=("graphdef", "logprobs"), donate_argnames=("cache",))
# One chunk for each of k requests (the server's prefill of several prompts at once; one compilation per bucket k).
prefill_rows_batch_jit = jax.jit(prefill_rows_batch, static_argnames=("graphdef",), donate_argnames=("cache",))
prefill_rows_scored = jax.jit(prefill_chunk_scored, static_argnames=("graphdef", "top"), donate_argnames=("cache",))


def decode_rows_loop(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, tokens: Int[Array, " R"],
                     positions: Int[Array, " R"], seeds: Int[Array, " R"], steps: Int[Array, " R"],
                     budget: Int[Array, " R"], eos: Int[Array, " R"], num_steps: Int[Array, ""], *,
                     temperature: Any, top_k: Any, top_p: Any, rows: int, block: int = DECODE_BLOCK,
                     layers: tuple | None = None, logprobs: bool = False,
                     adapters: Int[Array, " R"] | None = None) -> tuple:
    """The server's decode: up to ``min(num_steps, block)`` steps for the first ``rows`` rows of the cache (a bucket
    of the B decode slots: the step's cost follows the load) in one device loop, per-row settings (arrays ``[R]``).

    Row ``r`` feeds ``tokens[r]`` at ``positions[r]`` (-1: idle) and draws its i-th token of this call with
    ``fold_in(key(seeds[r]), steps[r] + i)`` (as ``decode_rows``, so the block length changes no draw). It stops
    after ``budget[r]`` tokens or when it samples ``eos[r]`` (-1: never); a stopped row feeds nothing more. The
    loop ends early when every row has stopped. Rows ``>= rows`` are neither read nor written. ``adapters``: each
    row's LoRA adapter in a multi-LoRA model (``lora.stack_adapters``; 0 = none).

    Returns:
      ``(new_tokens [R, block], steps_taken, cache)``; with ``logprobs`` also ``(token_logprobs [R, block],
      top_logprobs [R, block, TOP_LOGPROBS], top_ids [R, block, TOP_LOGPROBS])``.
    """
    sub = cache.map_rows(lambda x, axis: jax.lax.slice_in_dim(x, 0, rows, axis=axis))
    out = jnp.zeros((rows, block), jnp.int32)
    extra = ((jnp.zeros((rows, block), jnp.float32), jnp.zeros((rows, block, TOP_LOGPROBS), jnp.float32),
              jnp.zeros((rows, block, TOP_LOGPROBS), jnp.int32)) if logprobs else ())
    done = (positions < 0) | (budget <= 0)

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < jnp.minimum(num_steps, block)) & ~jnp.all(done)

    def body(carry):
        i, sub, tok, pos, done, out, extra = carry
        pos = jnp.where(done, -1, pos)
        step = decode_step(graphdef, state, sub, tok, pos, (seeds, steps + i), temperature=temperature,
                           top_k=top_k, top_p=top_p, layers=layers)
        nxt, logits, sub = step
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        if logprobs:
            chosen, values, ids = top_logprobs(logits, nxt, TOP_LOGPROBS)
            extra = (jax.lax.dynamic_update_slice(extra[0], chosen[:, None], (0, i)),
                     jax.lax.dynamic_update_slice(extra[1], values[:, None], (0, i, 0)),
                     jax.lax.dynamic_update_slice(extra[2], ids[:, None], (0, i, 0)))
        done = done | (nxt == eos) | (i + 1 >= budget)
        return i + 1, sub, nxt, pos + 1, done, out, extra

    with adapter_rows(adapters):  # the body is traced here
        i, sub, _, _, _, out, extra = jax.lax.while_loop(
            cond, body, (jnp.zeros((), jnp.int32), sub, tokens, positions, done, out, extra))
    cache = cache.update_rows(sub, 0)
    return (out, i, cache) + tuple(extra)


def decode_loop(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, tokens: Int[Array, " B"],
                positions: Int[Array, " B"], done: Bool[Array, " B"], key: Array, start: Int[Array, ""],
                num_steps: Int[Array, ""], *, block: int = DECODE_BLOCK, temperature: float = 0.0,
                top_k: int | None = None, top_p: float | None = None, eos_id: int = NO_EOS, pad_id: int = 0,
                layers: tuple | None = None, logprobs: bool = False) -> tuple:
    """Up to ``min(num_steps, block)`` decode steps in one device loop; stops early once every row is done.

    Step ``i`` samples with ``fold_in(key, start + i)``, so results do not depend on the block size.

    Args:
      tokens, positions: ``[B]`` the last token of each row and its position (the input of the first step).
      done: ``[B]`` rows that already stopped: they emit ``pad_id``.
      start: index of the first step (for the sampling key); num_steps: steps wanted (dynamic, <= block).
      block: static length of the output buffer.
      layers: optional per-layer weights (``serving_layers``) used instead of the stacked ones.
      logprobs: also return the log-probs of the new tokens.

    Returns:
      ``(new_tokens [B, block] (pad_id for finished rows and unused steps), steps_taken, cache, tokens,
      positions, done)`` where the last four are the carry for the next call; with ``logprobs`` a seventh
      element, float32 ``[B, block]``: the new tokens' log-probs (0 where ``new_tokens`` is padding).
    """
    b = tokens.shape[0]
    out = jnp.full((b, block), pad_id, jnp.int32)
    lp = jnp.zeros((b, block), jnp.float32) if logprobs else None  # None: nothing carried

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < jnp.minimum(num_steps, block)) & ~jnp.all(done)

    def body(carry):
        i, cache, tok, pos, done, out, lp = carry
        step = decode_step(graphdef, state, cache, tok, pos, jax.random.fold_in(key, start + i),
                           temperature=temperature, top_k=top_k, top_p=top_p, layers=layers, logprobs=logprobs)
        nxt, cache = step[0], step[2]
        if logprobs:
            lp = jax.lax.dynamic_update_slice(lp, jnp.where(done, 0.0, step[3])[:, None], (0, i))
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, cache, nxt, pos + 1, done | (nxt == eos_id), out, lp

    i, cache, tokens, positions, done, out, lp = jax.lax.while_loop(
        cond, body, (jnp.zeros((), jnp.int32), cache, tokens, positions, done, out, lp))
    return (out, i, cache, tokens, positions, done) + ((lp,) if logprobs else ())


# The server's multi-step decode over a bucket of rows (per-row settings traced; one compilation per bucket).
decode_rows_loop_jit = jax.jit(decode_rows_loop, static_argnames=("graphdef", "rows", "block", "logprobs"),
                               donate_argnames=("cache",))
_decode_loop = jax.jit(decode_loop, static_argnames=("graphdef", "block", "temperature", "top_k", "top_p", "eos_id",
                                                     "pad_id", "logprobs"), donate_argnames=("cache",))
_sample = jax.jit(sample, static_argnames=("temperature", "top_k", "top_p", "logprobs"))
