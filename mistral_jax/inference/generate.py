"""Generation over the rolling-buffer KV cache: chunked prefill, decode steps and the batched sampling loop.

Legend: B batch, T prompt length (padded), C prefill chunk, S cache slots, V vocab, N decode block.

The model is split once with ``nnx.split`` into a static ``graphdef`` and a ``state`` of arrays; every step
below is a pure function of ``(graphdef, state, cache, ...)`` under ``jax.jit`` (graphdef and the sampling
settings static, the cache donated), so each compiles once per shape and updates the cache in place.

Batching: prompts of different lengths are **right-aligned** (left-padded). A pad column has position -1:
the model neither attends to it nor stores it (see ``kv_cache.slots_for``), so every row sees exactly its
own prompt at positions ``0 .. len-1``; after the prompt, row ``b`` decodes at positions ``len_b, len_b+1 ..``.
The padded prompt length is bucketed (a power of two up to C, then whole chunks) so prompts of similar
length share compiled shapes.

Prefill runs the prompt in chunks of C tokens (default: the sliding window W, as in the Mistral paper):
each chunk attends over ``[cache ; chunk]`` and then overwrites the slots ``position mod S``, so memory
stays S = W per layer however long the prompt. Models without a window use the same code with a plain
cache of ``S >= prompt + new tokens`` slots.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from mistral_jax import sharding
from mistral_jax.inference.per_layer import serving_forward, serving_layers
from mistral_jax.inference.sampling import check_sampling, sample
from mistral_jax.model.kv_cache import KVCache

DEFAULT_CHUNK = 4096  # prefill chunk for models without a sliding window
DECODE_BLOCK = 32  # decode steps per device loop between host syncs (when nothing needs every token)
NO_EOS = -1  # eos id that never matches


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


# ----------------------------------------------------------------------------- pure steps
def forward_chunk(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, tokens: Int[Array, "B C"],
                  positions: Int[Array, "B C"], *, last_only: bool = False, layers: tuple | None = None
                  ) -> tuple[Float[Array, "B C V"] | Float[Array, "B V"], KVCache]:
    """One prefill chunk through the cache. Returns ``(logits [B, C, V] (or the last column [B, V]), cache)``.

    ``layers``: optional per-layer weights (``serving_layers``) used instead of the stacked ones.
    """
    out = serving_forward(nnx.merge(graphdef, state), layers, tokens, positions, cache=cache,
                          logits_to_keep=int(last_only))
    return (out.logits[:, -1] if last_only else out.logits), out.cache.constrain()


_forward_chunk = jax.jit(forward_chunk, static_argnames=("graphdef", "last_only"), donate_argnames=("cache",))


def prefill(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, tokens: Int[Array, "B T"],
            positions: Int[Array, "B T"], *, chunk_size: int | None = None, return_all_logits: bool = False,
            layers: tuple | None = None) -> tuple[Float[Array, "B V"] | Float[Array, "B T V"], KVCache]:
    """Feed a (right-aligned) prompt through the cache in chunks of ``chunk_size`` tokens.

    The first chunk takes the remainder ``T mod chunk_size`` (it holds the left padding), every later
    chunk is exactly ``chunk_size``, so a long prompt compiles at most two chunk shapes.

    Args:
      graphdef, state: ``nnx.split(model)``.
      cache: the cache to extend (e.g. ``KVCache.init``); it is donated.
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


def decode_step(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, tokens: Int[Array, " B"],
                positions: Int[Array, " B"], key: Array, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, layers: tuple | None = None
                ) -> tuple[Int[Array, " B"], Float[Array, "B V"], KVCache]:
    """One decode step: feed ``tokens`` at ``positions``, sample the next token of each row.

    ``layers``: optional per-layer weights (``serving_layers``) used instead of the stacked ones.

    Returns:
      ``(next_tokens [B] int32, logits [B, V] float32, cache)``.
    """
    out = serving_forward(nnx.merge(graphdef, state), layers, tokens[:, None], positions[:, None], cache=cache)
    logits = out.logits[:, 0]  # [B, V]
    return sample(logits, key, temperature, top_k, top_p), logits, out.cache.constrain()


_decode_step = jax.jit(decode_step, static_argnames=("graphdef", "temperature", "top_k", "top_p"),
                       donate_argnames=("cache",))


def decode_loop(graphdef: nnx.GraphDef, state: nnx.State, cache: KVCache, tokens: Int[Array, " B"],
                positions: Int[Array, " B"], done: Bool[Array, " B"], key: Array, start: Int[Array, ""],
                num_steps: Int[Array, ""], *, block: int = DECODE_BLOCK, temperature: float = 0.0,
                top_k: int | None = None, top_p: float | None = None, eos_id: int = NO_EOS, pad_id: int = 0,
                layers: tuple | None = None
                ) -> tuple[Int[Array, "B N"], Int[Array, ""], KVCache, Int[Array, " B"], Int[Array, " B"],
                           Bool[Array, " B"]]:
    """Up to ``min(num_steps, block)`` decode steps in one device loop; stops early once every row is done.

    Step ``i`` samples with ``fold_in(key, start + i)``, so results do not depend on the block size.

    Args:
      tokens, positions: ``[B]`` the last token of each row and its position (the input of the first step).
      done: ``[B]`` rows that already stopped: they emit ``pad_id``.
      start: index of the first step (for the sampling key); num_steps: steps wanted (dynamic, <= block).
      block: static length of the output buffer.
      layers: optional per-layer weights (``serving_layers``) used instead of the stacked ones.

    Returns:
      ``(new_tokens [B, block] (pad_id for finished rows and unused steps), steps_taken, cache, tokens,
      positions, done)`` where the last four are the carry for the next call.
    """
    b = tokens.shape[0]
    out = jnp.full((b, block), pad_id, jnp.int32)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < jnp.minimum(num_steps, block)) & ~jnp.all(done)

    def body(carry):
        i, cache, tok, pos, done, out = carry
        nxt, _, cache = decode_step(graphdef, state, cache, tok, pos, jax.random.fold_in(key, start + i),
                                    temperature=temperature, top_k=top_k, top_p=top_p, layers=layers)
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, cache, nxt, pos + 1, done | (nxt == eos_id), out

    i, cache, tokens, positions, done, out = jax.lax.while_loop(
        cond, body, (jnp.zeros((), jnp.int32), cache, tokens, positions, done, out))
    return out, i, cache, tokens, positions, done


_decode_loop = jax.jit(decode_loop, static_argnames=("graphdef", "block", "temperature", "top_k", "top_p", "eos_id",
                                                     "pad_id"), donate_argnames=("cache",))
_sample = jax.jit(sample, static_argnames=("temperature", "top_k", "top_p"))


# ----------------------------------------------------------------------------- the loop
def _as_batch(prompt_ids: Any, vocab_size: int) -> tuple[list[list[int]], bool]:
    arr = prompt_ids
    if hasattr(arr, "shape") and hasattr(arr, "ndim"):
        if arr.ndim not in (1, 2):
            raise ValueError(f"prompt_ids has shape {tuple(arr.shape)}; expected [T] or [B, T]. "
                             "Fix: pass one prompt as a list of ids or a batch as a list of lists.")
        single = arr.ndim == 1
        rows = [np.asarray(arr).tolist()] if single else np.asarray(arr).tolist()
    else:
        rows = list(prompt_ids)
        single = not rows or not isinstance(rows[0], (list, tuple, np.ndarray))
        rows = [[int(x) for x in rows]] if single else [[int(x) for x in r] for r in rows]
    if not rows:
        raise ValueError("prompt_ids is an empty batch. Fix: pass at least one prompt.")
    for b, r in enumerate(rows):
        if not r:
            raise ValueError(f"prompt {b} is empty; generation needs at least one token to condition on. "
                             "Fix: start every prompt with the BOS token (id 1).")
        bad = [x for x in r if not 0 <= x < vocab_size]
        if bad:
            raise ValueError(f"prompt {b} has ids {bad[:5]} outside [0, vocab_size={vocab_size}). "
                             "Fix: encode with the model's own tokenizer.")
    return rows, single


def _stop_at(ids: list[int], tokenizer, stop: Sequence[str]) -> int | None:
    """The length of the shortest prefix of ``ids`` whose text contains a stop string, or None."""
    if not any(s in tokenizer.decode(ids) for s in stop):
        return None
    for n in range(1, len(ids) + 1):
        if any(s in tokenizer.decode(ids[:n]) for s in stop):
            return n
    return len(ids)



@functools.lru_cache(maxsize=16)
def _sharded_cache_init(cfg, batch: int, n_slots: int, shardings: KVCache):
    """A jitted constructor of an empty cache created in its shards; cached so repeated calls do not recompile."""
    return jax.jit(lambda: KVCache.init(cfg, batch, n_slots), out_shardings=shardings)


def generate(model: nnx.Module, prompt_ids: Any, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, eos_id: int | None = 2,
             chunk_size: int | None = None, *, stop: Sequence[str] = (), tokenizer: Any = None,
             stream: Callable[[list[list[int]]], None] | None = None, mesh: jax.sharding.Mesh | None = None,
             rules: sharding.ShardingRules = sharding.DEFAULT_RULES, pad_id: int = 0,
             unstack: bool | None = None) -> list[int] | list[list[int]]:
    """Generate continuations with the rolling-buffer cache: chunked prefill, then one token per step.

    Args:
      model: a ``mistral_jax.Transformer``.
      prompt_ids: one prompt (a list / 1-D array of ids) or a batch (a list of lists of any lengths, or a
        2-D array). Prompts are right-aligned (left-padded with position -1) internally.
      max_new_tokens: at most this many new tokens per prompt.
      temperature: 0 = greedy (argmax); > 0 samples from ``softmax(logits / temperature)``.
      top_k: sample among the k most likely tokens only (None = all).
      top_p: nucleus sampling: the smallest set of most likely tokens with mass >= top_p (None = all).
      seed: seed of the sampling key; the same seed gives the same tokens.
      eos_id: a row stops after emitting this id (Mistral's ``</s>`` = 2); None = never stop early.
      chunk_size: prefill chunk length; default the sliding window W (``DEFAULT_CHUNK`` without a window).
      stop: stop strings; a row stops once its decoded continuation contains one (needs ``tokenizer``).
      tokenizer: anything with ``decode(ids) -> str`` (for ``stop``).
      stream: called after each decoded block with the new ids of every row (``list[list[int]]``, empty for
        finished rows); with ``stream`` or ``stop`` each block is one token.
      mesh: run sharded on this mesh (``sharding.make_mesh``): parameters by their logical axes, the batch
        and the cache's kv heads by the rules table. The batch must divide the batch mesh axes.
      rules: the logical -> mesh axis rules used with ``mesh``.
      pad_id: id written in the pad columns of the prompt (never attended).
      unstack: run the layers from separate per-layer copies of their weights (``serving_layers``); None =
        on the CPU backend when the copy fits comfortably in memory (there it makes decoding ~1.6x faster).

    Returns:
      The new token ids only (not the prompt), as Python ints: ``list[int]`` for one prompt, else
      ``list[list[int]]`` in prompt order. A row ends with ``eos_id`` if it stopped on EOS (the EOS is
      included, as in HF ``generate``), or with the token that completed a stop string (the text may run
      past the stop string within that token: cut the decoded text at it); otherwise it has
      ``max_new_tokens`` ids.
    """
    cfg = model.cfg
    check_sampling(temperature, top_k, top_p)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer. Fix: pass e.g. 64.")
    if stop and tokenizer is None:
        raise ValueError(f"stop={list(stop)!r} needs a tokenizer to decode the text. "
                         "Fix: pass tokenizer=Tokenizer(...).")
    if isinstance(stop, str):
        stop = (stop,)
    rows, single = _as_batch(prompt_ids, cfg.vocab_size)
    lengths = np.array([len(r) for r in rows], np.int32)
    chunk = chunk_size or default_chunk_size(cfg)
    if chunk < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be >= 1. Fix: use None for the default (the window).")
    t = padded_prompt_length(int(lengths.max()), chunk)
    tokens, positions = pad_prompts(rows, t, pad_id)
    n_slots = cache_length(cfg, int(lengths.max()) + max_new_tokens)
    batch = len(rows)
    eos = NO_EOS if eos_id is None else int(eos_id)
    sampling = dict(temperature=float(temperature), top_k=top_k, top_p=top_p)

    graphdef, state = nnx.split(model)
    ctx = sharding.use_mesh(mesh, rules) if mesh is not None else contextlib.nullcontext()
    with ctx:
        if mesh is not None:
            state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
            batch_sharding = sharding.named_sharding(mesh, ("batch", "seq"), rules)
            tokens, positions = (jax.device_put(x, batch_sharding) for x in (tokens, positions))
            abstract = jax.eval_shape(lambda: KVCache.init(cfg, batch, n_slots))
            cache = _sharded_cache_init(cfg, batch, n_slots, abstract.shardings(mesh, rules))()
        else:
            cache = KVCache.init(cfg, batch, n_slots)
        layers = serving_layers(model, unstack, state)
        key = jax.random.key(seed)
        last_logits, cache = prefill(graphdef, state, cache, tokens, positions, chunk_size=chunk, layers=layers)
        tok = _sample(last_logits, jax.random.fold_in(key, 0), **sampling)
        first = np.asarray(jax.device_get(tok))
        out: list[list[int]] = [[int(x)] for x in first]
        finished = first == eos
        pos = jnp.asarray(lengths)
        done = jnp.asarray(finished)
        per_token = stream is not None or bool(stop)

        def finish_block(new: list[list[int]]) -> bool:
            """Apply stop strings to the rows that grew, stream, and say whether anything changed on the host."""
            changed = False
            if stop:
                for b in range(batch):
                    if new[b] and not finished[b]:
                        cut = _stop_at(out[b], tokenizer, stop)
                        if cut is not None:
                            keep = len(new[b]) - (len(out[b]) - cut)
                            new[b] = new[b][:max(keep, 0)]
                            del out[b][cut:]
                            finished[b] = changed = True
            if stream is not None:
                stream(new)
            return changed

        if finish_block([list(r) for r in out]):
            done = jnp.asarray(finished)
        step = 1
        while step < max_new_tokens and not finished.all():
            n = 1 if per_token else min(DECODE_BLOCK, max_new_tokens - step)
            block, taken, cache, tok, pos, done = _decode_loop(
                graphdef, state, cache, tok, pos, done, key, jnp.int32(step), jnp.int32(n), block=DECODE_BLOCK,
                eos_id=eos, pad_id=pad_id, layers=layers, **sampling)
            block, taken = jax.device_get((block, taken))
            new: list[list[int]] = [[] for _ in range(batch)]
            for b in range(batch):
                if finished[b]:
                    continue
                for x in block[b, :int(taken)].tolist():
                    new[b].append(x)
                    if x == eos:
                        finished[b] = True
                        break
                out[b].extend(new[b])
            if finish_block(new):
                done = jnp.asarray(finished)
            step += int(taken)
    return out[0] if single else out
