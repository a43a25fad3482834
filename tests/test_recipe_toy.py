"""Adding a recipe touches no existing file: this file defines a toy recipe, registers it and trains it through the
normal entry (``trainer.train``), with its own config block, a before-step hook and a checkpoint extra.

The toy's objective is ``config.toy.scale`` times the token loss of the batch's rows read backwards (inputs and
targets swapped and reversed), so its logged loss can be told from the pretraining loss and checked directly.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from mistral_jax import sharding
from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.training import loss as loss_lib
from mistral_jax.training import recipe as recipe_lib
from mistral_jax.training import run as run_lib
from mistral_jax.training import step as step_lib
from mistral_jax.training import trainer
from mistral_jax.training.hooks import Hooks
from mistral_jax.training.metrics import read_metrics

CALLS: list[tuple[str, int, object]] = []  # what the toy's hooks saw, in order


def reversed_rows(batch):
    """Each row read backwards: the sequence s = tokens + last target reversed (positions restart at 0)."""
    flip = lambda x: jnp.flip(jnp.asarray(x), axis=-1)  # noqa: E731
    t = batch["tokens"].shape[-1]
    return dict(tokens=flip(batch["targets"]), targets=flip(batch["tokens"]), weights=flip(batch["weights"]),
                segment_ids=flip(batch["segment_ids"]),
                positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), batch["tokens"].shape))


@dataclasses.dataclass(frozen=True)
class ReversedLoss(step_lib.Objective):
    scale: float = 1.0

    def loss(self, model, batch, prepared):
        loss, metrics = loss_lib.loss_fn(model, reversed_rows(batch))
        return self.scale * loss, {**metrics, "loss": self.scale * loss}


class ToyHooks(Hooks):
    def __init__(self):
        self.before = 0  # before-step calls of the whole run (kept across a resume by the checkpoint extra)

    def restore_extras(self, extras):
        CALLS.append(("restore", -1, dict(extras)))
        self.before = int(extras.get("before_steps", 0))

    def before_step(self, step, state, batch):
        self.before += 1
        CALLS.append(("before", step, int(state["step"])))
        return state

    def after_step(self, step, state, metrics):
        CALLS.append(("after", step, int(state["step"])))
        return {**metrics, "toy/before_steps": self.before}

    def checkpoint_extras(self, step):
        return {"before_steps": self.before, "saved_at": step}


class Toy(recipe_lib.Recipe):
    """Reversed-rows token loss on text data, scaled by ``config.toy.scale``."""

    state_fields = ("toy.scale",)

    @classmethod
    def config_defaults(cls):
        b = ConfigDict()
        b.scale = 1.0  # multiplies the reversed-rows token loss
        return b

    @classmethod
    def make_objective(cls, cfg, init_from, adapters):
        return ReversedLoss(scale=float(cfg.toy.scale))

    def describe(self):
        return f"toy reversed-rows loss x{self.objective.scale:g}"

    def hooks(self):
        return ToyHooks()


@pytest.fixture
def toy():
    """Registered for this test only (later tests see the registry as before)."""
    recipe_lib.register_recipe("toy")(Toy)
    try:
        yield Toy
    finally:
        recipe_lib.RECIPES.pop("toy")


def _config(tokenizer_path, **overrides):
    from configs import tiny  # after registering: base.get_config() adds config.toy

    c = tiny.get_config()
    c.progress_bar = False
    c.update_from_flattened_dict({"recipe": "toy", "toy.scale": 3.0, "num_steps": 2, "batch_size": 8,
                                  "log_every": 1, "data.seq_len": 32, "data.validation": "",
                                  "data.tokenizer": tokenizer_path, "checkpoint.every_steps": 1,
                                  "checkpoint.async_save": False, "optimizer.warmup_steps": 0, **overrides})
    return c


def test_an_unregistered_recipe_is_refused_naming_the_registry():
    from configs import tiny

    c = tiny.get_config()
    assert "toy" not in c  # no block without the recipe
    c.recipe = "toy"
    with pytest.raises(recipe_lib.ConfigError, match=r"config.recipe='toy' is not a registered recipe.*preference"):
        recipe_lib.choose(c)


@pytest.mark.heavy  # trains or compiles end to end: fast tier, not light
def test_a_toy_recipe_trains_through_the_normal_entry(toy, tokenizer_path, tmp_path):
    cfg = _config(tokenizer_path)
    assert cfg.toy.scale == 3.0 and "toy.scale" in recipe_lib.state_fields()
    run_lib.validate_config(cfg)  # the schema (configs/base.py) accepts the recipe's own block
    run = run_lib.resolve(cfg)
    assert isinstance(run.recipe, Toy) and run.recipe.name == "toy reversed-rows loss x3 from a fresh init, every " \
                                                              "weight trains"
    CALLS.clear()
    workdir = str(tmp_path / "toy")
    out = trainer.train(cfg, workdir)
    assert out["status"] == "done" and out["step"] == 2
    # the hooks ran, in the loop's order, with the state before / after each step
    assert CALLS == [("restore", -1, {}), ("before", 0, 0), ("after", 1, 1), ("before", 1, 1), ("after", 2, 2)]
    logged = {r["step"]: r for r in read_metrics(workdir) if "loss" in r}
    assert [logged[s]["toy/before_steps"] for s in (1, 2)] == [1, 2]
    meta = json.load(open(os.path.join(workdir, "checkpoints", "2", "meta", "metadata")))
    assert meta["recipe"] == {"before_steps": 2, "saved_at": 2}

    # the logged loss of step 1 is the toy's: 3 x the full-logits token loss of the initial model on the first
    # batch read backwards (computed here without the recipe's objective)
    model = run.recipe.init_model(run.model_cfg, run.mesh, run.rules)
    bsharding = sharding.batch_sharding(run.mesh, run.rules)
    batch = next(run.recipe.batches(run.recipe.open_data("train"), Tokenizer(tokenizer_path), cfg.batch_size,
                                    train=True, bsharding=bsharding))
    s = np.concatenate([batch["tokens"], batch["targets"][:, -1:]], axis=1)[:, ::-1]  # each row's sequence, backwards
    seg, w = batch["segment_ids"][:, ::-1], batch["weights"][:, ::-1]
    pos = np.broadcast_to(np.arange(s.shape[1] - 1), seg.shape)
    logits = np.asarray(jax.jit(lambda t, p, g: model(t, positions=p, segment_ids=g))(
        np.ascontiguousarray(s[:, :-1]), pos, np.ascontiguousarray(seg)), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, s[:, 1:, None], axis=-1)[..., 0]
    direct = 3.0 * float((nll * w).sum() / w.sum())
    np.testing.assert_allclose(logged[1]["loss"], direct, rtol=2e-5)
    forwards = float(loss_lib.loss_fn(model, {k: jnp.asarray(v) for k, v in batch.items()})[0])
    assert abs(logged[1]["loss"] - 3.0 * forwards) > 1e-3  # not the pretraining loss

    # resumed, the checkpoint extra comes back to the hooks
    CALLS.clear()
    assert trainer.train(_config(tokenizer_path, num_steps=3), workdir)["step"] == 3
    assert CALLS[0] == ("restore", -1, {"before_steps": 2, "saved_at": 2}) and CALLS[1] == ("before", 2, 2)
    assert {r["step"]: r for r in read_metrics(workdir) if "loss" in r}[3]["toy/before_steps"] == 3

