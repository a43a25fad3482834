"""The OpenAI-compatible HTTP layer (FastAPI) over an ``Engine``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (Mistral's chat format, ``data.chat.render_prompt``),
``GET /v1/models``, ``GET /health``. ``"stream": true`` answers with server-sent events (``data: {...}`` chunks, then
``data: [DONE]``). Every answer carries ``usage`` (prompt / completion / total tokens) and each choice a
``finish_reason`` ("stop": EOS or a stop string; "length": ``max_tokens``).

Bad input is HTTP 400 with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``; a full waiting
queue is 429. The handlers never touch the device: they hand requests to the engine thread and read its events from
an ``asyncio.Queue`` (filled with ``loop.call_soon_threadsafe``). A client that goes away cancels its requests, which
frees their decode slots at the engine's next step.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import math
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from mistral_jax.inference.decode import TOP_LOGPROBS
from mistral_jax.inference.detokenize import decode_text
from mistral_jax.inference.prompt import encode_prompt
from mistral_jax.serve.engine import Engine, Event, QueueFullError, SamplingParams, TokenLogprob

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class APIError(Exception):
    """An error answered with OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):  # noqa: A002 -- OpenAI's field name
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type
        self.headers: dict[str, str] | None = None

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


# ----------------------------------------------------------------------------- request parsing
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclasses.dataclass
class Options:
    """What a request asks beyond sampling: ``n`` completions per prompt, of ``best_of`` drawn (completions),
    ``echo`` the prompt, ``logprobs``: alternatives per token (None: no logprobs)."""

    n: int = 1
    best_of: int = 1
    echo: bool = False
    logprobs: int | None = None


def parse_sampling(body: dict[str, Any], default_max_tokens: int, chat: bool = False
                   ) -> tuple[SamplingParams, Options]:
    """Per-request settings from an OpenAI request body; raises ``APIError`` naming the bad field."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    echo = body.get("echo", False) if not chat else False
    if not isinstance(echo, bool) and echo is not None:
        raise APIError(f"echo={echo!r} must be a boolean", "echo", "invalid_value")
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif not _is_int(max_tokens) or max_tokens < (0 if echo else 1):
        raise APIError(f"{param}={max_tokens!r} must be an integer >= 1 (0 only with echo)", param, "invalid_value")
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    if not _is_num(temperature) or not 0 <= temperature <= 2:
        raise APIError(f"temperature={temperature!r} must be a number in [0, 2] (0 = greedy)", "temperature",
                       "invalid_value")
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not _is_num(top_p) or not 0 < top_p <= 1:
        raise APIError(f"top_p={top_p!r} must be a number in (0, 1]", "top_p", "invalid_value")
    top_k = body.get("top_k")
    top_k = 0 if top_k is None or top_k == -1 else top_k
    if not _is_int(top_k) or top_k < 0:
        raise APIError(f"top_k={top_k!r} must be an integer >= 1 (or -1 / 0 / null for all tokens)", "top_k",
                       "invalid_value")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**31)
    elif not _is_int(seed):
        raise APIError(f"seed={seed!r} must be an integer", "seed", "invalid_value")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError(f"stop={body.get('stop')!r} must be a non-empty string or a list of them", "stop",
                       "invalid_value")
    n = body.get("n")
    n = 1 if n is None else n
    if not _is_int(n) or n < 1:
        raise APIError(f"n={n!r} must be an integer >= 1", "n", "invalid_value")
    best_of = body.get("best_of") if not chat else None
    best_of = n if best_of is None else best_of
    if not _is_int(best_of) or best_of < n:
        raise APIError(f"best_of={best_of!r} must be an integer >= n={n}", "best_of", "invalid_value")
    if chat:
        want = body.get("logprobs")
        if not isinstance(want, bool) and want is not None:
            raise APIError(f"logprobs={want!r} must be a boolean (top_logprobs gives the alternatives)", "logprobs",
                           "invalid_value")
        top = body.get("top_logprobs")
        if top is not None and (not _is_int(top) or not 0 <= top <= TOP_LOGPROBS):
            raise APIError(f"top_logprobs={top!r} must be an integer in [0, {TOP_LOGPROBS}]", "top_logprobs",
                           "invalid_value")
        if top is not None and not want:
            raise APIError("top_logprobs needs logprobs=true", "top_logprobs", "invalid_value")
        logprobs = (top or 0) if want else None
    else:
        logprobs = body.get("logprobs")
        if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= TOP_LOGPROBS):
            raise APIError(f"logprobs={logprobs!r} must be an integer in [0, {TOP_LOGPROBS}] (the alternatives "
                           "returned per token) or null", "logprobs", "invalid_value")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError(f"ignore_eos={ignore_eos!r} must be a boolean", "ignore_eos", "invalid_value")
    echo = bool(echo)
    if echo and max_tokens == 0 and logprobs is None:
        raise APIError("max_tokens=0 with echo only makes sense with logprobs (scoring the prompt)", "max_tokens",
                       "invalid_value")
    ranked = best_of > n
    params = SamplingParams(max_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p),
                            top_k=int(top_k), seed=int(seed) % 2**31, stop=tuple(stop), ignore_eos=ignore_eos,
                            logprobs=logprobs if logprobs is not None or not ranked else 0,
                            prompt_logprobs=echo and logprobs is not None)
    return params, Options(n=n, best_of=best_of, echo=echo, logprobs=logprobs)


def _completion_prompts(tokenizer: Any, prompt: Any) -> list[tuple[list[int], str | None]]:
    """The prompts of a completions request as ``(ids, text)`` (``text`` None where ids were given)."""
    bad = APIError(f"prompt must be a string, a list of strings, a list of token ids or a list of lists of ids; "
                   f"got {type(prompt).__name__}", "prompt", "invalid_value")
    if isinstance(prompt, str):
        return [(encode_prompt(tokenizer, prompt), prompt)]
    if not isinstance(prompt, list) or not prompt:
        raise bad
    if all(_is_int(x) for x in prompt):
        return [(list(prompt), None)]
    if all(isinstance(x, str) for x in prompt):
        return [(encode_prompt(tokenizer, x), x) for x in prompt]
    if all(isinstance(x, list) and x and all(_is_int(y) for y in x) for x in prompt):
        return [(list(x), None) for x in prompt]
    raise bad


def _chat_prompt(tokenizer: Any, messages: Any) -> list[int]:
    from mistral_jax.data.chat import render_prompt

    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list of {role, content} objects", "messages", "invalid_value")
    flat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(f"messages[{i}] must be an object with role and content", "messages", "invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content):
                raise APIError(f"messages[{i}].content: only text parts are supported", "messages",
                               "unsupported_value")
            content = "".join(texts)
        flat.append({"role": m.get("role"), "content": content})
    try:
        return render_prompt(flat, tokenizer)
    except (ValueError, TypeError, KeyError) as e:
        raise APIError(f"messages: {e}", "messages", "invalid_value") from None


# ----------------------------------------------------------------------------- logprobs in OpenAI's formats
def token_text(tokenizer: Any, i: int) -> str:
    """A token's text as OpenAI lists it in ``logprobs``: the piece with ``▁`` as a space (so the leading space of a
    word stays), a byte-fallback piece as its character where it is ASCII (else the piece, e.g. ``<0xE2>``: a lone
    byte is no text, and ``top_logprobs`` keys must not collide), special tokens as themselves."""
    piece_of = getattr(tokenizer, "id_to_piece", None)
    if piece_of is None:
        return decode_text(tokenizer, [i])
    piece = piece_of(int(i))
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">") and int(piece[3:5], 16) < 0x80:
        return chr(int(piece[3:5], 16))  # an ASCII byte; other bytes keep their piece (one key per token)
    return piece.replace("\u2581", " ")


def completion_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """``/v1/completions``' ``logprobs`` object: ``tokens``, ``token_logprobs``, ``top_logprobs`` (a dict per token;
    None for an echoed prompt's first token, whose entry has log-prob None), ``text_offset``."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for e in entries:
        tokens.append(token_text(tokenizer, e.id))
        lps.append(e.logprob)
        tops.append({token_text(tokenizer, i): v for i, v in e.top} if e.top or e.logprob is not None else None)
        offsets.append(pos)
        pos += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """``/v1/chat/completions``' ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    def one(i: int, lp: float) -> dict[str, Any]:
        t = token_text(tokenizer, i)
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

    return {"content": [{**one(e.id, e.logprob), "top_logprobs": [one(i, v) for i, v in e.top]} for e in entries]}


# ----------------------------------------------------------------------------- the app
def create_app(engine: Engine, model_name: str, adapters: Sequence[str] = ()) -> FastAPI:
    """The FastAPI app serving ``engine`` under the model id ``model_name``; with a multi-LoRA model
    (``lora.stack_adapters``), adapter ``i + 1`` under the id ``adapters[i]`` (a request's ``model`` picks it)."""
    if adapters and len(adapters) + 1 != engine.n_adapters:
        raise ValueError(f"{len(adapters)} adapter names for a model with {max(engine.n_adapters - 1, 0)} adapters. "
                         "Fix: name each adapter stack_adapters was given, in order.")
    ids = {model_name: 0, **{name: i + 1 for i, name in enumerate(adapters)}}
    if len(ids) != len(adapters) + 1:
        raise ValueError(f"model ids must differ: {[model_name, *adapters]}. Fix: give each adapter its own name.")
    from fastapi.responses import Response

    from mistral_jax.serve.metrics import CONTENT_TYPE

    app = FastAPI(title="mistral_jax", docs_url=None, redoc_url=None)
    tokenizer = engine.tokenizer
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "mistral_jax", "root": name,
             "parent": None if i == 0 else model_name, "max_model_len": engine.max_len} for name, i in ids.items()]}

    # vLLM's tokenizer endpoints: lm-eval's local-completions finds them and tokenizes with the server's tokenizer.
    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        bos, eos = getattr(tokenizer, "bos_id", None), tokenizer.eos_id
        return {"tokenizer_class": type(tokenizer).__name__, "model": model_name, "max_model_len": engine.max_len,
                "bos_token": "<s>" if bos is not None else None, "eos_token": "</s>", "pad_token": None,
                "bos_token_id": bos, "eos_token_id": eos}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await read_body(request)
        text = body.get("prompt")
        if not isinstance(text, str):
            raise APIError("prompt must be a string", "prompt", "invalid_value")
        add = body.get("add_special_tokens", True)
        if not isinstance(add, bool):
            raise APIError(f"add_special_tokens={add!r} must be a boolean", "add_special_tokens", "invalid_value")
        ids = encode_prompt(tokenizer, text, bos=add)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await read_body(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(_is_int(x) and 0 <= x < engine.cfg.vocab_size for x in ids):
            raise APIError(f"tokens must be a list of ids in [0, {engine.cfg.vocab_size})", "tokens",
                           "invalid_value")
        return {"prompt": decode_text(tokenizer, ids)}

    async def read_body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object", None, "invalid_json")
        model = body.get("model")
        if model is not None and model not in ids:
            raise APIError(f"the model {model!r} does not exist; this server serves {', '.join(map(repr, ids))}",
                           "model", "model_not_found")
        return body

    def adapter_of(body: dict[str, Any]) -> int:
        return ids.get(body.get("model"), 0)

    def submit_all(prompts: Sequence[list[int]], params: SamplingParams, per_prompt: int,
                   queue: asyncio.Queue) -> list:
        """Submit ``per_prompt`` completions of each prompt; events arrive as ``(choice index, event)``."""
        loop = asyncio.get_running_loop()
        for ids in prompts:
            try:
                engine.check(len(ids), params, per_prompt)
            except ValueError as e:
                code = "context_length_exceeded" if "context length" in str(e) else "invalid_value"
                raise APIError(str(e), "prompt" if code == "context_length_exceeded" else None, code) from None
        reqs = []
        try:
            for p, ids in enumerate(prompts):
                def emit(ev: Event, i: int) -> None:
                    loop.call_soon_threadsafe(queue.put_nowait, (i, ev))

                emits = [lambda ev, i=p * per_prompt + j: emit(ev, i) for j in range(per_prompt)]
                reqs += engine.submit_n(ids, params, emits)
        except QueueFullError as e:
            for r in reqs:
                r.cancel()
            err = APIError(str(e), None, "rate_limit_exceeded", status=429, type="rate_limit_error")
            err.headers = {"Retry-After": str(e.retry_after)}
            raise err from None
        except ValueError as e:
            for r in reqs:
                r.cancel()
            raise APIError(str(e), "prompt", "invalid_value") from None
        except RuntimeError as e:
            for r in reqs:
                r.cancel()
            raise APIError(str(e), None, "unavailable", status=503, type="server_error") from None
        return reqs

    async def events(reqs: list, queue: asyncio.Queue, request: Request) -> AsyncIterator[tuple[int, Event]]:
        """Events of ``reqs`` until each is done; cancels the unfinished ones if the consumer stops or the
        client disconnects."""
        open_ = len(reqs)
        try:
            while open_:
                try:
                    i, ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if ev.kind in ("done", "error"):
                    open_ -= 1
                yield i, ev
        finally:
            for r in reqs:
                if not r.finished:
                    r.cancel()

    async def run(request: Request, prompts: list[tuple[list[int], str | None]], params: SamplingParams,
                  opts: Options, chat: bool, stream: bool, include_usage: bool):
        if opts.best_of > opts.n and stream:
            raise APIError("best_of > n cannot be streamed (the best completions are known at the end)", "best_of",
                           "invalid_value")
        queue: asyncio.Queue = asyncio.Queue()
        per = opts.best_of
        reqs = submit_all([ids for ids, _ in prompts], params, per, queue)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        served = next(name for name, i in ids.items() if i == params.adapter)
        obj = "chat.completion" if chat else "text_completion"
        now = int(time.time())

        def echo_text(p: int) -> str:
            ids, text = prompts[p]
            return text if text is not None else decode_text(tokenizer, ids)

        def lp_object(entries: list, prompt_lp: list | None, p: int) -> dict[str, Any] | None:
            if opts.logprobs is None:
                return None
            if chat:
                return chat_logprobs(tokenizer, entries)
            head = []
            if opts.echo and prompt_lp is not None:
                head = [TokenLogprob(prompts[p][0][0], None, [])] + prompt_lp[1:]
            return completion_logprobs(tokenizer, head + entries)

        if not stream:
            done: dict[int, Event] = {}
            lps: dict[int, list] = collections.defaultdict(list)
            async for i, ev in events(reqs, queue, request):
                if ev.kind == "delta" and ev.logprobs:
                    lps[i] += ev.logprobs
                elif ev.kind == "done":
                    done[i] = ev
                elif ev.kind == "error":
                    raise APIError(ev.text, None, "internal_error", status=500, type="server_error")
            if len(done) < len(reqs):  # the client went away
                return JSONResponse({"error": {"message": "client disconnected", "type": "server_error",
                                               "param": None, "code": None}}, status_code=499)
            choices = []
            for p in range(len(prompts)):
                keys = list(range(p * per, (p + 1) * per))
                if per > opts.n:  # best_of: the n with the highest log-prob (OpenAI: per token)
                    keys = sorted(keys, key=lambda k: -sum(e.logprob for e in lps[k]) / max(len(lps[k]), 1))
                    keys = sorted(keys[:opts.n])
                for k in keys:
                    ev = done[k]
                    text = (echo_text(p) if opts.echo else "") + ev.text
                    c = ({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                    choices.append({"index": len(choices), **c, "logprobs": lp_object(lps[k], ev.prompt_logprobs, p),
                                    "finish_reason": ev.finish_reason})
            p_tokens = sum(len(ids) for ids, _ in prompts)
            c_tokens = sum(e.completion_tokens for e in done.values())
            return {"id": rid, "object": obj, "created": now, "model": served, "choices": choices,
                    "usage": {"prompt_tokens": p_tokens, "completion_tokens": c_tokens,
                              "total_tokens": p_tokens + c_tokens}}

        async def sse() -> AsyncIterator[str]:
            def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
                return "data: " + json.dumps({"id": rid, "object": obj + ".chunk" if chat else obj, "created": now,
                                              "model": served, "choices": choices, **extra}) + "\n\n"

            def choice(i: int, text: str | None, finish: str | None, role: bool = False,
                       logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
                if chat:
                    delta = {"role": "assistant", "content": ""} if role else {} if text is None else {
                        "content": text}
                    return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
                return {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

            done: dict[int, Event] = {}
            n_all = len(reqs)
            if chat:
                yield chunk([choice(i, None, None, role=True) for i in range(n_all)])
            echoed: set[int] = set()
            async for i, ev in events(reqs, queue, request):
                p = i // per
                if opts.echo and i not in echoed and ev.kind in ("delta", "done"):
                    echoed.add(i)
                    head = None
                    if opts.logprobs is not None and ev.kind == "done":
                        head = lp_object([], ev.prompt_logprobs, p)
                    yield chunk([choice(i, echo_text(p), None, logprobs=head)])
                if ev.kind == "delta" and (ev.text or ev.logprobs):
                    yield chunk([choice(i, ev.text, None, logprobs=None if opts.logprobs is None else (
                        chat_logprobs(tokenizer, ev.logprobs or []) if chat else
                        completion_logprobs(tokenizer, ev.logprobs or [])))])
                elif ev.kind == "done":
                    done[i] = ev
                    yield chunk([choice(i, None, ev.finish_reason)], usage=usage_one(ev))
                elif ev.kind == "error":
                    yield "data: " + json.dumps({"error": {"message": ev.text, "type": "server_error",
                                                           "param": None, "code": "internal_error"}}) + "\n\n"
                    break
            if include_usage and len(done) == n_all:
                p_tokens = sum(len(ids) for ids, _ in prompts)
                c_tokens = sum(e.completion_tokens for e in done.values())
                yield chunk([], usage={"prompt_tokens": p_tokens, "completion_tokens": c_tokens,
                                       "total_tokens": p_tokens + c_tokens})
            yield "data: [DONE]\n\n"

        def usage_one(ev: Event) -> dict[str, int]:
            return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                    "total_tokens": ev.prompt_tokens + ev.completion_tokens}

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
        stream = body.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise APIError(f"stream={stream!r} must be a boolean", "stream", "invalid_value")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise APIError("stream_options must be an object", "stream_options", "invalid_value")
        return bool(stream), bool(opts.get("include_usage", False))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        if "prompt" not in body:
            raise APIError("prompt is required", "prompt", "missing_required_parameter")
        prompts = _completion_prompts(tokenizer, body["prompt"])
        params, opts = parse_sampling(body, DEFAULT_COMPLETION_TOKENS)
        params.adapter = adapter_of(body)
        return await run(request, prompts, params, opts, False, *stream_flags(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        prompt = _chat_prompt(tokenizer, body.get("messages"))
        params, opts = parse_sampling(body, max(engine.max_len - len(prompt), 1), chat=True)
        params.adapter = adapter_of(body)
        return await run(request, [(prompt, None)], params, opts, True, *stream_flags(body))

    return app


# ----------------------------------------------------------------------------- running
class Server:
    """uvicorn running ``app`` on ``host:port`` (``port=0``: a free port, read ``.port``), in this thread (``run``:
    SIGTERM / Ctrl-C stop accepting and wait up to ``drain_timeout`` s for the requests in flight) or in a
    background thread (``start`` / ``stop``)."""

    def __init__(self, app: FastAPI | None, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 drain_timeout: float = 30.0):
        self.log_level, self.drain_timeout = log_level, drain_timeout
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(2048)  # connections queue from now on, before uvicorn accepts them
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = None
        self.thread: threading.Thread | None = None
        if app is not None:
            self.set_app(app)

    def set_app(self, app: FastAPI) -> None:
        """The app to serve (the socket may be bound before the app exists)."""
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, log_level=self.log_level,
                                                    timeout_graceful_shutdown=self.drain_timeout))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def run(self) -> None:
        """Serve in this thread until stopped (Ctrl-C / ``stop()``)."""
        self.server.run(sockets=[self.sock])

    def start(self, timeout: float = 30.0) -> Server:
        """Serve in a daemon thread; returns once the server accepts connections."""
        self.thread = threading.Thread(target=self.run, name="mistral-jax-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the HTTP server did not start on {self.url} within {timeout}s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.server.config.timeout_graceful_shutdown = min(self.drain_timeout, 2)
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.sock.close()
