"""The training loss against PyTorch: token cross-entropy and "CE + aux coef * load balancing + z coef * z".

Oracles: ``torch.nn.functional.cross_entropy`` for the token loss, and HF transformers' ``MixtralForCausalLM``
(labels + ``output_router_logits=True``), which returns ``CE + router_aux_loss_coef * load_balancing_loss``;
the z-loss term (not in HF) is computed in the test from HF's router logits.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import mistral_jax as mj
from mistral_jax.training.loss import cross_entropy, loss_fn
from tests.torch_ref import hf_model


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_matches_torch(dtype):
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
def test_mixtral_loss_matches_hf(padded):
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
def test_dense_loss_matches_hf():
    cfg = mj.ModelConfig.tiny(initializer_range=0.2)
    model = mj.Transformer(cfg, rngs=nnx.Rngs(2))
    batch, ids, labels, mask = _mixtral_batch(cfg, [24, 11, 20])
    with torch.no_grad():
        ref = hf_model(cfg, model)(ids, labels=labels, attention_mask=mask).loss.item()
    loss, metrics = loss_fn(model, {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    assert float(metrics["tokens"]) == float((labels[:, 1:] != -100).sum())
