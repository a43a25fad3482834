"""CPU-only machinery, registered as backends (``backends.py``): the looped SwiGLU experts and a dense stand-in for
``ragged_all_to_all``. Nothing here is on an accelerator's path.

Legend: A rows (routed assignments, sorted by group), D model dim, F expert hidden dim, E groups (experts),
Z block rows, P peers (shards of the expert mesh axis), N rows sent, R rows received.

**Looped expert MLP.** ``jax.lax.ragged_dot`` is the grouped matmul of TPU (megablox) and GPU backends, but XLA's
CPU backend lowers it to a dense masked product over all E groups (E times the work). On CPU we loop instead: for
each group (a static Python loop over E), device loops over that group's rows in blocks of Z consecutive rows,
each one ``[Z, D] x [D, F]`` matmul: whole blocks of the largest Z (efficient matmuls), then whole blocks of the
next sizes, then the rest in blocks of the smallest Z (little waste). Work is at most ``(A + E * Z_small) * D * F``
instead of ``A * E * D * F``, and nothing is padded or copied:

  * the smallest size's blocks are aligned to the group's end, so no block runs past the last row; the
    lowest one may start before the rows it is for (even be shifted up to row 0), and its rows outside them
    are masked: the output keeps its old rows there, the weight gradient skips them;
  * the weights are split into E matrices once, outside the ``custom_vjp``, so the forward pass, the input
    gradient (a matmul against each matrix's transpose, no transposed copy) and the weight gradients (E
    matrices, concatenated back by the split's transpose) share them.

The loops have a data-dependent trip count, which reverse-mode autodiff cannot go through, so the gradient is a
``custom_vjp`` made of the same loops. All three SwiGLU products of a block run in one such loop (and the backward
pass of all three in another), rather than three grouped matmuls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from mistral_jax.model import backends

DEFAULT_BLOCKS = (256, 64)  # rows per matmul: whole blocks of 256, then the rest in blocks of 64


def _blocks_for(rows: int, blocks: tuple[int, ...]) -> tuple[int, ...]:
    """The block sizes no larger than the number of rows (a block is a static slice of them), largest first."""
    fit = tuple(z for z in blocks if z <= rows)
    return fit or (rows,)


def _tiles(group_sizes: Int[Array, " E"], blocks: tuple[int, ...]):
    """For each group g and block size Z (largest first): ``(g, Z, (first, end), number of blocks, masked)``.

    Unmasked stages: whole blocks from the group's first uncovered row, ``start(j) = first + j * Z``. The last
    (smallest) stage covers the rest ``[first, end)`` with blocks aligned to the end: block j is for rows
    ``[max(first, end - (j + 1) * Z), end - j * Z)``; see ``_block``.
    """
    ends = jnp.cumsum(group_sizes)
    for g in range(group_sizes.shape[0]):
        first, end = ends[g] - group_sizes[g], ends[g]
        for i, z in enumerate(blocks):
            if i < len(blocks) - 1:
                n = (end - first) // z
                yield g, z, (first, end), n, False
                first = first + n * z
            else:
                yield g, z, (first, end), -(-(end - first) // z), True


def _block(j, z: int, span, masked: bool, rows: int):
    """Block j of a stage: ``(start row, mask [Z] or None)``; a masked block's mask marks the rows it is for."""
    first, end = span
    if not masked:
        return first + j * z, None
    hi = end - j * z
    lo = jnp.maximum(first, hi - z)
    start = jnp.clip(hi - z, 0, rows - z)  # dynamic_slice's own clamp, made explicit for the mask
    r = start + jnp.arange(z)
    return start, (r >= lo) & (r < hi)


def _write(buf: Array, v: Array, start, z: int, mine) -> Array:
    """``buf[start:start + Z] = v``, keeping ``buf``'s rows where ``mine`` (the block's row mask, or None) is off."""
    if mine is not None:
        v = jnp.where(mine[:, None], v, jax.lax.dynamic_slice_in_dim(buf, start, z))
    return jax.lax.dynamic_update_slice_in_dim(buf, v, start, 0)


def _split_experts(w: Float[Array, "E K N"]) -> tuple:
    """The E expert matrices of ``w``, split once (the split's transpose concatenates their gradients back)."""
    return tuple(p[0] for p in jnp.split(w, w.shape[0]))


def _silu_grad(a: Array) -> Array:
    s = jax.nn.sigmoid(a)
    return s * (1 + a * (1 - s))


def _mlp_fwd_loops(x, ws1, ws3, ws2, group_sizes, blocks, keep: bool):
    """The looped SwiGLU experts: ``(y [A, D], a [A, F], b [A, F])`` (a, b: the two input projections, kept for
    the backward pass if ``keep``, else None)."""
    rows, d = x.shape
    f = ws1[0].shape[1]
    blocks = _blocks_for(rows, blocks)
    dt = jnp.result_type(x, ws1[0])
    carry = (jnp.zeros((rows, d), dt),) + ((jnp.zeros((rows, f), dt), jnp.zeros((rows, f), dt)) if keep else ())
    for g, z, span, n, masked in _tiles(group_sizes, blocks):

        def body(j, carry, w1=ws1[g], w3=ws3[g], w2=ws2[g], z=z, span=span, masked=masked):
            start, mine = _block(j, z, span, masked, rows)
            xb = jax.lax.dynamic_slice_in_dim(x, start, z)  # [Z, D]
            a, b = (xb @ w1).astype(dt), (xb @ w3).astype(dt)  # [Z, F]
            yb = ((jax.nn.silu(a) * b) @ w2).astype(dt)  # [Z, D]
            new = (yb, a, b) if keep else (yb,)
            return tuple(_write(c, v, start, z, mine) for c, v in zip(carry, new, strict=True))

        carry = jax.lax.fori_loop(0, n, body, carry)
    return carry if keep else (carry[0], None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _expert_mlp(x, ws1, ws3, ws2, group_sizes, blocks):
    return _mlp_fwd_loops(x, ws1, ws3, ws2, group_sizes, blocks, keep=False)[0]


def _mlp_fwd(x, ws1, ws3, ws2, group_sizes, blocks):
    y, a, b = _mlp_fwd_loops(x, ws1, ws3, ws2, group_sizes, blocks, keep=True)
    return y, (x, ws1, ws3, ws2, group_sizes, a, b)


def _mlp_bwd(blocks, res, dy):
    """Per block: ``dh = dy w2^T``, ``da = dh * b * silu'(a)``, ``db = dh * silu(a)``; ``dx = da w1^T + db w3^T``
    (rows written under the block's mask) and float32 ``dw1 += x^T da``, ``dw3 += x^T db``, ``dw2 += h^T dy``
    (rows outside the mask zeroed)."""
    x, ws1, ws3, ws2, group_sizes, a_all, b_all = res
    rows = x.shape[0]
    blocks = _blocks_for(rows, blocks)
    t = (((1,), (1,)), ((), ()))  # [Z, K] x [N, K] -> [Z, N]: a matmul with the transposed weight, no copy
    dx = jnp.zeros_like(x)
    grads = {}
    for g in range(len(ws1)):
        grads[g] = tuple(jnp.zeros(w.shape, jnp.float32) for w in (ws1[g], ws3[g], ws2[g]))
    for g, z, span, n, masked in _tiles(group_sizes, blocks):

        def body(j, carry, w1=ws1[g], w3=ws3[g], w2=ws2[g], z=z, span=span, masked=masked):
            dx, (g1, g3, g2) = carry
            start, mine = _block(j, z, span, masked, rows)
            xb, dyb, a, b = (jax.lax.dynamic_slice_in_dim(v, start, z) for v in (x, dy, a_all, b_all))
            sa = jax.nn.silu(a)
            h = sa * b
            dh = jax.lax.dot_general(dyb, w2, t).astype(a.dtype)  # [Z, F]
            da, db = dh * b * _silu_grad(a), dh * sa
            dxb = (jax.lax.dot_general(da, w1, t) + jax.lax.dot_general(db, w3, t)).astype(dx.dtype)  # [Z, D]
            if mine is not None:
                xb, h = jnp.where(mine[:, None], xb, 0), jnp.where(mine[:, None], h, 0)
            outer = lambda p, q: jnp.einsum("ZK,ZN->KN", p, q, preferred_element_type=jnp.float32)
            return (_write(dx, dxb, start, z, mine),
                    (g1 + outer(xb, da), g3 + outer(xb, db), g2 + outer(h, dyb)))

        dx, grads[g] = jax.lax.fori_loop(0, n, body, (dx, grads[g]))
    cast = lambda k, ws: tuple(grads[g][k].astype(ws[g].dtype) for g in range(len(ws)))
    return dx, cast(0, ws1), cast(1, ws3), cast(2, ws2), None


_expert_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def looped_expert_mlp(x: Float[Array, "A D"], w1: Float[Array, "E D F"], w3: Float[Array, "E D F"],
                      w2: Float[Array, "E F D"], group_sizes: Int[Array, " E"],
                      blocks: tuple[int, ...] = DEFAULT_BLOCKS) -> Float[Array, "A D"]:
    """SwiGLU experts on rows sorted by expert, ``y[i] = (silu(x[i] w1[g]) * (x[i] w3[g])) w2[g]`` for row i of
    group g (rows past ``sum(group_sizes)`` are 0), in looped blocks of ``blocks`` rows (largest first): one pass
    computes all three products of a block (no [A, F] intermediates in the forward pass), one backward pass the
    input gradient and the three weight gradients together."""
    return _expert_mlp(x, _split_experts(w1), _split_experts(w3), _split_experts(w2), group_sizes, blocks)


def dense_all_to_all(operand: Float[Array, "N D"], output: Float[Array, "R D"], input_offsets: Int[Array, " P"],
                     send_sizes: Int[Array, " P"], output_offsets: Int[Array, " P"], recv_sizes: Int[Array, " P"], *,
                     axis_name: str) -> Float[Array, "R D"]:
    """``jax.lax.ragged_all_to_all`` (same arguments: ``output_offsets[j]`` is where this shard's block lands in
    peer j's output) for XLA:CPU, which has no such op: the same exchange through a dense ``all_to_all`` of
    per-peer blocks padded to N rows (memory P*N rows: for tests and small CPU meshes)."""
    n, r = operand.shape[0], output.shape[0]
    k = jnp.arange(n)
    rows = jnp.clip(input_offsets[:, None] + k, 0, n - 1)  # [P, N]
    blocks = jnp.where((k < send_sizes[:, None])[..., None], operand[rows], 0)  # [P, N, D] block for each peer
    blocks = jax.lax.all_to_all(blocks, axis_name, 0, 0)  # [P, N, D]: block j came from peer j
    offsets = jax.lax.all_to_all(output_offsets[:, None], axis_name, 0, 0)[:, 0]  # [P] where peer j's block goes
    dest = jnp.where(k < recv_sizes[:, None], offsets[:, None] + k, r)  # [P, N]; r = dropped (padding)
    return output.at[dest.reshape(-1)].set(blocks.reshape(-1, *operand.shape[1:]), mode="drop")


# Registered before any accelerator form, so they are what a "cpu" target runs.
backends.register_expert_mlp("looped", looped_expert_mlp, platforms=("cpu",))
backends.register_exchange("dense_all_to_all", dense_all_to_all, platforms=("cpu",))
