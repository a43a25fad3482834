"""Train a sentencepiece BPE model with Mistral's special ids (command line: ``mistral-jax-train-tokenizer``).

Every character of the data gets a piece (``character_coverage=1.0``), plus the word-boundary piece ``▁``, 256
byte-fallback pieces and the 3 special ones, so the vocabulary must be at least ``distinct characters + 260``: text in
a large script (CJK) needs more than the 512 pieces that suit Latin text. Too small a vocabulary raises
``VocabularyTooSmall`` naming that minimum.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable

import sentencepiece as spm

from mistral_jax import storage

BYTE_PIECES, SPECIAL_PIECES = 256, 3  # byte_fallback <0x00>..<0xFF>; <unk> <s> </s>
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


class VocabularyTooSmall(ValueError):
    """The requested vocabulary cannot hold every character of the data; ``needed`` is the minimum."""

    def __init__(self, vocab_size: int, needed: int, n_chars: int, n_extra: int = 0):
        self.vocab_size, self.needed, self.n_chars = vocab_size, needed, n_chars
        parts = (f"the word-boundary piece \u2581, {BYTE_PIECES} byte-fallback, {SPECIAL_PIECES} special and {n_extra} "
                 "extra" if n_extra else f"the word-boundary piece \u2581, {BYTE_PIECES} byte-fallback and "
                 f"{SPECIAL_PIECES} special")
        super().__init__(f"a {vocab_size}-piece vocabulary is too small for this data: its {n_chars:,} distinct "
                         f"characters (each gets a piece) plus {parts} pieces need at least {needed:,}")


def train_tokenizer(texts: Iterable[str], out_path: str, vocab_size: int = 512, extra_symbols: tuple[str, ...] = (),
                    *, exclusive: bool = False) -> str:
    """Train on ``texts`` and write ``out_path`` (a ``.model`` file, local or ``gs://`` / ``s3://``). Returns the
    path. sentencepiece trains from the texts in memory and writes the model to memory, so nothing is staged.

    Args:
      exclusive: write only if ``out_path`` does not exist (``storage.create_exclusive``: two writers cannot both
        succeed); else it is replaced.

    Raises:
      VocabularyTooSmall: ``vocab_size`` is below what the data's characters need (``.needed`` says how many).
      FileExistsError: ``exclusive`` and ``out_path`` exists (it is left as it was).
    """
    texts = list(texts)
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size!r} must be a positive integer")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
            user_defined_symbols=list(extra_symbols), hard_vocab_limit=False, minloglevel=2,
            split_digits=True, allow_whitespace_only_pieces=True, normalization_rule_name="identity",
        )
    except RuntimeError as e:
        m = _TOO_SMALL.search(str(e))
        if not m:
            raise
        needed = int(m.group(2))  # sentencepiece's own count: required characters + meta pieces
        n_chars = needed - 1 - BYTE_PIECES - SPECIAL_PIECES - len(extra_symbols)  # 1: the "\u2581" (space) piece
        raise VocabularyTooSmall(vocab_size, needed, n_chars, len(extra_symbols)) from None
    if exclusive:
        if not storage.create_exclusive(out_path, model.getvalue()):
            raise FileExistsError(f"{out_path!r} already exists: it was left as it was. Fix: pass another path, or "
                                  "remove it first.")
    else:
        storage.write_bytes(out_path, model.getvalue())
    return out_path
