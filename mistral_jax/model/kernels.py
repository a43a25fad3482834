"""Accelerator kernels, registered as backends (``backends.py``): cuDNN attention (GPU), Pallas splash attention
(TPU), the grouped matmuls of the dropless MoE (``ragged_dot`` on GPU, megablox's on TPU) and XLA's ragged
all-to-all. The math they compute is in ``attention.py`` and ``moe.py``; here are only the platform forms.

Legend: B batch, T sequence, N query heads, K kv heads, G = N // K, H head_dim, A rows (routed assignments,
sorted by group), D input dim, F output dim, E groups (experts).

Registration order is preference order: ``attention.py`` imports this module before registering its pure-JAX
backends, so ``auto`` tries cuDNN and splash first where the platform has them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from mistral_jax.model import backends
from mistral_jax.model.moe import swiglu_experts

SPLASH_BLOCK = 128  # splash's default query / key block: sequences of other lengths use the XLA backends


# ---------------------------------------------------------------------------------------------------- attention
@backends.register_attention("cudnn", platforms=("gpu",), supports=lambda call: not call.has_segments
                             and call.dtype in ("bfloat16", "float16"))
def cudnn_attention(q, k, v, positions, segment_ids, *, window, block=None, backends=None):
    """GPU: cuDNN fused attention with a local window (segment ids must be absent; causal on index)."""
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local, implementation="cudnn")


def _splash_local(q, k, v, segment_ids, window):  # pragma: no cover - needs a TPU
    """Splash attention on one device's shard: q [B, T, N, H], k/v [B, T, K, H]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    mask = sm.CausalMask((t, t)) if window is None else sm.LocalMask((t, t), (window - 1, 0), offset=0)
    kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([mask] * (n // kv_heads)))
    seg = None if segment_ids is None else sk.SegmentIds(q=segment_ids, kv=segment_ids)
    qg = (q * h**-0.5).reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
    run = jax.vmap(jax.vmap(kernel, in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, 0 if seg is not None else None))
    out = run(qg, kt, vt, seg)  # [B, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


@backends.register_attention("splash", platforms=("tpu",), supports=lambda call: call.seq_len % SPLASH_BLOCK == 0)
def splash_attention(q, k, v, positions, segment_ids, *, window, block=None, backends=None):
    """TPU: Pallas splash attention with a causal (and local) mask.

    Mosaic kernels are not partitioned by XLA, so on a mesh (``backends.mesh``, passed to the model explicitly)
    the kernel runs in a ``shard_map`` over the batch and head axes the rules give (contiguous head shards keep
    whole GQA groups together).
    """
    if backends is None or backends.mesh is None:
        return _splash_local(q, k, v, segment_ids, window)
    mesh, (q_spec, kv_spec, seg_spec) = backends.mesh, backends.attention_specs
    if segment_ids is None:
        local = lambda q, k, v: _splash_local(q, k, v, None, window)
        return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                             check_vma=False)(q, k, v)
    local = lambda q, k, v, s: _splash_local(q, k, v, s, window)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, segment_ids)


# ---------------------------------------------------------------------------------------------------- grouped matmul
@jax.custom_vjp
def tpu_grouped_matmul(x: Float[Array, "A D"], w: Float[Array, "E D F"], group_sizes: Int[Array, " E"]
                       ) -> Float[Array, "A F"]:
    """``jax.lax.ragged_dot``, with the input gradient taken against an explicit ``w^T``: ragged_dot's own rule
    contracts w's minor dimension, which libtpu 0.0.52 tiles past scoped VMEM on v6e for Mixtral's w2
    (``CompileTimeScopedVmemOom`` when F = 14336, D = 4096; libtpu 0.0.42.1 compiles both forms). The weight
    gradient is ragged_dot's own."""
    return jax.lax.ragged_dot(x, w, group_sizes)


def _tpu_fwd(x, w, group_sizes):
    return jax.lax.ragged_dot(x, w, group_sizes), (x, w, group_sizes)


def _tpu_bwd(res, dy):
    x, w, group_sizes = res
    dx = jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), group_sizes).astype(x.dtype)
    _, vjp_w = jax.vjp(lambda w_: jax.lax.ragged_dot(x, w_, group_sizes), w)
    (dw,) = vjp_w(dy)
    return dx, dw.astype(w.dtype), None


tpu_grouped_matmul.defvjp(_tpu_fwd, _tpu_bwd)

backends.register_expert_mlp("megablox", functools.partial(swiglu_experts, gmm=tpu_grouped_matmul),
                             platforms=("tpu",))
backends.register_expert_mlp("ragged_dot", functools.partial(swiglu_experts, gmm=jax.lax.ragged_dot),
                             platforms=("gpu",))
backends.register_exchange("ragged_all_to_all", jax.lax.ragged_all_to_all, platforms=("gpu", "tpu"))
