"""One decoding core (``mistral_jax.inference``): no sampling, decode-step, detokenizing or ``<s>``-splitting code
outside it (an AST scan of serve/, evals/, cli/); one ``decode_step``; the batch-wide sampling form is the per-row
one with equal rows; sampled tokens' log-probs equal the uncached forward's; text streams and prompt encoding."""

from __future__ import annotations

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mistral_jax as mj
from mistral_jax.inference import decode
from mistral_jax.inference.detokenize import Detokenizer, TextStream, decode_text
from mistral_jax.inference.prompt import encode_prompt
from mistral_jax.inference.sampling import filter_logits, sample, token_logprobs

PKG = pathlib.Path(mj.__file__).parent
CALLERS = ("serve", "evals", "cli")  # the decoding core's callers: scheduling, HTTP, lm-eval, flags only

# A call whose dotted name is, or ends with ".<name>", one of these is decoding work (the core's):
FORBIDDEN_CALLS = {
    # sampling
    "argmax", "categorical", "lax.top_k", "log_softmax", "softmax", "jnp.sort", "jnp.cumsum", "fold_in",
    "random.key", "random.PRNGKey", "filter_logits", "sample_rows",
    # the decode step / prefill: the model's forward over the cache and the cache's writes
    "serving_forward", "forward_chunk", "KVCache", "KVCache.init", "LayerCache", "cache.update",
    "dynamic_update_slice", "dynamic_update_slice_in_dim", "dynamic_slice_in_dim",
    # detokenization
    "hf_decode", "hf_raw_text", "IsByte",
}
FORBIDDEN_KEYWORDS = {"logits_to_keep"}  # asking the model for the last column: a prefill chunk
FORBIDDEN_DEFS = {"decode_step", "decode_loop", "prefill", "prefill_chunk", "forward_chunk", "sample", "sample_rows",
                  "filter_logits", "decode_text"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return _dotted(node.func) + "()"
    return "?"


def decoding_code(source: str) -> list[str]:
    """The decoding work in ``source`` as ``line: what`` (empty when it only schedules and calls the core)."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            for bad in FORBIDDEN_CALLS:
                if name == bad or name.endswith("." + bad) or (bad == "cache.update" and name.lower().endswith(
                        "cache.update")):
                    hits.append(f"{node.lineno}: call {name}")
            hits += [f"{node.lineno}: keyword {k.arg}" for k in node.keywords if k.arg in FORBIDDEN_KEYWORDS]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in FORBIDDEN_DEFS:
            hits.append(f"{node.lineno}: def {node.name}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "<s>|</s>" in node.value:
            hits.append(f"{node.lineno}: <s> splitting {node.value!r}")
    return sorted(set(hits))


def test_no_decoding_code_outside_the_core():
    files = sorted(p for d in CALLERS for p in (PKG / d).rglob("*.py"))
    assert len(files) >= 8, files  # the scan sees the callers
    found = {str(p.relative_to(PKG)): hits for p in files if (hits := decoding_code(p.read_text()))}
    assert not found, f"decoding code outside mistral_jax/inference (move it into the core): {found}"


# Lines of the server's engine before the core (serve/engine.py at 99822ac): the scan must flag each of them.
OLD_ENGINE = '''
def sample_rows(logits, seeds, steps, temperature, top_k, top_p):
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    kth = jnp.take_along_axis(jnp.sort(x, axis=-1)[:, ::-1], jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    key = jax.random.fold_in(jax.random.key(seed), step)
    return jax.random.categorical(key, row[None], axis=-1)[0].astype(jnp.int32)

def prefill_chunk(graphdef, state, layers, cache, row, reset, tokens, positions, sampling):
    r = KVCache(k=r.k, v=r.v, pos=jnp.where(reset, EMPTY, r.pos))
    out = serving_forward(model, layers, tokens, positions, cache=r, logits_to_keep=1)
    cache = KVCache(k=jax.lax.dynamic_update_slice_in_dim(cache.k, r.k, row, axis=1), v=v, pos=pos)

def decode_step(graphdef, state, layers, cache, tokens, positions, sampling):
    return sample_rows(logits[:, 0], *sampling), cache

class _Detokenizer:
    def push(self, tok):
        pending = hf_raw_text(self.sp, self.ids[self.upto:])

_SPECIAL = re.compile(r"(<s>|</s>)")
k, v = layer_cache.update(k, v, positions)
'''


def test_the_scan_flags_decoding_code():
    hits = decoding_code(OLD_ENGINE)
    for what in ("def sample_rows", "call jnp.argmax", "call jnp.sort", "call jax.random.fold_in",
                 "call jax.random.key", "call jax.random.categorical", "def prefill_chunk", "call KVCache",
                 "call serving_forward",
                 "keyword logits_to_keep", "call jax.lax.dynamic_update_slice_in_dim", "def decode_step",
                 "call hf_raw_text", "<s> splitting", "call layer_cache.update"):
        assert any(what in h for h in hits), (what, hits)
    assert decoding_code("engine.submit(ids, params, emit)\nstate.update(x)\nout = decode.decode_rows(g, s, c)\n") == []


def test_one_decode_step():
    defs = {}
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in ("decode_step", "prefill", "sample"):
                defs.setdefault(node.name, []).append(str(p.relative_to(PKG)))
    assert defs == {"decode_step": ["inference/decode.py"], "prefill": ["inference/decode.py"],
                    "sample": ["inference/sampling.py"]}


# ----------------------------------------------------------------------------- sampling: one implementation
LOGITS = jax.random.normal(jax.random.key(0), (4, 50)) * 3


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, None, None), (1.3, 5, None), (0.9, None, 0.8),
                                                     (0.5, 7, 0.6), (1.0, 50, 1.0)])
def test_batch_wide_settings_are_per_row_settings_with_equal_rows(temperature, top_k, top_p):
    b = LOGITS.shape[0]
    per_row = filter_logits(LOGITS, jnp.full(b, temperature), jnp.full(b, top_k or 0, jnp.int32),
                            jnp.full(b, 1.0 if top_p is None else top_p))
    np.testing.assert_array_equal(np.asarray(filter_logits(LOGITS, temperature, top_k, top_p)), np.asarray(per_row))
    # one row, one key: the batch-wide draw == the per-row draw with (seed, step) == with that row's key
    key = jax.random.fold_in(jax.random.key(11), 3)
    one = LOGITS[1:2]
    want = sample(one, key, temperature, top_k, top_p)
    rows = sample(one, (jnp.array([11]), jnp.array([3])), jnp.array([temperature]),
                  jnp.array([top_k or 0], jnp.int32), jnp.array([1.0 if top_p is None else top_p]))
    assert int(want[0]) == int(rows[0])


def test_per_row_sampling_is_each_row_alone_and_greedy_rows_take_the_argmax():
    seeds, steps = jnp.array([1, 2, 3, 4]), jnp.array([0, 5, 9, 2])
    temp = jnp.array([0.8, 0.0, 1.5, 0.0])
    top_k, top_p = jnp.array([0, 3, 10, 0], jnp.int32), jnp.array([0.9, 1.0, 1.0, 0.5])
    rows = jax.jit(sample)  # per-row settings are traced: one compilation per batch shape
    draws = []
    for n in range(16):  # many draws: the sampled rows vary, the greedy rows never
        tok = rows(LOGITS, (seeds, steps + n), temp, top_k, top_p)
        for b in range(4):
            alone = rows(LOGITS[b:b + 1], (seeds[b:b + 1], steps[b:b + 1] + n), temp[b:b + 1], top_k[b:b + 1],
                         top_p[b:b + 1])
            assert int(tok[b]) == int(alone[0])
        draws.append(np.asarray(tok))
    draws = np.stack(draws)
    argmax = np.asarray(LOGITS).argmax(-1)
    assert (draws[:, 1] == argmax[1]).all() and (draws[:, 3] == argmax[3]).all()
    assert len(set(draws[:, 0])) > 1 and len(set(draws[:, 2])) > 1
    kept = np.argsort(-np.asarray(LOGITS[2]))[:10]
    assert set(draws[:, 2]) <= set(kept.tolist())  # row 2's top_k=10
    assert (np.asarray(sample(LOGITS, (seeds, steps), jnp.zeros(4), top_k, top_p)) == argmax).all()  # all greedy


# ----------------------------------------------------------------------------- log-probs for RL
CFG = mj.ModelConfig.tiny(sliding_window=8, initializer_range=0.2)


@pytest.fixture(scope="module")
def model():
    return mj.Transformer(CFG, rngs=nnx.Rngs(3))


def _uncached_logprobs(model, prompt, new):
    """log_softmax of the uncached forward's logits at each new token (the positions that predicted it)."""
    seq = jnp.asarray([prompt + new], jnp.int32)
    logp = jax.nn.log_softmax(model(seq)[0].astype(jnp.float32), axis=-1)  # [T, V]
    return np.asarray([logp[len(prompt) - 1 + i, t] for i, t in enumerate(new)])


@pytest.mark.heavy  # trains or compiles end to end: fast tier, not light
def test_sampled_logprobs_equal_the_uncached_forward(model):
    prompts = [[1, 5, 9, 14, 3, 7, 30, 11, 4, 8, 21], [1, 40, 2 + 1, 17]]  # past the window of 8
    g = 3  # G completions per prompt, as GRPO samples them: one batch of G copies of each prompt
    batch = [p for p in prompts for _ in range(g)]
    ids, lps = mj.generate(model, batch, max_new_tokens=12, temperature=1.0, top_k=40, seed=5, eos_id=None,
                           logprobs=True)
    assert [len(x) for x in ids] == [12] * len(batch) == [len(x) for x in lps]
    assert len({tuple(x) for x in ids[:g]}) > 1  # the G samples of a prompt differ
    for p, new, lp in zip(batch, ids, lps, strict=True):
        np.testing.assert_allclose(lp, _uncached_logprobs(model, p, new), atol=2e-5, rtol=0)
    assert mj.generate(model, batch, max_new_tokens=12, temperature=1.0, top_k=40, seed=5, eos_id=None) == ids
    # the step itself: decode_step(logprobs=True) == token_logprobs of its logits == the uncached forward
    graphdef, state = nnx.split(model)
    tokens, positions = decode.pad_prompts(prompts, 16)
    cache = decode.new_cache(CFG, 2, decode.cache_length(CFG, 16 + 1))
    last, cache = decode.prefill(graphdef, state, cache, tokens, positions)
    first = sample(last, jax.random.key(0), 0.0)
    nxt, logits, cache, lp = decode._decode_step(graphdef, state, cache, first, jnp.asarray([11, 4]),
                                                 jax.random.key(1), temperature=0.9, logprobs=True)
    np.testing.assert_array_equal(np.asarray(lp), np.asarray(token_logprobs(logits, nxt)))
    for b, p in enumerate(prompts):
        want = _uncached_logprobs(model, p, [int(first[b]), int(nxt[b])])[1]
        np.testing.assert_allclose(float(lp[b]), want, atol=2e-5)


# ----------------------------------------------------------------------------- text and prompts
class _Tok:
    bos_id, eos_id = 1, 2

    def encode(self, text, bos=False):
        return [100 + ord(c) for c in text]


def test_encode_prompt_reads_literal_control_tokens():
    tok = _Tok()
    assert encode_prompt(tok, "ab") == [1, 197, 198]
    assert encode_prompt(tok, "<s>a</s><s>b") == [1, 197, 2, 1, 198]  # no second BOS before a leading <s>
    assert encode_prompt(tok, "a<s>", bos=False) == [197, 1]
    from mistral_jax.serve import app

    assert app.encode_prompt is encode_prompt  # the server encodes through the core


def test_detokenizer_is_decode_text_of_every_prefix(corpus_tokenizer):
    tok = corpus_tokenizer
    ids = tok.encode("naïve café — 東京 🙂 the end", bos=False)
    rng = np.random.default_rng(0)
    ids = ids + rng.integers(0, tok.vocab_size, 40).tolist()  # byte-fallback pieces, <unk>, controls
    d = Detokenizer(tok)
    for n, t in enumerate(ids, 1):
        assert d.push(t) == decode_text(tok, ids[:n])
    assert d.text() == decode_text(tok, ids)


def test_text_stream_holds_back_stop_prefixes_and_cuts_at_stop():
    class Chars:
        def decode(self, ids):
            return "".join(map(chr, ids))

    s = TextStream(Chars(), stop=["END"])
    shown = [s.push(ord(c)) for c in "abcEN"]
    assert "".join(shown) == "abc" and not s.stopped  # "EN" may start "END": held back
    assert s.push(ord("D")) == "" and s.stopped and s.text == "abc"
    s = TextStream(Chars(), stop=["END"])
    assert "".join(s.push(ord(c)) for c in "xE") == "x"
    assert s.push(ord("y"), last=True) == "Ey" and not s.stopped
    s = TextStream(Chars())
    assert s.push(ord("q")) == "q" and s.push(0, eos=True) == "" and s.stopped and s.text == "q"
