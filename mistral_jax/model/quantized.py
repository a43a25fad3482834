"""Quantized training matmuls through qwix (``ModelConfig.matmul_quant``: ``int8`` or ``fp8``).

Every weight matmul of the decoder layers (the attention and MLP projections, and the experts' grouped matmuls)
multiplies quantized operands: the activation per row and the weight per output channel, scaled by their absolute
maxima, and in the backward pass the incoming gradient too. The master weights, the optimizer state, the
embedding, the router and the LM head stay in full precision; attention's scores and values are not quantized.

The numerics are qwix's quantized-training core (``dot_general_qt`` / ``ragged_dot_qt``, the functions its
``QtProvider`` calls), configured from one ``qwix.QtRule`` per mode, as MaxText's ``quantization=int8`` /
``fp8_full`` rules do: qwix intercepts calls inside Flax modules by module path, while here the projection and the
expert MLP call it directly, so the scan over layers, remat and the sharded programs stay the model's own.

  * ``int8``: operands and gradients in int8, int32 accumulation (the TPU MXU's and tensor cores' int8 rate);
  * ``fp8``: operands in float8_e4m3fn, gradients in float8_e5m2 (H100 / H200; emulated on CPU).

XLA compiles both for every TPU generation the AOT tool knows (v4, v5e, v5p, v6e: the dots take ``s8`` /
``f8e4m3fn`` operands) and for CPU; the MoE's dense oracle (``moe_impl="dense"``) is not quantized, so the config
refuses that combination.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import qwix
from jaxtyping import Array, Float, Int
from qwix._src.core import dot_general_qt, ragged_dot_qt

# mode -> (forward operands' type, backward gradients' type)
MODES = {"int8": (jnp.int8, jnp.int8), "fp8": (jnp.float8_e4m3fn, jnp.float8_e5m2)}


def rule(mode: str) -> qwix.QtRule:
    """The qwix quantized-training rule of ``mode``: weights, activations and gradients quantized."""
    fwd, bwd = MODES[mode]
    return qwix.QtRule(module_path=".*", weight_qtype=fwd, act_qtype=fwd, bwd_qtype=bwd,
                       act_calibration_method="absmax")


@functools.cache
def dot_config(mode: str) -> dot_general_qt.DotGeneralQtConfig:
    """``rule(mode)`` as qwix's ``dot_general_qt`` config for ``activation x weight`` (what its ``QtProvider``
    builds for a dot with the weight on the right)."""
    r = rule(mode)
    return dot_general_qt.DotGeneralQtConfig(
        lhs_qtype=r.act_qtype, rhs_qtype=r.weight_qtype,
        lhs_calibration_method=r.act_calibration_method, rhs_calibration_method=r.weight_calibration_method,
        dlhs_grad_qtype=r.bwd_qtype, dlhs_grad_calibration_method=r.bwd_calibration_method,
        drhs_grad_qtype=r.bwd_qtype, drhs_grad_calibration_method=r.bwd_calibration_method,
        use_original_residuals=False)


@functools.cache
def ragged_config(mode: str) -> ragged_dot_qt.RaggedDotQtConfig:
    """``rule(mode)`` as qwix's ``ragged_dot_qt`` config (activations x the experts' stacked weights)."""
    r = rule(mode)
    return ragged_dot_qt.RaggedDotQtConfig(lhs_qtype=r.act_qtype, rhs_qtype=r.weight_qtype,
                                           dlhs_grad_qtype=r.bwd_qtype, drhs_grad_qtype=r.bwd_qtype)


def matmul(x: Float[Array, "M C"], w: Float[Array, "C F"], mode: str) -> Float[Array, "M F"]:
    """``x @ w`` with quantized operands (and gradients) in ``mode``; the result in ``x``'s dtype."""
    return dot_general_qt.dot_general_qt(x, w, (((1,), (0,)), ((), ())), dot_config(mode)).astype(x.dtype)


def grouped_matmul(x: Float[Array, "A K"], w: Float[Array, "E K N"], group_sizes: Int[Array, " E"], mode: str
                   ) -> Float[Array, "A N"]:
    """``jax.lax.ragged_dot(x, w, group_sizes)`` with quantized operands (and gradients) in ``mode``."""
    return ragged_dot_qt.ragged_dot_qt(x, w, group_sizes, ragged_config(mode)).astype(x.dtype)

