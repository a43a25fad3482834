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

from mistral_jax.inference.prompt import encode_prompt
from mistral_jax.serve.engine import Engine, Event, QueueFullError, SamplingParams

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class APIError(Exception):
    """An error answered with OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):  # noqa: A002 -- OpenAI's field name
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# ----------------------------------------------------------------------------- request parsing
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_sampling(body: dict[str, Any], default_max_tokens: int) -> SamplingParams:
    """Per-request settings from an OpenAI request body; raises ``APIError`` naming the bad field."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise APIError(f"{param}={max_tokens!r} must be an integer >= 1", param, "invalid_value")
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
    n = body.get("n", 1)
    if n not in (1, None):
        raise APIError(f"n={n!r}: only n=1 is supported", "n", "unsupported_value")
    if body.get("logprobs") not in (None, False, 0) or body.get("echo"):
        param = "logprobs" if body.get("logprobs") not in (None, False, 0) else "echo"
        raise APIError(f"{param} is not supported by this server", param, "unsupported_value")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError(f"ignore_eos={ignore_eos!r} must be a boolean", "ignore_eos", "invalid_value")
    return SamplingParams(max_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p),
                          top_k=int(top_k), seed=int(seed) % 2**31, stop=tuple(stop), ignore_eos=ignore_eos)


def _completion_prompts(tokenizer: Any, prompt: Any) -> list[list[int]]:
    bad = APIError(f"prompt must be a string, a list of strings, a list of token ids or a list of lists of ids; "
                   f"got {type(prompt).__name__}", "prompt", "invalid_value")
    if isinstance(prompt, str):
        return [encode_prompt(tokenizer, prompt)]
    if not isinstance(prompt, list) or not prompt:
        raise bad
    if all(_is_int(x) for x in prompt):
        return [list(prompt)]
    if all(isinstance(x, str) for x in prompt):
        return [encode_prompt(tokenizer, x) for x in prompt]
    if all(isinstance(x, list) and x and all(_is_int(y) for y in x) for x in prompt):
        return [list(x) for x in prompt]
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


# ----------------------------------------------------------------------------- the app
def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The FastAPI app serving ``engine`` under the model id ``model_name``."""
    app = FastAPI(title="mistral_jax", docs_url=None, redoc_url=None)
    tokenizer = engine.tokenizer
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "mistral_jax", "max_model_len": engine.max_len}]}

    async def read_body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object", None, "invalid_json")
        model = body.get("model")
        if model is not None and model != model_name:
            raise APIError(f"the model {model!r} does not exist; this server serves {model_name!r}", "model",
                           "model_not_found")
        return body

    def submit_all(prompts: Sequence[list[int]], params: SamplingParams, queue: asyncio.Queue) -> list:
        loop = asyncio.get_running_loop()
        for ids in prompts:
            try:
                engine.check(len(ids), params)
            except ValueError as e:
                raise APIError(str(e), "prompt" if ids else "max_tokens", "context_length_exceeded") from None
        reqs = []
        try:
            for i, ids in enumerate(prompts):
                def emit(ev: Event, i: int = i) -> None:
                    loop.call_soon_threadsafe(queue.put_nowait, (i, ev))

                reqs.append(engine.submit(ids, params, emit))
        except QueueFullError as e:
            for r in reqs:
                r.cancel()
            raise APIError(str(e), None, "rate_limit_exceeded", status=429, type="rate_limit_error") from None
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

    def usage(done: dict[int, Event]) -> dict[str, int]:
        p = sum(e.prompt_tokens for e in done.values())
        c = sum(e.completion_tokens for e in done.values())
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def run(request: Request, prompts: list[list[int]], params: SamplingParams, chat: bool,
                  stream: bool, include_usage: bool):
        queue: asyncio.Queue = asyncio.Queue()
        reqs = submit_all(prompts, params, queue)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        obj = "chat.completion" if chat else "text_completion"
        now = int(time.time())
        if not stream:
            done: dict[int, Event] = {}
            async for i, ev in events(reqs, queue, request):
                if ev.kind == "done":
                    done[i] = ev
                elif ev.kind == "error":
                    raise APIError(ev.text, None, "internal_error", status=500, type="server_error")
            if len(done) < len(prompts):  # the client went away
                return JSONResponse({"error": {"message": "client disconnected", "type": "server_error",
                                               "param": None, "code": None}}, status_code=499)
            choices = []
            for i in range(len(prompts)):
                text = done[i].text
                c = ({"index": i, "message": {"role": "assistant", "content": text}} if chat else
                     {"index": i, "text": text})
                choices.append({**c, "logprobs": None, "finish_reason": done[i].finish_reason})
            return {"id": rid, "object": obj, "created": now, "model": model_name, "choices": choices,
                    "usage": usage(done)}

        async def sse() -> AsyncIterator[str]:
            def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
                return "data: " + json.dumps({"id": rid, "object": obj + ".chunk" if chat else obj, "created": now,
                                              "model": model_name, "choices": choices, **extra}) + "\n\n"

            def choice(i: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
                if chat:
                    delta = {"role": "assistant", "content": ""} if role else {} if text is None else {
                        "content": text}
                    return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
                return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}

            done: dict[int, Event] = {}
            if chat:
                yield chunk([choice(i, None, None, role=True) for i in range(len(prompts))])
            async for i, ev in events(reqs, queue, request):
                if ev.kind == "delta" and ev.text:
                    yield chunk([choice(i, ev.text, None)])
                elif ev.kind == "done":
                    done[i] = ev
                    yield chunk([choice(i, None, ev.finish_reason)], usage=usage({i: ev}))
                elif ev.kind == "error":
                    yield "data: " + json.dumps({"error": {"message": ev.text, "type": "server_error",
                                                           "param": None, "code": "internal_error"}}) + "\n\n"
                    break
            if include_usage and len(done) == len(prompts):
                yield chunk([], usage=usage(done))
            yield "data: [DONE]\n\n"

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
        params = parse_sampling(body, DEFAULT_COMPLETION_TOKENS)
        return await run(request, prompts, params, False, *stream_flags(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        prompt = _chat_prompt(tokenizer, body.get("messages"))
        params = parse_sampling(body, max(engine.max_len - len(prompt), 1))
        return await run(request, [prompt], params, True, *stream_flags(body))

    return app


# ----------------------------------------------------------------------------- running
class Server:
    """uvicorn running ``app`` on ``host:port`` in a background thread (``port=0``: a free port, read ``.port``)."""

    def __init__(self, app: FastAPI | None, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.log_level = log_level
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

        self.server = uvicorn.Server(uvicorn.Config(app, log_level=self.log_level, timeout_graceful_shutdown=2))

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
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.sock.close()
