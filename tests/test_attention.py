"""Masks (truth tables), RoPE and the attention backends against the reference oracle."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding, apply_rotary_pos_emb

import mistral_jax as mj
from mistral_jax.model import attention as attn
from mistral_jax.model.rope import apply_rope


def _truth_table(t: int, window: int | None) -> np.ndarray:
    """Hand-written: query q sees key k iff k <= q and q - k < W."""
    table = np.zeros((t, t), bool)
    for q, k in itertools.product(range(t), range(t)):
        table[q, k] = k <= q and (window is None or q - k < window)
    return table


@pytest.mark.parametrize("window", [1, 3, 6, None])
def test_mask_truth_table(window):
    t = 6
    pos = jnp.arange(t)[None]
    mask = np.asarray(attn.make_mask(pos, pos, window=window))[0]
    np.testing.assert_array_equal(mask, _truth_table(t, window))
    # W keys including the query itself (HF / xformers convention): every row past W-1 has exactly W keys
    if window is not None:
        assert (mask.sum(1)[window - 1:] == window).all()
    if window == 1:
        np.testing.assert_array_equal(mask, np.eye(t, dtype=bool))
    if window == t or window is None:
        np.testing.assert_array_equal(mask, np.tril(np.ones((t, t), bool)))


def test_window_equal_to_length_is_causal():
    t = 6
    pos = jnp.arange(t)[None]
    np.testing.assert_array_equal(attn.make_mask(pos, pos, window=t), attn.make_mask(pos, pos, window=None))


def test_segment_mask_packs_documents():
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    pos = jnp.array([[0, 1, 2, 0, 1, 0]])  # positions restart per document
    mask = np.asarray(attn.make_mask(pos, pos, seg, seg, window=None))[0]
    expected = np.array([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], bool)
    np.testing.assert_array_equal(mask, expected)


def test_empty_cache_slots_are_masked():
    q_pos = jnp.array([[5]])
    k_pos = jnp.array([[3, -1, 4, 5]])
    np.testing.assert_array_equal(np.asarray(attn.make_mask(q_pos, k_pos, window=3))[0], [[1, 0, 1, 1]])


@pytest.mark.parametrize("theta", [1e4, 1e6])
def test_rope_matches_hf(theta):
    cfg = mj.ModelConfig.tiny(rope_theta=theta)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 4, cfg.head_dim)).astype(np.float32)  # [B, T, N, H]
    pos = np.stack([np.arange(9), np.arange(100, 109)]).astype(np.int32)
    ours = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), theta))
    import transformers

    hc = transformers.MistralConfig(**cfg.to_hf())
    cos, sin = MistralRotaryEmbedding(hc)(torch.zeros(1), torch.from_numpy(pos).long())
    xt = torch.from_numpy(x).transpose(1, 2)  # HF layout [B, N, T, H]
    ref, _ = apply_rotary_pos_emb(xt, xt, cos, sin)
    np.testing.assert_allclose(ours, ref.transpose(1, 2).numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "t,window,block,segments",
    [(40, 16, 8, False), (37, 5, 8, False), (64, 17, 16, True), (33, 40, 8, False), (50, 1, 8, True),
     (24, 8, 32, False)],
)
@pytest.mark.slow
def test_blocked_equals_reference(t, window, block, segments):
    """The banded backend computes only in-window blocks and still equals the full masked attention."""
    rng = np.random.default_rng(t + window)
    b, n, k, h = 2, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    kk = jnp.asarray(rng.standard_normal((b, t, k, h)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, k, h)), jnp.float32)
    if segments:
        cuts = np.sort(rng.choice(np.arange(1, t), size=3, replace=False))
        seg = np.zeros((b, t), np.int32)
        pos = np.zeros((b, t), np.int32)
        for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, t], strict=True)):
            seg[:, lo:hi] = i + 1
            pos[:, lo:hi] = np.arange(hi - lo)
        seg[1, -3:] = 0  # padding tail
        seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    else:
        seg, pos = None, jnp.broadcast_to(jnp.arange(t), (b, t))
    ref = attn.reference_attention(q, kk, v, attn.make_mask(pos, pos, seg, seg, window))
    got = attn.blocked_attention(q, kk, v, pos, seg, window, block)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)


def test_blocked_skips_out_of_window_work():
    """The banded backend's score tensor is T x (W + block), not T x T (checked on the compiled program)."""
    b, t, n, k, h, window, block = 1, 1024, 2, 1, 8, 64, 64
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, t, k, h), jnp.float32)
    pos = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def flops(fn):
        return jax.jit(fn).lower(q, kv, kv, pos).compile().cost_analysis()["flops"]

    blocked = flops(lambda q, k, v, p: attn.blocked_attention(q, k, v, p, None, window, block))
    full = flops(lambda q, k, v, p: attn.reference_attention(q, k, v, attn.make_mask(p, p, window=window)))
    # band share: (W + block) / T = 128 / 1024
    assert blocked < 0.2 * full, (blocked, full)


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_auto_backend_choice(monkeypatch, platform):
    """``auto`` picks exactly one backend per platform and shape (each case pinned, no "any of three")."""
    monkeypatch.setattr(attn.jax, "default_backend", lambda: platform)
    pick = lambda seq_len, window=512, segments=False, self_attention=True: attn.pick_backend(
        "auto", self_attention=self_attention, seq_len=seq_len, window=window, block=512, has_segments=segments)
    banded = {"cpu": "blocked", "gpu": "cudnn", "tpu": "splash"}[platform]
    assert pick(4096) == banded  # T > W + block: the band skips work
    assert pick(600) == {"cpu": "reference", "gpu": "cudnn", "tpu": "splash"}[platform]  # band no cheaper
    assert pick(4096, window=None) == {"cpu": "reference", "gpu": "cudnn", "tpu": "splash"}[platform]
    # packed rows (segment ids): cuDNN's path takes none, so GPU falls back to the pure-JAX choice
    assert pick(4096, segments=True) == {"cpu": "blocked", "gpu": "blocked", "tpu": "splash"}[platform]
    assert pick(1, self_attention=False) == "reference"  # cached decoding: the cache buffer already is the band
    assert attn.pick_backend("blocked", self_attention=False, seq_len=1, window=512, block=512,
                             has_segments=False) == "reference"
