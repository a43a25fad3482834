"""int8 weight-only quantization for inference: ``quantize_weights(model)`` stores the projection weights in int8.

Each weight ``W`` [lead..., in..., out...] (``in``: the axes a projection contracts, as LoRA's ``_IN_OUT`` says)
becomes int8 values with one float32 scale per output channel (symmetric absmax over the input axes):
``W ~ q * scale``. The weight is an ``Int8Weight`` module in the place of the ``nnx.Param``; indexing it gives the
dequantized weight, so every reader of the weight (``weight_proj``, the MoE experts, the LM head) computes in the
model's compute dtype from int8 storage: half a bfloat16 model's weight bytes (a quarter of float32's). The token
embedding (a gather), the norms and the MoE router stay as they are.

``mode="int4"`` (QLoRA's base, ``BASE_QUANT_MODES``) stores 4-bit values (-7..7, two to a byte: packed here into
uint8 along the last input axis, so every platform and Orbax hold half of int8's bytes) with one bfloat16 scale per
block of ``INT4_BLOCK`` = 64 input rows and output channel (group-wise absmax along that axis, as QLoRA's blocks of
64): a quarter of bfloat16's bytes plus the scales (a quarter of a bit per weight, half of float32 scales';
QLoRA's double quantization takes its float32 block scales from 0.5 to 0.127 bits). A bfloat16 scale is within
0.4 % of the absmax / 7 it rounds; the values are rounded against it, so the error stays within half a step of the
stored scale.

Used by ``generate``, the server and evals through ``--quantize int8``, and by QLoRA (``config.lora.quantize_base``:
the frozen base of a LoRA run in int8 or int4, the adapters in float32; ``lora.apply_lora`` wraps an ``Int8Weight``
like a float weight, ``lora.merge_lora`` dequantizes). Otherwise a quantized model is for inference: exports and
full training take the float model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mistral_jax.lora import _IN_OUT, LoRAWeight, MultiLoRAWeight

BASE_QUANT_MODES = ("int8", "int4")  # QLoRA's frozen base (config.lora.quantize_base)
INT4_BLOCK = 64  # input rows per int4 scale (one block when the axis is not a multiple)
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "lm_head")
_OWNERS = ("Attention", "MLP", "MoE", "Transformer")


class QuantizedValue(nnx.Variable):
    """int8 / packed int4 values or the scales of a quantized weight (not a ``Param``: nothing trains them)."""


class Int8Weight(nnx.Module):
    """A weight stored as int8 (or packed int4) values and their scales; indexing gives ``q * scale`` (float32),
    ``dequantize(dtype)`` the same in a compute dtype.

    Attributes:
      q: int8 [lead..., in..., out...]; int4: uint8 of the same shape but ``block_axis`` halved, each byte two values
        (row i and row i + n / 2 of that axis, + 8, row i in the low nibble). scale: float32 (int4: bfloat16), the
        weight's shape with the input axes of size 1 (per output channel), except ``block_axis`` (int4: the last
        input axis, negative: counted from the last axis, as the layer scan slices the stacked leading axis off) of
        size blocks: a scale per block of rows.
    """

    def __init__(self, q: QuantizedValue, scale: QuantizedValue, block_axis: int | None = None):
        self.q, self.scale, self.block_axis = q, scale, block_axis

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape (int4: twice the packed ``q``'s rows along ``block_axis``)."""
        shape = list(self.q.shape)
        if self.block_axis is not None:
            shape[self.block_axis] *= 2
        return tuple(shape)

    @property
    def dtype(self):
        return jnp.float32

    def __getitem__(self, index: Any) -> jax.Array:
        return self.dequantize(jnp.float32)[index]

    def dequantize(self, dtype: Any) -> jax.Array:
        """The weight ``q * scale`` in ``dtype`` (the model's readers ask for their compute dtype).

        int8: computed in float32 (per-channel float32 scales), then cast. int4 (bfloat16 scales): computed in
        ``dtype`` itself when that is bfloat16 or float32, so no float32 copy of a bfloat16 model's weight is made.
        A value (-7..7, 3 bits) times a bfloat16 scale (8 bits) is exact in float32, so one rounding to bfloat16
        gives what the float32 product cast to bfloat16 gives: the same bits either way.
        """
        dtype = jnp.dtype(dtype)
        if self.block_axis is None:
            return (self.q[...].astype(jnp.float32) * self.scale[...]).astype(dtype)
        packed, scale = self.q[...], self.scale[...]
        work = dtype if dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)) else jnp.dtype(jnp.float32)
        a = self.block_axis % packed.ndim
        # Rows [0, n/2) are the low nibbles and [n/2, n) the high ones, so unpacking is a concatenation, and each
        # scale is repeated over its rows rather than the weight reshaped into blocks. Against interleaved rows and
        # a blocked reshape, XLA keeps fewer weight-sized buffers: Mixtral QLoRA's temporaries 4.65 -> 4.41 GiB
        # per chip (scripts/aot_quant_table.py, mixtral_8x7b_qlora4_r16_ep4_lean).
        q = jnp.concatenate([packed & 15, packed >> 4], axis=a).astype(work) - 8
        rows = q.shape[a] // scale.shape[a]
        return (q * jnp.repeat(scale.astype(work), rows, axis=a)).astype(dtype)

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


def quantize_array_int4(w: jax.Array, in_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array, int]:
    """Symmetric int4 (-7..7) of ``w`` with one bfloat16 scale per block of ``INT4_BLOCK`` rows of the last of
    ``in_axes`` and per output channel, packed two values to a byte along that axis (``Int8Weight``'s int4 layout):
    ``(packed uint8, scale, block axis counted from the end)``; ``scale`` has ``w``'s shape with the other input axes
    of size 1 and the block axis of size blocks. The axis must have an even length."""
    wf = w.astype(jnp.float32)
    a, n = in_axes[-1], w.shape[in_axes[-1]]
    if n % 2:
        raise ValueError(f"int4 packs two rows to a byte, but the weight's input axis {a} has {n} rows (shape "
                         f"{w.shape}). Fix: quantize it to int8.")
    block = INT4_BLOCK if n % INT4_BLOCK == 0 else n
    wb = wf.reshape(*w.shape[:a], n // block, block, *w.shape[a + 1:])  # the block axis a, its rows a + 1
    scale = (jnp.max(jnp.abs(wb), axis=(*in_axes[:-1], a + 1), keepdims=True) / 7.0).astype(jnp.bfloat16)
    step = scale.astype(jnp.float32)  # the values are rounded against the stored (bfloat16) scale
    q = jnp.clip(jnp.round(wb / jnp.where(step == 0, 1.0, step)), -7, 7).reshape(w.shape)
    u = (q + 8).astype(jnp.uint8)
    half = n // 2
    packed = jax.lax.slice_in_dim(u, 0, half, axis=a) | (jax.lax.slice_in_dim(u, half, n, axis=a) << 4)
    return packed, jnp.squeeze(scale, a + 1), a - w.ndim


def quantize_weights(model: nnx.Module, mode: str = "int8") -> nnx.Module:
    """Store ``model``'s projection weights (``TARGETS``) as ``Int8Weight`` (in place), in int8 or (``mode="int4"``)
    group-wise int4; returns ``model``.

    Raises ``ValueError`` for an unknown mode, a model that holds LoRA adapters (merge them first) or one already
    quantized.
    """
    if mode not in BASE_QUANT_MODES:
        raise ValueError(f"quantization mode {mode!r} is not supported. Fix: use one of {list(BASE_QUANT_MODES)}.")
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
            block_axis = None
            if mode == "int4":
                q, scale, block_axis = quantize_array_int4(var[...], in_axes)
            else:
                q, scale = quantize_array(var[...], in_axes)
            scale_axes = tuple(None if i in in_axes else a for i, a in enumerate(axes))
            setattr(node, name, Int8Weight(QuantizedValue(q, logical_axes=axes),
                                           QuantizedValue(scale, logical_axes=scale_axes), block_axis))
            done += 1
    if not done:
        raise ValueError("no projection weight of the model could be quantized. Fix: pass a mistral_jax Transformer.")
    return model


def is_quantized(model: nnx.Module) -> bool:
    return any(isinstance(node, Int8Weight) for _, node in nnx.iter_graph(model))
