"""The training loop's hooks: what a recipe adds to the loop without the loop knowing the recipe.

``Recipe.hooks()`` gives one ``Hooks`` object per ``train`` call; the loop (``training.trainer``) calls, in order:

* on start: ``setup(context)`` with the run's ``LoopContext`` (run spec, the train state's graphdef, tokenizer,
  workdir); then, after a checkpoint was restored, ``restore_extras(extras)`` with what ``checkpoint_extras``
  returned when that checkpoint was saved (``{}`` for a fresh run or a checkpoint saved without extras);
* each step, after this process's batch was read: ``rollout(step, state, batch)`` (may produce the batch: an RL
  recipe generates its samples here from the prompts of ``batch``; timed as goodput's ``rollout``), then
  ``before_step(step, state, batch)``
  (may return a changed state), the jitted train step, then ``after_step(step, state, metrics)`` (may add
  metrics; ``step`` is now the finished step's number);
* at each held-out evaluation: ``held_out(step, state)``: a recipe whose held-out measure is not its objective's
  eval step (RL: the reward of answers to held-out prompts) returns its metrics, else None (the default: the
  objective's eval over ``eval_steps`` validation batches); then ``eval(step, state, metrics)`` (may add or change
  metrics);
* at each checkpoint save: ``checkpoint_extras(step)``, a JSON-able dict saved in the checkpoint's ``meta`` under
  ``"recipe"`` (nothing is saved when it is empty, so checkpoints of recipes without extras are unchanged).

Every default does nothing, so the loop behaves as without hooks. Hooks run on every process: a hook that changes
the batch or the state must do the same on each (the train step is one SPMD program).

A hook that cannot go on (an RL reward function that raised on an example) raises ``StopRun``: the loop saves a
checkpoint of the last finished step (its data position before the failed step's batch, so a resumed run reads
that batch again) and re-raises it; ``train.py`` prints its one-line message and exits 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class StopRun(RuntimeError):
    """Raised by a hook to stop the run: the loop checkpoints the last finished step, then re-raises it."""


@dataclasses.dataclass(frozen=True)
class LoopContext:
    """What the loop hands the hooks once at start (``Hooks.setup``)."""

    run: Any  # training.run.RunSpec: cfg, model_cfg, mesh, rules, recipe
    graphdef: Any  # of the train state: nnx.merge(graphdef, params, frozen) is the model
    tokenizer: Any  # data.tokenizer.Tokenizer
    workdir: str


class Hooks:
    """The default hooks (none); a recipe subclasses it and overrides what it needs. See the module docstring."""

    def setup(self, context: LoopContext) -> None:
        """Called once at start, before ``restore_extras``."""
        del context

    def restore_extras(self, extras: dict[str, Any]) -> None:
        """Called once at start with the restored checkpoint's extras (``{}`` when there are none)."""
        del extras

    def rollout(self, step: int, state: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
        """This process's batch (numpy arrays) of step ``step + 1``; return the batch to train on."""
        del step, state
        return batch

    def before_step(self, step: int, state: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
        """Called before the train step that makes ``step + 1``; returns the state to train (default: unchanged)."""
        del step, batch
        return state

    def after_step(self, step: int, state: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
        """Called after train step ``step`` with its (device) metrics; returns the metrics to log."""
        del step, state
        return metrics

    def held_out(self, step: int, state: dict[str, Any]) -> dict[str, float] | None:
        """The recipe's own held-out metrics at ``step`` (logged under ``eval/``), or None: the objective's eval."""
        del step, state
        return None

    def eval(self, step: int, state: dict[str, Any], metrics: dict[str, float]) -> dict[str, float]:
        """Called after each held-out evaluation at ``step``; returns the metrics to log (under ``eval/``)."""
        del step, state
        return metrics

    def checkpoint_extras(self, step: int) -> dict[str, Any]:
        """JSON-able state of the recipe saved with checkpoint ``step`` (restored by ``restore_extras``)."""
        del step
        return {}
