"""Grouped-query attention with sliding-window, causal and segment masks, and its backends.

Legend: B batch, T query length, S key length, D model dim, N query heads, K kv heads, G = N // K queries
per kv head, H head_dim, C number of query blocks, Q query block, R keys per query block.

Masks are small predicates on absolute positions, combined with ``&``. Window W: query q sees key k iff
``q - W < k <= q`` (W keys including itself), the HF / xformers convention.

Backends (``ModelConfig.attention_impl``):
  * ``reference``: all T x S scores, then the mask. The oracle.
  * ``blocked``: pure-JAX banded attention that computes only the key blocks inside the window of each
    query block: cost T * (W + Q) instead of T * S. Used for self-attention with a window on CPU/fallback.
  * ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn", local_window_size=...)`` on GPU.
  * ``splash``: Pallas splash attention with a local mask on TPU.
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
from mistral_jax.model import kv_cache as kvc
from mistral_jax.model.projection import proj
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


def cudnn_attention(q, k, v, positions, segment_ids, window):
    """GPU: cuDNN fused attention with a local window (segment ids must be absent; causal on index)."""
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local, implementation="cudnn")


def _splash_local(q, k, v, segment_ids, window):  # pragma: no cover - needs a TPU
    """Splash attention on one device's shard: q [B, T, N, H], k/v [B, T, K, H]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    mask = sm.CausalMask((t, t)) if window is None else sm.LocalMask((t, t), (window - 1, 0), offset=0)
    kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([mask] * (n // kv_heads)))
    seg = None if segment_ids is None else sk.SegmentIds(q=segment_ids, kv=segment_ids)
    qg = (q * h**-0.5).reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
    run = jax.vmap(jax.vmap(kernel, in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, 0 if seg is not None else None))
    out = run(qg, kt, vt, seg)  # [B, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def splash_attention(q, k, v, positions, segment_ids, window):
    """TPU: Pallas splash attention with a causal (and local) mask.

    Mosaic kernels are not partitioned by XLA, so under a mesh the kernel runs in a ``shard_map`` over the
    batch and head axes the rules give (contiguous head shards keep whole GQA groups together).
    """
    ctx = sharding.current()
    if ctx is None:
        return _splash_local(q, k, v, segment_ids, window)
    mesh, rules = ctx
    q_spec = rules.spec(("batch", "seq", "act_heads", "head_dim"), mesh)
    kv_spec = rules.spec(("batch", "seq", "act_kv_heads", "head_dim"), mesh)
    if segment_ids is None:
        local = lambda q, k, v: _splash_local(q, k, v, None, window)
        return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                             check_vma=False)(q, k, v)
    local = lambda q, k, v, s: _splash_local(q, k, v, s, window)
    seg_spec = rules.spec(("batch", "seq"), mesh)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, segment_ids)


SPLASH_BLOCK = 128  # splash's default query / key block: sequences of other lengths use the XLA backends


def pick_backend(impl: str, *, platform: str, self_attention: bool, seq_len: int, window: int | None, block: int,
                 has_segments: bool) -> str:
    """Resolve ``auto`` for the target ``platform`` ("cpu", "gpu", "tpu") and fall back to ``reference`` where a
    backend does not apply."""
    if platform not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"attention backend for platform={platform!r}: expected cpu, gpu or tpu. Fix: build the "
                         "model from a config with a platform (the Transformer fills it in: cfg.for_platform()).")
    if impl == "auto":
        if platform == "gpu" and not has_segments and self_attention:
            impl = "cudnn"
        elif platform == "tpu" and self_attention and seq_len % SPLASH_BLOCK == 0:
            impl = "splash"
        elif window is not None and self_attention and seq_len > window + block:
            impl = "blocked"
        else:
            impl = "reference"
    if impl != "reference" and not self_attention:
        impl = "reference"  # cached decoding attends over the cache buffer: the buffer already is the band
    return impl


def band_block(cfg) -> int:
    """Query block of the blocked backend: ``attention_block_size``, but at most ``max(64, W / 4)``.

    A query block of Q rows reads W + Q keys (waste Q / W) and the band holds a copy of them per block
    (memory ~ T * (W + Q) / Q), so Q ~ W / 4 balances the two. Measured fwd+bwd on this 2-core CPU: W=4096,
    N=16k: Q = 256 and 512 equal, 1024 1.2x slower; a 58M Mistral train step at T=2048, W=512: Q = 128
    6.0 s, 256 6.9 s, 512 7.9 s.
    """
    window = cfg.sliding_window or cfg.attention_block_size
    return min(cfg.attention_block_size, max(64, window // 4))


def attend(cfg, q, k, v, q_pos, k_pos, q_seg=None, k_seg=None, *, self_attention: bool) -> Float[Array, "B T N H"]:
    """Dispatch to the configured backend; all backends agree with ``reference_attention``."""
    block = band_block(cfg)
    impl = pick_backend(cfg.attention_impl, platform=cfg.platform, self_attention=self_attention, seq_len=q.shape[1],
                        window=cfg.sliding_window, block=block, has_segments=q_seg is not None)
    if impl == "blocked" and cfg.sliding_window is not None:
        return blocked_attention(q, k, v, q_pos, q_seg, cfg.sliding_window, block)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, q_pos, q_seg, cfg.sliding_window)
    if impl == "splash":
        return splash_attention(q, k, v, q_pos, q_seg, cfg.sliding_window)
    return reference_attention(q, k, v, make_mask(q_pos, k_pos, q_seg, k_seg, cfg.sliding_window))


# ----------------------------------------------------------------------------- module
class Attention(nnx.Module):
    """Mistral attention: q/k/v projections, RoPE, GQA, output projection (no biases)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg if cfg.platform else cfg.for_platform()  # the Transformer passes it resolved
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
        q = proj("BTD,DNH->BTNH", x, self.wq[...].astype(dt))
        k = proj("BTD,DKH->BTKH", x, self.wk[...].astype(dt))
        v = proj("BTD,DKH->BTKH", x, self.wv[...].astype(dt))
        q = checkpoint_name(apply_rope(q, positions, cfg.rope_theta), "qkv_proj")
        k = checkpoint_name(apply_rope(k, positions, cfg.rope_theta), "qkv_proj")
        v = checkpoint_name(v, "qkv_proj")
        q = sharding.constrain(q, ("batch", "seq", "act_heads", "head_dim"))

        if cache is None:
            out = attend(cfg, q, k, v, positions, positions, segment_ids, segment_ids, self_attention=True)
        else:
            keys, values, k_pos, cache = cache.update(k, v, positions)  # [B, S2, K, H], [B, S2, K, H], [B, S2]
            mask = make_mask(positions, k_pos, window=cfg.sliding_window)  # [B, T, S2]
            out = reference_attention(q, keys.astype(dt), values.astype(dt), mask)
        return proj("BTNH,NHD->BTD", out, self.wo[...].astype(dt)), cache
