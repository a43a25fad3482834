"""Mistral chat template: exact ids and answer-only loss masks, validation, truncation, packing, resumable batches."""

from __future__ import annotations

import numpy as np
import pytest

from mistral_jax.data import chat


class WordTokenizer:
    """Whitespace tokenizer with a fixed vocabulary, so expected ids can be written by hand."""

    bos_id, eos_id, pad_id = 1, 2, 0
    VOCAB = {"[INST]": 3, "[/INST]": 4, "hi": 5, "hello": 6, "how": 7, "are": 8, "you?": 9, "fine.": 10, "be": 11,
             "brief.": 12, "ok": 13}

    def encode(self, text, bos=True, eos=False):
        return [self.bos_id] * bos + [self.VOCAB[w] for w in text.split()] + [self.eos_id] * eos


TOK = WordTokenizer()
U = lambda t: {"role": "user", "content": t}  # noqa: E731
A = lambda t: {"role": "assistant", "content": t}  # noqa: E731
S = lambda t: {"role": "system", "content": t}  # noqa: E731

SINGLE = [U("hi"), A("hello")]
MULTI = [U("hi"), A("hello"), U("how are you?"), A("fine.")]
SYSTEM = [S("be brief."), U("hi"), A("hello"), U("ok"), A("fine.")]


# Hand-written: <s> [INST] user [/INST] answer </s> [INST] ... ; the loss covers answers and their </s>.
@pytest.mark.parametrize("messages, ids, mask", [
    (SINGLE, [1, 3, 5, 4, 6, 2],
             [0, 0, 0, 0, 1, 1]),
    (MULTI, [1, 3, 5, 4, 6, 2, 3, 7, 8, 9, 4, 10, 2],
            [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1]),
    # the system prompt is folded into the first user turn only
    (SYSTEM, [1, 3, 11, 12, 5, 4, 6, 2, 3, 13, 4, 10, 2],
             [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1]),
], ids=["single", "multi_turn", "system_prompt"])
def test_render_exact_ids_and_mask(messages, ids, mask):
    r = chat.render(messages, TOK)
    assert r.ids == ids
    assert [int(m) for m in r.loss_mask] == mask


def test_example_arrays_shift_mask_to_targets():
    d = chat.example_arrays(chat.render(SINGLE, TOK))
    np.testing.assert_array_equal(d["tokens"], [1, 3, 5, 4, 6])
    np.testing.assert_array_equal(d["targets"], [3, 5, 4, 6, 2])
    np.testing.assert_array_equal(d["weights"], [0, 0, 0, 1, 1])  # predict "hello" and </s> only
    np.testing.assert_array_equal(d["positions"], [0, 1, 2, 3, 4])


def test_render_prompt_ends_with_open_instruction():
    assert chat.render_prompt([S("be brief."), U("hi")], TOK) == [1, 3, 11, 12, 5, 4]
    assert chat.render_prompt([U("hi"), A("hello"), U("ok")], TOK) == [1, 3, 5, 4, 6, 2, 3, 13, 4]


@pytest.mark.parametrize("messages, match", [
    ([A("hello")], r"conversation 7, message 0: expected role 'user' but got 'assistant'"),
    ([U("hi"), U("hi"), A("hello")], r"conversation 7, message 1: expected role 'assistant' but got 'user'"),
    ([S("be brief."), U("hi"), A("hello"), A("hello")], r"conversation 7, message 3: expected role 'user'"),
    ([U("hi"), A("hello"), U("ok")], r"conversation 7: the last message must be the assistant's answer"),
    ([U("hi"), {"role": "bot", "content": "x"}], r"conversation 7, message 1: unknown role 'bot'"),
    ([U("hi"), A("  ")], r"conversation 7, message 1 \(assistant\): content must be a non-empty string"),
    ([S("be brief.")], r"conversation 7: has a system message but no user message"),
    ([], r"conversation 7: expected a non-empty list"),
])
def test_validation_errors_name_the_conversation(messages, match):
    with pytest.raises(ValueError, match=match):
        chat.render(messages, TOK, index=7)


def test_truncation_keeps_whole_turns_and_never_a_bare_prompt():
    r = chat.render(MULTI, TOK)  # 13 ids; first turn ends at 6
    t = chat.truncate(r, 9)  # room for turn 1 only: turn 2 dropped whole
    assert t.ids == [1, 3, 5, 4, 6, 2] and [int(m) for m in t.loss_mask] == [0, 0, 0, 0, 1, 1]
    t = chat.truncate(r, 5)  # first turn does not fit: keep its prompt + the first answer token
    assert t.ids == [1, 3, 5, 4, 6] and [int(m) for m in t.loss_mask] == [0, 0, 0, 0, 1]
    assert chat.truncate(r, 4) is None  # the prompt alone would fit: dropped instead
    assert chat.truncate(r, 13) is r


def test_pack_segments_positions_weights():
    stats = chat.PackStats()
    rows = list(chat.pack([chat.render(SINGLE, TOK)] * 2 + [chat.render(MULTI, TOK)], seq_len=12, stats=stats))
    assert len(rows) == 2  # two singles (5 + 5 positions) share a row; the 12-position multi-turn needs its own
    r0, r1 = rows
    np.testing.assert_array_equal(r0["tokens"], [1, 3, 5, 4, 6, 1, 3, 5, 4, 6, 0, 0])
    np.testing.assert_array_equal(r0["targets"], [3, 5, 4, 6, 2, 3, 5, 4, 6, 2, 0, 0])
    np.testing.assert_array_equal(r0["weights"], [0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(r0["positions"], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 0])
    np.testing.assert_array_equal(r0["segment_ids"], [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0])
    np.testing.assert_array_equal(r1["tokens"], [1, 3, 5, 4, 6, 2, 3, 7, 8, 9, 4, 10])
    np.testing.assert_array_equal(r1["weights"], [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(r1["segment_ids"], [1] * 12)
    assert {k: v.dtype for k, v in r0.items()} == {k: np.dtype(v) for k, v in chat.BATCH_DTYPES.items()}
    assert (stats.conversations, stats.truncated, stats.dropped) == (3, 0, 0)


def test_pack_truncates_and_drops():
    stats = chat.PackStats()
    rows = list(chat.pack([chat.render(MULTI, TOK), chat.render(SINGLE, TOK)], seq_len=8, stats=stats))
    assert (stats.truncated, stats.dropped) == (1, 0)
    np.testing.assert_array_equal(rows[0]["tokens"], [1, 3, 5, 4, 6, 0, 0, 0])  # multi-turn cut to its first turn
    stats = chat.PackStats()
    assert list(chat.pack([chat.render(SYSTEM, TOK)], seq_len=5, stats=stats)) == []  # 6-id prompt cannot fit
    assert stats.dropped == 1


def test_chat_batches_resume_and_process_split():
    convs = [SINGLE, MULTI, SYSTEM] * 5
    it = chat.ChatBatches(convs, TOK, seq_len=16, batch_size=2, seed=3)
    n = it.batches_per_epoch()
    seen = [next(it) for _ in range(n + 2)]  # crosses into epoch 1
    assert it.get_state() == {"epoch": 1, "batch_in_epoch": 2}
    resumed = chat.ChatBatches(convs, TOK, seq_len=16, batch_size=2, seed=3)
    resumed.set_state({"epoch": 0, "batch_in_epoch": n - 1})
    for want in seen[n - 1:]:
        got = next(resumed)
        for k in chat.BATCH_DTYPES:
            np.testing.assert_array_equal(got[k], want[k])
    assert seen[0]["tokens"].shape == (2, 16)
    # every answer token of the epoch appears exactly once: 5 * (2 + 4 + 4) weighted targets
    assert sum(float(b["weights"].sum()) for b in seen[:n]) == 50
    # two processes each keep one row of every global batch
    halves = [chat.ChatBatches(convs, TOK, seq_len=16, batch_size=2, seed=3, process_index=i, process_count=2)
              for i in range(2)]
    a, b = next(halves[0]), next(halves[1])
    np.testing.assert_array_equal(np.concatenate([a["tokens"], b["tokens"]]), seen[0]["tokens"])
    # eval mode: one pass, then StopIteration
    once = chat.ChatBatches(convs, TOK, seq_len=16, batch_size=2, seed=3, loop=False)
    assert len(list(once)) == n


def test_invalid_conversations_raise_or_are_skipped():
    convs = [SINGLE, [U("hi")], MULTI]
    with pytest.raises(ValueError, match="conversation 1: the last message must be the assistant's answer"):
        chat.ChatBatches(convs, TOK, seq_len=16, batch_size=1)
    it = chat.ChatBatches(convs, TOK, seq_len=16, batch_size=1, skip_invalid=True)
    assert it.invalid == 1
    assert [r.ids for r in it.rendered] == [[1, 3, 5, 4, 6, 2], [1, 3, 5, 4, 6, 2, 3, 7, 8, 9, 4, 10, 2]]


def test_dataset_layouts_and_data_config_fields(tmp_path):
    import json

    from ml_collections import ConfigDict

    rows = [
        {"dialog": [U("hi"), A("hello")]},  # custom column, set by data.messages_field
        {"dialog": [{"from": "system", "value": "be brief."}, {"from": "human", "value": "hi"},
                    {"from": "gpt", "value": "hello"}]},  # ShareGPT
        {"instruction": "hi", "input": "ok", "output": "fine."},  # Alpaca: input appended after a blank line
        {"dialog": [U("hi"), U("hi")]},  # invalid: dropped with data.skip_invalid
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(chat.load_conversations(str(path), messages_field="dialog"))[1:3] == [
        [S("be brief."), U("hi"), A("hello")], [U("hi\n\nok"), A("fine.")]]
    data = ConfigDict(dict(train=str(path), train_split="train", hub_config="", messages_field="dialog", seq_len=16,
                           shuffle=False, max_conversations=0, skip_invalid=True))
    it = chat.chat_batches(data, TOK, batch_size=1)
    assert it.invalid == 1 and [r.ids for r in it.rendered] == [
        [1, 3, 5, 4, 6, 2], [1, 3, 11, 12, 5, 4, 6, 2], [1, 3, 5, 13, 4, 10, 2]]
    data.max_conversations = 2
    assert len(chat.chat_batches(data, TOK, batch_size=1).rendered) == 2
    data.max_conversations, data.skip_invalid = 0, False
    with pytest.raises(ValueError, match="conversation 3, message 1: expected role 'assistant'"):
        chat.chat_batches(data, TOK, batch_size=1)
    data.messages_field = "messages"
    with pytest.raises(ValueError, match=r"example has no 'messages'.*Fix: set config.data.messages_field"):
        chat.chat_batches(data, TOK, batch_size=1)


def test_bundled_set_with_sentencepiece(make_tokenizer):
    from mistral_jax.data.tokenizer import Tokenizer

    convs = list(chat.load_conversations("bundled"))
    assert len(convs) >= 100 and len(list(chat.load_conversations("bundled", "validation"))) >= 10
    tok = Tokenizer(make_tokenizer(extra_symbols=("[INST]", "[/INST]")))  # [INST] and [/INST]: one piece each
    messages = [S("You are a polite assistant."), U("Say hello."), A("Hello!"), U("Say goodbye."), A("Goodbye!")]
    r = chat.render(messages, tok)
    enc = lambda s: tok.encode(s, bos=False)  # noqa: E731
    assert r.ids == ([tok.bos_id] + enc("[INST] You are a polite assistant.\n\nSay hello. [/INST]") + enc("Hello!")
                     + [tok.eos_id] + enc("[INST] Say goodbye. [/INST]") + enc("Goodbye!") + [tok.eos_id])
    ids = np.asarray(r.ids)
    mask = np.asarray(r.loss_mask)
    assert (ids[mask] == tok.eos_id).sum() == 2 and ids[-1] == tok.eos_id
    assert tok.decode([i for i in ids[mask] if i != tok.eos_id]) == "Hello! Goodbye!"
    prompts = "[INST] You are a polite assistant.\n\nSay hello. [/INST] [INST] Say goodbye. [/INST]"
    assert tok.decode(ids[~mask]) == prompts
    assert tok.piece_to_id("[INST]") in ids[~mask] and tok.piece_to_id("[INST]") not in ids[mask]


# ----------------------------------------------------------------------------------------------- mistral-common
# Issue 17: Mistral's real tokenizers render through mistral-common; the oracle is its encode_chat_completion on
# the same conversations (training: ValidationMode.finetuning, the last message an answer; prompts: test mode).
MC_CONVERSATIONS = [
    [U("hi"), A("hello")],
    [S("Be brief."), U("What is 2+2?"), A("4."), U("And 3+3?"), A("6.")],
    [U("東京はどこですか？ Ünïcödé — 🙂"), A("日本の首都です。"), U("한국어도 돼요?"), A("네, 됩니다. ✓")],
    [U("  leading and trailing spaces  "), A("  answer with spaces  "), U("\ttab\nnewline\n"), A("\nok\n")],
    [U("literal <s> and </s> and [INST] x [/INST] text"), A("sure: <s>[INST]</s>[/INST]")],
    [S("system with [INST] and <s> inside\n"), U("a\n\nb"), A("c"), U("d"), A("e"), U("f"), A("g")],
]
MC_NAMES = [("mistral:v1", "v1"), ("mistral:v3", "v3"), ("mistral:tekken", "tekken")]
MC_ALL = MC_NAMES + [("mistral:v2", "v2"), ("mistral:v7", "v7")]  # the other shipped versions render too


def _mistral_common(version, mode):
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    mt = MistralTokenizer.v3(is_tekken=True) if version == "tekken" else getattr(MistralTokenizer, version)()
    return MistralTokenizer(mt.instruct_tokenizer, validator=_validator(mt, getattr(ValidationMode, mode)),
                            request_normalizer=mt._instruct_request_normalizer)


def _validator(mt, mode):
    from mistral_common.protocol.instruct.validator import get_validator

    return get_validator(mt.instruct_tokenizer.tokenizer.version, mode)


def _mc_ids(mt, messages, prefix=None):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    msgs = [kinds[m["role"]](content=m["content"]) for m in messages]
    if prefix is not None:
        msgs.append(AssistantMessage(content=prefix, prefix=True))
    return mt.encode_chat_completion(ChatCompletionRequest(messages=msgs)).tokens


@pytest.fixture(scope="module")
def mistral_toks():
    from mistral_jax.data.tokenizer import Tokenizer

    return {name: Tokenizer(name) for name, _ in MC_ALL}


@pytest.mark.parametrize("name, version", MC_ALL)
@pytest.mark.parametrize("conv", range(len(MC_CONVERSATIONS)))
def test_training_ids_and_loss_mask_are_mistral_commons(name, version, conv, mistral_toks):
    messages = MC_CONVERSATIONS[conv]
    tok = mistral_toks[name]
    ref = _mistral_common(version, "finetuning")
    r = chat.render(messages, tok)
    assert r.ids == _mc_ids(ref, messages)
    # the mask covers exactly mistral-common's assistant segments (answer + </s>), in order
    from mistral_common.protocol.instruct.messages import AssistantMessage

    answers = [ref.instruct_tokenizer.encode_assistant_message(AssistantMessage(content=m["content"]), False)
               for m in messages if m["role"] == "assistant"]
    runs, cur = [], []
    for i, m in zip(r.ids, r.loss_mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    assert runs == answers and all(a[-1] == tok.eos_id for a in answers)
    assert r.turn_ends[-1] == len(r.ids) and len(r.turn_ends) == len(answers)
    # user-typed control text stays text: the special ids are exactly the format's own
    if version in ("v2", "v7"):
        return
    n_turns = len(answers)
    specials = [i for i in r.ids if tok.is_special(i)]
    want = [tok.bos_id] + ([tok.eos_id] * n_turns if version == "v1" else
                           [tok.piece_to_id("[INST]"), tok.piece_to_id("[/INST]"), tok.eos_id] * n_turns)
    assert sorted(specials) == sorted(want)


@pytest.mark.parametrize("name, version", MC_ALL)
@pytest.mark.parametrize("conv", range(len(MC_CONVERSATIONS)))
def test_generation_prompt_is_mistral_commons(name, version, conv, mistral_toks):
    messages = MC_CONVERSATIONS[conv][:-1]
    tok = mistral_toks[name]
    ref = _mistral_common(version, "test")
    ids = chat.render_prompt(messages, tok)
    assert ids == _mc_ids(ref, messages)
    assert chat.render_open(messages, tok) == ids
    # an open answer to continue (lm-eval, add_generation_prompt=False): mistral-common's prefix message
    assert chat.render_open(MC_CONVERSATIONS[conv], tok, add_generation_prompt=False) == _mc_ids(
        ref, messages, prefix=MC_CONVERSATIONS[conv][-1]["content"])


@pytest.mark.parametrize("name, version", MC_NAMES)
@pytest.mark.oracle
def test_eval_backend_chat_path_is_mistral_commons(name, version, mistral_toks):
    """eval.py --apply_chat_template: lm-eval renders with apply_chat_template, then tok_encode's the text (and
    the text + a continuation); the ids are mistral-common's, literal <s> / [INST] included."""
    from flax import nnx

    import mistral_jax as mj
    from mistral_jax.evals.lm import MistralJaxLM

    tok = mistral_toks[name]
    model = mj.Transformer(mj.ModelConfig.tiny(vocab_size=tok.vocab_size, n_layers=1), rngs=nnx.Rngs(0))
    lm = MistralJaxLM(model=model, tokenizer=tok)
    ref = _mistral_common(version, "test")
    for conv in MC_CONVERSATIONS:
        prompt = conv[:-1]
        text = lm.apply_chat_template(prompt, add_generation_prompt=True)
        assert lm.tok_encode(text) == _mc_ids(ref, prompt), conv
        # a continuation after the template's delimiter (v1: " answer", v3 / tekken: "answer") is the answer
        cont = " Paris" if version == "v1" else "Paris"
        assert lm.tok_encode(text + cont) == _mc_ids(ref, prompt, prefix="Paris"), conv
        text = lm.apply_chat_template(conv, add_generation_prompt=False)
        assert lm.tok_encode(text) == _mc_ids(ref, prompt, prefix=conv[-1]["content"]), conv
    assert lm.apply_chat_template([U("hi <s>")]) == (
        "<s>[INST] hi <s> [/INST]" if version == "v1" else "<s>[INST]hi <s>[/INST]")


def test_v3_format_by_hand(mistral_toks):
    """v3: control ids [INST]=3 / [/INST]=4 with no spaces around them; the system prompt before the last user."""
    tok = mistral_toks["mistral:v3"]
    r = chat.render([S("sys"), U("a"), A("b"), U("c"), A("d")], tok)
    enc = lambda s: tok.encode(s, bos=False)  # noqa: E731
    assert r.ids == [1, 3] + enc("a") + [4] + enc("b") + [2, 3] + enc("sys\n\nc") + [4] + enc("d") + [2]
    assert tok.chat_text(r.ids) == "<s>[INST]a[/INST]b</s>[INST]sys\n\nc[/INST]d</s>"
