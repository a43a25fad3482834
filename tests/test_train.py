"""Training: the tiny model learns the bundled corpus; config errors before compiling; optimizer pieces;
gradient accumulation; non-finite steps; FLOPs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax import sharding
from mistral_jax.config import ModelConfig
from mistral_jax.training import step as step_lib
from mistral_jax.training import trainer
from mistral_jax.training.metrics import flops_per_token, mean_attended_keys, read_metrics
from mistral_jax.training.optimizer import decay_mask, make_optimizer, make_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    cfg = trainer.load_config_file(os.path.join(ROOT, "configs/tiny.py"))
    cfg.progress_bar = False
    cfg.update_from_flattened_dict(overrides)  # dotted keys: {"optimizer.learning_rate": 1e-3}
    return cfg


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("tiny"))
    cfg = tiny_config(num_steps=40, batch_size=8, log_every=5, eval_every=20, eval_steps=2,
                      **{"checkpoint.every_steps": 20, "optimizer.warmup_steps": 5})
    result = trainer.train(cfg, workdir)  # data.tokenizer == "": the run trains its own tokenizer
    return workdir, result


@pytest.mark.slow
def test_tiny_model_learns_the_bundled_corpus(tiny_run):
    workdir, result = tiny_run
    assert result["status"] == "done" and result["step"] == 40
    train = [r for r in read_metrics(workdir) if "loss" in r]
    first, last = train[0]["loss"], train[-1]["loss"]
    assert first > 5.5  # ~ln(512) = 6.24 at init
    assert last < first - 1.0, [r["loss"] for r in train]
    evals = [r for r in read_metrics(workdir) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [20, 40] and evals[-1]["eval/loss"] < first - 0.8
    for key in ("grad_norm", "learning_rate", "tokens_per_sec", "mfu", "ce_loss", "aux_loss", "z_loss"):
        assert np.isfinite(train[-1][key]), key
    assert train[-1]["tokens_per_sec"] > 0 and 0 < train[-1]["mfu"] < 1
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [20, 40]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))
    for name in ("tokenizer.model", "model_config.json", "run_config.json"):
        assert os.path.isfile(os.path.join(workdir, name)), name
    saved = ModelConfig.from_dict(json.load(open(os.path.join(workdir, "model_config.json"))))
    assert saved == ModelConfig.tiny(platform="cpu")  # the platform its backends were resolved for


@pytest.mark.slow
def test_finished_run_resumes_without_training_again(tiny_run):
    workdir, _ = tiny_run
    n = len(read_metrics(workdir))
    result = trainer.train(tiny_config(num_steps=40, batch_size=8), workdir)
    assert result["step"] == 40 and len(read_metrics(workdir)) == n


# --------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("change, match", [
    (dict(batch_size=12), r"config.batch_size=12 .*data-parallel size 8"),
    (dict(batch_size=16, grad_accum_steps=3), r"config.batch_size=16 is not divisible by config.grad_accum_steps=3"),
    ({"mesh.tensor": 3}, r"config.mesh: .*mesh.tensor=3.*8 devices are not divisible by 3"),
    ({"mesh.fsdp": 2}, r"mesh.fsdp=2.*multiply to 2 but there are 8 devices"),
    ({"mesh.data": -1}, r"only one axis may be -1"),
    ({"mesh.rules": "nope"}, r"config.mesh.rules='nope'"),
    ({"model.n_kv_heads": 3}, r"n_heads=4.*n_kv_heads=3"),
    ({"optimizer.schedule": "cosin"}, r"config.optimizer.schedule='cosin'"),
    ({"data.seq_len": 4096}, r"config.data.seq_len=4096"),
    (dict(nan_policy="ignore"), r"config.nan_policy='ignore'"),
])
def test_bad_config_fails_before_compiling(change, match, tmp_path):
    compiles = []  # every XLA compilation in this process reports its duration under this event
    listener = lambda event, secs, **kw: compiles.append(event) if event.endswith("backend_compile_duration") else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        cfg = tiny_config(**change)
        with pytest.raises(trainer.ConfigError, match=match):
            trainer.train(cfg, str(tmp_path / "w"))
        assert not os.path.exists(tmp_path / "w")  # nothing written
        assert compiles == []  # nothing compiled (not even an init program)
        jax.jit(lambda x: x * 3.0 + len(compiles))(np.float32(2))  # the counter works: a new program counts
        assert len(compiles) == 1
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_unknown_config_keys_are_named(tmp_path):
    cfg = tiny_config()
    cfg.unlock()
    cfg.optimizer.lr = 1.0
    with pytest.raises(trainer.ConfigError, match=r"config.optimizer.lr=1.0 .*known fields of config.optimizer"):
        trainer.validate_config(cfg)
    with pytest.raises(trainer.ConfigError, match=r"config.optimizer.lr \(value '3'\).*'lr'"):
        trainer.check_cli_overrides(["--config", os.path.join(ROOT, "configs/tiny.py"), "--config.optimizer.lr=3"])
    trainer.check_cli_overrides(["--config=configs/tiny.py", "--config.optimizer.learning_rate=3"])


@pytest.mark.slow
def test_train_py_reports_bad_config_cleanly(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    base = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/tiny.py"),
            f"--workdir={tmp_path}"]
    for extra, match in [("--config.optimizer.lr=1", "unknown config field config.optimizer.lr"),
                         ("--config.batch_size=12", "config.batch_size=12")]:
        proc = subprocess.run(base + [extra], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and match in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_model_overrides_and_presets():
    assert trainer.model_config_from({"preset": "tiny", "dim": 128, "sliding_window": 0}) == ModelConfig.tiny(
        dim=128, sliding_window=None)
    cfg = tiny_config(**{"model.preset": "tiny_mixtral", "model.router_z_loss_coef": 1e-3})
    assert trainer.validate_config(cfg).router_z_loss_coef == 1e-3
    assert trainer.validate_config(tiny_config(remat="full")).remat == "full"
    for name in ("mistral_7b", "mixtral_8x7b"):
        big = trainer.load_config_file(os.path.join(ROOT, f"configs/{name}.py"))
        m = trainer.validate_config(big, n_devices=64)  # v5p-128: where the README's AOT table shows them fit
        assert m.dtype == "bfloat16" and m.param_dtype == "float32" and m.remat == "full"
        assert (m.num_experts == 8) == (name == "mixtral_8x7b")


# --------------------------------------------------------------------------- optimizer
def test_schedule_warmup_cosine_linear_constant():
    cfg = tiny_config(**{"optimizer.learning_rate": 1.0, "optimizer.warmup_steps": 10, "optimizer.min_lr_ratio": 0.1})
    s = make_schedule(cfg.optimizer, 110)
    np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)], [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
    cfg.optimizer.schedule = "linear"
    np.testing.assert_allclose(make_schedule(cfg.optimizer, 110)(60), 0.55, atol=1e-6)
    np.testing.assert_allclose(make_schedule(cfg.optimizer, 110)(35), 0.775, atol=1e-6)
    cfg.optimizer.schedule = "constant"
    np.testing.assert_allclose(make_schedule(cfg.optimizer, 110)(100), 1.0)


def test_weight_decay_mask_and_its_effect():
    params = {"embed": jnp.ones((4, 2)), "norm": {"weight": jnp.ones((2,))},
              "layers": {"attention_norm": {"weight": jnp.ones((3, 2))}, "w": jnp.ones((2, 2))}}
    assert decay_mask(params) == {"embed": False, "norm": {"weight": False},
                                  "layers": {"attention_norm": {"weight": False}, "w": True}}
    assert all(jax.tree.leaves(decay_mask(params, decay_norms=True, decay_embeddings=True)))
    cfg = tiny_config(**{"optimizer.warmup_steps": 0, "optimizer.weight_decay": 0.5, "optimizer.grad_clip_norm": 0.0})
    tx, _ = make_optimizer(cfg.optimizer, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)  # zero gradients: only weight decay moves params
    assert float(jnp.abs(updates["layers"]["w"]).max()) > 0
    assert float(jnp.abs(updates["embed"]).max()) == 0 and float(jnp.abs(updates["norm"]["weight"]).max()) == 0


def test_grad_clip_limits_the_update():
    params = {"w": jnp.ones((3, 3))}
    big = {"w": jnp.full((3, 3), 100.0)}
    for clip, expect_ratio in ((1.0, 1.0 / 300.0), (0.0, 1.0)):
        cfg = tiny_config(**{"optimizer.grad_clip_norm": clip})
        tx, _ = make_optimizer(cfg.optimizer, 10)
        chain_state = tx.init(params)
        # optax.clip_by_global_norm runs first: check the gradient it forwards to Adam through the first moment.
        _, new_state = tx.update(big, chain_state, params)
        mu = jax.tree.leaves([s for s in jax.tree.leaves(new_state, is_leaf=lambda x: hasattr(x, "mu"))
                              if hasattr(s, "mu")][0].mu)[0]
        np.testing.assert_allclose(float(mu[0, 0]), (1 - cfg.optimizer.b1) * 100.0 * expect_ratio, rtol=1e-5)


# --------------------------------------------------------------------------- step
@pytest.fixture(scope="module")
def one_device_state():
    mesh = sharding.make_mesh(fsdp=1, devices=jax.devices()[:1])
    cfg = tiny_config(**{"optimizer.warmup_steps": 0})
    model_cfg = ModelConfig.tiny_mixtral(router_aux_loss_coef=0.0)  # aux losses are per micro-batch (nonlinear)
    graphdef, state, shardings = step_lib.make_train_state(model_cfg, cfg, mesh)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.num_steps)
    rng = np.random.default_rng(0)
    b, t = 4, 16
    tok = rng.integers(3, 512, (b, t + 1)).astype(np.int32)
    seg = np.repeat(np.array([[1] * 10 + [2] * 6]), b, 0).astype(np.int32)
    batch = dict(tokens=tok[:, :-1], targets=tok[:, 1:], weights=(rng.random((b, t)) > 0.2).astype(np.float32),
                 positions=np.where(seg == 1, np.arange(t), np.arange(t) - 10).astype(np.int32), segment_ids=seg)
    return mesh, graphdef, state, tx, schedule, {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.slow
def test_grad_accumulation_matches_one_big_batch(one_device_state):
    import optax

    _, graphdef, state, _, schedule, batch = one_device_state
    sgd = optax.sgd(1.0)  # params move by exactly -grad: compares gradients, not Adam's sign-like first step
    state = dict(state, opt_state=sgd.init(state["params"]))
    f = jax.jit(lambda s, b, n: step_lib.train_step(graphdef, sgd, s, b, grad_accum_steps=n, schedule=schedule),
                static_argnums=2)
    s1, m1 = f(state, batch, 1)
    s2, m2 = f(state, batch, 2)
    np.testing.assert_allclose(m1["ce_loss"], m2["ce_loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    assert float(m2["tokens"]) == float(batch["weights"].sum())
    leaves = [jax.tree.leaves(s["params"]) for s in (s1, s2, state)]
    for a, b, p in zip(*leaves, strict=True):
        g1, g2 = np.asarray(p - a), np.asarray(p - b)
        np.testing.assert_allclose(g1, g2, atol=2e-5 * max(1.0, float(np.abs(g1).max())))
    assert m1["expert_load"].shape == (2, 4) and float(m1["z_loss"]) > 0
    before, after = jax.tree.leaves(state["params"]), jax.tree.leaves(s1["params"])
    changed = [not np.array_equal(a, b) for a, b in zip(before, after, strict=True)]
    assert all(changed) and int(s1["step"]) == 1


@pytest.mark.slow
def test_nonfinite_step_leaves_state_untouched(one_device_state):
    _, graphdef, state, tx, schedule, batch = one_device_state
    bad = dict(batch, weights=batch["weights"].at[0, 0].set(jnp.nan))
    new, m = jax.jit(lambda s, b: step_lib.train_step(graphdef, tx, s, b, schedule=schedule))(state, bad)
    assert int(m["nonfinite"]) == 1 and int(new["step"]) == 1
    for a, b in zip(jax.tree.leaves({k: state[k] for k in ("params", "opt_state")}),
                    jax.tree.leaves({k: new[k] for k in ("params", "opt_state")}), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("policy", ["stop", "skip"])
@pytest.mark.slow
def test_nan_policy(policy, tokenizer_path, tmp_path, monkeypatch):
    real = step_lib.train_step

    def poisoned(graphdef, tx, state, batch, **kw):  # a NaN loss at the 3rd step
        w = jnp.where(state["step"] == 2, jnp.nan, batch["weights"])
        return real(graphdef, tx, state, dict(batch, weights=w), **kw)

    monkeypatch.setattr(step_lib, "train_step", poisoned)
    cfg = tiny_config(num_steps=4, batch_size=8, log_every=1, nan_policy=policy,
                      **{"checkpoint.every_steps": 2, "data.tokenizer": tokenizer_path, "data.validation": "",
                         "optimizer.warmup_steps": 1,
                         "data.seq_len": 32})
    workdir = str(tmp_path / policy)
    if policy == "stop":
        with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 3.*newest checkpoint is 2"):
            trainer.train(cfg, workdir)
        assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    else:
        result = trainer.train(cfg, workdir)
        assert result["status"] == "done" and result["last_metrics"]["skipped_steps"] == 1
        losses = [r["loss"] for r in read_metrics(workdir)]
        assert np.isnan(losses[2]) and np.isfinite(losses[3])


# --------------------------------------------------------------------------- FLOPs
def test_flops_are_window_aware():
    assert mean_attended_keys(4, None) == 2.5 and mean_attended_keys(4, 2) == 1.75
    windowed, full = ModelConfig.tiny(sliding_window=16), ModelConfig.tiny(sliding_window=None)
    diff = flops_per_token(full, 64) - flops_per_token(windowed, 64)
    cfg = windowed
    per_key = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim
    np.testing.assert_allclose(diff, per_key * (32.5 - mean_attended_keys(64, 16)))
    moe = ModelConfig.tiny_mixtral()
    assert flops_per_token(moe, 64) < flops_per_token(moe.replace(num_experts_per_tok=4), 64)
