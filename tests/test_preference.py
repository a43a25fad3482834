"""Preference tuning (``data.preference``, ``training.preference``) against TRL 1.16, the oracle.

A tiny random float32 model (the policy) and a second one (the DPO reference) are exported with ``mj.save_hf`` and
loaded back by ``transformers.AutoModelForCausalLM``; TRL's own trainers, built offline on them, compute the loss
and metrics of the *same token ids* (the pairs rendered by ``data.preference`` with the corpus tokenizer):
``DPOTrainer.data_collator`` + ``DPOTrainer._compute_loss`` (the metrics it logs) for DPO, and
``ORPOTrainer.data_collator`` + ``ORPOTrainer.get_batch_loss_metrics`` for ORPO. Then: prompt tokens carry no
loss, packing several pairs per row changes nothing, records of every accepted layout read the same, the reference
log-probs do not move during training, and a short seeded DPO run on the bundled set raises held-out preference
accuracy.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mistral_jax as mj
from mistral_jax.data import preference as dp
from mistral_jax.training import preference as tp

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers / TRL deprecation notices

CFG = mj.ModelConfig.tiny(initializer_range=0.1, loss_chunk_size=24)  # float32, weights large enough that the two
# models disagree; log-probs in 24-position chunks (SEQ = 80: four, the last padded)
SEQ = 80  # positions per sequence for the test pairs (the longest needs 68)
TRAIN_SEQ = 72  # the bundled set's longest pair needs 65 positions

RECORDS = [
    {"prompt": "What is the capital of France?", "chosen": "The capital of France is Paris.",
     "rejected": "Look it up yourself."},  # standard strings
    {"prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 plus 3?"}],
     "chosen": [{"role": "assistant", "content": "5."}],
     "rejected": [{"role": "assistant", "content": "2 plus 3 is 6, as everyone knows."}]},  # TRL conversational
    {"prompt": "Name a colour.",
     "chosen": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "No."}]},  # H4 UF
    {"chosen": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
                {"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}],
     "rejected": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
                  {"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "I will not."}]},
]
DPO_CASES = {"sigmoid": dict(beta=0.1), "ipo": dict(beta=0.5), "robust": dict(beta=0.2, label_smoothing=0.1),
             "hinge": dict(beta=0.3)}
ATOL = 1e-4


def _quiet_trl():
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("trl", "transformers", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets

    datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def env(tokenizer_path, corpus_tokenizer, tmp_path_factory):
    """Policy / reference models (JAX and HF), their HF tokenizer, and the rendered test pairs."""
    import torch
    import transformers

    _quiet_trl()
    policy, reference = mj.Transformer(CFG, rngs=nnx.Rngs(0)), mj.Transformer(CFG, rngs=nnx.Rngs(1))
    root = tmp_path_factory.mktemp("pref")
    pol_dir = mj.save_hf(policy, root / "policy", tokenizer=tokenizer_path)
    ref_dir = mj.save_hf(reference, root / "reference")

    def hf(d):
        return transformers.AutoModelForCausalLM.from_pretrained(str(d), attn_implementation="eager",
                                                                 dtype=torch.float32).eval()

    rendered = [dp.render_pair(dp.to_pair(r, i), corpus_tokenizer, i) for i, r in enumerate(RECORDS)]
    batch = next(dp.PreferenceBatches(RECORDS, corpus_tokenizer, SEQ, len(RECORDS), shuffle=False, loop=False))
    return dict(policy=policy, reference=reference, hf=hf, pol_dir=pol_dir, ref_dir=ref_dir, root=root,
                hf_tok=transformers.AutoTokenizer.from_pretrained(str(pol_dir)), rendered=rendered, batch=batch,
                tok=corpus_tokenizer)


def _dummy_dataset():
    import datasets

    return datasets.Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])


@pytest.fixture(scope="module")
def trl_dpo(env):
    """TRL's DPOTrainer on the exported policy and reference (built offline; its dataset is a placeholder)."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(env["root"] / "dpo"), report_to="none", use_cpu=True, bf16=False,
                     max_length=None)
    return DPOTrainer(model=env["hf"](env["pol_dir"]), ref_model=env["hf"](env["ref_dir"]), args=args,
                      train_dataset=_dummy_dataset(), processing_class=env["hf_tok"])


def _trl_dpo_metrics(trainer, rendered, loss_type, beta, label_smoothing=0.0):
    import torch

    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.beta, trainer.label_smoothing = beta, label_smoothing
    trainer._metrics["eval"].clear()
    examples = [dict(prompt_ids=r.prompt_ids, chosen_ids=r.chosen_ids, rejected_ids=r.rejected_ids) for r in rendered]
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, trainer.data_collator(examples), return_outputs=False)
    out = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    out["loss"] = float(loss)
    return out


@pytest.fixture(scope="module")
def ours_dpo(env):
    """Our metrics for every DPO case in one compile, the reference given as an apply function."""
    pol, ref = tp.model_apply(env["policy"]), tp.model_apply(env["reference"])

    @jax.jit
    def run(batch):
        out = {name: tp.loss_fn(pol, batch, tp.PreferenceConfig(loss_type=name, **kw), reference=ref)[1]
               for name, kw in DPO_CASES.items()}
        terms = tp.pair_terms(pol, batch, tp.PreferenceConfig(), reference=ref)
        return out, {k: terms[k] for k in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards",
                                           "losses")}

    return jax.device_get(run(env["batch"]))


@pytest.mark.parametrize("loss_type", list(DPO_CASES))
@pytest.mark.oracle
def test_dpo_equals_trl(env, trl_dpo, ours_dpo, loss_type):
    """Loss, rewards, reward accuracy / margin, log-probs and mean logits equal DPOTrainer's on the same ids."""
    theirs = _trl_dpo_metrics(trl_dpo, env["rendered"], loss_type, **DPO_CASES[loss_type])
    ours = ours_dpo[0][loss_type]
    names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "logits/chosen", "logits/rejected"]
    for name in names:
        np.testing.assert_allclose(float(ours[name]), theirs[name], atol=ATOL, rtol=1e-6, err_msg=name)
    assert float(ours["pairs"]) == len(RECORDS)
    assert abs(theirs["rewards/chosen"]) > 1e-2 and abs(theirs["rewards/margins"]) > 1e-2  # the models differ


@pytest.mark.oracle
def test_dpo_per_pair_equals_trl(env, trl_dpo, ours_dpo):
    """Pair by pair (TRL on one pair at a time): log-probs, rewards and the sigmoid loss."""
    per = ours_dpo[1]
    for i, r in enumerate(env["rendered"]):
        theirs = _trl_dpo_metrics(trl_dpo, [r], "sigmoid", **DPO_CASES["sigmoid"])
        for ours_key, name in (("chosen_logps", "logps/chosen"), ("rejected_logps", "logps/rejected"),
                               ("chosen_rewards", "rewards/chosen"), ("rejected_rewards", "rewards/rejected"),
                               ("losses", "loss")):
            np.testing.assert_allclose(per[ours_key][i, 0], theirs[name], atol=ATOL, rtol=1e-6,
                                       err_msg=f"pair {i} {name}")


@pytest.mark.oracle
def test_orpo_equals_trl(env):
    """ORPO with TRL's NLL over prompt + answer equals ORPOTrainer.get_batch_loss_metrics on the same ids."""
    import torch
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    beta = 0.25
    args = ORPOConfig(output_dir=str(env["root"] / "orpo"), report_to="none", use_cpu=True, bf16=False, beta=beta,
                      max_length=SEQ + 1, remove_unused_columns=False)
    trainer = ORPOTrainer(model=env["hf"](env["pol_dir"]), args=args, train_dataset=_dummy_dataset(),
                          processing_class=env["hf_tok"])
    rows = []
    for r in env["rendered"]:  # ORPOTrainer.tokenize_row's layout: prompt + answer ids, labels -100 on the prompt
        row = dict(prompt_input_ids=r.prompt_ids, prompt_attention_mask=[1] * len(r.prompt_ids))
        for side, ans in (("chosen", r.chosen_ids), ("rejected", r.rejected_ids)):
            row[f"{side}_input_ids"] = r.prompt_ids + ans
            row[f"{side}_attention_mask"] = [1] * (len(r.prompt_ids) + len(ans))
            row[f"{side}_labels"] = [-100] * len(r.prompt_ids) + ans
        rows.append(row)
    with torch.no_grad():
        loss, theirs = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(rows), "train")
    cfg = tp.PreferenceConfig(objective="orpo", beta=beta, orpo_nll_on_prompt=True)
    loss_ours, ours = jax.jit(lambda b: tp.loss_fn(tp.model_apply(env["policy"]), b, cfg))(env["batch"])
    np.testing.assert_allclose(float(loss_ours), float(loss), atol=ATOL, rtol=1e-6, err_msg="loss")
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        np.testing.assert_allclose(float(ours[name]), theirs[name], atol=ATOL, rtol=1e-6, err_msg=name)


@pytest.mark.oracle
def test_prompt_tokens_carry_no_loss(env):
    """Weights are 1 exactly on the answer ids and their </s>; logits at prompt and padding positions cannot move
    the DPO or (default) ORPO loss, while TRL-style ORPO (NLL on the prompt too) does see them."""
    b, tok = env["batch"], env["tok"]
    for i, r in enumerate(env["rendered"]):
        for s, ans in enumerate((r.chosen_ids, r.rejected_ids)):
            w, tgt = b["weights"][i, s], b["targets"][i, s]
            idx = np.flatnonzero(w)
            n_prompt = len(r.prompt_ids)
            assert list(idx) == list(range(n_prompt - 1, n_prompt - 1 + len(ans))), (i, s)  # targets = ids[1:]
            assert list(tgt[idx]) == ans and ans[-1] == tok.eos_id
    logits = jax.random.normal(jax.random.key(0), (*b["tokens"].shape, CFG.vocab_size))  # [B, 2, T, V]
    noise = jax.random.normal(jax.random.key(1), logits.shape) * 5.0
    off_answer = (jnp.asarray(b["weights"]) == 0)[..., None]

    def const_apply(x):
        return lambda tokens, positions, segment_ids: x.reshape(tokens.shape[0], tokens.shape[1], -1)

    ref = jnp.zeros(b["tokens"].shape[:2] + (1,))
    for cfg in (tp.PreferenceConfig(), tp.PreferenceConfig(objective="orpo"),
                tp.PreferenceConfig(objective="orpo", orpo_nll_on_prompt=True)):
        a = tp.loss_fn(const_apply(logits), b, cfg, reference=ref)[0]
        moved = tp.loss_fn(const_apply(jnp.where(off_answer, logits + noise, logits)), b, cfg, reference=ref)[0]
        if cfg.orpo_nll_on_prompt:
            assert abs(float(a) - float(moved)) > 1e-3  # the check can see prompt-position changes
        else:
            assert float(a) == float(moved), cfg


@pytest.mark.oracle
def test_packing_and_dropping(env):
    """Several pairs per row give the same per-pair log-probs as one pair per row; a pair that does not fit is
    dropped and counted, never cut."""
    apply = jax.jit(lambda batch: tp.sequence_logps(tp.model_apply(env["policy"]), batch))
    one = env["batch"]
    packed_it = dp.PreferenceBatches(RECORDS, env["tok"], 2 * SEQ, 4, pairs_per_row=3, shuffle=False, loop=False)
    packed = next(packed_it)
    assert packed["tokens"].shape == (4, 2, 2 * SEQ) and packed["pair_mask"].shape == (4, 3)
    assert packed["pair_mask"].sum() == len(RECORDS) and packed["pair_mask"][:, 1].sum() >= 1  # really packed
    lp_one = np.asarray(apply(one))[:, :, 0]  # [B, 2]
    lp_packed = np.asarray(apply(packed))
    got = np.stack([lp_packed[b, :, k] for b in range(4) for k in range(3) if packed["pair_mask"][b, k]])
    np.testing.assert_allclose(got, lp_one, atol=1e-4, rtol=1e-6)

    lengths = [max(len(r.sequence(0)[0]), len(r.sequence(1)[0])) - 1 for r in env["rendered"]]
    limit = sorted(lengths)[1]  # the two longest of the four pairs do not fit
    it = dp.PreferenceBatches(RECORDS, env["tok"], limit, 4, shuffle=False, loop=False)
    batch = next(it)
    assert it.stats.pairs == 4 and it.stats.dropped == sum(n > limit for n in lengths) == 2
    assert batch["pair_mask"].sum() == 2
    for b in range(2):  # the kept pairs are whole: each side ends with </s> as its last weighted target
        for s in range(2):
            last = np.flatnonzero(batch["weights"][b, s])[-1]
            assert batch["targets"][b, s, last] == env["tok"].eos_id


def test_record_layouts_and_errors(tmp_path, monkeypatch):
    """Every accepted layout normalises to the same pair; bad records name the record and the fix; hub streaming
    offline fails with a clear message."""
    want = dp.Pair([{"role": "user", "content": "Q?"}], "Yes.", "No.")
    layouts = [
        {"prompt": "Q?", "chosen": "Yes.", "rejected": "No."},
        {"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "Yes."}],
         "rejected": [{"role": "assistant", "content": "No."}]},
        {"prompt": "Q?", "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Yes."}],
         "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "No."}],
         "score_chosen": 8.0, "score_rejected": 2.0},
        {"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Yes."}],
         "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "No."}]},
    ]
    assert all(dp.to_pair(r) == want for r in layouts)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in layouts))
    assert [dp.to_pair(r) for r in dp.load_records(str(path))] == [want] * 4
    (tmp_path / "p.json").write_text(json.dumps(layouts))
    assert len(list(dp.load_records(str(tmp_path / "p.json")))) == 4
    with pytest.raises(ValueError, match="record 3.*'chosen' and 'rejected'"):
        dp.to_pair({"prompt": "Q?", "chosen": "Yes."}, 3)
    with pytest.raises(ValueError, match="one assistant answer"):
        dp.to_pair({"prompt": "Q?", "chosen": [{"role": "user", "content": "Q?"}], "rejected": "No."})
    with pytest.raises(FileNotFoundError, match="Fix"):
        list(dp.load_records(str(tmp_path / "missing.jsonl")))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="cannot stream the hub dataset.*Fix"):
        next(dp.load_records("HuggingFaceH4/ultrafeedback_binarized", "train_prefs"))
    with pytest.raises(ValueError, match="label_smoothing"):
        tp.PreferenceConfig(loss_type="sigmoid", label_smoothing=0.1)  # TRL's sigmoid ignores it: say so


@pytest.mark.slow
def test_lora_reference_is_the_base_model(env, ours_dpo):
    """With LoRA the reference needs no second model: the adapters zeroed (``disabled_adapters``) give the base
    model's log-probs, while trained (non-zero) adapters do not."""
    batch = env["batch"]
    base = np.stack([ours_dpo[1]["chosen_logps"], ours_dpo[1]["rejected_logps"]], axis=1)  # the policy's [B, 2, P]
    model = mj.apply_lora(nnx.clone(env["policy"]), 4, 8.0, seed=1)
    graphdef, adapters, frozen = nnx.split(model, nnx.Param, ...)
    trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), adapters)

    @jax.jit
    def logps(p, b):
        return tp.sequence_logps(tp.model_apply(nnx.merge(graphdef, p, frozen)), b)

    # the same weights (W + scale * 0 @ 0 == W); another compiled program, so equal up to float32 rounding
    np.testing.assert_allclose(np.asarray(logps(tp.disabled_adapters(trained), batch)), np.asarray(base), atol=ATOL,
                               rtol=1e-6)
    assert np.abs(np.asarray(logps(trained, batch)) - np.asarray(base)).max() > 1e-2


@pytest.mark.slow
def test_dpo_training_raises_heldout_preference_accuracy(corpus_tokenizer):
    """A short seeded DPO run on the bundled set (reference = the initial weights), a plain optax loop over
    ``loss_fn``: held-out preference accuracy rises above its start (with and without the reference), the held-out
    margin turns positive, the loss falls, and the reference log-probs never change."""
    model = mj.Transformer(CFG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    ref_params = jax.tree.map(jnp.copy, params)
    cfg = tp.PreferenceConfig(beta=0.1)

    def apply_of(p):
        return tp.model_apply(nnx.merge(graphdef, p))

    opt = optax.adam(3e-3)

    @jax.jit
    def step(p, opt_state, batch):
        ref = tp.sequence_logps(apply_of(ref_params), batch)  # once per batch, outside the gradient
        (_, metrics), grads = jax.value_and_grad(
            lambda q: tp.loss_fn(apply_of(q), batch, cfg, reference=ref), has_aux=True)(p)
        updates, opt_state = opt.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, metrics

    @jax.jit
    def evaluate(p, batch):
        ref = tp.sequence_logps(apply_of(ref_params), batch)
        metrics = tp.eval_metrics(apply_of(p), batch, cfg, reference=ref)
        t = tp.pair_terms(apply_of(p), batch, cfg, reference=ref)  # the policy alone: log p(chosen) > log p(rejected)
        metrics["policy_accuracy"] = jnp.sum((t["chosen_logps"] > t["rejected_logps"]) * t["mask"]) / t["mask"].sum()
        return metrics, ref

    train = dp.PreferenceBatches(dp.load_records("bundled", "train"), corpus_tokenizer, TRAIN_SEQ, 16, seed=0)
    val = next(dp.PreferenceBatches(dp.load_records("bundled", "validation"), corpus_tokenizer, TRAIN_SEQ, 48,
                                    shuffle=False, loop=False))
    assert train.batches_per_epoch() == 13 and val["pair_mask"].sum() == 48
    start, ref_start = jax.device_get(evaluate(params, val))
    opt_state = opt.init(params)
    for _ in range(20):
        params, opt_state, metrics = step(params, opt_state, next(train))
    end, ref_end = jax.device_get(evaluate(params, val))
    assert train.stats.dropped == 0
    assert np.array_equal(ref_start, ref_end)  # the reference is frozen
    assert float(start["rewards/accuracies"]) == 0.0  # policy == reference: no pair is preferred yet
    assert float(end["rewards/accuracies"]) > float(start["rewards/accuracies"])
    assert float(end["rewards/accuracies"]) >= 0.75, end  # 0.85 when written
    # Without the reference too: the policy itself now ranks more held-out chosen answers first (0.125 -> 0.69).
    assert float(end["policy_accuracy"]) > float(start["policy_accuracy"]) + 0.25, (start, end)
    assert float(end["rewards/margins"]) > 0 and float(end["loss"]) < float(start["loss"]), (start, end)
