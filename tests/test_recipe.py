"""Recipes chosen once and runs resolved once: training/recipe.py, training/run.py, the train state they build."""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import mistral_jax as mj
from configs import tiny, tiny_sft
from mistral_jax import lora
from mistral_jax.training import recipe as recipe_lib
from mistral_jax.training import run as run_lib
from mistral_jax.training import step as step_lib
from mistral_jax.training.metrics import read_metrics
from mistral_jax.training.optimizer import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hf_config_dir(tmp_path, cfg: mj.ModelConfig):
    """A directory that reads as an HF checkpoint as far as its config goes (no weights needed to resolve)."""
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.to_hf("float32")))
    return d


def test_the_trainer_step_and_aot_name_no_recipe():
    for name in ("training/trainer.py", "training/loop.py", "training/step.py", "training/hooks.py", "training/run.py",
                 "aot/__init__.py", "cli/aot.py", "cli/train.py", "../configs/base.py"):
        text = open(os.path.join(ROOT, "mistral_jax", name), encoding="utf-8").read()
        code = "\n".join(line.split("#")[0] for line in text.splitlines())  # comments may name examples
        if name != "../configs/base.py":
            assert not re.search(r"sft|lora|dpo|orpo|preference", text, re.I), name
        # no branching on a recipe's or a data kind's name: recipes declare what differs (training/recipe.py)
        assert not re.search(r"""(data|recipe)\.(name|kind)\s*[=!]=|[=!]=\s*["'](text|chat|preference|pretrain)["']|"""
                             r"""\.preference\b|isinstance\([^)]*(RowReaders|LocalSource)""", code), name


def test_every_recipe_is_registered_in_one_place():
    """The built-in recipes are entries of ``RECIPES``; ``data.format`` picks its default one when
    ``config.recipe`` is "", and the schema holds each registered recipe's own block (none listed in base.py)."""
    assert {"pretrain", "sft", "preference", "grpo"} <= set(recipe_lib.RECIPES)
    assert {k: c.default_for for k, c in recipe_lib.RECIPES.items() if c.default_for} == {
        "pretrain": "text", "sft": "chat", "preference": "preference", "grpo": "prompts"}
    base = open(os.path.join(ROOT, "configs", "base.py"), encoding="utf-8").read()
    assert "c.preference" not in base and "preference" in run_lib.base_config()
    assert "preference.objective" in recipe_lib.state_fields()
    c = tiny_sft.get_config()
    assert type(recipe_lib.choose(c)) is recipe_lib.RECIPES["sft"]
    c.recipe = "pretrain"  # by name: the data stays chat, the recipe's own behaviour applies
    assert type(recipe_lib.choose(c)) is recipe_lib.RECIPES["pretrain"]
    c.recipe, c.data.format = "", "tables"
    with pytest.raises(recipe_lib.ConfigError, match=r"config.data.format='tables' is unknown"):
        recipe_lib.choose(c)
    with pytest.raises(ValueError, match="already registered"):
        recipe_lib.register_recipe("sft")(type("Other", (recipe_lib.Recipe,), {}))


def test_choose_reads_the_recipe_from_the_config_alone():
    r = recipe_lib.choose(tiny.get_config())
    assert (r.data.name, r.init_from, r.adapters, r.trains_tokenizer) == ("text", "", None, True)
    assert r.name == "text pretraining from a fresh init, every weight trains"
    c = tiny_sft.get_config()
    c.init_from = "/nowhere"  # choosing reads nothing
    r = recipe_lib.choose(c)
    assert (r.data.name, r.init_from, r.adapters, r.trains_tokenizer) == ("chat", "/nowhere", None, False)
    c.lora.rank, c.lora.targets = 8, "q_proj,v_proj"
    r = recipe_lib.choose(c)
    assert r.adapters == recipe_lib.LoRA(rank=8, alpha=16.0, targets="q_proj,v_proj", seed=0)
    assert r.name == "chat fine-tuning from /nowhere, LoRA rank 8 on wq,wv"
    c.lora.targets = "nope"
    with pytest.raises(recipe_lib.ConfigError, match=r"config.lora.targets='nope': unknown LoRA target"):
        recipe_lib.choose(c)


def test_init_from_replaces_only_the_architecture(tmp_path):
    ckpt_cfg = mj.ModelConfig.tiny(dim=32, n_layers=3, hidden_dim=96, max_seq_len=256, rope_theta=1e6)
    ckpt = _hf_config_dir(tmp_path, ckpt_cfg)
    c = tiny_sft.get_config()
    c.init_from = str(ckpt)
    c.model.dtype, c.model.attention_impl, c.remat = "bfloat16", "reference", "full"
    run = run_lib.resolve(c)
    m = run.model_cfg
    assert m.architecture() == ckpt_cfg.architecture()  # the checkpoint's network
    assert (m.dtype, m.attention_impl, m.remat, m.param_dtype) == ("bfloat16", "reference", "full", "float32")
    assert m.attention_block_size == mj.ModelConfig.tiny().attention_block_size  # the run's preset, not the file's
    assert m.platform == "cpu"
    c.model.max_seq_len = 1024  # holds no parameter: a fine-tune may change the context length
    assert run_lib.resolve(c).model_cfg.max_seq_len == 1024
    c.data.seq_len = 2048
    with pytest.raises(run_lib.ConfigError, match=r"config.data.seq_len=2048 must be in \[2, model max_seq_len=1024\]"):
        run_lib.resolve(c)
    c.data.seq_len, c.init_from = 128, None  # the instruct configs' placeholder: required
    with pytest.raises(run_lib.ConfigError, match="config.init_from is required"):
        run_lib.resolve(c)
    assert run_lib.resolve(c, require_checkpoint=False).model_cfg.dim == mj.ModelConfig.tiny().dim  # AOT: config.model
    c.init_from = str(tmp_path / "missing")
    with pytest.raises(run_lib.ConfigError, match="is not a directory"):
        run_lib.resolve(c)


def test_resolve_gives_model_mesh_rules_and_platform():
    c = tiny.get_config()
    c.mesh.fsdp, c.mesh.tensor = 4, 2
    run = run_lib.resolve(c)
    assert dict(run.mesh.shape) == {"data": 1, "fsdp": 4, "context": 1, "tensor": 2, "expert": 1}
    assert run.rules.mesh_axes("heads") == "tensor"  # auto: the TP preset for tensor > 1
    assert run.model_cfg == mj.ModelConfig.tiny(platform="cpu")
    c.model.platform = "tpu"  # an explicit target platform wins over the devices'
    assert run_lib.resolve(c).model_cfg.platform == "tpu"
    c.model.platform, c.remat, c.model.remat = None, "save_dots", "full"  # the shorthand wins, mapped once
    assert run_lib.resolve(c).model_cfg.remat == "save_dots"
    c.remat = ""
    assert run_lib.resolve(c).model_cfg.remat == "full"
    with pytest.raises(run_lib.ConfigError, match="config.mesh"):  # fsdp 4 x tensor 2 on 4 devices
        run_lib.resolve(c, devices=jax.devices()[:4])
    c.mesh.fsdp = -1
    assert dict(run_lib.resolve(c, devices=jax.devices()[:4]).mesh.shape)["fsdp"] == 2


def test_saved_config_loads_for_this_host(tmp_path):
    """model_config.json records the platform it was built for; loading it elsewhere re-resolves it."""
    from mistral_jax.export import save_jax

    model = mj.Transformer(mj.ModelConfig.tiny(platform="tpu"), rngs=nnx.Rngs(0))
    out = save_jax(model, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "model_config.json").read_text())["platform"] == "tpu"
    got = mj.load_pretrained(out)
    assert got.cfg.platform == "cpu" and got.cfg.replace(platform="tpu") == model.cfg
    assert mj.load_pretrained(out, config_overrides={"platform": "tpu"}).cfg.platform == "tpu"
    np.testing.assert_array_equal(np.asarray(got.embed[...]), np.asarray(model.embed[...]))


def _state(rank: int, mesh):
    from mistral_jax import sharding

    rules = sharding.DEFAULT_RULES
    c = tiny.get_config()
    c.lora.rank, c.lora.targets = rank, "wq,wv"
    c.optimizer.warmup_steps = 0
    recipe = recipe_lib.choose(c)
    model_cfg = mj.ModelConfig.tiny(platform="cpu")
    tx, schedule = make_optimizer(c.optimizer, c.num_steps)
    graphdef, abstract, shardings = step_lib.state_layout(recipe.abstract_model(model_cfg), tx, mesh, rules,
                                                          recipe.trainable)
    state = step_lib.init_state(recipe.init_model(model_cfg, mesh, rules), tx, shardings, mesh, rules,
                                recipe.trainable)
    return graphdef, abstract, shardings, state, tx, schedule


@pytest.mark.heavy
def test_state_layout_can_keep_a_frozen_copy_of_the_initial_weights():
    """``keep_initial`` (an objective measured against the starting model): ``frozen`` holds the model's frozen
    variables and a copy of the trained ones, own buffers with the params' shardings, outside the optimizer."""
    from mistral_jax import sharding

    mesh = sharding.make_mesh(fsdp=8)
    rules = sharding.DEFAULT_RULES
    c = tiny.get_config()
    c.optimizer.warmup_steps = 0
    recipe = recipe_lib.choose(c)
    model_cfg = mj.ModelConfig.tiny(platform="cpu")
    tx, _ = make_optimizer(c.optimizer, c.num_steps)
    _, plain, _ = step_lib.state_layout(recipe.abstract_model(model_cfg), tx, mesh, rules)
    _, abstract, shardings = step_lib.state_layout(recipe.abstract_model(model_cfg), tx, mesh, rules,
                                                   keep_initial=True)
    assert abstract["frozen"]["model"] == {} and shardings["frozen"]["initial"] == shardings["params"]
    assert jax.tree.structure(abstract["opt_state"]) == jax.tree.structure(plain["opt_state"])
    state = step_lib.init_state(recipe.init_model(model_cfg, mesh, rules), tx, shardings, mesh, rules,
                                keep_initial=True)
    for p, q in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(state["frozen"]["initial"]), strict=True):
        np.testing.assert_array_equal(np.asarray(p), np.asarray(q))
        assert p.sharding == q.sharding
        ptr = [x.addressable_shards[0].data.unsafe_buffer_pointer() for x in (p, q)]
        assert ptr[0] != ptr[1]  # own buffers: the state is donated each step


@pytest.mark.slow
def test_train_state_holds_what_is_trainable():
    from mistral_jax import sharding

    mesh = sharding.make_mesh(fsdp=2, devices=jax.devices()[:2])
    g_full, a_full, _, full, _, _ = _state(0, mesh)
    assert full["frozen"] == {} and a_full["frozen"] == {}
    # the same fresh init as step.make_train_state (seed 0), which the tests of the step use
    _, ref, _ = step_lib.make_train_state(mj.ModelConfig.tiny(platform="cpu"), tiny.get_config(), mesh)
    for a, b in zip(jax.tree.leaves(full["params"]), jax.tree.leaves(ref["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    graphdef, abstract, shardings, state, tx, schedule = _state(4, mesh)
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    assert names and all(n.endswith(("['a']", "['b']")) for n in names)  # only adapters train
    # the whole base is frozen (adapted weights as {"base": W}): the seeded init
    for a, b in zip(jax.tree.leaves(state["frozen"]), jax.tree.leaves(full["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(abstract) == jax.tree.structure(state)

    rng = np.random.default_rng(0)
    tok = rng.integers(3, 512, (2, 17)).astype(np.int32)
    batch = dict(tokens=tok[:, :-1], targets=tok[:, 1:], weights=np.ones((2, 16), np.float32),
                 positions=np.tile(np.arange(16, dtype=np.int32), (2, 1)), segment_ids=np.ones((2, 16), np.int32))
    frozen_before = jax.tree.map(np.asarray, state["frozen"])
    b_before = np.asarray(state["params"]["layers"]["attention"]["wq"]["b"])
    step_fn = step_lib.jit_train_step(graphdef, tx, shardings, mesh, schedule=schedule)
    eval_fn = step_lib.jit_eval_step(graphdef, shardings, mesh)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        before = eval_fn(state["params"], state["frozen"], batch)
        new, metrics = step_fn(state, batch)
        after = eval_fn(new["params"], new["frozen"], batch)
    assert int(metrics["nonfinite"]) == 0 and int(new["step"]) == 1
    assert not np.array_equal(np.asarray(new["params"]["layers"]["attention"]["wq"]["b"]), b_before)  # B moved
    for a, b in zip(jax.tree.leaves(new["frozen"]), jax.tree.leaves(frozen_before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)  # the base never moves
    assert float(after["ce_sum"]) != float(before["ce_sum"])  # the eval sees the adapters


@pytest.mark.slow
def test_lora_run_resumes_with_its_frozen_base_rebuilt(tokenizer_path, tmp_path):
    """A LoRA run's checkpoints hold only the adapters; a resumed run rebuilds the frozen base (here the seeded
    init) and continues exactly as the uninterrupted run."""
    cfg = tiny.get_config()
    cfg.progress_bar = False
    cfg.update_from_flattened_dict({"num_steps": 4, "batch_size": 8, "log_every": 1, "data.seq_len": 32,
                                    "data.validation": "", "data.tokenizer": tokenizer_path,
                                    "checkpoint.every_steps": 2, "checkpoint.async_save": False,
                                    "optimizer.warmup_steps": 1, "optimizer.learning_rate": 1e-2,
                                    "lora.rank": 4, "lora.targets": "wq,wv"})
    from mistral_jax.training import trainer

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

    def losses(w):
        return {r["step"]: r["loss"] for r in read_metrics(w) if "loss" in r}

    np.testing.assert_allclose([losses(resumed)[s] for s in (3, 4)], [losses(ref)[s] for s in (3, 4)], rtol=1e-6)
    merged = mj.load_pretrained(resumed)  # base + adapters, merged
    assert not lora.is_lora(merged) and merged.cfg.platform == "cpu"
