"""Train a sentencepiece BPE model with Mistral's special ids: ``python -m mistral_jax.data.train_tokenizer``."""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Iterable

import sentencepiece as spm


def train_tokenizer(texts: Iterable[str], out_path: str, vocab_size: int = 512, extra_symbols: tuple[str, ...] = ()
                    ) -> str:
    """Train on ``texts`` and write ``out_path`` (a ``.model`` file). Returns the path."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        user_defined_symbols=list(extra_symbols), hard_vocab_limit=False, minloglevel=2,
        split_digits=True, allow_whitespace_only_pieces=True, normalization_rule_name="identity",
    )
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "wb") as f:
        f.write(model.getvalue())
    return out_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--input", required=True, nargs="+", help="UTF-8 text files, one document per line")
    ap.add_argument("--output", required=True, help="where to write the .model file")
    ap.add_argument("--vocab_size", type=int, default=512)
    args = ap.parse_args()

    def lines():
        for path in args.input:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from (line.rstrip("\n") for line in f if line.strip())

    print(train_tokenizer(lines(), args.output, args.vocab_size))


if __name__ == "__main__":
    main()
