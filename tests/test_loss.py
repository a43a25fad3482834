"""The training loss against PyTorch: token cross-entropy and "CE + aux coef * load balancing + z coef * z";
the chunked cross-entropy (``ModelConfig.loss_chunk_size``) against the plain one.

Oracles: ``torch.nn.functional.cross_entropy`` for the token loss, and HF transformers' ``MixtralForCausalLM``
(labels + ``output_router_logits=True``), which returns ``CE + router_aux_loss_coef * load_balancing_loss``;
the z-loss term (not in HF) is computed in the test from HF's router logits. The chunked loss's oracle is the
plain ``cross_entropy`` on full logits (values and gradients), and XLA's memory analysis of the compiled
gradient for the claim that it never holds the ``[B, T, V]`` float32 logits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mistral_jax as mj
from mistral_jax import sharding as sh
from mistral_jax.model.transformer import abstract_model
from mistral_jax.training import step as step_lib
from mistral_jax.training.loss import chunked_cross_entropy, cross_entropy, loss_fn


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.oracle
def test_cross_entropy_matches_torch(dtype):
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 17, 301)) * 8).astype(np.float32)  # large logits: logsumexp matters
    logits = np.asarray(jnp.asarray(logits, dtype).astype(jnp.float32))  # the values a bf16 model would give
    targets = rng.integers(0, 301, (3, 17)).astype(np.int32)
    weights = (rng.random((3, 17)) > 0.3).astype(np.float32)  # 0 = padding / prompt tokens
    ce_sum, n = cross_entropy(jnp.asarray(logits, dtype), jnp.asarray(targets), jnp.asarray(weights))
    ref = F.cross_entropy(torch.from_numpy(logits).reshape(-1, 301), torch.from_numpy(targets).long().reshape(-1),
                          reduction="none").reshape(3, 17)
    np.testing.assert_allclose(float(n), weights.sum())
    np.testing.assert_allclose(float(ce_sum), float((ref * torch.from_numpy(weights)).sum()), rtol=1e-6)


def _mixtral_batch(cfg, lengths, T=24):
    """Our batch and HF's (input_ids, labels, attention_mask) for right-padded rows of the given lengths."""
    import torch

    rng = np.random.default_rng(5)
    tokens = rng.integers(0, cfg.vocab_size, (len(lengths), T)).astype(np.int32)
    valid = np.arange(T)[None] < np.asarray(lengths)[:, None]
    # HF shifts labels inside: logits at t predict labels[t + 1]; the last position predicts nothing.
    targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)
    weights = (valid & np.roll(valid, -1, axis=1)).astype(np.float32)
    weights[:, -1] = 0
    batch = dict(tokens=tokens, targets=targets, weights=weights, segment_ids=valid.astype(np.int32),
                 positions=np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape).copy())
    labels = torch.from_numpy(np.where(valid, tokens, -100)).long()
    return batch, torch.from_numpy(tokens).long(), labels, torch.from_numpy(valid.astype(np.int64))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.slow
@pytest.mark.oracle
def test_mixtral_loss_matches_hf(padded):
    import torch

    from tests.torch_ref import hf_model

    cfg = mj.ModelConfig.tiny_mixtral(moe_impl="ragged", initializer_range=0.2, router_aux_loss_coef=0.3,
                                      router_z_loss_coef=0.05)
    model = mj.Transformer(cfg, rngs=nnx.Rngs(1))
    hf = hf_model(cfg, model)
    lengths = [24, 15] if padded else [24, 24]
    batch, ids, labels, mask = _mixtral_batch(cfg, lengths)
    with torch.no_grad():
        out = hf(ids, labels=labels, attention_mask=mask if padded else None, output_router_logits=True)
    valid = mask.numpy().reshape(-1).astype(bool)
    z = np.mean(np.concatenate([torch.logsumexp(r, -1).numpy()[valid] for r in out.router_logits]) ** 2)
    expected = out.loss.item() + cfg.router_z_loss_coef * z  # HF: CE + aux coef * load balancing

    loss, metrics = loss_fn(model, {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(float(metrics["aux_loss"]), out.aux_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["z_loss"]), z, rtol=1e-4)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ce_loss"]), out.loss.item() - cfg.router_aux_loss_coef *
                               out.aux_loss.item(), rtol=1e-5)

    # each coefficient enters as its weight: doubling it adds exactly one more of its term
    for field, term in (("router_aux_loss_coef", metrics["aux_loss"]), ("router_z_loss_coef", metrics["z_loss"])):
        model.cfg = dataclasses.replace(cfg, **{field: 2 * getattr(cfg, field)})
        doubled, _ = loss_fn(model, {k: jnp.asarray(v) for k, v in batch.items()})
        np.testing.assert_allclose(float(doubled - loss), getattr(cfg, field) * float(term), rtol=1e-4)
    model.cfg = cfg


@pytest.mark.slow
@pytest.mark.oracle
def test_dense_loss_matches_hf():
    import torch

    from tests.torch_ref import hf_model

    cfg = mj.ModelConfig.tiny(initializer_range=0.2)
    model = mj.Transformer(cfg, rngs=nnx.Rngs(2))
    batch, ids, labels, mask = _mixtral_batch(cfg, [24, 11, 20])
    with torch.no_grad():
        ref = hf_model(cfg, model)(ids, labels=labels, attention_mask=mask).loss.item()
    loss, metrics = loss_fn(model, {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    assert float(metrics["tokens"]) == float((labels[:, 1:] != -100).sum())


# ----------------------------------------------------------------------------- chunked cross-entropy
T = 24


def _packed_batch(cfg, rows=2, seed=3):
    """Two packed documents per row, zero weights on some targets (padding / prompt tokens)."""
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, cfg.vocab_size, (rows, T + 1)).astype(np.int32)
    seg = np.where(np.arange(T) < 10, 1, 2).astype(np.int32)[None].repeat(rows, 0)
    seg[-1, -4:] = 0  # padding at the end of the last row
    pos = np.where(seg == 2, np.arange(T) - 10, np.arange(T)).astype(np.int32)
    weights = ((rng.random((rows, T)) > 0.25) & (seg != 0)).astype(np.float32)
    batch = dict(tokens=tok[:, :-1], targets=tok[:, 1:], weights=weights, positions=pos, segment_ids=seg)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _assert_trees_close(a, b, atol, rtol=0.0):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol), a, b)


def test_forward_return_hidden_and_head_logits_give_the_logits():
    model = mj.Transformer(mj.ModelConfig.tiny(initializer_range=0.2), rngs=nnx.Rngs(0))
    batch = _packed_batch(model.cfg)

    @nnx.jit
    def outputs(model, batch):
        args = (batch["tokens"], batch["positions"], batch["segment_ids"])
        full, out = model.forward(*args), model.forward(*args, return_hidden=True)
        return full, out, model.head_logits(out.hidden, model.head_weight()), model(*args)

    full, out, from_hidden, shorthand = outputs(model, batch)
    assert full.hidden is None and out.logits is None and out.hidden.shape == (2, T, model.cfg.dim)
    np.testing.assert_allclose(np.asarray(from_hidden), np.asarray(full.logits), atol=1e-6)
    _assert_trees_close(out.aux, full.aux, atol=0)
    np.testing.assert_array_equal(np.asarray(shorthand), np.asarray(full.logits))  # model(tokens): the logits


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 8, 24, 100])  # 5: T = 24 is not a multiple (zero-weight padding)
def test_chunked_cross_entropy_matches_plain_value_and_gradients(chunk, tie):
    """Same sum and count, same gradients w.r.t. the hidden states and the head (tied: the embedding)."""
    model = mj.Transformer(mj.ModelConfig.tiny(initializer_range=0.2, tie_embeddings=tie), rngs=nnx.Rngs(1))
    batch = _packed_batch(model.cfg)
    hidden = model.forward(batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True).hidden
    head = model.head_weight()
    tw = (batch["targets"], batch["weights"])

    def plain(h, w):
        return cross_entropy(model.head_logits(h, w), *tw)

    def chunked(h, w):
        return chunked_cross_entropy(h, w, *tw, chunk, model.head_logits)

    (ref_sum, ref_n), (got_sum, got_n) = jax.jit(plain)(hidden, head), jax.jit(chunked)(hidden, head)
    assert float(got_n) == float(ref_n) == float(batch["weights"].sum())
    np.testing.assert_allclose(float(got_sum), float(ref_sum), rtol=1e-6)
    grad = lambda f: jax.jit(jax.grad(lambda h, w: f(h, w)[0], argnums=(0, 1)))(hidden, head)
    (gh_ref, gw_ref), (gh, gw) = grad(plain), grad(chunked)
    np.testing.assert_allclose(np.asarray(gh), np.asarray(gh_ref), atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(gw_ref), atol=1e-5)
    # zero-weight targets get no gradient: their hidden states' gradient is exactly 0
    np.testing.assert_array_equal(np.asarray(gh)[np.asarray(batch["weights"]) == 0], 0.0)


def test_chunked_cross_entropy_rejects_a_non_positive_chunk():
    with pytest.raises(ValueError, match="chunk_size=0"):
        chunked_cross_entropy(jnp.zeros((1, 4, 8)), jnp.zeros((8, 16)), jnp.zeros((1, 4), jnp.int32),
                              jnp.ones((1, 4)), 0, lambda x, w: x @ w)


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_loss_chunk_size_is_validated(value):
    with pytest.raises(ValueError) as e:
        mj.ModelConfig.tiny(loss_chunk_size=value)
    assert f"loss_chunk_size={value!r}" in str(e.value) and "Fix:" in str(e.value)
    assert "loss_chunk_size" in mj.ModelConfig.runtime_fields()


def _loss_and_grads(cfg, params, batch):
    graphdef = nnx.graphdef(abstract_model(cfg))
    fn = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch), has_aux=True)
    return jax.jit(fn)(params)


@pytest.mark.parametrize("preset,dtype,chunk", [
    ("tiny", "float32", 7),  # 7: a ragged last chunk (T = 24)
    pytest.param("tiny_mixtral", "float32", 7, marks=pytest.mark.slow),
    pytest.param("tiny", "bfloat16", 8, marks=pytest.mark.slow),
])
@pytest.mark.heavy
def test_loss_fn_chunked_equals_plain(preset, dtype, chunk):
    """``loss_fn``: loss, every metric and the gradient w.r.t. every parameter, chunked and not. bfloat16
    compute: the same matmuls per position, float32 logits either way."""
    cfg = mj.ModelConfig.preset(preset, initializer_range=0.2, dtype=dtype, router_z_loss_coef=1e-2)
    params = nnx.state(mj.Transformer(cfg, rngs=nnx.Rngs(2)), nnx.Param)
    batch = _packed_batch(cfg)
    (ref_loss, ref_metrics), ref_grads = _loss_and_grads(cfg, params, batch)
    (loss, metrics), grads = _loss_and_grads(cfg.replace(loss_chunk_size=chunk), params, batch)
    tol = 1e-5 if dtype == "float32" else 2e-3
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6 if dtype == "float32" else 1e-3)
    _assert_trees_close(metrics, ref_metrics, atol=tol)
    _assert_trees_close(grads, ref_grads, atol=tol)


def test_eval_sums_chunked_equal_plain():
    cfg = mj.ModelConfig.tiny(initializer_range=0.2)
    graphdef, params = nnx.split(mj.Transformer(cfg, rngs=nnx.Rngs(4)), nnx.Param)
    chunked_graphdef = nnx.graphdef(abstract_model(cfg.replace(loss_chunk_size=5)))
    batch = _packed_batch(cfg)
    ref = step_lib.TOKEN_LOSS.eval_sums(graphdef, params, {}, batch)
    got = step_lib.TOKEN_LOSS.eval_sums(chunked_graphdef, params, {}, batch)
    _assert_trees_close(got, ref, atol=1e-5, rtol=1e-6)  # a summed loss of ~256: float32 rounding
    # the chunked eval never builds the [B, T, V] float32 logits, only [B, 5, V] chunks
    jaxpr = lambda g: str(jax.make_jaxpr(lambda p: step_lib.TOKEN_LOSS.eval_sums(g, p, {}, batch))(params))
    full, chunk = f"f32[2,{T},{cfg.vocab_size}]", f"f32[2,5,{cfg.vocab_size}]"
    assert full in jaxpr(graphdef) and full not in jaxpr(chunked_graphdef) and chunk in jaxpr(chunked_graphdef)


@pytest.mark.slow
def test_chunked_loss_sharded_equals_single_device():
    """Under an FSDP x TP mesh (vocab-sharded logits, batch-sharded hidden states) the chunked loss and its
    gradients equal the unsharded plain ones."""
    cfg = mj.ModelConfig.tiny(initializer_range=0.2)
    params = nnx.state(mj.Transformer(cfg, rngs=nnx.Rngs(5)), nnx.Param)
    batch = _packed_batch(cfg, rows=8)
    (ref_loss, _), ref_grads = _loss_and_grads(cfg, params, batch)
    chunked = cfg.replace(loss_chunk_size=5)
    mesh, rules = sh.make_mesh(fsdp=4, tensor=2), sh.rules_preset("fsdp_tp")
    shardings = sh.state_shardings(nnx.state(abstract_model(chunked), nnx.Param), mesh, rules)
    graphdef = nnx.graphdef(abstract_model(chunked))
    fn = jax.value_and_grad(lambda p, b: loss_fn(nnx.merge(graphdef, p), b)[0])
    with sh.use_mesh(mesh, rules):
        bs = sh.batch_sharding(mesh, rules)
        loss, grads = jax.jit(fn, in_shardings=(shardings, {k: bs for k in batch}),
                              out_shardings=(sh.replicated(mesh), shardings))(params, batch)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    _assert_trees_close(grads, ref_grads, atol=1e-5)


@pytest.mark.heavy
def test_chunked_loss_does_not_hold_the_full_logits():
    """Compiled (CPU) gradient of ``loss_fn`` at V = 32768, T = 512: the plain program's temporaries hold the
    float32 logits (and their gradient), the chunked one's stay below a quarter of the logits' size."""
    V, B, T_, chunk = 32768, 1, 512, 32
    cfg = mj.ModelConfig.tiny(vocab_size=V, n_layers=1, dim=32, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64,
                              max_seq_len=T_)
    params = nnx.state(abstract_model(cfg), nnx.Param)
    batch = {k: jax.ShapeDtypeStruct((B, T_), d) for k, d in (("tokens", jnp.int32), ("targets", jnp.int32),
                                                              ("weights", jnp.float32))}

    def temp_bytes(c):
        graphdef = nnx.graphdef(abstract_model(cfg.replace(loss_chunk_size=c)))
        fn = jax.jit(jax.grad(lambda p, b: loss_fn(nnx.merge(graphdef, p), b)[0]))
        return fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = B * T_ * V * jnp.dtype(jnp.float32).itemsize  # 64 MiB
    chunk_logits_bytes = logits_bytes * chunk // T_  # 4 MiB
    plain, chunked = temp_bytes(0), temp_bytes(chunk)
    assert plain >= logits_bytes, (plain, logits_bytes)
    assert chunked < logits_bytes // 4, (chunked, logits_bytes)
    assert chunked < 4 * chunk_logits_bytes, (chunked, chunk_logits_bytes)  # a few chunks' logits, not T / chunk
