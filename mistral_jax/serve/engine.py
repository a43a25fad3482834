"""Continuous-batching engine: scheduling over a fixed set of decode slots of one rolling-buffer cache.

Legend: B decode slots (``max_batch``), C prefill chunk, S cache slots per row.

The engine only schedules; the decoding core (``inference``) does the rest. The cache is
``decode.new_cache(cfg, B, S)``: row ``b`` belongs to the request in decode slot ``b`` (``S = W`` with a sliding
window, else ``max_seq_len``), exactly as in ``mj.generate``. Two of the core's jitted steps run on it, each compiled
once: ``decode.prefill_rows`` (one chunk ``[1, C]`` of one request's right-aligned prompt into row ``b``, a traced
index, the row cleared on the first chunk; it samples the first new token from the last column) and
``decode.decode_rows`` (one token for every row ``[B]``; rows not decoding get position -1, so they neither attend
nor write). Per-request sampling settings are arrays ``[B]`` (temperature 0 = greedy), so requests with different
settings share one compiled step; row ``b``'s n-th new token is drawn with ``fold_in(key(seed_b), n)``: the same
draws as ``mj.generate(prompt, seed=seed_b)``. Text, stop strings and streamed deltas are ``detokenize.TextStream``.

The loop (one thread owns the device): admit waiting requests into free slots, run one prefill chunk (so a long
prompt never stalls the running requests for more than one chunk), run one decode step for the decoding rows,
account the new tokens (EOS, stop strings, ``max_tokens``) and hand events to the request's ``emit`` callback. A
finished or cancelled request frees its slot at once. Shapes never change, so requests coming and going cause no
recompilation (``compile_count`` counts XLA compilations).
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
from mistral_jax.inference.decode import DEFAULT_CHUNK, decode_rows, new_cache, pad_prompts, prefill_rows
from mistral_jax.inference.detokenize import TextStream
from mistral_jax.inference.per_layer import serving_layers
from mistral_jax.model.kv_cache import KVCache

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
    """The waiting queue holds ``max_queue`` requests already (HTTP 429)."""


@dataclasses.dataclass
class SamplingParams:
    """Per-request generation settings (validated by the HTTP layer or ``Engine.check``)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = all tokens
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # run to max_tokens / a stop string (vLLM's extension; benchmarks)


@dataclasses.dataclass
class Event:
    """What the engine tells a request: ``kind`` is ``"delta"`` (new ``text``/``token_ids``), ``"done"`` (the whole
    ``text``, ``finish_reason`` "stop" / "length", token counts) or ``"error"`` (``text`` holds the message).
    The deltas join to the final text."""

    kind: str
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


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
        self.chunks: list[tuple[np.ndarray, np.ndarray]] = []
        self.next_chunk = 0
        self.generated: list[int] = []  # sampled ids (EOS included when sampled)
        self.text: TextStream | None = None  # the text of the ids (no EOS), made on admission
        self.finished = False

    def cancel(self) -> None:
        """Ask the engine to drop this request (the client went away); its slot is freed on the next step."""
        self.cancelled = True


# ----------------------------------------------------------------------------- the engine
class Engine:
    """Continuous batching over ``max_batch`` decode slots; call ``start()``, then ``submit()`` from any thread.

    Args:
      model: a ``mistral_jax.Transformer``.
      tokenizer: a ``mistral_jax.Tokenizer`` (``decode``, ``eos_id``).
      max_batch: decode slots B (requests decoded together).
      max_queue: requests waiting for a slot beyond which ``submit`` raises ``QueueFullError``.
      chunk_size: prefill chunk C (default: the window W, else min(4096, max_seq_len); capped at the cache size).
      unstack: per-layer weight copies (``serving_layers``); None = on CPU when they fit.
      mesh: serve sharded on this mesh (``sharding.make_mesh``): the weights by their logical axes and ``rules``
        (as in training), the cache's slots over the batch axes and its kv heads over ``tensor``. ``max_batch``
        must be a multiple of the batch axes' size.
      rules: the logical -> mesh axis rules used with ``mesh`` (default ``sharding.DEFAULT_RULES``).
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 16, max_queue: int = 256,
                 chunk_size: int | None = None, unstack: bool | None = None,
                 mesh: jax.sharding.Mesh | None = None, rules: sharding.ShardingRules | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1. Fix: pass e.g. 16.")
        if max_queue < 0:
            raise ValueError(f"max_queue={max_queue} must be >= 0. Fix: pass e.g. 256.")
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
        if mesh is not None:
            batch_ways = batch_shards(mesh, self.rules)
            if max_batch % batch_ways:
                raise ValueError(f"max_batch={max_batch} is not a multiple of the mesh's batch axes "
                                 f"({batch_ways} ways: {dict(mesh.shape)}). Fix: pass --max_batch "
                                 f"{max(batch_ways, max_batch // batch_ways * batch_ways)} or a mesh with fewer "
                                 "data / fsdp ways.")
            with self._mesh():
                self.state = jax.device_put(self.state, sharding.state_shardings(self.state, mesh, self.rules))
        self.cache = self._new_cache()
        self.layers = serving_layers(model, unstack, self.state)
        self.slots: list[Request | None] = [None] * max_batch
        self.pos = np.full(max_batch, -1, np.int32)  # position of the token fed next, per decoding row
        self.last = np.zeros(max_batch, np.int32)
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: collections.deque[int] = collections.deque()  # rows whose prompt is being fed
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.running = False
        self.steps = dict(prefill_chunks=0, decode_steps=0, tokens=0, cancelled=0, peak_rows=0)

    def _new_cache(self) -> KVCache:
        """An empty cache ``[L, B, S, ...]``, created in its shards on the mesh."""
        with self._mesh():
            return new_cache(self.cfg, self.max_batch, self.cache_slots, self.mesh, self.rules)

    def _mesh(self) -> contextlib.AbstractContextManager:
        """The mesh context for tracing and running the steps (entered by the thread that runs them)."""
        return sharding.use_mesh(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ public
    def start(self, warmup: bool = True) -> Engine:
        """Compile both steps (``warmup``) and start the engine thread."""
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
        for r in [*self.waiting, *(s for s in self.slots if s is not None)]:
            self._fail(r, "the server is shutting down")
        self.waiting.clear()

    def warmup(self) -> None:
        """Compile the core's ``prefill_rows`` and ``decode_rows`` once (on an idle cache: nothing is written)."""
        with self._mesh():
            self._warmup()

    def _warmup(self) -> None:
        tok = np.zeros((1, self.chunk), np.int32)
        pos = np.full((1, self.chunk), -1, np.int32)
        _, self.cache = prefill_rows(self.graphdef, self.state, self.cache, tok, pos, layers=self.layers,
                                     row=np.int32(0), reset=np.bool_(True), **self._sampling([None]))
        nxt, _, self.cache = decode_rows(self.graphdef, self.state, self.cache, np.zeros(self.max_batch, np.int32),
                                         np.full(self.max_batch, -1, np.int32), layers=self.layers,
                                         **self._sampling([None] * self.max_batch))
        jax.block_until_ready(nxt)

    def check(self, n_prompt: int, params: SamplingParams) -> None:
        """Raise ``ValueError`` (message for the client) when the request cannot be served."""
        if n_prompt < 1:
            raise ValueError("the prompt is empty; generation needs at least one token")
        if n_prompt + params.max_tokens > self.max_len:
            raise ValueError(f"this model's maximum context length is {self.max_len} tokens, but the prompt has "
                             f"{n_prompt} tokens and max_tokens is {params.max_tokens} ({n_prompt + params.max_tokens}"
                             f" in all). Fix: shorten the prompt or lower max_tokens")

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, emit: Callable[[Event], None]) -> Request:
        """Queue a request; ``emit`` receives its events from the engine thread.

        Raises:
          ValueError: the request cannot be served (see ``check``), or ids outside the vocabulary.
          QueueFullError: ``max_queue`` requests are waiting already.
        """
        self.check(len(prompt_ids), params)
        bad = [x for x in prompt_ids if not 0 <= int(x) < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt ids {bad[:5]} are outside [0, vocab_size={self.cfg.vocab_size})")
        req = Request(prompt_ids, params, emit)
        with self.cond:
            if not self.running:
                raise RuntimeError("the engine is not running")
            free = sum(r is None for r in self.slots)  # admitted at the engine's next step, not left waiting
            if len(self.waiting) >= self.max_queue + free:
                raise QueueFullError(f"{len(self.waiting)} requests are waiting already (max_queue="
                                     f"{self.max_queue}); retry later")
            self.waiting.append(req)
            self.cond.notify_all()
        return req

    def stats(self) -> dict[str, Any]:
        """Slots in use, waiting requests, step counters, compilations so far."""
        return dict(active=sum(s is not None for s in self.slots), waiting=len(self.waiting),
                    max_batch=self.max_batch, compiles=compile_count(), **self.steps)

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
        return dict(key=(seeds, st), temperature=temp, top_k=top_k, top_p=top_p)

    def _fail(self, req: Request, message: str) -> None:
        if not req.finished:
            req.finished = True
            try:
                req.emit(Event("error", text=message))
            except Exception:  # noqa: BLE001 -- a broken callback must not stop the engine
                log.exception("emit failed")

    def _admit(self) -> None:
        with self.cond:
            while self.waiting and self.waiting[0].cancelled:
                self.waiting.popleft().finished = True
            for b in range(self.max_batch):
                if not self.waiting:
                    break
                if self.slots[b] is None:
                    req = self.waiting.popleft()
                    while req.cancelled and self.waiting:
                        req.finished = True
                        req = self.waiting.popleft()
                    if req.cancelled:
                        req.finished = True
                        break
                    self._place(req, b)

    def _place(self, req: Request, b: int) -> None:
        n, c = len(req.prompt_ids), self.chunk
        total = math.ceil(n / c) * c
        tokens, positions = pad_prompts([req.prompt_ids], total)  # right-aligned: the first chunk holds the padding
        req.chunks = [(tokens[:, s:s + c], positions[:, s:s + c]) for s in range(0, total, c)]
        req.next_chunk = 0
        req.text = TextStream(self.tokenizer, req.params.stop)
        self.slots[b] = req
        self.pos[b] = -1
        self.prefilling.append(b)

    def _free(self, b: int) -> None:
        self.slots[b] = None
        self.pos[b] = -1
        if b in self.prefilling:
            self.prefilling.remove(b)

    def _drop_cancelled(self) -> None:
        for b, r in enumerate(self.slots):
            if r is not None and r.cancelled:
                self.steps["cancelled"] += not r.finished
                r.finished = True
                self._free(b)

    def _prefill_one(self) -> None:
        b = self.prefilling[0]
        req = self.slots[b]
        tokens, positions = req.chunks[req.next_chunk]
        first, last = req.next_chunk == 0, req.next_chunk == len(req.chunks) - 1
        nxt, self.cache = prefill_rows(self.graphdef, self.state, self.cache, tokens, positions, layers=self.layers,
                                       row=np.int32(b), reset=np.bool_(first), **self._sampling([req], [0]))
        self.steps["prefill_chunks"] += 1
        req.next_chunk += 1
        if last:
            self.prefilling.popleft()
            tok = int(np.asarray(nxt)[0])
            self.pos[b] = len(req.prompt_ids)
            self.last[b] = tok
            self._on_token(b, tok)
        else:  # round robin between prompts being prefilled
            self.prefilling.rotate(-1)

    def _decode(self) -> None:
        rows = [b for b, r in enumerate(self.slots) if r is not None and self.pos[b] >= 0]
        if not rows:
            return
        reqs = [self.slots[b] if b in rows else None for b in range(self.max_batch)]
        positions = np.where([r is not None for r in reqs], self.pos, -1).astype(np.int32)
        steps = [len(r.generated) if r is not None else 0 for r in reqs]
        nxt, _, self.cache = decode_rows(self.graphdef, self.state, self.cache, self.last.copy(), positions,
                                         layers=self.layers, **self._sampling(reqs, steps))
        nxt = np.asarray(nxt)
        self.steps["decode_steps"] += 1
        self.steps["peak_rows"] = max(self.steps["peak_rows"], len(rows))
        for b in rows:
            self.pos[b] += 1
            self.last[b] = nxt[b]
            self._on_token(b, int(nxt[b]))

    def _on_token(self, b: int, tok: int) -> None:
        """Account one sampled token of row ``b``: text delta, EOS / stop string / max_tokens."""
        req = self.slots[b]
        req.generated.append(tok)
        self.steps["tokens"] += 1
        p = req.params
        eos = tok == self.eos_id and not p.ignore_eos
        last = len(req.generated) >= p.max_tokens
        delta = req.text.push(tok, eos=eos, last=last)
        finish = "stop" if req.text.stopped else "length" if last else None
        text = req.text.text
        try:
            if delta or finish is None:
                req.emit(Event("delta", text=delta, token_ids=[tok] if tok != self.eos_id or p.ignore_eos else []))
            if finish is not None:
                req.finished = True
                req.emit(Event("done", text=text, finish_reason=finish, prompt_tokens=len(req.prompt_ids),
                               completion_tokens=len(req.generated)))
        except Exception:  # noqa: BLE001 -- the client's side broke: drop the request
            log.exception("emit failed")
            req.cancelled = True
        if finish is None and req.cancelled:
            self.steps["cancelled"] += 1
        if finish is not None or req.cancelled:
            req.finished = True
            self._free(b)

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
                    self._prefill_one()
                self._drop_cancelled()
                self._decode()
            except Exception as e:  # noqa: BLE001 -- fail the running requests, keep serving
                log.error("engine step failed: %s\n%s", e, traceback.format_exc())
                for b, r in enumerate(self.slots):
                    if r is not None:
                        self._fail(r, f"internal error: {type(e).__name__}: {e}")
                        self._free(b)
                if any(x.is_deleted() for x in jax.tree.leaves(self.cache)):  # donated into a failed call
                    self.cache = self._new_cache()
