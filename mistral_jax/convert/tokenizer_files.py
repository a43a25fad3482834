"""Tokenizer files in checkpoints: which kind a file is (sentencepiece or tekken, checked by content) and copying a
checked one into an export. Either side may be on a bucket (a tokenizer is small: it is read whole)."""

from __future__ import annotations

import json
import os
from typing import Any

from mistral_jax import storage
from mistral_jax.convert import files

TOKENIZER_FILES = ("tokenizer.model", "tekken.json")
_MAX_TOKENIZER_BYTES = 256 * 2**20  # real sentencepiece / tekken files are a few MB; never load a stray 10 GB file


def tokenizer_kind(path: str | os.PathLike) -> str:
    """``"sentencepiece"`` or ``"tekken"`` for a valid tokenizer file; raises naming the file and the fix otherwise.

    A sentencepiece model is a protobuf that sentencepiece loads (with at least one piece); a tekken tokenizer
    is a JSON file (``tekken.json``, Mistral's ``tekken_*.json``, or any name: judged by content) with a ``vocab``
    list. Symlinks are followed: what is checked is what
    would be copied.
    """
    path = os.fspath(path)
    fix = "pass a sentencepiece tokenizer.model or a tekken.json (or no tokenizer)"
    if storage.is_remote(path):
        if not files.is_file(path):
            raise FileNotFoundError(f"tokenizer {path!r} is not a file. Fix: {fix}.")
        size = files.size(path)
        if size > _MAX_TOKENIZER_BYTES:
            raise ValueError(f"tokenizer {path!r} has {size} bytes: too big for a tokenizer model. Fix: {fix}.")
        with storage.local_copy_for_reading(path) as local:  # sentencepiece reads files: check a local copy
            return _kind(local, path, os.path.basename(path), fix)
    shown = path if os.path.realpath(path) == os.path.abspath(path) else f"{path} (-> {os.path.realpath(path)})"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer {shown!r} is not a file. Fix: {fix}.")
    size = os.path.getsize(path)
    if size > _MAX_TOKENIZER_BYTES:
        raise ValueError(f"tokenizer {shown!r} has {size} bytes: too big for a tokenizer model. Fix: {fix}.")
    return _kind(path, shown, os.path.basename(path), fix)


def _kind(path: str, shown: str, name: str, fix: str) -> str:
    """``tokenizer_kind`` of the local file ``path`` (``shown`` and ``name`` as the user gave it)."""
    from mistral_jax.data.tokenizer import is_tekken_file

    if name.endswith(".json") or is_tekken_file(path):  # tekken: JSON, by name or by content
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"tokenizer {shown!r} is not a tekken tokenizer (unreadable JSON: {e}). Fix: {fix}.") \
                from e
        if not isinstance(d, dict) or not isinstance(d.get("vocab"), list) or not d["vocab"]:
            raise ValueError(f"tokenizer {shown!r} is not a tekken tokenizer (no 'vocab' list). Fix: {fix}.")
        return "tekken"
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        with open(path, "rb") as f:
            ok = sp.LoadFromSerializedProto(f.read())
    except (OSError, RuntimeError, TypeError) as e:
        raise ValueError(f"tokenizer {shown!r} is not a sentencepiece model ({e}). Fix: {fix}.") from e
    if ok is False or sp.GetPieceSize() <= 0:
        raise ValueError(f"tokenizer {shown!r} is not a sentencepiece model. Fix: {fix}.")
    return "sentencepiece"


def source_file(tokenizer: Any) -> str | None:
    """The tokenizer file that ``copy_tokenizer`` copies: ``tokenizer`` itself (a ``Tokenizer`` or a path), or the
    ``tokenizer.model`` / ``tekken.json`` of a directory (local or on a bucket); None for no tokenizer."""
    if tokenizer is None:
        return None
    path = os.fspath(getattr(tokenizer, "path", tokenizer))
    if files.is_dir(path):
        found = [storage.join(path, n) for n in TOKENIZER_FILES if files.is_file(storage.join(path, n))]
        if not found:
            raise FileNotFoundError(f"tokenizer directory {path!r} holds neither of {TOKENIZER_FILES}. "
                                    "Fix: pass a Tokenizer, a tokenizer.model path, or None.")
        path = found[0]
    return path


def copy_tokenizer(tokenizer: Any, out_dir: str) -> str | None:
    """Copy a checked tokenizer into ``out_dir``: a sentencepiece model as ``tokenizer.model``, a tekken one as
    ``tekken.json``.

    Args:
      tokenizer: a ``Tokenizer``, a ``tokenizer.model`` / ``tekken.json`` path, a directory holding one, or None
        (paths may be on a bucket).
      out_dir: the (temporary) export directory, or the export's place on a bucket.

    Returns:
      ``"sentencepiece"`` / ``"tekken"``, or None when there is no tokenizer.
    """
    path = source_file(tokenizer)
    if path is None:
        return None
    kind = tokenizer_kind(path)
    files.copy_file(path, storage.join(out_dir, "tekken.json" if kind == "tekken" else "tokenizer.model"))
    return kind
