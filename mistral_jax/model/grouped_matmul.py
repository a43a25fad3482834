"""Grouped matmul for dropless MoE: rows sorted by group, one weight matrix per group.

Legend: A rows (routed assignments, sorted by group), D input dim, F output dim, E groups (experts),
Z block rows.

``jax.lax.ragged_dot`` is the grouped matmul of TPU (megablox) and GPU backends, but XLA's CPU backend
lowers it to a dense masked product over all E groups (E times the work). On CPU we loop instead: for each
group (a static Python loop over E, so each group's matrix is a static slice, read once), device loops over
that group's rows in blocks of Z consecutive rows, each one ``[Z, D] x [D, F]`` matmul: whole blocks of a
large Z (efficient matmuls), then the rest in blocks of a small Z (little padding). Work is at most
``(A + E * Z_small) * D * F`` instead of ``A * E * D * F``, and no padded copy of the rows is needed:

  * a group's last block runs into the next group's rows; it writes wrong rows there, which the next groups
    overwrite since groups run in order (rows past the last group are zeroed at the end);
  * the weight gradient masks those rows out; the input gradient is the same loop with ``w^T``.

The loops have a data-dependent trip count, which reverse-mode autodiff cannot go through, so the
gradient is a ``custom_vjp`` made of the same two loops.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def _valid_rows(x: Float[Array, "A K"], group_sizes: Int[Array, " E"]) -> Float[Array, "A K"]:
    """Zero the rows past the last group (``ragged_dot`` semantics)."""
    return jnp.where((jnp.arange(x.shape[0]) < group_sizes.sum())[:, None], x, 0)


def _tiles(group_sizes: Int[Array, " E"], blocks: tuple[int, ...]):
    """For each group g and block size Z (largest first): ``(g, Z, first row, number of blocks)``.

    Whole blocks of the largest size, then the rest in the next size, and so on; the smallest size rounds up,
    so a group wastes less than one block of the smallest size.
    """
    starts = jnp.cumsum(group_sizes) - group_sizes
    for g in range(group_sizes.shape[0]):
        first, rest = starts[g], group_sizes[g]
        for i, z in enumerate(blocks):
            n = -(-rest // z) if i == len(blocks) - 1 else rest // z
            yield g, z, first, n
            first, rest = first + n * z, rest - n * z


def _pad(x: Float[Array, "A K"], rows: int) -> Float[Array, "A+Z K"]:
    return jnp.concatenate([x, jnp.zeros((rows, x.shape[1]), x.dtype)])  # the last block may run past A


def _loop_matmul(x: Float[Array, "A D"], w: Float[Array, "E D F"], group_sizes: Int[Array, " E"],
                 blocks: tuple[int, ...]) -> Float[Array, "A F"]:
    """``out[i] = x[i] @ w[group(i)]``, one group at a time, in blocks of rows."""
    a = x.shape[0]
    xp = _pad(x, blocks[0])
    out = jnp.zeros((a + blocks[0], w.shape[2]), jnp.result_type(x, w))  # [A + Z, F]
    weights = [w[g] for g in range(w.shape[0])]  # [D, F] static slices: each read once
    for g, z, first, n in _tiles(group_sizes, blocks):

        def body(j, out, wg=weights[g], z=z, first=first):
            r = first + j * z
            return jax.lax.dynamic_update_slice_in_dim(out, jax.lax.dynamic_slice_in_dim(xp, r, z) @ wg, r, 0)

        out = jax.lax.fori_loop(0, n, body, out)
    return _valid_rows(out[:a], group_sizes)


def _loop_weight_grad(x: Float[Array, "A D"], dy: Float[Array, "A F"], group_sizes: Int[Array, " E"],
                      blocks: tuple[int, ...]) -> Float[Array, "E D F"]:
    """``dw[g] = x_g^T @ dy_g`` over each group's rows, accumulated block by block in float32."""
    xp, dyp = _pad(x, blocks[0]), _pad(dy, blocks[0])
    ends = jnp.cumsum(group_sizes)
    grads = [jnp.zeros((x.shape[1], dy.shape[1]), jnp.float32) for _ in range(group_sizes.shape[0])]
    for g, z, first, n in _tiles(group_sizes, blocks):

        def body(j, acc, g=g, z=z, first=first):
            r = first + j * z
            mine = r + jnp.arange(z) < ends[g]  # [Z] rows of group g (the last block may run past it)
            xb = jnp.where(mine[:, None], jax.lax.dynamic_slice_in_dim(xp, r, z), 0)  # [Z, D]
            dyb = jax.lax.dynamic_slice_in_dim(dyp, r, z)  # [Z, F]
            return acc + jnp.einsum("ZD,ZF->DF", xb, dyb, preferred_element_type=jnp.float32)

        grads[g] = jax.lax.fori_loop(0, n, body, grads[g])
    return jnp.stack(grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def looped_grouped_matmul(x: Float[Array, "A D"], w: Float[Array, "E D F"], group_sizes: Int[Array, " E"],
                          blocks: tuple[int, ...] = (256, 64)) -> Float[Array, "A F"]:
    """``out[i] = x[i] @ w[group(i)]`` for rows sorted by group (``ragged_dot`` semantics: rows past
    ``sum(group_sizes)`` are 0), computing only each group's own rows, in blocks of ``blocks`` rows
    (largest first; each group wastes less than one block of the smallest)."""
    return _loop_matmul(x, w, group_sizes, blocks)


def _fwd(x, w, group_sizes, blocks):
    return _loop_matmul(x, w, group_sizes, blocks), (x, w, group_sizes)


def _bwd(blocks, res, dy):
    x, w, group_sizes = res
    dy = _valid_rows(dy, group_sizes)
    dx = _loop_matmul(dy, jnp.swapaxes(w, 1, 2), group_sizes, blocks).astype(x.dtype)
    dw = _loop_weight_grad(x, dy, group_sizes, blocks).astype(w.dtype)
    return dx, dw, None


looped_grouped_matmul.defvjp(_fwd, _bwd)


DEFAULT_BLOCKS = (256, 64)  # rows per matmul on CPU: whole blocks of 256, then the rest in blocks of 64


def grouped_matmul(x: Float[Array, "A D"], w: Float[Array, "E D F"], group_sizes: Int[Array, " E"], *,
                   platform: str, blocks: tuple[int, ...] = DEFAULT_BLOCKS) -> Float[Array, "A F"]:
    """Dispatch on the target ``platform`` (``ModelConfig.platform``): the looped form on "cpu", ``ragged_dot``
    (megablox on TPU) on accelerators."""
    if platform == "cpu":
        return looped_grouped_matmul(x, w, group_sizes, blocks)
    if platform in ("gpu", "tpu"):
        return jax.lax.ragged_dot(x, w, group_sizes)
    raise ValueError(f"grouped_matmul for platform={platform!r}: expected cpu, gpu or tpu. Fix: build the model "
                     "from a config with a platform (the Transformer fills it in: cfg.for_platform()).")
