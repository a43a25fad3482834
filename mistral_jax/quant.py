"""int8 weight-only quantization for inference: ``quantize_weights(model)`` stores the projection weights in int8.

Each weight ``W`` [lead..., in..., out...] (``in``: the axes a projection contracts, as LoRA's ``_IN_OUT`` says)
becomes int8 values with one float32 scale per output channel (symmetric absmax over the input axes):
``W ~ q * scale``. The weight is an ``Int8Weight`` module in the place of the ``nnx.Param``; indexing it gives the
dequantized weight, so every reader of the weight (``weight_proj``, the MoE experts, the LM head) computes in the
model's compute dtype from int8 storage: half a bfloat16 model's weight bytes (a quarter of float32's). The token
embedding (a gather), the norms and the MoE router stay as they are.

Used by ``generate``, the server and evals through ``--quantize int8``, and by QLoRA (``config.lora.quantize_base``:
the frozen base of a LoRA run in int8, the adapters in float32; ``lora.apply_lora`` wraps an ``Int8Weight`` like a
float weight, ``lora.merge_lora`` dequantizes). Otherwise a quantized model is for inference: exports and full
training take the float model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mistral_jax.lora import _IN_OUT, LoRAWeight, MultiLoRAWeight

QUANT_MODES = ("int8",)
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "lm_head")
_OWNERS = ("Attention", "MLP", "MoE", "Transformer")


class QuantizedValue(nnx.Variable):
    """int8 values or float32 scales of a quantized weight (not a ``Param``: nothing trains them)."""


class Int8Weight(nnx.Module):
    """A weight stored as int8 values and per-output-channel float32 scales; indexing gives ``q * scale`` (float32).

    Attributes:
      q: int8 [lead..., in..., out...]. scale: float32, ``q``'s shape with the input axes of size 1.
    """

    def __init__(self, q: QuantizedValue, scale: QuantizedValue):
        self.q, self.scale = q, scale

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def dtype(self):
        return jnp.float32

    def __getitem__(self, index: Any) -> jax.Array:
        return (self.q[...].astype(jnp.float32) * self.scale[...])[index]

    def get_metadata(self) -> dict[str, Any]:
        """The weight's metadata (its logical axes), as an ``nnx.Param``'s."""
        return self.q.get_metadata()

    def to_param(self) -> nnx.Param:
        """The dequantized weight as a float32 ``nnx.Param`` (``lora.merge_lora`` makes a plain model with it)."""
        return nnx.Param(self[...], **self.get_metadata())


def quantize_array(w: jax.Array, in_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 of ``w`` with one scale per slice over ``in_axes`` (kept as size 1): ``(q, scale)``."""
    wf = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(wf), axis=in_axes, keepdims=True) / 127.0
    q = jnp.clip(jnp.round(wf / jnp.where(scale == 0, 1.0, scale)), -127, 127).astype(jnp.int8)
    return q, scale


def quantize_weights(model: nnx.Module, mode: str = "int8") -> nnx.Module:
    """Store ``model``'s projection weights (``TARGETS``) as ``Int8Weight`` (in place); returns ``model``.

    Raises ``ValueError`` for an unknown mode, a model that holds LoRA adapters (merge them first) or one already
    quantized.
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization mode {mode!r} is not supported. Fix: use one of {list(QUANT_MODES)}.")
    nodes = [node for _, node in nnx.iter_graph(model)]
    if any(isinstance(n, LoRAWeight | MultiLoRAWeight) for n in nodes):
        raise ValueError("the model holds LoRA adapters. Fix: merge them first (mj.merge_lora(model)), then quantize.")
    if any(isinstance(n, Int8Weight) for n in nodes):
        raise ValueError("the model is already quantized. Fix: quantize the float model once.")
    done = 0
    for node in nodes:
        if not isinstance(node, nnx.Module) or type(node).__name__ not in _OWNERS:
            continue
        for name, var in list(vars(node).items()):
            if name not in TARGETS or not isinstance(var, nnx.Param):
                continue
            n_in, n_out = _IN_OUT.get(name, (1, 1))  # lm_head [D, V]: one of each
            axes = tuple(var.get_metadata().get("logical_axes") or (None,) * var.ndim)
            first_in = var.ndim - n_in - n_out
            in_axes = tuple(range(first_in, first_in + n_in))
            q, scale = quantize_array(var[...], in_axes)
            scale_axes = tuple(None if i in in_axes else a for i, a in enumerate(axes))
            setattr(node, name, Int8Weight(QuantizedValue(q, logical_axes=axes),
                                           QuantizedValue(scale, logical_axes=scale_axes)))
            done += 1
    if not done:
        raise ValueError("no projection weight of the model could be quantized. Fix: pass a mistral_jax Transformer.")
    return model


def is_quantized(model: nnx.Module) -> bool:
    return any(isinstance(node, Int8Weight) for _, node in nnx.iter_graph(model))
