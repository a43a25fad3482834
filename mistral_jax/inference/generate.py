"""``mj.generate``: chunked prefill, then blocks of decode steps on the device, over the rolling-buffer cache.

The steps are the decoding core's (``decode.py``: ``prefill``, ``decode_loop``; ``sampling.sample``); stop
strings are ``detokenize.TextStream``'s. This file adds the host loop: batching ragged prompts, EOS and stop
strings, streaming, the mesh.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mistral_jax import sharding
from mistral_jax.inference.decode import (
    DECODE_BLOCK,
    NO_EOS,
    _decode_loop,
    _sample,
    cache_length,
    default_chunk_size,
    new_cache,
    pad_prompts,
    padded_prompt_length,
    prefill,
)
from mistral_jax.inference.detokenize import TextStream
from mistral_jax.inference.per_layer import serving_layers
from mistral_jax.inference.sampling import check_sampling


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


def generate(model: nnx.Module, prompt_ids: Any, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, eos_id: int | None = 2,
             chunk_size: int | None = None, *, stop: Sequence[str] = (), tokenizer: Any = None,
             stream: Callable[[list[list[int]]], None] | None = None, mesh: jax.sharding.Mesh | None = None,
             rules: sharding.ShardingRules = sharding.DEFAULT_RULES, pad_id: int = 0,
             unstack: bool | None = None, logprobs: bool | float = False) -> Any:
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
        on the CPU backend when the copy fits comfortably in memory (there it makes decoding faster:
        docs/benchmarks.md#per-layer-weight-copies-for-cpu-decoding).
      logprobs: also return each new token's log-prob under the model (``sampling.token_logprobs``: float32
        ``log_softmax`` of the raw logits), or, a float ``t``, of ``logits / t`` (RL rollouts: the sampling
        policy's log-probs at temperature ``t``; G samples of a prompt: pass it G times).

    Returns:
      The new token ids only (not the prompt), as Python ints: ``list[int]`` for one prompt, else
      ``list[list[int]]`` in prompt order. A row ends with ``eos_id`` if it stopped on EOS (the EOS is
      included, as in HF ``generate``), or with the token that completed a stop string (the text may run
      past the stop string within that token: cut the decoded text at it); otherwise it has
      ``max_new_tokens`` ids. With ``logprobs``: ``(ids, logprobs)``, the log-probs shaped as the ids.
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
        cache = new_cache(cfg, batch, n_slots, mesh, rules)
        layers = serving_layers(model, unstack, state)
        key = jax.random.key(seed)
        last_logits, cache = prefill(graphdef, state, cache, tokens, positions, chunk_size=chunk, layers=layers)
        tok = _sample(last_logits, jax.random.fold_in(key, 0), **sampling, logprobs=logprobs)
        tok, first_lp = tok if logprobs else (tok, None)
        first = np.asarray(jax.device_get(tok))
        out: list[list[int]] = [[int(x)] for x in first]
        out_lp: list[list[float]] = [[float(x)] for x in jax.device_get(first_lp)] if logprobs else []
        texts = [TextStream(tokenizer, stop, decode=tokenizer.decode) for _ in range(batch)] if stop else []
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
                        for j, x in enumerate(new[b]):
                            texts[b].push(x)
                            if texts[b].stopped:  # keep the token that completed the stop string
                                cut = len(out[b]) - len(new[b]) + j + 1
                                new[b] = new[b][:j + 1]
                                del out[b][cut:]
                                if logprobs:
                                    del out_lp[b][cut:]
                                finished[b] = changed = True
                                break
            if stream is not None:
                stream(new)
            return changed

        if finish_block([list(r) for r in out]):
            done = jnp.asarray(finished)
        step = 1
        while step < max_new_tokens and not finished.all():
            n = 1 if per_token else min(DECODE_BLOCK, max_new_tokens - step)
            res = _decode_loop(graphdef, state, cache, tok, pos, done, key, jnp.int32(step), jnp.int32(n),
                               block=DECODE_BLOCK, eos_id=eos, pad_id=pad_id, layers=layers, logprobs=logprobs,
                               **sampling)
            block, taken, cache, tok, pos, done = res[:6]
            block, taken, block_lp = jax.device_get((block, taken, res[6] if logprobs else None))
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
                if logprobs:
                    out_lp[b].extend(block_lp[b, :len(new[b])].tolist())
            if finish_block(new):
                done = jnp.asarray(finished)
            step += int(taken)
    if logprobs:
        return (out[0], out_lp[0]) if single else (out, out_lp)
    return out[0] if single else out
