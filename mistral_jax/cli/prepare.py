"""``mistral-jax-prepare`` (``python -m mistral_jax.data.prepare``): tokenize (and pack) a corpus once into the
prepared format (``data/prepared.py``), in parallel and resumably.

    python -m mistral_jax.data.prepare --inputs 'data/**/*.jsonl.zst' --dest gs://bkt/prepared/web \\
        --tokenizer mistral:v3 --seq_len 4096 [--format text|chat|preference] [--workers N]

``--runner beam:DirectRunner`` (or ``beam:DataflowRunner`` ... with Beam's own flags after ``--``, e.g.
``-- --project P --region R --temp_location gs://bkt/tmp``) runs the same transform as an Apache Beam pipeline
(``data/prepare_beam.py``). Rerunning a killed prepare with the same arguments continues it; other arguments into
the same ``--dest`` are refused. Bad arguments and bad data are one line on stderr, exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from mistral_jax import cli

PROG = "python -m mistral_jax.data.prepare"


def _bool(text: str) -> bool:
    v = str(text).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise cli.UsageError("flag", text, "is not a boolean", "pass true or false")


def parser() -> cli.Parser:
    ap = cli.Parser(prog=PROG, description=__doc__.split("\n\n")[0], remote_ok=("inputs", "dest", "tokenizer"))
    ap.add_argument("--inputs", required=True, help="files, directories, globs (** included) or an HF save_to_disk "
                    "directory, comma-separated; local, gs:// or s3:// (.jsonl .json .txt .parquet, .gz / .zst)")
    ap.add_argument("--dest", required=True, help="the prepared dataset directory to write (local, gs:// or s3://)")
    ap.add_argument("--tokenizer", required=True, help="the run's tokenizer: a sentencepiece .model, a tekken.json, "
                    "a directory holding one, or a name such as mistral:v3")
    ap.add_argument("--seq_len", required=True, help="tokens per row (the run's config.data.seq_len)")
    ap.add_argument("--format", default="text", help="text, chat or preference")
    ap.add_argument("--pack", default="true", help="pack several documents per row (false: one per row)")
    ap.add_argument("--add_bos", default="true", help="start every text document with <s> (as training does)")
    ap.add_argument("--add_eos", default="true", help="end every text document with </s> (as training does)")
    ap.add_argument("--text_field", default="text", help="the field / column holding the text")
    ap.add_argument("--messages_field", default="messages", help="chat: the field holding the messages")
    ap.add_argument("--pairs_per_row", default="1", help="preference: pairs packed per row")
    ap.add_argument("--skip_invalid", action="store_true", help="chat / preference: skip (and count) invalid "
                    "records instead of stopping")
    ap.add_argument("--on_decode_error", default="replace", help="replace (U+FFFD, warn) or error")
    ap.add_argument("--shard_bytes", default=str(64 << 20), help="split uncompressed .jsonl / .txt files into "
                    "units (shards) of about this many bytes")
    ap.add_argument("--workers", default=None, help="local processes (default: every core)")
    ap.add_argument("--runner", default="local", help="local, or beam:<Runner> (beam:DirectRunner, "
                    "beam:DataflowRunner, beam:FlinkRunner, beam:SparkRunner); Beam flags follow `--`")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    ap.add_argument("--verbose", action="store_true", help="show tracebacks")
    return ap


def parse_args(argv: Sequence[str]) -> tuple[object, list[str]]:
    """The arguments (flag values checked, nothing read) and the Beam pipeline arguments after ``--``."""
    argv = list(argv)
    beam_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, beam_args = argv[:i], argv[i + 1:]
    args = parser().parse_args(argv)
    args.seq_len = cli.number("--seq_len", args.seq_len, int, lambda v: v >= 1, "must be >= 1",
                              "pass the run's config.data.seq_len, e.g. --seq_len 2048")
    args.pairs_per_row = cli.number("--pairs_per_row", args.pairs_per_row, int, lambda v: v >= 1, "must be >= 1",
                                    "pass 1, or more to pack short pairs")
    args.shard_bytes = cli.number("--shard_bytes", args.shard_bytes, int, lambda v: v >= 1, "must be >= 1",
                                  "pass e.g. --shard_bytes 67108864 (64 MiB)")
    if args.workers is not None:
        args.workers = cli.number("--workers", args.workers, int, lambda v: v >= 1, "must be >= 1",
                                  "pass e.g. --workers 8, or omit it to use every core")
    for flag in ("pack", "add_bos", "add_eos"):
        try:
            setattr(args, flag, _bool(getattr(args, flag)))
        except cli.UsageError:
            raise cli.UsageError(f"--{flag}", getattr(args, flag), "is not a boolean", "pass true or false") from None
    from mistral_jax.data.prepared import KINDS

    if args.format not in KINDS:
        raise cli.UsageError("--format", args.format, "is not a prepared kind", f"pass one of {', '.join(KINDS)}")
    if args.format != "text" and args.seq_len < 2:
        raise cli.UsageError("--seq_len", args.seq_len, f"is too short for {args.format} data",
                             "pass at least 2 (a prompt and an answer)")
    if args.on_decode_error not in ("replace", "error"):
        raise cli.UsageError("--on_decode_error", args.on_decode_error, "is not a policy", "pass replace or error")
    if args.runner != "local" and not args.runner.startswith("beam:"):
        raise cli.UsageError("--runner", args.runner, "is not a runner",
                             "pass local, or beam:DirectRunner / beam:DataflowRunner / beam:FlinkRunner / ...")
    if beam_args and args.runner == "local":
        raise cli.UsageError("--runner", args.runner, f"takes no Beam arguments (got {beam_args[:3]})",
                             "pass --runner beam:<Runner> with them, or drop the arguments after `--`")
    cli.check_reachable("--dest", args.dest, write=True)
    return args, beam_args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the prepare; returns the manifest."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cli.quiet_libraries()
    args, beam_args = parse_args(argv)
    options = dict(tokenizer=args.tokenizer, seq_len=args.seq_len, format=args.format, pack=args.pack,
                   add_bos=args.add_bos, add_eos=args.add_eos, text_field=args.text_field,
                   messages_field=args.messages_field, pairs_per_row=args.pairs_per_row,
                   skip_invalid=args.skip_invalid, on_decode_error=args.on_decode_error,
                   shard_bytes=args.shard_bytes)
    if args.runner == "local":
        from mistral_jax.data.prepare import prepare

        m = prepare(args.inputs, args.dest, workers=args.workers, progress=not args.no_progress, **options)
    else:
        from mistral_jax.data.prepare_beam import run_beam

        m = run_beam(args.inputs, args.dest, runner=args.runner.split(":", 1)[1], pipeline_args=beam_args,
                     **options)
    print(f"prepared {m['rows']} rows ({m['tokens']} tokens, {m['documents']} documents) in {len(m['shards'])} "
          f"shards: {args.dest}")
    return m


def entry() -> None:
    """The console script: one-line errors, exit status 2 for bad arguments or data."""
    from mistral_jax import storage
    from mistral_jax.data.pipeline import DataError
    from mistral_jax.data.prepare import PrepareError
    from mistral_jax.data.prepared import PreparedError

    cli.run(main, "prepare", expected=(DataError, PrepareError, PreparedError, storage.StorageError,
                                       storage.UnsupportedPath))


if __name__ == "__main__":
    entry()
