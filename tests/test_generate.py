"""Inference: rolling-buffer cache + chunked prefill == uncached forward, greedy == HF generate, sampling,
stopping, cache memory, sharded decode, the generate CLI."""

from __future__ import annotations

import io
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mistral_jax as mj
from mistral_jax import sharding
from mistral_jax.inference import decode, per_layer
from mistral_jax.inference import generate as gen
from mistral_jax.inference.sampling import filter_logits, sample
from mistral_jax.model.kv_cache import KVCache

ATOL = 1e-4
W = 8
# initializer_range 0.2: a random tiny model whose greedy continuations vary instead of repeating one token.
MISTRAL = mj.ModelConfig.tiny(sliding_window=W, initializer_range=0.2)
MIXTRAL = mj.ModelConfig.tiny_mixtral(initializer_range=0.2)


@pytest.fixture(scope="module")
def mistral():
    return mj.Transformer(MISTRAL, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def mixtral():
    return mj.Transformer(MIXTRAL, rngs=nnx.Rngs(1))


def _prompt(cfg, n, seed):
    return [1] + np.random.default_rng(seed).integers(3, cfg.vocab_size, n - 1).tolist()


# ----------------------------------------------------------------------------- cached == uncached
def _cached_logits(model, prompts, steps, chunk_size):
    """Per row: logits of every prompt position (chunked prefill) then of ``steps`` greedy decode steps, and the
    generated tokens. Prompts are right-aligned in one batch (left padding at position -1)."""
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    lengths = np.array([len(p) for p in prompts])
    t = int(lengths.max())
    tokens, positions = decode.pad_prompts(prompts, t)
    cache = KVCache.init(cfg, len(prompts), decode.cache_length(cfg, t + steps))
    logits, cache = decode.prefill(graphdef, state, cache, tokens, positions, chunk_size=chunk_size,
                                   return_all_logits=True)
    logits = np.asarray(logits)
    per_row = [[*logits[b, t - n:]] for b, n in enumerate(lengths)]
    tok, pos = jnp.asarray(logits[:, -1].argmax(-1), jnp.int32), jnp.asarray(lengths, jnp.int32)
    new = [[int(x)] for x in tok]
    for i in range(steps):
        tok, step_logits, cache = decode._decode_step(graphdef, state, cache, tok, pos, jax.random.key(i))
        pos = pos + 1
        for b in range(len(prompts)):
            per_row[b].append(np.asarray(step_logits[b]))
            new[b].append(int(tok[b]))
    return [np.stack(r) for r in per_row], new, cache


@pytest.mark.parametrize("chunk_size", [1, 3, W, 13])
@pytest.mark.slow
def test_cached_equals_full_forward_past_window(mistral, chunk_size):
    """W=8, prompts of 50 and 37 tokens (many wrap-arounds of the 8-slot buffer), 30 decode steps."""
    prompts = [_prompt(MISTRAL, 50, 0), _prompt(MISTRAL, 37, 1)]
    steps = 30
    per_row, new, cache = _cached_logits(mistral, prompts, steps, chunk_size)
    assert cache.k.shape[2] == W  # memory is W slots whatever the length
    for b, p in enumerate(prompts):
        full_seq = np.array(p + new[b][:steps])[None]
        full = np.asarray(mistral(full_seq))[0]  # uncached forward over prompt + generated tokens
        assert per_row[b].shape == full.shape == (len(p) + steps, MISTRAL.vocab_size)
        np.testing.assert_allclose(per_row[b], full, atol=ATOL, rtol=0)
    # the cache holds the last W positions of each row, each in slot position mod W
    last = [len(p) + steps - 1 for p in prompts]
    for b, end in enumerate(last):
        expect = np.arange(end - W + 1, end + 1)
        np.testing.assert_array_equal(np.sort(np.asarray(cache.pos[b])), expect)
        np.testing.assert_array_equal(np.asarray(cache.pos[b]) % W, np.arange(W))


@pytest.mark.slow
def test_cached_equals_full_forward_short_prompt(mistral):
    prompts = [_prompt(MISTRAL, 5, 2), _prompt(MISTRAL, 3, 3)]  # shorter than W, decode past it
    per_row, new, _ = _cached_logits(mistral, prompts, 12, None)
    for b, p in enumerate(prompts):
        full = np.asarray(mistral(np.array(p + new[b][:12])[None]))[0]
        np.testing.assert_allclose(per_row[b], full, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_cached_equals_full_forward_no_window(mixtral):
    """Mixtral (no window): the same code with a plain max-length cache."""
    prompts = [_prompt(MIXTRAL, 20, 4), _prompt(MIXTRAL, 11, 5)]
    per_row, new, cache = _cached_logits(mixtral, prompts, 10, 7)
    assert cache.k.shape[2] >= 30
    for b, p in enumerate(prompts):
        full = np.asarray(mixtral(np.array(p + new[b][:10])[None]))[0]
        np.testing.assert_allclose(per_row[b], full, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- HF parity
def _hf_greedy(cfg, model, prompts, n):
    import torch

    from tests.torch_ref import hf_model

    hf = hf_model(cfg, model)
    hf.generation_config.eos_token_id = None  # never stop early: compare all n tokens
    hf.generation_config.pad_token_id = 0
    t = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (t - len(p)) + p for p in prompts])  # HF left padding
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None)
    assert out.shape == (len(prompts), t + n)
    return out[:, t:].tolist()


@pytest.mark.parametrize("which", ["mistral", "mixtral"])
@pytest.mark.slow
@pytest.mark.oracle
def test_greedy_matches_hf_generate(which, request):
    cfg = MISTRAL if which == "mistral" else MIXTRAL
    model = request.getfixturevalue(which)
    prompts = [_prompt(cfg, 20, 10), _prompt(cfg, 13, 11)]  # longer than the window W=8
    ours = mj.generate(model, prompts, max_new_tokens=64, eos_id=None)
    ref = _hf_greedy(cfg, model, prompts, 64)
    assert [len(r) for r in ours] == [64, 64]
    assert len(set(ours[0])) > 5  # a real continuation, not one token repeated
    assert ours == ref


# ----------------------------------------------------------------------------- memory
def test_rolling_cache_is_8x_smaller_at_32k():
    cfg = mj.ModelConfig.mistral_7b_v01()
    assert cfg.sliding_window == 4096
    nbytes = lambda c: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(c))
    rolling = jax.eval_shape(lambda: KVCache.init(cfg, 1, 32768))  # no allocation
    full = jax.eval_shape(lambda: KVCache.init(cfg.replace(sliding_window=None), 1, 32768))
    assert rolling.k.shape == (32, 1, 4096, 8, 128) and full.k.shape == (32, 1, 32768, 8, 128)
    assert nbytes(full) == 8 * nbytes(rolling)
    assert decode.cache_length(cfg, 32768) == 4096  # what generate allocates for a 32k-token sequence


def test_no_window_cache_too_short_is_an_error():
    with pytest.raises(ValueError, match="max_seq_len"):
        decode.cache_length(MIXTRAL, MIXTRAL.max_seq_len + 1)


# ----------------------------------------------------------------------------- sampling
LOGITS = np.array([[2.0, 1.0, 0.5, -1.0, 3.0, 0.0, -2.0, 1.5, 0.2, -0.5]], np.float32)


def _allowed(logits, temperature, top_k, top_p):
    """Hand computation of the sampling support."""
    z = logits / temperature
    order = list(np.argsort(-z))
    keep = order[: top_k or len(order)]
    if top_p is not None:
        p = np.exp(z[keep] - z[keep].max())
        p /= p.sum()
        kept, mass = [], 0.0
        for i, pi in zip(keep, p, strict=True):
            if mass >= top_p:
                break
            kept.append(i)
            mass += pi
        keep = kept
    return set(int(i) for i in keep)


def _draws(logits, n, **kw):
    batch = np.repeat(logits, n, axis=0)
    return np.asarray(jax.jit(sample, static_argnames=("temperature", "top_k", "top_p"))(
        batch, jax.random.key(0), **kw))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 3, None), (0.7, None, 0.8), (1.0, None, 0.5),
                                                     (1.5, 5, 0.7), (1.0, 1, None)])
@pytest.mark.slow
def test_top_k_top_p_stay_in_allowed_set(temperature, top_k, top_p):
    allowed = _allowed(LOGITS[0], temperature, top_k, top_p)
    assert 1 <= len(allowed) < LOGITS.shape[1]
    draws = _draws(LOGITS, 4000, temperature=temperature, top_k=top_k, top_p=top_p)
    assert set(draws.tolist()) == allowed  # never outside; every allowed token does occur
    finite = np.isfinite(np.asarray(filter_logits(LOGITS, temperature, top_k, top_p))[0])
    assert set(np.flatnonzero(finite).tolist()) == allowed


def test_temperature_sampling_follows_softmax():
    temperature = 1.3
    draws = _draws(LOGITS, 20000, temperature=temperature)
    freq = np.bincount(draws, minlength=LOGITS.shape[1]) / draws.size
    p = np.exp(LOGITS[0] / temperature)
    np.testing.assert_allclose(freq, p / p.sum(), atol=0.015)


def test_temperature_zero_is_argmax():
    logits = np.random.default_rng(0).normal(size=(16, 512)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(sample(logits, jax.random.key(3), 0.0, top_k=5, top_p=0.5)),
                                  logits.argmax(-1))


def test_sampling_settings_are_checked(mistral):
    for kw, match in [(dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p"),
                      (dict(max_new_tokens=0), "max_new_tokens")]:
        with pytest.raises(ValueError, match=match):
            mj.generate(mistral, [1, 5, 6], **kw)
    with pytest.raises(ValueError, match="outside"):
        mj.generate(mistral, [1, MISTRAL.vocab_size], max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        mj.generate(mistral, [[1, 2], []], max_new_tokens=2)


@pytest.mark.slow
def test_seeded_sampling_is_deterministic(mistral):
    prompts = [_prompt(MISTRAL, 12, 20), _prompt(MISTRAL, 9, 21)]
    kw = dict(max_new_tokens=24, temperature=1.0, top_p=0.95, eos_id=None)
    a = mj.generate(mistral, prompts, seed=3, **kw)
    b = mj.generate(mistral, prompts, seed=3, **kw)
    c = mj.generate(mistral, prompts, seed=4, **kw)
    assert a == b
    assert a != c
    greedy = mj.generate(mistral, prompts, max_new_tokens=24, eos_id=None)
    assert a != greedy
    # top_k=1 sampling is greedy whatever the seed and temperature
    assert mj.generate(mistral, prompts, max_new_tokens=24, temperature=2.0, top_k=1, seed=9, eos_id=None) == greedy


# ----------------------------------------------------------------------------- stopping
@pytest.mark.heavy  # 3-5 s on 2 busy cores: the light tier stays near its 90 s
def test_stop_on_eos(mistral):
    prompts = [_prompt(MISTRAL, 12, 30), _prompt(MISTRAL, 7, 31)]
    free = mj.generate(mistral, prompts, max_new_tokens=40, eos_id=None)
    eos = free[0][9]  # pretend the 10th generated token of row 0 is EOS
    out = mj.generate(mistral, prompts, max_new_tokens=40, eos_id=eos)
    for row, ref in zip(out, free, strict=True):
        expect = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert row == expect  # stops right after EOS (included); the other row runs on independently
    assert len(out[0]) <= 10 and out[0][-1] == eos


@pytest.fixture(scope="module")
def tokenizer(syllable_tokenizer_path):
    assert mj_tokenizer(syllable_tokenizer_path).vocab_size == MISTRAL.vocab_size  # every id the model emits decodes
    return mj_tokenizer(syllable_tokenizer_path)


def mj_tokenizer(path):
    from mistral_jax.data.tokenizer import Tokenizer

    return Tokenizer(path)


@pytest.mark.slow
def test_stop_string(mistral, tokenizer):
    prompt = tokenizer.encode("the cat sat on")
    free = mj.generate(mistral, prompt, max_new_tokens=30, eos_id=None)
    text = tokenizer.decode(free)
    stop_str = text[len(tokenizer.decode(free[:12])):][:3]  # a piece of the text generated around token 13
    assert len(stop_str) == 3
    first = next(n for n in range(1, 31) if stop_str in tokenizer.decode(free[:n]))
    out = mj.generate(mistral, prompt, max_new_tokens=30, eos_id=None, stop=[stop_str], tokenizer=tokenizer)
    assert out == free[:first]
    assert stop_str in tokenizer.decode(out) and stop_str not in tokenizer.decode(out[:-1])


# ----------------------------------------------------------------------------- per-layer weights, logits_to_keep
@pytest.mark.parametrize("which", ["mistral", "mixtral"])
@pytest.mark.slow
def test_per_layer_weights_give_the_same_numbers(which, request):
    """Prefill and decode through ``serving_layers`` copies == through the stacked, scanned weights."""
    model = request.getfixturevalue(which)
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    layers = per_layer.serving_layers(model, True)
    assert len(layers) == cfg.n_layers
    for i in (0, cfg.n_layers - 1):  # copies of the stacked weights, layer by layer
        np.testing.assert_array_equal(layers[i]["attention"]["wq"][...], state["layers"]["attention"]["wq"][...][i])
    prompts = [_prompt(cfg, n, 70 + n) for n in (13, 5)]
    tokens, positions = decode.pad_prompts(prompts, 16)

    def run(layers):
        cache = KVCache.init(cfg, 2, decode.cache_length(cfg, 16 + 3))
        logits, cache = decode.prefill(graphdef, state, cache, tokens, positions, chunk_size=W, return_all_logits=True,
                                    layers=layers)
        out, tok, pos = [logits], jnp.argmax(logits[:, -1], -1).astype(jnp.int32), jnp.asarray([13, 5], jnp.int32)
        for i in range(3):
            tok, step_logits, cache = decode._decode_step(graphdef, state, cache, tok, pos + i, jax.random.key(i),
                                                       layers=layers)
            out.append(step_logits[:, None])
        return np.concatenate([np.asarray(x) for x in out], axis=1), cache

    (ref, ref_cache), (got, got_cache) = run(None), run(layers)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_cache.k), np.asarray(ref_cache.k), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got_cache.pos), np.asarray(ref_cache.pos))
    with pytest.raises(ValueError, match="per-layer weights hold 1 layers"):
        per_layer.serving_forward(model, layers[:1], jnp.asarray(tokens), jnp.asarray(positions))


@pytest.mark.slow
def test_serving_layers_choice_and_generate_agree(mistral):
    assert per_layer.serving_layers(mistral, False) is None
    auto = per_layer.serving_layers(mistral)  # CPU backend, a tiny model: copies
    assert jax.default_backend() == "cpu" and auto is not None and len(auto) == MISTRAL.n_layers
    prompts = [_prompt(MISTRAL, n, 80 + n) for n in (11, 6)]
    kw = dict(max_new_tokens=12, eos_id=None, temperature=0.8, top_k=20, seed=3)
    assert mj.generate(mistral, prompts, unstack=True, **kw) == mj.generate(mistral, prompts, unstack=False, **kw)


@pytest.mark.slow
def test_logits_to_keep(mistral):
    tokens = jnp.asarray([_prompt(MISTRAL, 12, 90)], jnp.int32)
    full = mistral(tokens)
    np.testing.assert_allclose(np.asarray(mistral(tokens, logits_to_keep=3)), np.asarray(full[:, -3:]), atol=1e-6)
    assert mistral(tokens, logits_to_keep=1).shape == (1, 1, MISTRAL.vocab_size)


# ----------------------------------------------------------------------------- compile once, sharded
def test_compiled_once_per_shape(mistral):
    prompts = [_prompt(MISTRAL, 20, 40)]
    mj.generate(mistral, prompts, max_new_tokens=40, eos_id=None)
    sizes = (decode._forward_chunk._cache_size(), decode._decode_loop._cache_size())
    mj.generate(mistral, [_prompt(MISTRAL, 19, 41)], max_new_tokens=40, eos_id=None)  # same buckets
    mj.generate(mistral, [_prompt(MISTRAL, 18, 42)], max_new_tokens=5, eos_id=None)
    assert (decode._forward_chunk._cache_size(), decode._decode_loop._cache_size()) == sizes


@pytest.mark.slow
def test_sharded_decode_equals_unsharded(mistral):
    cfg, model = MISTRAL, mistral
    mesh = sharding.make_mesh(fsdp=4, tensor=2)  # 8 fake CPU devices: batch over fsdp, kv heads over tensor
    prompts = [_prompt(cfg, n, 50 + n) for n in (15, 9, 12, 4)]
    t, steps = 16, 3
    graphdef, state = nnx.split(model)
    tokens, positions = decode.pad_prompts(prompts, t)
    n_slots = decode.cache_length(cfg, t + steps)

    def run(mesh):
        st, tok, pos = state, tokens, positions
        cache = KVCache.init(cfg, len(prompts), n_slots)
        if mesh is not None:
            st = jax.device_put(state, sharding.state_shardings(state, mesh))
            cache = jax.device_put(cache, cache.shardings(mesh))
            tok, pos = (jax.device_put(x, sharding.named_sharding(mesh, ("batch", "seq"))) for x in (tok, pos))
        # sharded: also through per-layer weight copies (serving_layers keeps their shardings)
        layers = None if mesh is None else per_layer.serving_layers(model, True, st)
        logits, cache = decode.prefill(graphdef, st, cache, tok, pos, chunk_size=W, return_all_logits=True,
                                    layers=layers)
        out = [np.asarray(logits)]
        nxt, p = jnp.argmax(logits[:, -1], -1).astype(jnp.int32), jnp.asarray([len(q) for q in prompts], jnp.int32)
        for i in range(steps):
            nxt, step_logits, cache = decode._decode_step(graphdef, st, cache, nxt, p + i, jax.random.key(i),
                                                       layers=layers)
            out.append(np.asarray(step_logits))
        return out, cache

    ref, _ = run(None)
    with sharding.use_mesh(mesh):
        got, cache = run(mesh)
    spec = cache.k.sharding.spec
    assert spec[1] == "fsdp" and spec[3] == "tensor", spec  # [L, B, S, K, H]: batch and kv heads sharded
    assert cache.pos.sharding.spec[0] == "fsdp"
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    ours = mj.generate(model, prompts, max_new_tokens=5, eos_id=None, mesh=mesh)
    assert ours == mj.generate(model, prompts, max_new_tokens=5, eos_id=None)


# ----------------------------------------------------------------------------- CLI
def test_cli_run_streams_and_stops(mistral, tokenizer):
    import mistral_jax.cli.generate as cli

    buf = io.StringIO()
    text = cli.run(mistral, tokenizer, "the cat sat on", max_new_tokens=20, out=buf)
    ref = tokenizer.decode(mj.generate(mistral, tokenizer.encode("the cat sat on"), max_new_tokens=20,
                                       eos_id=tokenizer.eos_id))
    assert text == ref and buf.getvalue() == ref + "\n"
    stop_str = ref[len(ref) // 2:][:2]
    buf = io.StringIO()
    cut = cli.run(mistral, tokenizer, "the cat sat on", max_new_tokens=20, stop=[stop_str], out=buf)
    assert cut == ref[: ref.index(stop_str)] and buf.getvalue() == cut + "\n"
    # instruct mode: the [INST] template around the prompt
    ids = cli.instruct_prompt_ids("hello", tokenizer)
    assert ids[0] == tokenizer.bos_id and tokenizer.decode(ids) == "[INST] hello [/INST]"
    # importing the CLI module must not break the mj.generate function
    assert callable(mj.generate)
    assert mj.generate(mistral, [1, 5, 7], max_new_tokens=3, eos_id=None) == gen.generate(
        mistral, [1, 5, 7], max_new_tokens=3, eos_id=None)


def test_cli_streams_tokens_one_by_one(mistral, tokenizer):
    import mistral_jax.cli.generate as cli

    class Spy(io.StringIO):
        writes = 0

        def write(self, s):
            Spy.writes += 1
            return super().write(s)

    spy = Spy()
    cli.run(mistral, tokenizer, "the cat", max_new_tokens=16, out=spy)
    assert Spy.writes > 4  # many increments, not one write at the end


@pytest.mark.slow
def test_cli_main_on_jax_export_dir(mistral, tokenizer, tmp_path, capsys):
    import mistral_jax.cli.generate as cli

    mj.save_jax(mistral, str(tmp_path / "export"), tokenizer=tokenizer)
    text = cli.main(["--checkpoint", str(tmp_path / "export"), "--prompt", "the cat sat on", "--max_new_tokens", "20"])
    ref = tokenizer.decode(mj.generate(mistral, tokenizer.encode("the cat sat on"), max_new_tokens=20))
    assert text == ref and capsys.readouterr().out == ref + "\n"


@pytest.mark.slow
def test_cli_subprocess_on_hf_export_dir(mistral, tokenizer, tmp_path):
    mj.save_hf(mistral, str(tmp_path), tokenizer=tokenizer)
    res = subprocess.run([sys.executable, "-m", "mistral_jax.cli.generate", "--checkpoint", str(tmp_path), "--prompt",
                          "the cat sat on", "--max_new_tokens", "6", "--instruct",
                          "--temperature", "0.8", "--top_k", "20", "--top_p", "0.9", "--seed", "5"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    ids = mj.generate(mistral, [tokenizer.bos_id] + tokenizer.encode("[INST] the cat sat on [/INST]", bos=False),
                      max_new_tokens=6, temperature=0.8, top_k=20, top_p=0.9, seed=5)
    assert res.stdout == tokenizer.decode(ids) + "\n"
