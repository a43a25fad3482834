"""Preference tuning as a recipe of the trainer: ``data.format = "preference"`` through ``train.py``'s loop, the generic
train step with the recipe's DPO objective (reference frozen: a copy of the initial weights, or adapters off), resume,
and the AOT program."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import tiny_dpo
from mistral_jax import aot
from mistral_jax.training import recipe as recipe_lib
from mistral_jax.training import run as run_lib
from mistral_jax.training import step as step_lib
from mistral_jax.training.metrics import read_metrics
from mistral_jax.training.optimizer import make_optimizer

TRL_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")
SEQ = 72  # the bundled set's longest pair needs 65 positions with the corpus tokenizer


@pytest.fixture(scope="module")
def init_run(tiny_trained_run):
    """The tiny trained init (conftest's shared run, read-only): the model DPO tunes and its frozen reference."""
    return tiny_trained_run


def _dpo_config(init_from, **overrides):
    c = tiny_dpo.get_config()
    c.init_from = str(init_from)
    c.update_from_flattened_dict({"data.seq_len": SEQ, "progress_bar": False, "checkpoint.async_save": False,
                                  **overrides})
    return c


def test_dpo_recipe_is_chosen_from_the_config():
    c = _dpo_config("/nowhere")
    r = recipe_lib.choose(c)  # reads nothing
    assert (r.data.name, r.objective.reference, r.objective.keeps_initial) == ("preference", "initial", True)
    assert r.name == "DPO preference tuning (sigmoid, beta 0.1) from /nowhere, every weight trains"
    c.lora.rank = 4
    r = recipe_lib.choose(c)
    assert (r.objective.reference, r.objective.keeps_initial) == ("adapters_off", False)  # no second copy
    c.init_from = ""
    with pytest.raises(recipe_lib.ConfigError, match=r"objective='dpo'.*init_from is ''.*Fix: pass --config.init_from"):
        recipe_lib.choose(c)
    c.preference.objective = "orpo"  # ORPO needs no reference: a fresh init is fine
    r = recipe_lib.choose(c)
    assert (r.objective.reference, r.objective.keeps_initial) == ("none", False)
    c.preference.loss_type = "nope"
    with pytest.raises(recipe_lib.ConfigError, match=r"config.preference: .*loss_type 'nope'"):
        recipe_lib.choose(c)


def _state(run):
    """The train state of a resolved run at step 0, and the jitted step of its objective."""
    recipe, mesh, rules = run.recipe, run.mesh, run.rules
    tx, schedule = make_optimizer(run.cfg.optimizer, run.cfg.num_steps)
    keep = recipe.objective.keeps_initial
    graphdef, _, shardings = step_lib.state_layout(recipe.abstract_model(run.model_cfg), tx, mesh, rules,
                                                   recipe.trainable, keep_initial=keep)
    state = step_lib.init_state(recipe.init_model(run.model_cfg, mesh, rules), tx, shardings, mesh, rules,
                                recipe.trainable, keep_initial=keep)
    fn = step_lib.jit_train_step(graphdef, tx, shardings, mesh, rules, schedule=schedule, objective=recipe.objective,
                                 grad_accum_steps=run.cfg.grad_accum_steps)
    return graphdef, state, fn


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 4], ids=["full", "lora"])
def test_reference_and_frozen_weights_never_change(init_run, corpus_tokenizer, rank):
    """Three DPO steps of the generic train step: the reference log-probs of a fixed batch are bit-identical before
    and after, every frozen weight (the reference copy; with LoRA the base) is bit-identical, the trained ones move."""
    cfg = _dpo_config(init_run, **{"lora.rank": rank, "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 1})
    run = run_lib.resolve(cfg)
    graphdef, state, fn = _state(run)
    objective = run.recipe.objective
    if rank:
        assert "initial" not in state["frozen"] and jax.tree.leaves(state["frozen"])  # the base, once
    else:
        assert set(state["frozen"]) == {"model", "initial"} and state["frozen"]["model"] == {}
    frozen0 = jax.tree.map(np.asarray, state["frozen"])
    params0 = jax.tree.map(np.asarray, state["params"])
    data = run.recipe.batches("train", corpus_tokenizer, cfg.batch_size, train=True, bsharding=None)
    shardings = step_lib.batch_shardings(objective, run.mesh, run.rules)
    batches = [{k: jax.device_put(v, shardings[k]) for k, v in next(data).items()} for _ in range(3)]
    ref_fn = jax.jit(lambda p, f, b: objective.prepare(graphdef, p, f, b))
    from mistral_jax import sharding

    with sharding.use_mesh(run.mesh, run.rules):
        ref0 = np.asarray(ref_fn(state["params"], state["frozen"], batches[0]))
        metrics = []
        for b in batches:
            state, m = fn(state, b)
            metrics.append(jax.device_get(m))
        ref1 = np.asarray(ref_fn(state["params"], state["frozen"], batches[0]))
    np.testing.assert_array_equal(ref0, ref1)  # the reference log-probs do not change
    for a, b in zip(jax.tree.leaves(state["frozen"]), jax.tree.leaves(frozen0), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)  # every frozen weight is bit-identical
    moved = [not np.array_equal(np.asarray(a), b) for a, b in
             zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params0), strict=True)]
    assert all(moved) if not rank else any(moved)  # LoRA: A starts random, B at zero; both move after 3 steps
    assert float(metrics[0]["rewards/accuracies"]) == 0.0 and float(metrics[0]["rewards/margins"]) == 0.0  # = ref
    assert all(int(m["nonfinite"]) == 0 for m in metrics)
    assert float(metrics[-1]["rewards/margins"]) != 0.0


@pytest.mark.slow
def test_dpo_run_logs_trl_metrics_and_raises_heldout_accuracy(init_run, tmp_path):
    """train.py's loop on the bundled set: TRL's metric names every log step, and the held-out preference accuracy
    (eval/rewards/accuracies) rises above its starting value (the same eval of a run with learning rate 0)."""
    from mistral_jax.training import trainer

    cfg = _dpo_config(init_run, **{"num_steps": 20, "log_every": 5, "eval_every": 0, "optimizer.learning_rate": 3e-3,
                                   "checkpoint.every_steps": 20})
    result = trainer.train(cfg, str(tmp_path / "dpo"))
    assert result["status"] == "done" and result["step"] == 20
    records = read_metrics(str(tmp_path / "dpo"))
    logged = [r for r in records if "rewards/accuracies" in r]
    assert [r["step"] for r in logged] == [5, 10, 15, 20]
    for r in logged:
        assert set(TRL_METRICS) <= set(r), sorted(r)
    assert logged[-1]["rewards/margins"] > 0 and logged[-1]["loss"] < np.log(2)  # training pairs: learnt
    end = result["eval"]
    assert set(f"eval/{k}" for k in TRL_METRICS) <= set(end) and end["eval/pairs"] == 48

    start = trainer.train(_dpo_config(init_run, **{"num_steps": 1, "optimizer.learning_rate": 0.0}),
                          str(tmp_path / "lr0"))["eval"]
    assert start["eval/rewards/accuracies"] == 0.0  # policy == reference: no pair preferred yet
    assert end["eval/rewards/accuracies"] > start["eval/rewards/accuracies"] + 0.5, (start, end)
    assert end["eval/rewards/margins"] > 0, end


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 4], ids=["full", "lora"])
def test_dpo_run_resumes_exactly(init_run, tmp_path, rank):
    """Checkpoints hold the trained weights only; a resumed run rebuilds the frozen reference (full: the copy of
    init_from; LoRA: the base) and continues as the uninterrupted run."""
    from mistral_jax.training import trainer

    cfg = _dpo_config(init_run, **{"num_steps": 4, "log_every": 1, "eval_every": 0, "checkpoint.every_steps": 2,
                                   "data.validation": "", "lora.rank": rank, "optimizer.learning_rate": 3e-3,
                                   "optimizer.warmup_steps": 1})
    ref = str(tmp_path / "ref")
    assert trainer.train(cfg, ref)["step"] == 4
    resumed = str(tmp_path / "resumed")
    shutil.copytree(ref, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
    with open(os.path.join(resumed, "metrics.jsonl")) as f:
        kept = [line for line in f if json.loads(line).get("step", 0) <= 2]
    with open(os.path.join(resumed, "metrics.jsonl"), "w") as f:
        f.writelines(kept)
    assert trainer.train(cfg, resumed)["step"] == 4

    def metrics(w):
        return {r["step"]: r for r in read_metrics(w) if "loss" in r}

    for s in (3, 4):
        for k in ("loss", "rewards/margins", "logps/chosen"):
            np.testing.assert_allclose(metrics(resumed)[s][k], metrics(ref)[s][k], rtol=1e-6, atol=1e-7)
    assert metrics(ref)[4]["rewards/margins"] != 0.0


@pytest.mark.slow
def test_aot_compiles_the_dpo_program():
    """The AOT tool compiles the preference step of the recipe: full DPO holds the reference copy in the frozen
    state (as large as the params); with LoRA the frozen base is the only copy of the model (8 CPU devices)."""
    def report(**overrides):
        cfg = tiny_dpo.get_config()
        cfg.update_from_flattened_dict({"init_from": "/nowhere", "data.seq_len": 32, "batch_size": 8, **overrides})
        return aot.compile_train_step(cfg, jax.devices())

    full, lora = report(), report(**{"lora.rank": 4})
    assert full["recipe"].startswith("DPO preference tuning") and full["frozen_params"] == full["trainable_params"]
    assert full["state"]["frozen"] == full["state"]["params"]
    assert lora["frozen_params"] == full["trainable_params"] and lora["trainable_params"] < full["trainable_params"]
    assert lora["state"]["opt_state"] < full["state"]["opt_state"] and lora["total"] < full["total"]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["orpo", "dpo"])
def test_batches_with_empty_rows_give_finite_losses(corpus_tokenizer, objective):
    """The last batch of an epoch is padded with empty rows (no pair, no answer tokens): they carry no loss, and
    neither the loss nor its gradient turns NaN (ORPO's log(1 - p) of an empty answer would be log 0)."""
    import jax.numpy as jnp
    from flax import nnx

    import mistral_jax as mj
    from mistral_jax.data import preference as dp
    from mistral_jax.training import preference as tp

    data = dp.PreferenceBatches(dp.load_records("bundled", "train"), corpus_tokenizer, SEQ, 16, shuffle=False)
    last = [next(data) for _ in range(data.batches_per_epoch())][-1]
    assert 0 < last["pair_mask"].sum() < 16  # real pairs and empty rows
    graphdef, params = nnx.split(mj.Transformer(mj.ModelConfig.tiny(), rngs=nnx.Rngs(0)), nnx.Param)
    cfg = tp.PreferenceConfig(objective=objective)
    ref = tp.sequence_logps(tp.model_apply(nnx.merge(graphdef, params)), last) - 1.0 if objective == "dpo" else None
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: tp.loss_fn(tp.model_apply(nnx.merge(graphdef, p)), last, cfg, reference=ref), has_aux=True)(params)
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in metrics.values())
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(metrics["pairs"]) == float(last["pair_mask"].sum())


@pytest.mark.slow
def test_grad_accumulation_changes_memory_not_the_step(init_run, corpus_tokenizer):
    """Micro-batches are weighted by their real pairs: two micro-batches give the one-batch step (up to rounding),
    also on the half-empty last batch of an epoch."""
    out = {}
    for acc in (1, 2):
        run = run_lib.resolve(_dpo_config(init_run, **{"grad_accum_steps": acc, "optimizer.warmup_steps": 0}))
        graphdef, state, fn = _state(run)
        data = run.recipe.batches("train", corpus_tokenizer, 16, train=True, bsharding=None)
        batches = [next(data) for _ in range(data.batches_per_epoch())]
        bsh = step_lib.batch_shardings(run.recipe.objective, run.mesh, run.rules)
        from mistral_jax import sharding

        with sharding.use_mesh(run.mesh, run.rules):
            for b in (batches[0], batches[-1]):
                state, m = fn(state, {k: jax.device_put(v, bsh[k]) for k, v in b.items()})
        out[acc] = jax.device_get(m), jax.tree.map(np.asarray, state["params"])
    (m1, p1), (m2, p2) = out[1], out[2]
    assert float(m1["pairs"]) == float(m2["pairs"]) < 16
    for k in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "grad_norm"):
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)  # Adam divides by sqrt(v): rounding grows a little


@pytest.mark.heavy  # trains or compiles end to end: fast tier, not light
def test_the_dpo_step_never_holds_the_pair_logits():
    """The compiled full-DPO train step (policy, frozen reference, gradient) at V = 32k needs fewer temporary bytes
    than one float32 ``[B, 2, T, V]`` logits tensor: sequence log-probs are computed over chunks of positions
    (``training.loss.chunked_token_logps``), never from the whole logits (the code before kept several such
    tensors, ~2.2x its size; ``benchmarks/preference_memory.py`` measures both)."""
    from flax import nnx

    import mistral_jax as mj
    from mistral_jax import sharding
    from mistral_jax.training import preference as tp

    b, t, v = 2, 1024, 32768
    cfg = mj.ModelConfig.tiny(vocab_size=v, max_seq_len=t, platform="cpu")  # loss_chunk_size 0: PREFERENCE_CHUNK
    mesh, rules = sharding.make_mesh(fsdp=1, devices=jax.devices()[:1]), sharding.DEFAULT_RULES
    c = tiny_dpo.get_config()
    tx, schedule = make_optimizer(c.optimizer, c.num_steps)
    objective = tp.PreferenceObjective(config=tp.PreferenceConfig(), reference="initial")
    graphdef, abstract, shardings = step_lib.state_layout(nnx.eval_shape(lambda: mj.Transformer(cfg, rngs=nnx.Rngs(0))),
                                                          tx, mesh, rules, keep_initial=True)
    with sharding.use_mesh(mesh, rules):
        fn = step_lib.jit_train_step(graphdef, tx, shardings, mesh, rules, schedule=schedule, objective=objective)
        compiled = fn.lower(abstract, step_lib.abstract_batch(b, t, mesh, rules, objective)).compile()
    temp, logits = compiled.memory_analysis().temp_size_in_bytes, 4 * b * 2 * t * v
    assert temp < logits / 2, (temp, logits)
