"""Tokenizers with Mistral's conventions (``<unk>``=0, ``<s>``=1, ``</s>``=2, BOS on, EOS off): sentencepiece
models and Mistral's tekken (tiktoken-based) tokenizers, through one class, ``Tokenizer``.

A tokenizer is a sentencepiece ``.model`` file, a tekken ``.json`` file, a directory holding ``tokenizer.model``
or ``tekken.json``, or the name of one of Mistral's released tokenizers (``MISTRAL_TOKENIZERS``: ``mistral:v1``,
``mistral:v3``, ``mistral:tekken`` ...), resolved offline to the file the ``mistral-common`` package ships. The
format is read from the file's content (a tekken file is JSON), never from its name, so a tekken file copied as
``tokenizer.model`` still loads as tekken.

Files and directories may be in a bucket (``gs://`` / ``s3://``, through ``mistral_jax.storage``): the file is read
once; a sentencepiece model loads from its bytes (``model_proto``), and the readers that only take a local file name
(mistral-common's ``Tekkenizer`` and instruct tokenizer) get a copy in ``storage.cache_dir("tokenizers")`` named by
the content's hash. The ids are the local file's.

Every tokenizer also knows its Mistral instruct version (``instruct_version``: ``v1``, ``v3``, ``v7`` ...) and
hands ``data.chat`` the matching ``mistral-common`` instruct tokenizer (``instruct_tokenizer``), which renders
conversations exactly as Mistral's own library does. The version comes from the name, from a ``.model.vN`` file
suffix (mistral-common's convention), from a tekken file's config, or from the content of a sentencepiece model:
``[INST]`` as a control piece means v3 (v7 with ``[SYSTEM_PROMPT]``), otherwise v1.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

from mistral_jax import storage

# sentencepiece >= 0.2.1 returns ids as a numpy array itself (return_type="numpy")
_SP_NUMPY = "return_type" in inspect.signature(spm.SentencePieceProcessor.Encode).parameters

NAME_PREFIX = "mistral:"

# Mistral's tokenizers that mistral-common ships: name -> (file in mistral_common/data, pieces, the models that
# use it). Offline: the files are package data.
MISTRAL_TOKENIZERS: dict[str, tuple[str, int, str]] = {
    "mistral:v1": ("tokenizer.model.v1", 32000, "Mistral 7B v0.1 / v0.2, Mixtral 8x7B v0.1"),
    "mistral:v2": ("mistral_instruct_tokenizer_240216.model.v2", 32768,
                   "v1 + control tokens ([INST], tools): Mistral Small / Large 2402"),
    "mistral:v3": ("mistral_instruct_tokenizer_240323.model.v3", 32768, "Mistral 7B v0.3, Mixtral 8x22B"),
    "mistral:v7": ("mistral_instruct_tokenizer_241114.model.v7", 32768,
                   "v3 + system prompt tokens: Mistral Large 2411"),
    "mistral:tekken": ("tekken_240718.json", 131072, "tekken (tiktoken) with the v3 format: Mistral NeMo 12B"),
}


def is_named(tokenizer: str | os.PathLike) -> bool:
    """True if ``tokenizer`` is a Mistral tokenizer name (``mistral:...``) rather than a path."""
    return isinstance(tokenizer, str) and tokenizer.startswith(NAME_PREFIX)


def _mistral_common_missing(what: str, e: ImportError) -> ValueError:
    return ValueError(f"{what} needs the mistral-common package, which ships Mistral's tokenizer files "
                      f"({type(e).__name__}: {e}). Fix: pip install 'mistral-common>=1.13' (a dependency of "
                      "mistral_jax: pip install -e .), or pass the path of a sentencepiece .model file.")


def named_tokenizer_path(name: str) -> str:
    """The file of a Mistral tokenizer name (``mistral:v1`` ...), shipped in ``mistral-common``.

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
        raise _mistral_common_missing(f"tokenizer {name!r}", e) from None
    return os.path.join(os.fspath(MistralTokenizer._data_path()), MISTRAL_TOKENIZERS[name][0])


def _isdir(path: str) -> bool:
    return storage.path(path).is_dir() if storage.is_remote(path) else os.path.isdir(path)


def _isfile(path: str) -> bool:
    return storage.path(path).is_file() if storage.is_remote(path) else os.path.isfile(path)


def resolve(tokenizer: str | os.PathLike) -> str:
    """The tokenizer file a tokenizer argument names: a ``mistral:`` name's shipped file, a directory's
    ``tokenizer.model`` (else its ``tekken.json``), or the path itself (not checked: ``Tokenizer`` does that).
    Directories may be in a bucket (``gs://`` / ``s3://``)."""
    if is_named(tokenizer):
        return named_tokenizer_path(tokenizer)
    path = os.fspath(tokenizer)
    if _isdir(path):
        sp_file, tekken = storage.join(path, Tokenizer.FILENAME), storage.join(path, Tokenizer.TEKKEN_FILENAME)
        return tekken if not _isfile(sp_file) and _isfile(tekken) else sp_file
    return path


def _is_tekken(data: bytes) -> bool:
    return data[:64].lstrip().startswith(b"{")


def is_tekken_file(path: str | os.PathLike) -> bool:
    """True if ``path`` (local or in a bucket) is a tekken tokenizer (a JSON file), judged by content, not by name."""
    try:
        with storage.path(path).open("rb") as f:
            head = f.read(64)
    except OSError:
        return False
    return _is_tekken(head)


class Tokenizer:
    """One interface over a sentencepiece model or a tekken tokenizer.

    Args:
      path: a sentencepiece ``.model`` file, a tekken ``.json`` file, a directory holding ``tokenizer.model`` or
        ``tekken.json`` (each local or ``gs://`` / ``s3://``), or a Mistral tokenizer name such as ``mistral:v3``
        (``MISTRAL_TOKENIZERS``; the file ships in mistral-common, no download).

    Attributes:
      name: the ``mistral:...`` name, if one was given.
      path: the tokenizer file (a bucket URL for a tokenizer in a bucket).
      kind: ``"sentencepiece"`` or ``"tekken"``.
      sp: the ``SentencePieceProcessor`` (None for tekken).

    Raises:
      FileNotFoundError: no tokenizer file there. ValueError: not a valid tokenizer file.
      storage.StorageError: a bucket path whose endpoint, bucket or credentials fail (one line with the fix).
    """

    FILENAME = "tokenizer.model"
    TEKKEN_FILENAME = "tekken.json"

    def __init__(self, path: str | os.PathLike):
        self.name = path if is_named(path) else None  # the mistral:... name, if one was given
        if storage.url_scheme(path) is not None:
            storage.check_bucket(path, "tokenizer")  # one line for an unreachable endpoint or a missing bucket
        path = resolve(path)
        if not _isfile(path):
            raise FileNotFoundError(
                f"sentencepiece model not found at {path!r}. Fix: pass the path of a .model file (or a tekken.json), "
                f"or a directory containing {self.FILENAME} (train one with mistral-jax-train-tokenizer), or a "
                "Mistral tokenizer name such as mistral:v3.")
        self.path = os.fspath(path)
        self.sp: spm.SentencePieceProcessor | None = None
        self._tekken: Any = None
        # a bucket file is read once: its bytes (for save) and, when a reader needs a file name, a local copy
        self._bytes: bytes | None = storage.read_bytes(path) if storage.is_remote(path) else None
        self._local: str | None = None if self._bytes is not None else self.path
        tekken = _is_tekken(self._bytes) if self._bytes is not None else is_tekken_file(path)
        if tekken:
            self.kind = "tekken"
            try:
                from mistral_common.tokens.tokenizers.tekken import Tekkenizer
            except ImportError as e:
                raise _mistral_common_missing(f"tekken tokenizer {path!r}", e) from None
            try:
                self._tekken = Tekkenizer.from_file(self.local_file)
            except Exception as e:  # noqa: BLE001 - any parse error of the JSON: one line with the fix
                raise ValueError(f"{path!r} is not a valid tekken tokenizer ({type(e).__name__}: {e}). "
                                 "Fix: pass Mistral's tekken.json (e.g. mistral:tekken).") from e
            return
        self.kind = "sentencepiece"
        self.sp = spm.SentencePieceProcessor()
        try:
            if self._bytes is not None:
                self.sp.LoadFromSerializedProto(self._bytes)
            else:
                self.sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path!r} is not a valid sentencepiece model ({e}). "
                             "Fix: re-train or re-download it.") from e

    @property
    def local_file(self) -> str:
        """A local file holding the tokenizer: ``path`` itself, or (for a bucket file) a copy in
        ``storage.cache_dir("tokenizers", <content hash>)`` under the same file name, written once."""
        if self._local is None:  # a bucket file (a local one is its own path)
            data = self.read_bytes()
            digest = hashlib.sha256(data).hexdigest()[:16]
            target = os.path.join(storage.cache_dir("tokenizers", digest), self.path.rstrip("/").rsplit("/", 1)[-1])
            if not os.path.isfile(target):  # a whole file or none: written aside, then renamed into place
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".partial")
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                    os.replace(tmp, target)
                except BaseException:
                    if os.path.exists(tmp):
                        os.remove(tmp)
                    raise
            self._local = target
        return self._local

    def read_bytes(self) -> bytes:
        """The tokenizer file's content."""
        return self._bytes if self._bytes is not None else storage.read_bytes(self.path)

    @classmethod
    def find(cls, directory: str | os.PathLike) -> Tokenizer | None:
        """The tokenizer stored in a checkpoint / export directory (``tokenizer.model`` or ``tekken.json``; local or
        in a bucket), or None if it has none."""
        for name in (cls.FILENAME, cls.TEKKEN_FILENAME):
            p = storage.join(directory, name)
            if _isfile(p):
                return cls(p)
        return None

    @property
    def filename(self) -> str:
        """The file name this tokenizer is stored under in a checkpoint: ``tokenizer.model`` or ``tekken.json``."""
        return self.TEKKEN_FILENAME if self.kind == "tekken" else self.FILENAME

    def save(self, directory: str | os.PathLike) -> str:
        """Copy the tokenizer file into ``directory`` (local or a bucket) as ``self.filename``; returns the new
        path. A file onto itself is left alone."""
        dest = storage.join(directory, self.filename)
        if not storage.is_remote(dest) and not storage.is_remote(self.path):
            import shutil

            if not (os.path.exists(dest) and os.path.samefile(dest, self.path)):
                shutil.copyfile(self.path, dest)
            return dest
        if dest.rstrip("/") != self.path.rstrip("/"):
            storage.write_bytes(dest, self.read_bytes())
        return dest

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        return self._tekken.n_words if self.sp is None else self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self._tekken.bos_id if self.sp is None else self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._tekken.eos_id if self.sp is None else self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        """Tekken's ``<pad>``; sentencepiece Mistral has no pad token: padding uses id 0 (``<unk>``), masked out by
        segment ids."""
        if self.sp is None:
            return self._tekken.pad_id
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else 0

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids of ``text``; text that spells a control token (``<s>``, ``[INST]``) stays text."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects str, got {type(text).__name__}. "
                            "Fix: decode bytes as UTF-8 first.")
        if self.sp is None:
            return self._tekken.encode(text, bos=bos, eos=eos)
        return self.sp.encode(text, add_bos=bos, add_eos=eos)  # bos_id / eos_id: the model's own

    def encode_array(self, text: str, bos: bool = True, eos: bool = False) -> np.ndarray:
        """``encode`` as an int32 array (sentencepiece writes it directly: no Python list of ints in between)."""
        if self.sp is not None and isinstance(text, str) and _SP_NUMPY:
            return self.sp.encode(text, add_bos=bos, add_eos=eos, return_type="numpy")
        return np.asarray(self.encode(text, bos=bos, eos=eos), np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (control / special ids are dropped)."""
        if self.sp is None:
            n = self.vocab_size
            return self._tekken.decode([int(i) for i in ids if 0 <= int(i) < n])
        return self.sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        if self.sp is None:
            return self._tekken.id_to_piece(int(i))
        return self.sp.IdToPiece(int(i))

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece (sentencepiece) or of a special token / single-token text (tekken; ``<unk>``'s id if
        the text is not one token)."""
        if self.sp is not None:
            return self.sp.PieceToId(piece)
        tk = self._tekken
        try:
            return tk.get_special_token(piece)
        except Exception:  # noqa: BLE001 - not a special token: try the ordinary vocabulary
            pass
        try:
            return tk._model.encode_single_token(piece.encode("utf-8")) + tk.num_special_tokens
        except KeyError:
            return tk.unk_id

    def is_special(self, i: int) -> bool:
        """True for control / special ids (``<s>``, ``</s>``, ``[INST]`` ...)."""
        if self.sp is None:
            return int(i) < self._tekken.num_special_tokens
        return self.sp.IsControl(int(i))

    # ------------------------------------------------------------------ Mistral instruct format
    @functools.cached_property
    def instruct_version(self) -> str:
        """The Mistral instruct format of this tokenizer (``"v1"``, ``"v3"``, ``"v7"`` ...; see the module doc)."""
        if self.sp is None:
            return self._tekken.version.value
        base = os.path.basename(self.path)
        if ".model.v" in base:
            from mistral_common.tokens.tokenizers.sentencepiece import get_spm_version

            return get_spm_version(base).value  # read from the file name

        def control(piece: str) -> bool:
            i = self.sp.PieceToId(piece)
            return i != self.sp.unk_id() and self.sp.IsControl(i)

        if control("[INST]"):
            return "v7" if control("[SYSTEM_PROMPT]") else "v3"
        return "v1"

    @functools.cached_property
    def instruct_tokenizer(self) -> Any:
        """mistral-common's instruct tokenizer (``InstructTokenizerV1``, ``V3`` ...) over this tokenizer's file: the
        engine of ``data.chat``'s rendering."""
        try:
            from mistral_common.tokens.tokenizers import instruct
            from mistral_common.tokens.tokenizers.base import TokenizerVersion
            from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer
        except ImportError as e:
            raise _mistral_common_missing(f"the chat format of tokenizer {self.path!r}", e) from None
        version = TokenizerVersion(self.instruct_version)
        raw = self._tekken if self.sp is None else SentencePieceTokenizer(self.local_file, tokenizer_version=version)
        cls = {"v1": instruct.InstructTokenizerV1, "v2": instruct.InstructTokenizerV2,
               "v3": instruct.InstructTokenizerV3, "v7": instruct.InstructTokenizerV7}.get(version.value)
        if cls is None:
            raise ValueError(f"tokenizer {self.path!r} has Mistral instruct version {version.value}, which "
                             "mistral_jax does not render. Fix: use a v1, v2, v3 or v7 tokenizer.")
        return cls(raw)

    def chat_text(self, ids: Sequence[int]) -> str:
        """``ids`` as text with the special tokens spelled out (``<s>[INST] hi [/INST]``), for display and for the
        eval backend's chat strings: each run of ordinary ids is decoded on its own (HF-style for sentencepiece:
        one leading space dropped), each special id is its piece."""
        out: list[str] = []
        run: list[int] = []

        def flush() -> None:
            if run:
                out.append(self.decode(run) if self.sp is None else hf_decode(self.sp, run))
                run.clear()

        for i in (int(i) for i in ids):
            if self.is_special(i):
                flush()
                out.append(self.id_to_piece(i))
            else:
                run.append(i)
        flush()
        return "".join(out)


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

