"""The training loop's hooks: what a recipe adds to the loop without the loop knowing the recipe.

``Recipe.hooks()`` gives one ``Hooks`` object per ``train`` call; the loop (``training.trainer``) calls, in order:

* on start, after a checkpoint was restored: ``restore_extras(extras)`` with what ``checkpoint_extras`` returned
  when that checkpoint was saved (``{}`` for a fresh run or a checkpoint saved without extras);
* each step, after this process's batch was read: ``rollout(step, state, batch)`` (may produce the batch: an RL
  recipe generates its samples here from the prompts of ``batch``), then ``before_step(step, state, batch)``
  (may return a changed state), the jitted train step, then ``after_step(step, state, metrics)`` (may add
  metrics; ``step`` is now the finished step's number);
* after each held-out evaluation: ``eval(step, state, metrics)`` (may add or change metrics);
* at each checkpoint save: ``checkpoint_extras(step)``, a JSON-able dict saved in the checkpoint's ``meta`` under
  ``"recipe"`` (nothing is saved when it is empty, so checkpoints of recipes without extras are unchanged).

Every default does nothing, so the loop behaves as without hooks. Hooks run on every process: a hook that changes
the batch or the state must do the same on each (the train step is one SPMD program).
"""

from __future__ import annotations

from typing import Any


class Hooks:
    """The default hooks (none); a recipe subclasses it and overrides what it needs. See the module docstring."""

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

    def eval(self, step: int, state: dict[str, Any], metrics: dict[str, float]) -> dict[str, float]:
        """Called after each held-out evaluation at ``step``; returns the metrics to log (under ``eval/``)."""
        del step, state
        return metrics

    def checkpoint_extras(self, step: int) -> dict[str, Any]:
        """JSON-able state of the recipe saved with checkpoint ``step`` (restored by ``restore_extras``)."""
        del step
        return {}
