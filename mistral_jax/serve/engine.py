"""Continuous-batching engine: scheduling over a fixed set of decode slots of one rolling-buffer cache.

Legend: B decode slots (``max_batch``), R a bucket of them, C prefill chunk, S cache slots per row.

The engine only schedules; the decoding core (``inference``) does the rest. The cache is
``decode.new_cache(cfg, B, S)``: row ``b`` belongs to the request in decode slot ``b`` (``S = W`` with a sliding
window, else ``max_seq_len``), exactly as in ``mj.generate``. The core's jitted steps run on it:

* ``decode.prefill_rows_batch``: one chunk ``[k, w]`` for each of k requests being prefilled (k the smallest
  bucket holding them, w the smallest width, C / 8 ... C, holding their chunks' tokens), their rows copied out,
  extended together and written back (a new request's row cleared first); after a prompt's last chunk it samples
  the first new token. Chunk boundaries are multiples of C from the first
  token (``decode.prompt_chunks``), so equal prefixes have equal chunks. ``decode.prefill_rows_scored`` is one
  request's chunk with every column's log-prob and top alternatives (``echo`` with ``logprobs``).
* ``decode.decode_rows_loop``: up to ``block`` decode steps in one device loop for the first R rows, R the smallest
  bucket (1, 2, 4, ..., B) holding every occupied row: a lone request decodes a batch of one, and the host syncs
  once per block, not per token. The block shrinks to one step while a request waits for a slot or a prompt is
  being prefilled (so prefill chunks interleave with decode steps and nobody waits long), and otherwise is sized
  so that one call lasts about ``sync_ms``.

Per-request sampling settings are arrays (temperature 0 = greedy), so requests with different settings share one
compiled step; a request's n-th new token is drawn with ``fold_in(key(seed), n)``: the same draws as
``mj.generate(prompt, seed=seed)``. Text, stop strings and streamed deltas are ``detokenize.TextStream``.

Prefix cache: after each full prompt chunk the row (the rolling buffer at that point: O(W) memory under a window,
however long the prefix) is copied aside under the prefix's token ids (``decode.cache_row``); a later prompt that
starts with a cached prefix restores the longest one into its row (``decode.put_row``) and prefills only the rest.
The snapshot holds exactly what prefilling the prefix writes, so outputs are the same with the cache on or off.
Least recently used snapshots go first when ``prefix_cache_mb`` is exceeded.

``n > 1``: the prompt is prefilled once, into the first request's row; the others get copies of that row
(``decode.copy_row``) and start by feeding the prompt's last token again, drawing with seeds ``seed + i``.

Multi-LoRA: with a model of ``lora.stack_adapters``, every step gets each row's adapter id (``adapters`` of the
core's steps; ``SamplingParams.adapter``, 0 = the base), so requests for different adapters share a batch; a prefix
snapshot is kept per adapter.

The loop (one thread owns the device): admit waiting requests into free slots (the lowest first), run one prefill
chunk of each prompt being prefilled (at most ``decode.PREFILL_TOKENS`` tokens in all), run one decode call for the
decoding rows, account the new tokens (EOS, stop strings, ``max_tokens``) and hand events to the request's ``emit``
callback. A finished or cancelled request frees its slot at once. Shapes
never change after the warm-up, so requests coming and going cause no recompilation (``compile_count`` counts XLA
compilations); the first request asking for ``logprobs`` compiles the scoring variants once.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from mistral_jax import sharding
from mistral_jax.inference.decode import (
    DECODE_BLOCK,
    DEFAULT_CHUNK,
    TOP_LOGPROBS,
    cache_row,
    copy_row,
    decode_rows_loop_jit,
    new_cache,
    prefill_batch_limit,
    prefill_rows_batch_jit,
    prefill_rows_scored,
    prompt_chunks,
    put_row,
)
from mistral_jax.inference.detokenize import TextStream
from mistral_jax.inference.per_layer import serving_layers
from mistral_jax.lora import MultiLoRAWeight
from mistral_jax.model.kv_cache import KVCache
from mistral_jax.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- compile counting
_COMPILES = [0]
_LISTENING = [False]
_LISTEN_LOCK = threading.Lock()


def _on_event(event: str, duration: float, **_: Any) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


def compile_count() -> int:
    """XLA backend compilations in this process since the first call (a ``jax.monitoring`` listener)."""
    with _LISTEN_LOCK:
        if not _LISTENING[0]:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _LISTENING[0] = True
    return _COMPILES[0]


def batch_shards(mesh: jax.sharding.Mesh, rules: sharding.ShardingRules | None = None) -> int:
    """How many ways the rules split the decode slots (the batch axis) over ``mesh``."""
    axes = (rules or sharding.DEFAULT_RULES).mesh_axes("batch") or ()
    return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes) if a in mesh.shape]))


# ----------------------------------------------------------------------------- requests
class QueueFullError(RuntimeError):
    """The waiting queue holds ``max_queue`` requests already (HTTP 429); ``retry_after`` is an estimate in s."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


@dataclasses.dataclass
class SamplingParams:
    """Per-request generation settings (validated by the HTTP layer or ``Engine.check``)."""

    max_tokens: int = 16  # 0 only with prompt_logprobs (scoring the prompt: lm-eval's loglikelihood)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = all tokens
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # run to max_tokens / a stop string (vLLM's extension; benchmarks)
    logprobs: int | None = None  # None: none; k >= 0: each new token's log-prob and its k most likely alternatives
    prompt_logprobs: bool = False  # also every prompt token's log-prob (and alternatives): OpenAI's echo
    adapter: int = 0  # the LoRA adapter of a multi-LoRA model (``lora.stack_adapters``); 0 = the base model


@dataclasses.dataclass
class TokenLogprob:
    """One token's log-prob under the model (temperature 1, no filter) and its most likely alternatives
    ``[(id, logprob), ...]`` (as many as the request asked for)."""

    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Event:
    """What the engine tells a request: ``kind`` is ``"delta"`` (new ``text``/``token_ids``, with ``logprobs`` one
    ``TokenLogprob`` per id when asked), ``"done"`` (the whole ``text``, ``finish_reason`` "stop" / "length", token
    counts, and ``prompt_logprobs``: one entry per prompt token, None for the first, when asked) or ``"error"``
    (``text`` holds the message). The deltas join to the final text."""

    kind: str
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


class Request:
    """One generation: prompt ids, settings and an ``emit(Event)`` callback (called from the engine thread)."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, emit: Callable[[Event], None]):
        self.id = next(Request._ids)
        self.prompt_ids = [int(x) for x in prompt_ids]
        self.params = params
        self.emit = emit
        self.cancelled = False
        self.submitted = time.perf_counter()
        # engine-side state
        self.row: int | None = None
        self.chunks: list[tuple[np.ndarray, np.ndarray]] = []
        self.next_chunk = 0
        self.siblings: list[Request] = []  # n > 1: the requests that copy this one's prefilled row
        self.primary: Request | None = None  # set on a sibling
        self.generated: list[int] = []  # sampled ids (EOS included when sampled)
        self.text: TextStream | None = None  # the text of the ids (no EOS), made on admission
        self.prompt_lp: list[TokenLogprob | None] | None = None
        self.last_time: float | None = None
        self.pending = Event("delta")  # new text / ids not yet emitted
        self.finished = False

    def cancel(self) -> None:
        """Ask the engine to drop this request (the client went away); its slot is freed on the next step."""
        self.cancelled = True


def _widths(chunk: int) -> list[int]:
    """Prefill call widths: powers of two from ``max(8, chunk // 8)`` below ``chunk``, then ``chunk`` (a prompt's
    last, partial chunk runs at the smallest width holding its tokens)."""
    out, w = [], max(8, chunk // 8)
    while w < chunk:
        out.append(w)
        w *= 2
    return [*out, chunk]


def _buckets(max_batch: int, ways: int) -> list[int]:
    """Decode batch sizes: ``ways`` x powers of two below ``max_batch``, then ``max_batch``; one size when the
    mesh splits the rows (a bucket must cover every batch shard)."""
    if ways > 1:
        return [max_batch]
    out, r = [], 1
    while r < max_batch:
        out.append(r)
        r *= 2
    return [*out, max_batch]


# ----------------------------------------------------------------------------- the engine
class Engine:
    """Continuous batching over ``max_batch`` decode slots; call ``start()``, then ``submit()`` from any thread.

    Args:
      model: a ``mistral_jax.Transformer``.
      tokenizer: a ``mistral_jax.Tokenizer`` (``decode``, ``eos_id``).
      max_batch: decode slots B (requests decoded together).
      max_queue: requests waiting for a slot beyond which ``submit`` raises ``QueueFullError``.
      chunk_size: prefill chunk C (default: the window W, else min(4096, max_seq_len); capped at the cache size);
        also the granularity of the prefix cache.
      unstack: per-layer weight copies (``serving_layers``); None = on CPU when they fit.
      mesh: serve sharded on this mesh (``sharding.make_mesh``): the weights by their logical axes and ``rules``
        (as in training), the cache's slots over the batch axes and its kv heads over ``tensor``. ``max_batch``
        must be a multiple of the batch axes' size.
      rules: the logical -> mesh axis rules used with ``mesh`` (default ``sharding.DEFAULT_RULES``).
      prefix_cache_mb: device memory for prefix-cache snapshots (0: off).
      sync_ms: the time one decode call aims at when nobody waits (more tokens per host sync; at most
        ``decode.DECODE_BLOCK`` steps).
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 16, max_queue: int = 256,
                 chunk_size: int | None = None, unstack: bool | None = None,
                 mesh: jax.sharding.Mesh | None = None, rules: sharding.ShardingRules | None = None,
                 prefix_cache_mb: float = 1024, sync_ms: float = 50.0):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1. Fix: pass e.g. 16.")
        if max_queue < 0:
            raise ValueError(f"max_queue={max_queue} must be >= 0. Fix: pass e.g. 256.")
        if prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb={prefix_cache_mb} must be >= 0 (0: off). Fix: pass e.g. 1024.")
        if sync_ms <= 0:
            raise ValueError(f"sync_ms={sync_ms} must be > 0. Fix: pass e.g. 50.")
        self.cfg = cfg = model.cfg
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_id)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = cfg.max_seq_len  # prompt + max_tokens must fit (the positions the model was built for)
        self.cache_slots = cfg.sliding_window if cfg.sliding_window is not None else cfg.max_seq_len
        self.chunk = min(chunk_size or cfg.sliding_window or DEFAULT_CHUNK, self.cache_slots)
        if self.chunk < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1. Fix: omit it (the window).")
        self.mesh, self.rules = mesh, (rules or sharding.DEFAULT_RULES)
        self.graphdef, self.state = nnx.split(model)
        # a multi-LoRA model (lora.stack_adapters): every step gets each row's adapter id
        self.n_adapters = max((int(node.scale.shape[-1]) for _, node in nnx.iter_graph(model)
                               if isinstance(node, MultiLoRAWeight)), default=0)
        if self.n_adapters and mesh is not None:
            raise ValueError("serving several LoRA adapters on a mesh is not supported yet. Fix: serve them on one "
                             "device (no mesh), or one adapter merged (its workdir as the checkpoint) on the mesh.")
        batch_ways = 1
        if mesh is not None:
            batch_ways = batch_shards(mesh, self.rules)
            if max_batch % batch_ways:
                raise ValueError(f"max_batch={max_batch} is not a multiple of the mesh's batch axes "
                                 f"({batch_ways} ways: {dict(mesh.shape)}). Fix: pass --max_batch "
                                 f"{max(batch_ways, max_batch // batch_ways * batch_ways)} or a mesh with fewer "
                                 "data / fsdp ways.")
            with self._mesh():
                self.state = jax.device_put(self.state, sharding.state_shardings(self.state, mesh, self.rules))
        self.buckets = _buckets(max_batch, batch_ways)  # decode: rows [0, R)
        # prefill: any k rows, gathered; k * C <= decode.PREFILL_TOKENS
        self.buckets_prefill = _buckets(prefill_batch_limit(max_batch, self.chunk), 1)
        self.widths = _widths(self.chunk)
        self.cache = self._new_cache()
        self.layers = serving_layers(model, unstack, self.state)
        self.slots: list[Request | None] = [None] * max_batch
        self.pos = np.full(max_batch, -1, np.int32)  # position of the token fed next, per decoding row
        self.last = np.zeros(max_batch, np.int32)
        self.waiting: collections.deque[list[Request]] = collections.deque()  # units: a request and its siblings
        self.prefilling: collections.deque[Request] = collections.deque()  # requests whose prompt is being fed
        self.prefix: collections.OrderedDict[bytes, KVCache] = collections.OrderedDict()
        self.prefix_budget = int(prefix_cache_mb * 2**20)
        self.prefix_bytes = 0
        self.sync_s = sync_ms / 1000
        self.step_time: dict[int, float] = {}  # seconds per decode step, per bucket (a running estimate)
        self.request_time = 1.0  # seconds a request holds a slot (a running estimate, for Retry-After)
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.running = False
        self.steps = dict(prefill_chunks=0, decode_steps=0, decode_calls=0, tokens=0, cancelled=0, peak_rows=0,
                          prefill_tokens=0, prefix_hit_tokens=0)
        self.metrics = ServeMetrics(waiting=lambda: sum(len(u) for u in self.waiting),
                                    running=lambda: sum(s is not None for s in self.slots),
                                    prefix_bytes=lambda: self.prefix_bytes, prefix_entries=lambda: len(self.prefix))

    def _new_cache(self) -> KVCache:
        """An empty cache ``[L, B, S, ...]``, created in its shards on the mesh."""
        with self._mesh():
            return new_cache(self.cfg, self.max_batch, self.cache_slots, self.mesh, self.rules)

    def _mesh(self) -> contextlib.AbstractContextManager:
        """The mesh context for tracing and running the steps (entered by the thread that runs them)."""
        return sharding.use_mesh(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ public
    def start(self, warmup: bool = True) -> Engine:
        """Compile the steps (``warmup``) and start the engine thread."""
        if warmup:
            self.warmup()
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="mistral-jax-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop the engine thread; waiting and running requests get an error event."""
        with self.cond:
            self.running = False
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)
        for r in [*(r for u in self.waiting for r in u), *(s for s in self.slots if s is not None)]:
            self._fail(r, "the server is shutting down")
        self.waiting.clear()

    def warmup(self) -> None:
        """Compile the core's ``prefill_rows_batch`` (every bucket and width) and ``decode_rows_loop`` (every bucket)
        and the prefix cache's row copies on an idle cache: nothing changes."""
        with self._mesh():
            for k in self.buckets_prefill:  # padding entries only: nothing is read or written
                for w in self.widths:
                    tok = np.zeros((k, w), np.int32)
                    pos = np.full((k, w), -1, np.int32)
                    _, self.cache = prefill_rows_batch_jit(
                        self.graphdef, self.state, self.cache, tok, pos, np.full(k, self.max_batch, np.int32),
                        np.zeros(k, np.bool_), layers=self.layers, **self._sampling([None] * k))
            for rows in self.buckets:
                out = self._decode_call([None] * rows, 1, logprobs=False)
            if self.prefix_budget:  # the prefix cache's copies (row 0 written with itself)
                self.cache = put_row(self.cache, cache_row(self.cache, np.int32(0)), np.int32(0))
            jax.block_until_ready((out[0], self.cache))

    def check(self, n_prompt: int, params: SamplingParams, n: int = 1) -> None:
        """Raise ``ValueError`` (message for the client) when the request cannot be served."""
        if n_prompt < 1:
            raise ValueError("the prompt is empty; generation needs at least one token")
        if n_prompt + params.max_tokens > self.max_len:
            raise ValueError(f"this model's maximum context length is {self.max_len} tokens, but the prompt has "
                             f"{n_prompt} tokens and max_tokens is {params.max_tokens} ({n_prompt + params.max_tokens}"
                             f" in all). Fix: shorten the prompt or lower max_tokens")
        if params.max_tokens < 1 and not params.prompt_logprobs:
            raise ValueError(f"max_tokens={params.max_tokens} must be >= 1 (0 only to score the prompt: echo with "
                             "logprobs)")
        if params.logprobs is not None and not 0 <= params.logprobs <= TOP_LOGPROBS:
            raise ValueError(f"logprobs={params.logprobs} must be in [0, {TOP_LOGPROBS}]")
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"n={n} must be in [1, {self.max_batch}] (the server's decode slots)")
        if not 0 <= params.adapter < max(self.n_adapters, 1):
            raise ValueError(f"adapter {params.adapter} does not exist (this model has {max(self.n_adapters - 1, 0)}"
                             " LoRA adapters)")

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, emit: Callable[[Event], None]) -> Request:
        """Queue a request; ``emit`` receives its events from the engine thread.

        Raises:
          ValueError: the request cannot be served (see ``check``), or ids outside the vocabulary.
          QueueFullError: ``max_queue`` requests are waiting already.
        """
        return self.submit_n(prompt_ids, params, [emit])[0]

    def submit_n(self, prompt_ids: Sequence[int], params: SamplingParams,
                 emits: Sequence[Callable[[Event], None]]) -> list[Request]:
        """Queue ``len(emits)`` completions of one prompt (OpenAI's ``n``), prefilled once; completion ``i`` draws
        with seed ``params.seed + i``. Raises as ``submit``."""
        self.check(len(prompt_ids), params, len(emits))
        bad = [x for x in prompt_ids if not 0 <= int(x) < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt ids {bad[:5]} are outside [0, vocab_size={self.cfg.vocab_size})")
        unit = [Request(prompt_ids, dataclasses.replace(params, seed=(params.seed + i) % 2**31), emit)
                for i, emit in enumerate(emits)]
        unit[0].siblings = unit[1:]
        for r in unit[1:]:
            r.primary = unit[0]
        with self.cond:
            if not self.running:
                raise RuntimeError("the engine is not running")
            free = sum(r is None for r in self.slots)  # admitted at the engine's next step, not left waiting
            queued = sum(len(u) for u in self.waiting)
            if queued + len(unit) > self.max_queue + free:
                self.metrics.rejected.inc()
                retry = max(1, min(60, math.ceil(self.request_time * (queued / self.max_batch + 1))))
                raise QueueFullError(f"{queued} requests are waiting already (max_queue={self.max_queue}); retry "
                                     f"in about {retry} s", retry)
            self.waiting.append(unit)
            self.cond.notify_all()
        return unit

    def stats(self) -> dict[str, Any]:
        """Slots in use, waiting requests, step counters, prefix cache, compilations so far."""
        return dict(active=sum(s is not None for s in self.slots), waiting=sum(len(u) for u in self.waiting),
                    max_batch=self.max_batch, compiles=compile_count(), prefix_entries=len(self.prefix),
                    prefix_bytes=self.prefix_bytes, **self.steps)

    # ------------------------------------------------------------------ host side
    def _sampling(self, reqs: Sequence[Request | None], steps: Sequence[int] | None = None) -> dict[str, Any]:
        """The per-row sampling arguments of the core's steps (idle rows: greedy)."""
        n = len(reqs)
        seeds, top_k = np.zeros(n, np.int32), np.zeros(n, np.int32)
        temp, top_p = np.zeros(n, np.float32), np.ones(n, np.float32)
        for i, r in enumerate(reqs):
            if r is not None:
                p = r.params
                seeds[i], top_k[i] = np.int32(p.seed % 2**31), p.top_k
                temp[i], top_p[i] = p.temperature, p.top_p
        st = np.zeros(n, np.int32) if steps is None else np.asarray(steps, np.int32)
        out = dict(key=(seeds, st), temperature=temp, top_k=top_k, top_p=top_p)
        if self.n_adapters:
            out["adapters"] = np.array([0 if r is None else r.params.adapter for r in reqs], np.int32)
        return out

    def _fail(self, req: Request, message: str) -> None:
        if not req.finished:
            req.finished = True
            self.metrics.requests.labels("error").inc()
            try:
                req.emit(Event("error", text=message))
            except Exception:  # noqa: BLE001 -- a broken callback must not stop the engine
                log.exception("emit failed")

    def _admit(self) -> None:
        with self.cond:
            while self.waiting:
                unit = self.waiting[0]
                if all(r.cancelled for r in unit):
                    self.waiting.popleft()
                    for r in unit:
                        r.finished = True
                    continue
                free = [b for b, s in enumerate(self.slots) if s is None]
                if len(free) < len(unit):
                    return
                self.waiting.popleft()
                for r, b in zip(unit, free, strict=False):
                    self._place(r, b)

    def _place(self, req: Request, b: int) -> None:
        req.row = b
        req.text = TextStream(self.tokenizer, req.params.stop)
        self.slots[b] = req
        self.pos[b] = -1
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        if req.primary is not None:  # a sibling: waits for its primary's row
            return
        req.chunks = prompt_chunks(req.prompt_ids, self.chunk)
        req.next_chunk = 0
        if req.params.prompt_logprobs:
            req.prompt_lp = [None]
        elif self.prefix_budget:
            self._restore_prefix(req)
        self.prefilling.append(req)

    # ------------------------------------------------------------------ prefix cache
    def _prefix_key(self, ids: Sequence[int], end: int, adapter: int = 0) -> bytes:
        return np.asarray([adapter, *ids[:end]], np.int32).tobytes()  # a prefix's state depends on the adapter

    def _restore_prefix(self, req: Request) -> None:
        """Put the longest cached prefix of ``req``'s prompt (whole chunks, at least one token left to prefill)
        into its row."""
        n = len(req.prompt_ids)
        for j in range((n - 1) // self.chunk, 0, -1):
            key = self._prefix_key(req.prompt_ids, j * self.chunk, req.params.adapter)
            snap = self.prefix.get(key)
            if snap is not None:
                self.prefix.move_to_end(key)
                self.cache = put_row(self.cache, snap, np.int32(req.row))
                req.next_chunk = j
                self.steps["prefix_hit_tokens"] += j * self.chunk
                self.metrics.prefix_hit_tokens.inc(j * self.chunk)
                return

    def _snapshot(self, req: Request, end: int) -> None:
        """Keep the row after the prompt's first ``end`` tokens (a whole chunk boundary) in the prefix cache."""
        key = self._prefix_key(req.prompt_ids, end, req.params.adapter)
        if key in self.prefix:
            self.prefix.move_to_end(key)
            return
        snap = cache_row(self.cache, np.int32(req.row))
        size = sum(x.nbytes for x in jax.tree.leaves(snap))
        if size > self.prefix_budget:
            return
        while self.prefix_bytes + size > self.prefix_budget:
            _, old = self.prefix.popitem(last=False)
            self.prefix_bytes -= sum(x.nbytes for x in jax.tree.leaves(old))
        self.prefix[key] = snap
        self.prefix_bytes += size

    # ------------------------------------------------------------------ slots
    def _free(self, req: Request) -> None:
        b = req.row
        if b is not None and self.slots[b] is req:
            self.slots[b] = None
            self.pos[b] = -1
        if req in self.prefilling:
            self.prefilling.remove(req)
        if req.siblings and any(s.row is not None and self.pos[s.row] < 0 and not s.finished for s in req.siblings):
            for s in req.siblings:  # the primary went before its prompt was prefilled: the siblings cannot start
                if s.row is not None and self.pos[s.row] < 0 and not s.finished:
                    self._fail(s, "the request was cancelled")
                    self._free(s)
        self.request_time = 0.9 * self.request_time + 0.1 * (time.perf_counter() - req.submitted)

    def _drop_cancelled(self) -> None:
        for r in list(self.slots):
            if r is not None and r.cancelled:
                if not r.finished:
                    self.steps["cancelled"] += 1
                    self.metrics.requests.labels("cancelled").inc()
                r.finished = True
                self._free(r)

    def _scored(self, req: Request) -> bool:
        """Whether ``req``'s next chunk needs its log-probs (echo: every chunk; logprobs: the last one)."""
        return req.params.prompt_logprobs or (req.next_chunk == len(req.chunks) - 1 and
                                              req.params.logprobs is not None)

    def _prefill(self) -> None:
        """One prefill chunk for each request being prefilled (as many as ``decode.PREFILL_TOKENS`` allows, the
        longest waiting first), in one call over a bucket of them; a request whose chunk needs log-probs goes alone
        through the scoring step."""
        scored = [r for r in self.prefilling if self._scored(r)]
        plain = [r for r in self.prefilling if not self._scored(r)][:self.buckets_prefill[-1]]
        if scored:
            self._prefill_scored(scored[0])
        if not plain:
            return
        k = next(n for n in self.buckets_prefill if n >= len(plain))
        need = max(int((r.chunks[r.next_chunk][1] >= 0).sum()) for r in plain)
        w = next(x for x in self.widths if x >= need)  # chunks are right-aligned: their tokens are the last columns
        tokens = np.zeros((k, w), np.int32)
        positions = np.full((k, w), -1, np.int32)
        rows = np.full(k, self.max_batch, np.int32)  # >= B: a padding entry
        reset = np.zeros(k, np.bool_)
        for i, r in enumerate(plain):
            tokens[i], positions[i] = r.chunks[r.next_chunk][0][0, -w:], r.chunks[r.next_chunk][1][0, -w:]
            rows[i], reset[i] = r.row, r.next_chunk == 0
        nxt, self.cache = prefill_rows_batch_jit(self.graphdef, self.state, self.cache, tokens, positions, rows,
                                                 reset, layers=self.layers,
                                                 **self._sampling([*plain, *[None] * (k - len(plain))]))
        nxt = np.asarray(nxt)
        for i, r in enumerate(plain):
            self._after_chunk(r, int(nxt[i]), None)
        for r in plain:  # round robin: the requests that just had a chunk go to the back
            if r in self.prefilling:
                self.prefilling.remove(r)
                self.prefilling.append(r)

    def _prefill_scored(self, req: Request) -> None:
        tokens, positions = req.chunks[req.next_chunk]
        last = req.next_chunk == len(req.chunks) - 1
        p = req.params
        targets = np.zeros_like(tokens)
        idx = positions[0] + 1
        ok = (positions[0] >= 0) & (idx < len(req.prompt_ids))
        targets[0, ok] = np.asarray(req.prompt_ids, np.int32)[idx[ok]]
        if last:
            targets[0, -1] = -1  # the prompt's last column: the sampled token
        nxt, self.cache, lp, top_lp, top_ids = prefill_rows_scored(
            self.graphdef, self.state, self.cache, tokens, positions, targets, layers=self.layers,
            row=np.int32(req.row), reset=np.bool_(req.next_chunk == 0), **self._sampling([req], [0]))
        lp, top_lp, top_ids = np.asarray(lp)[0], np.asarray(top_lp)[0], np.asarray(top_ids)[0]
        if p.prompt_logprobs:
            for c in np.nonzero(ok)[0]:
                req.prompt_lp.append(self._token_lp(int(targets[0, c]), lp[c], top_lp[c], top_ids[c], p))
        tok = int(np.asarray(nxt)[0])
        self._after_chunk(req, tok, self._token_lp(tok, lp[-1], top_lp[-1], top_ids[-1], p))

    def _after_chunk(self, req: Request, tok: int, first_lp: TokenLogprob | None) -> None:
        """Account a prefilled chunk of ``req``: counters, a prefix-cache snapshot; after the last chunk, the
        siblings' rows and the first new token ``tok``."""
        b = req.row
        _, positions = req.chunks[req.next_chunk]
        last = req.next_chunk == len(req.chunks) - 1
        n_real = int((positions >= 0).sum())
        self.steps["prefill_chunks"] += 1
        self.steps["prefill_tokens"] += n_real
        self.metrics.prefill_tokens.inc(n_real)
        req.next_chunk += 1
        end = int(positions[0, -1]) + 1
        if self.prefix_budget and n_real == self.chunk and end % self.chunk == 0:
            self._snapshot(req, end)
        if not last:
            return
        self.prefilling.remove(req)
        n = len(req.prompt_ids)
        for s in req.siblings:  # n > 1: copies of the prefilled row; each feeds the last prompt token again
            if s.row is not None and not s.finished:
                self.cache = copy_row(self.cache, np.int32(b), np.int32(s.row))
                self.pos[s.row], self.last[s.row] = n - 1, req.prompt_ids[-1]
                s.prompt_lp = req.prompt_lp
        if req.params.max_tokens == 0:  # scoring only (echo): no new token
            self._finish(req, "length")
            return
        self.pos[b], self.last[b] = n, tok
        self._on_token(req, tok, first_lp)
        self._flush(req)
        self.metrics.generated(1)

    def _token_lp(self, tok: int, lp: float, top_lp: np.ndarray, top_ids: np.ndarray,
                  p: SamplingParams) -> TokenLogprob:
        k = p.logprobs or 0
        return TokenLogprob(tok, float(lp), [(int(i), float(v)) for i, v in zip(top_ids[:k], top_lp[:k],
                                                                                 strict=True)])

    def _decode_call(self, reqs: Sequence[Request | None], num_steps: int, logprobs: bool) -> tuple:
        rows = len(reqs)
        decoding = [r is not None for r in reqs]
        positions = np.where(decoding, self.pos[:rows], -1).astype(np.int32)
        steps = [len(r.generated) if r is not None else 0 for r in reqs]
        budget = np.array([r.params.max_tokens - len(r.generated) if r is not None else 0 for r in reqs], np.int32)
        eos = np.array([-1 if r is None or r.params.ignore_eos else self.eos_id for r in reqs], np.int32)
        smp = self._sampling(reqs, steps)
        seeds, st = smp.pop("key")
        out = decode_rows_loop_jit(self.graphdef, self.state, self.cache, self.last[:rows].copy(), positions, seeds,
                                   st, budget, eos, np.int32(num_steps), rows=rows, layers=self.layers,
                                   logprobs=logprobs, **smp)
        self.cache = out[2]
        return out

    def _decode(self) -> None:
        rows = [b for b, r in enumerate(self.slots) if r is not None and self.pos[b] >= 0]
        if not rows:
            return
        bucket = next(r for r in self.buckets if r > rows[-1])
        reqs = [self.slots[b] if b in rows else None for b in range(bucket)]
        busy = bool(self.prefilling) or (self.waiting and any(s is None for s in self.slots))
        per_step = self.step_time.get(bucket)
        block = 1 if busy or per_step is None else int(max(1, min(DECODE_BLOCK, self.sync_s / per_step)))
        logprobs = any(r is not None and r.params.logprobs is not None for r in reqs)
        t0 = time.perf_counter()
        out = self._decode_call(reqs, block, logprobs)
        tokens, n = np.asarray(out[0]), int(out[1])
        lps = [np.asarray(x) for x in out[3:]] if logprobs else None
        now = time.perf_counter()
        if n:
            est = (now - t0) / n
            self.step_time[bucket] = est if per_step is None else 0.8 * per_step + 0.2 * est
        if n == 0:
            return
        self.steps["decode_steps"] += n
        self.steps["decode_calls"] += 1
        self.steps["peak_rows"] = max(self.steps["peak_rows"], len(rows))
        before = self.steps["tokens"]
        for b in rows:
            req = self.slots[b]
            for t in range(n):
                lp = None
                if lps is not None and req.params.logprobs is not None:
                    lp = self._token_lp(int(tokens[b, t]), lps[0][b, t], lps[1][b, t], lps[2][b, t], req.params)
                self._on_token(req, int(tokens[b, t]), lp, now=t0 + (now - t0) * (t + 1) / n)
                if req.finished or req.cancelled:
                    break
            else:
                self.pos[b] += n
                self.last[b] = tokens[b, n - 1]
            self._flush(req)
        self.metrics.generated(self.steps["tokens"] - before)

    def _flush(self, req: Request) -> None:
        """Send ``req``'s buffered delta (if it has text or tokens)."""
        buf = req.pending
        if buf.text or buf.token_ids or buf.logprobs:
            req.pending = Event("delta")
            try:
                req.emit(buf)
            except Exception:  # noqa: BLE001 -- the client's side broke: drop the request
                log.exception("emit failed")
                req.cancelled = True

    def _finish(self, req: Request, finish: str) -> None:
        req.finished = True
        self.metrics.requests.labels(finish).inc()
        try:
            req.emit(Event("done", text=req.text.text, finish_reason=finish, prompt_tokens=len(req.prompt_ids),
                           completion_tokens=len(req.generated), prompt_logprobs=req.prompt_lp))
        except Exception:  # noqa: BLE001 -- the client's side broke
            log.exception("emit failed")
        self._free(req)

    def _on_token(self, req: Request, tok: int, lp: TokenLogprob | None = None, now: float | None = None) -> None:
        """Account one sampled token of ``req``: text delta, EOS / stop string / max_tokens."""
        now = time.perf_counter() if now is None else now
        if req.last_time is None:
            self.metrics.ttft.observe(now - req.submitted)
        else:
            self.metrics.itl.observe(now - req.last_time)
        req.last_time = now
        req.generated.append(tok)
        self.steps["tokens"] += 1
        p = req.params
        eos = tok == self.eos_id and not p.ignore_eos
        last = len(req.generated) >= p.max_tokens
        delta = req.text.push(tok, eos=eos, last=last)
        finish = "stop" if req.text.stopped else "length" if last else None
        keep = tok != self.eos_id or p.ignore_eos
        buf = req.pending  # one delta event per request per engine step (a decode block's tokens together)
        buf.text += delta
        buf.token_ids += [tok] if keep else []
        if lp is not None:  # EOS too (as vLLM): lm-eval drops the last entry of an echoed prompt's logprobs
            buf.logprobs = [*(buf.logprobs or []), lp]
        if finish is not None:
            self._flush(req)
        if finish is not None:
            self._finish(req, finish)
        elif req.cancelled:
            self.steps["cancelled"] += 1
            self.metrics.requests.labels("cancelled").inc()
            req.finished = True
            self._free(req)

    def _loop(self) -> None:
        with self._mesh():  # the mesh context is per thread: this one runs every step
            self._serve()

    def _serve(self) -> None:
        while True:
            with self.cond:
                if not self.running:
                    return
                idle = not self.waiting and all(s is None for s in self.slots)
                if idle:
                    self.cond.wait(timeout=0.1)
                    continue
            try:
                self._drop_cancelled()
                self._admit()
                if self.prefilling:
                    self._prefill()
                self._drop_cancelled()
                self._decode()
            except Exception as e:  # noqa: BLE001 -- fail the running requests, keep serving
                log.error("engine step failed: %s\n%s", e, traceback.format_exc())
                for r in self.slots:
                    if r is not None:
                        self._fail(r, f"internal error: {type(e).__name__}: {e}")
                        self._free(r)
                if any(x.is_deleted() for x in jax.tree.leaves(self.cache)):  # donated into a failed call
                    self.cache = self._new_cache()
