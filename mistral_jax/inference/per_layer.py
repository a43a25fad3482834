"""Per-layer serving weights: the model's forward pass with every layer's weights as a separate array.

The Transformer stacks its layer weights (``[L, ...]``) and scans one compiled layer over them. A scanned (or
indexed) layer reads its weights through a slice of the stacked arrays: on TPU/GPU the slice fuses into the
matmul, while XLA's CPU backend copies it, on every call, which costs more than the matmuls in small-batch
decoding. So for CPU inference we copy the layers out once (``unstack_layers``) and run the forward pass
unrolled over those copies (``serving_forward``): the model's own steps (``embed_tokens``, its
``DecoderLayer``, ``output``), the same numbers, faster decoding on CPU (see
docs/benchmarks.md#per-layer-weight-copies-for-cpu-decoding).

Legend: B batch, T tokens, V vocab, L layers.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Int

from mistral_jax.model.kv_cache import KVCache
from mistral_jax.model.transformer import ModelOutput, Transformer


def unstack_layers(model: Transformer, state: nnx.State | None = None) -> tuple[nnx.State, ...]:
    """The stacked layer weights as ``n_layers`` separate per-layer states (copies).

    ``state``: the model's state to copy from (default ``nnx.state(model)``; pass a resharded one to keep its
    shardings).
    """
    layers = (nnx.state(model) if state is None else state)["layers"]
    return tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(model.cfg.n_layers))


def serving_layers(model: Transformer, unstack: bool | None = None, state: nnx.State | None = None
                   ) -> tuple[nnx.State, ...] | None:
    """Per-layer weight copies for ``serving_forward``, or None (run the stacked weights).

    ``unstack=None`` decides from the model's target platform: on CPU, when the layer weights take at most a
    quarter of the machine's memory (the copy lives as long as the caller keeps it). ``state``: the (possibly
    resharded) state to copy from.
    """
    if state is None:
        state = nnx.state(model)
    if unstack is None:
        layer_bytes = sum(x.nbytes for x in jax.tree.leaves(state["layers"]))
        unstack = model.cfg.platform == "cpu" and layer_bytes <= _physical_memory() // 4
    return unstack_layers(model, state) if unstack else None


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume it does not fit
        return 0


def serving_forward(model: Transformer, layers: tuple[nnx.State, ...] | None, tokens: Int[Array, "B T"],
                    positions: Int[Array, "B T"], *, cache: KVCache | None = None, logits_to_keep: int = 0
                    ) -> ModelOutput:
    """``model.forward(tokens, positions, cache=cache, logits_to_keep=...)`` with the layers run from ``layers``
    (``serving_layers``: one state per layer) in an unrolled loop; ``layers=None``: ``model.forward`` itself."""
    if layers is None:
        return model.forward(tokens, positions, cache=cache, logits_to_keep=logits_to_keep)
    cfg = model.cfg
    if len(layers) != cfg.n_layers:
        raise ValueError(f"per-layer weights hold {len(layers)} layers but the model has {cfg.n_layers}. "
                         "Fix: pass serving_layers(model) of this model.")
    positions = model.default_positions(tokens, positions, cache)
    graphdef = nnx.graphdef(model.layers)  # the stacked layer's graph; merged with one layer's weights below
    views = None if cache is None else cache.layers()
    x, outs = model.embed_tokens(tokens), []
    for i, layer_state in enumerate(layers):
        view = None if views is None else jax.tree.map(lambda a, i=i: a[i], views)
        x, stats, view = nnx.merge(graphdef, layer_state)(x, positions, None, view)
        outs.append((stats, view))
    stats, new_views = jax.tree.map(lambda *a: jnp.stack(a), *outs)  # [L, ...]
    return model.output(x, stats, cache, new_views, logits_to_keep)
