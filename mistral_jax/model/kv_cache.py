"""Rolling-buffer KV cache: per layer k and v for ``S`` slots, plus the absolute position held by each slot.

The key/value of absolute position ``p`` lives in slot ``p mod S``. With a sliding window W the buffer has
``S = W`` slots, so memory stays W per layer however long the sequence is; without a window ``S`` is the
maximum length and the same code is a plain cache. Masks are built from the stored positions (empty slots
hold -1), so cached decoding equals the uncached forward, including past W.

The cache owns its writes: attention hands a layer's new keys and values to ``LayerCache.update``, which
stores them and returns what the new queries attend over (keys, values and their absolute positions). The
Transformer runs its layers over ``KVCache.layers()`` (one ``LayerCache`` per layer, stacked) and folds the
updated views back with ``KVCache.with_layers``.

With ``ModelConfig.kv_cache_dtype = "int8"`` the buffers hold int8 values with one float32 scale per slot and kv
head (symmetric absmax over the head dimension): half the bytes of a bfloat16 cache plus 1/32 for the scales at
H = 128. New rows are quantized as they are written; attention reads the dequantized buffer, so a chunk's own
keys are rounded exactly as they will be stored.

Legend: L layers, B batch, S slots, T new tokens, K kv heads, H head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Int

from mistral_jax import sharding

EMPTY = -1  # position of a slot that holds nothing yet


KV_CACHE_DTYPES = ("auto", "int8")  # ModelConfig.kv_cache_dtype: the compute dtype, or int8 with per-head scales


@struct.dataclass
class KVCache:
    k: Float[Array, "L B S K H"]  # int8 when quantized (``k_scale`` set)
    v: Float[Array, "L B S K H"]
    pos: Int[Array, "B S"]  # absolute position stored in each slot (shared by all layers), EMPTY if none
    # int8 cache (``ModelConfig.kv_cache_dtype = "int8"``): one scale per slot and kv head, ``k ~ k_int8 * scale``
    k_scale: Float[Array, "L B S K"] | None = None
    v_scale: Float[Array, "L B S K"] | None = None

    @property
    def size(self) -> int:
        return self.k.shape[2]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def layers(self) -> LayerCache:
        """Every layer's view, stacked over a leading L axis (``jax.lax.scan`` over it, or index it)."""
        return LayerCache(k=self.k, v=self.v, pos=jnp.broadcast_to(self.pos, (self.k.shape[0], *self.pos.shape)),
                          k_scale=self.k_scale, v_scale=self.v_scale)

    def with_layers(self, layers: LayerCache) -> KVCache:
        """The cache holding the updated layer views ``layers`` (stacked over L, as ``layers()`` gives them)."""
        return KVCache(k=layers.k, v=layers.v, pos=layers.pos[-1],  # every layer wrote the same positions
                       k_scale=layers.k_scale, v_scale=layers.v_scale)

    def map_rows(self, fn) -> KVCache:
        """``fn(array, batch_axis)`` applied to every field (the batch axis is 1 for ``[L, B, ...]`` buffers and 0
        for ``pos``): row slices, row updates, concatenations of the decoding core."""
        return KVCache(**{name: None if x is None else fn(x, 0 if name == "pos" else 1)
                          for name, x in vars(self).items()})

    def update_rows(self, rows: KVCache, start) -> KVCache:
        """The cache with rows ``start .. start + rows' batch`` replaced by the cache ``rows``."""
        return KVCache(**{name: None if x is None else jax.lax.dynamic_update_slice_in_dim(
            x, getattr(rows, name), start, axis=0 if name == "pos" else 1) for name, x in vars(self).items()})

    @staticmethod
    def concat_rows(parts: list[KVCache]) -> KVCache:
        """The caches ``parts`` stacked along their rows."""
        first = parts[0]
        return KVCache(**{name: None if x is None else jnp.concatenate(
            [getattr(p, name) for p in parts], axis=0 if name == "pos" else 1) for name, x in vars(first).items()})

    @classmethod
    def init(cls, cfg, batch: int, max_len: int | None = None, dtype=None) -> KVCache:
        """An empty cache for ``cfg``: ``sliding_window`` slots, else ``max_len`` (default ``cfg.max_seq_len``);
        int8 values with per-slot, per-head scales when ``cfg.kv_cache_dtype`` is ``int8`` (half the bytes of
        bfloat16), else ``dtype`` (default the compute dtype)."""
        if cfg.sliding_window is not None:
            size = cfg.sliding_window if max_len is None else min(cfg.sliding_window, max_len)
        else:
            size = max_len or cfg.max_seq_len
        shape = (cfg.n_layers, batch, size, cfg.n_kv_heads, cfg.head_dim)  # [L, B, S, K, H]
        pos = jnp.full((batch, size), EMPTY, jnp.int32)
        if getattr(cfg, "kv_cache_dtype", "auto") == "int8":
            return cls(k=jnp.zeros(shape, jnp.int8), v=jnp.zeros(shape, jnp.int8), pos=pos,
                       k_scale=jnp.zeros(shape[:-1], SCALE_DTYPE), v_scale=jnp.zeros(shape[:-1], SCALE_DTYPE))
        dtype = dtype or cfg.jnp_dtype
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), pos=pos)

    def logical_axes(self) -> KVCache:
        """The logical axes of each field (a KVCache of tuples): sharded over batch and kv heads."""
        kv = ("layers", "batch", "seq", "act_kv_heads", "head_dim")  # [L, B, S, K, H]
        scale = None if self.k_scale is None else kv[:-1]
        return KVCache(k=kv, v=kv, pos=("batch", "seq"), k_scale=scale, v_scale=scale)

    def shardings(self, mesh, rules=sharding.DEFAULT_RULES) -> KVCache:
        """``NamedSharding`` of each field on ``mesh`` (for ``jax.device_put`` / ``out_shardings``)."""
        return jax.tree.map(lambda axes: sharding.named_sharding(mesh, axes, rules), self.logical_axes(),
                            is_leaf=lambda x: isinstance(x, tuple))

    def constrain(self) -> KVCache:
        """Pin the cache to its logical sharding when a mesh is active (``sharding.use_mesh``); else identity."""
        axes = self.logical_axes()
        return KVCache(**{name: None if x is None else sharding.constrain(x, getattr(axes, name))
                          for name, x in vars(self).items()})


SCALE_DTYPE = jnp.float32  # the int8 cache's scales: 4 bytes per slot and kv head (1/32 of int8 values at H = 128)


def quantize(x: Float[Array, "*lead H"]) -> tuple[Array, Float[Array, "*lead"]]:
    """Symmetric int8 over the last axis (one scale per head vector): ``x ~ q * scale``, ``|q| <= 127``."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / 127.0
    q = jnp.round(xf / jnp.where(scale == 0, 1.0, scale)[..., None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale.astype(SCALE_DTYPE)


def dequantize(q: Array, scale: Array, dtype) -> Array:
    return (q.astype(jnp.float32) * scale[..., None].astype(jnp.float32)).astype(dtype)


@struct.dataclass
class LayerCache:
    """One layer's view of a ``KVCache``: its key and value buffers and the position held by each slot."""

    k: Float[Array, "B S K H"]
    v: Float[Array, "B S K H"]
    pos: Int[Array, "B S"]
    k_scale: Float[Array, "B S K"] | None = None
    v_scale: Float[Array, "B S K"] | None = None

    @property
    def size(self) -> int:
        return self.k.shape[1]

    def update(self, k: Float[Array, "B T K H"], v: Float[Array, "B T K H"], positions: Int[Array, "B T"]
               ) -> tuple[Float[Array, "B S2 K H"], Float[Array, "B S2 K H"], Int[Array, "B S2"], LayerCache]:
        """Store the keys and values of ``positions`` (slot = position mod S; negative positions are padding and
        are not stored). Returns ``(keys, values, key_positions, new_cache)``: what the new queries attend over.

        One token (decoding): write, then attend over the S slots (no copy of the cache); the slot written held
        position p - S: outside the window when S = W, never written when S covers the sequence. A chunk of T
        tokens attends over ``[cache before it ; the chunk]`` (S2 = S + T): its writes may overwrite slots that
        its own earlier queries still need.
        """
        slots = slots_for(positions, self.size)
        if self.k_scale is not None:  # int8: the new rows quantized; attention reads the dequantized buffer
            dt = k.dtype
            (qk, sk), (qv, sv) = quantize(k), quantize(v)
            new = LayerCache(k=write(self.k, qk, slots), v=write(self.v, qv, slots),
                             pos=write(self.pos, positions, slots), k_scale=write(self.k_scale, sk, slots),
                             v_scale=write(self.v_scale, sv, slots))
            if positions.shape[1] == 1:
                return (dequantize(new.k, new.k_scale, dt), dequantize(new.v, new.v_scale, dt), new.pos, new)
            keys = jnp.concatenate([dequantize(self.k, self.k_scale, dt), dequantize(qk, sk, dt)], axis=1)
            values = jnp.concatenate([dequantize(self.v, self.v_scale, dt), dequantize(qv, sv, dt)], axis=1)
            return keys, values, jnp.concatenate([self.pos, positions], axis=1), new
        k, v = k.astype(self.k.dtype), v.astype(self.v.dtype)
        new = LayerCache(k=write(self.k, k, slots), v=write(self.v, v, slots), pos=write(self.pos, positions, slots))
        if positions.shape[1] == 1:
            return new.k, new.v, new.pos, new
        keys = jnp.concatenate([self.k, k], axis=1)  # [B, S + T, K, H]
        values = jnp.concatenate([self.v, v], axis=1)  # [B, S + T, K, H]
        return keys, values, jnp.concatenate([self.pos, positions], axis=1), new


def slots_for(positions: Int[Array, "B T"], size: int) -> Int[Array, "B T"]:
    """Slot of each new token: ``position mod S``; ``S`` (out of range, so dropped) for padding (negative
    position) and for tokens that a later token of the same chunk overwrites (chunks longer than S)."""
    newest = positions.max(axis=1, keepdims=True)  # [B, 1]
    keep = (positions >= 0) & (positions > newest - size)
    return jnp.where(keep, positions % size, size)


def write(buffer: Float[Array, "B S ..."], new: Float[Array, "B T ..."], slots: Int[Array, "B T"]
          ) -> Float[Array, "B S ..."]:
    """Scatter ``new[:, t]`` into ``buffer[:, slots[:, t]]``; out-of-range slots are dropped."""
    return jax.vmap(lambda b, n, s: b.at[s].set(n, mode="drop"))(buffer, new, slots)
