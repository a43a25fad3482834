"""Quantized inference: the int8 KV cache (``ModelConfig.kv_cache_dtype = "int8"``, model/kv_cache.py) and int8
weight-only models (``quant.quantize_weights``): their bytes, and logits and greedy decoding against the float
model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mistral_jax as mj
from mistral_jax.model import kv_cache as kvc


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_int8_cache_holds_half_the_bytes_of_bfloat16():
    """Mistral 7B's cache for 8 rows of its 4096-slot window, built abstractly: the k / v buffers are exactly half
    of bfloat16's; with the float32 per-head scales the whole cache is 0.516 of it (1/32 more at H = 128)."""
    cfg = mj.ModelConfig.mistral_7b_v01()
    bf16 = jax.eval_shape(lambda: kvc.KVCache.init(cfg.replace(dtype="bfloat16"), 8))
    int8 = jax.eval_shape(lambda: kvc.KVCache.init(cfg.replace(kv_cache_dtype="int8"), 8))
    assert int8.k.dtype == jnp.int8 and int8.k.shape == bf16.k.shape == (32, 8, 4096, 8, 128)
    assert _bytes((int8.k, int8.v)) * 2 == _bytes((bf16.k, bf16.v))
    ratio = _bytes(int8) / _bytes(bf16)
    assert 0.5 < ratio <= 0.5 + 1 / 32 + 1e-3, ratio
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp4': unknown KV cache dtype. Fix: use auto"):
        mj.ModelConfig.tiny(kv_cache_dtype="fp4")


def test_quantize_round_trip_error_is_half_a_step():
    x = jax.random.normal(jax.random.key(0), (4, 16, 2, 64)) * jnp.arange(1, 3)[None, None, :, None]
    q, scale = kvc.quantize(x)
    assert q.dtype == jnp.int8 and scale.shape == (4, 16, 2) and int(jnp.max(jnp.abs(q))) == 127
    err = jnp.abs(kvc.dequantize(q, scale, jnp.float32) - x)
    assert bool(jnp.all(err <= scale[..., None] / 2 + 1e-6))


@pytest.fixture(scope="module")
def trained(tiny_trained_run):
    """The trained tiny run (window 16) and 40 prompts of 24 tokens from the held-out corpus (past the window)."""
    import sentencepiece as spm

    from mistral_jax.data import corpus

    sp = spm.SentencePieceProcessor(model_file=f"{tiny_trained_run}/tokenizer.model")
    prompts = []
    with open(corpus.VALIDATION) as f:
        for line in f:
            ids = sp.encode(json.loads(line)["text"])
            prompts += [[1] + ids[s:s + 24] for s in range(0, min(len(ids) - 40, 400), 100)]
    return tiny_trained_run, prompts[:40]


@pytest.mark.slow
def test_int8_cache_greedy_decoding_and_logits_agree_with_the_float_cache(trained):
    """40 prompts, 16 greedy tokens each: >= 95 % of the tokens equal the float cache's (measured: 100 %); the
    next-token logits after a cached prefill differ by at most 2 % of their range."""
    workdir, prompts = trained
    assert len(prompts) == 40
    float_model = mj.load_pretrained(workdir)
    int8_model = mj.load_pretrained(workdir, config_overrides={"kv_cache_dtype": "int8"})
    assert int8_model.cfg.kv_cache_dtype == "int8"
    a = np.array(mj.generate(float_model, prompts, max_new_tokens=16, eos_id=None))
    b = np.array(mj.generate(int8_model, prompts, max_new_tokens=16, eos_id=None))
    assert a.shape == b.shape == (40, 16)
    assert (a == b).mean() >= 0.95, (a == b).mean()

    from flax import nnx

    from mistral_jax.inference import decode

    tokens = jnp.asarray([p[:20] for p in prompts[:8]], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(20, dtype=jnp.int32), tokens.shape)
    out = []
    for model in (float_model, int8_model):
        graphdef, state = nnx.split(model)
        cache = kvc.KVCache.init(model.cfg, 8, 64)
        logits, cache = decode.prefill(graphdef, state, cache, tokens[:, :12], positions[:, :12], chunk_size=4)
        logits, cache = decode.prefill(graphdef, state, cache, tokens[:, 12:], positions[:, 12:], chunk_size=4)
        assert cache.quantized == (model is int8_model)
        out.append(np.asarray(logits))
    spread = out[0].max() - out[0].min()
    err = np.abs(out[1] - out[0]).max() / spread
    print(f"int8 KV cache: logits error {err:.2e} of the range, greedy agreement {(a == b).mean():.3f}")
    assert 0 < err <= 0.02, err


@pytest.mark.heavy
def test_server_engine_with_an_int8_cache_equals_generate():
    """The serving engine's paths (batched prefill into rows, the decode-rows loop, prefix-cache snapshots and
    restores) on an int8 cache give generate's tokens on an int8 cache, with and without the prefix cache."""
    from flax import nnx

    from mistral_jax.serve.engine import Engine
    from tests.helpers import IdsTok, submit_all

    cfg = mj.ModelConfig.tiny(sliding_window=8, max_seq_len=256, initializer_range=0.2, kv_cache_dtype="int8")
    model = mj.Transformer(cfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    shared = [int(x) for x in rng.integers(3, cfg.vocab_size, 21)]
    prompts = [shared[:k] + [int(x) for x in rng.integers(3, cfg.vocab_size, m)] for k, m in ((21, 3), (21, 7), (5, 2))]
    want = [[t for t in mj.generate(model, p, max_new_tokens=8, eos_id=None) if t != 2] for p in prompts]
    for mb in (0, 16):
        eng = Engine(model, IdsTok(), max_batch=2, chunk_size=4, prefix_cache_mb=mb).start()
        try:
            assert eng.cache.quantized and eng.cache.k.dtype == jnp.int8
            got = [submit_all(eng, [p], 8, timeout=120)[0] for p in prompts]
            hits = eng.stats()["prefix_hit_tokens"]
        finally:
            eng.stop()
        assert got == want
        assert (hits > 0) == bool(mb)


# ------------------------------------------------------------------------------------------- int8 weights
def test_int8_weights_hold_a_quarter_of_float32_and_dequantize_within_half_a_step():
    from flax import nnx

    from mistral_jax import quant

    cfg = mj.ModelConfig.tiny_mixtral(dim=128, hidden_dim=256)
    model = mj.Transformer(cfg, rngs=nnx.Rngs(0))
    w = model.layers.attention.wq[...]  # float32 [L, D, N, H]
    quant.quantize_weights(model)
    assert quant.is_quantized(model)
    qv = nnx.state(model, quant.QuantizedValue)
    values = [x for x in jax.tree.leaves(qv) if x.dtype == jnp.int8]
    scales = [x for x in jax.tree.leaves(qv) if x.dtype == jnp.float32]
    float_bytes = sum(x.size * 4 for x in values)  # the same weights in float32
    assert _bytes(values) * 4 == float_bytes and _bytes(scales) <= float_bytes / 64
    # every projection weight: |W - q * scale| <= scale / 2, scales per output channel
    wq = model.layers.attention.wq
    assert wq.q.shape == wq.shape == w.shape and wq.scale.shape == (*wq.shape[:1], 1, *wq.shape[2:])  # [L, 1, N, H]
    assert bool(jnp.all(jnp.abs(wq[...] - w) <= wq.scale[...] / 2 + 1e-7))
    assert isinstance(model.layers.feed_forward.w2, quant.Int8Weight)  # the experts
    assert isinstance(model.layers.feed_forward.gate, nnx.Param)  # the router stays float32
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize_weights(model)
    with pytest.raises(ValueError, match=r"mode 'nf4' is not supported. Fix: use one of \['int8', 'int4'\]"):
        quant.quantize_weights(mj.Transformer(cfg, rngs=nnx.Rngs(0)), "nf4")
    lora_model = mj.apply_lora(mj.Transformer(cfg, rngs=nnx.Rngs(0)), rank=2, alpha=4.0)
    with pytest.raises(ValueError, match="LoRA adapters. Fix: merge them first"):
        quant.quantize_weights(lora_model)



def test_int4_weights_pack_two_to_a_byte_and_dequantize_within_half_a_step():
    """QLoRA's int4 base (``quantize_array_int4``): uint8 bytes of two values (row i and row i + n/2), a bfloat16
    scale per 64 input rows and output channel (within 0.4 % of absmax / 7); the dequantized weight is numpy's
    round-to-nearest of each block against that scale, within half a step. Dequantized straight into bfloat16 it
    is the float32 weight cast to bfloat16, bit for bit."""
    import ml_dtypes

    from mistral_jax import quant

    w = jax.random.normal(jax.random.key(0), (3, 128, 5)) * jnp.arange(1, 129)[None, :, None] / 64  # blocks differ
    packed, scale, axis = quant.quantize_array_int4(w, (1,))
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 64, 5) and scale.shape == (3, 2, 5) and axis == -2
    assert scale.dtype == jnp.bfloat16
    weight = quant.Int8Weight(quant.QuantizedValue(packed), quant.QuantizedValue(scale), axis)
    assert weight.shape == w.shape
    wn = np.asarray(w, np.float32).reshape(3, 2, 64, 5)
    exact = np.abs(wn).max(axis=2, keepdims=True) / np.float32(7)
    step = exact.astype(ml_dtypes.bfloat16).astype(np.float64)
    assert np.all(np.abs(step / exact - 1) <= 2.0 ** -8)
    q = np.clip(np.round(wn / step), -7, 7)
    np.testing.assert_allclose(np.asarray(weight[...]), (q * step).reshape(w.shape), rtol=1e-6, atol=1e-6)
    assert np.all(np.abs(np.asarray(weight[...]) - np.asarray(w)) <= np.repeat(step, 64, axis=2).reshape(w.shape) / 2
                  + 1e-6)
    assert not np.allclose(step[:, 0], step[:, 1])  # two blocks, two scales
    u = (q.reshape(w.shape) + 8).astype(np.uint8)  # row i in the low nibble, row i + 64 in the high one
    np.testing.assert_array_equal(np.asarray(packed), u[:, :64] | (u[:, 64:] << 4))
    bf16 = weight.dequantize(jnp.bfloat16)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(bf16).view(np.uint16),
                                  np.asarray(weight[...].astype(jnp.bfloat16)).view(np.uint16))
    with pytest.raises(ValueError, match=r"int4 packs two rows to a byte, but .* 7 rows .* Fix: quantize it to int8"):
        quant.quantize_array_int4(jnp.ones((7, 3)), (0,))

@pytest.mark.slow
def test_int8_weights_logits_and_greedy_decoding_agree_with_the_float_model(trained):
    """The trained tiny run: logits of 8 prompts within 1 % (relative norm; 2 % max) of the float model's (measured
    0.10 % / 0.26 %), and >= 95 % of 40 prompts' 16 greedy tokens equal (measured 100 %)."""
    from mistral_jax import quant

    workdir, prompts = trained
    float_model = mj.load_pretrained(workdir)
    int8_model = quant.quantize_weights(mj.load_pretrained(workdir))
    tokens = jnp.asarray([p[:24] for p in prompts[:8]], jnp.int32)
    a, b = float_model(tokens), int8_model(tokens)
    rel = float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a))
    worst = float(jnp.max(jnp.abs(b - a)) / jnp.max(jnp.abs(a)))
    assert 0 < rel <= 0.01 and worst <= 0.02, (rel, worst)
    ga = np.array(mj.generate(float_model, prompts, max_new_tokens=16, eos_id=None))
    gb = np.array(mj.generate(int8_model, prompts, max_new_tokens=16, eos_id=None))
    print(f"int8 weights: logits relative error {rel:.2e} (max {worst:.2e}), greedy agreement {(ga == gb).mean():.3f}")
    assert (ga == gb).mean() >= 0.95, (ga == gb).mean()


@pytest.mark.slow
@pytest.mark.oracle  # lm-eval
def test_int8_weights_keep_lm_eval_perplexity_within_one_percent(trained, tmp_path):
    """lm-eval's rolling word and byte perplexity of 12 held-out corpus documents through the ``mistral_jax``
    backend: the checkpoint evaluated with int8 weights is within 1 % of the float one (measured: 4e-5 / 6e-6)."""
    from lm_eval.tasks import TaskManager

    from mistral_jax.data import corpus
    from mistral_jax.evals.lm import MistralJaxLM
    from mistral_jax.evals.run import evaluate
    from tests.helpers import ppl_task_yaml

    workdir, _ = trained
    with open(corpus.VALIDATION) as f:
        docs = [json.loads(line)["text"][:1500] for line in f][:12]
    data = tmp_path / "ppl.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    yaml = ppl_task_yaml("local_ppl", data, ("word_perplexity", "byte_perplexity"))
    (tmp_path / "local_ppl.yaml").write_text(yaml)
    tm = TaskManager(include_path=str(tmp_path))
    ppl = {}
    for mode in (None, "int8"):
        lm = MistralJaxLM(workdir, batch_size=8, quantize=mode)
        out = evaluate(lm=lm, tasks=["local_ppl"], task_manager=tm, verbose=False)
        ppl[mode] = [out["results"]["local_ppl"][f"{m}_perplexity,none"] for m in ("word", "byte")]
    print(f"lm-eval perplexity (word, byte): float {ppl[None]}, int8 weights {ppl['int8']}")
    for f, q in zip(ppl[None], ppl["int8"], strict=True):
        assert f > 1 and abs(q / f - 1) <= 0.01, ppl
