"""Serve a checkpoint with OpenAI's API (completions, chat completions, streaming).

    python -m mistral_jax.serve --checkpoint DIR [--tokenizer PATH] [--host 127.0.0.1] [--port 8000]
        [--max_batch 16] [--max_queue 256] [--chunk_size C] [--model_name NAME] [--dtype float32|bfloat16]

``--checkpoint`` is anything ``mistral_jax.load_pretrained`` reads (HF dir, Mistral consolidated dir, mistral_jax
export dir, training workdir including LoRA runs). The tokenizer is ``tokenizer.model`` in that directory unless
``--tokenizer`` is given. Every flag value is checked first, then the paths, then the tokenizer and the model load;
a bad value is one line on stderr naming the flag, the value and the fix, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mistral_jax.cli import (
    Parser,
    UsageError,
    add_checkpoint_flags,
    check_checkpoint_flags,
    check_checkpoint_paths,
    load_checkpoint,
    number,
    quiet_libraries,
)
from mistral_jax.cli import run as cli_run

PROG = "serve"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check every flag value (no file is opened); raises ``UsageError`` naming a bad flag."""
    ap = Parser(prog="mistral-jax-serve", description=__doc__.split("\n\n")[0])
    add_checkpoint_flags(ap)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", default="8000", help="TCP port (0 = any free port)")
    ap.add_argument("--max_batch", default="16", help="decode slots: requests decoded together (>= 1)")
    ap.add_argument("--max_queue", default="256", help="requests waiting for a slot before 429 answers (>= 0)")
    ap.add_argument("--chunk_size", default=None, help="prefill chunk (>= 1; default: the sliding window)")
    ap.add_argument("--model_name", default=None, help="model id in the API (default: the checkpoint dir's name)")
    args = ap.parse_args(argv)
    check_checkpoint_flags(args)
    args.port = number("--port", args.port, int, lambda v: 0 <= v <= 65535, "must be in [0, 65535]",
                       "pass a free TCP port such as --port 8000")
    args.max_batch = number("--max_batch", args.max_batch, int, lambda v: v >= 1, "must be at least 1",
                            "pass the number of requests to decode together, e.g. --max_batch 16")
    args.max_queue = number("--max_queue", args.max_queue, int, lambda v: v >= 0, "must be >= 0",
                            "pass how many requests may wait for a slot, e.g. --max_queue 256")
    args.chunk_size = number("--chunk_size", args.chunk_size, int, lambda v: v >= 1, "must be at least 1",
                             "pass a positive prefill chunk such as --chunk_size 512, or omit it (the window)")
    if not args.host:
        raise UsageError("--host", args.host, "is empty", "pass an address such as --host 127.0.0.1")
    if args.model_name is not None and not args.model_name.strip():
        raise UsageError("--model_name", args.model_name, "is empty", "pass a name such as --model_name my-model")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point (also the ``mistral-jax-serve`` script): checks, loads, then serves until interrupted."""
    quiet_libraries()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    tokenizer_file = check_checkpoint_paths(args)
    try:  # the serve extra: say how to install it instead of a traceback
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UsageError("--checkpoint", args.checkpoint, f"cannot be served: {e.name} is not installed",
                         "pip install 'mistral_jax[serve]'") from None
    from mistral_jax.serve.app import Server, create_app
    from mistral_jax.serve.engine import Engine

    try:
        server = Server(None, args.host, args.port)  # bind first: a busy port fails before the model loads
    except OSError as e:
        raise UsageError("--port", args.port, f"cannot be bound on {args.host}: {e.strerror}",
                         "pass a free port (or --port 0 for any)") from None
    tokenizer, model = load_checkpoint(args, tokenizer_file)
    name = args.model_name or os.path.basename(os.path.normpath(os.path.abspath(args.checkpoint)))
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                    chunk_size=args.chunk_size).start()
    server.set_app(create_app(engine, name))
    print(f"serving {name!r} on {server.url} (max_batch={args.max_batch}, cache slots per row="
          f"{engine.cache_slots}, prefill chunk={engine.chunk})", file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        engine.stop()


def entry() -> None:
    """The console script: ``main`` with one-line errors and exit statuses (``cli.run``)."""
    cli_run(main, PROG)


if __name__ == "__main__":
    entry()
