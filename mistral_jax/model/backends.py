"""The backend registry: which attention kernel and which MoE path a model runs, chosen once.

Backends are registered where they are written (``@register_attention`` in ``attention.py`` and ``kernels.py``,
``@register_moe`` in ``moe.py``, ``register_expert_mlp`` / ``register_exchange`` in ``cpu.py`` and ``kernels.py``;
importing ``mistral_jax`` imports them all, and this module imports none of them). They are chosen from two things
only: the target platform (``ModelConfig.platform``, never the host's backend) and the mesh and rules passed in
explicitly (``resolve(cfg, mesh, rules)``). Nothing here reads an ambient mesh: a model built without a mesh runs
the same backends whether or not it is traced under ``sharding.use_mesh``.

``resolve`` returns a ``Backends`` record (frozen, hashable: it is static data of the model's graph). The
``Transformer`` resolves it once at construction (``Transformer(cfg, rngs=..., mesh=..., rules=...)``) and hands it
to its layers; ``bind(model, mesh, rules)`` re-resolves it for a model built elsewhere (e.g. ``nnx.eval_shape``).

Kinds of backend:
  * attention (``ModelConfig.attention_impl``): ``auto`` takes the first registered backend whose ``platforms``
    hold the target and whose ``supports`` accepts the call's shapes (sequence length, window, segments);
    a named one is used where it applies and falls back to ``reference`` where it does not (cached decoding,
    ``blocked`` without a window).
  * MoE (``ModelConfig.moe_impl`` and ``moe_dispatch``): ``dense`` (the oracle), ``ragged`` (dropless, one
    device's experts), and the expert-parallel dispatch modes ``all_to_all`` / ``all_gather``, chosen when the
    mesh passed in shards the experts over an axis of size > 1.
  * expert MLP: the SwiGLU experts on rows sorted by expert (one per platform: looped blocks on CPU, ``ragged_dot``
    on GPU, megablox's grouped matmul on TPU); exchange: the ragged all-to-all of the ``all_to_all`` dispatch
    (XLA's op on accelerators, a dense stand-in on CPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jax.sharding import Mesh, PartitionSpec

from mistral_jax import sharding

PLATFORMS = ("cpu", "gpu", "tpu")
CONTEXT_PARALLEL = ("halo", "ring")  # the attention backends that take a sequence split over the context axis


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """What an attention backend's ``supports`` sees: the shapes of one self-attention call."""

    seq_len: int
    window: int | None
    block: int  # the blocked backend's query block (``attention.band_block``)
    has_segments: bool
    context: int = 1  # shards of the sequence (the mesh's context axis; > 1: only ring and halo support the call)
    dtype: str = "bfloat16"  # the compute dtype (cuDNN's fused attention takes 16-bit inputs only)


@dataclasses.dataclass(frozen=True)
class Backend:
    """One registered backend: its function, the platforms it runs on and the calls it supports."""

    name: str
    fn: Callable[..., Any]
    platforms: tuple[str, ...]
    supports: Callable[[Any], bool] = lambda call: True


ATTENTION: dict[str, Backend] = {}
MOE: dict[str, Backend] = {}
EXPERT_MLP: dict[str, Backend] = {}
EXCHANGE: dict[str, Backend] = {}


def _register(table: dict[str, Backend], kind: str, name: str, platforms, supports=None):
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad:
        raise ValueError(f"{kind} backend {name!r}: unknown platforms {bad}. Fix: use some of {PLATFORMS}.")

    def add(fn):
        table[name] = Backend(name, fn, tuple(platforms), supports or (lambda call: True))
        return fn

    return add


def register_attention(name: str, *, platforms=PLATFORMS, supports: Callable[[AttentionCall], bool] | None = None):
    """Decorator: register ``fn(q, k, v, positions, segment_ids, *, window, block, backends)`` (self-attention;
    ``q [B, T, N, H]``, ``k/v [B, T, K, H]`` -> ``[B, T, N, H]``) as attention backend ``name``. ``auto`` takes
    the first registered backend for the platform that ``supports`` the call, so register in preference order."""
    return _register(ATTENTION, "attention", name, platforms, supports)


def register_moe(name: str, *, platforms=PLATFORMS):
    """Decorator: register ``fn(x [M, D], w1, w3, w2, top_w [M, X], top_idx [M, X], backends, cfg) -> [M, D]``
    as MoE path ``name``."""
    return _register(MOE, "MoE", name, platforms)


def register_expert_mlp(name: str, fn: Callable, *, platforms) -> None:
    """Register ``fn(x [A, D], w1, w3, w2, group_sizes [E]) -> [A, D]`` (SwiGLU experts on rows sorted by expert);
    each platform uses the first one registered for it."""
    _register(EXPERT_MLP, "expert MLP", name, platforms)(fn)


def register_exchange(name: str, fn: Callable, *, platforms) -> None:
    """Register a ``jax.lax.ragged_all_to_all``-compatible exchange; each platform uses the first registered."""
    _register(EXCHANGE, "exchange", name, platforms)(fn)


def _check_platform(platform: str) -> None:
    if platform not in PLATFORMS:
        raise ValueError(f"backends for platform={platform!r}: expected cpu, gpu or tpu. Fix: build the model from a "
                         "config with a platform (the Transformer fills it in: cfg.for_platform()).")


def _first_for(table: dict[str, Backend], kind: str, platform: str) -> str:
    _check_platform(platform)
    for name, b in table.items():
        if platform in b.platforms:
            return name
    raise ValueError(f"no {kind} backend is registered for platform={platform!r}; registered: "
                     f"{ {n: b.platforms for n, b in table.items()} }.")


def lookup(table: dict[str, Backend], kind: str, name: str) -> Backend:
    """The registered backend ``name`` of ``table``; an error naming the registered ones if there is none."""
    if name not in table:
        raise ValueError(f"unknown {kind} backend {name!r}; registered: {sorted(table)}. Fix: use one of them (or "
                         f"register yours with mistral_jax.model.backends.register_{kind.replace(' ', '_')}).")
    return table[name]


# ---------------------------------------------------------------------------------------------------- the record
@dataclasses.dataclass(frozen=True)
class Backends:
    """The backends of one model, resolved once from the target platform and an explicit mesh (``resolve``).

    Attention is chosen per call from ``attention`` (``choose_attention``: the shapes decide between the
    platform's backends); everything else is fixed here.
    """

    platform: str
    attention: str  # the configured attention_impl ("auto" or a registered name)
    moe: str  # registered MoE path: dense, ragged, all_to_all, all_gather
    expert_mlp: str  # registered expert MLP for the platform
    exchange: str  # registered ragged all-to-all for the platform
    mesh: Mesh | None = None  # the mesh the model runs on (kernels XLA cannot partition run in a shard_map over it)
    attention_specs: tuple[PartitionSpec, PartitionSpec, PartitionSpec] | None = None  # q, k/v, segment ids
    expert_parallel: sharding.ExpertParallel | None = None  # the experts' layout when the mesh shards them
    context_axis: str | None = None  # the mesh axis that shards the sequence (``seq``), if its size is > 1
    context: int = 1  # its size: > 1 is context parallelism (attention: ring or halo, model/context.py)
    quant: str = "none"  # ModelConfig.matmul_quant: the experts' grouped matmuls quantized (model/moe.py)

    def experts_fn(self) -> Callable:
        """The expert MLP function (``fn(x, w1, w3, w2, group_sizes)``)."""
        return EXPERT_MLP[self.expert_mlp].fn

    def exchange_fn(self) -> Callable:
        """The ragged all-to-all (``jax.lax.ragged_all_to_all``'s signature)."""
        return EXCHANGE[self.exchange].fn


def resolve(cfg, mesh: Mesh | None = None, rules: sharding.ShardingRules | None = None) -> Backends:
    """Choose the backends of a model with config ``cfg`` (its ``platform`` filled in) on ``mesh`` (None: one
    device, or a mesh the model's own code does not need to know about) with logical-axis ``rules``.

    Raises ``ValueError`` naming the options for an unknown backend or one that does not run on the platform.
    """
    platform = cfg.platform
    _check_platform(platform)
    if cfg.attention_impl != "auto":
        b = lookup(ATTENTION, "attention", cfg.attention_impl)
        if platform not in b.platforms:
            usable = [n for n, x in ATTENTION.items() if platform in x.platforms]
            raise ValueError(f"attention_impl={cfg.attention_impl!r} runs on {list(b.platforms)}, not on "
                             f"platform={platform!r}. Fix: use 'auto' or one of {usable}.")
    ep = None
    specs = None
    context_axis, context = None, 1
    if mesh is not None:
        rules = rules or sharding.DEFAULT_RULES
        ep = sharding.expert_parallel(mesh, rules)
        specs = (rules.spec(("batch", "seq", "act_heads", "head_dim"), mesh),
                 rules.spec(("batch", "seq", "act_kv_heads", "head_dim"), mesh), rules.spec(("batch", "seq"), mesh))
        (seq_axes,) = rules.spec(("seq",), mesh)
        if seq_axes is not None:
            if not isinstance(seq_axes, str):
                raise ValueError(f"the sequence (`seq`) is sharded over several mesh axes {seq_axes}; context "
                                 "parallelism needs one. Fix: map `seq` to a single mesh axis in the rules table.")
            context_axis, context = seq_axes, mesh.shape[seq_axes]
    return Backends(platform=platform, attention=cfg.attention_impl, moe=choose_moe(cfg, ep),
                    expert_mlp=_first_for(EXPERT_MLP, "expert MLP", platform),
                    exchange=_first_for(EXCHANGE, "exchange", platform), mesh=mesh, attention_specs=specs,
                    expert_parallel=ep if cfg.is_moe else None, context_axis=context_axis, context=context,
                    quant=cfg.matmul_quant)


# What ``ModelConfig.moe_impl`` accepts. A policy, not a registered path (``choose_moe`` maps it to one): ``dense``
# is the oracle; ``ragged`` and ``expert_parallel`` both run dropless, expert-parallel exactly when the mesh shards
# the experts.
MOE_IMPLS = ("dense", "ragged", "expert_parallel")


def attention_impls() -> tuple[str, ...]:
    """What ``ModelConfig.attention_impl`` accepts: ``auto`` and every registered attention backend."""
    return ("auto", *ATTENTION)


def choose_moe(cfg, ep: sharding.ExpertParallel | None) -> str:
    """The MoE path: ``dense`` if asked; expert-parallel (``all_to_all`` when the tokens are split over the expert
    axis and ``moe_dispatch`` asks for it, else ``all_gather``) when ``ep`` (the mesh's expert layout) is given;
    otherwise ``ragged``."""
    if cfg.moe_impl == "dense":
        return "dense"
    if ep is None:
        return "ragged"
    if cfg.moe_dispatch == "all_to_all" and ep.tokens_split_over_experts:
        return "all_to_all"
    return "all_gather"


def choose_attention(impl: str, *, platform: str, self_attention: bool, seq_len: int, window: int | None, block: int,
                     has_segments: bool, context: int = 1, dtype: str = "bfloat16") -> str:
    """The attention backend of one call: ``impl`` (``attention_impl``) resolved for the target ``platform``.

    ``auto``: the first registered backend for the platform that supports the call. A named backend that does
    not support the call (no window for ``blocked``, packed segments or a float32 ``dtype`` for ``cudnn``), and any
    backend in cached decoding (``self_attention`` False: the cache buffer already is the band), fall back to
    ``reference``.

    Context parallelism (``context`` > 1 shards of the sequence): only the backends whose ``supports`` accepts
    the call (``ring``, ``halo``) apply; ``auto`` and every backend that does not take a sharded sequence get
    the first of them that does (``halo`` when a window makes its exchange smaller than the ring's).
    """
    _check_platform(platform)
    if not self_attention:
        return "reference"
    call = AttentionCall(seq_len=seq_len, window=window, block=block, has_segments=has_segments, context=context,
                         dtype=dtype)
    if context > 1:
        if impl != "auto" and lookup(ATTENTION, "attention", impl).supports(call) and impl in CONTEXT_PARALLEL:
            return impl
        for name in CONTEXT_PARALLEL:
            if name in ATTENTION and platform in ATTENTION[name].platforms and ATTENTION[name].supports(call):
                return name
        raise ValueError(f"no attention backend supports a sequence of {seq_len} split over {context} shards "
                         f"(window {window}). Fix: make the sequence length a multiple of 2 x mesh.context.")
    if impl == "auto":
        for name, b in ATTENTION.items():
            if platform in b.platforms and b.supports(call):
                return name
        return "reference"
    backend = lookup(ATTENTION, "attention", impl)
    if impl == "blocked":  # computes any windowed call (the band merely saves less on short sequences)
        return "blocked" if window is not None else "reference"
    return impl if backend.supports(call) else "reference"  # e.g. cuDNN has no segment ids: packed rows


def bind(model, mesh: Mesh | None, rules: sharding.ShardingRules | None = None):
    """Re-resolve the backends of every module of ``model`` that has them for ``mesh`` and ``rules``; returns
    ``model`` (changed in place). For models built without the mesh they will run on (an abstract model from
    ``nnx.eval_shape``, a checkpoint loaded on one device)."""
    from flax import nnx

    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Module) and isinstance(getattr(module, "backends", None), Backends):
            module.backends = resolve(module.cfg, mesh, rules)
    return model
