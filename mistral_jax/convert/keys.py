"""The one declarative key table: model parameter path <-> HF name <-> Mistral consolidated name.

Every checkpoint tensor is one *slice* of a model parameter: the model stacks layers (leading ``L`` axis)
and experts (``L, E``), the files store one tensor per layer (and per expert). A row of ``KEYS`` says which
parameter, how many leading axes the slice index takes (``scope``), the file names (``{layer}`` and
``{expert}`` are filled in) and a *named* transform from the model slice layout to the file layout.

Legend: D model dim, N query heads, K kv heads, H head_dim, F MLP hidden dim, V vocab, E experts.

Transforms (model slice -> file tensor; each has an exact inverse, so round trips are bit-identical):
  * ``identity``: norms and the embedding.
  * ``transpose``: ``[D, F] -> [F, D]`` (torch Linear weights are ``[out, in]``); lm_head, MLP, router.
  * ``q_proj`` / ``kv_proj``: ``[D, N, H] -> [N*H, D]`` (HF half-split RoPE layout, our layout).
  * ``o_proj``: ``[N, H, D] -> [D, N*H]``.
  * ``q_interleaved`` / ``kv_interleaved``: ``q_proj`` / ``kv_proj`` followed by the inverse of the
    ``permute`` of HF's ``convert_mistral_weights_to_hf.py``: Mistral's consolidated weights put the two
    halves of every rotary pair next to each other (``x[2i], x[2i+1]``, complex RoPE of mistral-inference)
    where HF puts them ``H/2`` apart (``rotate_half``).

Mistral consolidated names follow mistral-inference (``mistral_inference/transformer.py``): dense layers
``layers.N.feed_forward.w1.weight``; MoE layers are a ``MoeLayer(experts=[FeedForward...], gate=Linear)``
module at ``feed_forward``, hence ``layers.N.feed_forward.gate.weight`` ``[E, D]`` and
``layers.N.feed_forward.experts.E.w1.weight`` ``[F, D]``.
HF names are the *on-disk* names transformers writes and loads (Mixtral: ``block_sparse_moe.*``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

from mistral_jax.config import ModelConfig

Format = Literal["hf", "mistral"]
Scope = Literal["global", "layer", "expert"]
When = Literal["always", "dense", "moe", "untied"]


@dataclasses.dataclass(frozen=True)
class Key:
    """One row of the table: a model parameter and its names / transforms in each file format."""

    path: tuple[str, ...]  # path in params_dict(model)
    scope: Scope  # "global": the whole array; "layer": [L, ...] sliced per layer; "expert": [L, E, ...]
    hf: str  # HF on-disk tensor name
    hf_transform: str  # name in TRANSFORMS (model slice -> HF tensor)
    mistral: str  # Mistral consolidated tensor name
    mistral_transform: str  # name in TRANSFORMS (model slice -> Mistral tensor)
    when: When = "always"  # which configs have this parameter

    def name(self, fmt: Format, layer: int | None = None, expert: int | None = None) -> str:
        return getattr(self, fmt).format(layer=layer, expert=expert)

    def transform(self, fmt: Format) -> str:
        return getattr(self, f"{fmt}_transform")

    def applies(self, cfg: ModelConfig) -> bool:
        return {"always": True, "dense": not cfg.is_moe, "moe": cfg.is_moe, "untied": not cfg.tie_embeddings}[
            self.when]


_L, _E = "model.layers.{layer}.", "layers.{layer}."
KEYS: tuple[Key, ...] = (
    Key(("embed",), "global", "model.embed_tokens.weight", "identity", "tok_embeddings.weight", "identity"),
    Key(("layers", "attention_norm", "weight"), "layer", _L + "input_layernorm.weight", "identity",
        _E + "attention_norm.weight", "identity"),
    Key(("layers", "attention", "wq"), "layer", _L + "self_attn.q_proj.weight", "q_proj",
        _E + "attention.wq.weight", "q_interleaved"),
    Key(("layers", "attention", "wk"), "layer", _L + "self_attn.k_proj.weight", "kv_proj",
        _E + "attention.wk.weight", "kv_interleaved"),
    Key(("layers", "attention", "wv"), "layer", _L + "self_attn.v_proj.weight", "kv_proj",
        _E + "attention.wv.weight", "kv_proj"),
    Key(("layers", "attention", "wo"), "layer", _L + "self_attn.o_proj.weight", "o_proj",
        _E + "attention.wo.weight", "o_proj"),
    Key(("layers", "ffn_norm", "weight"), "layer", _L + "post_attention_layernorm.weight", "identity",
        _E + "ffn_norm.weight", "identity"),
    # dense SwiGLU
    Key(("layers", "feed_forward", "w1"), "layer", _L + "mlp.gate_proj.weight", "transpose",
        _E + "feed_forward.w1.weight", "transpose", "dense"),
    Key(("layers", "feed_forward", "w2"), "layer", _L + "mlp.down_proj.weight", "transpose",
        _E + "feed_forward.w2.weight", "transpose", "dense"),
    Key(("layers", "feed_forward", "w3"), "layer", _L + "mlp.up_proj.weight", "transpose",
        _E + "feed_forward.w3.weight", "transpose", "dense"),
    # mixture of experts
    Key(("layers", "feed_forward", "gate"), "layer", _L + "block_sparse_moe.gate.weight", "transpose",
        _E + "feed_forward.gate.weight", "transpose", "moe"),
    Key(("layers", "feed_forward", "w1"), "expert", _L + "block_sparse_moe.experts.{expert}.w1.weight",
        "transpose", _E + "feed_forward.experts.{expert}.w1.weight", "transpose", "moe"),
    Key(("layers", "feed_forward", "w2"), "expert", _L + "block_sparse_moe.experts.{expert}.w2.weight",
        "transpose", _E + "feed_forward.experts.{expert}.w2.weight", "transpose", "moe"),
    Key(("layers", "feed_forward", "w3"), "expert", _L + "block_sparse_moe.experts.{expert}.w3.weight",
        "transpose", _E + "feed_forward.experts.{expert}.w3.weight", "transpose", "moe"),
    Key(("norm", "weight"), "global", "model.norm.weight", "identity", "norm.weight", "identity"),
    Key(("lm_head",), "global", "lm_head.weight", "transpose", "output.weight", "transpose", "untied"),
)

# Tensors that files may carry but the model does not use (ignored instead of reported as unexpected).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------- transforms
def _interleave(w, heads: int):
    """HF half-split rows -> Mistral interleaved rows: the inverse of HF's ``permute`` (``[heads*H, D]``)."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)  # [heads*H, D]


def _deinterleave(w, heads: int):
    """Mistral interleaved rows -> HF half-split rows: HF's ``permute`` (``w.view(n, H/2, 2, D).transpose(1, 2)``)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)  # [heads*H, D]


@dataclasses.dataclass(frozen=True)
class Transform:
    """``forward``: model slice -> file tensor; ``inverse``: file tensor -> model slice. Work on numpy or jnp."""

    forward: Callable[[Any, ModelConfig], Any]
    inverse: Callable[[Any, ModelConfig], Any]


def _heads_proj(heads: Callable[[ModelConfig], int], interleave: bool) -> Transform:
    def fwd(x, c):  # [D, heads, H] -> [heads*H, D]
        w = x.reshape(c.dim, heads(c) * c.head_dim).T
        return _interleave(w, heads(c)) if interleave else w

    def inv(w, c):  # [heads*H, D] -> [D, heads, H]
        w = _deinterleave(w, heads(c)) if interleave else w
        return w.T.reshape(c.dim, heads(c), c.head_dim)

    return Transform(fwd, inv)


def _n(c: ModelConfig) -> int:
    return c.n_heads


def _k(c: ModelConfig) -> int:
    return c.n_kv_heads


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(lambda x, c: x, lambda x, c: x),
    "transpose": Transform(lambda x, c: x.T, lambda x, c: x.T),
    "q_proj": _heads_proj(_n, interleave=False),
    "kv_proj": _heads_proj(_k, interleave=False),
    "q_interleaved": _heads_proj(_n, interleave=True),
    "kv_interleaved": _heads_proj(_k, interleave=True),
    "o_proj": Transform(lambda x, c: x.reshape(c.n_heads * c.head_dim, c.dim).T,  # [N, H, D] -> [D, N*H]
                        lambda x, c: x.T.reshape(c.n_heads, c.head_dim, c.dim)),  # [D, N*H] -> [N, H, D]
}


# ----------------------------------------------------------------------------- entries
@dataclasses.dataclass(frozen=True)
class Entry:
    """One file tensor: which key, which slice of the model parameter, and its shapes."""

    key: Key
    index: tuple[int, ...]  # () global, (layer,), (layer, expert)
    model_shape: tuple[int, ...]  # shape of the model slice
    param_shape: tuple[int, ...]  # shape of the whole model parameter

    @property
    def layer(self) -> int | None:
        return self.index[0] if self.index else None

    @property
    def expert(self) -> int | None:
        return self.index[1] if len(self.index) > 1 else None

    def name(self, fmt: Format) -> str:
        return self.key.name(fmt, self.layer, self.expert)

    def to_file(self, fmt: Format, x, cfg: ModelConfig):
        return TRANSFORMS[self.key.transform(fmt)].forward(x, cfg)

    def from_file(self, fmt: Format, x, cfg: ModelConfig):
        return TRANSFORMS[self.key.transform(fmt)].inverse(x, cfg)

    def file_shape(self, fmt: Format, cfg: ModelConfig) -> tuple[int, ...]:
        return tuple(_shape_after(TRANSFORMS[self.key.transform(fmt)].forward, self.model_shape, cfg))


class _ShapeOnly:
    """A stand-in array that tracks shapes through ``reshape`` / ``.T`` / ``swapaxes`` (no memory)."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def reshape(self, *shape):
        return _ShapeOnly(shape)

    @property
    def T(self):  # noqa: N802 - mirrors ndarray.T
        return _ShapeOnly(self.shape[::-1])

    def swapaxes(self, a, b):
        s = list(self.shape)
        s[a], s[b] = s[b], s[a]
        return _ShapeOnly(s)


def _shape_after(fn, shape, cfg) -> tuple[int, ...]:
    return fn(_ShapeOnly(shape), cfg).shape


def param_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shape of every model parameter (the ``params_dict`` layout), from ``nnx.eval_shape``."""
    from flax import nnx

    from mistral_jax.model.transformer import _abstract_state

    return {tuple(map(str, k)): tuple(v.shape) for k, v in nnx.to_flat_state(_abstract_state(cfg))}


def entries(cfg: ModelConfig, order: Format = "hf") -> list[Entry]:
    """Every file tensor of ``cfg``, in file order (``hf``: layer by layer; ``mistral``: the same)."""
    shapes = param_shapes(cfg)
    keys = [k for k in KEYS if k.applies(cfg)]
    missing = sorted(set(shapes) - {k.path for k in keys})
    if missing:  # the model grew a parameter the table does not know: a bug here, not a user error
        raise RuntimeError(f"convert/keys.py has no row for model parameter(s) {missing}. "
                           "Fix: add them to KEYS with their HF and Mistral names.")
    out: list[Entry] = []

    def emit(k: Key, index: tuple[int, ...]):
        full = shapes[k.path]
        out.append(Entry(k, index, full[len(index):], full))

    globals_first = [k for k in keys if k.scope == "global" and k.path == ("embed",)]
    globals_last = [k for k in keys if k.scope == "global" and k.path != ("embed",)]
    for k in globals_first:
        emit(k, ())
    for layer in range(cfg.n_layers):
        for k in keys:
            if k.scope == "layer":
                emit(k, (layer,))
            elif k.scope == "expert":
                for e in range(cfg.num_experts):
                    emit(k, (layer, e))
    for k in globals_last:
        emit(k, ())
    return out
