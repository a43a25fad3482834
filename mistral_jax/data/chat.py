"""Instruction data: Mistral's chat formats, answer-only loss masks, truncation and packing into SFT batches.

Conversations are rendered by ``mistral-common``, Mistral's own library, whenever the tokenizer is a
``mistral_jax.Tokenizer`` (sentencepiece or tekken): its instruct tokenizer for the tokenizer's version
(``Tokenizer.instruct_version``) encodes each message on its own, and those per-message segments are the
loss mask's source (never a search of the rendered string)::

    v1 (Mistral 7B v0.1, Mixtral 8x7B):
        <s>[INST] {system}\\n\\n{user_1} [/INST] {answer_1}</s>[INST] {user_2} [/INST]...
        (text "[INST]" tokenised as ordinary text; the system prompt folded into the first user turn)
    v3 (7B v0.3, Mixtral 8x22B, NeMo/tekken):
        <s>[INST]{user_1}[/INST]{answer_1}</s>[INST]{system}\\n\\n{user_n}[/INST]...
        ([INST] = 3, [/INST] = 4 control ids; the system prompt goes before the *last* user turn)

Segments and the loss:

* ``<s>`` and every user / system segment         -> no loss
* every assistant segment (its ids + ``</s>``)     -> loss (the model learns to answer and to stop)

Text typed by users is only ever passed to the tokenizer's ``encode``, which never produces control ids, so a
literal ``<s>``, ``</s>`` or ``[INST]`` in a message stays text on every path (train, generate, eval).

A tokenizer that is not a ``mistral_jax.Tokenizer`` (anything with ``encode(text, bos, eos)``, ``bos_id``,
``eos_id``, as the unit tests' word tokenizer) is rendered with the v1 format by hand, segment by segment, as
mistral-common's ``InstructTokenizerV1`` does.

A rendered conversation of ``n`` ids becomes one packed document of ``n - 1`` positions: ``tokens = ids[:-1]``,
``targets = ids[1:]``, ``weights = mask[1:]``. Documents are packed into rows of ``seq_len`` with ``segment_ids``
(1, 2, ... per row, 0 = padding) and ``positions`` restarting at 0 per document (the ``training.loss`` batch
contract). A conversation longer than a row is cut at a turn boundary (trailing turns dropped); a prompt is never
kept without (at least the start of) its answer.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from mistral_jax import storage
from mistral_jax.data import files
from mistral_jax.data.epochs import EpochBatches

ROLES = ("system", "user", "assistant")
BATCH_DTYPES = dict(tokens=np.int32, targets=np.int32, weights=np.float32, positions=np.int32, segment_ids=np.int32)
log = logging.getLogger(__name__)
BUNDLED_TRAIN = os.path.join(os.path.dirname(__file__), "corpus", "instruct_train.jsonl")
BUNDLED_VALIDATION = os.path.join(os.path.dirname(__file__), "corpus", "instruct_validation.jsonl")
ARITHMETIC = "bundled:arithmetic"  # data.arithmetic's problems, question -> worked answer


class TokenizerLike(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class Turn:
    """One user message and the assistant's answer (``None`` for the open last turn of a generation prompt)."""

    user: str
    answer: str | None


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A tokenised conversation.

    Attributes:
      ids: token ids, starting with BOS.
      loss_mask: ``loss_mask[i]`` is True iff ``ids[i]`` is an assistant-answer token or the EOS ending an answer
        (i.e. the model is trained to *predict* ``ids[i]``).
      turn_ends: ``turn_ends[k]`` = number of ids up to and including turn k's answer (its EOS), for truncation.
    """

    ids: list[int]
    loss_mask: list[bool]
    turn_ends: list[int]


# ----------------------------------------------------------------------------------------------- validation
def _where(index: int | None) -> str:
    return "conversation" if index is None else f"conversation {index}"


def validate(messages: Sequence[Mapping[str, Any]], index: int | None = None, *, for_training: bool = True
             ) -> tuple[str | None, list[Turn]]:
    """Check a ``messages`` list and split it into an optional system prompt and user/assistant turns.

    Rules (Mistral's): an optional ``system`` message first; then ``user`` and ``assistant`` alternate, starting
    with ``user``; for training the last message is an ``assistant`` answer, for a generation prompt it is a
    ``user`` message. Contents are non-empty strings.

    Args:
      messages: ``[{"role": ..., "content": ...}, ...]`` as in HF chat datasets.
      index: position of the conversation in its dataset, quoted in errors.
      for_training: require the conversation to end with an assistant answer.

    Returns:
      ``(system prompt or None, turns)``.

    Raises:
      ValueError: naming the conversation index, the message index and the offending value, with the fix.
    """
    where = _where(index)
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of {{'role', 'content'}} messages, got "
                         f"{messages!r:.200}. Fix: give each example a 'messages' list.")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}, message {i}: expected a dict with 'role' and 'content', got {m!r:.200}. "
                             "Fix: write messages as {'role': 'user', 'content': '...'}.")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}, message {i}: unknown role {m['role']!r}. Fix: use one of {ROLES}.")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise ValueError(f"{where}, message {i} ({m['role']}): content must be a non-empty string, got "
                             f"{m['content']!r:.200}. Fix: drop or fill empty messages.")
    system = None
    rest = list(messages)
    if rest[0]["role"] == "system":
        system, rest = rest[0]["content"], rest[1:]
    offset = len(messages) - len(rest)
    roles = [m["role"] for m in messages]
    for j, m in enumerate(rest):
        want = "user" if j % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"{where}, message {j + offset}: expected role {want!r} but got {m['role']!r} (roles: "
                             f"{roles}). Fix: after an optional system message, user and assistant must alternate, "
                             "starting with user.")
    if not rest:
        raise ValueError(f"{where}: has a system message but no user message (roles: {roles}). Fix: add a user turn.")
    if for_training and rest[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's answer for training (roles: {roles}). "
                         "Fix: drop the trailing user message or add its answer.")
    if not for_training and rest[-1]["role"] != "user":
        raise ValueError(f"{where}: a generation prompt must end with a user message (roles: {roles}). "
                         "Fix: drop the trailing assistant message.")
    turns = [Turn(rest[j]["content"], rest[j + 1]["content"] if j + 1 < len(rest) else None)
             for j in range(0, len(rest), 2)]
    return system, turns


# ----------------------------------------------------------------------------------------------- rendering
def _user_text(turn: Turn, system: str | None, first: bool) -> str:
    content = f"{system}\n\n{turn.user}" if (first and system) else turn.user
    return f"[INST] {content} [/INST]"


def uses_mistral_common(tokenizer: Any) -> bool:
    """True if ``tokenizer`` renders chats through mistral-common (a ``mistral_jax.Tokenizer``)."""
    return hasattr(tokenizer, "instruct_tokenizer") and hasattr(tokenizer, "instruct_version")


def mistral_segments(messages: Sequence[Mapping[str, Any]], tokenizer: Any, *, for_training: bool = True,
                     open_answer: str | None = None, index: int | None = None) -> list[tuple[list[int], str]]:
    """mistral-common's own per-message encoding of a conversation: ``[(ids, role), ...]``, starting with
    ``(<s>, "bos")``; the roles are ``"user"``, ``"system"`` (v7's separate system segments) and ``"assistant"``.

    The conversation is validated (``validate``), normalised by mistral-common's request normaliser for the
    tokenizer's version and each message encoded by the version's instruct tokenizer exactly as its
    ``encode_instruct`` does (which user turn is last / first, where the system prompt goes); the concatenation
    equals ``MistralTokenizer.encode_chat_completion``'s ids.

    Args:
      messages: system?/user/assistant/... messages (see ``validate``).
      tokenizer: a ``mistral_jax.Tokenizer``.
      for_training: the conversation ends with an answer (else with a user message: a generation prompt).
      open_answer: an assistant prefix appended after a generation prompt, encoded without ``</s>`` (mistral-common's
        ``AssistantMessage(prefix=True)``): the start of an answer to continue.
      index: the conversation's index in its dataset, for error messages.
    """
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.normalize import get_normalizer
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    validate(messages, index, for_training=for_training)
    it = tokenizer.instruct_tokenizer
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    msgs = [kinds[m["role"]](content=m["content"]) for m in messages]
    if open_answer is not None:
        msgs.append(AssistantMessage(content=open_answer, prefix=True))
    request = get_normalizer(it.tokenizer.version, it.tokenizer.model_settings_builder).from_chat_completion_request(
        ChatCompletionRequest(messages=msgs))
    first_user, last_user = it.find_first_last_user(request)
    segments: list[tuple[list[int], str]] = [(list(it.start()), "bos")]
    for i, msg in enumerate(request.messages):  # as InstructTokenizerBase.encode_instruct, message by message
        if isinstance(msg, UserMessage):
            ids, _, _ = it.encode_user_message(msg, request.available_tools, i == last_user, i == first_user,
                                               system_prompt=request.system_prompt, force_img_first=True,
                                               settings=request.settings)
            segments.append((list(ids), "user"))
        elif isinstance(msg, AssistantMessage):
            segments.append((list(it.encode_assistant_message(msg, is_before_last_user_message=i < last_user)),
                             "assistant"))
        elif isinstance(msg, SystemMessage):
            ids, _ = it.encode_system_message(msg)
            segments.append((list(ids), "system"))
        else:  # pragma: no cover - validate admits system, user and assistant only
            raise ValueError(f"{_where(index)}: unexpected message {msg!r:.200}")
    return segments


def render(messages: Sequence[Mapping[str, Any]], tokenizer: TokenizerLike, index: int | None = None) -> Rendered:
    """Tokenise a training conversation with Mistral's format and mark the answer tokens for the loss.

    Args:
      messages: system?/user/assistant/... messages ending with an assistant answer (see ``validate``).
      tokenizer: a ``mistral_jax.Tokenizer`` (rendered by mistral-common for its instruct version), or anything
        with ``encode(text, bos, eos)``, ``bos_id``, ``eos_id`` (the v1 format, by hand).
      index: the conversation's index in its dataset, for error messages.

    Returns:
      ``Rendered(ids, loss_mask, turn_ends)``; the mask is True exactly on answer tokens and their EOS.
    """
    if uses_mistral_common(tokenizer):
        ids, mask, ends = [], [], []
        for seg, role in mistral_segments(messages, tokenizer, for_training=True, index=index):
            ids += seg
            mask += [role == "assistant"] * len(seg)
            if role == "assistant":
                ends.append(len(ids))
        return Rendered(ids, mask, ends)
    system, turns = validate(messages, index, for_training=True)
    ids, mask, ends = [tokenizer.bos_id], [False], []
    for k, turn in enumerate(turns):
        prompt = tokenizer.encode(_user_text(turn, system, k == 0), bos=False, eos=False)
        answer = tokenizer.encode(turn.answer, bos=False, eos=False) + [tokenizer.eos_id]
        ids += prompt + answer
        mask += [False] * len(prompt) + [True] * len(answer)
        ends.append(len(ids))
    return Rendered(ids, mask, ends)


def render_prompt(messages: Sequence[Mapping[str, Any]], tokenizer: TokenizerLike) -> list[int]:
    """Ids of a generation prompt (ends with ``[/INST]``): earlier turns rendered as in training, no final answer."""
    if uses_mistral_common(tokenizer):
        return [i for seg, _ in mistral_segments(messages, tokenizer, for_training=False) for i in seg]
    system, turns = validate(messages, for_training=False)
    ids = [tokenizer.bos_id]
    for k, turn in enumerate(turns):
        ids += tokenizer.encode(_user_text(turn, system, k == 0), bos=False, eos=False)
        if turn.answer is not None:
            ids += tokenizer.encode(turn.answer, bos=False, eos=False) + [tokenizer.eos_id]
    return ids


def render_open(messages: Sequence[Mapping[str, Any]], tokenizer: TokenizerLike, add_generation_prompt: bool = True
                ) -> list[int]:
    """Ids of a chat for scoring / generation: a generation prompt, or, when the last message is an assistant's
    and ``add_generation_prompt`` is False, the prompt followed by that answer left open (no ``</s>``) to be
    continued (lm-eval's ``apply_chat_template`` contract)."""
    msgs = list(messages)
    open_answer = None
    if msgs and isinstance(msgs[-1], Mapping) and msgs[-1].get("role") == "assistant" and not add_generation_prompt:
        open_answer = msgs.pop()["content"]
    if uses_mistral_common(tokenizer):
        return [i for seg, _ in mistral_segments(msgs, tokenizer, for_training=False, open_answer=open_answer)
                for i in seg]
    ids = render_prompt(msgs, tokenizer)
    if open_answer is not None:
        ids += tokenizer.encode(open_answer, bos=False, eos=False)
    return ids


def truncate(r: Rendered, max_ids: int, min_answer_tokens: int = 1) -> Rendered | None:
    """Fit a rendered conversation into ``max_ids`` ids without keeping a prompt whose answer is cut away.

    Keeps the longest prefix of whole turns that fits. If not even the first turn fits, keeps its prompt and the
    first ``max_ids - len(prompt)`` answer tokens when that is at least ``min_answer_tokens`` (the cut answer has
    no EOS); otherwise returns None (the conversation is dropped).
    """
    if len(r.ids) <= max_ids:
        return r
    whole = [e for e in r.turn_ends if e <= max_ids]
    if whole:
        n = whole[-1]
        return Rendered(r.ids[:n], r.loss_mask[:n], r.turn_ends[: len(whole)])
    prompt_len = r.loss_mask.index(True)  # BOS + first user segment
    if max_ids - prompt_len >= min_answer_tokens:
        return Rendered(r.ids[:max_ids], r.loss_mask[:max_ids], [])
    return None


# ----------------------------------------------------------------------------------------------- datasets
def to_messages(example: Mapping[str, Any], messages_field: str = "messages") -> list[dict[str, str]]:
    """The ``messages`` list of a dataset example.

    Accepts HF chat datasets (``messages`` / ``conversations`` lists of ``{"role", "content"}``), ShareGPT
    (``{"from": "human"|"gpt"|"system", "value"}``) and Alpaca (``instruction``, optional ``input``, ``output``).
    """
    if messages_field in example:
        msgs = example[messages_field]
    elif "conversations" in example:
        msgs = example["conversations"]
    elif "instruction" in example and "output" in example:
        user = example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": example["output"]}]
    else:
        raise ValueError(f"example has no {messages_field!r}, 'conversations' or 'instruction'/'output' fields (keys: "
                         f"{sorted(example)}). Fix: set config.data.messages_field to the column holding the messages.")
    sharegpt = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    out = []
    for m in msgs:
        if isinstance(m, Mapping) and "from" in m and "value" in m:
            out.append({"role": sharegpt.get(m["from"], m["from"]), "content": m["value"]})
        else:
            out.append(m)
    return out


def load_conversations(source: str, split: str = "train", messages_field: str = "messages",
                       hub_config: str = "") -> Iterator[list[dict[str, str]]]:
    """Yield ``messages`` lists from JSONL / JSON files (path, directory or glob; local or ``gs://`` / ``s3://``) or
    an HF hub dataset name.

    Args:
      source: ``.jsonl``/``.json`` file, directory or glob; ``"bundled"`` for the tiny bundled set;
        ``"bundled:arithmetic"`` for the generated arithmetic problems (``data.arithmetic``) as chats; else a hub
        name.

    Raises:
      FileNotFoundError: a path that does not exist (or a bucket path naming no ``.json*`` file).
      storage.StorageError: a bucket path whose endpoint, bucket or credentials fail (one line with the fix).
      split: hub split (``"validation"`` of ``"bundled"`` is the bundled held-out file).
      messages_field: the column holding the messages (see ``to_messages`` for other accepted layouts).
      hub_config: hub dataset configuration name.
    """
    if source == ARITHMETIC:  # the RL demo's problems as one-turn chats: the answer-format warm start of GRPO
        from mistral_jax.data import arithmetic

        for r in arithmetic.bundled_records(split):
            yield [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        return
    if source == "bundled":
        source = BUNDLED_VALIDATION if split.startswith(("val", "test")) else BUNDLED_TRAIN
    storage.check_bucket(source, "chat data")  # a bucket path: endpoint, bucket, credentials, in one line
    paths = files.json_files(source)
    if paths:
        for path in paths:
            with files.open_text(path) as f:
                if path.endswith(".jsonl"):
                    rows: Iterable[Any] = (json.loads(line) for line in f if line.strip())
                else:
                    rows = json.load(f)
                for row in rows:
                    yield to_messages(row, messages_field)
        return
    if storage.url_scheme(source) is not None or os.path.sep in source and not os.path.exists(source):
        raise FileNotFoundError(f"chat data {source!r} does not exist. Fix: pass a .jsonl file, a directory of them, "
                                "'bundled', or an HF hub dataset name.")
    import datasets  # deferred: heavy import, only for hub datasets

    ds = datasets.load_dataset(source, hub_config or None, split=split, streaming=True)
    for row in ds:
        yield to_messages(row, messages_field)


# ----------------------------------------------------------------------------------------------- packing
@dataclasses.dataclass
class PackStats:
    """Counts over the conversations seen by ``pack``."""

    conversations: int = 0
    truncated: int = 0
    dropped: int = 0


def example_arrays(r: Rendered) -> dict[str, np.ndarray]:
    """One packed document: ``tokens = ids[:-1]``, ``targets = ids[1:]``, ``weights = mask[1:]``, positions 0..n-2."""
    ids = np.asarray(r.ids, np.int32)
    n = len(ids) - 1
    return dict(tokens=ids[:-1], targets=ids[1:], weights=np.asarray(r.loss_mask[1:], np.float32),
                positions=np.arange(n, dtype=np.int32))


def pack(rendered: Iterable[Rendered], seq_len: int, pad_id: int = 0, stats: PackStats | None = None
         ) -> Iterator[dict[str, np.ndarray]]:
    """Pack documents into rows of ``seq_len`` (next-fit, in order); yields one row dict of ``[seq_len]`` arrays.

    A document that does not fit the row's remaining space starts a new row; documents longer than a row are
    ``truncate``d to ``seq_len + 1`` ids first (or dropped). Padding has ``segment_ids`` 0 and weight 0.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} is too short for a prompt and an answer. Fix: use seq_len >= 2.")
    stats = stats if stats is not None else PackStats()
    row: list[dict[str, np.ndarray]] = []
    used = 0

    def flush():
        out = {k: np.zeros((seq_len,), dt) for k, dt in BATCH_DTYPES.items()}
        out["tokens"][:] = pad_id
        out["targets"][:] = pad_id
        at = 0
        for seg, doc in enumerate(row, start=1):
            n = len(doc["tokens"])
            for k in ("tokens", "targets", "weights", "positions"):
                out[k][at:at + n] = doc[k]
            out["segment_ids"][at:at + n] = seg
            at += n
        return out

    for r in rendered:
        stats.conversations += 1
        t = truncate(r, seq_len + 1)
        if t is None:
            stats.dropped += 1
            continue
        stats.truncated += t is not r
        doc = example_arrays(t)
        n = len(doc["tokens"])
        if used + n > seq_len:
            yield flush()
            row, used = [], 0
        row.append(doc)
        used += n
    if row:
        yield flush()


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack row dicts into a ``[B, T]`` batch dict."""
    return {k: np.stack([r[k] for r in rows]) for k in BATCH_DTYPES}


class ChatBatches(EpochBatches):
    """Resumable iterator of packed SFT batches (``[batch_size, seq_len]`` numpy dicts) over epochs of a chat set.

    Conversations are rendered once and kept in memory (instruction sets are small next to pretraining data);
    each epoch shuffles their order with ``seed + epoch`` and packs them. ``get_state()`` / ``set_state()`` (the
    ``data.pipeline.PackedBatches`` interface) capture the position (epoch, batches emitted in the epoch), so a
    resumed run sees exactly the batches it would have seen. With several processes, each one yields rows
    ``process_index::process_count`` of every global batch (``batch_size // process_count`` rows).

    Args:
      conversations: ``messages`` lists.
      tokenizer: the model's tokenizer.
      seq_len: tokens per row.
      batch_size: global rows per batch.
      shuffle: shuffle conversation order each epoch.
      seed: shuffling seed.
      loop: start another epoch at the end (training); else stop after one (eval).
      skip_invalid: drop conversations that fail ``validate`` (counted in ``self.invalid``, first error logged)
        instead of raising.
      process_index: this host's index (``jax.process_index()``).
      process_count: number of hosts.
    """

    def __init__(self, conversations: Iterable[Sequence[Mapping[str, Any]]], tokenizer: TokenizerLike, seq_len: int,
                 batch_size: int, *, shuffle: bool = True, seed: int = 0, loop: bool = True, process_index: int = 0,
                 process_count: int = 1, skip_invalid: bool = False):
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} is not divisible by the {process_count} processes. "
                             "Fix: make config.batch_size a multiple of jax.process_count().")
        self.rendered, self.invalid = [], 0
        for i, m in enumerate(conversations):
            try:
                self.rendered.append(render(m, tokenizer, index=i))
            except ValueError as e:
                if not skip_invalid:
                    raise
                if not self.invalid:
                    log.warning("skipping invalid conversations (config.data.skip_invalid); first: %s", e)
                self.invalid += 1
        if self.invalid:
            log.warning("skipped %d invalid conversations of %d", self.invalid, self.invalid + len(self.rendered))
        if not self.rendered:
            raise ValueError("the chat dataset is empty. Fix: check config.data.train and its split.")
        self.seq_len, self.batch_size, self.shuffle, self.seed, self.loop = seq_len, batch_size, shuffle, seed, loop
        self.process_index, self.process_count = process_index, process_count
        self.pad_id = getattr(tokenizer, "pad_id", 0)
        self.epoch, self.batch_in_epoch = 0, 0
        self.stats = PackStats()
        self._epoch_batches: list[dict[str, np.ndarray]] | None = None

    def _build_epoch(self) -> list[dict[str, np.ndarray]]:
        order = self._order(len(self.rendered))
        self.stats = PackStats()
        rows = list(pack((self.rendered[i] for i in order), self.seq_len, self.pad_id, self.stats))
        if self.stats.dropped == self.stats.conversations:
            raise ValueError(f"every conversation was dropped: no prompt fits seq_len={self.seq_len} with an answer. "
                             "Fix: raise config.data.seq_len.")
        return self._batches(rows, lambda: {k: np.zeros((self.seq_len,), dt) for k, dt in BATCH_DTYPES.items()},
                             stack_rows)


def chat_batches(data_cfg: Any, tokenizer: TokenizerLike, batch_size: int, *, split: str = "train", seed: int = 0,
                 loop: bool = True, process_index: int = 0, process_count: int = 1) -> ChatBatches:
    """``ChatBatches`` from a run config's ``data`` block (``format == "chat"``).

    Reads ``data.train`` / ``data.validation`` (see ``load_conversations``), ``data.train_split`` /
    ``data.validation_split``, ``data.hub_config``, ``data.messages_field``, ``data.seq_len``, ``data.shuffle``.
    """
    source = data_cfg.train if split == "train" else data_cfg.validation
    hub_split = data_cfg.train_split if split == "train" else data_cfg.validation_split
    convs = load_conversations(source, hub_split, data_cfg.get("messages_field", "messages"),
                               data_cfg.get("hub_config", ""))
    max_conv = int(data_cfg.get("max_conversations", 0) or 0)
    if max_conv:
        convs = itertools.islice(convs, max_conv)
    return ChatBatches(convs, tokenizer, int(data_cfg.seq_len), batch_size,
                       shuffle=bool(data_cfg.shuffle) and split == "train", seed=seed, loop=loop,
                       process_index=process_index, process_count=process_count,
                       skip_invalid=bool(data_cfg.get("skip_invalid", False)))
