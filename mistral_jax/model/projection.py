"""``proj``: a projection written as an einsum, computed as one 2-D matmul.

Every weight multiply of the model is a projection: the input's leading axes are kept, its trailing axes are
contracted with the weight's leading axes, and the weight's trailing axes are produced, e.g.
``proj("BTD,DNH->BTNH", x, wq)`` (the query heads) or ``proj("BTNH,NHD->BTD", o, wo)`` (the output).
The call site keeps the head structure; inside, ``x`` becomes ``[M, C]`` and ``w`` ``[C, F]`` (reshapes of
contiguous axes, free) for one ``jnp.matmul``.

Why not ``jnp.einsum``: same numbers, but on XLA's CPU backend an einsum over split head axes transposes the
weight on every call, and in the backward pass contracting two token axes (B, T) made it write the activation
gradient transposed, element by element, while the 2-D form is a plain matmul (timings: see
docs/benchmarks.md#projections-as-one-2-d-matmul).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Int

# Per-row adapter ids [B] for weights holding several LoRA adapters (``lora.MultiLoRAWeight``); None outside a
# multi-adapter serving forward. Set at trace time by the decoding core (``adapter_rows``).
_ADAPTER_ROWS: contextvars.ContextVar[Any] = contextvars.ContextVar("adapter_rows", default=None)


@contextlib.contextmanager
def adapter_rows(ids: Int[Array, " B"] | None) -> Iterator[None]:
    """Within this context, ``weight_proj`` adds each row's own adapter (``ids[b]``; 0 = none) where a weight
    holds several (the server's multi-LoRA batches)."""
    token = _ADAPTER_ROWS.set(ids)
    try:
        yield
    finally:
        _ADAPTER_ROWS.reset(token)


def weight_value(var: Any, dtype: Any) -> Array:
    """``var[...]`` in ``dtype``; a quantized weight (``quant.Int8Weight``) dequantizes straight into ``dtype``, so
    a bfloat16 model reading an int4 base makes no float32 copy of the weight."""
    dequantize = getattr(var, "dequantize", None)
    return dequantize(dtype) if dequantize is not None else var[...].astype(dtype)


def weight_proj(spec: str, x: Array, var: Any, dtype: Any, quant: str = "none") -> Array:
    """``proj(spec, x, var[...].astype(dtype), quant=quant)`` for a weight variable; a weight with per-row adapters
    (``row_delta``, ``lora.MultiLoRAWeight``) adds ``x A[ids] B[ids]`` for the rows' adapters (``adapter_rows``).

    A LoRA weight (``lora.LoRAWeight``: ``low_rank`` factors) is not merged: ``x W + scale * (x A) B`` (PEFT's form),
    so the frozen ``W`` gets no gradient: the backward pass skips the weight-gradient matmul of a merged weight
    (a third of the projection's FLOPs) and its full-size float32 buffer."""
    low_rank = getattr(var, "low_rank", None)
    if low_rank is not None:
        a, b, scale = low_rank()
        y = proj(spec, x, weight_value(var.base, dtype), quant=quant)
        return y + (lora_proj(spec, x, a.astype(dtype), b.astype(dtype)) * scale).astype(y.dtype)
    y = proj(spec, x, weight_value(var, dtype), quant=quant)
    ids = _ADAPTER_ROWS.get()
    row_delta = getattr(var, "row_delta", None)
    if ids is not None and row_delta is not None:
        y = y + row_delta(x, ids).astype(y.dtype)
    return y


def lora_proj(spec: str, x: Array, a: Array, b: Array) -> Array:
    """``(x A) B`` for the projection ``spec`` of a weight ``W`` [in..., out...] with ``A`` [in..., R] and ``B``
    [R, out...]: two projections through rank R, e.g. ``"BTD,DNH->BTNH"`` as ``BTD,DR->BTR`` then ``BTR,RNH->BTNH``."""
    kept, n = _plan(spec)
    inputs, out = spec.replace(" ", "").split("->")
    xs, ws = inputs.split(",")
    r = next(c for c in "RZYXWVUQPOJIGCA" if c not in spec)
    lead, contracted, produced = xs[:kept], ws[:n], ws[n:]
    h = proj(f"{xs},{contracted}{r}->{lead}{r}", x, a)
    return proj(f"{lead}{r},{r}{produced}->{out}", h, b)


@functools.cache
def _plan(spec: str) -> tuple[int, int]:
    """``(x axes kept, axes contracted)`` of a projection spec; raises for anything that is not a projection."""
    try:
        inputs, out = spec.replace(" ", "").split("->")
        xs, ws = inputs.split(",")
    except ValueError:
        raise ValueError(f"proj spec {spec!r} is not of the form 'xs,ws->out'. Fix: e.g. 'BTD,DNH->BTNH'.") from None
    n = sum(c in ws for c in xs)  # contracted axes
    kept = xs[: len(xs) - n]
    if not (0 < n <= len(ws) and xs[len(kept):] == ws[:n] and out == kept + ws[n:]
            and len(set(xs + ws)) == len(xs) + len(ws) - n):
        raise ValueError(f"proj spec {spec!r} is not a projection: the input's trailing axes must be the weight's "
                         "leading axes (contracted, same order) and the output its leading axes followed by the "
                         "weight's trailing axes. Fix: e.g. 'BTD,DNH->BTNH' or 'BTNH,NHD->BTD'; use jnp.einsum "
                         "for other contractions.")
    return len(kept), n


def proj(spec: str, x: Array, w: Array, *, preferred_element_type=None, quant: str = "none") -> Array:
    """``jnp.einsum(spec, x, w)`` for a projection, computed as one ``[M, C] x [C, F]`` matmul (same numbers).

    Args:
      spec: uppercase einsum subscripts from the file's legend, e.g. ``"BTD,DNH->BTNH"``: the input's trailing
        axes are contracted with the weight's leading axes (same order); the output is the input's other axes
        followed by the weight's other axes.
      x: the input, e.g. ``[B, T, D]``.
      w: the weight, e.g. ``[D, N, H]``.
      preferred_element_type: accumulation / output dtype of the matmul (e.g. float32 logits).
      quant: ``ModelConfig.matmul_quant``: "none", or "int8" / "fp8" for qwix's quantized matmul (quantized
        operands and gradients, ``model/quantized.py``; the result in ``x``'s dtype).
    """
    kept, n = _plan(spec)
    lead, contract, produced = x.shape[:kept], x.shape[kept:], w.shape[n:]
    if tuple(w.shape[:n]) != tuple(contract):
        raise ValueError(f"proj {spec!r}: input {tuple(x.shape)} and weight {tuple(w.shape)} disagree on the "
                         f"contracted axes ({tuple(contract)} vs {tuple(w.shape[:n])}).")
    c, f = math.prod(contract), math.prod(produced)
    if quant != "none":
        from mistral_jax.model import quantized  # qwix, imported by the runs that quantize

        if preferred_element_type is not None:
            raise ValueError(f"proj {spec!r}: quant={quant!r} with preferred_element_type={preferred_element_type} is "
                             "not supported (the quantized matmul returns x's dtype). Fix: pass quant='none' for a "
                             "matmul that needs another output dtype (the LM head is never quantized).")
        y = quantized.matmul(x.reshape(-1, c), w.reshape(c, f), quant)
    else:
        y = jnp.matmul(x.reshape(-1, c), w.reshape(c, f), preferred_element_type=preferred_element_type)  # [M, F]
    return y.reshape(*lead, *produced)
