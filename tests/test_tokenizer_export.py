"""The HF export's tokenizer gives mistral-common's ids: ``tokenizer(text).input_ids`` of the exported
``tokenizer.json`` (loaded by transformers) equals mistral-common's ``encode(text, bos=True, eos=False)`` on
whitespace runs of 1 to 64 spaces, tabs, newlines and mixes, unicode and deeply indented code, and decodes back.

The oracle is mistral-common (which runs sentencepiece for v1 - v3, tiktoken for tekken).
"""

from __future__ import annotations

import random

import pytest

import mistral_jax as mj
from mistral_jax.config import ModelConfig
from mistral_jax.convert import hf, tokenizer_files

_WORDS = ["foo", "return", "x=1", "(", ")", "**", "----", "é", "naïve", "東京", "日本語", "🙂", "👍🏽", "Ωμέγα",
          "مرحبا", "e\u0301", "ab", "a"]


def _texts() -> list[str]:
    """About 700 fixed texts: runs of 1 to 64 of each whitespace alone, between words and at the ends, mixed
    runs, unicode and code."""
    texts = []
    for ws in (" ", "\t", "\n", " \t", "\n  ", "\r\n"):
        for n in range(1, 65):
            run = (ws * n)[:n]  # n characters
            texts.append(f"x{run}y")
            if len(ws) == 1 and n % 3 == 0:
                texts += [run, f"{run}def f():", f"end{run}", f"東京{run}🙂"]
    code = "class A:\n" + "".join(" " * (4 * d) + f"if x{d}:  # depth {d}\n" for d in range(1, 16)) + " " * 64
    nested = "{\n" + "".join(" " * (2 * d) + f'"k{d}": [\n' for d in range(20)) + "}"
    texts += [code + "pass\n", code.replace("    ", "\t") + "pass", nested]
    texts += ["Hello, world!", "東京 🙂 Ünïcödé", "naïve café — “quotes” ‘single’", "日本語のテキストです。",
              "😀😃😄👍🏽🏳️‍🌈", "Ωμέγα ελληνικά", "مرحبا بالعالم", "e\u0301 vs é", "\u00a0non-breaking\u00a0spaces",
              "zero\u200bwidth", "tab\tand\nnewline\r\n", "  leading spaces", "trailing spaces   ", ""]
    rng = random.Random(0)
    for _ in range(60):
        texts.append("".join(rng.choice(_WORDS) + rng.choice([" ", "\t", "\n", "\r\n", "  \t"]) * rng.randint(1, 40)
                             for _ in range(rng.randint(2, 8))))
    return list(dict.fromkeys(texts))  # each text once


def _export(name: str, out) -> tuple[mj.Tokenizer, str]:
    """The tokenizer files of an HF export of the tokenizer ``name`` in ``out`` (what ``hf.write`` writes)."""
    tok = mj.Tokenizer(name)
    kind = tokenizer_files.copy_tokenizer(tok, str(out))
    hf.write_tokenizer_files(str(out), ModelConfig.tiny(vocab_size=tok.vocab_size), kind, tok.path)
    return tok, kind


@pytest.mark.parametrize("name", ["mistral:v1", "mistral:v3", "mistral:tekken"])
@pytest.mark.heavy
@pytest.mark.oracle
def test_hf_export_tokenizer_ids_are_mistral_commons(name, tmp_path):
    import transformers
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tok, kind = _export(name, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    # tekken: mistral_format=False reads tokenizer.json (by default transformers would run mistral-common itself)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, **({"mistral_format": False} if kind == "tekken"
                                                                     else {}))
    assert type(hf_tok).__name__ != "MistralCommonBackend"
    ref = MistralTokenizer.from_file(tok.path).instruct_tokenizer.tokenizer
    texts = _texts()
    assert len(texts) >= 200
    wrong = [t for t in texts if hf_tok(t).input_ids != ref.encode(t, bos=True, eos=False)]
    assert not wrong, f"{len(wrong)} of {len(texts)} texts get other ids, e.g. {wrong[:3]!r}"
    undecoded = [t for t in texts if hf_tok.decode(ref.encode(t, bos=False, eos=False)) != t]
    assert not undecoded, f"{len(undecoded)} of {len(texts)} texts decode otherwise, e.g. {undecoded[:3]!r}"


def test_sentencepiece_tokenizer_json_refuses_merges_that_split_whitespace_runs_otherwise(monkeypatch):
    """The export checks its tokenizer.json on whitespace runs against sentencepiece: with merges of tied scores
    in an order that splits long runs otherwise, no tokenizer.json is written (transformers then reads
    tokenizer.model)."""
    tok = mj.Tokenizer("mistral:v3")
    assert tokenizer_files.sentencepiece_tokenizer_json(tok) is not None
    # shortest left part first (1+1, 1+2, 1+3 ...): other splits of long runs than sentencepiece's
    monkeypatch.setattr(tokenizer_files, "_run_rank", lambda merge: (len(merge[1]), len(merge[2]), 0))
    assert tokenizer_files.sentencepiece_tokenizer_json(tok) is None
