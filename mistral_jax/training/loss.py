"""Training loss: token cross-entropy (float32) + router_aux_loss_coef * load balancing + router_z_loss_coef * z.

A batch is a dict of ``[B, T]`` arrays: ``tokens`` (int32 inputs), ``targets`` (int32 next tokens),
``weights`` (float32 loss weight per target: 0 for padding and, in SFT, for prompt tokens),
``positions`` (int32, restart per packed document) and ``segment_ids`` (int32, 0 = padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def cross_entropy(logits: Float[Array, "B T V"], targets: Int[Array, "B T"], weights: Float[Array, "B T"]
                  ) -> tuple[Array, Array]:
    """Weighted sum of token cross-entropies and the sum of weights. float32 log-softmax (logits are float32)."""
    logits = logits.astype(jnp.float32)  # float32: logsumexp over 32k logits in bfloat16 loses ~1e-2
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
    w = weights.astype(jnp.float32)
    return jnp.sum((lse - picked) * w), jnp.sum(w)


def loss_fn(model, batch: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    """Mean token loss plus the weighted MoE aux losses; returns ``(loss, metrics)``."""
    cfg = model.cfg
    logits, aux = model(batch["tokens"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                        return_aux=True)
    ce_sum, n = cross_entropy(logits, batch["targets"], batch["weights"])
    ce = ce_sum / jnp.maximum(n, 1.0)
    loss = ce
    if cfg.is_moe:
        loss += cfg.router_aux_loss_coef * aux["load_balancing_loss"] + cfg.router_z_loss_coef * aux["router_z_loss"]
    metrics = dict(loss=loss, ce_loss=ce, tokens=n, aux_loss=aux["load_balancing_loss"], z_loss=aux["router_z_loss"],
                   expert_load=aux["expert_load"])
    return loss, metrics
