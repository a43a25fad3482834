"""Rolling-buffer KV cache: per layer k and v for ``S`` slots, plus the absolute position held by each slot.

The key/value of absolute position ``p`` lives in slot ``p mod S``. With a sliding window W the buffer has
``S = W`` slots, so memory stays W per layer however long the sequence is; without a window ``S`` is the
maximum length and the same code is a plain cache. Masks are built from the stored positions (empty slots
hold -1), so cached decoding equals the uncached forward, including past W.

The cache owns its writes: attention hands a layer's new keys and values to ``LayerCache.update``, which
stores them and returns what the new queries attend over (keys, values and their absolute positions). The
Transformer runs its layers over ``KVCache.layers()`` (one ``LayerCache`` per layer, stacked) and folds the
updated views back with ``KVCache.with_layers``.

Legend: L layers, B batch, S slots, T new tokens, K kv heads, H head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Int

from mistral_jax import sharding

EMPTY = -1  # position of a slot that holds nothing yet


@struct.dataclass
class KVCache:
    k: Float[Array, "L B S K H"]
    v: Float[Array, "L B S K H"]
    pos: Int[Array, "B S"]  # absolute position stored in each slot (shared by all layers), EMPTY if none

    @property
    def size(self) -> int:
        return self.k.shape[2]

    def layers(self) -> LayerCache:
        """Every layer's view, stacked over a leading L axis (``jax.lax.scan`` over it, or index it)."""
        return LayerCache(k=self.k, v=self.v, pos=jnp.broadcast_to(self.pos, (self.k.shape[0], *self.pos.shape)))

    def with_layers(self, layers: LayerCache) -> KVCache:
        """The cache holding the updated layer views ``layers`` (stacked over L, as ``layers()`` gives them)."""
        return KVCache(k=layers.k, v=layers.v, pos=layers.pos[-1])  # every layer wrote the same positions

    @classmethod
    def init(cls, cfg, batch: int, max_len: int | None = None, dtype=None) -> KVCache:
        """An empty cache for ``cfg``: ``sliding_window`` slots, else ``max_len`` (default ``cfg.max_seq_len``)."""
        if cfg.sliding_window is not None:
            size = cfg.sliding_window if max_len is None else min(cfg.sliding_window, max_len)
        else:
            size = max_len or cfg.max_seq_len
        shape = (cfg.n_layers, batch, size, cfg.n_kv_heads, cfg.head_dim)  # [L, B, S, K, H]
        dtype = dtype or cfg.jnp_dtype
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), pos=jnp.full((batch, size), EMPTY, jnp.int32))

    @staticmethod
    def logical_axes() -> KVCache:
        """The logical axes of each field (a KVCache of tuples): sharded over batch and kv heads."""
        kv = ("layers", "batch", "seq", "act_kv_heads", "head_dim")  # [L, B, S, K, H]
        return KVCache(k=kv, v=kv, pos=("batch", "seq"))

    def shardings(self, mesh, rules=sharding.DEFAULT_RULES) -> KVCache:
        """``NamedSharding`` of each field on ``mesh`` (for ``jax.device_put`` / ``out_shardings``)."""
        return jax.tree.map(lambda axes: sharding.named_sharding(mesh, axes, rules), self.logical_axes(),
                            is_leaf=lambda x: isinstance(x, tuple))

    def constrain(self) -> KVCache:
        """Pin the cache to its logical sharding when a mesh is active (``sharding.use_mesh``); else identity."""
        axes = self.logical_axes()
        return KVCache(k=sharding.constrain(self.k, axes.k), v=sharding.constrain(self.v, axes.v),
                       pos=sharding.constrain(self.pos, axes.pos))


@struct.dataclass
class LayerCache:
    """One layer's view of a ``KVCache``: its key and value buffers and the position held by each slot."""

    k: Float[Array, "B S K H"]
    v: Float[Array, "B S K H"]
    pos: Int[Array, "B S"]

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
