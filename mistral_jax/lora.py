"""LoRA adapters for the Transformer without touching the model code; merge back into plain weights for export.

Legend: L layers, E experts, D model dim, N heads, K kv heads, H head_dim, F MLP hidden dim, R rank.

``apply_lora(model, rank, alpha, targets)`` replaces each targeted weight attribute (``attention.wq`` ...) by a
``LoRAWeight`` module holding the frozen base ``W`` and two adapters ``A`` [in..., R], ``B`` [R, out...] (B starts at
zero, so the wrapped model first computes exactly what the base model did). The model computes PEFT's unmerged
``x W + (alpha / R) (x A) B`` from ``LoRAWeight.low_rank``: the projections (``model.projection.weight_proj``:
attention, the dense MLP) and Mixtral's experts (``model.moe.LowRank``, where the expert MLP is grouped matmuls),
so the frozen ``W`` gets no gradient and the backward pass has no weight-gradient matmul for it. Other readers (CPU's
fused expert MLP, the dense MoE oracle) index ``self.w1[...]``; ``LoRAWeight.__getitem__`` answers with the merged
weight ``W + (alpha / R) * A @ B``, formed inside the layer scan's body (one layer at a time).

Every other parameter (embedding, norms, router, untargeted projections) becomes a ``Frozen`` variable, which is
not an ``nnx.Param``: ``nnx.state(model, nnx.Param)`` -- what the optimizer and gradients see, and what a LoRA
checkpoint saves -- is exactly the adapters. ``merge_lora`` folds ``A @ B`` into ``W`` and turns everything back into
``nnx.Param``, giving a plain ``Transformer`` that ``save_hf`` / ``save_mistral`` export.

A LoRA training run (``config.lora.rank > 0``, ``training/recipe.py``) trains only the adapters and checkpoints
them; ``mj.load_pretrained(workdir)`` returns its base (``init_from``) + adapters merged, so ``generate``,
``eval.py`` and ``convert --from jax`` accept a LoRA workdir (or one of its ``checkpoints/<step>`` dirs), and
``mistral_jax.cli.lora`` exports it::

    mistral-jax-lora --workdir runs/tiny_lora --output exports/tiny_lora_hf [--to hf|mistral|jax]

Targets (HF PEFT names accepted as aliases): ``wq`` (q_proj), ``wk`` (k_proj), ``wv`` (v_proj), ``wo`` (o_proj),
``w1`` (gate_proj), ``w3`` (up_proj), ``w2`` (down_proj). For Mixtral, ``w1 w2 w3`` are the expert projections
(one adapter pair per expert); the router ``gate`` is never adapted.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from mistral_jax import sharding

# name -> (number of input dims, number of output dims); leading dims (layers, experts) are batch dims.
_IN_OUT = {"wq": (1, 2), "wk": (1, 2), "wv": (1, 2), "wo": (2, 1), "w1": (1, 1), "w3": (1, 1), "w2": (1, 1)}
ALIASES = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "q_proj": "wq", "k_proj": "wk", "v_proj": "wv",
           "o_proj": "wo", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2", **{n: n for n in _IN_OUT}}
ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
_OWNERS = ("Attention", "MLP", "MoE")  # module classes whose weight attributes may be adapted


def _delta(a: jax.Array, b: jax.Array, scale: float, n_in: int) -> jax.Array:
    """``scale * A @ B`` for ``A`` [lead..., in..., R], ``B`` [lead..., R, out...] -> [lead..., in..., out...]."""
    r = a.shape[-1]
    lead = a.shape[: a.ndim - 1 - n_in]
    ins, outs = a.shape[len(lead):-1], b.shape[len(lead) + 1:]
    a2 = a.astype(jnp.float32).reshape(*lead, math.prod(ins), r)  # [lead, I, R]
    b2 = b.astype(jnp.float32).reshape(*lead, r, math.prod(outs))  # [lead, R, O]
    return (scale * jnp.matmul(a2, b2)).reshape(*lead, *ins, *outs)  # [lead, in..., out...]


def _merged(w: jax.Array, a: jax.Array, b: jax.Array, scale: float, n_in: int) -> jax.Array:
    # float32 sum: a bfloat16 base would round away most of a small low-rank update.
    return (w.astype(jnp.float32) + _delta(a, b, scale, n_in)).astype(w.dtype)


@functools.partial(jax.jit, static_argnums=(1,))
def _merge_all(arrays: list[tuple[jax.Array, jax.Array, jax.Array]], statics: tuple[tuple[float, int], ...]):
    """Every merged weight in one compiled program (sharded weights stay sharded)."""
    return [_merged(w, a, b, scale, n_in) for (w, a, b), (scale, n_in) in zip(arrays, statics, strict=True)]


class LoRAParam(nnx.Param):
    """An adapter matrix: the only trainable parameters of a LoRA model."""


class Frozen(nnx.Variable):
    """A base-model weight that LoRA training leaves untouched (not an ``nnx.Param``, so no gradient / optimizer)."""


class LoRAWeight(nnx.Module):
    """A frozen weight plus a low-rank update; indexing gives the effective weight ``W + scale * A @ B``.

    Attributes:
      base: the frozen ``W`` [lead..., in..., out...].
      a: ``A`` [lead..., in..., R] (random init, PEFT's kaiming-uniform bound ``1/sqrt(fan_in)``).
      b: ``B`` [lead..., R, out...] (zeros).
      scale: ``alpha / rank``.
      n_in: number of input dims of ``W`` (2 for ``wo`` [N, H, D], else 1).
    """

    def __init__(self, base: Frozen, a: LoRAParam, b: LoRAParam, scale: float, n_in: int):
        self.base, self.a, self.b, self.scale, self.n_in = base, a, b, float(scale), int(n_in)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def dtype(self):
        return self.base.dtype

    def low_rank(self) -> tuple[jax.Array, jax.Array, float]:
        """``(A, B, scale)``: the projections (``model.projection.weight_proj``) compute ``x W + scale * (x A) B``
        from them without forming the merged weight."""
        return self.a[...], self.b[...], self.scale

    def delta(self) -> jax.Array:
        """``scale * A @ B`` in float32, shaped like ``W``."""
        return _delta(self.a[...], self.b[...], self.scale, self.n_in)

    def merged(self) -> jax.Array:
        """The effective weight in the base dtype."""
        return _merged(self.base[...], self.a[...], self.b[...], self.scale, self.n_in)

    def __getitem__(self, index: Any) -> jax.Array:
        return self.merged()[index]


class MultiLoRAWeight(nnx.Module):
    """A base weight with several LoRA adapters side by side, for serving them in one batch (multi-LoRA).

    Indexing gives the base weight; ``model.projection.weight_proj`` adds, under ``adapter_rows(ids)``, each row's
    own update ``scale[i] * (x A[i]) B[i]`` (``i = ids[b]``; adapter 0 is the base: zeros) as two small gathered
    matmuls, never a merged weight per adapter.

    Attributes:
      base: ``W`` [lead..., in..., out...].
      a: ``A`` stacked [lead..., n, in..., R] (ranks padded with zeros to the largest).
      b: ``B`` stacked [lead..., n, R, out...].
      scale: ``alpha / rank`` per adapter, [lead..., n] (float32).
      n_in: number of input dims of ``W``.
    """

    def __init__(self, base: nnx.Variable, a: np.ndarray, b: np.ndarray, scale: np.ndarray, n_in: int):
        self.base, self.n_in = base, int(n_in)
        self.a, self.b, self.scale = Frozen(jnp.asarray(a)), Frozen(jnp.asarray(b)), Frozen(jnp.asarray(scale))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def dtype(self):
        return self.base.dtype

    def __getitem__(self, index: Any) -> jax.Array:
        return self.base[index]

    def row_delta(self, x: jax.Array, ids: jax.Array) -> jax.Array:
        """Each row's update ``scale[i] x A[i] B[i]`` for ``x`` [B, ..., in...] and adapter ids [B], float32,
        shaped ``[B, ..., out...]`` (one layer's weights: no leading axes)."""
        a, b, scale = self.a[...], self.b[...], self.scale[...]
        n, rank = a.shape[0], a.shape[-1]
        ins, outs = a.shape[1:-1], b.shape[2:]
        i_size = math.prod(ins)
        mid = x.shape[1:x.ndim - self.n_in]  # e.g. T
        x2 = x.reshape(x.shape[0], -1, i_size).astype(jnp.float32)  # [B, M, I]
        a_rows = jnp.take(a.reshape(n, i_size, rank), ids, axis=0).astype(jnp.float32)  # [B, I, R]
        b_rows = jnp.take(b.reshape(n, rank, math.prod(outs)), ids, axis=0).astype(jnp.float32)  # [B, R, O]
        xa = jnp.einsum("BMI,BIR->BMR", x2, a_rows)
        y = jnp.einsum("BMR,BRO->BMO", xa, b_rows) * jnp.take(scale, ids)[:, None, None]
        return y.reshape(x.shape[0], *mid, *outs)


def stack_adapters(base: nnx.Module, adapters: Sequence[nnx.Module]) -> nnx.Module:
    """Serve several LoRA models over one base: every weight that some adapter adapts becomes a
    ``MultiLoRAWeight`` whose adapter ``i + 1`` is ``adapters[i]``'s (adapter 0: none), in place.

    Args:
      base: a plain ``Transformer`` (the adapters' base model).
      adapters: LoRA models (``apply_lora`` wrapped, not merged) of the same architecture, e.g. from
        ``loading.load_lora_adapters``. Ranks and targets may differ. Expert weights (Mixtral's ``w1 w2 w3``)
        are not supported.

    Returns:
      ``base``, with ``n = len(adapters) + 1`` adapters per adapted weight; select them per row with
      ``model.projection.adapter_rows``.
    """
    if is_lora(base):
        raise ValueError("the base of a multi-LoRA model must be plain. Fix: pass the base model, not a LoRA one.")
    owners = {path: node for path, node in nnx.iter_graph(base) if isinstance(node, nnx.Module)}
    found: dict[tuple, dict[str, list]] = {}
    for i, model in enumerate(adapters):
        for path, node in nnx.iter_graph(model):
            if not isinstance(node, nnx.Module) or isinstance(node, LoRAWeight):
                continue
            for name, value in vars(node).items():
                if isinstance(value, LoRAWeight):
                    if type(node).__name__ == "MoE":
                        raise ValueError(f"adapter {i + 1} adapts the experts' {name}, which multi-LoRA serving "
                                         "does not support. Fix: serve it merged (its workdir as --checkpoint).")
                    like = getattr(owners.get(path), name, None)
                    if like is None or tuple(like.shape) != tuple(value.base.shape):
                        raise ValueError(f"adapter {i + 1} adapts {'.'.join(map(str, path))}.{name} of shape "
                                         f"{tuple(value.base.shape)}, which the base model has as "
                                         f"{None if like is None else tuple(like.shape)}. Fix: serve adapters "
                                         "trained on this base model only.")
                    found.setdefault((path, name), {})[i] = value
    if not found:
        raise ValueError("none of the adapters adapts a weight. Fix: pass LoRA models (apply_lora, not merged).")
    n = len(adapters) + 1
    for (path, name), per in found.items():
        node = owners[path]
        var = getattr(node, name)
        n_in, _ = _IN_OUT[name]
        rank = max(w.a.shape[-1] for w in per.values())
        some = next(iter(per.values()))
        lead_n = some.a.ndim - 1 - n_in
        lead, ins, outs = some.a.shape[:lead_n], some.a.shape[lead_n:-1], some.b.shape[lead_n + 1:]
        a = np.zeros((*lead, n, *ins, rank), np.float32)
        b = np.zeros((*lead, n, rank, *outs), np.float32)
        scale = np.zeros((*lead, n), np.float32)
        for i, w in per.items():
            r = w.a.shape[-1]
            a[(*(slice(None),) * lead_n, i + 1, ..., slice(0, r))] = np.asarray(w.a[...], np.float32)
            b[(*(slice(None),) * lead_n, i + 1, slice(0, r))] = np.asarray(w.b[...], np.float32)
            scale[..., i + 1] = w.scale
        setattr(node, name, MultiLoRAWeight(var, a, b, scale, n_in))
    return base


def is_multi_lora(model: nnx.Module) -> bool:
    """Whether ``stack_adapters`` has given ``model`` several adapters."""
    return any(isinstance(node, MultiLoRAWeight) for _, node in nnx.iter_graph(model))


def resolve_targets(targets: Sequence[str] | str) -> tuple[str, ...]:
    """Canonical target names (``wq wk wv wo w1 w2 w3``) from our names, HF PEFT names or ``"all"``."""
    if isinstance(targets, str):
        targets = ALL_TARGETS if targets == "all" else [t.strip() for t in targets.split(",") if t.strip()]
    out = []
    for t in targets:
        if t == "all":
            out += ALL_TARGETS
        elif t in ALIASES:
            out.append(ALIASES[t])
        else:
            raise ValueError(f"unknown LoRA target {t!r}. Fix: use some of {sorted(ALIASES)} or 'all'.")
    if not out:
        raise ValueError("LoRA needs at least one target module. Fix: set config.lora.targets, e.g. 'wq,wk,wv,wo'.")
    return tuple(dict.fromkeys(out))


def _place(x: np.ndarray, like: Any, axes: tuple[str | None, ...]) -> jax.Array:
    """Put a new adapter on the mesh of its base weight, sharded by its logical axes."""
    sh = getattr(like, "sharding", None)
    if isinstance(sh, NamedSharding):
        rules = sharding.current()[1] if sharding.current() else sharding.DEFAULT_RULES
        return jax.device_put(x, NamedSharding(sh.mesh, rules.spec(axes, sh.mesh)))
    if isinstance(like, jax.core.Tracer):  # under nnx.eval_shape / jit
        return jnp.asarray(x)
    return jax.device_put(x, sh) if sh is not None else jnp.asarray(x)


def _is_quantized(value: Any) -> bool:
    """A quantized weight (``quant.Int8Weight``: indexing dequantizes, ``to_param`` gives the float Param)."""
    return isinstance(value, nnx.Module) and callable(getattr(value, "to_param", None))


def _weight_owners(model: nnx.Module) -> list[tuple[nnx.Module, str, Any]]:
    found = []
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and not isinstance(node, LoRAWeight) and not _is_quantized(node):
            for name, value in list(vars(node).items()):
                if isinstance(value, nnx.Variable) or _is_quantized(value):
                    found.append((node, name, value))
    return found


def is_lora(model: nnx.Module) -> bool:
    """Whether ``apply_lora`` has wrapped ``model``."""
    return any(isinstance(node, LoRAWeight) for _, node in nnx.iter_graph(model))


def apply_lora(model: nnx.Module, rank: int, alpha: float, targets: Sequence[str] | str = ALL_TARGETS, *,
               seed: int = 0) -> nnx.Module:
    """Wrap ``model``'s target weights with LoRA adapters and freeze everything else (in place).

    Args:
      model: a ``Transformer`` (parameters may be sharded: adapters follow their base weight's mesh).
      rank: adapter rank R (> 0).
      alpha: scale numerator; the update is ``(alpha / rank) * A @ B``.
      targets: weights to adapt (see module docstring), a comma-separated string, or ``"all"``.
      seed: init seed of the ``A`` matrices.

    Returns:
      ``model`` itself. ``nnx.state(model, nnx.Param)`` now holds only the adapters.
    """
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank={rank!r} must be a positive integer. Fix: set config.lora.rank, e.g. 16.")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha={alpha!r} must be > 0. Fix: set config.lora.alpha, e.g. 2 * rank.")
    if is_lora(model):
        raise ValueError("model already has LoRA adapters. Fix: call merge_lora(model) first, or apply LoRA once.")
    names = resolve_targets(targets)
    rng = np.random.default_rng(seed)  # host-side init: adapters are small, and eager jax.random compiles per shape
    wrapped = 0
    for owner, name, var in _weight_owners(model):
        quantized = _is_quantized(var)  # QLoRA: an int8 base (quant.Int8Weight) stays as it is, frozen
        if not isinstance(var, nnx.Param) and not quantized:
            continue
        md = var.get_metadata()
        frozen = var if quantized else Frozen(var[...], **md)
        if type(owner).__name__ not in _OWNERS or name not in names:
            setattr(owner, name, frozen)
            continue
        n_in, n_out = _IN_OUT[name]
        shape, axes = var.shape, tuple(md.get("logical_axes") or (None,) * var.ndim)
        n_lead = len(shape) - n_in - n_out
        lead, ins, outs = shape[:n_lead], shape[n_lead:n_lead + n_in], shape[n_lead + n_in:]
        a_axes = (*axes[: n_lead + n_in], None)
        b_axes = (*axes[:n_lead], None, *axes[n_lead + n_in:])
        bound = 1.0 / math.sqrt(math.prod(ins))  # PEFT: kaiming_uniform(a=sqrt(5)) on A
        a = rng.uniform(-bound, bound, (*lead, *ins, rank)).astype(np.float32)
        b = np.zeros((*lead, rank, *outs), np.float32)
        like = var.q[...] if quantized else var[...]  # the placement of the adapters: the base's
        adapter = LoRAWeight(frozen, LoRAParam(_place(a, like, a_axes), logical_axes=a_axes),
                             LoRAParam(_place(b, like, b_axes), logical_axes=b_axes), alpha / rank, n_in)
        setattr(owner, name, adapter)
        wrapped += 1
    if not wrapped:
        raise ValueError(f"no weight of the model matched LoRA targets {names}. Fix: pick targets the model has "
                         f"({ALL_TARGETS}).")
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its weight (``W + scale * A @ B``; an int8 base of QLoRA dequantized first) and
    unfreeze: a plain model again (in place).

    Returns:
      ``model``, now with only ``nnx.Param`` weights (the same tree as before ``apply_lora``), ready for export.
    """
    found = []
    for _, node in list(nnx.iter_graph(model)):
        if not isinstance(node, nnx.Module) or isinstance(node, LoRAWeight):
            continue
        for name, value in list(vars(node).items()):
            if isinstance(value, LoRAWeight):
                found.append((node, name, value))
            elif isinstance(value, Frozen):
                setattr(node, name, nnx.Param(value[...], **value.get_metadata()))
            elif _is_quantized(value):  # QLoRA's int8 base: dequantized
                setattr(node, name, value.to_param())
    merged = _merge_all([(w.base[...], w.a[...], w.b[...]) for _, _, w in found],
                        tuple((w.scale, w.n_in) for _, _, w in found))
    for (node, name, w), value in zip(found, merged, strict=True):
        setattr(node, name, nnx.Param(value, **w.base.get_metadata()))
    return model


def adapter_state(model: nnx.Module) -> nnx.State:
    """The adapters (``LoRAParam``) of a LoRA model: what training updates and a LoRA checkpoint stores."""
    return nnx.state(model, LoRAParam)


def count_adapter_params(model: nnx.Module) -> int:
    """Number of adapter parameters."""
    return sum(x.size for x in jax.tree.leaves(adapter_state(model)))
