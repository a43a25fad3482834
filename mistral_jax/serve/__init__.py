"""Serve a model over HTTP with OpenAI's API: a continuous-batching engine and a FastAPI app.

    python -m mistral_jax.serve --checkpoint DIR [--port 8000 --max_batch 16]

``Engine`` (``engine.py``) owns the device: fixed decode slots over one rolling-buffer cache, chunked prefill
interleaved with decode steps, per-request sampling. ``create_app`` (``app.py``) is the HTTP layer; ``Server`` runs
it with uvicorn (in a thread for tests and benchmarks). Needs the ``serve`` extra (fastapi, uvicorn).
"""

from mistral_jax.serve.engine import Engine, Event, QueueFullError, Request, SamplingParams, compile_count

__all__ = ["Engine", "Event", "QueueFullError", "Request", "SamplingParams", "compile_count"]
