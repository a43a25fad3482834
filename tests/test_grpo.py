"""The GRPO recipe (``training/rl.py``, ``training.recipe.GRPO``): rollouts from the live weights by the decoding core,
rewards, bad input before training, a reward failing mid-run, resume after SIGTERM.

The loss math against TRL is ``tests/test_grpo_loss.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import signal_when, train_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALLS = {"n": 0, "fail_at": -1}


# reward functions the configs below name by import path ("tests.test_grpo:length_reward")
def length_reward(prompt, completion, example):
    """Varied rewards from any model: the completion's length in characters / 100."""
    return len(completion) / 100.0


def word_reward(prompt, completion, example):
    return float(completion.count(" ") % 3)


def text_reward(prompt, completion, example):
    return "good"


def raising_reward(prompt, completion, example):
    raise KeyError("no such field")


def counting_reward(prompt, completion, example):
    """Raises on its ``CALLS["fail_at"]``-th call (an error in the middle of a run)."""
    CALLS["n"] += 1
    if CALLS["n"] == CALLS["fail_at"]:
        raise ZeroDivisionError("division by zero")
    return 1.0 if "####" in completion else 0.0


def _config(init_from, **overrides):
    from configs import tiny_grpo

    c = tiny_grpo.get_config()
    c.update_from_flattened_dict({
        "init_from": init_from, "num_steps": 3, "batch_size": 8, "grpo.num_generations": 4,
        "grpo.max_completion_length": 8, "grpo.rewards": "tests.test_grpo:length_reward,tests.test_grpo:word_reward",
        "grpo.eval_prompts": 8, "data.seq_len": 96, "eval_every": 0, "checkpoint.every_steps": 100,
        "checkpoint.async_save": False, "progress_bar": False, "optimizer.learning_rate": 1e-3,
        "optimizer.warmup_steps": 0, **overrides})
    return c


def _check(cfg):
    from mistral_jax.training import run

    run.validate_config(cfg)
    run.check_data(cfg)


@pytest.mark.parametrize("overrides,match", [
    ({"grpo.rewards": "tests.no_such_module:fn"}, r"config.grpo.rewards: .*no_such_module"),
    ({"grpo.rewards": "tests.test_grpo:text_reward"}, r"reward 'text_reward' returned 'good' \(str\) on example 0"),
    ({"grpo.rewards": "tests.test_grpo:raising_reward"}, r"reward 'raising_reward' raised on example 0: KeyError"),
    ({"grpo.num_generations": 1, "batch_size": 8}, r"num_generations=1: .*G must be an integer >= 2"),
    ({"grpo.num_generations": 3}, r"batch_size=8 is not a multiple of config.grpo.num_generations=3"),
    ({"data.seq_len": 40}, r"train prompt 0 is \d+ tokens, more than the rollout budget data.seq_len \+ 1 - "
                           r"grpo.max_completion_length = 40 \+ 1 - 8 = 33"),
    ({"grpo.reward_weights": "1,2,3"}, r"has 3 weights for 2 reward functions"),
    ({"grpo.loss_type": "ppo"}, r"config.grpo: loss_type='ppo' is unknown"),
])
def test_bad_input_is_one_line_before_training(tiny_trained_run, overrides, match):
    from mistral_jax.config import ConfigError

    with pytest.raises(ConfigError, match=match) as e:
        _check(_config(tiny_trained_run, **overrides))
    assert "Fix:" in str(e.value) and "\n" not in str(e.value)


def test_completion_rows_and_seeds():
    from mistral_jax.training import rl

    b = rl.completion_batch([[1, 5, 6], [1, 7]], [[8, 9, 2], [3]], [[-0.5, -0.25, -0.125], [-1.0]], 6)
    np.testing.assert_array_equal(b["tokens"], [[1, 5, 6, 8, 9, 0], [1, 7, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b["targets"], [[5, 6, 8, 9, 2, 0], [7, 3, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b["weights"], [[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b["old_logps"], [[0, 0, -0.5, -0.25, -0.125, 0], [0, -1.0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 3, 4, 0])
    assert rl.step_seed(0, 5) == rl.step_seed(0, 5) != rl.step_seed(0, 6) != rl.step_seed(1, 6)
    # prompt batches: a permutation per epoch, full batches only, the position restores
    it = rl.PromptBatches(10, 4, seed=3, shuffle=True, loop=True)
    first = [next(it)["prompt_index"].tolist() for _ in range(4)]
    assert sorted(first[0] + first[1]) == sorted(set(first[0] + first[1])) and len(first[0]) == 4
    it2 = rl.PromptBatches(10, 4, seed=3, shuffle=True, loop=True)
    next(it2)
    state = it2.get_state()
    it3 = rl.PromptBatches(10, 4, seed=3, shuffle=True, loop=True)
    it3.set_state(state)
    assert [next(it3)["prompt_index"].tolist() for _ in range(3)] == first[1:]


@pytest.mark.heavy
def test_sampled_logprobs_are_the_policy_logprobs(tiny_trained_run):
    """The rollout keeps each sampled token's log-prob at the sampling temperature; the loss's forward recomputes
    the same numbers (so the first update's ratio is 1 up to rounding, and the old-policy ratio means what it says)."""
    import jax

    from mistral_jax import generate, load_pretrained
    from mistral_jax.data.tokenizer import Tokenizer
    from mistral_jax.training import grpo, rl

    model = load_pretrained(tiny_trained_run)
    tok = Tokenizer(os.path.join(tiny_trained_run, "tokenizer.model"))
    prompts = [tok.encode("The module"), tok.encode("Return a new list of")] * 2
    ids, lps = generate(model, prompts, max_new_tokens=12, temperature=0.7, seed=5, eos_id=tok.eos_id,
                        logprobs=0.7)
    raw_ids, raw = generate(model, prompts, max_new_tokens=12, temperature=0.7, seed=5, eos_id=tok.eos_id,
                            logprobs=True)
    assert ids == raw_ids
    batch = rl.completion_batch(prompts, ids, lps, 32)
    lp, ent, _ = jax.jit(lambda b: grpo.token_logps(model, b, 0.7, with_entropy=True))(batch)
    mask = batch["weights"] > 0
    np.testing.assert_allclose(np.asarray(lp)[mask], batch["old_logps"][mask], atol=2e-4)
    assert np.all(np.asarray(ent)[mask] > 0)
    flat_raw = np.concatenate([np.asarray(x) for x in raw])
    assert not np.allclose(flat_raw, batch["old_logps"][mask], atol=1e-2)  # temperature 0.7 != raw


@pytest.mark.heavy
@pytest.mark.parametrize("variant", ["grpo_beta", "rloo_lora"])
def test_grpo_run_logs_rewards_kl_and_the_time_split(tiny_trained_run, tmp_path, variant):
    from mistral_jax.training import trainer
    from mistral_jax.training.metrics import read_metrics

    over = ({"grpo.beta": 0.05, "grpo.temperature": 0.8} if variant == "grpo_beta" else
            {"grpo.loss_type": "rloo", "grpo.beta": 0.05, "lora.rank": 4, "optimizer.learning_rate": 1e-2})
    cfg = _config(tiny_trained_run, **{"eval_every": 3, "log_every": 1, **over})
    workdir = str(tmp_path / variant)
    out = trainer.train(cfg, workdir)
    assert out["status"] == "done" and out["step"] == 3
    rows = read_metrics(workdir)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        for k in ("reward", "reward_std", "rewards/length_reward/mean", "rewards/word_reward/std",
                  "completions/mean_length", "completions/clipped_ratio", "clip_ratio/region_mean", "entropy",
                  "rollout/tokens_per_sec", "train/tokens_per_sec", "rollout/seconds", "train/seconds"):
            assert k in r, (k, sorted(r))
        assert r["sequences"] == 8 and 0 < r["completions/mean_length"] <= 8
        assert r["reward_std"] > 0  # varied rewards: the advantages are not all 0
    if variant == "grpo_beta":  # KL to the frozen initial weights: 0 before the first update, > 0 after
        assert abs(steps[0]["kl"]) < 1e-5 and steps[2]["kl"] > 0
    held = [r for r in rows if "eval/reward" in r]
    assert held and held[-1]["eval/prompts"] == 8 and "eval/rewards/length_reward/mean" in held[-1]
    ends = [json.loads(line) for line in open(os.path.join(workdir, "events.jsonl")) if '"end"' in line]
    assert ends[-1]["rollout_s"] > 0  # rollouts are their own goodput category


@pytest.mark.heavy
def test_a_reward_failing_mid_run_names_the_example_and_saves(tiny_trained_run, tmp_path):
    from mistral_jax.training import trainer
    from mistral_jax.training.hooks import StopRun

    cfg = _config(tiny_trained_run, **{"grpo.rewards": "tests.test_grpo:counting_reward", "num_steps": 4})
    CALLS.update(n=0, fail_at=8 * 2 + 3)  # the third completion of step 3
    workdir = str(tmp_path / "run")
    with pytest.raises(StopRun, match=r"reward 'counting_reward' raised on example \d+: ZeroDivisionError.* step 2 is "
                                      r"saved"):
        trainer.train(cfg, workdir)
    assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == [2]
    CALLS.update(n=0, fail_at=-1)
    out = trainer.train(cfg, workdir)  # the same command resumes at step 2
    assert out["status"] == "done" and out["step"] == 4


def _cmd(workdir, init_from, steps):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/tiny_grpo.py"),
            f"--workdir={workdir}", f"--config.init_from={init_from}", f"--config.num_steps={steps}",
            "--config.batch_size=8", "--config.grpo.num_generations=4", "--config.grpo.max_completion_length=8",
            "--config.grpo.rewards=tests.test_grpo:length_reward", "--config.data.seq_len=96",
            "--config.eval_every=0", "--config.log_every=1", "--config.checkpoint.every_steps=100",
            "--config.optimizer.learning_rate=1e-3", "--config.progress_bar=False"]


def _per_step(workdir):
    from mistral_jax.training.metrics import read_metrics

    return {r["step"]: (r["loss"], r["reward"], r["rewards/length_reward/mean"], r["completions/mean_length"])
            for r in read_metrics(workdir) if "loss" in r}


@pytest.mark.slow
def test_sigterm_then_the_same_command_repeats_rewards_and_losses(tiny_trained_run, tmp_path):
    steps = 8
    ref = str(tmp_path / "ref")
    done = subprocess.run(_cmd(ref, tiny_trained_run, steps), env=train_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    work = str(tmp_path / "run")
    rc, out = signal_when(_cmd(work, tiny_trained_run, steps), lambda: os.path.exists(
        os.path.join(work, "metrics.jsonl")) and len(_per_step(work)) >= 3)
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    killed_at = max(_per_step(work))
    assert 3 <= killed_at < steps
    again = subprocess.run(_cmd(work, tiny_trained_run, steps), env=train_env(), cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _per_step(work) == _per_step(ref)  # the same rollouts, rewards and losses, step by step


@pytest.mark.heavy
def test_cli_bad_reward_exits_2_with_one_line(tiny_trained_run, tmp_path):
    cmd = _cmd(str(tmp_path / "bad"), tiny_trained_run, 2) + ["--config.grpo.rewards=tests.test_grpo:nothing_here"]
    proc = subprocess.run(cmd, env=train_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "nothing_here" in lines[0] and "Fix:" in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")


@pytest.mark.slow
def test_aot_reports_the_rollout_with_the_train_state_resident():
    """The AOT tool compiles a GRPO run's train step and its rollout programs (decode loop, prefill chunk) for a TPU
    topology; each rollout program's memory adds what the train state keeps outside it (optimizer, reference)."""
    from mistral_jax import aot

    assert aot.libtpu_available(), "libtpu is missing. Fix: pip install -e '.[test]' (or '.[tpu]')"
    cfg = _config("", **{"grpo.beta": 0.0, "batch_size": 16, "data.seq_len": 64,
                         "model.dtype": "bfloat16"})
    topo = aot.parse_topology("v5p-8")
    r = aot.compile_train_step(cfg, aot.topology_devices(topo))
    assert set(r["programs"]) == {"rollout decode", "rollout prefill"}
    tiny = r["programs"]["rollout decode"]
    # the cache: L x B rows x slots (the window, 16) x kv heads x head_dim, k and v, bfloat16, rows over 4 chips
    assert tiny["parts"]["kv_cache"] == 2 * 16 * 16 * 2 * 16 * 2 * 2 // 4
    assert tiny["parts"]["reference"] == 0 and tiny["parts"]["optimizer"] == r["state"]["opt_state"]
    assert tiny["with_state"] == tiny["total"] + tiny["resident"] and tiny["arguments"] >= r["state"]["params"]
    # with beta > 0 the frozen reference copy is resident during rollouts too
    cfg.init_from, cfg.grpo.beta = "/nonexistent/checkpoint", 0.04
    r2 = aot.compile_train_step(cfg, aot.topology_devices(topo))
    ref = r2["programs"]["rollout prefill"]["parts"]["reference"]
    assert ref == r2["state"]["params"] > 0 and r2["programs"]["rollout prefill"]["resident"] == ref + \
        r2["state"]["opt_state"]
    text = aot.format_report({**r2, "hbm": topo.hbm_bytes, "fits": True}, "tiny grpo")
    assert "rollout decode: program" in text and "the run: FITS" in text


@pytest.mark.heavy
def test_several_steps_per_rollout_resume_mid_group(tiny_trained_run, tmp_path):
    """grpo.num_iterations = 2: two optimizer steps per rollout (the second one's ratio is no longer 1, so some
    tokens clip); a run stopped after the first step of a group resumes on the same completions."""
    from mistral_jax.training import trainer

    over = {"grpo.num_iterations": 2, "optimizer.learning_rate": 3e-2, "log_every": 1, "num_steps": 4}
    ref = str(tmp_path / "ref")
    trainer.train(_config(tiny_trained_run, **over), ref)
    got = _per_step(ref)
    assert got[1][1:] == got[2][1:] and got[3][1:] == got[4][1:]  # one rollout per group: the same rewards
    assert got[2][1:] != got[3][1:]
    from mistral_jax.training.metrics import read_metrics

    clipped = {r["step"]: r["clip_ratio/region_mean"] for r in read_metrics(ref) if "loss" in r}
    assert clipped[1] == 0 and clipped[2] > 0  # the first step's ratio is 1; the second's has moved
    work = str(tmp_path / "run")
    trainer.train(_config(tiny_trained_run, **{**over, "num_steps": 3}), work)  # stops mid-group (step 3 of 4)
    meta = json.load(open(os.path.join(work, "checkpoints", "3", "meta", "metadata")))
    assert "rollout" in meta["recipe"]
    trainer.train(_config(tiny_trained_run, **over), work)
    assert _per_step(work) == got
