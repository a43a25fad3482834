"""``mistral-jax-convert`` (``python -m mistral_jax.convert``): ``--from {hf,mistral,jax} --to {hf,mistral,jax}``
``--input DIR --output DIR``; either may be a ``gs://`` / ``s3://`` path.

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


def parser() -> cli.Parser:
    ap = cli.Parser(prog=PROG, description=__doc__.split("\n\n")[0], remote_ok=("input", "output"))
    ap.add_argument("--from", dest="src", required=True, choices=("hf", "mistral", "jax"), help="input format")
    ap.add_argument("--to", dest="dst", required=True, choices=("hf", "mistral", "jax"), help="output format")
    ap.add_argument("--input", required=True, help="checkpoint directory to read (local, gs:// or s3://)")
    ap.add_argument("--output", required=True, help="directory to create (local, gs:// or s3://; written "
                                                    "atomically; never the input, inside it or a parent of it)")
    ap.add_argument("--dtype", default=None, help="output dtype: bfloat16, float32 or float16 (default: keep the "
                                                  "stored dtype)")
    ap.add_argument("--max_shard_size", default="5GB", help="HF shard size, e.g. 5GB, 500MiB or bytes")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace a previous export of the same kind at --output (never a training run or any "
                         "other directory)")
    ap.add_argument("--verbose", action="store_true", help="show tracebacks")
    return ap


def validate(args) -> None:
    """Every check that needs no checkpoint read; raises ``cli.UsageError``."""
    from mistral_jax.loading import input_dirs

    args_lib.check_dtype("--dtype", args.dtype)
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
        size = int(args.max_shard_size) if args.max_shard_size.strip().isdigit() else args.max_shard_size
        out = convert(args.src, args.dst, args.input, args.output, dtype=args.dtype, max_shard_size=size,
                      overwrite=args.overwrite)
        print(f"wrote {args.dst} checkpoint to {out} in {time.time() - t0:.1f}s")

    return args_lib.run(PROG, argv, body)


def entry() -> None:
    """The console script: exit status 0 done, 1 checkpoint error, 2 bad argument."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
