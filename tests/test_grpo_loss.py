"""The RL objectives of ``training.grpo`` (GRPO, Dr. GRPO, BNPO, DAPO, RLOO) against TRL 1.16, the oracle.

A tiny random float32 model of ours is exported with ``mj.save_hf`` three times: the *initial* weights (TRL's
reference, which its trainers load from the policy's path), the *rollout* weights (initial + noise: the policy that
samples, so the reference differs from it) and the *current* weights (rollout + noise: the policy after an update,
so ratios move away from 1 and some, not all, of them clip). TRL builds every batch itself: ``GRPOTrainer`` /
``RLOOTrainer`` ``._generate_and_score_completions`` on a few prompts samples ``G`` completions each at temperature
0.9, scores them with a reward function, computes the advantages, the rollout's log-probs (``num_iterations=2``
makes ``GRPOTrainer`` compute them) and the reference's. Then ``_compute_loss`` on the current weights gives the loss
and the metrics it logs. On our side the same tensors are only re-laid into our batch layout (``_our_batch``:
prompt + completion right-padded; nothing TRL computed is recomputed) and ``GRPOObjective.loss`` on our current
model must give the same loss, KL, entropy and clip fractions; ``group_advantages`` on the rewards TRL logged (and,
for RLOO, the per-token KL TRL put in them) the same advantages; ``token_logps`` / ``GRPOObjective.prepare`` the
same rollout / reference log-probs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mistral_jax as mj
from mistral_jax.training import grpo
from tests.test_preference import _quiet_trl

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

CFG = mj.ModelConfig.tiny(initializer_range=0.1)  # float32; weights large enough for peaked, varied distributions
G = 4  # completions per prompt
PROMPTS = ["The cat sat on the", "Once upon a time there was a small", "Hello"]  # left-padded by TRL
MAX_NEW = 12  # TRL's max_completion_length (Dr. GRPO's constant)
SEQ = 40  # our rows: the longest prompt + MAX_NEW fits
TEMPERATURE = 0.9  # not 1: log-probs, entropies and KL are those of logits / 0.9
BETA = 0.05
EPS_LOW, EPS_HIGH = 0.2, 0.28  # DAPO's asymmetric clipping
# A random model rarely samples </s>: declaring more end-of-completion ids (TRL ends a completion at any id the
# model's generation config declares) gives completions of varied lengths, so the per-sequence (grpo), per-token
# (bnpo, dapo) and constant (dr_grpo) normalisations differ.
EOS_IDS = [2, *range(40, 80)]
ROLLOUT_NOISE, UPDATE_NOISE = 0.02, 0.02  # weight noise: initial -> rollout -> current
SCALES = ("group", "batch", "none")  # TRL scale_rewards: GRPO, batch std, Dr. GRPO
GRPO_CASES = {"grpo": "group", "dr_grpo": "none", "bnpo": "batch", "dapo": "group"}  # loss type -> its batch
METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
ATOL = 1e-5


def _reward(completions, **kwargs):
    """Varied rewards from the decoded text: its length and its vowels."""
    return [0.05 * len(c) + 0.3 * sum(ch in "aeiou" for ch in c) for c in completions]


def _perturbed(model, seed, scale):
    """``model`` with every weight moved by ``scale`` x standard normal noise (seeded)."""
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


@pytest.fixture(scope="module")
def models(tokenizer_path, tmp_path_factory):
    """Our initial / rollout / current models, their HF exports' torch state dicts and the initial export's dir."""
    import torch
    import transformers

    _quiet_trl()
    initial = mj.Transformer(CFG, rngs=nnx.Rngs(0))
    rollout = _perturbed(initial, 1, ROLLOUT_NOISE)
    current = _perturbed(rollout, 2, UPDATE_NOISE)
    root = tmp_path_factory.mktemp("grpo")
    init_dir = mj.save_hf(initial, root / "initial", tokenizer=tokenizer_path)

    def state_dict(m, name):
        d = mj.save_hf(m, root / name)
        return transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).state_dict()

    return dict(initial=initial, rollout=rollout, current=current, init_dir=init_dir, root=root,
                rollout_sd=state_dict(rollout, "rollout"), current_sd=state_dict(current, "current"))


def _trl_trainer(models, trainer_cls, config_cls, **kw):
    """A TRL trainer (built offline) on the exported initial model, which it also loads as its reference; the
    policy then gets the rollout weights."""
    import datasets
    import torch
    import transformers

    policy = transformers.AutoModelForCausalLM.from_pretrained(str(models["init_dir"]), dtype=torch.float32,
                                                               attn_implementation="eager")
    policy.generation_config.eos_token_id = EOS_IDS
    args = config_cls(output_dir=str(models["root"] / trainer_cls.__name__), report_to=[], use_cpu=True, bf16=False,
                      num_generations=G, per_device_train_batch_size=len(PROMPTS) * G, max_completion_length=MAX_NEW,
                      temperature=TEMPERATURE, beta=BETA, epsilon=EPS_LOW, epsilon_high=EPS_HIGH, seed=0, **kw)
    trainer = trainer_cls(model=policy, reward_funcs=_reward, args=args,
                          train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS]),
                          processing_class=transformers.AutoTokenizer.from_pretrained(str(models["init_dir"])))
    trainer.model.load_state_dict(models["rollout_sd"])
    trainer.model.train()  # TRL's train mode (dropout is off); one micro-batch per optimizer step
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _generate(trainer, seed):
    """TRL's batch of ``len(PROMPTS) x G`` completions (a prompt's ``G`` adjacent, as its sampler repeats them),
    the per-function rewards it logged and the per-token log-probs its own forward computed (rollout, reference)."""
    import torch

    seen = []
    forward = trainer._get_per_token_logps_and_entropies

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append(out[0])
        return out

    trainer._get_per_token_logps_and_entropies = spy
    torch.manual_seed(seed)
    try:
        inputs = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(G)])
    finally:
        del trainer._get_per_token_logps_and_entropies
    rewards = np.asarray(list(trainer._logs["rewards"]["_reward"])[-len(PROMPTS) * G:], np.float64)
    return inputs, rewards, seen


def _trl_loss(trainer, inputs, model_sd, **attrs):
    """TRL's ``_compute_loss`` with the trainer's attributes set to ``attrs``: ``{"loss", logged metrics...}``."""
    import torch

    trainer.model.load_state_dict(model_sd)
    for k, v in attrs.items():
        setattr(trainer, k, v)
    trainer._metrics["train"].clear()
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, inputs)
    return {"loss": float(loss), **{k: v[-1] for k, v in trainer._metrics["train"].items()}}


def _our_batch(inputs, old_token_logps=None, ref_token_logps=None):
    """TRL's ``inputs`` re-laid into our layout: each row's prompt (left-padded there) and completion (right-padded
    there) put side by side from position 0, right-padded to ``SEQ``; TRL's per-token log-probs (``[B, C]``, one per
    completion token) moved to the positions whose target is that token. Returns ``(batch, ref_logps [B, SEQ])``.

    Positions start at 0 on each row's first token, while HF numbers left padding too (row positions shifted by
    its padding): RoPE scores depend on position differences only, so the two agree to float32 rounding."""
    p_ids, p_mask = (inputs[k].numpy() for k in ("prompt_ids", "prompt_mask"))
    c_ids, c_mask = (inputs[k].numpy() for k in ("completion_ids", "completion_mask"))
    old = inputs["old_per_token_logps"] if old_token_logps is None else old_token_logps
    ref = inputs["ref_per_token_logps"] if ref_token_logps is None else ref_token_logps
    old, ref = old.numpy(), ref.numpy()
    n = len(p_ids)
    b = {k: np.zeros((n, SEQ), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    b.update({k: np.zeros((n, SEQ), np.float32) for k in ("weights", "old_logps")})
    ref_out = np.zeros((n, SEQ), np.float32)
    for i in range(n):
        prompt, completion = p_ids[i][p_mask[i] == 1], c_ids[i][c_mask[i] == 1]
        row, p, c = np.concatenate([prompt, completion]), len(prompt), len(completion)
        assert np.all(c_mask[i, :c] == 1) and len(row) <= SEQ
        b["tokens"][i, :len(row)], b["targets"][i, :len(row) - 1] = row, row[1:]
        b["positions"][i, :len(row)], b["segment_ids"][i, :len(row)] = np.arange(len(row)), 1
        b["weights"][i, p - 1:p - 1 + c] = 1.0
        b["old_logps"][i, p - 1:p - 1 + c], ref_out[i, p - 1:p - 1 + c] = old[i, :c], ref[i, :c]
    b["advantages"] = inputs["advantages"].numpy().astype(np.float32)
    return b, ref_out


def _config(loss_type, bias=False, **kw):
    return grpo.GRPOConfig(loss_type=loss_type, beta=BETA, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                           max_completion_length=MAX_NEW, temperature=TEMPERATURE, bias_correction_kl=bias, **kw)


@pytest.fixture(scope="module")
def ours(models):
    """One compiled function: every loss type's (loss, metrics) on the current model, the rollout model's
    ``token_logps`` and the ``reference="initial"`` objective's ``prepare`` (the initial weights), for one batch."""
    graphdef, params, rest = nnx.split(models["current"], nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    initial = nnx.to_pure_dict(nnx.split(models["initial"], nnx.Param, ...)[1])
    rollout = nnx.to_pure_dict(nnx.split(models["rollout"], nnx.Param, ...)[1])
    types = (*GRPO_CASES, "rloo")

    @jax.jit
    def run(batch, ref_logps):
        out = {}
        for lt in types:
            for bias in ((False, True) if lt != "rloo" else (False,)):
                objective = grpo.GRPOObjective(config=_config(lt, bias), reference="none")
                out[f"{lt}/{bias}"] = objective.loss(nnx.merge(graphdef, params, rest), batch,
                                               None if lt == "rloo" else ref_logps)
        out["rollout_logps"] = grpo.token_logps(nnx.merge(graphdef, rollout, rest), batch, TEMPERATURE)[0]
        out["ref_logps"] = grpo.GRPOObjective(config=_config("grpo"), reference="initial").prepare(
            graphdef, params, {"model": rest, "initial": initial}, batch)
        return out

    return lambda batch, ref: jax.device_get(run({k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(ref)))


@pytest.fixture(scope="module")
def trl_grpo(models):
    """GRPOTrainer and one TRL batch per ``scale_rewards``. ``num_iterations=2``: it computes the rollout's
    log-probs itself. ``use_bias_correction_kl=False``: the plain k3 KL of ``training.grpo`` (TRL 1.16's default
    multiplies each token's KL by its ratio)."""
    from trl import GRPOConfig, GRPOTrainer

    trainer = _trl_trainer(models, GRPOTrainer, GRPOConfig, num_iterations=2, use_bias_correction_kl=False)
    batches = {}
    for i, scale in enumerate(SCALES):
        trainer.scale_rewards = scale
        batches[scale] = _generate(trainer, i)
    return trainer, batches


@pytest.fixture(scope="module")
def trl_rloo(models):
    """RLOOTrainer and one TRL batch per ``normalize_advantages``."""
    from trl import RLOOConfig, RLOOTrainer

    trainer = _trl_trainer(models, RLOOTrainer, RLOOConfig)
    batches = {}
    for i, normalize in enumerate((False, True)):
        trainer.normalize_advantages = normalize
        batches[normalize] = _generate(trainer, 10 + i)
    return trainer, batches


@pytest.mark.oracle
@pytest.mark.heavy  # the shared fixtures (exports, TRL trainers, rollouts, one compile) take ~15 s on 2 cores
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("loss_type", list(GRPO_CASES))
def test_grpo_loss_equals_trl(models, trl_grpo, ours, loss_type, bias):
    """Loss, KL, entropy and clip fractions of GRPOObjective.loss equal GRPOTrainer._compute_loss's on its batch,
    with and without the bias-corrected KL (TRL's ``use_bias_correction_kl``, on by default)."""
    trainer, batches = trl_grpo
    inputs, _, _ = batches[GRPO_CASES[loss_type]]
    trainer.args.use_bias_correction_kl = bias
    try:
        theirs = _trl_loss(trainer, inputs, models["current_sd"], loss_type=loss_type)
    finally:
        trainer.args.use_bias_correction_kl = False
    batch, ref = _our_batch(inputs)
    loss, metrics = ours(batch, ref)[f"{loss_type}/{bias}"]
    np.testing.assert_allclose(float(loss), theirs["loss"], atol=ATOL, rtol=1e-5, err_msg="loss")
    for name in METRICS:
        np.testing.assert_allclose(float(metrics[name]), theirs[name], atol=ATOL, rtol=1e-5, err_msg=name)
    assert float(metrics["completion_tokens"]) == float(inputs["completion_mask"].sum())
    assert abs(theirs["loss"]) > 1e-3 and theirs["kl"] > 1e-4
    assert 0 < theirs["clip_ratio/region_mean"] < 1  # some tokens clip, not all


@pytest.mark.oracle
@pytest.mark.heavy
def test_grpo_loss_types_differ(trl_grpo):
    """The batch has completions of several lengths, so the four normalisations are told apart."""
    lengths = trl_grpo[1]["group"][0]["completion_mask"].sum(-1).numpy()
    assert len(set(lengths.tolist())) >= 3 and lengths.max() == MAX_NEW and lengths.min() < MAX_NEW


@pytest.mark.oracle
@pytest.mark.heavy
@pytest.mark.parametrize("scale", SCALES)
def test_grpo_advantages_equal_trl(trl_grpo, scale):
    """group_advantages on the rewards TRL logged equals the advantages TRL put in its batch."""
    inputs, rewards, _ = trl_grpo[1][scale]
    adv, stats = grpo.group_advantages(rewards, G, grpo.GRPOConfig(scale_rewards=scale))
    np.testing.assert_allclose(adv, inputs["advantages"].numpy(), atol=ATOL, rtol=1e-5)
    assert np.abs(adv).max() > 0.1
    assert stats["frac_reward_zero_std"] < 1


@pytest.mark.oracle
@pytest.mark.heavy
def test_logps_equal_trl(trl_grpo, ours):
    """token_logps of the rollout model and the reference="initial" objective's prepare equal TRL's per-token
    log-probs of the policy that sampled and of its reference (at the sampling temperature)."""
    inputs, _, _ = trl_grpo[1]["group"]
    batch, ref = _our_batch(inputs)
    out, w = ours(batch, ref), batch["weights"] > 0
    np.testing.assert_allclose(out["rollout_logps"][w], batch["old_logps"][w], atol=ATOL, rtol=1e-6)
    np.testing.assert_allclose(out["ref_logps"][w], ref[w], atol=ATOL, rtol=1e-6)
    assert np.abs(ref[w] - batch["old_logps"][w]).max() > 1e-2  # the rollout policy is not the reference


@pytest.mark.oracle
@pytest.mark.heavy
def test_rloo_loss_equals_trl(models, trl_rloo, ours):
    """RLOO's sequence-level loss and clip fractions equal RLOOTrainer._compute_loss's on its batch."""
    trainer, batches = trl_rloo
    inputs, _, (old, ref) = batches[False]
    theirs = _trl_loss(trainer, inputs, models["current_sd"])
    batch, ref_lp = _our_batch(inputs, old, ref)
    np.testing.assert_allclose(batch["old_logps"].sum(-1), inputs["old_logps"].numpy(), atol=ATOL, rtol=1e-6)
    loss, metrics = ours(batch, ref_lp)["rloo/False"]
    np.testing.assert_allclose(float(loss), theirs["loss"], atol=ATOL, rtol=1e-5, err_msg="loss")
    for name in METRICS[1:]:
        np.testing.assert_allclose(float(metrics[name]), theirs[name], atol=ATOL, rtol=1e-5, err_msg=name)
    assert abs(theirs["loss"]) > 1e-3
    assert 0 < theirs["clip_ratio/region_mean"] < 1  # some sequences clip, not all


@pytest.mark.oracle
@pytest.mark.heavy
@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_equal_trl(trl_rloo, normalize):
    """group_advantages (leave-one-out, beta x the summed old - ref log-ratio taken from the reward) on the rewards
    TRL logged equals RLOOTrainer's advantages."""
    inputs, rewards, (old, ref) = trl_rloo[1][normalize]
    kl = ((old - ref) * inputs["completion_mask"]).sum(-1).numpy()
    cfg = grpo.GRPOConfig(loss_type="rloo", beta=BETA, normalize_advantages=normalize)
    adv, _ = grpo.group_advantages(rewards, G, cfg, kl=kl)
    np.testing.assert_allclose(adv, inputs["advantages"].numpy(), atol=ATOL, rtol=1e-5)
    no_kl, _ = grpo.group_advantages(rewards, G, cfg)
    assert np.abs(adv - no_kl).max() > 1e-4  # the KL moves the advantages
