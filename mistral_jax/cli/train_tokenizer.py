"""``mistral-jax-train-tokenizer --input FILE... --output PATH [--vocab_size N] [--overwrite]``.

Trains a sentencepiece BPE model with Mistral's special ids (``data.train_tokenizer``). ``--input`` and ``--output``
may be local paths or ``gs://`` / ``s3://`` paths. Every flag value and path is checked before training (a bucket's
endpoint, existence and credentials too, and that ``--output``'s directory can be written); an existing ``--output``
is never replaced without ``--overwrite``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence

from mistral_jax import storage
from mistral_jax.cli import Parser, UsageError, check_reachable, quiet_libraries
from mistral_jax.cli import run as cli_run

PROG = "train_tokenizer"


def _parent(url: str) -> str:
    """The bucket "directory" (key prefix) ``url`` is written into: ``gs://b/x`` of ``gs://b/x/tokenizer.model``."""
    head = url.rstrip("/").rsplit("/", 1)[0]
    return head if "://" in head else url.rstrip("/")


def parse_args(argv: Sequence[str] | None = None):
    ap = Parser(prog="mistral-jax-train-tokenizer", description=__doc__.split("\n\n")[0],
                remote_ok=("input", "output"))
    ap.add_argument("--input", required=True, nargs="+", help="UTF-8 text files, one document per line (local, "
                    "gs:// or s3://)")
    ap.add_argument("--output", required=True, help="where to write the .model file (local, gs:// or s3://)")
    ap.add_argument("--vocab_size", type=int, default=512)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    ap.add_argument("--verbose", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    if args.vocab_size < 1:
        raise UsageError("--vocab_size", args.vocab_size, "must be >= 1", "pass e.g. --vocab_size 512")
    for path in args.input:
        check_reachable("--input", path)
        if not storage.path(path).is_file():
            raise UsageError("--input", path, "is not a file", "pass UTF-8 text files, one document per line")
    check_reachable("--output", args.output)  # names the value: endpoint, bucket, credentials
    if storage.is_remote(args.output):
        check_reachable("--output", _parent(args.output), write=True)  # an object written and removed beside it
    out = storage.path(args.output)
    if out.is_dir():
        raise UsageError("--output", args.output, "is a directory", "pass a file path such as DIR/tokenizer.model")
    if out.exists() and not args.overwrite:
        raise UsageError("--output", args.output, "already exists", "pass another path, or --overwrite to replace it")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Train and write the tokenizer; returns the path written."""
    quiet_libraries()
    args = parse_args(argv)
    from mistral_jax.data.train_tokenizer import VocabularyTooSmall, train_tokenizer

    def lines() -> Iterator[str]:
        for path in args.input:
            with storage.path(path).open("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as f:
                yield from (line.rstrip("\n") for line in f if line.strip())

    try:
        out = train_tokenizer(lines(), args.output, args.vocab_size, exclusive=not args.overwrite)
    except VocabularyTooSmall as e:
        raise UsageError("--vocab_size", args.vocab_size, str(e),
                         f"pass --vocab_size {e.needed} or more (and a model vocab_size at least as large)") from None
    except FileExistsError:  # written by someone else since the check: left as it was
        raise UsageError("--output", args.output, "already exists (written while training)",
                         "pass another path, or --overwrite to replace it") from None
    print(out)
    return out


def entry() -> None:
    """The console script: ``main`` with one-line errors and exit statuses (``cli.run``)."""
    cli_run(main, PROG)


if __name__ == "__main__":
    entry()
