"""Preference data: chosen / rejected pairs rendered with Mistral's chat format into fixed-shape pair batches.

Records (one per line of a ``.jsonl`` file, a ``.json`` list, or rows of an HF hub dataset)::

    {"prompt": "What is 2 plus 2?", "chosen": "2 plus 2 is 4.", "rejected": "5."}                 # standard
    {"prompt": [{"role": "user", "content": ...}],                                                # TRL conversational
     "chosen": [{"role": "assistant", "content": ...}], "rejected": [{"role": "assistant", ...}]}
    {"prompt": "...", "chosen": [{"role": "user", ...}, {"role": "assistant", ...}], "rejected": [...]}  # H4 UF
    {"chosen": [user, assistant], "rejected": [user, assistant]}                                 # implicit prompt

A ``prompt`` string is one user message; a ``prompt`` list is a conversation (optional system message, earlier turns)
ending with a user message. ``chosen`` / ``rejected`` are the answer text or messages: a message list that repeats the
conversation first (``HuggingFaceH4/ultrafeedback_binarized``) has that shared prefix removed, and without a ``prompt``
the prompt is the longest shared prefix of the two lists (TRL's ``extract_prompt``). What remains must be one
assistant message.

Rendering (``chat.render_prompt`` / ``chat.render``, mistral-common for a ``mistral_jax.Tokenizer``): the prompt ids
are ``render_prompt(prompt)``; each full sequence is ``render(prompt + [answer]).ids``, and the prompt ids are checked
to be its prefix, so chosen and rejected share the prompt tokens exactly. The *answer* of a sequence is everything
after the prompt: the answer ids and the ``</s>`` that ends them (TRL's ``completion_mask``); earlier assistant turns
inside a multi-turn prompt are context, not loss.

A rendered sequence of ``n`` ids is one document of ``n - 1`` positions (``tokens = ids[:-1]``, ``targets = ids[1:]``,
``weights = answer_mask[1:]``), as in ``data.chat``. A pair whose chosen or rejected sequence does not fit ``seq_len``
positions is dropped and counted (``PairStats.dropped``), never cut.

Batch layout (numpy dicts; ``S = 2``: index 0 the chosen, 1 the rejected sequence; ``P = pairs_per_row``)::

    tokens, targets     int32   [B, 2, T]
    weights             float32 [B, 2, T]   1 on answer targets (answer ids + </s>), else 0
    positions           int32   [B, 2, T]   restart at 0 per document
    segment_ids         int32   [B, 2, T]   k + 1 for the k-th pair of the row, 0 = padding
    pair_mask           float32 [B, P]      1 where the row holds a k-th pair (its static shape carries P)

Pair ``k`` of row ``b`` is segment ``k + 1`` on both sides of ``[b]``, so a pair never straddles rows or batches.
With ``pairs_per_row = 1`` (the default) each row holds one pair, right-padded (TRL's padded layout); larger values
pack several short pairs per row (next-fit, in order). Reshaping ``[B, 2, T] -> [2B, T]`` gives the model one
ordinary packed batch (the ``training.loss`` contract), which ``training.preference`` does.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from mistral_jax.data import chat, files
from mistral_jax.data.epochs import EpochBatches

log = logging.getLogger(__name__)

SIDE_DTYPES = dict(tokens=np.int32, targets=np.int32, weights=np.float32, positions=np.int32, segment_ids=np.int32)
BUNDLED_TRAIN = os.path.join(os.path.dirname(__file__), "corpus", "preference_train.jsonl")
BUNDLED_VALIDATION = os.path.join(os.path.dirname(__file__), "corpus", "preference_validation.jsonl")


# ----------------------------------------------------------------------------------------------- records
@dataclasses.dataclass(frozen=True)
class Pair:
    """One preference record, normalised: the prompt conversation (ends with a user message) and the two answers."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str


def _where(index: int | None) -> str:
    return "preference record" if index is None else f"preference record {index}"


def _messages(value: Any, field: str, index: int | None) -> list[dict[str, str]]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ValueError(f"{_where(index)}: {field!r} must be a string or a list of {{'role', 'content'}} messages, "
                         f"got {value!r:.200}.")
    out = []
    for m in value:
        if isinstance(m, Mapping) and "from" in m and "value" in m:  # ShareGPT spelling
            m = {"role": {"human": "user", "gpt": "assistant"}.get(m["from"], m["from"]), "content": m["value"]}
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"{_where(index)}: {field!r} holds {m!r:.200}, not a {{'role', 'content'}} message. "
                             "Fix: write messages as {'role': 'assistant', 'content': '...'}.")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _answer(msgs: list[dict[str, str]], field: str, index: int | None) -> str:
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise ValueError(f"{_where(index)}: {field!r} must be one assistant answer after the prompt, got roles "
                         f"{[m['role'] for m in msgs]}. Fix: put earlier turns in 'prompt' and keep one assistant "
                         "message in 'chosen' / 'rejected'.")
    if not isinstance(msgs[0]["content"], str) or not msgs[0]["content"].strip():
        raise ValueError(f"{_where(index)}: {field!r} is empty ({msgs[0]['content']!r:.200}). Fix: drop the record.")
    return msgs[0]["content"]


def to_pair(example: Mapping[str, Any], index: int | None = None) -> Pair:
    """Normalise one record of any accepted layout (see the module docstring) to a ``Pair``.

    Raises:
      ValueError: naming the record, the field and the value, with the fix.
    """
    if not isinstance(example, Mapping) or "chosen" not in example or "rejected" not in example:
        keys = sorted(example) if isinstance(example, Mapping) else type(example).__name__
        raise ValueError(f"{_where(index)}: needs 'chosen' and 'rejected' fields (and usually 'prompt'); got {keys}. "
                         "Fix: use TRL's preference layout {'prompt', 'chosen', 'rejected'}.")
    prompt = example.get("prompt")
    if isinstance(prompt, str):
        prompt_msgs = [{"role": "user", "content": prompt}]
    elif prompt is None:
        prompt_msgs = None
    else:
        prompt_msgs = _messages(prompt, "prompt", index)
    sides = {}
    for field in ("chosen", "rejected"):
        v = example[field]
        sides[field] = [{"role": "assistant", "content": v}] if isinstance(v, str) else _messages(v, field, index)
    c, r = sides["chosen"], sides["rejected"]
    if prompt_msgs is None:  # implicit prompt: the longest shared prefix (TRL's extract_prompt)
        n = 0
        while n < min(len(c), len(r)) and c[n] == r[n]:
            n += 1
        prompt_msgs = c[:n]
    for field, msgs in (("chosen", c), ("rejected", r)):  # a list that repeats the conversation first (UltraFeedback)
        if len(msgs) > len(prompt_msgs) and msgs[: len(prompt_msgs)] == prompt_msgs:
            sides[field] = msgs[len(prompt_msgs):]
    if not prompt_msgs:
        raise ValueError(f"{_where(index)}: no prompt (no 'prompt' field and 'chosen'/'rejected' share no messages). "
                         "Fix: add a 'prompt' field.")
    return Pair(prompt_msgs, _answer(sides["chosen"], "chosen", index), _answer(sides["rejected"], "rejected", index))


def load_records(source: str, split: str = "train", hub_config: str = "") -> Iterator[dict[str, Any]]:
    """Yield raw preference records from ``.jsonl`` / ``.json`` files (local or ``gs://`` / ``s3://``) or a streamed
    HF hub dataset.

    Args:
      source: a file, a directory of ``.json*`` files, a glob, ``"bundled"`` (this project's set), or a hub name
        (``HuggingFaceH4/ultrafeedback_binarized``, ``trl-lib/ultrafeedback_binarized`` ...).
      split: the hub split (``train_prefs`` / ``test_prefs`` for H4 UltraFeedback); for ``"bundled"``, a split
        starting with ``val`` or ``test`` is the held-out file.
      hub_config: the hub dataset configuration name.

    Raises:
      FileNotFoundError, storage.StorageError, RuntimeError: as ``files.load_records`` (a missing path, a bucket
        that fails, a hub dataset that cannot be streamed), each one line with the fix.
    """
    if source == "bundled":
        source = BUNDLED_VALIDATION if split.startswith(("val", "test")) else BUNDLED_TRAIN
    yield from files.load_records(source, split, hub_config, what="preference data")


# ----------------------------------------------------------------------------------------------- rendering
@dataclasses.dataclass(frozen=True)
class RenderedPair:
    """A tokenised pair: the shared prompt ids (start with BOS, end with ``[/INST]``) and each answer's ids + EOS."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def sequence(self, side: int) -> tuple[list[int], list[bool]]:
        """``(ids, answer_mask)`` of the chosen (0) or rejected (1) sequence."""
        answer = self.chosen_ids if side == 0 else self.rejected_ids
        return self.prompt_ids + answer, [False] * len(self.prompt_ids) + [True] * len(answer)


def render_pair(pair: Pair, tokenizer: chat.TokenizerLike, index: int | None = None) -> RenderedPair:
    """Render a pair with the tokenizer's Mistral chat format (``chat.render_prompt`` and ``chat.render``).

    Raises:
      ValueError: an invalid conversation (``chat.validate``'s message), or a format in which the prompt ids are not a
        prefix of the full sequence (never the case for Mistral's formats).
    """
    prompt_ids = chat.render_prompt(pair.prompt, tokenizer)
    answers = []
    for field, text in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        full = chat.render(pair.prompt + [{"role": "assistant", "content": text}], tokenizer, index=index).ids
        if full[: len(prompt_ids)] != prompt_ids or len(full) <= len(prompt_ids):
            raise ValueError(f"{_where(index)}: the rendered prompt ({len(prompt_ids)} ids) is not a prefix of the "
                             f"rendered prompt + {field} ({len(full)} ids). Fix: use a tokenizer whose chat format "
                             "renders the prompt the same way alone and before an answer.")
        answers.append(full[len(prompt_ids):])
    return RenderedPair(prompt_ids, answers[0], answers[1])


# ----------------------------------------------------------------------------------------------- batching
@dataclasses.dataclass
class PairStats:
    """Counts over the pairs seen by ``pack_pairs``."""

    pairs: int = 0
    dropped: int = 0  # chosen or rejected sequence longer than seq_len positions


def side_arrays(ids: Sequence[int], mask: Sequence[bool]) -> dict[str, np.ndarray]:
    """One document: ``tokens = ids[:-1]``, ``targets = ids[1:]``, ``weights = mask[1:]``, positions ``0..n-2``."""
    a = np.asarray(ids, np.int32)
    return dict(tokens=a[:-1], targets=a[1:], weights=np.asarray(mask[1:], np.float32),
                positions=np.arange(len(a) - 1, dtype=np.int32))


def empty_row(seq_len: int, pairs_per_row: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """A row with no pair (weights 0, ``pair_mask`` 0): padding of a last partial batch."""
    row = {k: np.zeros((2, seq_len), dt) for k, dt in SIDE_DTYPES.items()}
    row["tokens"][:] = pad_id
    row["targets"][:] = pad_id
    row["pair_mask"] = np.zeros((pairs_per_row,), np.float32)
    return row


def pack_pairs(rendered: Iterable[RenderedPair], seq_len: int, pairs_per_row: int = 1, pad_id: int = 0,
               stats: PairStats | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Put pairs into rows of ``[2, seq_len]`` (next-fit, in order), at most ``pairs_per_row`` per row.

    Pair ``k`` of a row is segment ``k + 1`` on both sides. A pair whose chosen or rejected sequence has more than
    ``seq_len + 1`` ids is dropped (``stats.dropped``), never truncated.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} is too short for a prompt and an answer. Fix: use seq_len >= 2.")
    if pairs_per_row < 1:
        raise ValueError(f"pairs_per_row={pairs_per_row}. Fix: use pairs_per_row >= 1.")
    stats = stats if stats is not None else PairStats()
    row: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
    used = [0, 0]

    def flush() -> dict[str, np.ndarray]:
        out = empty_row(seq_len, pairs_per_row, pad_id)
        at = [0, 0]
        for k, docs in enumerate(row):
            out["pair_mask"][k] = 1.0
            for s, doc in enumerate(docs):
                n = len(doc["tokens"])
                for key in ("tokens", "targets", "weights", "positions"):
                    out[key][s, at[s]:at[s] + n] = doc[key]
                out["segment_ids"][s, at[s]:at[s] + n] = k + 1
                at[s] += n
        return out

    for rp in rendered:
        stats.pairs += 1
        docs = tuple(side_arrays(*rp.sequence(s)) for s in (0, 1))
        n = [len(d["tokens"]) for d in docs]
        if max(n) > seq_len:
            stats.dropped += 1
            continue
        if row and (len(row) == pairs_per_row or used[0] + n[0] > seq_len or used[1] + n[1] > seq_len):
            yield flush()
            row, used = [], [0, 0]
        row.append(docs)
        used = [used[0] + n[0], used[1] + n[1]]
    if row:
        yield flush()


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack row dicts into a batch dict (``[B, 2, T]`` sides and ``pair_mask [B, P]``)."""
    return {k: np.stack([r[k] for r in rows]) for k in (*SIDE_DTYPES, "pair_mask")}


class PreferenceBatches(EpochBatches):
    """Resumable iterator of pair batches (the layout in the module docstring) over epochs of a preference set.

    Pairs are rendered once and kept in memory; each epoch shuffles their order with ``(seed, epoch)`` and packs them.
    ``get_state()`` / ``set_state()`` capture the position (``data.chat.ChatBatches``' interface). With several
    processes each yields rows ``process_index::process_count`` of every global batch. A last partial batch is
    filled with empty rows (``pair_mask`` 0).

    Args:
      records: raw records (any layout ``to_pair`` accepts).
      tokenizer: the model's tokenizer.
      seq_len: positions per sequence (a pair needs both its sequences to fit).
      batch_size: global rows per batch.
      pairs_per_row: pairs packed per row (1 = one right-padded pair per row).
      shuffle, seed, loop, process_index, process_count: as ``ChatBatches``.
      skip_invalid: drop records that fail ``to_pair`` / rendering (counted in ``self.invalid``) instead of raising.

    Attributes:
      stats: ``PairStats`` of the current epoch (``dropped``: pairs that do not fit ``seq_len``).
    """

    def __init__(self, records: Iterable[Mapping[str, Any]], tokenizer: chat.TokenizerLike, seq_len: int,
                 batch_size: int, *, pairs_per_row: int = 1, shuffle: bool = True, seed: int = 0, loop: bool = True,
                 process_index: int = 0, process_count: int = 1, skip_invalid: bool = False):
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} is not divisible by the {process_count} processes. "
                             "Fix: make config.batch_size a multiple of jax.process_count().")
        self.rendered: list[RenderedPair] = []
        self.invalid = 0
        for i, rec in enumerate(records):
            try:
                self.rendered.append(render_pair(to_pair(rec, i), tokenizer, i))
            except ValueError as e:
                if not skip_invalid:
                    raise
                if not self.invalid:
                    log.warning("skipping invalid preference records (config.data.skip_invalid); first: %s", e)
                self.invalid += 1
        if not self.rendered:
            raise ValueError("the preference dataset is empty. Fix: check config.data.train and its split.")
        self.seq_len, self.batch_size, self.pairs_per_row = seq_len, batch_size, pairs_per_row
        self.shuffle, self.seed, self.loop = shuffle, seed, loop
        self.process_index, self.process_count = process_index, process_count
        self.pad_id = getattr(tokenizer, "pad_id", 0)
        self.epoch, self.batch_in_epoch = 0, 0
        self.stats = PairStats()
        self._epoch_batches: list[dict[str, np.ndarray]] | None = None

    def _build_epoch(self) -> list[dict[str, np.ndarray]]:
        order = self._order(len(self.rendered))
        self.stats = PairStats()
        rows = list(pack_pairs((self.rendered[i] for i in order), self.seq_len, self.pairs_per_row, self.pad_id,
                               self.stats))
        if self.stats.dropped:
            log.warning("dropped %d of %d preference pairs longer than seq_len=%d", self.stats.dropped,
                        self.stats.pairs, self.seq_len)
        if not rows:
            raise ValueError(f"every preference pair was dropped: none fits seq_len={self.seq_len}. "
                             "Fix: raise config.data.seq_len.")
        return self._batches(rows, lambda: empty_row(self.seq_len, self.pairs_per_row, self.pad_id), stack_rows)


def preference_batches(data_cfg: Any, tokenizer: chat.TokenizerLike, batch_size: int, *, split: str = "train",
                       seed: int = 0, loop: bool = True, process_index: int = 0, process_count: int = 1
                       ) -> PreferenceBatches:
    """``PreferenceBatches`` from a run config's ``data`` block (``format == "preference"``).

    Reads ``data.train`` / ``data.validation`` (see ``load_records``; ``"bundled"`` for this project's set),
    ``data.train_split`` / ``data.validation_split``, ``data.hub_config``, ``data.seq_len``, ``data.shuffle`` and,
    when present, ``data.pairs_per_row`` (default 1), ``data.max_pairs`` (0 = all), ``data.skip_invalid``.
    """
    source = data_cfg.train if split == "train" else data_cfg.validation
    hub_split = data_cfg.train_split if split == "train" else data_cfg.validation_split
    records: Iterable[Mapping[str, Any]] = load_records(source, hub_split, data_cfg.get("hub_config", ""))
    max_pairs = int(data_cfg.get("max_pairs", 0) or 0)
    if max_pairs:
        records = itertools.islice(records, max_pairs)
    return PreferenceBatches(records, tokenizer, int(data_cfg.seq_len), batch_size,
                             pairs_per_row=int(data_cfg.get("pairs_per_row", 1) or 1),
                             shuffle=bool(data_cfg.shuffle) and split == "train", seed=seed, loop=loop,
                             process_index=process_index, process_count=process_count,
                             skip_invalid=bool(data_cfg.get("skip_invalid", False)))
