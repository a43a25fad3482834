"""Rotary position embeddings, HF half-split (``rotate_half``) layout.

Legend: B batch, T sequence, N heads (any head count), H head_dim.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def inverse_frequencies(head_dim: int, theta: float) -> Float[Array, " H2"]:
    """``1 / theta^(2i/H)`` for i < H/2, in float32 (positions up to 32k need the mantissa)."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta**exponents)


def apply_rope(x: Float[Array, "B T N H"], positions: Int[Array, "B T"], theta: float) -> Float[Array, "B T N H"]:
    """Rotate the two halves of each head by ``position * inv_freq`` (HF ``apply_rotary_pos_emb``)."""
    head_dim = x.shape[-1]
    # float32: angles up to 32k * 1 rad need more than bfloat16's 8 mantissa bits.
    angles = positions.astype(jnp.float32)[..., None] * inverse_frequencies(head_dim, theta)  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)  # [B, T, 1, H/2]
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)  # [B, T, 1, H/2]
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]  # [B, T, N, H/2] each
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
