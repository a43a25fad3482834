"""Serve a checkpoint with OpenAI's API (completions, chat completions, streaming).

    python -m mistral_jax.serve --checkpoint DIR [--tokenizer PATH] [--host 127.0.0.1] [--port 8000]
        [--max_batch 16] [--max_queue 256] [--chunk_size C] [--model_name NAME] [--dtype float32|bfloat16]
        [--prefix_cache_mb 1024] [--sync_ms 50] [--drain_timeout 30] [--lora NAME=WORKDIR ...]

``--checkpoint`` is anything ``mistral_jax.load_pretrained`` reads, local or ``gs://`` / ``s3://`` (HF dir, Mistral
consolidated dir, mistral_jax export dir, training workdir including LoRA runs). The tokenizer is ``tokenizer.model``
in that directory unless ``--tokenizer`` is given. Every flag value is checked first, then the paths (a bucket's
endpoint, existence and credentials first), then the tokenizer and the model load; a bad value is one line on
stderr naming the flag, the value and the fix, exit status 2.

``--lora NAME=WORKDIR`` (repeatable) serves LoRA training workdirs of this base over it, all in one batch: a
request's ``model`` picks the adapter (NAME; the base under its own id), and ``/v1/models`` lists them.

SIGTERM (or Ctrl-C) drains: the server stops accepting connections, the requests in flight run to their end (at most
``--drain_timeout`` seconds), then the process exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from mistral_jax import storage
from mistral_jax.cli import (
    CHECKPOINT_REMOTE_OK,
    Parser,
    UsageError,
    add_checkpoint_flags,
    check_checkpoint_flags,
    check_checkpoint_paths,
    keep_host_memory,
    load_checkpoint,
    number,
    quiet_libraries,
)
from mistral_jax.cli import run as cli_run

PROG = "serve"


MESH_AXES = ("data", "fsdp", "tensor", "expert")


def parse_mesh(text: str | None) -> dict[str, int] | None:
    """``--mesh 'data=2,tensor=4'`` -> ``{"data": 2, "tensor": 4}`` (unnamed axes are 1); None when not given."""
    if text is None:
        return None
    fix = "pass axis=size pairs such as --mesh tensor=4 or --mesh data=2,tensor=4 (axes: data, fsdp, tensor, expert)"
    sizes: dict[str, int] = {}
    for part in text.split(","):
        axis, eq, size = part.strip().partition("=")
        if not eq or axis not in MESH_AXES or axis in sizes:
            raise UsageError("--mesh", text, f"has {part.strip()!r}, not a new axis=size", fix)
        try:
            sizes[axis] = int(size)
        except ValueError:
            raise UsageError("--mesh", text, f"size of {axis} is {size!r}, not an integer", fix) from None
        if sizes[axis] < 1 and sizes[axis] != -1:
            raise UsageError("--mesh", text, f"size of {axis} is {sizes[axis]}", "use a size >= 1 (or -1 once)")
    if list(sizes.values()).count(-1) > 1:
        raise UsageError("--mesh", text, "has more than one -1", "give every axis but one a size")
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def parse_lora(items: Sequence[str], mesh: dict[str, int] | None) -> dict[str, str]:
    """``--lora NAME=WORKDIR`` values -> ``{NAME: WORKDIR}`` (names unique; no mesh)."""
    out: dict[str, str] = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not name.strip() or not path.strip():
            raise UsageError("--lora", item, "is not NAME=WORKDIR", "pass e.g. --lora support=runs/sft_support")
        if name in out:
            raise UsageError("--lora", item, f"repeats the name {name!r}", "give each adapter its own name")
        out[name] = path
    if out and mesh is not None:
        raise UsageError("--lora", ",".join(items), "cannot be served on a mesh yet",
                         "drop --mesh, or serve one adapter merged: its workdir as --checkpoint")
    return out


def checkpoint_name(checkpoint: str) -> str:
    """The model id a checkpoint is served under by default: its directory's name (``gs://b/runs/tiny`` -> ``tiny``)."""
    if storage.is_remote(checkpoint):
        return checkpoint.rstrip("/").rsplit("/", 1)[-1]
    return os.path.basename(os.path.normpath(os.path.abspath(checkpoint)))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check every flag value (no file is opened); raises ``UsageError`` naming a bad flag."""
    ap = Parser(prog="mistral-jax-serve", description=__doc__.split("\n\n")[0], remote_ok=CHECKPOINT_REMOTE_OK)
    add_checkpoint_flags(ap)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", default="8000", help="TCP port (0 = any free port)")
    ap.add_argument("--max_batch", default="16", help="decode slots: requests decoded together (>= 1)")
    ap.add_argument("--max_queue", default="256", help="requests waiting for a slot before 429 answers (>= 0)")
    ap.add_argument("--chunk_size", default=None, help="prefill chunk (>= 1; default: the sliding window)")
    ap.add_argument("--prefix_cache_mb", default="1024", help="device memory for prefix-cache snapshots in MiB "
                    "(0: off; a snapshot is one cache row: O(window) under a sliding window)")
    ap.add_argument("--sync_ms", default="50", help="the longest one decode call runs before its tokens are "
                    "streamed (more tokens per host sync; lower for token-by-token streams)")
    ap.add_argument("--drain_timeout", default="30", help="seconds SIGTERM waits for requests in flight")
    ap.add_argument("--lora", action="append", default=[], metavar="NAME=WORKDIR",
                    help="serve a LoRA training workdir of this base as model NAME (repeatable; not with --mesh)")
    ap.add_argument("--model_name", default=None, help="model id in the API (default: the checkpoint dir's name)")
    ap.add_argument("--mesh", default=None, help="serve sharded over this machine's devices, e.g. "
                    "'tensor=4' or 'data=2,tensor=4' (axes data, fsdp, tensor, expert; one may be -1 = the rest; "
                    "default: one device)")
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
    args.prefix_cache_mb = number("--prefix_cache_mb", args.prefix_cache_mb, float, lambda v: v >= 0,
                                  "must be >= 0", "pass MiB for the prefix cache, e.g. 1024, or 0 to turn it off")
    args.sync_ms = number("--sync_ms", args.sync_ms, float, lambda v: v > 0, "must be > 0",
                          "pass milliseconds such as --sync_ms 50")
    args.drain_timeout = number("--drain_timeout", args.drain_timeout, float, lambda v: v >= 0, "must be >= 0",
                                "pass seconds such as --drain_timeout 30")
    args.mesh = parse_mesh(args.mesh)
    args.lora = parse_lora(args.lora, args.mesh)
    if not args.host:
        raise UsageError("--host", args.host, "is empty", "pass an address such as --host 127.0.0.1")
    if args.model_name is not None and not args.model_name.strip():
        raise UsageError("--model_name", args.model_name, "is empty", "pass a name such as --model_name my-model")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point (also the ``mistral-jax-serve`` script): checks, loads, then serves until interrupted."""
    quiet_libraries()
    keep_host_memory(PROG)
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
        # bind first: a busy port fails before the model loads
        server = Server(None, args.host, args.port, drain_timeout=args.drain_timeout)
    except OSError as e:
        raise UsageError("--port", args.port, f"cannot be bound on {args.host}: {e.strerror}",
                         "pass a free port (or --port 0 for any)") from None
    from mistral_jax.training.run import MeshConfigError, resolve_checkpoint

    try:  # the checkpoint's mesh, rules and model config: one place for every checkpoint tool
        spec = resolve_checkpoint(args.checkpoint, mesh=args.mesh, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
                                  quantize=args.quantize)
    except MeshConfigError as e:
        raise UsageError("--mesh", args.mesh, f"does not lay out this machine's devices ({e})",
                         "make the sizes multiply to the device count, or use -1 for one axis") from None
    mesh = spec.mesh
    if mesh is not None:
        from mistral_jax.serve.engine import batch_shards

        if args.max_batch % batch_shards(mesh):
            raise UsageError("--max_batch", args.max_batch, f"is not a multiple of the {batch_shards(mesh)} ways "
                             f"the mesh {args.mesh} splits the decode slots (data x fsdp x expert)",
                             "pass a multiple of it")
    from mistral_jax.loading import lora_run

    name = args.model_name or checkpoint_name(args.checkpoint)
    for adapter, path in args.lora.items():  # before anything loads
        if adapter == name:
            raise UsageError("--lora", f"{adapter}={path}", f"uses the base model's id {name!r}",
                             "give the adapter another name (or the base one with --model_name)")
        if lora_run(path) is None:
            raise UsageError("--lora", f"{adapter}={path}", "is not a LoRA training workdir (run_config.json with "
                             "lora.rank > 0)", "pass the workdir of a run trained with config.lora.rank > 0")
    tokenizer, model = load_checkpoint(args, tokenizer_file, spec)
    if args.lora:
        from mistral_jax.loading import load_lora_adapters
        from mistral_jax.lora import stack_adapters

        try:
            model = stack_adapters(model, [load_lora_adapters(p) for p in args.lora.values()])
        except ValueError as e:
            raise UsageError("--lora", ",".join(f"{k}={v}" for k, v in args.lora.items()), str(e),
                             "serve adapters trained on this --checkpoint") from None
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                    chunk_size=args.chunk_size, mesh=mesh, rules=spec.rules, prefix_cache_mb=args.prefix_cache_mb,
                    sync_ms=args.sync_ms).start()
    server.set_app(create_app(engine, name, list(args.lora)))
    where = "" if mesh is None else f", mesh={dict(mesh.shape)}"
    where += f", LoRA adapters {list(args.lora)}" if args.lora else ""
    print(f"serving {name!r} on {server.url} (max_batch={args.max_batch}, cache slots per row="
          f"{engine.cache_slots}, prefill chunk={engine.chunk}{where})", file=sys.stderr, flush=True)
    # uvicorn drains on SIGTERM, then re-raises it under the handler it found: a no-op one makes the exit status 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()  # returns after SIGTERM / Ctrl-C once the requests in flight are done (uvicorn's shutdown)
    finally:
        engine.stop()
    print("mistral-jax-serve: drained, exiting", file=sys.stderr, flush=True)


def entry() -> None:
    """The console script: ``main`` with one-line errors and exit statuses (``cli.run``)."""
    cli_run(main, PROG)


if __name__ == "__main__":
    entry()
