"""Context parallelism: self-attention over a sequence split over the mesh's ``context`` axis (P shards).

Legend: B batch, T sequence (global), L = T / P rows per shard, C = L / 2 (a zig-zag chunk), N query heads,
K kv heads, G = N // K, H head_dim, W window.

The rules table maps the activations' ``seq`` to the ``context`` axis, so every op of the model but attention
is per token and needs nothing: the model code keeps its einsums. Attention is the only place where a token
reads other tokens; two backends (registered in ``backends.py``'s table, chosen by ``backends.choose_attention``
whenever the sequence is split) run it inside a ``shard_map`` over the mesh:

* ``ring`` (full causal attention, or a window wider than the ring saves): the K/V shards travel around the
  ring of P devices (``ppermute``, P - 1 hops) and each device merges the blocks with an online softmax (each
  block's output and log-sum-exp, rescaled). The causal mask would leave the last shard P times the work of
  the first, so the sequence is laid out zig-zag (``to_zigzag``): shard i holds chunks i and 2P - 1 - i of
  2P equal chunks. At every hop after the first a shard then needs exactly half of the pairs: all its queries
  against the first chunk of an earlier shard, or its second chunk of queries against all of a later shard's
  keys (the rest is masked by causality), so every device does the same work. The model reorders its tokens
  into this layout once before the first layer and its hidden states back once after the last
  (``Transformer.forward``); every other op is per token, the mask uses the tokens' positions and segments.
* ``halo`` (a sliding window): with the sequence in order, a shard's queries see only the W - 1 keys before its
  first row, which live on the shard(s) to its left. Each device sends its last W - 1 K/V rows (and their
  positions and segments) to the right neighbour (more hops when W - 1 > L), one ``ppermute`` of O(W) rows per
  layer instead of the ring's P - 1 hops of L rows, then runs the banded attention over ``[halo, own rows]``.

Both backends assume positions increase within a segment along the sequence (packed documents), as the
blocked backend does. Inside a shard, queries go in chunks of ``QUERY_CHUNK`` (a loop): one chunk's float32 scores
live at a time and are recomputed in the backward pass (``jax.checkpoint``), so only each chunk's output and
log-sum-exp are kept. The math is XLA's on every platform (no splash kernel inside a shard yet).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from mistral_jax.model import kv_cache as kvc
from mistral_jax.model.attention import NEG_INF, make_mask
from mistral_jax.model.backends import register_attention


# ----------------------------------------------------------------------------------------------- zig-zag layout
def to_zigzag(x: Array, shards: int) -> Array:
    """``[B, T, ...]`` in sequence order -> zig-zag: 2P chunks, shard i's block holds chunks i and 2P - 1 - i."""
    b, t = x.shape[:2]
    c = t // (2 * shards)
    halves = x.reshape(b, 2, shards, c, *x.shape[2:])
    first, second = halves[:, 0], jnp.flip(halves[:, 1], axis=1)  # [B, P, C, ...] chunks i and 2P - 1 - i
    return jnp.stack([first, second], axis=2).reshape(x.shape)


def from_zigzag(x: Array, shards: int) -> Array:
    """The inverse of ``to_zigzag``."""
    b, t = x.shape[:2]
    c = t // (2 * shards)
    pairs = x.reshape(b, shards, 2, c, *x.shape[2:])
    return jnp.concatenate([pairs[:, :, 0], jnp.flip(pairs[:, :, 1], axis=1)], axis=1).reshape(x.shape)


# ----------------------------------------------------------------------------------------------- blocks
QUERY_CHUNK = 512  # queries per step of the loop inside a block: one chunk's float32 scores live at a time


def _scores_out(q, k, v, q_pos, k_pos, q_seg, k_seg, window):
    """Queries ``q [B, Q, K, G, H]`` against keys ``[B, S, K, H]``: normalised output [B, K, G, Q, H] (float32) and
    the log-sum-exp of the scores [B, K, G, Q] (a fully masked row gets ~ -inf: it weighs nothing in ``_merge``)."""
    h = q.shape[-1]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * (h**-0.5)
    scores = jnp.where(make_mask(q_pos, k_pos, q_seg, k_seg, window)[:, None, None], scores, NEG_INF)
    m = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - m)
    total = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("BKGTS,BSKH->BKGTH", (p / total).astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out, (m + jnp.log(total))[..., 0]


def _chunk(t: int, chunk: int) -> int:
    """The largest divisor of ``t`` that is at most ``chunk`` (the query rows per loop step)."""
    return next(d for d in range(min(chunk, t), 0, -1) if t % d == 0)


def _block(q: Float[Array, "B T K G H"], k: Float[Array, "B S K H"], v: Float[Array, "B S K H"],
           q_pos: Int[Array, "B T"], k_pos: Int[Array, "B S"], q_seg: Int[Array, "B T"], k_seg: Int[Array, "B S"],
           window: int | None, band: int | None = None, chunk: int | None = None
           ) -> tuple[Float[Array, "B K G T H"], Float[Array, "B K G T"]]:
    """A block of queries against a block of keys, in a loop over chunks of the queries, each chunk's scores
    recomputed in the backward pass (``jax.checkpoint``): memory is one chunk's scores, not the block's.

    ``band``: query chunk j (rows ``[jQ, (j+1)Q)``) reads only keys ``[jQ, jQ + band)`` (the halo's layout: keys are
    the W - 1 rows before the queries, then the queries' own); None: every key.
    """
    b, t, kh, g, h = q.shape
    qc = _chunk(t, chunk or QUERY_CHUNK)
    n = t // qc

    def step(j, qj, pj, sj):
        if band is None:
            return _scores_out(qj, k, v, pj, k_pos, sj, k_seg, window)
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, j * qc, band, axis=1)
        return _scores_out(qj, sl(k), sl(v), pj, sl(k_pos), sj, sl(k_seg), window)

    step = jax.checkpoint(step)
    if n == 1:
        return step(0, q, q_pos, q_seg)
    split = lambda x: jnp.moveaxis(x.reshape(b, n, qc, *x.shape[2:]), 1, 0)  # [n, B, Q, ...]
    o, lse = jax.lax.map(lambda a: step(*a), (jnp.arange(n), split(q), split(q_pos), split(q_seg)))
    o = jnp.moveaxis(o, 0, 3).reshape(b, kh, g, t, h)  # [n, B, K, G, Q, H] -> [B, K, G, T, H]
    return o, jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, t)


def _merge(o_a, lse_a, o_b, lse_b):
    """Two partial softmax outputs over disjoint key sets -> the output over their union."""
    lse = jnp.logaddexp(lse_a, lse_b)
    return o_a * jnp.exp(lse_a - lse)[..., None] + o_b * jnp.exp(lse_b - lse)[..., None], lse


def _ungroup(o: Float[Array, "B K G T H"], dtype) -> Float[Array, "B T N H"]:
    b, kh, g, t, h = o.shape
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, kh * g, h).astype(dtype)


SCOPE = "context_attention"  # the name scope of the exchanges (the HLO's op_name: aot.hlo.collective_traffic)


def _shard_map(local, backends, q, k, v, positions, segment_ids):
    """Run ``local(q, k, v, positions, segment_ids)`` on each device's shard (specs from the rules)."""
    q_spec, kv_spec, seg_spec = backends.attention_specs
    seg = jnp.zeros_like(positions) if segment_ids is None else segment_ids
    with jax.named_scope(SCOPE):
        return jax.shard_map(local, mesh=backends.mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                             out_specs=q_spec, check_vma=False)(q, k, v, positions, seg)


# ----------------------------------------------------------------------------------------------- ring
def _ring_local(q, k, v, pos, seg, *, window, axis, shards):
    """One device's part of ring attention on the zig-zag layout (see the module docstring)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    c = t // 2
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
    block = functools.partial(_block, window=window)
    o, lse = block(qg, k, v, pos, pos, seg, seg)  # own two chunks
    me = jax.lax.axis_index(axis)
    perm = [(j, (j + 1) % shards) for j in range(shards)]
    cur = (k, v, pos, seg)
    for hop in range(1, shards):
        cur = tuple(jax.lax.ppermute(x, axis, perm) for x in cur)  # now shard (me - hop)'s keys

        def earlier(args):  # source before me: its first chunk precedes both of mine, its second follows both
            qg, ks, vs, ps, ss = args
            return block(qg, ks[:, :c], vs[:, :c], pos, ps[:, :c], seg, ss[:, :c])

        def later(args):  # source after me: both its chunks follow my first chunk and precede my second
            qg, ks, vs, ps, ss = args
            o2, l2 = block(qg[:, c:], ks, vs, pos[:, c:], ps, seg[:, c:], ss)
            return (jnp.concatenate([jnp.zeros_like(o2), o2], axis=3),
                    jnp.concatenate([jnp.full_like(l2, NEG_INF), l2], axis=3))

        o_s, lse_s = jax.lax.cond(hop <= me, earlier, later, (qg, *cur))
        o, lse = _merge(o, lse, o_s, lse_s)
    return _ungroup(o, q.dtype)


def ring_attention(q, k, v, positions, segment_ids, *, window, backends, block=None):
    """Ring attention over the context axis; ``q, k, v, positions, segment_ids`` in the zig-zag layout."""
    local = functools.partial(_ring_local, window=window, axis=backends.context_axis, shards=backends.context)
    return _shard_map(local, backends, q, k, v, positions, segment_ids)


# ----------------------------------------------------------------------------------------------- halo
def halo_hops(window: int, shard_len: int, shards: int) -> int:
    """How many left neighbours a shard of ``shard_len`` rows needs keys from for a window of ``window``."""
    return min(-(-(window - 1) // shard_len), shards - 1)


def _halo_local(q, k, v, pos, seg, *, window, block, axis, shards):
    """One device's part of the halo exchange: the last W - 1 rows before its own, then banded attention."""
    t = q.shape[1]
    hops = halo_hops(window, t, shards)
    me = jax.lax.axis_index(axis)
    parts = []
    for d in range(hops, 0, -1):  # farthest neighbour first: the rows come out in sequence order
        rows = min(t, window - 1 - (d - 1) * t)
        tail = tuple(x[:, t - rows:] for x in (k, v, pos, seg))
        perm = [(j, j + d) for j in range(shards - d)]
        kh, vh, ph, sh = (jax.lax.ppermute(x, axis, perm) for x in tail)
        ph = jnp.where(me >= d, ph, kvc.EMPTY)  # the first shards have no left neighbour that far: empty slots
        parts.append((kh, vh, ph, sh))
    halo = sum(p[0].shape[1] for p in parts)
    front = window - 1 - halo  # the first shards' windows reach past the sequence start: empty slots
    k_ext, v_ext, p_ext, s_ext = (jnp.pad(jnp.concatenate([p[i] for p in parts] + [x], axis=1),
                                          [(0, 0), (front, 0)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
                                  for i, (x, fill) in enumerate(((k, 0), (v, 0), (pos, kvc.EMPTY), (seg, 0))))
    b, _, n, h = q.shape
    qg = q.reshape(b, t, k.shape[2], n // k.shape[2], h)
    chunk = _chunk(t, min(block, QUERY_CHUNK))  # query chunk j reads the W - 1 + Q keys of its band
    o, _ = _block(qg, k_ext, v_ext, pos, p_ext, seg, s_ext, window, band=window - 1 + chunk, chunk=chunk)
    return _ungroup(o, q.dtype)


def halo_attention(q, k, v, positions, segment_ids, *, window, backends, block):
    """Sliding-window attention over the context axis with a halo of the W - 1 rows before each shard."""
    local = functools.partial(_halo_local, window=window, block=block, axis=backends.context_axis,
                              shards=backends.context)
    return _shard_map(local, backends, q, k, v, positions, segment_ids)


# Registered after the single-device backends; ``choose_attention`` takes them (and only them) when the sequence
# is split (``call.context`` > 1), halo first where it applies.
def _ring_supports(call) -> bool:
    return call.context > 1 and call.seq_len % (2 * call.context) == 0


def _halo_supports(call) -> bool:
    """A window whose halo (W - 1 rows) is shorter than what the ring moves ((P - 1) shards), or no ring."""
    return call.context > 1 and call.window is not None and call.seq_len % call.context == 0 and (
        call.window - 1 < (call.context - 1) * (call.seq_len // call.context) or not _ring_supports(call))


@register_attention("halo", supports=_halo_supports)
def _halo(q, k, v, positions, segment_ids, *, window, block, backends):
    return halo_attention(q, k, v, positions, segment_ids, window=window, backends=backends, block=block)


@register_attention("ring", supports=_ring_supports)
def _ring(q, k, v, positions, segment_ids, *, window, block=None, backends):
    return ring_attention(q, k, v, positions, segment_ids, window=window, backends=backends)
