"""RMSNorm, SwiGLU MLP, decoder layer and the Transformer (layers stacked and scanned over depth).

Legend: B batch, T sequence, D model dim, F MLP hidden dim, V vocab, L layers, E experts.

The forward pass ``Transformer.forward`` returns a ``ModelOutput(logits, cache, aux, hidden)``; ``model(tokens)``
is its shorthand for the logits. It is three steps that an inference-side transform may recombine (see
``inference/per_layer.py``): ``embed_tokens`` -> the decoder layers (``DecoderLayer``, scanned over the stacked
``[L, ...]`` weights) -> ``output`` (final norm, LM head, the updated cache and the aux losses).

The LM head is two methods, the one place of its dtype and precision: ``head_weight()`` (the ``[D, V]`` weight,
the transposed embedding when tied) and ``head_logits(x, head)`` (float32 logits of any ``[B, C, D]`` slice of
final hidden states). ``forward(..., return_hidden=True)`` skips the head and returns the final-normed hidden
states instead, so the training loss can apply the head chunk by chunk (``training/loss.chunked_cross_entropy``)
without ever holding the ``[B, T, V]`` float32 logits.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int

from mistral_jax import sharding
from mistral_jax.config import ModelConfig
from mistral_jax.model import context
from mistral_jax.model import kv_cache as kvc
from mistral_jax.model import moe as moe_lib
from mistral_jax.model.attention import Attention, self_attention_backend
from mistral_jax.model.backends import Backends, resolve
from mistral_jax.model.moe import MoE
from mistral_jax.model.projection import proj, weight_proj, weight_value


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None):
        self.eps = cfg.norm_eps
        self.weight = nnx.Param(jnp.ones((cfg.dim,), cfg.jnp_param_dtype), logical_axes=("embed",))

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        # float32 statistics: the mean of squares of bfloat16 activations is badly rounded.
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(cfg.initializer_range)
        d, f, pd = cfg.dim, cfg.hidden_dim, cfg.jnp_param_dtype
        self.w1 = nnx.Param(init(rngs.params(), (d, f), pd), logical_axes=("embed", "mlp"))
        self.w3 = nnx.Param(init(rngs.params(), (d, f), pd), logical_axes=("embed", "mlp"))
        self.w2 = nnx.Param(init(rngs.params(), (f, d), pd), logical_axes=("mlp", "embed"))

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        dt, q = self.cfg.jnp_dtype, self.cfg.matmul_quant
        h = jax.nn.silu(weight_proj("BTD,DF->BTF", x, self.w1, dt, q)) * weight_proj("BTD,DF->BTF", x, self.w3, dt, q)
        h = sharding.constrain(h, ("batch", "seq", "act_mlp"))
        return weight_proj("BTF,FD->BTD", h, self.w2, dt, q)


def empty_router_stats(cfg: ModelConfig) -> dict[str, Array]:
    e = max(cfg.num_experts, 1)
    zero = jnp.zeros((), jnp.float32)
    return dict(counts=jnp.zeros((e,), jnp.float32), prob_sum=jnp.zeros((e,), jnp.float32), z_sum=zero, tokens=zero)


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, backends: Backends):
        self.cfg = cfg
        self.attention_norm = RMSNorm(cfg)
        self.attention = Attention(cfg, rngs=rngs, backends=backends)
        self.ffn_norm = RMSNorm(cfg)
        self.feed_forward = MoE(cfg, rngs=rngs, backends=backends) if cfg.is_moe else MLP(cfg, rngs=rngs)

    def __call__(self, x: Float[Array, "B T D"], positions: Int[Array, "B T"], segment_ids: Int[Array, "B T"] | None,
                 cache: kvc.LayerCache | None = None
                 ) -> tuple[Float[Array, "B T D"], dict[str, Array], kvc.LayerCache | None]:
        """Returns ``(x, router stats, the updated cache of this layer or None)``."""
        attn, new_cache = self.attention(self.attention_norm(x), positions, segment_ids, cache)
        h = x + attn
        normed = self.ffn_norm(h)
        if self.cfg.is_moe:
            valid = None if segment_ids is None else segment_ids != 0  # segment 0 = padding
            ff, stats = self.feed_forward(normed, valid)
        else:
            ff, stats = self.feed_forward(normed), empty_router_stats(self.cfg)
        out = sharding.constrain(h + ff, ("batch", "seq", "act_embed"))
        return out, stats, new_cache


_REMAT_POLICIES = {
    "full": None,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("qkv_proj"),
    # full, and each layer's input (the residual stream the backward pass restarts from) kept in host memory
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"], offload_src="device",
        offload_dst="pinned_host"),
}


class ModelOutput(NamedTuple):
    """What ``Transformer.forward`` returns."""

    logits: Float[Array, "B T V"] | None  # float32; [B, logits_to_keep, V] for the last columns; None: return_hidden
    cache: kvc.KVCache | None  # the updated cache when one was given, else None
    aux: dict[str, Array]  # load_balancing_loss, router_z_loss (scalars, HF units), expert_load [L, E]
    hidden: Float[Array, "B T D"] | None = None  # with return_hidden: final-normed states (compute dtype), else None


# Layer weights the layers read in float32 whatever the compute dtype (the MoE router: see model/moe.py).
_FLOAT32_WEIGHTS = ("gate",)


def _compute_dtype_weights(state: nnx.State, cfg: ModelConfig) -> nnx.State:
    """The stacked trained weights (plain ``nnx.Param``) cast to the compute dtype before the scan over layers
    (except ``_FLOAT32_WEIGHTS``). The layers cast them anyway; casting outside the scan makes the backward pass stack
    each micro-batch's weight gradients in the compute dtype (bfloat16: half the memory of float32 master
    weights' gradients; the values are the same, since the gradient of a bfloat16 weight is bfloat16) before
    they are cast and summed into the float32 gradients. LoRA's variables are left to the layers: its ``Frozen``
    base has no gradient (a stacked copy would only cost memory), and its adapters form a float32 delta."""
    dt = cfg.jnp_dtype
    if cfg.jnp_param_dtype == dt:
        return state

    def cast(path, var):
        names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
        if (type(var) is not nnx.Param or not names.isdisjoint(_FLOAT32_WEIGHTS)
                or not jnp.issubdtype(var[...].dtype, jnp.floating)):
            return var
        return var.replace(var[...].astype(dt))

    return jax.tree_util.tree_map_with_path(cast, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


class Transformer(nnx.Module):
    """Mistral / Mixtral decoder-only language model.

    ``model(tokens)`` -> float32 logits ``[B, T, V]``; ``model.forward(...)`` -> ``ModelOutput``. Layer
    parameters are stacked with a leading ``L`` axis (logical axis ``layers``) so the forward pass scans one
    compiled layer over depth.

    ``cfg.platform`` empty is filled with the host's backend here, once. The backends (attention, MoE path,
    expert MLP) are chosen here too, once (``backends.resolve``), from ``cfg.platform`` and the ``mesh`` and
    ``rules`` passed in (None: no mesh-aware backend; ``backends.bind`` sets them later): a config for another
    platform builds that platform's program (an ahead-of-time TPU compile on a CPU host), and tracing under an
    active mesh never changes the choice.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None,
                 rules: sharding.ShardingRules | None = None):
        cfg = cfg if cfg.platform else cfg.for_platform()
        self.cfg = cfg
        self.backends = backends = resolve(cfg, mesh, rules)
        pd = cfg.jnp_param_dtype
        init = nnx.initializers.normal(cfg.initializer_range)
        self.embed = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.dim), pd), logical_axes=("vocab", "embed"))

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, rngs=rngs, backends=backends)

        self.layers = make_layers(rngs)
        for _, var in nnx.iter_graph(self.layers):  # the stacked axis is the logical axis "layers"
            if isinstance(var, nnx.Variable) and "logical_axes" in var.get_metadata():
                var.set_metadata("logical_axes", ("layers", *var.get_metadata()["logical_axes"]))
        self.norm = RMSNorm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Param(init(rngs.params(), (cfg.dim, cfg.vocab_size), pd),
                                     logical_axes=("embed", "vocab"))

    # ------------------------------------------------------------------ steps of the forward pass
    def embed_tokens(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        """The token embeddings in the compute dtype."""
        # Gather rows of the table sharded on D only (a vocab-sharded table would make XLA replicate and re-split
        # it) for every token of the batch shard that the table's D axes replicate, then move to batch sharding
        # (an all-to-all over the D axes). The gradient is then a local float32 scatter-add into each device's
        # [V, D/shards] slice: no replicated [V, D] table or gradient. The batch stays split over the batch axes
        # that do not shard D (`data`, e.g. across DCN slices): replicating it there makes the partitioner
        # all-gather the whole hidden-state gradient in the backward pass
        # (docs/benchmarks.md#the-embedding-lookup-keeps-the-batch-split).
        table = sharding.constrain(self.embed[...], (None, "embed"))  # [V, D]
        x = jnp.take(table, sharding.constrain(tokens, ("batch", None), yield_to=("embed",)), axis=0)  # [B, T, D]
        x = sharding.constrain(x, ("batch", None, "embed"), yield_to=("embed",)).astype(self.cfg.jnp_dtype)
        if sharding.spec(("seq",))[0] is not None:  # context parallelism: D's other axes to the batch, then the
            x = sharding.constrain(x, ("batch", None, "seq"))  # context axis from D to T (XLA replicates x for both)
        return sharding.constrain(x, ("batch", "seq", "act_embed"))

    def _run_layers(self, x, positions, segment_ids, caches: kvc.LayerCache | None):
        """The decoder layers over the stacked weights; ``caches``: every layer's view (``KVCache.layers()``).

        Returns ``(x, router stats [L, ...], updated views [L, ...] or None)``.
        """
        cfg = self.cfg
        graphdef, state = nnx.split(self.layers)
        state = _compute_dtype_weights(state, cfg)

        def body(h, xs):
            layer_state, layer_cache = xs
            h = checkpoint_name(h, "layer_input")  # what remat="offload" keeps in host memory
            h, stats, new_cache = nnx.merge(graphdef, layer_state)(h, positions, segment_ids, layer_cache)
            return h, (stats, new_cache)

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            x, (stats, new_caches) = jax.lax.scan(body, x, (state, caches))
            return x, stats, new_caches
        outs = []
        for i in range(cfg.n_layers):  # a Python loop over slices of the stacked weights
            x, out = body(x, jax.tree.map(lambda a, i=i: a[i], (state, caches)))
            outs.append(out)
        stats, new_caches = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        return x, stats, new_caches

    def head_weight(self) -> Float[Array, "D V"]:
        """The LM head ``[D, V]`` as stored (param dtype): ``lm_head``, or the transposed embedding when tied.
        ``head_logits`` casts it to the compute dtype. A quantized head (``quant.Int8Weight``, QLoRA's frozen base)
        is dequantized straight into the compute dtype (``weight_value``)."""
        if self.cfg.tie_embeddings:
            return self.embed[...].T
        if hasattr(self.lm_head, "dequantize"):
            return weight_value(self.lm_head, self.cfg.jnp_dtype)
        return self.lm_head[...]

    def head_logits(self, x: Float[Array, "B C D"], head: Float[Array, "D V"]) -> Float[Array, "B C V"]:
        """float32 logits of final-normed hidden states ``x`` (any ``[B, C, D]`` slice) with ``head``
        (``head_weight()``). Reads no variable, so it may run inside a ``scan`` / ``checkpoint`` of the loss."""
        # float32 logits: the loss and sampling need them; accumulate the matmul in float32 too.
        logits = proj("BTD,DV->BTV", x, head.astype(self.cfg.jnp_dtype), preferred_element_type=jnp.float32)
        return sharding.constrain(logits, ("batch", "seq", "act_vocab"))

    def output(self, x: Float[Array, "B T D"], stats: dict[str, Array], cache: kvc.KVCache | None,
               new_caches: kvc.LayerCache | None, logits_to_keep: int = 0, *, return_hidden: bool = False
               ) -> ModelOutput:
        """The ``ModelOutput`` from the last layer's activations ``x``, the per-layer router ``stats`` and the
        updated per-layer cache views (stacked over L) of ``cache``; ``return_hidden``: the final-normed
        states in ``hidden`` and no logits (``logits=None``)."""
        cfg = self.cfg
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        x = self.norm(x)
        new_cache = None if cache is None else cache.with_layers(new_caches)
        aux = aux_from_stats(cfg, stats)
        if return_hidden:
            return ModelOutput(logits=None, cache=new_cache, aux=aux, hidden=x)
        return ModelOutput(logits=self.head_logits(x, self.head_weight()), cache=new_cache, aux=aux)

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: Int[Array, "B T"], positions: Int[Array, "B T"] | None = None,
                segment_ids: Int[Array, "B T"] | None = None, *, cache: kvc.KVCache | None = None,
                logits_to_keep: int = 0, return_hidden: bool = False) -> ModelOutput:
        """The forward pass.

        Args:
          tokens: int32 ``[B, T]``.
          positions: absolute positions ``[B, T]`` (default ``arange(T)``); restart per packed document.
            With a cache, a negative position marks padding (neither attended to nor stored).
          segment_ids: ``[B, T]`` document ids for packed rows; tokens attend within their segment only;
            segment 0 is padding (excluded from the router statistics).
          cache: a ``KVCache``: the tokens also attend over it and are written into it (``LayerCache.update``).
          logits_to_keep: compute the logits of the last ``logits_to_keep`` columns only (0 = all), as HF's
            argument of that name: prefill needs only the last one, and the LM head is a large matmul.
          return_hidden: skip the LM head: ``logits`` is None and ``hidden`` holds the final-normed states
            ``[B, T, D]`` (compute dtype), for a loss that applies ``head_logits`` chunk by chunk.

        Returns:
          ``ModelOutput(logits, cache, aux, hidden)``: float32 logits ``[B, T, V]`` (``[B, logits_to_keep, V]``);
          the updated cache (None without one); aux: ``load_balancing_loss``, ``router_z_loss`` (scalars, HF
          units) and ``expert_load`` ``[L, E]`` (fraction of each layer's assignments per expert); ``hidden``
          (None unless ``return_hidden``).
        """
        positions = self.default_positions(tokens, positions, cache)
        # context parallelism with ring attention: the tokens in the zig-zag layout that balances the causal work
        # over the context shards, the hidden states back in order after the last layer (model/context.py)
        zigzag = cache is None and self.backends.context > 1 and self_attention_backend(
            self.cfg, self.backends, tokens.shape[1], segment_ids is not None) == "ring"
        if zigzag:
            p = self.backends.context
            tokens, positions = context.to_zigzag(tokens, p), context.to_zigzag(positions, p)
            segment_ids = None if segment_ids is None else context.to_zigzag(segment_ids, p)
        x = self.embed_tokens(tokens)
        x, stats, new_caches = self._run_layers(x, positions, segment_ids, None if cache is None else cache.layers())
        if zigzag:
            x = sharding.constrain(context.from_zigzag(x, self.backends.context), ("batch", "seq", "act_embed"))
        return self.output(x, stats, cache, new_caches, logits_to_keep, return_hidden=return_hidden)

    def __call__(self, tokens: Int[Array, "B T"], positions: Int[Array, "B T"] | None = None,
                 segment_ids: Int[Array, "B T"] | None = None, *, return_aux: bool = False, logits_to_keep: int = 0
                 ) -> Float[Array, "B T V"] | tuple[Float[Array, "B T V"], dict[str, Array]]:
        """``forward(...).logits``; with ``return_aux=True`` ``(logits, aux)``. See ``forward``."""
        out = self.forward(tokens, positions, segment_ids, logits_to_keep=logits_to_keep)
        return (out.logits, out.aux) if return_aux else out.logits

    @staticmethod
    def default_positions(tokens: Int[Array, "B T"], positions: Int[Array, "B T"] | None,
                          cache: kvc.KVCache | None) -> Int[Array, "B T"]:
        """``positions``, or ``arange(T)`` per row when none are given (an error with a cache)."""
        if positions is not None:
            return positions
        if cache is not None:
            raise ValueError("decoding with a cache needs explicit `positions` [B, T] (absolute positions).")
        b, t = tokens.shape
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def aux_from_stats(cfg: ModelConfig, stats: dict[str, Array]) -> dict[str, Array]:
    """Aux losses from per-layer router statistics (leading L axis), pooled over layers as HF does."""
    if not cfg.is_moe:
        zero = jnp.zeros((), jnp.float32)
        return dict(load_balancing_loss=zero, router_z_loss=zero, expert_load=jnp.zeros((cfg.n_layers, 0)))
    lb = moe_lib.load_balancing_loss(stats["counts"], stats["prob_sum"], stats["tokens"])
    z = moe_lib.z_loss(stats["z_sum"], stats["tokens"])
    load = stats["counts"] / jnp.maximum(stats["counts"].sum(-1, keepdims=True), 1.0)  # [L, E]
    return dict(load_balancing_loss=lb, router_z_loss=z, expert_load=load)


@functools.cache
def _abstract_state(cfg: ModelConfig):
    return nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def count_params(cfg: ModelConfig) -> int:
    """Total parameters, from ``nnx.eval_shape`` (no memory is allocated)."""
    return sum(x.size for x in jax.tree.leaves(_abstract_state(cfg)))


def count_active_params(cfg: ModelConfig) -> int:
    """Parameters used per token: all but the (E - top_k) unrouted experts of each MoE layer."""
    total = count_params(cfg)
    if not cfg.is_moe:
        return total
    state = _abstract_state(cfg)
    ff = state["layers"]["feed_forward"]
    expert = sum(ff[name].get_value().size for name in ("w1", "w2", "w3"))  # all layers, all experts
    return total - expert * (cfg.num_experts - cfg.num_experts_per_tok) // cfg.num_experts


def params_dict(model: Transformer) -> dict[str, Any]:
    """The model's parameters as a plain nested dict of arrays (the layout of every checkpoint)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_model(cfg: ModelConfig) -> Transformer:
    """A Transformer whose parameters are ``ShapeDtypeStruct``s (no memory); fill it with ``nnx.update``."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def from_params(cfg: ModelConfig, params: dict[str, Any]) -> Transformer:
    """A Transformer holding ``params`` (a ``params_dict`` layout); shapes are checked, all errors at once."""
    model = abstract_model(cfg)
    state = nnx.state(model, nnx.Param)
    expected = {"/".join(map(str, k)): v.shape for k, v in nnx.to_flat_state(state)}
    given = {"/".join(map(str, k)): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
             for k in [tuple(getattr(p, "key", p) for p in k)]}
    problems = [f"missing {k} {s}" for k, s in expected.items() if k not in given]
    problems += [f"unexpected {k} {s}" for k, s in given.items() if k not in expected]
    problems += [f"shape of {k}: expected {s}, got {given[k]}" for k, s in expected.items()
                 if k in given and tuple(given[k]) != tuple(s)]
    if problems:
        raise ValueError("parameters do not fit the model config:\n  " + "\n  ".join(problems))
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model
