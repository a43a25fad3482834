"""Masks (truth tables), RoPE and the attention backends against the reference oracle."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mistral_jax as mj
from mistral_jax.model import attention as attn
from mistral_jax.model import backends
from mistral_jax.model import kv_cache as kvc
from mistral_jax.model.projection import proj
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


@pytest.mark.parametrize("spec,x_shape,w_shape", [
    ("BTD,DNH->BTNH", (2, 3, 8), (8, 4, 5)),  # query heads
    ("BTNH,NHD->BTD", (2, 3, 4, 5), (4, 5, 8)),  # output projection
    ("BTD,DF->BTF", (2, 3, 8), (8, 6)),  # MLP
])
def test_proj_is_the_einsum(spec, x_shape, w_shape):
    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (x_shape, w_shape))
    np.testing.assert_allclose(np.asarray(proj(spec, x, w)), np.asarray(jnp.einsum(spec, x, w)), atol=1e-5)
    assert proj(spec, x, w, preferred_element_type=jnp.float32).dtype == jnp.float32


@pytest.mark.parametrize("spec", ["BTD,NDH->BTNH", "BTD,DNH->BNTH", "BTD,EF->BTEF", "BTD->BTD"])
def test_proj_rejects_what_is_not_a_projection(spec):
    with pytest.raises(ValueError, match="Fix"):
        proj(spec, jnp.zeros((2, 3, 8)), jnp.zeros((8, 4, 5)))


def test_layer_cache_update_rolls_and_returns_what_queries_attend_over():
    """Slot = position mod S; a token returns the written buffer, a chunk [cache ; chunk]; padding is not stored."""
    s, kv = 4, lambda pos: jnp.asarray(pos, jnp.float32)[..., None, None] * jnp.ones((1, 1, 1, 2))  # [B, T, 1, 2]
    cache = kvc.LayerCache(k=jnp.zeros((1, s, 1, 2)), v=jnp.zeros((1, s, 1, 2)), pos=jnp.full((1, s), kvc.EMPTY))
    chunk = jnp.asarray([[-1, 0, 1, 2, 3, 4]])  # a pad column, then 5 tokens: position 0 is overwritten by 4
    keys, values, k_pos, cache = cache.update(kv(chunk), kv(chunk), chunk)
    np.testing.assert_array_equal(k_pos, [[-1, -1, -1, -1, -1, 0, 1, 2, 3, 4]])  # [cache before ; chunk]
    assert keys.shape == (1, s + 6, 1, 2) and np.array_equal(values[0, s:, 0, 0], [-1, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(cache.pos, [[4, 1, 2, 3]])
    np.testing.assert_array_equal(cache.k[0, :, 0, 0], [4, 1, 2, 3])
    keys, _, k_pos, cache = cache.update(kv([[5]]), kv([[5]]), jnp.asarray([[5]]))
    np.testing.assert_array_equal(k_pos, [[4, 5, 2, 3]])  # one token: the buffer itself, slot 5 mod 4 written
    np.testing.assert_array_equal(keys[0, :, 0, 0], [4, 5, 2, 3])


@pytest.mark.parametrize("theta", [1e4, 1e6])
@pytest.mark.oracle
def test_rope_matches_hf(theta):
    import torch
    import transformers
    from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding, apply_rotary_pos_emb

    cfg = mj.ModelConfig.tiny(rope_theta=theta)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 4, cfg.head_dim)).astype(np.float32)  # [B, T, N, H]
    pos = np.stack([np.arange(9), np.arange(100, 109)]).astype(np.int32)
    ours = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), theta))
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
def test_auto_backend_choice(platform):
    """``auto`` picks exactly one backend per target platform and shape (each case pinned, no "any of three")."""
    pick = lambda seq_len, window=512, segments=False, self_attention=True: backends.choose_attention(
        "auto", platform=platform, self_attention=self_attention, seq_len=seq_len, window=window, block=512,
        has_segments=segments)
    banded = {"cpu": "blocked", "gpu": "cudnn", "tpu": "splash"}[platform]
    assert pick(4096) == banded  # T > W + block: the band skips work
    assert pick(640) == {"cpu": "reference", "gpu": "cudnn", "tpu": "splash"}[platform]  # band no cheaper
    # splash needs whole 128-row blocks: other lengths take the XLA backends on TPU too
    assert pick(600) == {"cpu": "reference", "gpu": "cudnn", "tpu": "reference"}[platform]
    assert pick(4100) == {"cpu": "blocked", "gpu": "cudnn", "tpu": "blocked"}[platform]
    assert pick(4096, window=None) == {"cpu": "reference", "gpu": "cudnn", "tpu": "splash"}[platform]
    # packed rows (segment ids): cuDNN's path takes none, so GPU falls back to the pure-JAX choice
    assert pick(4096, segments=True) == {"cpu": "blocked", "gpu": "blocked", "tpu": "splash"}[platform]
    assert pick(1, self_attention=False) == "reference"  # cached decoding: the cache buffer already is the band
    assert backends.choose_attention("blocked", platform=platform, self_attention=False, seq_len=1, window=512,
                                     block=512, has_segments=False) == "reference"
    named = lambda impl, segments: backends.choose_attention(impl, platform=platform, self_attention=True,
                                                             seq_len=4096, window=512, block=512, has_segments=segments)
    if platform == "gpu":  # a named cuDNN never drops the segment ids of packed rows: the reference takes them
        assert (named("cudnn", False), named("cudnn", True)) == ("cudnn", "reference")
    # the sequence split over 4 context shards: only ring / halo, whatever was named
    split = lambda impl, window: backends.choose_attention(impl, platform=platform, self_attention=True, seq_len=4096,
                                                           window=window, block=512, has_segments=True, context=4)
    assert (split("auto", 512), split("auto", None), split("reference", 512), split("ring", 512)) == (
        "halo", "ring", "halo", "ring")
    with pytest.raises(ValueError, match="platform=''"):
        backends.choose_attention("auto", platform="", self_attention=True, seq_len=1, window=512, block=512,
                                  has_segments=False)


@pytest.mark.parametrize("window, block_size, expected", [
    (4096, 512, 512),  # Mistral 7B: W / 4 = 1024, so the configured block
    (4096, 2048, 1024),  # at most W / 4
    (512, 512, 128),  # W / 4
    (128, 512, 64),  # never below 64 ...
    (100, 512, 64),
    (16, 8, 8),  # ... unless the configured block is smaller
    (None, 512, 128),  # no window: W stands for the block size
])
def test_attention_block_size_rule(window, block_size, expected, monkeypatch):
    """The blocked backend's query block is ``min(attention_block_size, max(64, W // 4))``, and ``attend`` hands
    exactly that block to ``blocked_attention``."""
    cfg = mj.ModelConfig.tiny(attention_impl="blocked", sliding_window=window, attention_block_size=block_size,
                              platform="cpu")
    assert attn.band_block(cfg) == expected
    if window is None:
        return  # without a window the blocked backend is not used (the reference one is)
    seen = []
    monkeypatch.setattr(attn, "blocked_attention", lambda q, k, v, pos, seg, w, block: seen.append((w, block)) or q)
    x = jnp.zeros((1, 8, cfg.n_heads, cfg.head_dim))
    kv = jnp.zeros((1, 8, cfg.n_kv_heads, cfg.head_dim))
    pos = jnp.arange(8)[None]
    attn.attend(cfg, backends.resolve(cfg), x, kv, kv, pos, None)
    assert seen == [(window, expected)]
