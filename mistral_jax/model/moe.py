"""Sparse mixture of experts (Mixtral): top-k router, SwiGLU experts, auxiliary losses.

Legend: B batch, T sequence, D model dim, F expert hidden dim, E experts, X top-k (experts per token),
M = B*T tokens, A = M*X routed assignments.

Routing: router logits (a float32 matmul) -> softmax (float32) -> top-k -> renormalise the k weights (HF
``MixtralTopKRouter``; HF computes the logits in the model dtype, so bfloat16 routing can differ from HF's).

Paths (registered in ``backends.py``'s table, chosen once by ``backends.resolve`` from ``ModelConfig.moe_impl``,
``moe_dispatch`` and the mesh passed to the model):
  * ``dense``: every expert on every token, combined with the (mostly zero) routing weights. The oracle.
  * ``ragged``: dropless: sort the A assignments by expert and run the SwiGLU experts on the sorted rows (the
    platform's expert MLP: three grouped matmuls on accelerators, ``cpu.looped_expert_mlp`` on CPU), so compute
    is proportional to X, not to E.
  * ``all_to_all`` / ``all_gather``: expert parallelism, ``ragged`` inside a ``shard_map`` over the mesh axis that
    shards the experts. ``moe_impl`` ``ragged`` and ``expert_parallel`` take it when the mesh given to the model
    shards ``experts`` over an axis of size > 1; without such a mesh, both compute ``ragged``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from mistral_jax import sharding
from mistral_jax.model import cpu  # noqa: F401 - registers the CPU expert MLP and exchange
from mistral_jax.model.backends import MOE, Backends, register_moe, resolve
from mistral_jax.model.projection import weight_value


def route(logits: Float[Array, "M E"], top_k: int
          ) -> tuple[Float[Array, "M E"], Float[Array, "M X"], Int[Array, "M X"]]:
    """Softmax in float32 (small logit gaps decide the top-k), top-k, renormalised weights."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [M, E]
    top_w, top_idx = jax.lax.top_k(probs, top_k)  # [M, X]
    top_w = top_w / top_w.sum(axis=-1, keepdims=True)
    return probs, top_w, top_idx


def router_stats(logits: Float[Array, "M E"], probs: Float[Array, "M E"], top_idx: Int[Array, "M X"],
                 valid: Bool[Array, " M"]) -> dict[str, Array]:
    """Per-layer sums from which the Transformer forms the aux losses over all layers at once.

    ``counts[e]`` = number of (valid) top-k assignments to e; ``prob_sum[e]`` = sum of router
    probabilities of e; ``z_sum`` = sum of logsumexp(logits)^2; ``tokens`` = number of valid tokens.
    """
    num_experts = logits.shape[-1]
    w = valid.astype(jnp.float32)  # [M]
    one_hot = jax.nn.one_hot(top_idx, num_experts, dtype=jnp.float32)  # [M, X, E]
    # float32 sums: bfloat16 counts stop being exact after 256.
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # [M]
    return dict(
        counts=jnp.einsum("MXE,M->E", one_hot, w),
        prob_sum=jnp.einsum("ME,M->E", probs, w),
        z_sum=jnp.sum(lse**2 * w),
        tokens=jnp.sum(w),
    )


def load_balancing_loss(counts: Float[Array, "... E"], prob_sum: Float[Array, "... E"], tokens: Array) -> Array:
    """Switch-Transformer load-balancing loss in HF units (``load_balancing_loss_func``).

    ``E * sum_e f_e * P_e`` with ``f_e = counts_e / tokens`` (the expected number of the token's X slots
    that go to e, so sum_e f_e = X) and ``P_e = prob_sum_e / tokens`` (mean router probability), where the
    sums run over every token of every layer. A perfectly balanced router gives X.
    """
    counts = counts.reshape(-1, counts.shape[-1]).sum(0)  # [E] (sum over layers if stacked)
    prob_sum = prob_sum.reshape(-1, prob_sum.shape[-1]).sum(0)  # [E]
    tokens = jnp.maximum(jnp.sum(tokens), 1.0)
    return counts.shape[-1] * jnp.sum((counts / tokens) * (prob_sum / tokens))


def z_loss(z_sum: Array, tokens: Array) -> Array:
    """ST-MoE router z-loss: mean over tokens (and layers) of ``logsumexp(router_logits)^2``."""
    return jnp.sum(z_sum) / jnp.maximum(jnp.sum(tokens), 1.0)


class Assignments(NamedTuple):
    """The M*X = A top-k assignments sorted by group (``sort_assignments``)."""

    order: Int[Array, " A"]  # sorted position -> assignment (token * X + slot)
    inverse: Int[Array, " A"]  # assignment -> sorted position
    group_sizes: Int[Array, " G"]  # assignments per group, in sorted order


def sort_assignments(groups: Int[Array, "M X"], num_groups: int) -> Assignments:
    """Sort the assignments by group id (stable: a group's rows keep token order); ids in [0, num_groups)."""
    flat = groups.reshape(-1)  # [A]
    order = jnp.argsort(flat, stable=True)
    inverse = jnp.argsort(order)  # the inverse permutation
    return Assignments(order, inverse, jnp.bincount(flat, length=num_groups).astype(jnp.int32))


@jax.custom_vjp
def dispatch(x: Float[Array, "M D"], order: Int[Array, " A"], inverse: Int[Array, " A"]) -> Float[Array, "A D"]:
    """The tokens in sorted assignment order: ``x[order // X]``. Its gradient gathers too (each token sums its X
    rows), where autodiff of an index would scatter-add (a serial loop on CPU)."""
    return x[order // (order.shape[0] // x.shape[0])]


def _dispatch_fwd(x, order, inverse):
    return dispatch(x, order, inverse), (x.shape[0], order, inverse)


def _dispatch_bwd(res, g):
    m, order, inverse = res
    return g[inverse].reshape(m, -1, g.shape[-1]).sum(1), None, None


dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def undispatch(y: Float[Array, "A D"], order: Int[Array, " A"], inverse: Int[Array, " A"]) -> Float[Array, "A D"]:
    """Sorted rows back in assignment order, ``y[inverse]`` (token-major: reshape to [M, X, D]); a permutation,
    whose gradient is the inverse permutation (a gather, not a scatter)."""
    return y[inverse]


def _undispatch_fwd(y, order, inverse):
    return y[inverse], (order, inverse)


def _undispatch_bwd(res, g):
    order, inverse = res
    return g[order], None, None


undispatch.defvjp(_undispatch_fwd, _undispatch_bwd)


def combine(y: Float[Array, "A D"], a: Assignments, weights: Float[Array, "M X"]) -> Float[Array, "M D"]:
    """Each token's weighted sum of its X expert outputs (``y`` in sorted order)."""
    m, top_k = weights.shape
    yk = undispatch(y, a.order, a.inverse).reshape(m, top_k, -1)  # [M, X, D]
    return (yk * weights.astype(y.dtype)[..., None]).sum(1)


class LowRank(NamedTuple):
    """An expert weight with a LoRA update, unmerged: ``base`` [E, in, out] (frozen), ``a`` [E, in, R], ``b``
    [E, R, out] (the LoRA scale folded in). The grouped matmul of rows ``x`` is ``x base + (x a) b`` (the base's
    grouped matmul plus ``low_rank_grouped``), so the frozen base gets no gradient: the backward pass has no
    [E, in, out] weight-gradient matmul, nor its float32 buffer (what a merged ``base + a b`` costs)."""

    base: Array
    a: Array
    b: Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    def merged(self) -> Array:
        """``base + a b`` (float32 sum) in the base's dtype: for the dense oracle path."""
        return (self.base.astype(jnp.float32) + jnp.einsum("EIR,ERO->EIO", self.a.astype(jnp.float32),
                                                           self.b.astype(jnp.float32))).astype(self.base.dtype)

    def specs(self, spec):
        """The ``shard_map`` specs of the three arrays for the base's ``spec`` (the rank axis unsharded)."""
        from jax.sharding import PartitionSpec as P

        return LowRank(spec, P(*spec[:-1], None), P(spec[0], None, spec[-1]))


def expert_weight(var, dtype) -> Array | LowRank:
    """The weight an expert path multiplies by: ``var[...]`` in ``dtype``, or for a LoRA weight (``low_rank``:
    ``lora.LoRAWeight``) its unmerged ``LowRank`` (the adapters cast to ``dtype``, the scale folded into ``b``)."""
    low_rank = getattr(var, "low_rank", None)
    if low_rank is None:
        return weight_value(var, dtype)
    a, b, scale = low_rank()
    return LowRank(weight_value(var.base, dtype), a.astype(dtype), (b * scale).astype(dtype))


def _w_spec(w, spec):
    return w.specs(spec) if isinstance(w, LowRank) else spec


def low_rank_grouped(x: Float[Array, "A I"], a: Float[Array, "E I R"], b: Float[Array, "E R O"],
                     group_sizes: Int[Array, " E"]) -> Float[Array, "A O"]:
    """``(x[i] a[g]) b[g]`` for row i of group g (rows past the groups 0) as two dense matmuls through all E*R
    adapter columns: ``x [a_0 .. a_E]`` (E*R columns, about 1 % of an expert's F), each row's other groups' columns
    zeroed, then ``[b_0; ..; b_E]``. No grouped matmul of rank R (``ragged_dot`` with R columns lowers to far more
    memory than this on TPU)."""
    e, i, r = a.shape
    rows = x.shape[0]
    group = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(rows), side="right")  # [A]; E = past the groups
    mine = jax.nn.one_hot(group, e, dtype=x.dtype)  # [A, E]
    h = jnp.matmul(x, jnp.swapaxes(a, 0, 1).reshape(i, e * r)).reshape(rows, e, r) * mine[:, :, None]
    return jnp.matmul(h.reshape(rows, e * r), b.reshape(e * r, -1))  # [A, O]


def low_rank_aware(mlp):
    """``mlp(x, w1, w3, w2, group_sizes)`` taking ``LowRank`` weights too. Where the platform's expert MLP is
    ``swiglu_experts`` over a grouped matmul (TPU, GPU, quantized training), LoRA weights stay unmerged:
    ``x base + (x a) b`` with that ``gmm`` and ``low_rank_grouped``. An expert MLP without one (CPU's fused
    ``looped_expert_mlp``, 3x faster there than ``ragged_dot``) gets the merged weights. Plain weights go to
    ``mlp`` unchanged."""

    def fn(x, w1, w3, w2, group_sizes):
        if not any(isinstance(w, LowRank) for w in (w1, w3, w2)):
            return mlp(x, w1, w3, w2, group_sizes)
        base_gmm = (getattr(mlp, "keywords", None) or {}).get("gmm")
        if getattr(mlp, "func", None) is not swiglu_experts or base_gmm is None:
            return mlp(x, *(w.merged() if isinstance(w, LowRank) else w for w in (w1, w3, w2)), group_sizes)

        def gmm(rows, w, gs):
            if not isinstance(w, LowRank):
                return base_gmm(rows, w, gs)
            return base_gmm(rows, w.base, gs) + low_rank_grouped(rows, w.a, w.b, gs).astype(rows.dtype)

        return swiglu_experts(x, w1, w3, w2, group_sizes, gmm=gmm)

    return fn


def dense_experts(x: Float[Array, "M D"], w1, w3, w2, top_w: Float[Array, "M X"], top_idx: Int[Array, "M X"]
                  ) -> Float[Array, "M D"]:
    """The oracle: all E experts on all M tokens, weighted by the routing weights (zero off the top-k)."""
    w1, w3, w2 = (w.merged() if isinstance(w, LowRank) else w for w in (w1, w3, w2))
    gates = jnp.einsum("MX,MXE->ME", top_w, jax.nn.one_hot(top_idx, w1.shape[0], dtype=top_w.dtype))  # [M, E]
    h = jax.nn.silu(jnp.einsum("MD,EDF->MEF", x, w1)) * jnp.einsum("MD,EDF->MEF", x, w3)  # [M, E, F]
    y = jnp.einsum("MEF,EFD->MED", h, w2)  # [M, E, D]
    return jnp.einsum("MED,ME->MD", y, gates.astype(y.dtype))


def swiglu_experts(x: Float[Array, "A D"], w1: Float[Array, "E D F"], w3: Float[Array, "E D F"],
                   w2: Float[Array, "E F D"], group_sizes: Int[Array, " E"], *, gmm) -> Float[Array, "A D"]:
    """SwiGLU experts on rows sorted by expert from a grouped matmul ``gmm(x, w, group_sizes)`` (``ragged_dot``
    semantics): ``y[i] = (silu(x[i] w1[g]) * (x[i] w3[g])) w2[g]`` for row i of group g, rows past the groups 0."""
    return gmm(jax.nn.silu(gmm(x, w1, group_sizes)) * gmm(x, w3, group_sizes), w2, group_sizes)


def ragged_experts(x: Float[Array, "M D"], w1, w3, w2, top_w: Float[Array, "M X"], top_idx: Int[Array, "M X"], *,
                   mlp) -> Float[Array, "M D"]:
    """Dropless grouped matmul: sort the A = M*X assignments by expert and run the SwiGLU experts on them
    (``mlp(x, w1, w3, w2, group_sizes)``: the platform's expert MLP, ``Backends.experts_fn()``)."""
    a = sort_assignments(top_idx, w1.shape[0])
    y = mlp(dispatch(x, a.order, a.inverse), w1, w3, w2, a.group_sizes)  # [A, D]
    return combine(y, a, top_w)  # [M, D]


def _expert_layout(ep: sharding.ExpertParallel, num_experts: int) -> tuple[str, str | None, int, int]:
    """``(expert axis, tensor axis or None, expert shards P, experts per shard)``; raises if P does not divide E."""
    n_shards = ep.mesh.shape[ep.expert_axis]
    if num_experts % n_shards:
        raise ValueError(f"{num_experts} experts cannot be split over the expert mesh axis of size {n_shards}. "
                         "Fix: choose mesh.expert dividing num_experts.")
    return ep.expert_axis, ep.tensor_axis, n_shards, num_experts // n_shards


def expert_parallel_experts(x: Float[Array, "M D"], w1, w3, w2, top_w: Float[Array, "M X"],
                            top_idx: Int[Array, "M X"], ep: sharding.ExpertParallel, *, mlp) -> Float[Array, "M D"]:
    """Dropless expert parallelism: each expert shard runs only its own E/P experts.

    Inside a ``shard_map`` (P = size of the expert mesh axis, F sharded over the tensor axis if any):
      1. tokens (and their routing) are all-gathered over the expert axis when the batch is split over it, so
         every expert shard sees every token of its group;
      2. each shard keeps the assignments routed to its experts, sorts them by local expert and runs the
         ragged grouped matmuls (other assignments get weight 0 and an empty group);
      3. the partial outputs are summed back: ``psum`` over the tensor axis (the F contraction of w2) and
         ``psum_scatter`` over the expert axis (each token's experts live on different shards), which returns
         every token to the shard that owns it. Communication: one all-gather + one reduce-scatter of [M, D]
         per layer (the all-to-all pair's volume up to the factor X), no capacity factor, no dropped tokens.
    """
    from jax.sharding import PartitionSpec as P

    ea, ta, n_shards, e_local = _expert_layout(ep, w1.shape[0])
    batch = ep.batch_axes if ep.batch_axes else None
    tok_spec = P(batch, None)
    w_in_spec, w_out_spec = P(ea, None, ta), P(ea, ta, None)

    def local(xl, w1l, w3l, w2l, wl, il):  # per shard: xl [m, D], w1l/w3l [e, D, f], w2l [e, f, D]
        if ep.tokens_split_over_experts:  # gather the expert group's tokens: [P*m, ...]
            xl, wl, il = (jax.lax.all_gather(a, ea, axis=0, tiled=True) for a in (xl, wl, il))
        lo = jax.lax.axis_index(ea) * e_local
        mine = (il >= lo) & (il < lo + e_local)  # [mg, X] assignments routed to this shard's experts
        a = sort_assignments(jnp.where(mine, il - lo, e_local), e_local + 1)  # this shard's first, e_local = elsewhere
        group_sizes = a.group_sizes[:e_local]  # [e]
        y = mlp(dispatch(xl, a.order, a.inverse), w1l, w3l, w2l, group_sizes)  # [A, D]
        out = combine(y, a, jnp.where(mine, wl, 0))  # [mg, D] partial: this shard's experts (and F slice)
        if ta is not None:
            out = jax.lax.psum(out, ta)
        if ep.tokens_split_over_experts:
            return jax.lax.psum_scatter(out, ea, scatter_dimension=0, tiled=True)  # [m, D]
        return jax.lax.psum(out, ea)

    fn = jax.shard_map(local, mesh=ep.mesh, in_specs=(tok_spec, _w_spec(w1, w_in_spec), _w_spec(w3, w_in_spec),
                                                       _w_spec(w2, w_out_spec), tok_spec, tok_spec),
                       out_specs=tok_spec, check_vma=False)
    return fn(x, w1, w3, w2, top_w, top_idx)


def _exclusive_cumsum(x: Array, axis: int = -1) -> Array:
    return jnp.cumsum(x, axis=axis) - x


def all_to_all_experts(x: Float[Array, "M D"], w1, w3, w2, top_w: Float[Array, "M X"], top_idx: Int[Array, "M X"],
                       ep: sharding.ExpertParallel, *, mlp, exchange, chunk_tokens: int = 0) -> Float[Array, "M D"]:
    """Dropless expert parallelism by ragged all-to-all: each assignment travels only to the shard of its expert.

    Inside a ``shard_map`` (P = size of the expert mesh axis, tokens split over it; F sharded over the tensor
    axis if any), per chunk of c local tokens (``chunk_tokens``; 0 = all m at once):
      1. dispatch: sort the c*X assignments by expert (so by destination shard), exchange the per-expert counts
         (an all-gather of P x E integers) and send each block to its expert's shard (``exchange``: the platform's
         ``ragged_all_to_all``, ``Backends.exchange_fn()``);
      2. each shard runs its E/P experts on what it received, grouped by local expert (three grouped matmuls);
      3. combine: the outputs travel back by the inverse ``ragged_all_to_all`` and each token sums its X expert
         outputs weighted by the router (the weights never travel); a ``psum`` over the tensor axis completes
         the F contraction of w2.
    Communication per layer: 2 x c*X rows of D each way (about X/P of the all-gather path's tokens when routing
    is balanced). Memory: the receive buffer is sized for the worst case (every token of every shard routed
    here: P*c*min(X, E/P) rows), so nothing is ever dropped; chunks bound it, each chunk recomputed in the
    backward pass (``jax.checkpoint``) so only one chunk's expert activations are live.
    """
    from jax.sharding import PartitionSpec as P

    top_k = top_idx.shape[1]
    num_experts = w1.shape[0]
    ea, ta, n_shards, e_local = _expert_layout(ep, num_experts)
    tok_spec = P(ep.batch_axes, None)  # the tokens are split over the expert axis (and maybe others)
    w_in_spec, w_out_spec = P(ea, None, ta), P(ea, ta, None)

    def one_chunk(w1l, w3l, w2l, xc, wc, ic):  # xc [c, D], wc / ic [c, X]; w1l / w3l [e, D, f], w2l [e, f, D]
        c, d = xc.shape
        a = sort_assignments(ic, num_experts)  # grouped by expert, hence by destination shard
        counts = a.group_sizes  # [E]
        all_counts = jax.lax.all_gather(counts, ea)  # [P_src, E]
        sends = all_counts.reshape(n_shards, n_shards, e_local).sum(-1)  # [src, dst] rows
        me = jax.lax.axis_index(ea)
        send_sizes, recv_sizes = sends[me], sends[:, me]  # [P], [P]
        a2a = functools.partial(exchange, axis_name=ea)
        rows = n_shards * c * min(top_k, e_local)  # worst case: every token of every shard routed here
        recv = a2a(dispatch(xc, a.order, a.inverse), jnp.zeros((rows, d), xc.dtype), _exclusive_cumsum(send_sizes),
                   send_sizes, _exclusive_cumsum(sends, axis=0)[me], recv_sizes)  # [R, D]: by source, then local expert
        local_counts = jax.lax.dynamic_slice_in_dim(all_counts, me * e_local, e_local, axis=1)  # [P, e]
        group_sizes = local_counts.sum(0)  # [e]
        if e_local > 1:  # regroup the received rows by local expert (sources come in order)
            seg = jnp.append(local_counts.reshape(-1), rows - local_counts.sum())  # [P*e + 1]
            ids = jnp.repeat(jnp.append(jnp.tile(jnp.arange(e_local), n_shards), e_local), seg,
                             total_repeat_length=rows)  # [R] local expert of each received row (e = padding)
            perm = jnp.argsort(ids, stable=True)  # [R]
            recv = recv[perm]
        y = mlp(recv, w1l, w3l, w2l, group_sizes)  # [R, D] (partial over the tensor axis)
        if e_local > 1:
            y = jnp.zeros_like(y).at[perm].set(y)  # back to the received order
        back = a2a(y, jnp.zeros((c * top_k, d), y.dtype), _exclusive_cumsum(recv_sizes), recv_sizes,
                   _exclusive_cumsum(sends, axis=1)[:, me], send_sizes)  # [A, D] in this shard's sorted order
        return combine(back, a, wc)  # [c, D]

    def local(xl, w1l, w3l, w2l, wl, il):  # per shard: xl [m, D]
        m = xl.shape[0]
        c = _chunk(m, chunk_tokens)
        if c == m:
            out = one_chunk(w1l, w3l, w2l, xl, wl, il)
        else:
            body = jax.checkpoint(functools.partial(one_chunk, w1l, w3l, w2l))
            split = lambda a: a.reshape(m // c, c, *a.shape[1:])
            out = jax.lax.map(lambda args: body(*args), (split(xl), split(wl), split(il))).reshape(m, -1)
        return jax.lax.psum(out, ta) if ta is not None else out

    fn = jax.shard_map(local, mesh=ep.mesh, in_specs=(tok_spec, _w_spec(w1, w_in_spec), _w_spec(w3, w_in_spec),
                                                       _w_spec(w2, w_out_spec), tok_spec, tok_spec),
                       out_specs=tok_spec, check_vma=False)
    return fn(x, w1, w3, w2, top_w, top_idx)


def _chunk(m: int, chunk_tokens: int) -> int:
    """Tokens per dispatch chunk: the largest divisor of m that is at most ``chunk_tokens`` (0: all m)."""
    if chunk_tokens <= 0 or chunk_tokens >= m:
        return m
    return max(c for c in range(1, chunk_tokens + 1) if m % c == 0)


def expert_mlp(backends: Backends):
    """The expert MLP of ``backends``: the platform's (``Backends.experts_fn``), or with quantized training
    (``ModelConfig.matmul_quant``) the SwiGLU experts over qwix's quantized ``ragged_dot`` on every platform
    (``model/quantized.py``)."""
    if backends.quant == "none":
        return low_rank_aware(backends.experts_fn())
    from mistral_jax.model import quantized  # qwix, imported by the runs that quantize

    return low_rank_aware(functools.partial(swiglu_experts, gmm=functools.partial(quantized.grouped_matmul,
                                                                                  mode=backends.quant)))


# The registered paths: fn(x, w1, w3, w2, top_w, top_idx, backends, cfg) -> [M, D].
register_moe("dense")(lambda *args, backends, cfg: dense_experts(*args))
register_moe("ragged")(lambda *args, backends, cfg: ragged_experts(*args, mlp=expert_mlp(backends)))
register_moe("all_gather")(lambda *args, backends, cfg: expert_parallel_experts(
    *args, ep=backends.expert_parallel, mlp=expert_mlp(backends)))
register_moe("all_to_all")(lambda *args, backends, cfg: all_to_all_experts(
    *args, ep=backends.expert_parallel, mlp=expert_mlp(backends), exchange=backends.exchange_fn(),
    chunk_tokens=cfg.moe_chunk_tokens))


class MoE(nnx.Module):
    """Mixtral's sparse MoE block (HF ``MixtralSparseMoeBlock``)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, backends: Backends | None = None):
        self.cfg = cfg if cfg.platform else cfg.for_platform()  # the Transformer passes it resolved
        self.backends = backends if backends is not None else resolve(self.cfg)  # chosen once (backends.py)
        d, f, e = cfg.dim, cfg.hidden_dim, cfg.num_experts
        init = nnx.initializers.normal(cfg.initializer_range)
        pd = cfg.jnp_param_dtype
        self.gate = nnx.Param(init(rngs.params(), (d, e), pd), logical_axes=("embed", None))
        self.w1 = nnx.Param(init(rngs.params(), (e, d, f), pd), logical_axes=("experts", "expert_embed", "mlp"))
        self.w3 = nnx.Param(init(rngs.params(), (e, d, f), pd), logical_axes=("experts", "expert_embed", "mlp"))
        self.w2 = nnx.Param(init(rngs.params(), (e, f, d), pd), logical_axes=("experts", "mlp", "expert_embed"))

    def __call__(self, x: Float[Array, "B T D"], valid: Bool[Array, "B T"] | None = None
                 ) -> tuple[Float[Array, "B T D"], dict[str, Array]]:
        """Returns ``(y [B, T, D], stats)``; ``stats`` feed ``load_balancing_loss`` and ``z_loss``.

        ``valid`` marks real tokens (padding is excluded from the statistics, as HF's attention_mask does).
        """
        cfg, dt = self.cfg, self.cfg.jnp_dtype
        b, t, d = x.shape
        xf = x.reshape(b * t, d)  # [M, D]
        # router logits from a float32 matmul (ST-MoE's selective precision): in bfloat16, small logit gaps that
        # decide the top-k are lost before the float32 softmax sees them; the [D, E] matmul costs ~nothing
        logits = jnp.einsum("MD,DE->ME", xf.astype(jnp.float32), self.gate[...].astype(jnp.float32))
        probs, top_w, top_idx = route(logits, cfg.num_experts_per_tok)
        valid_m = jnp.ones((b * t,), bool) if valid is None else valid.reshape(b * t)  # [M]
        stats = router_stats(logits, probs, top_idx, valid_m)
        w1, w3, w2 = (expert_weight(w, dt) for w in (self.w1, self.w3, self.w2))  # LoRA: unmerged (LowRank)
        args = (xf, w1, w3, w2, top_w.astype(dt), top_idx)
        y = MOE[self.backends.moe].fn(*args, backends=self.backends, cfg=cfg)  # [M, D]
        return sharding.constrain(y.reshape(b, t, d), ("batch", "seq", "act_embed")), stats
