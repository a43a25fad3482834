"""Tokenizer files in checkpoints: which kind a file is (sentencepiece or tekken, checked by content), copying a
checked one into an export, and the HF ``tokenizer.json`` of a sentencepiece BPE model. Either side may be on a
bucket (a tokenizer is small: it is read whole)."""

from __future__ import annotations

import json
import os
import re
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


# ------------------------------------------------------------------------------------------ HF tokenizer.json
def sentencepiece_tokenizer_json(tokenizer: Any) -> dict[str, Any] | None:
    """An HF ``tokenizer.json`` whose ids are sentencepiece's for every text (None if ``tokenizers`` is missing, the
    model is not BPE, has user-defined pieces other than Mistral's ``[REFERENCE_DOC_n]``, or fails the whitespace-run
    check below: transformers then builds its own, approximate, tokenizer from ``tokenizer.model``).

    Byte fallback, and a ``▁`` prepended to every text run between special tokens (the legacy Llama / Mistral
    normalisation, mistral-common's per-segment dummy prefix). The merges in sentencepiece's order
    (``sentencepiece_merges``): transformers' own conversion of ``tokenizer.model`` orders merges by id and
    prepends only when the text does not already start with a space, which changes the ids of whitespace runs.
    """
    try:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2
        from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
        from tokenizers.models import BPE
    except ImportError:
        return None
    with open(tokenizer.path, "rb") as f:
        proto = f.read()
    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(proto)
    user_defined = [p.piece for p in m.pieces if p.type == 4]
    if m.trainer_spec.model_type != 2 or not all(re.fullmatch(r"\[REFERENCE_DOC_\d+\]", u) for u in user_defined):
        return None  # not BPE, or user-defined pieces such as a trained "[INST]": LlamaTokenizer (approximate)
    vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    tok = Tokenizer(BPE(vocab, sentencepiece_merges(m), unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(tokenizer.id_to_piece(i), special=True, normalized=False)
                            for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)])
    # v3 / v7's [REFERENCE_DOC_n] user-defined pieces: whole tokens, as sentencepiece matches them (the spacing
    # around one typed in text may differ from sentencepiece's)
    tok.add_tokens([AddedToken(u, special=False, normalized=False) for u in user_defined])
    bos = tokenizer.id_to_piece(tokenizer.bos_id)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tokenizer.bos_id)])
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    for text in _run_check_texts(m):
        if tok.encode(text, add_special_tokens=False).ids != sp.encode(text):
            return None  # tied merges this order cannot reproduce (not Mistral's): LlamaTokenizer (approximate)
    return json.loads(tok.to_str())


def sentencepiece_merges(m: Any) -> list[tuple[str, str]]:
    """The BPE merges of a sentencepiece ``ModelProto`` ``m``, ranked so that HF's BPE (lowest rank first, then
    leftmost) merges as sentencepiece does (highest piece score first, then leftmost).

    Every split ``(left, right)`` of a normal piece into two pieces is a merge, ranked by the piece's score. Where
    scores differ that is all; where several pieces share a score, sentencepiece takes the leftmost of their pairs,
    which no fixed rank order reproduces in general. Mistral's models (v1 ... v7) have one such tie: the
    whitespace pieces ``▁`` x 2 ... 14 and 16, all scored -1e9 (merged last, after every other piece). On a run of
    n ``▁`` sentencepiece grows the leftmost piece as far as the vocabulary allows: 16-``▁`` pieces, then the rest
    as one piece (``▁`` x 14 + ``▁`` for 15). Ranked by the ids of their parts (``▁▁`` + anything first), HF split
    runs of 16 and more otherwise (14 + 3 for 17). For a tie among runs of one character the merges are ranked:
    doubling first (1+1, 2+2, 4+4, 8+8: the 16-pieces from the left, the rest as its binary pieces, largest first),
    then the largest left piece first (8+4, 12+2: the rest joined from the left). ``sentencepiece_tokenizer_json``
    checks the result on runs of every such character against sentencepiece itself. Other ties keep the order of
    their parts' ids.
    """
    pieces = [(p.piece, p.type, p.score) for p in m.pieces]  # each protobuf field read once (they are slow)
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    groups: dict[float, list[tuple[str, str, str]]] = {}
    for piece, kind, score in pieces:
        if kind != 1:  # NORMAL pieces take part in merges (not control, user-defined, unknown or byte pieces)
            continue
        for k in range(1, len(piece)):
            left = piece[:k]
            if left in vocab:
                right = piece[k:]
                if right in vocab:
                    groups.setdefault(score, []).append((piece, left, right))
    merges: list[tuple[str, str]] = []
    for score in sorted(groups, reverse=True):
        group = groups[score]
        chars = {_run_char(piece) for piece, _, _ in group}
        if len({piece for piece, _, _ in group}) > 1 and len(chars) == 1 and None not in chars:
            group.sort(key=_run_rank)  # a tie among runs of one character
        else:
            group.sort(key=lambda t: (vocab[t[1]], vocab[t[2]]))
        merges += [(left, right) for _, left, right in group]
    return merges


def _run_char(piece: str) -> str | None:
    """The character of a piece that repeats one character (``"▁▁▁"`` -> ``"▁"``), else None."""
    return piece[0] if len(piece) > 1 and len(set(piece)) == 1 else None


def _run_rank(merge: tuple[str, str, str]) -> tuple[int, int, int]:
    """Rank of a merge of one-character runs: doublings of a power of two first (shortest first), then the longest
    left part first (the run joined from the left), then the longest right part."""
    _, left, right = merge
    n = len(left)
    if left == right and n & (n - 1) == 0:
        return (0, n, 0)
    return (1, -n, -len(right))


def _run_check_texts(m: Any) -> list[str]:
    """Texts with runs of each tied run character (lengths 1 to 4x the longest such piece + 1, alone, between
    words and at the ends) on which ``sentencepiece_tokenizer_json`` compares its ids with sentencepiece's."""
    scores: dict[float, list[str]] = {}
    for p in m.pieces:
        if p.type == 1 and _run_char(p.piece):
            scores.setdefault(p.score, []).append(p.piece)
    texts = []
    for pieces in scores.values():
        if len(pieces) < 2:
            continue
        for char in {piece[0] for piece in pieces}:
            char = " " if char == "\u2581" else char
            for n in range(1, 4 * max(map(len, pieces)) + 2):
                texts += [char * n, f"x{char * n}y", f"if{char * n}東🙂", f"a {char * n}\nb"]
    return texts
