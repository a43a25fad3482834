"""``mistral-jax-train-tokenizer --input FILE... --output PATH [--vocab_size N] [--overwrite]``.

Trains a sentencepiece BPE model with Mistral's special ids (``data.train_tokenizer``). Every flag value and path is
checked before training; an existing ``--output`` is never replaced without ``--overwrite``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from mistral_jax.cli import Parser, UsageError, quiet_libraries
from mistral_jax.cli import run as cli_run

PROG = "train_tokenizer"


def parse_args(argv: Sequence[str] | None = None):
    ap = Parser(prog="mistral-jax-train-tokenizer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, nargs="+", help="UTF-8 text files, one document per line")
    ap.add_argument("--output", required=True, help="where to write the .model file")
    ap.add_argument("--vocab_size", type=int, default=512)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    ap.add_argument("--verbose", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    if args.vocab_size < 1:
        raise UsageError("--vocab_size", args.vocab_size, "must be >= 1", "pass e.g. --vocab_size 512")
    for path in args.input:
        if not os.path.isfile(path):
            raise UsageError("--input", path, "is not a file", "pass UTF-8 text files, one document per line")
    if os.path.isdir(args.output):
        raise UsageError("--output", args.output, "is a directory", "pass a file path such as DIR/tokenizer.model")
    if os.path.exists(args.output) and not args.overwrite:
        raise UsageError("--output", args.output, "already exists", "pass another path, or --overwrite to replace it")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Train and write the tokenizer; returns the path written."""
    quiet_libraries()
    args = parse_args(argv)
    from mistral_jax.data.train_tokenizer import VocabularyTooSmall, train_tokenizer

    def lines() -> Iterator[str]:
        for path in args.input:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from (line.rstrip("\n") for line in f if line.strip())

    try:
        out = train_tokenizer(lines(), args.output, args.vocab_size)
    except VocabularyTooSmall as e:
        raise UsageError("--vocab_size", args.vocab_size, str(e),
                         f"pass --vocab_size {e.needed} or more (and a model vocab_size at least as large)") from None
    print(out)
    return out


def entry() -> None:
    """The console script: ``main`` with one-line errors and exit statuses (``cli.run``)."""
    cli_run(main, PROG)


if __name__ == "__main__":
    entry()
