"""``mistral-jax-convert`` (``python -m mistral_jax.convert``): ``--from {hf,mistral,jax} --to {hf,mistral,jax,gguf}``
``--input DIR --output DIR``; either may be a ``gs://`` / ``s3://`` path.

``--to gguf`` writes ``DIR/model.gguf`` for llama.cpp (``convert.gguf``): ``--dtype`` float32, bfloat16, float16
or q8_0 for its matrices, ``--gguf_arch`` auto (``granite_swa`` for a sliding window shorter than the context, which
llama.cpp's ``llama`` architecture ignores; else ``llama``) or llama.

Arguments are checked before anything is read: a bad value is one line naming the flag, the value and the fix,
exit status 2. The output may not be the input, lie inside it or contain it (real paths), and ``--overwrite``
only replaces a previous export of the same kind (never a training run). An error found while reading or writing
the checkpoint exits with status 1. ``--verbose`` (or ``MISTRAL_JAX_DEBUG=1``) shows tracebacks.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from mistral_jax import cli
from mistral_jax.cli import export_args as args_lib

PROG = "python -m mistral_jax.convert"
GGUF_DTYPES = ("float32", "bfloat16", "float16", "q8_0")  # convert.gguf.DTYPES (not imported: it loads jax)


def parser() -> cli.Parser:
    ap = cli.Parser(prog=PROG, description=__doc__.split("\n\n")[0], remote_ok=("input", "output"))
    ap.add_argument("--from", dest="src", required=True, choices=("hf", "mistral", "jax"), help="input format")
    ap.add_argument("--to", dest="dst", required=True, choices=("hf", "mistral", "jax", "gguf"),
                    help="output format (gguf: DIR/model.gguf for llama.cpp)")
    ap.add_argument("--input", required=True, help="checkpoint directory to read (local, gs:// or s3://)")
    ap.add_argument("--output", required=True, help="directory to create (local, gs:// or s3://; written "
                                                    "atomically; never the input, inside it or a parent of it)")
    ap.add_argument("--dtype", default=None, help="output dtype: bfloat16, float32 or float16, and for --to gguf "
                                                  "also q8_0 (default: keep the stored dtype)")
    ap.add_argument("--gguf_arch", default="auto", choices=("auto", "llama"),
                    help="--to gguf: auto (exact: granite_swa for a sliding window shorter than the context, else "
                         "llama) or llama (what every llama.cpp build loads; ignores the sliding window)")
    ap.add_argument("--max_shard_size", default="5GB", help="HF shard size, e.g. 5GB, 500MiB or bytes")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace a previous export of the same kind at --output (never a training run or any "
                         "other directory)")
    ap.add_argument("--verbose", action="store_true", help="show tracebacks")
    return ap


def validate(args) -> None:
    """Every check that needs no checkpoint read; raises ``cli.UsageError``."""
    from mistral_jax.loading import input_dirs

    if args.dst == "gguf":
        cli.check_dtype("--dtype", args.dtype, GGUF_DTYPES)
    elif args.dtype == "q8_0":
        raise cli.UsageError("--dtype", args.dtype, f"is a GGUF type, not a {args.dst} checkpoint dtype",
                             "pass --to gguf for a q8_0 file, or --dtype bfloat16 / float32 / float16")
    else:
        args_lib.check_dtype("--dtype", args.dtype)
    if args.gguf_arch != "auto" and args.dst != "gguf":
        raise cli.UsageError("--gguf_arch", args.gguf_arch, f"only applies to --to gguf, not --to {args.dst}",
                             "leave --gguf_arch out")
    args_lib.check_shard_size("--max_shard_size", args.max_shard_size)
    args_lib.check_input_dir("--input", args.input, f"the {args.src} checkpoint directory to read")
    args_lib.check_output("--output", args.output, args.dst, args.overwrite, input_dirs(args.input, args.src))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the converter; returns the exit status (0 done, 1 checkpoint error, 2 bad argument)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cli.quiet_libraries()

    def body() -> None:
        args = parser().parse_args(argv)
        validate(args)
        from mistral_jax.export import convert

        t0 = time.time()
        if args.dst == "gguf":
            out = _to_gguf(args)
            print(f"wrote gguf file {out} in {time.time() - t0:.1f}s")
            return
        size = int(args.max_shard_size) if args.max_shard_size.strip().isdigit() else args.max_shard_size
        out = convert(args.src, args.dst, args.input, args.output, dtype=args.dtype, max_shard_size=size,
                      overwrite=args.overwrite)
        print(f"wrote {args.dst} checkpoint to {out} in {time.time() - t0:.1f}s")

    return args_lib.run(PROG, argv, body)


def _to_gguf(args) -> str:
    """``--to gguf``: the checkpoint read tensor by tensor (``loading.open_source``) into ``convert.gguf.export``."""
    from mistral_jax import storage
    from mistral_jax.convert import gguf, tokenizer_files
    from mistral_jax.loading import input_dirs, open_checkpoint, open_source, tokenizer_path

    try:  # opened once: its format, config and tokenizer are read here, not again below
        ckpt = open_checkpoint(args.input)
    except (ValueError, OSError):  # not readable as any format: open_source names what is wrong
        ckpt = None
    source_dir = ckpt if ckpt is not None and ckpt.format == args.src else args.input
    source = open_source(source_dir, args.src)  # type: ignore[arg-type]  # names the format found if not --from
    tok = tokenizer_path(source_dir, args.src)
    if tok:
        tokenizer_files.tokenizer_kind(tok)  # a tokenizer.model that is not one fails here, before writing
    gguf.export(args.output, source, dtype=args.dtype, tokenizer=tok, arch=args.gguf_arch,
                overwrite=args.overwrite, inputs=input_dirs(source_dir, args.src))
    return storage.join(args.output, gguf.FILENAME)


def entry() -> None:
    """The console script: exit status 0 done, 1 checkpoint error, 2 bad argument."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
