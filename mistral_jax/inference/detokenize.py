"""Ids -> text for generation: HF-compatible decoding, an incremental detokenizer, stop strings, streamed deltas.

``decode_text`` is the text OpenAI-API clients and lm-eval's hf backend expect (HF ``LlamaTokenizer.decode``);
``Detokenizer`` gives the same text of a growing id list in time proportional to the new ids; ``TextStream`` adds
stop strings (the text is cut before the first one) and the part of the text that is safe to show while more
tokens may follow (never half a UTF-8 character, never the start of a stop string). The server, ``mj.generate``'s
``stop=`` and the generate CLI all use these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from mistral_jax.data.tokenizer import hf_decode, hf_raw_text


def decode_text(tokenizer: Any, ids: Sequence[int], skip_unknown: bool = True) -> str:
    """Text of generated ``ids`` as HF's ``LlamaTokenizer`` decodes them: control ids (and, with
    ``skip_unknown``, ``<unk>``) skipped, ``▁`` -> space, a run of byte-fallback pieces UTF-8 decoded as a whole
    (or one U+FFFD per byte if invalid), one leading space stripped (``data.tokenizer.hf_decode``); a tokenizer
    without a sentencepiece model (tekken, or ids-only test tokenizers) uses its own ``decode``."""
    sp = getattr(tokenizer, "sp", None)
    if sp is None:
        return tokenizer.decode(list(ids))
    return hf_decode(sp, ids, skip_unknown=skip_unknown)


def _strip_one_space(text: str) -> str:
    return text[1:] if text.startswith(" ") else text


class Detokenizer:
    """``decode_text`` of a growing id list in time proportional to the new ids: the raw text is final up to the
    last normal piece (only a trailing byte-fallback run, skipped ids included, can still change).

    Args:
      tokenizer: a ``mistral_jax.Tokenizer`` (or anything with ``decode(ids)``).
      decode: decode the whole id list with this function at every step instead (its text, not HF's: e.g. a
        caller whose stop strings are defined on ``tokenizer.decode``).
    """

    def __init__(self, tokenizer: Any, decode: Callable[[list[int]], str] | None = None):
        self.decode = decode
        self.tokenizer = tokenizer
        self.sp = None if decode is not None else getattr(tokenizer, "sp", None)
        if decode is None and self.sp is None:
            self.decode = tokenizer.decode
        self.ids: list[int] = []
        self.done, self.upto = "", 0  # raw text of ids[:upto], final

    def push(self, tok: int) -> str:
        """Append ``tok``; return the text of all ids so far."""
        self.ids.append(tok)
        if self.sp is None:
            return self.decode(self.ids)
        pending = hf_raw_text(self.sp, self.ids[self.upto:])
        sp = self.sp
        if 0 <= tok < sp.GetPieceSize() and not (sp.IsByte(tok) or sp.IsControl(tok) or sp.IsUnknown(tok)):
            self.done, self.upto, pending = self.done + pending, len(self.ids), ""
        return _strip_one_space(self.done + pending)

    def pending(self) -> bool:
        """Whether the end of the text may still change (a byte-fallback run is open)."""
        return self.sp is not None and self.upto < len(self.ids)

    def text(self) -> str:
        """The text of all ids so far."""
        if self.sp is None:
            return self.decode(self.ids)
        return _strip_one_space(self.done + hf_raw_text(self.sp, self.ids[self.upto:]))


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index of the first stop string in ``text`` (the earliest start of any), or None."""
    cuts = [text.find(s) for s in stop if s in text]
    return min(cuts) if cuts else None


class TextStream:
    """The text of one generation, token by token: stop strings end it, ``push`` returns the new showable text.

    Args:
      tokenizer: as for ``Detokenizer``.
      stop: stop strings; the text is cut before the first one and the generation is over.
      decode: as for ``Detokenizer``.

    Attributes:
      text: the text so far (cut at a stop string); ``stopped``: a stop string or ``eos`` ended it.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), decode: Callable[[list[int]], str] | None = None):
        self.detok = Detokenizer(tokenizer, decode)
        self.stop = tuple(stop)
        self.text = ""
        self.sent = 0  # characters of text already handed out
        self.stopped = False

    def push(self, tok: int, *, eos: bool = False, last: bool = False) -> str:
        """Account one new token; return the text delta safe to show now.

        Args:
          tok: the sampled id.
          eos: ``tok`` is the end of sequence: it adds no text and ends the generation.
          last: no token follows (e.g. the length limit): show everything, hold nothing back.
        """
        text = self.detok.text() if eos else self.detok.push(tok)
        self.stopped = eos
        cut = find_stop(text, self.stop)
        if cut is not None:
            text, self.stopped = text[:cut], True
        self.text = text
        shown = text
        if not (self.stopped or last):
            if self.detok.pending():  # a byte-fallback run decodes as a whole: wait for its end
                shown = text[:self.sent]
            # hold back an incomplete character and a possible start of a stop string
            shown = shown.rstrip("\ufffd")
            hold = max((n for s in self.stop for n in range(1, len(s)) if shown.endswith(s[:n])), default=0)
            shown = shown[:len(shown) - hold]
        delta = shown[self.sent:] if len(shown) > self.sent else ""
        self.sent = max(self.sent, len(shown))
        return delta

    def finish(self) -> str:
        """The rest of the text once no token follows (what ``push`` held back)."""
        delta = self.text[self.sent:] if len(self.text) > self.sent else ""
        self.sent = max(self.sent, len(self.text))
        return delta
