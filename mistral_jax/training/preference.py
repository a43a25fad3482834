"""Preference objectives: DPO (sigmoid, IPO, robust, hinge) against a frozen reference, and ORPO (no reference).

Pure JAX functions over the pair batches of ``data.preference`` (``tokens, targets, weights, positions, segment_ids``
of shape ``[B, 2, T]``, side 0 chosen and 1 rejected; ``pair_mask [B, P]``; pair ``k`` of row ``b`` is segment
``k + 1`` on both sides). The math is TRL's, checked against TRL 1.16 in ``tests/test_preference.py``:

* per-sequence log-probability ``logps`` = the **sum** of the answer tokens' log-probabilities (answer ids + ``</s>``;
  prompt tokens never count), float32 log-softmax;
* DPO (``trl.DPOTrainer._compute_loss``), with ``d = (pi_c - ref_c) - (pi_r - ref_r)`` on summed logps:
  ``sigmoid``: ``-log sigmoid(beta d)``; ``robust``: ``(-(1 - e) log sigmoid(beta d) + e log sigmoid(-beta d)) /
  (1 - 2e)`` with ``e = label_smoothing``; ``hinge``: ``relu(1 - beta d)``; ``ipo``: ``(d_avg - 1 / (2 beta))^2`` where
  ``d_avg`` divides each log-ratio by its answer's token count (IPO averages, TRL's choice);
  the loss is the mean over pairs; ``rewards = beta * (policy - reference) logps`` (summed, for every loss type);
* ORPO (``trl.experimental.orpo.ORPOTrainer``): logps are **averages** over answer tokens; ``log_odds = (c - r) -
  (log(1 - e^c) - log(1 - e^r))``; ``loss = nll(chosen) - mean(beta * log sigmoid(log_odds))`` (``beta`` is the
  paper's lambda); ``rewards = beta * logps``. The NLL is the token-mean cross-entropy of the chosen sequences' answer
  tokens; ``orpo_nll_on_prompt=True`` adds the prompt tokens as TRL's ``ORPOTrainer`` does.

Metrics use TRL's names: ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``logits/chosen``, ``logits/rejected`` (DPO: the mean
over answer tokens of the mean logit over the vocabulary); ORPO adds ``nll_loss``, ``log_odds_ratio``,
``log_odds_chosen`` (and has no ``logits/*``: TRL's ORPO averages them over padding too). Metrics are means over the
batch's real pairs (``logits/*`` and ``nll_loss``: over answer tokens, as TRL); ``pairs`` (their number) lets a caller
weight means across micro-batches or hosts.
``rewards/accuracies`` on held-out pairs is the preference accuracy.

In a training run the recipe (``training.recipe``, ``data.format = "preference"``) hands the generic train step a
``PreferenceObjective``: the pair batch layout, the loss above, the reference log-probs computed once per batch
without gradient (``prepare``) and the held-out sums (``rewards/accuracies`` = preference accuracy).

A model is passed as an ``apply`` function ``(tokens, positions, segment_ids) -> logits`` over ``[N, T]`` inputs (or
``-> (logits, extra_loss)``, e.g. an already-weighted MoE load-balancing loss, added to the objective): the trainer
recipe closes over its model (``model_apply(model)``), a LoRA model with its adapters disabled, or anything else.

Memory: a ``Transformer`` given as ``model_apply`` / ``policy_apply`` (a ``ModelApply``) never materialises the
float32 ``[B, 2, T, V]`` logits: its per-position log-probs come from ``training.loss.chunked_token_logps``, the head
applied to chunks of ``model.cfg.loss_chunk_size`` positions (``PREFERENCE_CHUNK`` when that is 0, the plain-logits
setting of the token loss), each chunk's logits recomputed in the backward pass. Any other ``apply`` (e.g. fixed
logits in tests) is called for its whole logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from mistral_jax.training import step as step_lib
from mistral_jax.training.loss import chunked_token_logps

DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust", "hinge")
OBJECTIVES = ("dpo", "orpo")
Apply = Callable[[Array, Array, Array], Any]  # (tokens [N, T], positions [N, T], segment_ids [N, T]) -> logits
# positions per log-prob chunk of a model whose loss_chunk_size is 0: one chunk's float32 logits are [2B, 128, V]
PREFERENCE_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """What a preference run optimises; validated on construction.

    Attributes:
      objective: ``"dpo"`` (needs reference log-probs) or ``"orpo"`` (none).
      loss_type: DPO's loss: ``"sigmoid"`` (DPO), ``"ipo"``, ``"robust"`` (label-noise-robust DPO), ``"hinge"``
        (TRL's ``loss_type`` values of the same names).
      beta: DPO's beta (IPO's tau); ORPO's lambda (the weight of the odds-ratio term).
      label_smoothing: ``"robust"`` only: the probability that a preference label is flipped, in ``[0, 0.5)``.
      orpo_nll_on_prompt: ORPO's NLL term also covers the prompt tokens (TRL ``ORPOTrainer``'s choice); the default
        trains on answer tokens only, as SFT does.
    """

    objective: str = "dpo"
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    orpo_nll_on_prompt: bool = False

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"preference objective {self.objective!r} is unknown. Fix: use one of {OBJECTIVES}.")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"DPO loss_type {self.loss_type!r} is unknown. Fix: use one of {DPO_LOSS_TYPES}.")
        if not self.beta > 0:
            raise ValueError(f"beta={self.beta} must be > 0. Fix: use e.g. 0.1 (DPO) or 0.1 (ORPO's lambda).")
        if self.label_smoothing and (self.objective != "dpo" or self.loss_type != "robust"):
            raise ValueError(f"label_smoothing={self.label_smoothing} is read only by DPO's 'robust' loss (as in TRL, "
                             f"where 'sigmoid' ignores it), not by objective={self.objective!r}, "
                             f"loss_type={self.loss_type!r}. Fix: set loss_type='robust' or label_smoothing=0.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing={self.label_smoothing} must lie in [0, 0.5) (a flip probability). "
                             "Fix: use e.g. 0.1.")

    @property
    def needs_reference(self) -> bool:
        return self.objective == "dpo"

    @classmethod
    def from_config(cls, block: Mapping[str, Any] | Any) -> PreferenceConfig:
        """From a run config's ``preference`` block (a ConfigDict or dict); missing fields take the defaults."""
        get = block.get if hasattr(block, "get") else (lambda k, d=None: getattr(block, k, d))
        fields = {f.name: get(f.name, f.default) for f in dataclasses.fields(cls)}
        return cls(**fields)


# ----------------------------------------------------------------------------------------------- log-probs
@dataclasses.dataclass(frozen=True, eq=False)
class ModelApply:
    """A ``mistral_jax.Transformer`` as an ``Apply``: called, its float32 logits (plus, with ``aux_loss``, its
    weighted MoE aux losses as ``extra_loss``); ``token_stats`` gives the per-position log-probs in chunks, never the
    whole logits (what ``sequence_logps`` and ``loss_fn`` use)."""

    model: Any
    aux_loss: bool = False  # add router_aux_loss_coef * load balancing + router_z_loss_coef * z (training.loss)

    def _extra(self, aux: Mapping[str, Array]) -> Array:
        if not self.aux_loss:
            return jnp.zeros((), jnp.float32)
        cfg = self.model.cfg
        return cfg.router_aux_loss_coef * aux["load_balancing_loss"] + cfg.router_z_loss_coef * aux["router_z_loss"]

    def __call__(self, tokens: Array, positions: Array, segment_ids: Array) -> Any:
        if not self.aux_loss:
            return self.model(tokens, positions=positions, segment_ids=segment_ids)
        logits, aux = self.model(tokens, positions=positions, segment_ids=segment_ids, return_aux=True)
        return logits, self._extra(aux)

    def token_stats(self, tokens: Array, targets: Array, positions: Array, segment_ids: Array, *,
                    with_logits: bool) -> tuple[Array, Array | None, Array]:
        """``(log p(target) [N, T], mean logit over the vocabulary [N, T] or None, extra_loss)``, chunked."""
        m = self.model
        out = m.forward(tokens, positions, segment_ids, return_hidden=True)
        lp, mean_logits = chunked_token_logps(out.hidden, m.head_weight(), targets,
                                              m.cfg.loss_chunk_size or PREFERENCE_CHUNK, m.head_logits,
                                              with_mean_logits=with_logits)
        return lp, mean_logits, self._extra(out.aux)


def model_apply(model: Any) -> Apply:
    """``apply`` of a ``mistral_jax.Transformer``: ``(tokens, positions, segment_ids) -> float32 logits`` (a
    ``ModelApply``: the objectives read its log-probs in chunks)."""
    return ModelApply(model)


def token_logps(logits: Float[Array, "N T V"], targets: Int[Array, "N T"]) -> Float[Array, "N T"]:
    """log p(target) per position, float32 log-softmax."""
    logits = logits.astype(jnp.float32)  # float32: logsumexp over 32k logits in bfloat16 loses ~1e-2
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [N, T]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def per_pair(values: Float[Array, "B S T"], segment_ids: Int[Array, "B S T"], pairs_per_row: int
             ) -> Float[Array, "B S P"]:
    """Sum ``values`` over the positions of each pair's sequence: ``out[b, s, k] = sum_t values[b, s, t] *
    [segment_ids[b, s, t] == k + 1]``."""
    onehot = (segment_ids[..., None] == jnp.arange(1, pairs_per_row + 1)).astype(jnp.float32)  # [B, S, T, P]
    return jnp.einsum("bstp,bst->bsp", onehot, values.astype(jnp.float32))


def _token_stats(apply: Apply, batch: Mapping[str, Array], *, with_logits: bool
                 ) -> tuple[Float[Array, "B S T"], Float[Array, "B S T"] | None, Array]:
    """``(log p(target), mean logit or None, extra_loss)`` per position of the ``[B, S, T]`` batch under ``apply``:
    in chunks for a ``ModelApply``, else from ``apply``'s whole logits."""
    b, s, t = batch["tokens"].shape
    flat = [batch[k].reshape(b * s, t) for k in ("tokens", "targets", "positions", "segment_ids")]  # -> [2B, T]
    if isinstance(apply, ModelApply):
        lp, mean_logits, extra = apply.token_stats(*flat, with_logits=with_logits)
    else:
        out = apply(flat[0], flat[2], flat[3])
        logits, extra = out if isinstance(out, tuple) else (out, jnp.zeros((), jnp.float32))
        lp = token_logps(logits, flat[1])
        mean_logits = jnp.mean(logits.astype(jnp.float32), axis=-1) if with_logits else None
    unflat = lambda x: None if x is None else x.reshape(b, s, t)  # noqa: E731
    return unflat(lp), unflat(mean_logits), extra


def _sequence_sums(lp: Float[Array, "B S T"], mean_logits: Float[Array, "B S T"] | None, batch: Mapping[str, Array],
                   *, with_nll: bool) -> dict[str, Float[Array, "B S P"]]:
    """Per-sequence sums over answer tokens: ``logps`` (summed log-probs), ``tokens`` (answer token counts) and,
    on request, ``logits`` (summed mean-over-vocabulary logits, for TRL's ``logits/*``) and ``nll_all`` /
    ``tokens_all`` (the negative log-likelihood and count over every non-padding target, prompt included)."""
    p = batch["pair_mask"].shape[-1]
    seg, w = batch["segment_ids"], batch["weights"].astype(jnp.float32)
    out = dict(logps=per_pair(lp * w, seg, p), tokens=per_pair(w, seg, p))
    if mean_logits is not None:
        out["logits"] = per_pair(mean_logits * w, seg, p)
    if with_nll:
        valid = (seg != 0).astype(jnp.float32)
        out["nll_all"], out["tokens_all"] = per_pair(-lp * valid, seg, p), per_pair(valid, seg, p)
    return out


def sequence_logps(apply: Apply, batch: Mapping[str, Array]) -> Float[Array, "B S P"]:
    """Summed answer log-probs ``[B, 2, P]`` of every sequence of the batch under ``apply``, without gradient: the
    reference log-probs of DPO (run it once per batch, e.g. before the gradient, and pass the result as
    ``loss_fn(..., reference=...)``)."""
    lp, _, _ = _token_stats(apply, batch, with_logits=False)
    return jax.lax.stop_gradient(_sequence_sums(lp, None, batch, with_nll=False)["logps"])


def disabled_adapters(adapter_params: Any) -> Any:
    """The LoRA reference without a second model: the trainable adapter state with every adapter zeroed.

    ``lora.LoRAWeight`` computes ``W + scale * A @ B``; with ``A = B = 0`` that is ``W`` exactly, so merging this
    state with the frozen base (``nnx.merge(graphdef, disabled_adapters(params), frozen)``) is the base model (its
    logits equal up to the float rounding of a differently fused program), and the only extra memory is one zero
    copy of the (small) adapters.
    """
    return jax.tree.map(jnp.zeros_like, adapter_params)


# ----------------------------------------------------------------------------------------------- losses
def dpo_loss(chosen_logps: Array, rejected_logps: Array, ref_chosen_logps: Array, ref_rejected_logps: Array, *,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: Array | None = None, rejected_tokens: Array | None = None) -> Array:
    """Per-pair DPO losses (any matching shapes) from summed answer log-probs, as TRL's ``DPOTrainer``.

    Args:
      chosen_logps, rejected_logps: the policy's summed log-probs of the chosen / rejected answers.
      ref_chosen_logps, ref_rejected_logps: the reference's (no gradient flows into them).
      beta: DPO's beta (IPO's tau).
      loss_type: ``"sigmoid"``, ``"ipo"``, ``"robust"`` or ``"hinge"``.
      label_smoothing: the flip probability of ``"robust"``.
      chosen_tokens, rejected_tokens: answer token counts, needed by ``"ipo"`` (which averages per token).
    """
    ref_c, ref_r = jax.lax.stop_gradient(ref_chosen_logps), jax.lax.stop_gradient(ref_rejected_logps)
    chosen_ratio, rejected_ratio = chosen_logps - ref_c, rejected_logps - ref_r
    d = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        return -jax.nn.log_sigmoid(beta * d)
    if loss_type == "robust":
        e = label_smoothing
        return (-(1 - e) * jax.nn.log_sigmoid(beta * d) + e * jax.nn.log_sigmoid(-beta * d)) / (1 - 2 * e)
    if loss_type == "hinge":
        return jax.nn.relu(1 - beta * d)
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the 'ipo' loss averages log-ratios per answer token. Fix: pass chosen_tokens and "
                             "rejected_tokens.")
        d_avg = chosen_ratio / jnp.maximum(chosen_tokens, 1.0) - rejected_ratio / jnp.maximum(rejected_tokens, 1.0)
        return (d_avg - 1 / (2 * beta)) ** 2
    raise ValueError(f"DPO loss_type {loss_type!r} is unknown. Fix: use one of {DPO_LOSS_TYPES}.")


def log1mexp(x: Array) -> Array:
    """``log(1 - exp(x))`` for ``x <= 0``, stable on both sides of ``-log 2`` (TRL's ``log1mexp``); each branch gets
    an input clamped to its own side so the unused branch's gradient is never NaN."""
    t = -0.6931471805599453
    below = x < t
    return jnp.where(below, jnp.log1p(-jnp.exp(jnp.where(below, x, t))), jnp.log(-jnp.expm1(jnp.where(below, t, x))))


def orpo_odds_ratio(chosen_avg_logps: Array, rejected_avg_logps: Array) -> tuple[Array, Array]:
    """ORPO's ``(log_odds, log sigmoid(log_odds))`` per pair from average answer log-probs (Eqs. 4 and 7 of the
    paper, as TRL's ``ORPOTrainer.odds_ratio_loss``); the loss term is ``-beta * log sigmoid(log_odds)``."""
    c, r = chosen_avg_logps.astype(jnp.float32), rejected_avg_logps.astype(jnp.float32)
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return log_odds, jax.nn.log_sigmoid(log_odds)


def _mean(x: Array, mask: Array) -> Array:
    return jnp.sum(jnp.where(mask > 0, x * mask, 0.0)) / jnp.maximum(jnp.sum(mask), 1.0)


def _reward_metrics(chosen_rewards: Array, rejected_rewards: Array, mask: Array) -> dict[str, Array]:
    return {"rewards/chosen": _mean(chosen_rewards, mask), "rewards/rejected": _mean(rejected_rewards, mask),
            "rewards/accuracies": _mean((chosen_rewards > rejected_rewards).astype(jnp.float32), mask),
            "rewards/margins": _mean(chosen_rewards - rejected_rewards, mask)}


# ----------------------------------------------------------------------------------------------- objective
def pair_terms(policy_apply: Apply, batch: Mapping[str, Array], config: PreferenceConfig,
               reference: Apply | Array | None = None) -> dict[str, Array]:
    """Per-pair quantities (``[B, P]`` each) of the objective, before reduction: ``chosen_logps``,
    ``rejected_logps`` (summed for DPO, averaged for ORPO), ``chosen_rewards``, ``rejected_rewards``, ``losses``
    (the per-pair term whose mean over pairs is the loss; for ORPO the odds-ratio term only), plus the per-sequence
    sums ``stats`` (``_sequence_sums``), the reference log-probs (DPO), ``log_odds`` / ``log_sigmoid_odds``
    (ORPO), ``nll`` (ORPO, a scalar) and ``extra_loss``. See ``loss_fn`` for the arguments."""
    orpo = config.objective == "orpo"
    lp, mean_logits, extra = _token_stats(policy_apply, batch, with_logits=not orpo)
    stats = _sequence_sums(lp, mean_logits, batch, with_nll=orpo and config.orpo_nll_on_prompt)
    mask = batch["pair_mask"].astype(jnp.float32)
    out: dict[str, Any] = dict(stats=stats, extra_loss=extra, mask=mask)
    if orpo:
        # [B, 2, P]; an empty pair slot (padding, no answer tokens) gets -1 (any value < 0): log(1 - e^0) = -inf
        # would turn its masked-out term into NaN
        avg = jnp.where(stats["tokens"] > 0, stats["logps"] / jnp.maximum(stats["tokens"], 1.0), -1.0)
        c, r = avg[:, 0], avg[:, 1]
        log_odds, ls = orpo_odds_ratio(c, r)
        if config.orpo_nll_on_prompt:
            nll = jnp.sum(stats["nll_all"][:, 0] * mask) / jnp.maximum(jnp.sum(stats["tokens_all"][:, 0] * mask), 1.0)
        else:
            nll = -jnp.sum(stats["logps"][:, 0] * mask) / jnp.maximum(jnp.sum(stats["tokens"][:, 0] * mask), 1.0)
        out.update(chosen_logps=c, rejected_logps=r, log_odds=log_odds, log_sigmoid_odds=ls, nll=nll,
                   losses=-config.beta * ls, chosen_rewards=jax.lax.stop_gradient(config.beta * c),
                   rejected_rewards=jax.lax.stop_gradient(config.beta * r))
        return out
    if reference is None:
        raise ValueError("DPO needs reference log-probs. Fix: pass reference= an apply function of the frozen "
                         "reference model (or LoRA model with adapters disabled), or sequence_logps(...) of it.")
    ref = sequence_logps(reference, batch) if callable(reference) else jax.lax.stop_gradient(reference)
    c, r = stats["logps"][:, 0], stats["logps"][:, 1]
    losses = dpo_loss(c, r, ref[:, 0], ref[:, 1], beta=config.beta, loss_type=config.loss_type,
                      label_smoothing=config.label_smoothing, chosen_tokens=stats["tokens"][:, 0],
                      rejected_tokens=stats["tokens"][:, 1])
    out.update(chosen_logps=c, rejected_logps=r, ref_chosen_logps=ref[:, 0], ref_rejected_logps=ref[:, 1],
               losses=losses, chosen_rewards=jax.lax.stop_gradient(config.beta * (c - ref[:, 0])),
               rejected_rewards=jax.lax.stop_gradient(config.beta * (r - ref[:, 1])))
    return out


def loss_fn(policy_apply: Apply, batch: Mapping[str, Array], config: PreferenceConfig,
            reference: Apply | Array | None = None) -> tuple[Array, dict[str, Array]]:
    """The preference objective of one batch: ``(loss, metrics)``, differentiable in ``policy_apply``'s weights.

    Args:
      policy_apply: the trained model, ``(tokens, positions, segment_ids) -> logits`` (or ``(logits, extra_loss)``)
        over ``[N, T]`` inputs; called once on the batch reshaped to ``[2B, T]``.
      batch: a pair batch (``data.preference``: ``[B, 2, T]`` sides, ``pair_mask [B, P]``).
      config: the objective.
      reference: DPO only: the frozen reference as an ``apply`` function (run here on the same batch under
        ``stop_gradient``) or its precomputed ``sequence_logps(reference_apply, batch)`` ``[B, 2, P]``. Either way
        no gradient reaches it and it is evaluated once per batch.

    Returns:
      The scalar loss (mean over real pairs, plus ``extra_loss``) and a dict of scalar metrics named as TRL names
      them (see the module docstring), all means over the batch's real pairs, and ``pairs``.
    """
    t = pair_terms(policy_apply, batch, config, reference)
    mask = t["mask"]
    pair_loss = _mean(t["losses"], mask)
    loss = (t["nll"] + pair_loss if config.objective == "orpo" else pair_loss) + t["extra_loss"]
    metrics = {"loss": loss, **_reward_metrics(t["chosen_rewards"], t["rejected_rewards"], mask),
               "logps/chosen": _mean(jax.lax.stop_gradient(t["chosen_logps"]), mask),
               "logps/rejected": _mean(jax.lax.stop_gradient(t["rejected_logps"]), mask),
               "pairs": jnp.sum(mask)}
    s = jax.tree.map(jax.lax.stop_gradient, t["stats"])
    if config.objective == "orpo":
        metrics.update(nll_loss=jax.lax.stop_gradient(t["nll"]),
                       log_odds_ratio=_mean(jax.lax.stop_gradient(t["log_sigmoid_odds"]), mask),
                       log_odds_chosen=_mean(jax.lax.stop_gradient(t["log_odds"]), mask))
    else:
        for side, name in ((0, "chosen"), (1, "rejected")):
            metrics[f"logits/{name}"] = (jnp.sum(s["logits"][:, side] * mask)
                                         / jnp.maximum(jnp.sum(s["tokens"][:, side] * mask), 1.0))
    metrics["extra_loss"] = jax.lax.stop_gradient(t["extra_loss"])
    return loss, metrics


def eval_metrics(policy_apply: Apply, batch: Mapping[str, Array], config: PreferenceConfig,
                 reference: Apply | Array | None = None) -> dict[str, Array]:
    """``loss_fn``'s metrics without a gradient (held-out preference accuracy is ``rewards/accuracies``)."""
    return jax.tree.map(jax.lax.stop_gradient, loss_fn(policy_apply, batch, config, reference)[1])


# ----------------------------------------------------------------------------------------------- train step
REFERENCES = ("none", "initial", "adapters_off")


def policy_apply(model: Any) -> Apply:
    """``apply`` of a ``Transformer`` being trained: logits, plus its weighted MoE aux losses as ``extra_loss``
    (the ``training.loss`` weights ``router_aux_loss_coef`` / ``router_z_loss_coef``) for a mixture of experts."""
    cfg = getattr(model, "cfg", None)
    return ModelApply(model, aux_loss=cfg is not None and cfg.is_moe)


@dataclasses.dataclass(frozen=True)
class PreferenceObjective(step_lib.Objective):
    """The train / eval step objective of a preference run (``training.step.Objective``).

    Attributes:
      config: the objective (DPO / ORPO, loss type, beta...).
      pairs_per_row: ``P`` of the pair batches (``data.pairs_per_row``).
      reference: where DPO's frozen reference comes from: ``"initial"`` (the initial weights, a frozen copy kept in
        the train state's ``frozen["initial"]``: full fine-tuning), ``"adapters_off"`` (the model with its trained
        variables, the LoRA adapters, zeroed: ``disabled_adapters``; no second copy), ``"none"`` (ORPO).

    Micro-batches (``grad_accum_steps``) are weighted by their number of real pairs.
    """

    config: PreferenceConfig = PreferenceConfig()
    pairs_per_row: int = 1
    reference: str = "none"

    def __post_init__(self):
        if self.reference not in REFERENCES:
            raise ValueError(f"reference={self.reference!r}. Fix: use one of {REFERENCES}.")
        if self.config.needs_reference and self.reference == "none":
            raise ValueError(f"objective {self.config.objective!r} needs a reference model. Fix: reference='initial'"
                             " (full fine-tuning) or 'adapters_off' (LoRA).")
        object.__setattr__(self, "keeps_initial", self.config.needs_reference and self.reference == "initial")
        object.__setattr__(self, "count_metrics", ("pairs",))

    def batch_spec(self, batch_size: int, seq_len: int) -> dict[str, tuple[tuple[int, ...], Any, tuple]]:
        spec = {k: ((batch_size, 2, seq_len), dt, ("batch", None, "seq")) for k, dt in
                dict(tokens=jnp.int32, targets=jnp.int32, weights=jnp.float32, positions=jnp.int32,
                     segment_ids=jnp.int32).items()}
        spec["pair_mask"] = ((batch_size, self.pairs_per_row), jnp.float32, ("batch", None))
        return spec

    def weight(self, batch: Mapping[str, Array]) -> Array:
        return jnp.sum(batch["pair_mask"].astype(jnp.float32))

    def prepare(self, graphdef: Any, params: Any, frozen: Any, batch: Mapping[str, Array]) -> Array | None:
        """DPO: the reference's summed answer log-probs ``[B, 2, P]`` (no gradient); ORPO: None."""
        if not self.config.needs_reference:
            return None
        if self.reference == "initial":
            ref = nnx.merge(graphdef, frozen["initial"], frozen["model"])
        else:
            ref = nnx.merge(graphdef, disabled_adapters(params), frozen)
        return sequence_logps(model_apply(ref), batch)

    def loss(self, model: Any, batch: Mapping[str, Array], prepared: Any) -> tuple[Array, dict[str, Array]]:
        return loss_fn(policy_apply(model), batch, self.config, reference=prepared)

    def eval_sums(self, graphdef: Any, params: Any, frozen: Any, batch: Mapping[str, Array]) -> dict[str, Array]:
        prepared = self.prepare(graphdef, params, frozen, batch)
        m = eval_metrics(policy_apply(self.model(graphdef, params, frozen)), batch, self.config, reference=prepared)
        return {k: (v if k == "pairs" else v * m["pairs"]) for k, v in m.items()}

    def eval_summary(self, sums: dict[str, float]) -> dict[str, float]:
        """Means over the held-out pairs (``rewards/accuracies``: the preference accuracy) and ``pairs``."""
        n = max(sums.get("pairs", 0.0), 1.0)
        return {k: (v if k == "pairs" else v / n) for k, v in sums.items()}
