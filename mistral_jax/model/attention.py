"""Grouped-query attention with sliding-window, causal and segment masks, and its backends.

Legend: B batch, T query length, S key length, D model dim, N query heads, K kv heads, G = N // K queries
per kv head, H head_dim, C number of query blocks, Q query block, R keys per query block.

Masks are small predicates on absolute positions, combined with ``&``. Window W: query q sees key k iff
``q - W < k <= q`` (W keys including itself), the HF / xformers convention.

Backends (``ModelConfig.attention_impl``; registered in ``backends.py``'s table, chosen by
``backends.choose_attention``):
  * ``reference``: all T x S scores, then the mask. The oracle.
  * ``blocked``: pure-JAX banded attention that computes only the key blocks inside the window of each
    query block: cost T * (W + Q) instead of T * S. Used for self-attention with a window on CPU/fallback.
  * ``cudnn`` (GPU) and ``splash`` (TPU): platform kernels, in ``kernels.py``.
  * ``ring`` and ``halo``: context parallelism (the sequence split over the mesh's context axis), in
    ``context.py``; the only backends used when the sequence is split.
  * ``auto``: cudnn on GPU, splash on TPU, blocked when a window makes it cheaper, else reference. The platform
    is ``ModelConfig.platform`` (the target the program is built for), never the host's backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Bool, Float, Int

from mistral_jax import sharding
from mistral_jax.model import kernels  # noqa: F401 - registers cuDNN and splash first: auto prefers them
from mistral_jax.model import kv_cache as kvc
from mistral_jax.model.backends import ATTENTION, Backends, choose_attention, register_attention, resolve
from mistral_jax.model.projection import weight_proj
from mistral_jax.model.rope import apply_rope

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked row gives a uniform row, not NaN


# ----------------------------------------------------------------------------- mask predicates
def causal(q_pos: Int[Array, "B T"], k_pos: Int[Array, "B S"]) -> Bool[Array, "B T S"]:
    return k_pos[:, None, :] <= q_pos[:, :, None]


def in_window(q_pos: Int[Array, "B T"], k_pos: Int[Array, "B S"], window: int) -> Bool[Array, "B T S"]:
    return q_pos[:, :, None] - k_pos[:, None, :] < window


def same_segment(q_seg: Int[Array, "B T"], k_seg: Int[Array, "B S"]) -> Bool[Array, "B T S"]:
    return q_seg[:, :, None] == k_seg[:, None, :]


def occupied(q_pos: Int[Array, "B T"], k_pos: Int[Array, "B S"]) -> Bool[Array, "B T S"]:
    return jnp.broadcast_to((k_pos >= 0)[:, None, :], (*q_pos.shape, k_pos.shape[1]))


def make_mask(q_pos, k_pos, q_seg=None, k_seg=None, window: int | None = None) -> Bool[Array, "B T S"]:
    """causal & occupied [& window] [& same segment]."""
    mask = causal(q_pos, k_pos) & occupied(q_pos, k_pos)
    if window is not None:
        mask &= in_window(q_pos, k_pos, window)
    if q_seg is not None:
        mask &= same_segment(q_seg, k_seg)
    return mask


# ----------------------------------------------------------------------------- backends
def reference_attention(q: Float[Array, "B T N H"], k: Float[Array, "B S K H"], v: Float[Array, "B S K H"],
                        mask: Bool[Array, "B T S"]) -> Float[Array, "B T N H"]:
    """Masked softmax attention over all T x S scores, GQA as a grouped einsum (no repeat of k/v)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    # float32 scores: the softmax of bfloat16 logits loses the small differences that matter.
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * (h**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # float32 softmax, then back to compute dtype
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)  # [B, T, K, G, H]
    return out.reshape(b, t, n, h)  # [B, T, N, H]


def blocked_attention(q: Float[Array, "B T N H"], k: Float[Array, "B T K H"], v: Float[Array, "B T K H"],
                      positions: Int[Array, "B T"], segment_ids: Int[Array, "B T"] | None, window: int,
                      block: int) -> Float[Array, "B T N H"]:
    """Self-attention that computes only the blocks of the band ``q - W < k <= q``.

    Queries are cut into C blocks of Q rows; block c needs keys ``[c*Q - (W-1), (c+1)*Q)``, which are the
    ``P = ceil((W-1)/Q)`` previous key blocks plus its own: R = (P+1)*Q keys. Those are built by stacking
    P+1 shifted views of the front-padded key blocks (no gather), so work is T * R instead of T * T.
    Assumes positions increase by one within a segment (true for packed documents).
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    block = min(block, t)
    pad_t = -t % block
    c = (t + pad_t) // block
    prev = min(-(-(window - 1) // block), c - 1)  # P previous key blocks a query block can reach
    seg = jnp.zeros_like(positions) if segment_ids is None else segment_ids

    def blocks(x, fill):  # [B, T, ...] -> [B, P + C, Q, ...], P blocks of `fill` in front, tail padded
        width = [(0, 0)] * x.ndim
        width[1] = (prev * block, pad_t)
        x = jnp.pad(x, width, constant_values=fill)
        return x.reshape(b, prev + c, block, *x.shape[2:])

    def band(xb):  # [B, P + C, Q, ...] -> [B, C, R, ...]: for block c, key blocks c .. c + P
        views = [xb[:, j : j + c] for j in range(prev + 1)]  # P+1 x [B, C, Q, ...]
        return jnp.concatenate(views, axis=2)

    qb = jnp.pad(q, [(0, 0), (0, pad_t), (0, 0), (0, 0)]).reshape(b, c, block, kv_heads, n // kv_heads, h)
    kb, vb = band(blocks(k, 0)), band(blocks(v, 0))  # [B, C, R, K, H]
    k_pos = band(blocks(positions, kvc.EMPTY))  # [B, C, R]
    k_seg = band(blocks(seg, -1))  # [B, C, R]
    q_pos = jnp.pad(positions, [(0, 0), (0, pad_t)], constant_values=0).reshape(b, c, block)  # [B, C, Q]
    q_seg = jnp.pad(seg, [(0, 0), (0, pad_t)], constant_values=-2).reshape(b, c, block)  # [B, C, Q]

    flat = lambda x: x.reshape(b * c, *x.shape[2:])  # [B, C, ...] -> [B*C, ...]
    mask = make_mask(flat(q_pos), flat(k_pos), flat(q_seg), flat(k_seg), window)  # [B*C, Q, R]
    # float32 scores for a stable softmax (see reference_attention).
    scores = jnp.einsum("BCQKGH,BCRKH->BCKGQR", qb, kb, preferred_element_type=jnp.float32) * (h**-0.5)
    scores = jnp.where(mask.reshape(b, c, 1, 1, block, -1), scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BCKGQR,BCRKH->BCQKGH", probs, vb)  # [B, C, Q, K, G, H]
    return out.reshape(b, c * block, n, h)[:, :t]  # [B, T, N, H]


def band_block(cfg) -> int:
    """Query block of the blocked backend: ``attention_block_size``, but at most ``max(64, W / 4)``.

    A query block of Q rows reads W + Q keys (waste Q / W) and the band holds a copy of them per block
    (memory ~ T * (W + Q) / Q), so Q ~ W / 4 balances the two (timings: see
    docs/benchmarks.md#blocked-attention-query-block).
    """
    window = cfg.sliding_window or cfg.attention_block_size
    return min(cfg.attention_block_size, max(64, window // 4))


# where the band skips work: a window, and more queries than the W + Q keys each block reads
@register_attention("blocked", supports=lambda c: c.window is not None and c.seq_len > c.window + c.block)
def _blocked(q, k, v, positions, segment_ids, *, window, block, backends=None):
    return blocked_attention(q, k, v, positions, segment_ids, window, block)


@register_attention("reference")
def _reference(q, k, v, positions, segment_ids, *, window, block=None, backends=None):
    return reference_attention(q, k, v, make_mask(positions, positions, segment_ids, segment_ids, window))


def attend(cfg, backends: Backends, q: Float[Array, "B T N H"], k: Float[Array, "B T K H"],
           v: Float[Array, "B T K H"], positions: Int[Array, "B T"], segment_ids: Int[Array, "B T"] | None
           ) -> Float[Array, "B T N H"]:
    """Self-attention by the backend ``choose_attention`` picks for these shapes; all agree with the reference."""
    name = self_attention_backend(cfg, backends, q.shape[1], segment_ids is not None)
    return ATTENTION[name].fn(q, k, v, positions, segment_ids, window=cfg.sliding_window, block=band_block(cfg),
                              backends=backends)


def self_attention_backend(cfg, backends: Backends, seq_len: int, has_segments: bool) -> str:
    """The attention backend of a self-attention call over ``seq_len`` tokens (split over ``backends.context``
    shards of the context axis): ``ring`` means the model lays the sequence out zig-zag (``model/context.py``)."""
    return choose_attention(backends.attention, platform=backends.platform, self_attention=True, seq_len=seq_len,
                            window=cfg.sliding_window, block=band_block(cfg), has_segments=has_segments,
                            context=backends.context, dtype=cfg.dtype)


# ----------------------------------------------------------------------------- module
class Attention(nnx.Module):
    """Mistral attention: q/k/v projections, RoPE, GQA, output projection (no biases)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, backends: Backends | None = None):
        self.cfg = cfg if cfg.platform else cfg.for_platform()  # the Transformer passes it resolved
        self.backends = backends if backends is not None else resolve(self.cfg)  # chosen once (backends.py)
        d, n, kh, h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        init = nnx.initializers.normal(cfg.initializer_range)
        pd = cfg.jnp_param_dtype
        self.wq = nnx.Param(init(rngs.params(), (d, n, h), pd), logical_axes=("embed", "heads", "head_dim"))
        self.wk = nnx.Param(init(rngs.params(), (d, kh, h), pd), logical_axes=("embed", "kv_heads", "head_dim"))
        self.wv = nnx.Param(init(rngs.params(), (d, kh, h), pd), logical_axes=("embed", "kv_heads", "head_dim"))
        self.wo = nnx.Param(init(rngs.params(), (n, h, d), pd), logical_axes=("heads", "head_dim", "embed"))

    def __call__(self, x: Float[Array, "B T D"], positions: Int[Array, "B T"], segment_ids: Int[Array, "B T"] | None,
                 cache: kvc.LayerCache | None = None) -> tuple[Float[Array, "B T D"], kvc.LayerCache | None]:
        """Self-attention over ``x``; with a ``cache`` (this layer's view) also over the cached positions.

        Returns ``(out [B, T, D], the updated cache or None)``.
        """
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        q = weight_proj("BTD,DNH->BTNH", x, self.wq, dt, cfg.matmul_quant)
        k = weight_proj("BTD,DKH->BTKH", x, self.wk, dt, cfg.matmul_quant)
        v = weight_proj("BTD,DKH->BTKH", x, self.wv, dt, cfg.matmul_quant)
        q = checkpoint_name(apply_rope(q, positions, cfg.rope_theta), "qkv_proj")
        k = checkpoint_name(apply_rope(k, positions, cfg.rope_theta), "qkv_proj")
        v = checkpoint_name(v, "qkv_proj")
        q = sharding.constrain(q, ("batch", "seq", "act_heads", "head_dim"))

        if cache is None:
            out = attend(cfg, self.backends, q, k, v, positions, segment_ids)
        else:
            keys, values, k_pos, cache = cache.update(k, v, positions)  # [B, S2, K, H], [B, S2, K, H], [B, S2]
            # the cache buffer already is the band: the reference attention over it
            mask = make_mask(positions, k_pos, window=cfg.sliding_window)  # [B, T, S2]
            out = reference_attention(q, keys.astype(dt), values.astype(dt), mask)
        return weight_proj("BTNH,NHD->BTD", out, self.wo, dt, cfg.matmul_quant), cache
