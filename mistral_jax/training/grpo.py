"""GRPO, Dr. GRPO, BNPO / DAPO and RLOO: the policy-gradient objectives of RL with verifiable rewards.

The math is TRL 1.16's (``GRPOTrainer._compute_loss`` and the advantages of ``_generate_and_score_completions``,
``RLOOTrainer`` for ``rloo``), checked against TRL in ``tests/test_grpo_loss.py``. Every completion is one row of a
``[B, T]`` batch (``B`` = prompts x ``G`` completions, the ``G`` of a prompt on adjacent rows):

* ``tokens, targets, positions, segment_ids`` as the token loss's (prompt + completion, right-padded; ``segment_ids``
  0 on padding), ``weights`` = 1 where the target is a completion token (its ``</s>`` included): the mask;
* ``old_logps [B, T]``: each completion token's log-prob under the policy that sampled it (the rollout's, at the
  sampling temperature), 0 off the mask;
* ``advantages [B]`` (``group_advantages``).

Per-token log-probs are ``log_softmax(logits / temperature)`` of the current policy (TRL's), float32, in chunks
(``training.loss.chunked_token_stats``). With ``ratio = exp(logp - old_logp)``:

* ``grpo`` / ``bnpo`` / ``dr_grpo`` / ``dapo``: per token ``-min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A)``
  plus ``beta`` times the k3 KL estimate ``exp(ref - logp) - (ref - logp) - 1`` to the frozen reference (times
  the ratio with ``bias_correction_kl``, TRL's default ``use_bias_correction_kl``); reduced as
  ``grpo``: the mean over sequences of each sequence's token mean; ``bnpo`` / ``dapo``: the token mean of the batch;
  ``dr_grpo``: the token sum / (sequences x ``max_completion_length``). DAPO-style asymmetric clipping: set
  ``epsilon_high`` above ``epsilon_low`` (0.28 / 0.2 in the DAPO paper);
* ``rloo``: one ratio per sequence, ``exp(sum logp - sum old_logp)``, clipped the same way, the mean over sequences;
  its KL is in the reward (``beta`` x the summed first-order ``old - ref`` log-ratio, at rollout time).

Advantages (``group_advantages``, from the rewards of the ``G`` completions of each prompt): GRPO family: reward
minus the group mean, divided by the group's std + 1e-4 (``scale_rewards="group"``, GRPO), the batch's std
(``"batch"``) or nothing (``"none"``: Dr. GRPO); RLOO: reward minus the mean of the other ``G - 1`` (leave one out),
optionally normalised over the batch (``normalize_advantages``).

Metrics use TRL's names: ``kl``, ``entropy``, ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
``clip_ratio/region_mean`` (token means over the mask; RLOO: sequence means), plus ``completion_tokens`` and
``sequences`` (counts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from mistral_jax.training import step as step_lib
from mistral_jax.training.loss import chunked_token_stats
from mistral_jax.training.preference import PREFERENCE_CHUNK, REFERENCES, disabled_adapters

LOSS_TYPES = ("grpo", "dr_grpo", "bnpo", "dapo", "rloo")
SCALE_REWARDS = ("group", "batch", "none")
_TOKEN_MEAN = ("bnpo", "dapo")  # losses averaged over the batch's completion tokens


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """The objective's settings (``config.grpo`` of a run: ``from_config``)."""

    loss_type: str = "grpo"
    beta: float = 0.0  # weight of the KL to the frozen reference (0: no reference model)
    epsilon_low: float = 0.2  # ratio clip below: 1 - epsilon_low
    epsilon_high: float = 0.2  # ratio clip above: 1 + epsilon_high (DAPO: 0.28)
    scale_rewards: str = "group"  # GRPO family: "group" std, "batch" std or "none" (Dr. GRPO)
    normalize_advantages: bool = False  # RLOO: normalise the advantages over the batch
    max_completion_length: int = 64  # new tokens per completion at most (Dr. GRPO's constant)
    temperature: float = 1.0  # the sampling temperature; log-probs are those of logits / temperature
    bias_correction_kl: bool = True  # the KL term times the token's ratio (TRL 1.16's use_bias_correction_kl)

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is unknown. Fix: use one of {LOSS_TYPES}.")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards={self.scale_rewards!r} is unknown. Fix: use one of {SCALE_REWARDS}.")
        if not self.beta >= 0:
            raise ValueError(f"beta={self.beta!r} must be >= 0 (0 = no KL term). Fix: e.g. beta=0.04.")
        if not (0 <= self.epsilon_low < 1 and self.epsilon_high >= 0):
            raise ValueError(f"epsilon_low={self.epsilon_low!r}, epsilon_high={self.epsilon_high!r}: the ratio is "
                             "clipped to [1 - epsilon_low, 1 + epsilon_high]. Fix: 0 <= epsilon_low < 1, "
                             "epsilon_high >= 0 (e.g. 0.2 / 0.28).")
        if not (isinstance(self.max_completion_length, int) and self.max_completion_length >= 1):
            raise ValueError(f"max_completion_length={self.max_completion_length!r} must be a positive integer. "
                             "Fix: e.g. 64.")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0 (RL samples). Fix: e.g. 1.0.")

    @classmethod
    def from_config(cls, block: Mapping[str, Any]) -> GRPOConfig:
        """The settings of a ``config.grpo`` block (its other fields are the recipe's)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (float(v) if isinstance(v, int) and not isinstance(v, bool) and
                          k not in ("max_completion_length",) else v) for k, v in dict(block).items() if k in names})

    @property
    def kl_in_reward(self) -> bool:
        """RLOO puts its KL in the reward (at rollout time); the GRPO family in the loss."""
        return self.loss_type == "rloo"


# ------------------------------------------------------------------------------------------------ advantages
def _nanstd(x: np.ndarray, axis: Any = None, keepdims: bool = False) -> np.ndarray:
    """TRL's ``nanstd``: the NaN-ignoring standard deviation with Bessel's correction (NaN for one value)."""
    count = np.sum(~np.isnan(x), axis=axis, keepdims=True)
    mean = np.nanmean(x, axis=axis, keepdims=True)
    var = np.nanmean((x - mean) ** 2, axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where(count > 1, var * count / (count - 1), np.nan)
    out = np.sqrt(var)
    return out if keepdims else (np.squeeze(out, axis=axis) if axis is not None else out.reshape(()))


def group_advantages(rewards: np.ndarray, num_generations: int, config: GRPOConfig,
                     reward_weights: np.ndarray | None = None, kl: np.ndarray | None = None
                     ) -> tuple[np.ndarray, dict[str, float]]:
    """Advantages ``[N]`` of ``N = prompts x G`` completions (a prompt's ``G`` adjacent) from their rewards.

    Args:
      rewards: ``[N, F]`` float, one column per reward function (NaN: the function did not score that completion;
        a row that is all NaN is unscorable and gets advantage 0), or ``[N]`` (one function).
      num_generations: ``G``.
      config: ``loss_type`` (``rloo`` or the GRPO family), ``scale_rewards``, ``normalize_advantages``, ``beta``.
      reward_weights: ``[F]`` weights of the functions (default all 1); the reward is their weighted sum.
      kl: ``[N]`` each completion's summed ``old - ref`` log-ratio (RLOO with ``beta > 0``: ``reward - beta kl``).

    Returns:
      ``(advantages [N] float32, stats)``: ``reward`` / ``reward_std`` (mean and std of the weighted reward over
      the scorable completions) and ``frac_reward_zero_std`` (TRL's names).
    """
    r = np.asarray(rewards, np.float64)
    r = r[:, None] if r.ndim == 1 else r
    n, f = r.shape
    g = int(num_generations)
    if n % g:
        raise ValueError(f"{n} completions are not groups of num_generations={g}. Fix: pass G completions per prompt.")
    w = np.ones(f) if reward_weights is None else np.asarray(reward_weights, np.float64)
    unscorable = np.isnan(r).all(axis=1)
    total = np.nansum(r * w[None], axis=1)
    total[unscorable] = np.nan
    stats = {"reward": float(np.nanmean(total)) if (~unscorable).any() else float("nan"),
             "reward_std": float(_nanstd(total))}
    if config.loss_type == "rloo":
        if config.beta and kl is not None:
            total = total - config.beta * np.asarray(kl, np.float64)
        grouped = total.reshape(-1, g)
        std = _nanstd(grouped, axis=1) if g > 1 else np.zeros(len(grouped))
        counts = np.sum(~np.isnan(grouped), axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            base = ((np.nansum(grouped, axis=1, keepdims=True) - grouped) / (counts - 1)).reshape(-1)
        adv = total - base if g > 1 else np.zeros(n)
        if config.normalize_advantages:
            adv = (adv - np.nanmean(adv)) / (_nanstd(adv) + 1e-4)
        zero_std = np.isclose(std, 0.0)
        stats["frac_reward_zero_std"] = float(np.mean(zero_std))
    else:
        grouped = total.reshape(-1, g)
        mean = np.repeat(np.nanmean(grouped, axis=1), g) if n else total
        if config.scale_rewards == "batch":
            std = np.full(n, _nanstd(total) if n > 1 else 0.0)
        else:
            std = np.repeat(_nanstd(grouped, axis=1), g) if g > 1 else np.zeros(n)
        adv = total - mean
        if config.scale_rewards != "none":
            adv = adv / (std + 1e-4)
        stats["frac_reward_zero_std"] = float(np.mean(np.isclose(std, 0.0)))
    return np.nan_to_num(adv, nan=0.0).astype(np.float32), stats


# ----------------------------------------------------------------------------------------------------- loss
def policy_loss(logps: Float[Array, "B T"], old_logps: Float[Array, "B T"], advantages: Float[Array, " B"],
                mask: Float[Array, "B T"], config: GRPOConfig, ref_logps: Float[Array, "B T"] | None = None,
                entropy: Float[Array, "B T"] | None = None) -> tuple[Array, dict[str, Array]]:
    """``(loss, metrics)`` of one batch of completions (see the module docstring; TRL's ``_compute_loss``).

    Args:
      logps: the current policy's per-token log-probs (differentiated).
      old_logps: the sampling policy's (no gradient).
      advantages: one per completion.
      mask: 1 on completion tokens.
      config: the objective.
      ref_logps: the reference's per-token log-probs (GRPO family with ``beta > 0``).
      entropy: per-token entropy of the current policy (for the metric only).
    """
    c = config
    mask = mask.astype(jnp.float32)
    old = jax.lax.stop_gradient(old_logps)
    adv = advantages.astype(jnp.float32)
    rows = jnp.sum(mask, axis=-1)  # completion tokens per sequence
    seq = (rows > 0).astype(jnp.float32)
    n_seq, n_tok = jnp.maximum(jnp.sum(seq), 1.0), jnp.maximum(jnp.sum(mask), 1.0)

    def token_mean(x):
        return jnp.sum(x * mask) / n_tok

    metrics: dict[str, Array] = {"completion_tokens": jnp.sum(mask), "sequences": jnp.sum(seq)}
    if entropy is not None:
        metrics["entropy"] = token_mean(jax.lax.stop_gradient(entropy))
    lo, hi = 1.0 - c.epsilon_low, 1.0 + c.epsilon_high
    if c.loss_type == "rloo":
        ratio = jnp.exp(jnp.sum((logps - old) * mask, axis=-1))  # [B]
        per_seq = -jnp.minimum(ratio * adv, jnp.clip(ratio, lo, hi) * adv)
        loss = jnp.sum(per_seq * seq) / n_seq
        low, high = (ratio < lo) & (adv < 0), (ratio > hi) & (adv > 0)
        seq_mean = lambda x: jnp.sum(x.astype(jnp.float32) * seq) / n_seq  # noqa: E731
        metrics.update({"clip_ratio/low_mean": seq_mean(low), "clip_ratio/high_mean": seq_mean(high),
                        "clip_ratio/region_mean": seq_mean(low | high)})
        return loss, {"loss": loss, **metrics}
    ratio = jnp.exp(logps - old)  # [B, T]
    a = adv[:, None]
    per_token = -jnp.minimum(ratio * a, jnp.clip(ratio, lo, hi) * a)
    if c.beta:
        if ref_logps is None:
            raise ValueError(f"beta={c.beta} needs the reference's log-probs. Fix: pass ref_logps (or beta=0).")
        d = jax.lax.stop_gradient(ref_logps) - logps
        kl = jnp.exp(d) - d - 1.0
        if c.bias_correction_kl:  # importance-sampling correction: the KL is estimated on the sampling policy
            kl = kl * ratio
        per_token = per_token + c.beta * kl
        metrics["kl"] = token_mean(jax.lax.stop_gradient(kl))
    if c.loss_type == "grpo":
        loss = jnp.sum(jnp.sum(per_token * mask, axis=-1) / jnp.maximum(rows, 1.0) * seq) / n_seq
    elif c.loss_type in _TOKEN_MEAN:
        loss = jnp.sum(per_token * mask) / n_tok
    else:  # dr_grpo
        loss = jnp.sum(per_token * mask) / (n_seq * c.max_completion_length)
    low, high = (ratio < lo) & (a < 0), (ratio > hi) & (a > 0)
    metrics.update({"clip_ratio/low_mean": token_mean(low.astype(jnp.float32)),
                    "clip_ratio/high_mean": token_mean(high.astype(jnp.float32)),
                    "clip_ratio/region_mean": token_mean((low | high).astype(jnp.float32))})
    return loss, {"loss": loss, **metrics}


def token_logps(model: Any, batch: Mapping[str, Array], temperature: float, *, with_entropy: bool = False
                ) -> tuple[Float[Array, "B T"], Float[Array, "B T"] | None, Array]:
    """``(log p(target) [B, T], entropy [B, T] or None, weighted MoE aux loss)`` of a ``Transformer`` on ``batch``:
    ``log_softmax(logits / temperature)`` in chunks of ``model.cfg.loss_chunk_size`` positions (``PREFERENCE_CHUNK``
    when 0): the float32 ``[B, T, V]`` logits never exist at once."""
    cfg = model.cfg
    out = model.forward(batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True)
    chunk = cfg.loss_chunk_size or PREFERENCE_CHUNK
    inv_t = 1.0 / float(temperature)
    head_logits = model.head_logits if inv_t == 1.0 else (lambda x, w: model.head_logits(x, w) * inv_t)
    lp, ent = chunked_token_stats(out.hidden, model.head_weight(), batch["targets"], chunk, head_logits,
                                  with_entropy=with_entropy)
    aux = jnp.zeros((), jnp.float32)
    if cfg.is_moe:
        aux = cfg.router_aux_loss_coef * out.aux["load_balancing_loss"] + cfg.router_z_loss_coef * \
            out.aux["router_z_loss"]
    return lp, ent, aux


@dataclasses.dataclass(frozen=True)
class GRPOObjective(step_lib.Objective):
    """The train step objective of a GRPO run (``training.step.Objective``).

    Attributes:
      config: the loss (type, clipping, beta, temperature...).
      reference: where the KL's frozen reference comes from (GRPO family with ``beta > 0``): ``"initial"`` (a
        frozen copy of the initial weights in the state's ``frozen["initial"]``), ``"adapters_off"`` (LoRA: the
        model with its adapters zeroed), ``"none"``.

    Micro-batches are weighted by their sequences (``grpo``, ``dr_grpo``, ``rloo``) or completion tokens (``bnpo``,
    ``dapo``), so ``grad_accum_steps`` does not change the loss.
    """

    config: GRPOConfig = GRPOConfig()
    reference: str = "none"

    def __post_init__(self):
        if self.reference not in REFERENCES:
            raise ValueError(f"reference={self.reference!r}. Fix: use one of {REFERENCES}.")
        object.__setattr__(self, "keeps_initial", self.reference == "initial")
        object.__setattr__(self, "count_metrics", ("completion_tokens", "sequences"))

    @property
    def needs_reference(self) -> bool:
        return bool(self.config.beta) and self.reference != "none"

    def batch_spec(self, batch_size: int, seq_len: int) -> dict[str, tuple[tuple[int, ...], Any, tuple]]:
        spec = super().batch_spec(batch_size, seq_len)
        spec["old_logps"] = ((batch_size, seq_len), jnp.float32, ("batch", "seq"))
        spec["advantages"] = ((batch_size,), jnp.float32, ("batch",))
        return spec

    def weight(self, batch: Mapping[str, Array]) -> Array:
        w = batch["weights"].astype(jnp.float32)
        if self.config.loss_type in _TOKEN_MEAN:
            return jnp.sum(w)
        return jnp.sum((jnp.sum(w, axis=-1) > 0).astype(jnp.float32))

    def reference_model(self, graphdef: Any, params: Any, frozen: Any) -> nnx.Module:
        if self.reference == "initial":
            return nnx.merge(graphdef, frozen["initial"], frozen["model"])
        return nnx.merge(graphdef, disabled_adapters(params), frozen)

    def reference_logps(self, graphdef: Any, params: Any, frozen: Any, batch: Mapping[str, Array]) -> Array:
        """The reference's per-token log-probs ``[B, T]`` (no gradient)."""
        lp, _, _ = token_logps(self.reference_model(graphdef, params, frozen), batch, self.config.temperature)
        return jax.lax.stop_gradient(lp)

    def prepare(self, graphdef: Any, params: Any, frozen: Any, batch: Mapping[str, Array]) -> Array | None:
        """The reference's log-probs when the loss has a KL term (GRPO family, ``beta > 0``), else None."""
        if not self.needs_reference or self.config.kl_in_reward:
            return None
        return self.reference_logps(graphdef, params, frozen, batch)

    def loss(self, model: Any, batch: Mapping[str, Array], prepared: Any) -> tuple[Array, dict[str, Array]]:
        lp, ent, aux = token_logps(model, batch, self.config.temperature, with_entropy=True)
        loss, metrics = policy_loss(lp, batch["old_logps"], batch["advantages"], batch["weights"], self.config,
                                    ref_logps=prepared, entropy=ent)
        if model.cfg.is_moe:
            metrics["aux_loss"] = aux
        return loss + aux, {**metrics, "loss": loss + aux}

    def eval_sums(self, graphdef: Any, params: Any, frozen: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
        raise NotImplementedError("a GRPO run's held-out measure is the reward of its answers (the recipe's hooks)")
