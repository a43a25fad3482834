"""The OpenAI-compatible server (``mistral_jax.serve``): the official ``openai`` client and lm-eval's
``local-completions`` model against a server started here on 127.0.0.1 with a tiny model (window 8, so prompts and
answers wrap the rolling cache); greedy answers equal ``mj.generate``; continuous batching keeps concurrent requests
apart; disconnects free slots; bad requests get OpenAI-style 4xx answers; nothing recompiles once warm."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest
import requests
from flax import nnx

import mistral_jax as mj
from mistral_jax.inference.detokenize import decode_text
from mistral_jax.serve.app import Server, create_app, encode_prompt
from mistral_jax.serve.engine import Engine, SamplingParams, compile_count
from tests.helpers import IdsTok, submit_all

W = 8  # sliding window: prompts and answers run past it, so the rolling buffer wraps
MAX_LEN = 4096  # long enough that a hung-up stream is cancelled long before max_tokens
NAME = "tiny-serve"
TIMEOUT = 60  # seconds, per HTTP request


@pytest.fixture(scope="module")
def env(tmp_path_factory, tokenizer_path, corpus_tokenizer):
    from mistral_jax.data.corpus import TRAIN

    root = tmp_path_factory.mktemp("serve")
    with open(TRAIN, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tok_path, tok = tokenizer_path, corpus_tokenizer  # the session's shared corpus tokenizer (read-only)
    # initializer_range 0.2: logits spread enough that greedy argmax has no near-ties between batch shapes.
    cfg = mj.ModelConfig.tiny(sliding_window=W, max_seq_len=MAX_LEN, initializer_range=0.2)
    ckpt = str(root / "ckpt")
    mj.save_jax(mj.Transformer(cfg, rngs=nnx.Rngs(0)), ckpt, tokenizer=tok_path)
    model = mj.load_pretrained(ckpt)  # what the CLI does
    compile_count()  # start listening before anything compiles
    # sync_ms 0.2: decode calls of a few steps (a stream in many chunks; multi-step decoding still runs)
    engine = Engine(model, tok, max_batch=4, max_queue=8, sync_ms=0.2).start()
    server = Server(create_app(engine, NAME)).start()
    words = [w for t in texts[:200] for w in t.split()][:5000]
    yield dict(root=root, ckpt=ckpt, tok=tok, tok_path=tok_path, model=model, engine=engine, server=server,
               url=server.url, words=words)
    server.stop()
    engine.stop()


def client(env):
    import openai

    return openai.OpenAI(base_url=env["url"] + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)


def reference(env, ids, max_tokens, stop=()):
    """Sequential ``mj.generate`` (greedy, EOS stops) -> (text, finish_reason, completion tokens)."""
    tok = env["tok"]
    new = mj.generate(env["model"], ids, max_new_tokens=max_tokens, eos_id=tok.eos_id,
                      stop=tuple(stop), tokenizer=tok if stop else None)
    text = decode_text(tok, [t for t in new if t != tok.eos_id])
    cuts = [text.find(s) for s in stop if s in text]
    if cuts:
        return text[:min(cuts)], "stop", len(new)
    return text, "stop" if new[-1] == tok.eos_id or len(new) < max_tokens else "length", len(new)


def prompt_text(env, n_words, seed):
    rng = random.Random(seed)
    start = rng.randrange(len(env["words"]) - n_words)
    return " ".join(env["words"][start:start + n_words])


def wait_idle(env, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = requests.get(env["url"] + "/health", timeout=TIMEOUT).json()
        if s["active"] == 0 and s["waiting"] == 0:
            return s
        time.sleep(0.02)
    raise AssertionError(f"the engine is still busy after {timeout}s: {s}")


# ----------------------------------------------------------------------------- the openai client
@pytest.mark.oracle
def test_openai_completions_equal_generate(env):
    c = client(env)
    prompt = prompt_text(env, 12, 0)
    ids = encode_prompt(env["tok"], prompt)
    text, finish, n = reference(env, ids, 20)
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0)
    assert r.choices[0].text == text and text.strip()
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)
    # streaming: the chunks join to the same text, the last chunk says why it stopped, then [DONE]
    chunks = list(c.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert sum(bool(ch.choices and ch.choices[0].text) for ch in chunks) > 3  # token by token, not one blob
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [finish]
    assert chunks[-1].usage.completion_tokens == n and chunks[-1].usage.prompt_tokens == len(ids)
    # stop strings cut the text (the stop string is not returned) and finish with "stop"
    stop = text[len(text) // 2:][:2]
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=NAME, prompt=prompt, max_tokens=20, temperature=0, stop=[stop], stream=True))
    assert streamed == text[:text.index(stop)]
    # token-id prompts and several prompts in one request (lm-eval batches this way)
    r = c.completions.create(model=NAME, prompt=[ids, ids[:5]], max_tokens=20, temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1] and r.choices[0].text == text
    assert r.choices[1].text == reference(env, ids[:5], 20)[0]


@pytest.mark.oracle
def test_openai_chat_equal_generate(env):
    from mistral_jax.data.chat import render_prompt

    c = client(env)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt_text(env, 6, 1)},
                {"role": "assistant", "content": prompt_text(env, 4, 2)},
                {"role": "user", "content": prompt_text(env, 5, 3)}]
    ids = render_prompt(messages, env["tok"])  # Mistral's [INST] format
    text, finish, n = reference(env, ids, 24)
    r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text and text.strip()
    assert r.choices[0].finish_reason == finish and r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == n and r.object == "chat.completion"
    chunks = list(c.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish and chunks[-1].usage.completion_tokens == n
    # seeded sampling: the same draws as mj.generate with that seed (per-request settings in one batch)
    kw = dict(temperature=0.8, top_p=0.9, seed=7)
    r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=16, extra_body={"top_k": 20}, **kw)
    want = mj.generate(env["model"], ids, max_new_tokens=16, eos_id=env["tok"].eos_id, top_k=20, **kw)
    assert r.choices[0].message.content == decode_text(env["tok"], [t for t in want if t != env["tok"].eos_id])


@pytest.mark.oracle
def test_models_and_health(env):
    models = client(env).models.list()
    assert [m.id for m in models.data] == [NAME]
    h = requests.get(env["url"] + "/health", timeout=TIMEOUT).json()
    assert h["status"] == "ok" and h["max_batch"] == 4


# ----------------------------------------------------------------------------- continuous batching
@pytest.mark.oracle
def test_concurrent_requests_equal_sequential(env):
    """32 requests of different prompt and answer lengths from 8 concurrent clients through 4 slots: each greedy
    answer equals its sequential ``mj.generate``; none lost or mixed up; no compilation while serving."""
    rng = random.Random(0)
    jobs = [(prompt_text(env, rng.randint(1, 40), 100 + i), rng.randint(1, 30)) for i in range(32)]
    want = [reference(env, encode_prompt(env["tok"], p), m) for p, m in jobs]
    wait_idle(env)
    before, steps = compile_count(), env["engine"].stats()
    c = client(env)

    def ask(i):
        p, m = jobs[i]
        if i % 2:  # half streaming, half not
            chunks = list(c.completions.create(model=NAME, prompt=p, max_tokens=m, temperature=0, stream=True))
            return ("".join(ch.choices[0].text for ch in chunks if ch.choices), chunks[-1].choices[0].finish_reason,
                    chunks[-1].usage.completion_tokens)
        r = c.completions.create(model=NAME, prompt=p, max_tokens=m, temperature=0)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens

    start = time.monotonic()
    with cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(32), timeout=300))
    assert time.monotonic() - start < 300
    assert got == want
    after = wait_idle(env)
    assert compile_count() == before, "serving recompiled"
    assert after["tokens"] - steps["tokens"] == sum(n for _, _, n in want)
    assert after["decode_steps"] - steps["decode_steps"] < sum(n for _, _, n in want)  # rows shared steps
    assert after["peak_rows"] >= 3  # several requests decoded in one step


@pytest.mark.oracle
def test_disconnect_frees_slot(env):
    eng = env["engine"]
    wait_idle(env)
    before, compiles = eng.stats(), compile_count()
    body = {"model": NAME, "prompt": prompt_text(env, 5, 9), "max_tokens": MAX_LEN - 20, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with requests.post(env["url"] + "/v1/completions", json=body, stream=True, timeout=TIMEOUT) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few events, then hang up mid-stream
        assert sum(x.startswith(b"data: {\"id\"") for x in got) >= 2, got
    after = wait_idle(env)
    assert after["cancelled"] == before["cancelled"] + 1  # cancelled, not run to max_tokens
    assert after["tokens"] - before["tokens"] < MAX_LEN - 20
    r = client(env).completions.create(model=NAME, prompt="the", max_tokens=5, temperature=0)  # the slot serves again
    assert r.choices[0].finish_reason in ("stop", "length")
    assert compile_count() == compiles


def _error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.oracle
def test_bad_requests_get_4xx_and_the_server_keeps_serving(env):
    url = env["url"] + "/v1/completions"
    ok = {"model": NAME, "prompt": "the", "max_tokens": 4, "temperature": 0}
    assert requests.post(url, json=ok, timeout=TIMEOUT).status_code == 200  # warm: compiled shapes, whatever ran before
    compiles = compile_count()
    r = requests.post(url, data=b'{"prompt": "the", "max_tokens": ', headers={"Content-Type": "application/json"},
                      timeout=TIMEOUT)
    assert _error(r, 400)["code"] == "invalid_json"
    assert _error(requests.post(url, json={**ok, "max_tokens": -1}, timeout=TIMEOUT), 400)["param"] == "max_tokens"
    long_prompt = " ".join(env["words"] * (2 * MAX_LEN // len(env["words"]) + 1))
    err = _error(requests.post(url, json={**ok, "prompt": long_prompt}, timeout=TIMEOUT), 400)
    assert err["code"] == "context_length_exceeded" and str(MAX_LEN) in err["message"]
    assert _error(requests.post(url, json={**ok, "temperature": -0.5}, timeout=TIMEOUT), 400)["param"] == "temperature"
    assert _error(requests.post(url, json={**ok, "top_p": 1.5}, timeout=TIMEOUT), 400)["param"] == "top_p"
    assert _error(requests.post(url, json={**ok, "model": "gpt-4"}, timeout=TIMEOUT), 400)["code"] == "model_not_found"
    assert _error(requests.post(url, json={**ok, "prompt": {"x": 1}}, timeout=TIMEOUT), 400)["param"] == "prompt"
    chat = env["url"] + "/v1/chat/completions"
    assert _error(requests.post(chat, json={"messages": [{"role": "assistant", "content": "hi"}]}, timeout=TIMEOUT),
                  400)["param"] == "messages"
    import openai

    with pytest.raises(openai.BadRequestError):
        client(env).completions.create(model=NAME, prompt="the", max_tokens=-3)
    r = requests.post(url, json=ok, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert compile_count() == compiles


@pytest.mark.oracle
def test_full_queue_answers_429(env):
    eng = env["engine"]
    wait_idle(env)
    ids = encode_prompt(env["tok"], "the")
    params = SamplingParams(max_tokens=MAX_LEN - 10, ignore_eos=True)
    held = [eng.submit(ids, params, lambda ev: None) for _ in range(4)]
    try:
        deadline = time.monotonic() + 10
        while eng.stats()["active"] < 4 and time.monotonic() < deadline:  # 4 running ...
            time.sleep(0.005)
        held += [eng.submit(ids, params, lambda ev: None) for _ in range(8)]  # ... and 8 waiting
        assert eng.stats()["waiting"] == 8
        r = requests.post(env["url"] + "/v1/completions", json={"prompt": "the", "max_tokens": 2}, timeout=TIMEOUT)
        assert _error(r, 429)["type"] == "rate_limit_error"
        assert 1 <= int(r.headers["Retry-After"]) <= 60
    finally:
        for h in held:
            h.cancel()
    wait_idle(env)
    assert client(env).completions.create(model=NAME, prompt="the", max_tokens=2, temperature=0).choices[0].text


@pytest.mark.heavy
def test_overload_answers_429_with_retry_after_never_5xx(env):
    """64 clients at once against 4 slots and a queue of 8: every answer is 200 or 429 (with Retry-After), none
    hangs, and the server serves normally afterwards."""
    wait_idle(env)

    def one(i):
        r = requests.post(env["url"] + "/v1/completions", json={"prompt": prompt_text(env, 6, 500 + i),
                          "max_tokens": 12, "temperature": 0}, timeout=TIMEOUT)
        return r.status_code, r.headers.get("Retry-After")

    before = _metrics(env)
    with cf.ThreadPoolExecutor(64) as ex:
        answers = list(ex.map(one, range(64)))
    codes = [c for c, _ in answers]
    assert set(codes) <= {200, 429} and codes.count(200) >= 12 and codes.count(429) >= 1, codes
    assert all(ra is not None and int(ra) >= 1 for c, ra in answers if c == 429)
    wait_idle(env)
    after = _metrics(env)
    assert after["mistral_jax_requests_rejected_total"] - before["mistral_jax_requests_rejected_total"] == \
        codes.count(429)


def _metrics(env) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(env["url"] + "/metrics", timeout=TIMEOUT).text
    return {s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else ""):
            s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.mark.oracle  # the openai client
def test_metrics_count_requests_tokens_and_latencies(env):
    wait_idle(env)
    before = _metrics(env)
    ids = encode_prompt(env["tok"], prompt_text(env, 9, 77))
    n = 7
    r = client(env).completions.create(model=NAME, prompt=ids, max_tokens=n, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == n
    after = _metrics(env)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta["mistral_jax_generation_tokens_total"] == n
    assert delta["mistral_jax_prompt_tokens_total"] == len(ids)
    assert delta["mistral_jax_prefill_tokens_total"] + delta["mistral_jax_prefix_cache_hit_tokens_total"] == len(ids)
    assert delta["mistral_jax_requests_total{finish_reason=length}"] == 1
    assert delta["mistral_jax_time_to_first_token_seconds_count"] == 1
    assert delta["mistral_jax_inter_token_latency_seconds_count"] == n - 1
    assert after["mistral_jax_requests_running"] == 0 and after["mistral_jax_requests_waiting"] == 0


# ----------------------------------------------------------------------------- logprobs, echo, n, prefix cache
def _forward_logprobs(env, ids):
    """log_softmax of the model's logits over the whole sequence at once (float32, no cache)."""
    import jax

    logits = np.asarray(env["model"](np.asarray([ids], np.int32))[0], np.float64)
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))


@pytest.mark.oracle  # the openai client
def test_logprobs_and_echo(env):
    """echo + logprobs give every prompt token's log-prob (None for the first) and the new tokens', equal to a
    full-sequence forward; top_logprobs hold the k most likely; max_tokens=0 scores the prompt only."""
    c = client(env)
    ids = encode_prompt(env["tok"], prompt_text(env, 14, 31))  # longer than the window W=8: chunks and wraps
    new = mj.generate(env["model"], ids, max_new_tokens=4, eos_id=None)
    r = c.completions.create(model=NAME, prompt=ids, max_tokens=4, temperature=0, logprobs=3, echo=True,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    seq = ids + list(new)
    assert len(lp.token_logprobs) == len(seq) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = _forward_logprobs(env, seq)
    want = [ref[t - 1, seq[t]] for t in range(1, len(seq))]
    np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=1e-4)
    for t in range(1, len(seq)):
        top = lp.top_logprobs[t]
        assert len(top) <= 3 and max(top.values()) == pytest.approx(ref[t - 1].max(), abs=1e-4)
        assert sorted(top.values(), reverse=True) == pytest.approx(np.sort(ref[t - 1])[::-1][:len(top)], abs=1e-4)
    assert r.choices[0].text.startswith(decode_text(env["tok"], ids))
    assert lp.tokens[len(ids):] == [a for a in lp.tokens[len(ids):]] and len(lp.text_offset) == len(seq)
    # scoring only
    r0 = c.completions.create(model=NAME, prompt=ids, max_tokens=0, temperature=0, logprobs=1, echo=True)
    np.testing.assert_allclose(r0.choices[0].logprobs.token_logprobs[1:], want[:len(ids) - 1], atol=1e-4)
    assert r0.usage.completion_tokens == 0
    # without echo: the new tokens only; chat: the content's tokens
    r1 = c.completions.create(model=NAME, prompt=ids, max_tokens=4, temperature=0, logprobs=0,
                              extra_body={"ignore_eos": True})
    np.testing.assert_allclose(r1.choices[0].logprobs.token_logprobs, want[len(ids) - 1:], atol=1e-4)
    ch = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "the"}], max_tokens=3,
                                   temperature=0, logprobs=True, top_logprobs=2)
    content = ch.choices[0].logprobs.content
    assert 1 <= len(content) <= 3 and all(len(x.top_logprobs) == 2 and x.logprob <= 1e-6 for x in content)
    assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob, abs=1e-5)  # greedy: the top one
    for bad in ({"logprobs": 21}, {"logprobs": -1}, {"logprobs": "5"}, {"echo": "yes"},
                {"max_tokens": 0, "echo": True}):
        err = _error(requests.post(env["url"] + "/v1/completions", json={"prompt": "the", **bad}, timeout=TIMEOUT),
                     400)
        assert err["param"] in bad and "\n" not in err["message"], err


@pytest.mark.oracle  # the openai client
def test_n_completions_share_one_prefill_and_are_reproducible(env):
    c = client(env)
    wait_idle(env)
    ids = encode_prompt(env["tok"], prompt_text(env, 13, 4242))
    before = _metrics(env)
    r = c.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=1.0, n=4, seed=11)
    after = _metrics(env)
    texts = [ch.text for ch in r.choices]
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3] and len(set(texts)) > 1, texts
    assert after["mistral_jax_prefill_tokens_total"] - before["mistral_jax_prefill_tokens_total"] <= len(ids)
    again = c.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=1.0, n=4, seed=11)
    assert [ch.text for ch in again.choices] == texts
    # completion i draws with seed + i: the second completion of seed 11 is the first of seed 12
    one = c.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=1.0, seed=12)
    assert one.choices[0].text == texts[1]
    # greedy: every completion is generate's; best_of picks n of them
    g = c.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0, n=2, best_of=3)
    assert [ch.text for ch in g.choices] == [reference(env, ids, 6)[0]] * 2
    err = _error(requests.post(env["url"] + "/v1/completions", json={"prompt": "the", "n": 5}, timeout=TIMEOUT), 400)
    assert "n=5" in err["message"]


@pytest.mark.heavy
@pytest.mark.parametrize("chunk", [8, 4])  # the window W=8: prefixes cached at multiples of 8, and of 4 (< W)
def test_prefix_cache_outputs_equal_no_cache(chunk):
    """Prompts sharing prefixes (shorter and longer than the window): greedy outputs with the prefix cache equal
    those without it and generate's; the repeated prefixes were restored, not prefilled."""
    cfg = mj.ModelConfig.tiny(sliding_window=8, max_seq_len=256, initializer_range=0.2)
    model = mj.Transformer(cfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(chunk)
    shared = [int(x) for x in rng.integers(3, cfg.vocab_size, 29)]
    prompts = [shared[:k] + [int(x) for x in rng.integers(3, cfg.vocab_size, m)]
               for k, m in ((29, 3), (29, 9), (6, 5), (6, 1), (17, 4), (29, 3))]
    want = [list(mj.generate(model, p, max_new_tokens=9, eos_id=None)) for p in prompts]
    outs = {}
    for mb in (0, 64):
        eng = Engine(model, IdsTok(), max_batch=2, chunk_size=chunk, prefix_cache_mb=mb).start()
        try:
            outs[mb] = [submit_all(eng, [p], 9, timeout=120)[0] for p in prompts]  # one after the other
            stats = eng.stats()
        finally:
            eng.stop()
        if mb:
            assert stats["prefix_hit_tokens"] >= (29 // chunk) * chunk * 2 and stats["prefix_entries"] > 0, stats
        else:
            assert stats["prefix_hit_tokens"] == 0
    assert outs[64] == outs[0] == [[t for t in w if t != 2] for w in want]


@pytest.mark.heavy
def test_prefix_cache_evicts_least_recently_used():
    cfg = mj.ModelConfig.tiny(sliding_window=8, max_seq_len=128)
    model = mj.Transformer(cfg, rngs=nnx.Rngs(0))
    row = 2 * cfg.n_layers * 8 * cfg.n_kv_heads * cfg.head_dim * 4 + 8 * 4  # k, v float32 and positions
    eng = Engine(model, IdsTok(), max_batch=1, chunk_size=8, prefix_cache_mb=2.5 * row / 2**20).start()
    try:
        a, b, c = ([i + 3] * 12 for i in range(3))  # each prompt leaves one snapshot (its first 8 tokens)
        for p in (a, b, a, c):
            submit_all(eng, [p], 2, timeout=60)
        keys = [eng._prefix_key(p, 8) for p in (a, b, c)]
        assert eng.stats()["prefix_entries"] == 2 and eng.stats()["prefix_bytes"] <= 2.5 * row
        assert keys[0] in eng.prefix and keys[2] in eng.prefix and keys[1] not in eng.prefix  # b was the LRU
    finally:
        eng.stop()


def test_batched_prefill_equals_one_row_at_a_time_and_padding_changes_nothing():
    """``decode.prefill_rows_batch`` (the engine's prefill of several prompts in one call) writes each row as
    ``prefill_rows`` does for that row alone, and its padding entries leave every row as it was (the last row,
    which they read, included)."""
    import jax

    from mistral_jax.inference import decode

    cfg = mj.ModelConfig.tiny(sliding_window=8, max_seq_len=64)
    g, state = nnx.split(mj.Transformer(cfg, rngs=nnx.Rngs(1)))
    rng = np.random.default_rng(0)
    b = 4
    base = decode.new_cache(cfg, b, 8)
    for r in range(b):  # every row holds a prefilled prompt of its own
        toks, pos = decode.prompt_chunks([int(x) for x in rng.integers(3, cfg.vocab_size, 8)], 8)[0]
        _, base = decode.prefill_rows(g, state, base, toks, pos, row=np.int32(r), reset=np.bool_(True),
                                      key=(np.zeros(1, np.int32), np.zeros(1, np.int32)), temperature=np.zeros(1),
                                      top_k=np.zeros(1, np.int32), top_p=np.ones(1))
    chunks = [decode.prompt_chunks([int(x) for x in rng.integers(3, cfg.vocab_size, n)], 8)[-1] for n in (5, 8)]
    rows, reset = np.array([2, 0, b, b], np.int32), np.array([True, False, False, False])
    tokens = np.zeros((4, 8), np.int32)
    positions = np.full((4, 8), -1, np.int32)
    for i, (t, p) in enumerate(chunks):
        tokens[i], positions[i] = t[0], p[0] + (8 if i == 1 else 0)  # row 0: its prompt goes on
    keep = jax.tree.map(np.asarray, base)
    smp = dict(temperature=np.zeros(4), top_k=np.zeros(4, np.int32), top_p=np.ones(4))
    nxt, got = decode.prefill_rows_batch_jit(g, state, jax.tree.map(np.copy, base), tokens, positions, rows, reset,
                                             (np.zeros(4, np.int32), np.zeros(4, np.int32)), **smp)
    want = jax.tree.map(np.copy, keep)
    for i in range(2):
        one, want = decode.prefill_rows(g, state, want, tokens[i:i + 1], positions[i:i + 1], row=np.int32(rows[i]),
                                        reset=np.bool_(reset[i]), key=(np.zeros(1, np.int32), np.zeros(1, np.int32)),
                                        temperature=np.zeros(1), top_k=np.zeros(1, np.int32), top_p=np.ones(1))
        assert int(np.asarray(one)[0]) == int(np.asarray(nxt)[i])
    for a, w, k in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(keep), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w), atol=1e-5)
        a, k = np.asarray(a), np.asarray(k)
        untouched = (slice(None), [1, 3]) if a.ndim > 2 else ([1, 3],)  # rows 1 and 3 (the padding's) as they were
        np.testing.assert_array_equal(a[untouched], k[untouched])


# ----------------------------------------------------------------------------- the engine alone


@pytest.mark.heavy
def test_engine_without_window_equals_generate():
    """A model without a sliding window: its cache rows hold max_seq_len positions."""
    cfg = mj.ModelConfig.tiny(sliding_window=None, max_seq_len=64, initializer_range=0.2)
    model = mj.Transformer(cfg, rngs=nnx.Rngs(1))
    eng = Engine(model, IdsTok(), max_batch=3, chunk_size=16).start()
    try:
        assert eng.cache.k.shape[2] == 64 and eng.chunk == 16
        prompts = [[1] + np.random.default_rng(i).integers(3, cfg.vocab_size, n).tolist() for i, n in
                   enumerate([3, 20, 40, 9, 1])]
        out = submit_all(eng, prompts, 12, timeout=120)
        want = mj.generate(model, prompts, max_new_tokens=12, eos_id=2)  # one batch: one compilation
        assert out == [[t for t in w if t != 2] for w in want]
        with pytest.raises(ValueError, match="maximum context length is 64"):
            eng.submit(prompts[2], SamplingParams(max_tokens=30), lambda ev: None)
    finally:
        eng.stop()


@pytest.mark.slow
def test_engine_on_a_mesh_equals_generate():
    """Sharded serving: weights by the rules table, cache slots over the batch axes and kv heads over ``tensor``
    (2 x 2 x 2 of the 8 host devices); greedy results equal unsharded ``mj.generate``, steps compile once."""
    from mistral_jax import sharding

    cfg = mj.ModelConfig.tiny(sliding_window=16, max_seq_len=96, initializer_range=0.2)
    model = mj.Transformer(cfg, rngs=nnx.Rngs(2))
    prompts = [[1] + np.random.default_rng(10 + i).integers(3, cfg.vocab_size, n).tolist() for i, n in
               enumerate([5, 30, 12, 50, 2, 21])]
    want = mj.generate(model, prompts, max_new_tokens=10, eos_id=2)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    with pytest.raises(ValueError, match=r"max_batch=3 is not a multiple of the mesh's batch axes \(4 ways"):
        Engine(model, IdsTok(), max_batch=3, mesh=mesh)
    compile_count()
    eng = Engine(model, IdsTok(), max_batch=4, chunk_size=16, mesh=mesh).start()
    try:
        compiles = compile_count()
        assert eng.cache.k.sharding.spec != eng.cache.k.sharding.spec.__class__()  # not replicated
        assert len(eng.cache.k.sharding.device_set) == 8
        wq = eng.state["layers"]["attention"]["wq"][...]
        assert len(wq.sharding.device_set) == 8 and wq.addressable_shards[0].data.size < wq.size
        assert submit_all(eng, prompts, 10, timeout=300) == [[t for t in w if t != 2] for w in want]
        assert compile_count() == compiles  # requests coming and going: no recompilation on the mesh either
    finally:
        eng.stop()


# ----------------------------------------------------------------------------- the command line
def test_cli_checks_flags_before_loading(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mistral_jax.serve", "--checkpoint", str(tmp_path), "--max_batch",
                          "0"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "--max_batch=0" in res.stderr and "Fix:" in res.stderr


@pytest.mark.parametrize("flags, expected", [(["--lora", "support"], "is not NAME=WORKDIR"),
                                             (["--lora", "a=x", "--lora", "a=y"], "repeats the name 'a'"),
                                             (["--lora", "a=x", "--mesh", "tensor=2"], "cannot be served on a mesh")])
def test_cli_checks_lora_flags_before_loading(flags, expected):
    from mistral_jax.cli import UsageError
    from mistral_jax.cli.serve import parse_args

    with pytest.raises(UsageError, match="--lora") as e:
        parse_args(["--checkpoint", "x", *flags])
    assert expected in str(e.value) and "Fix:" in str(e.value) and "\n" not in str(e.value)


def test_cli_refuses_a_lora_path_that_is_no_lora_workdir(env, tmp_path):
    res = subprocess.run([sys.executable, "-m", "mistral_jax.serve", "--checkpoint", env["ckpt"], "--port", "0",
                          "--lora", f"mine={tmp_path}"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "--lora='mine=" in res.stderr and "not a LoRA training workdir" in res.stderr


@pytest.mark.parametrize("mesh, expected", [("tensor=two", "not an integer"), ("heads=2", "'heads=2'"),
                                            ("data=-1,fsdp=-1", "more than one -1"), ("tensor=0", "size of tensor")])
def test_cli_checks_the_mesh_before_loading(mesh, expected):
    from mistral_jax.cli import UsageError
    from mistral_jax.cli.serve import parse_args

    with pytest.raises(UsageError, match="--mesh") as e:
        parse_args(["--checkpoint", "x", "--mesh", mesh])
    assert expected in str(e.value) and "Fix:" in str(e.value)
    assert parse_args(["--checkpoint", "x", "--mesh", "data=2,tensor=-1"]).mesh == dict(data=2, fsdp=1, tensor=-1,
                                                                                         expert=1)


@pytest.mark.slow
def test_cli_serves_a_checkpoint(env):
    """The command line, sharded over the 8 host devices as --mesh says (data 2 x fsdp 2 x tensor 2)."""
    proc = subprocess.Popen([sys.executable, "-m", "mistral_jax.serve", "--checkpoint", env["ckpt"], "--port", "0",
                             "--max_batch", "4", "--mesh", "data=2,tensor=2,fsdp=-1"], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        line = ""
        deadline = time.monotonic() + 180
        while "serving" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stderr.readline()
        assert "serving 'ckpt' on http://127.0.0.1:" in line and "'tensor': 2" in line, line
        url = line.split(" on ")[1].split()[0]
        r = requests.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 6, "temperature": 0},
                          timeout=TIMEOUT).json()
        ids = encode_prompt(env["tok"], "the")
        assert r["choices"][0]["text"] == reference(env, ids, 6)[0] and r["model"] == "ckpt"
        # SIGTERM under load: the streams in flight run to their end, then the process exits 0
        started, results = threading.Semaphore(0), {}

        def stream(i):
            chunks = []
            with requests.post(url + "/v1/completions", json={"prompt": "the", "max_tokens": 60, "temperature": 0,
                               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}},
                               stream=True, timeout=TIMEOUT) as resp:
                for line in resp.iter_lines():
                    if line.startswith(b"data: {"):
                        if not chunks:
                            started.release()
                        chunks.append(json.loads(line[6:]))
            results[i] = chunks

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for _ in threads:
            assert started.acquire(timeout=60)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        assert proc.wait(timeout=60) == 0
        for chunks in results.values():
            assert chunks[-1]["usage"]["completion_tokens"] == 60
            assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert len(results) == 3
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=30)


# ----------------------------------------------------------------------------- lm-eval
GEN_YAML = """task: serve_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.mark.slow
def test_lm_eval_local_completions_equals_in_process_backend(env):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mistral_jax.evals.lm import MistralJaxLM

    rng = random.Random(1)
    rows = [{"question": prompt_text(env, rng.randint(2, 12), 200 + i), "answer": rng.choice(env["words"])}
            for i in range(12)]
    tasks = env["root"] / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "serve_gen.yaml").write_text(GEN_YAML.format(data=tasks / "data.jsonl"))
    tm = TaskManager(include_path=str(tasks), include_defaults=False)

    def samples(model, **kw):
        out = lm_eval.simple_evaluate(model=model, tasks=["serve_gen"], task_manager=tm, log_samples=True,
                                      verbosity="ERROR", **kw)
        return {s["doc_id"]: s["resps"][0][0] for s in out["samples"]["serve_gen"]}

    ours = samples(MistralJaxLM(model=env["model"], tokenizer=env["tok_path"], batch_size=4))
    served = samples("local-completions", model_args=dict(
        model=NAME, base_url=env["url"] + "/v1/completions", tokenizer_backend=None, tokenized_requests=False,
        num_concurrent=4, max_retries=1, timeout=TIMEOUT))
    assert sorted(served) == sorted(ours) == list(range(12))
    assert served == ours
    assert sum(bool(v.strip()) for v in ours.values()) >= 6, ours  # not vacuous


MAXL = MAX_LEN - 8  # one rolling window per document


@pytest.mark.slow
def test_lm_eval_local_completions_loglikelihood_equals_eval(env):
    """lm-eval's ``local-completions`` finds the server's tokenizer endpoints (vLLM's /tokenizer_info, /tokenize)
    and scores through echo + logprobs: a multiple-choice task and a rolling-perplexity task (documents of 20-70
    words: many prefill chunks, past the window) give eval.py's backend's numbers to 1e-4 (both without BOS: the
    API path sends text tokenized with add_special_tokens=false; one window per document: lm-eval's API and hf
    backends cut rolling windows differently)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mistral_jax.evals.lm import MistralJaxLM
    from tests.helpers import mc_task_yaml, ppl_task_yaml

    rng = random.Random(5)
    mc = [{"question": prompt_text(env, rng.randint(3, 10), 900 + i),
           "choices": [prompt_text(env, rng.randint(1, 4), 1000 + 4 * i + j) for j in range(4)],
           "label": rng.randrange(4)} for i in range(10)]
    ppl = [{"text": prompt_text(env, rng.randint(20, 70), 2000 + i)} for i in range(4)]
    tasks = env["root"] / "ll_tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (tasks / "ppl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ppl))
    (tasks / "serve_mc.yaml").write_text(mc_task_yaml("serve_mc", tasks / "mc.jsonl", ("acc", "acc_norm")))
    (tasks / "serve_ppl.yaml").write_text(ppl_task_yaml("serve_ppl", tasks / "ppl.jsonl"))
    tm = TaskManager(include_path=str(tasks), include_defaults=False)

    def run(model, **kw):
        return lm_eval.simple_evaluate(model=model, tasks=["serve_mc", "serve_ppl"], task_manager=tm,
                                       log_samples=True, verbosity="ERROR", **kw)

    ours = run(MistralJaxLM(model=env["model"], tokenizer=env["tok_path"], batch_size=4, max_length=MAXL - 1,
                            add_bos_token=False))
    served = run("local-completions", model_args=dict(model=NAME, base_url=env["url"] + "/v1/completions",
                                                      num_concurrent=4, max_retries=1, timeout=TIMEOUT,
                                                      max_length=MAXL))

    def by_doc(out, task):
        return {s["doc_id"]: s for s in out["samples"][task]}

    a, b = by_doc(ours, "serve_mc"), by_doc(served, "serve_mc")
    assert sorted(a) == sorted(b) == list(range(10))
    for d in a:
        np.testing.assert_allclose([x[0] for x in b[d]["filtered_resps"]], [x[0] for x in a[d]["filtered_resps"]],
                                   atol=1e-4)
        assert [x[1] for x in b[d]["filtered_resps"]] == [x[1] for x in a[d]["filtered_resps"]]  # is_greedy
    for m in ("acc,none", "acc_norm,none"):
        assert served["results"]["serve_mc"][m] == ours["results"]["serve_mc"][m]
    a, b = by_doc(ours, "serve_ppl"), by_doc(served, "serve_ppl")
    np.testing.assert_allclose([b[d]["filtered_resps"][0] for d in sorted(b)],
                               [a[d]["filtered_resps"][0] for d in sorted(a)], rtol=1e-5, atol=1e-4)
    assert min(len(env["tok"].encode(r["text"], bos=False)) for r in ppl) > 3 * W  # several chunks, past W
    np.testing.assert_allclose(served["results"]["serve_ppl"]["word_perplexity,none"],
                               ours["results"]["serve_ppl"]["word_perplexity,none"], rtol=1e-4)


@pytest.mark.heavy
def test_multi_lora_rows_of_different_adapters_decode_together():
    """Two LoRA adapters and the base in one batch (lora.stack_adapters, gathered adapter matmuls): each request's
    greedy tokens equal that adapter served alone and generate on the adapter merged into the base."""
    import copy

    from mistral_jax import lora

    cfg = mj.ModelConfig.tiny(sliding_window=8, max_seq_len=128, initializer_range=0.2)
    base = mj.Transformer(cfg, rngs=nnx.Rngs(0))
    adapters, merged = [], []
    for i, (rank, targets) in enumerate(((4, "all"), (2, "wq,wv,w2"))):
        m = lora.apply_lora(copy.deepcopy(base), rank, 2.0 * rank, targets, seed=i)
        rng = np.random.default_rng(10 + i)
        for _, node in nnx.iter_graph(m):  # B starts at zero: give the adapters an effect
            if isinstance(node, lora.LoRAWeight):
                node.b[...] = jnp.asarray(rng.normal(0, 0.3, node.b.shape), node.b[...].dtype)
        adapters.append(m)
        merged.append(lora.merge_lora(copy.deepcopy(m)))
    served = lora.stack_adapters(copy.deepcopy(base), adapters)
    assert lora.is_multi_lora(served)
    rng = np.random.default_rng(1)
    prompts = [[int(x) for x in rng.integers(3, cfg.vocab_size, n)] for n in (5, 11, 19, 7, 13, 3)]
    which = [0, 1, 2, 2, 1, 0]
    want = [list(mj.generate(base if a == 0 else merged[a - 1], p, max_new_tokens=10, eos_id=None))
            for p, a in zip(prompts, which, strict=True)]
    assert len({tuple(w) for w in want[:3]}) == 3  # the adapters change the answers

    def run(eng, ps, ads):
        out = {i: [] for i in range(len(ps))}
        done = threading.Semaphore(0)
        for i, (p, a) in enumerate(zip(ps, ads, strict=True)):
            eng.submit(p, SamplingParams(max_tokens=10, ignore_eos=True, adapter=a),
                       lambda ev, i=i: (out[i].extend(ev.token_ids), ev.kind != "delta" and done.release()))
        for _ in ps:
            assert done.acquire(timeout=120)
        return [out[i] for i in range(len(ps))]

    eng = Engine(served, IdsTok(), max_batch=8, chunk_size=4).start()
    try:
        together = run(eng, prompts, which)
        alone = [run(eng, [p], [a])[0] for p, a in zip(prompts, which, strict=True)]
        with pytest.raises(ValueError, match="adapter 3 does not exist"):
            eng.submit(prompts[0], SamplingParams(adapter=3), lambda ev: None)
    finally:
        eng.stop()
    assert together == alone == want
