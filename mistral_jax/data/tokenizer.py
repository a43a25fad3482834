"""SentencePiece tokenizer with Mistral's conventions (``<unk>``=0, ``<s>``=1, ``</s>``=2, BOS on, EOS off).

A tokenizer is a sentencepiece ``.model`` file, a directory holding ``tokenizer.model``, or the name of one of
Mistral's released tokenizers, ``mistral:v1`` (the 32k vocabulary of Mistral 7B and Mixtral 8x7B), resolved
offline to the file the ``mistral-common`` package ships (``MistralTokenizer.v1()``'s).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import sentencepiece as spm

NAME_PREFIX = "mistral:"

# Mistral's sentencepiece tokenizers that mistral-common ships: name -> (MistralTokenizer constructor, pieces,
# the models that use it). Tekken (tiktoken) tokenizers are not sentencepiece files and are not listed.
MISTRAL_TOKENIZERS: dict[str, tuple[str, int, str]] = {
    "mistral:v1": ("v1", 32000, "Mistral 7B v0.1 / v0.2, Mixtral 8x7B v0.1"),
    "mistral:v2": ("v2", 32768, "v1 + control tokens ([INST], tools): Mistral Small / Large 2402"),
    "mistral:v3": ("v3", 32768, "Mistral 7B v0.3, Mixtral 8x22B"),
    "mistral:v7": ("v7", 32768, "v3 + system prompt tokens: Mistral Large 2411"),
}


def is_named(tokenizer: str | os.PathLike) -> bool:
    """True if ``tokenizer`` is a Mistral tokenizer name (``mistral:...``) rather than a path."""
    return isinstance(tokenizer, str) and tokenizer.startswith(NAME_PREFIX)


def named_tokenizer_path(name: str) -> str:
    """The sentencepiece file of a Mistral tokenizer name (``mistral:v1`` ...), shipped in ``mistral-common``.

    Offline: the files are package data. Raises ``ValueError`` (one line with the fix) for an unknown name or when
    mistral-common is not installed.
    """
    if name not in MISTRAL_TOKENIZERS:
        known = ", ".join(f"{k} ({v[1]} pieces: {v[2]})" for k, v in MISTRAL_TOKENIZERS.items())
        raise ValueError(f"unknown Mistral tokenizer {name!r}. Fix: use one of {known}, or the path of a "
                         "sentencepiece .model file.")
    try:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    except ImportError as e:
        raise ValueError(f"tokenizer {name!r} needs the mistral-common package, which ships Mistral's tokenizer files "
                         f"({type(e).__name__}: {e}). Fix: pip install 'mistral-common>=1.13' (a dependency of "
                         "mistral_jax: pip install -e .), or pass the path of a sentencepiece .model file.") from None
    inner = getattr(MistralTokenizer, MISTRAL_TOKENIZERS[name][0])().instruct_tokenizer.tokenizer
    return os.fspath(inner.file_path)


def resolve(tokenizer: str | os.PathLike) -> str:
    """The sentencepiece file a tokenizer argument names: a ``mistral:`` name's shipped file, a directory's
    ``tokenizer.model``, or the path itself (not checked: ``Tokenizer`` does that)."""
    if is_named(tokenizer):
        return named_tokenizer_path(tokenizer)
    path = os.fspath(tokenizer)
    return os.path.join(path, Tokenizer.FILENAME) if os.path.isdir(path) else path


class Tokenizer:
    """A thin wrapper over ``sentencepiece.SentencePieceProcessor``.

    Args:
      path: a ``.model`` file, a directory holding ``tokenizer.model``, or a Mistral tokenizer name such as
        ``mistral:v1`` (``MISTRAL_TOKENIZERS``; the file ships in mistral-common, no download).
    """

    FILENAME = "tokenizer.model"

    def __init__(self, path: str | os.PathLike):
        self.name = path if is_named(path) else None  # the mistral:... name, if one was given
        path = resolve(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"sentencepiece model not found at {path!r}. Fix: pass the path of a .model file or a directory "
                f"containing {self.FILENAME} (train one with python -m mistral_jax.data.train_tokenizer).")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path!r} is not a valid sentencepiece model ({e}). "
                             "Fix: re-train or re-download it.") from e

    @classmethod
    def find(cls, directory: str | os.PathLike) -> Tokenizer | None:
        """The tokenizer stored in a checkpoint / export directory, or None if it has none."""
        p = os.path.join(os.fspath(directory), cls.FILENAME)
        return cls(p) if os.path.isfile(p) else None

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        """Mistral has no pad token; padding uses id 0 (``<unk>``) and is masked out by segment ids."""
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else 0

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects str, got {type(text).__name__}. "
                            "Fix: decode bytes as UTF-8 first.")
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.IdToPiece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self.sp.PieceToId(piece)


def hf_raw_text(sp: Any, ids: Sequence[int], skip_unknown: bool = True) -> str:
    """Text of ``ids`` as HF's ``LlamaTokenizer`` decodes them, before its one leading space is stripped: control
    ids (and, with ``skip_unknown``, ``<unk>``) are skipped, as are ids the tokenizer does not have; ``▁`` becomes a
    space; a run of byte-fallback pieces is UTF-8 decoded as a whole or, if invalid, gives one U+FFFD per byte.
    The raw text concatenates at every non-byte piece, so a growing id list can be decoded incrementally."""
    n = sp.GetPieceSize()
    out: list[str] = []
    run = bytearray()

    def flush() -> None:
        if run:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out.append("\ufffd" * len(run))
            run.clear()

    for t in (int(t) for t in ids):
        if not 0 <= t < n or sp.IsControl(t) or (skip_unknown and sp.IsUnknown(t)):
            continue
        piece = sp.IdToPiece(t)
        if sp.IsByte(t):
            run.append(int(piece[3:5], 16))  # "<0xAB>"
            continue
        flush()
        out.append(piece.replace("\u2581", " "))
    flush()
    return "".join(out)


def hf_decode(sp: Any, ids: Sequence[int], skip_unknown: bool = True) -> str:
    """``hf_raw_text`` with one leading space stripped: what the HF tokenizer's ``decode`` returns (the reference of
    lm-eval's hf backend and of OpenAI-API clients)."""
    text = hf_raw_text(sp, ids, skip_unknown)
    return text[1:] if text.startswith(" ") else text

