"""Rolling-buffer KV cache: per layer k and v for ``S`` slots, plus the absolute position held by each slot.

The key/value of absolute position ``p`` lives in slot ``p mod S``. With a sliding window W the buffer has
``S = W`` slots, so memory stays W per layer however long the sequence is; without a window ``S`` is the
maximum length and the same code is a plain cache. Masks are built from the stored positions (empty slots
hold -1), so cached decoding equals the uncached forward, including past W.

Legend: L layers, B batch, S slots, K kv heads, H head_dim.
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
