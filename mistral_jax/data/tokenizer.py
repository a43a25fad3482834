"""SentencePiece tokenizer with Mistral's conventions (``<unk>``=0, ``<s>``=1, ``</s>``=2, BOS on, EOS off)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import sentencepiece as spm


class Tokenizer:
    """A thin wrapper over ``sentencepiece.SentencePieceProcessor``.

    Args:
      path: a ``.model`` file, or a directory holding ``tokenizer.model``.
    """

    FILENAME = "tokenizer.model"

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, self.FILENAME)
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
