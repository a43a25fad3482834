"""Grouped matmul for dropless MoE: rows sorted by group, one weight matrix per group.

Legend: A rows (routed assignments, sorted by group), D input dim, F output dim, E groups (experts),
Z block rows, NB number of blocks.

``jax.lax.ragged_dot`` is the grouped matmul of TPU (megablox) and GPU backends, but XLA's CPU backend
lowers it to a dense masked product over all E groups (E times the work). On CPU we use a block-sparse
form instead (as in MegaBlocks): every group is padded to a multiple of Z rows, each block of Z rows is
multiplied by its own group's matrix, so work is ``(A + E*Z) * D * F`` instead of ``A * E * D * F``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def block_grouped_matmul(x: Float[Array, "A D"], w: Float[Array, "E D F"], group_sizes: Int[Array, " E"],
                         block: int = 64) -> Float[Array, "A F"]:
    """``out[i] = x[i] @ w[group(i)]`` for rows sorted by group, computing only padded per-group blocks.

    The blocks run in a ``lax.map`` that slices one group's matrix per block (gathering all NB matrices
    up front costs NB * D * F of memory traffic and measured 2-3x slower on CPU).
    """
    a, d = x.shape
    e = w.shape[0]
    block = max(1, min(block, a))
    nb = -(-a // block) + e  # static upper bound on blocks: sum_e ceil(size_e / Z) <= ceil(A / Z) + E
    padded = -(-group_sizes // block) * block  # [E] group sizes rounded up to whole blocks
    padded_end = jnp.cumsum(padded)  # [E]
    start = jnp.cumsum(group_sizes) - group_sizes  # [E]
    group = jnp.repeat(jnp.arange(e), group_sizes, total_repeat_length=a)  # [A] group of each sorted row
    dest = padded_end[group] - padded[group] + jnp.arange(a) - start[group]  # [A] row in the padded layout
    xp = jnp.zeros((nb * block, d), x.dtype).at[dest].set(x).reshape(nb, block, d)  # [NB, Z, D]
    # group of each block; blocks past the last group hold only zero rows, any matrix will do
    block_group = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(nb) * block, side="right"), e - 1)  # [NB]

    def one_block(args):
        xb, g = args  # [Z, D], []
        return xb @ jax.lax.dynamic_index_in_dim(w, g, keepdims=False)  # [Z, F]

    out = jax.lax.map(one_block, (xp, block_group))  # [NB, Z, F]
    return out.reshape(nb * block, -1)[dest]  # [A, F]


def default_block(rows: int, groups: int) -> int:
    """Block rows for the CPU path: about a quarter of an average group, a power of two in [64, 512].

    Measured on a 2-core CPU (8 experts, 8192 assignments, D=1024, F=2048, forward+backward vs a dense MLP
    with the same active parameters): block 64 -> 1.42x, 128 -> 1.18x, 256 -> 1.14x, 512 -> 1.23x,
    1024 -> 1.50x. Small blocks run many small matmuls; large ones pad more rows.
    """
    target = max(rows // (4 * groups), 1)
    return int(min(512, max(64, 1 << (target.bit_length() - 1))))


def grouped_matmul(x: Float[Array, "A D"], w: Float[Array, "E D F"], group_sizes: Int[Array, " E"],
                   block: int | None = None) -> Float[Array, "A F"]:
    """Dispatch: ``ragged_dot`` on accelerators, the block-sparse form on CPU."""
    if jax.default_backend() == "cpu":
        return block_grouped_matmul(x, w, group_sizes, block or default_block(x.shape[0], w.shape[0]))
    return jax.lax.ragged_dot(x, w, group_sizes)
